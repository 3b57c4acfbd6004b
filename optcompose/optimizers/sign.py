"""Sign methods: steps of a fixed size in the direction of each coordinate's sign.

Symbols: g gradient, w parameters, lr learning rate (a number or a schedule), m a moment.
"""

from __future__ import annotations

from typing import Any, Optional

from optcompose.core import (
  DECAY,
  DTYPE,
  LEARNING_RATE,
  MASK,
  MOMENTUM,
  GradientTransformation,
  ScalarOrSchedule,
  chain,
  public,
  real,
)
from optcompose.transforms.decay import Mask, add_decayed_weights
from optcompose.transforms.momentum import ema
from optcompose.transforms.scaling import scale_by_learning_rate
from optcompose.transforms.sign import scale_by_lion, scale_by_sign


@public("optimizer", optax="sign_sgd", learning_rate=LEARNING_RATE)
def sign_sgd(learning_rate: ScalarOrSchedule) -> GradientTransformation:
  """signSGD: ``w <- w - lr sign(g)``.

  Chain: ``scale_by_sign``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule.

  Returns:
    A transformation whose state is that of the chain (stateless, or the count of a
    scheduled learning rate).

  References:
    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
  """
  return chain(scale_by_sign(), scale_by_learning_rate(learning_rate))


@public(
  "optimizer", optax="signum", learning_rate=LEARNING_RATE, beta=DECAY, accumulator_dtype=DTYPE
)
def signum(
  learning_rate: ScalarOrSchedule,
  beta: ScalarOrSchedule = 0.9,
  accumulator_dtype: Optional[Any] = None,
) -> GradientTransformation:
  """Signum: signSGD on an exponential moving average of the gradient.

  Update (``m_0 = 0``; no bias correction: it would not change the sign)::

      m_t = beta m_{t-1} + (1 - beta) g_t
      w  <- w - lr sign(m_t)

  Chain: ``ema(beta, debias=False, accumulator_dtype)``, ``scale_by_sign``,
  ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule.
    beta: the decay of m, in [0, 1) (a number or a schedule).
    accumulator_dtype: dtype of the stored m; ``None`` keeps the parameters'. The sign is
      taken of m in the gradients' dtype (``ema``'s output), where Optax takes it of m in
      the wider of the two: they differ only where a float16 gradient cannot hold a
      nonzero float32 m (below 6e-8), whose sign becomes 0.

  Returns:
    A :func:`chain` whose state is ``(EmaState, EmptyState, EmptyState)`` (the last an
    :class:`~optcompose.InjectHyperparamsState` when ``learning_rate`` is a schedule).

  References:
    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018;
    Zhao et al., "Deconstructing What Makes a Good Optimizer for Language Models", 2024;
    Optax's ``optax.signum``.
  """
  return chain(
    ema(beta, debias=False, accumulator_dtype=accumulator_dtype),
    scale_by_sign(),
    scale_by_learning_rate(learning_rate),
  )


@public(
  "optimizer",
  optax="lion",
  learning_rate=LEARNING_RATE,
  b1=MOMENTUM,
  b2=MOMENTUM,
  mu_dtype=DTYPE,
  weight_decay=real(0.0, draw=(0.0, 0.5)),
  mask=MASK,
)
def lion(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.99,
  mu_dtype: Optional[Any] = None,
  weight_decay: ScalarOrSchedule = 1e-3,
  mask: Mask = None,
) -> GradientTransformation:
  """Lion: the sign of an interpolation of the gradient and the moment, with decoupled decay.

  Update (``m_0 = 0``)::

      c_t = (1 - b1) g_t + b1 m_{t-1}
      w  <- w - lr (sign(c_t) + weight_decay w)
      m_t = (1 - b2) g_t + b2 m_{t-1}

  Lion's steps are larger than AdamW's (every coordinate moves by lr): its learning rate
  is typically 3-10x smaller and its weight decay 3-10x larger than AdamW's.

  Chain: ``scale_by_lion(b1, b2, mu_dtype)``, ``add_decayed_weights(weight_decay, mask)``,
  ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the weight of the previous moment in c, in [0, 1].
    b2: the decay of the stored moment m, in [0, 1].
    mu_dtype: dtype of the stored m (e.g. ``jnp.bfloat16``); ``None`` keeps the
      parameters'.
    weight_decay: lambda >= 0 (a number or a schedule), multiplied by lr.
    mask: the leaves that are decayed (a tree of bools with the parameters' structure or a
      prefix of it, or a callable returning one from the parameters); ``None``: all.

  Returns:
    A :func:`chain` whose state is ``(ScaleByLionState, EmptyState, EmptyState)``; a member
    given a schedule has an :class:`~optcompose.InjectHyperparamsState` instead.

  References:
    Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023; Optax's
    ``optax.lion``.
  """
  return chain(
    scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype),
    add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate),
  )


__all__ = []  # and the builders it registers
