"""Adafactor: the factored second moment, clipped, scaled by the parameters' RMS.

Symbols: g gradient, w parameters, lr learning rate (a number or a schedule), per leaf l
``s_l = g_l / sqrt(V_hat_l)`` the update of ``scale_by_factored_rms`` (a rank-1 estimate
``V_hat = R C / mean(R)`` of the second moment for large matrices, a full one elsewhere; see
:mod:`optcompose.transforms.factored`), ``rms(x) = sqrt(mean(|x|^2))``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp

from optcompose.core import (
  DTYPE,
  FLAG,
  MASK,
  GradientTransformation,
  ScalarOrSchedule,
  chain,
  public,
  real,
)
from optcompose.transforms.clipping import clip_by_block_rms
from optcompose.transforms.decay import Mask, add_decayed_weights
from optcompose.transforms.factored import (
  DECAY_RATE,
  EPSILON,
  MIN_DIM,
  STEP_OFFSET,
  scale_by_factored_rms,
)
from optcompose.transforms.momentum import ema
from optcompose.transforms.scaling import scale, scale_by_learning_rate
from optcompose.transforms.trust_ratio import scale_by_param_block_rms


@public(
  "optimizer",
  optax="adafactor",
  learning_rate=real(0.0, draw=(1e-5, 1.0), optional=True),
  min_dim_size_to_factor=MIN_DIM,
  decay_rate=DECAY_RATE,
  decay_offset=STEP_OFFSET,
  multiply_by_parameter_scale=FLAG,
  clipping_threshold=real(0.0, low_open=True, draw=(1.0, 10.0), optional=True),
  momentum=real(0.0, 1.0, draw=(0.0, 0.99), optional=True),
  dtype_momentum=DTYPE,
  weight_decay_rate=real(0.0, draw=(0.0, 1e-3), optional=True),
  eps=EPSILON,
  factored=FLAG,
  weight_decay_mask=MASK,
)
def adafactor(
  learning_rate: Optional[ScalarOrSchedule] = None,
  min_dim_size_to_factor: int = 128,
  decay_rate: float = 0.8,
  decay_offset: int = 0,
  multiply_by_parameter_scale: bool = True,
  clipping_threshold: Optional[ScalarOrSchedule] = 1.0,
  momentum: Optional[ScalarOrSchedule] = None,
  dtype_momentum: Any = jnp.float32,
  weight_decay_rate: Optional[ScalarOrSchedule] = None,
  eps: float = 1e-30,
  factored: bool = True,
  weight_decay_mask: Mask = None,
) -> GradientTransformation:
  """Adafactor: Adam's scaling with a factored second moment and a relative step size.

  Update (each bracketed step only when its argument is given; m the momentum, m_0 = 0)::

      s_l = g_l / sqrt(V_hat_l)                      (scale_by_factored_rms)
      [s_l <- s_l / max(1, rms(s_l) / clipping_threshold)]
      [s_l <- lr s_l]
      [s_l <- s_l max(rms(w_l), 1e-3)]              (multiply_by_parameter_scale)
      [m_l <- momentum m_l + (1 - momentum) s_l ;  s_l <- m_l]
      [s_l <- s_l + weight_decay_rate w_l]          (on the leaves of weight_decay_mask)
      w_l <- w_l - s_l

  The weight decay is added after the learning rate: it is not scaled by it.

  Chain (Optax's order): ``scale_by_factored_rms(factored, decay_rate, decay_offset,
  min_dim_size_to_factor, eps)``, [``clip_by_block_rms(clipping_threshold)``],
  [``scale_by_learning_rate(learning_rate, flip_sign=False)``],
  [``scale_by_param_block_rms()``], [``ema(momentum, debias=False,
  accumulator_dtype=dtype_momentum)``], [``add_decayed_weights(weight_decay_rate,
  weight_decay_mask)``], ``scale(-1)``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count; ``None`` (the
      default, as in Optax) applies none: the step is then relative to the parameters'
      RMS only (with ``multiply_by_parameter_scale``).
    min_dim_size_to_factor: a leaf is factored only if its two largest axes are at least
      this long (a Python int >= 1).
    decay_rate: the exponent c of the statistics' decay ``1 - t^(-c)`` (>= 0).
    decay_offset: subtracted from the step count in that decay (for fine-tuning).
    multiply_by_parameter_scale: scale each leaf's step by ``max(rms(w_l), 1e-3)`` (the
      relative step size); False makes lr an absolute step size.
    clipping_threshold: the largest RMS a leaf's update keeps (> 0; the paper's d = 1), or
      ``None`` for no clipping.
    momentum: the decay of an (un-debiased) average of the updates, in [0, 1) (``ema``
      refuses 1), or ``None`` (the default) for none, which saves its memory.
    dtype_momentum: the dtype of that average (float32, as in Optax); ``None`` keeps the
      parameters'.
    weight_decay_rate: the rate of decoupled weight decay (>= 0), a number or a schedule,
      or ``None`` for none.
    eps: added to every |g|^2 in the statistics (> 0).
    factored: factor the statistics of large matrices (True) or keep a full second
      moment everywhere (False).
    weight_decay_mask: the leaves that are decayed (a tree of bools with the parameters'
      structure or a prefix of it, or a callable returning one); ``None``: all.

  Returns:
    A :func:`chain` with Optax's members and states: ``(FactoredState, [EmptyState],
    [EmptyState], [EmptyState], [EmaState], [EmptyState], EmptyState)`` (a member given a
    schedule has an :class:`~optcompose.InjectHyperparamsState` instead). It needs
    ``params`` when it scales by their RMS or decays them; with ``factored=True``, clipping
    or the parameter scale it refuses FlatParams (they compute per model leaf).

  References:
    Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    ICML 2018; Optax's ``optax.adafactor``.
  """
  tx = [scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps)]
  if clipping_threshold is not None:
    tx.append(clip_by_block_rms(clipping_threshold))
  if learning_rate is not None:
    tx.append(scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    tx.append(scale_by_param_block_rms())
  if momentum is not None:
    tx.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
  if weight_decay_rate is not None:
    tx.append(add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
  tx.append(scale(-1))
  return chain(*tx)


__all__ = []  # and the builders it registers
