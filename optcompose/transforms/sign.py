"""Sign: keep each coordinate's direction, drop its magnitude.

Formulas (g: the incoming update, m: Lion's moment, t: step count from 1)::

    sign:  u = sign(g)          (0 where g = 0)
    Lion:  c_t = (1 - b1) g_t + b1 m_{t-1}      u_t = sign(c_t)
           m_t = (1 - b2) g_t + b2 m_{t-1}

Lion's ``c_t`` mixes in the *previous* moment at rate b1, the stored moment uses b2: both
are written directly from ``m_{t-1}`` (an algebraically equal route through ``m_t`` rounds
differently, and sign turns a rounding difference at c = 0 into a flip of the step).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  DTYPE,
  MOMENTUM,
  GradientTransformation,
  ScalarOrSchedule,
  choice,
  expect_state,
  public,
  real,
  safe_increment,
  stateless_with_tree_map,
  zero_count,
)
from optcompose.transforms.statistics import ema_leaf, in_grad_dtype, like_params, same_structure

LION_MODES = ("hard", "smooth", "refined")


def sign_leaf(g):
  """``sign(g)``, in g's dtype."""
  return jnp.sign(g)


def soft_sign_leaf(c, mode, smooth_beta):
  """Lion's sign of ``c``: ``sign(c)`` ("hard"), ``tanh(smooth_beta c)`` ("smooth"), or
  ``c`` clipped to [-1, 1] ("refined": c where ``|c| < 1``, else ``sign(c)``)."""
  if mode == "hard":
    return sign_leaf(c)
  if mode == "smooth":
    return jnp.tanh(jnp.multiply(*otree.promote(smooth_beta, c)))
  return jnp.clip(c, -1, 1)


@public("transformation", optax="scale_by_sign")
def scale_by_sign() -> GradientTransformation:
  """Replace each coordinate of the updates by its sign: ``u = sign(g)``.

  Returns:
    A stateless transformation.

  References:
    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
  """
  return stateless_with_tree_map(lambda g, w: sign_leaf(g))


class ScaleByLionState(NamedTuple):
  count: jax.Array
  mu: Any


@public(
  "transformation",
  optax="scale_by_lion",
  b1=MOMENTUM,
  b2=MOMENTUM,
  mu_dtype=DTYPE,
  mode=choice(*LION_MODES),
  smooth_beta=real(0.0, low_open=True, schedule=False, draw=(0.1, 10.0)),
)
def scale_by_lion(
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.99,
  mu_dtype: Optional[Any] = None,
  *,
  mode: str = "hard",
  smooth_beta: float = 1.0,
) -> GradientTransformation:
  """Lion's scaling: the sign of an interpolation of the gradient and the previous moment.

  Update (g: incoming gradient, ``m_0 = 0``)::

      c_t = (1 - b1) g_t + b1 m_{t-1}
      u_t = sign(c_t)            ("hard")
            tanh(smooth_beta c_t) ("smooth")
            clip(c_t, -1, 1)      ("refined": c_t where |c_t| < 1, else sign(c_t))
      m_t = (1 - b2) g_t + b2 m_{t-1}

  Args:
    b1: the interpolation weight of the previous moment in c, in [0, 1] (a number or a
      schedule; Optax does not check the range).
    b2: the decay of the stored moment m, in [0, 1] (a number or a schedule).
    mu_dtype: dtype of the stored moment (e.g. ``jnp.bfloat16``); ``None`` keeps the
      parameters'. The arithmetic runs in the wider of the stored and the gradients' dtypes.
    mode: "hard" (the paper's sign), "smooth" or "refined" (above). An unknown mode is a
      ValueError here (Optax raises it at the first update).
    smooth_beta: the slope of "smooth" at 0, > 0 (stricter than Optax, which takes any
      float: a negative slope would step uphill).

  Returns:
    A transformation with state :class:`ScaleByLionState` (``count``, ``mu``); updates keep
    the gradients' dtype and the moment keeps its stored dtype.

  References:
    Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023; Optax's
    ``optax.scale_by_lion``.
  """
  if mode not in LION_MODES:
    raise ValueError(f"scale_by_lion: `mode` must be one of {LION_MODES}, got {mode!r}.")

  def init(params):
    otree.check_floating(params, "params")
    return ScaleByLionState(
      zero_count(), like_params(params, mu_dtype, "scale_by_lion: `mu_dtype`")
    )

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByLionState, "scale_by_lion")
    same_structure(updates, state.mu, "mu")
    out = jax.tree.map(
      lambda g, m: in_grad_dtype(soft_sign_leaf(ema_leaf(b1, m, g), mode, smooth_beta), g),
      updates,
      state.mu,
    )
    mu = jax.tree.map(lambda g, m: ema_leaf(b2, m, g), updates, state.mu)
    return out, ScaleByLionState(safe_increment(state.count), otree.cast_like(mu, state.mu))

  return GradientTransformation(init, update)


__all__ = ["ScaleByLionState"]  # and the builders it registers
