"""Adam-like scalings with other moment updates: Yogi's sign-corrected second moment,
AdaMax's infinity norm and Adan's three moments (of the gradient, of its difference, and of
their combination squared).

Formulas (g: gradient, t: step count from 1; EMA, bias correction and Adam's direction as in
:mod:`.statistics`)::

    Yogi:    m_t = EMA_b1(g),  v_t = v_{t-1} - (1 - b2) sign(v_{t-1} - g_t^2) g_t^2
             (m_0 = v_0 = initial_accumulator_value);  u = m_hat / (sqrt(v_hat + eps_root) + eps)
    AdaMax:  m_t = EMA_b1(g),  v_t = max(b2 v_{t-1}, |g_t| + eps);  u = m_hat / v_t
    Adan:    d_t = g_t - g_{t-1} (0 at t = 1)
             m_t = EMA_b1(g),  v_t = EMA_b2(d),  n_t = EMA_b3((g_t + (1 - b2) d_t)^2)
             u = (m_hat + (1 - b2) v_hat) / (sqrt(n_hat + eps_root) + eps)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  DECAY,
  EPS,
  EPS_POSITIVE,
  EPS_ROOT,
  MOMENTUM,
  GradientTransformation,
  ScalarOrSchedule,
  check_not_both_zero,
  expect_state,
  public,
  real,
  safe_increment,
  zero_count,
)
from optcompose.transforms.adaptive import ScaleByAdamState
from optcompose.transforms.adaptive_variants import FIXED_DECAY
from optcompose.transforms.statistics import (
  in_grad_dtypes,
  _wide_enough,
  adam_direction_leaf,
  debias_factor,
  debias_leaf,
  ema_leaf,
  moments_init,
  squares_init,
  same_structure,
  square_leaf,
)

# ----------------------------------------------------------------------------------------
# The new formulas.


def yogi_leaf(b2, v, g):
  """Yogi's second moment ``v - (1 - b2) sign(v - g^2) g^2`` (squared as in square_leaf)."""
  g2 = square_leaf(g, v)
  v, g2 = otree.promote(v, g2)
  step = jnp.multiply(*otree.promote(1 - b2, jnp.sign(v - g2)))
  return v - jnp.multiply(*otree.promote(step, g2))


def infinity_moment_leaf(b2, v, g, eps):
  """AdaMax's ``max(b2 v, |g| + eps)`` (float16 in float32: eps = 1e-8 is 0 in float16)."""
  g = _wide_enough(g)
  bound = jnp.add(*otree.promote(jnp.abs(g), eps))
  return jnp.maximum(*otree.promote(bound, jnp.multiply(*otree.promote(b2, v))))


def infinity_direction_leaf(m_hat, v):
  """AdaMax's direction ``m_hat / v``."""
  return jnp.divide(*otree.promote(_wide_enough(m_hat), _wide_enough(v)))


def difference_leaf(g, g_prev, started):
  """Adan's ``(g - g_prev) * started``: the scalar ``started`` is 0 at the first step."""
  d = jnp.subtract(*otree.promote(g, g_prev))
  return d * jnp.asarray(started, jnp.result_type(d))


def adan_sum_leaf(b2, x, y):
  """Adan's ``x + (1 - b2) y`` (the squared term's base, and the direction's numerator)."""
  return jnp.add(*otree.promote(x, jnp.multiply(*otree.promote(1 - b2, y))))


# ----------------------------------------------------------------------------------------
# The transformations.


@public(
  "transformation",
  optax="scale_by_yogi",
  b1=DECAY,
  b2=DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
  initial_accumulator_value=real(0.0, draw=(1e-8, 1e-2), schedule=False),
)
def scale_by_yogi(
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-3,
  eps_root: ScalarOrSchedule = 0.0,
  initial_accumulator_value: float = 1e-6,
) -> GradientTransformation:
  """Yogi's scaling: Adam's direction with an additive, sign-corrected second moment.

  Update (t from 1, ``m_0 = v_0 = initial_accumulator_value``)::

      m_t = (1 - b1) g_t + b1 m_{t-1}                      m_hat = m_t / (1 - b1^t)
      v_t = v_{t-1} - (1 - b2) sign(v_{t-1} - g_t^2) g_t^2  v_hat = v_t / (1 - b2^t)
      u   = m_hat / (sqrt(v_hat + eps_root) + eps)

  v stays >= 0 (it moves towards g^2 by at most (1 - b2) g^2). Both moments start at
  ``initial_accumulator_value`` and are debiased, as in Optax. ``initial_accumulator_value``
  must be >= 0 (Optax's documentation says positive; 0 is well defined, a negative v_0 would
  give the square root of a negative number), and ``eps`` and ``eps_root`` may not both be 0
  (stricter than Optax: a gradient that is 0 from the start keeps v at v_0).

  Args:
    b1: the first moment's decay, in [0, 1) (a number or a schedule).
    b2: the second moment's rate, in [0, 1) (a number or a schedule).
    eps: added after the square root (a number or a schedule).
    eps_root: added under the square root (a number or a schedule); 0 by default.
    initial_accumulator_value: m_0 and v_0, >= 0 (a number).

  Returns:
    A transformation with state ``ScaleByAdamState`` (``count``, ``mu``, ``nu``); updates
    keep the gradients' dtype.

  References:
    Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018; Optax's
    ``optax.scale_by_yogi``.
  """
  check_not_both_zero("scale_by_yogi", eps, eps_root)

  def init(params):
    return ScaleByAdamState(
      zero_count(),
      moments_init(params, value=initial_accumulator_value),
      squares_init(params, value=initial_accumulator_value),
    )

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByAdamState, "scale_by_yogi")
    same_structure(updates, state.mu, "mu")
    mu = jax.tree.map(lambda g, m: ema_leaf(b1, m, g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: yogi_leaf(b2, v, g), updates, state.nu)
    count = safe_increment(state.count)
    c1, c2 = debias_factor(b1, count), debias_factor(b2, count)
    new = jax.tree.map(
      lambda m, v: adam_direction_leaf(debias_leaf(m, c1), debias_leaf(v, c2), eps, eps_root),
      mu,
      nu,
    )
    mu, nu = otree.cast_like(mu, state.mu), otree.cast_like(nu, state.nu)
    return in_grad_dtypes(updates, new), ScaleByAdamState(count, mu, nu)

  return GradientTransformation(init, update)


@public("transformation", optax="scale_by_adamax", b1=DECAY, b2=MOMENTUM, eps=EPS_POSITIVE)
def scale_by_adamax(
  b1: ScalarOrSchedule = 0.9, b2: ScalarOrSchedule = 0.999, eps: ScalarOrSchedule = 1e-8
) -> GradientTransformation:
  """AdaMax's scaling: the debiased first moment over an exponentially weighted infinity norm.

  Update (t from 1, ``m_0 = v_0 = 0``)::

      m_t = (1 - b1) g_t + b1 m_{t-1}          m_hat = m_t / (1 - b1^t)
      v_t = max(b2 v_{t-1}, |g_t| + eps)       (no bias correction)
      u   = m_hat / v_t

  ``eps`` must be positive (stricter than Optax: with eps = 0, a gradient that has been 0
  since the start gives 0 / 0); ``b2`` may be 1 (a running maximum). float16 gradients are
  compared with eps in float32 (1e-8 is 0 in float16; Optax computes in float16).

  Args:
    b1: the first moment's decay, in [0, 1) (a number or a schedule).
    b2: the infinity norm's decay, in [0, 1] (a number or a schedule).
    eps: added to |g|, > 0 (a number or a schedule); it bounds v below.

  Returns:
    A transformation with state ``ScaleByAdamState`` (``count``, ``mu``, ``nu``: v); updates
    keep the gradients' dtype.

  References:
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (section 7.1);
    Optax's ``optax.scale_by_adamax``.
  """

  def init(params):
    return ScaleByAdamState(zero_count(), moments_init(params), moments_init(params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByAdamState, "scale_by_adamax")
    same_structure(updates, state.mu, "mu")
    count = safe_increment(state.count)
    mu = jax.tree.map(lambda g, m: ema_leaf(b1, m, g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: infinity_moment_leaf(b2, v, g, eps), updates, state.nu)
    c1 = debias_factor(b1, count)
    new = jax.tree.map(lambda m, v: infinity_direction_leaf(debias_leaf(m, c1), v), mu, nu)
    mu, nu = otree.cast_like(mu, state.mu), otree.cast_like(nu, state.nu)
    return in_grad_dtypes(updates, new), ScaleByAdamState(count, mu, nu)

  return GradientTransformation(init, update)


class ScaleByAdanState(NamedTuple):
  m: Any
  v: Any
  n: Any
  g: Any
  t: jax.Array


@public(
  "transformation",
  optax="scale_by_adan",
  b1=DECAY,
  b2=DECAY,
  b3=FIXED_DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
)
def scale_by_adan(
  b1: ScalarOrSchedule = 0.98,
  b2: ScalarOrSchedule = 0.92,
  b3: float = 0.99,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
) -> GradientTransformation:
  """Adan's scaling: Nesterov-type moments of the gradient and of its step-to-step difference.

  Update (t from 1, all moments 0 at the start, ``d_1 = 0``)::

      d_t = g_t - g_{t-1}
      m_t = (1 - b1) g_t + b1 m_{t-1}
      v_t = (1 - b2) d_t + b2 v_{t-1}
      n_t = (1 - b3) (g_t + (1 - b2) d_t)^2 + b3 n_{t-1}
      u   = (m_hat + (1 - b2) v_hat) / (sqrt(n_hat + eps_root) + eps)

  with ``m_hat = m_t / (1 - b1^t)``, ``v_hat = v_t / (1 - b2^t)``, ``n_hat = n_t / (1 -
  b3^t)``. The previous gradient is kept in the state. ``b3`` is a number (no schedule);
  ``eps`` and ``eps_root`` may not both be 0 (stricter than Optax).

  Args:
    b1: the decay of the gradients' EMA m, in [0, 1) (a number or a schedule).
    b2: the decay of the differences' EMA v, in [0, 1) (a number or a schedule).
    b3: the decay of the squared term's EMA n, in [0, 1) (a number).
    eps: added after the square root (a number or a schedule).
    eps_root: added under the square root (a number or a schedule); 0 by default.

  Returns:
    A transformation with state :class:`ScaleByAdanState` (``m``, ``v``, ``n``, ``g``: the
    previous gradient, ``t``: the step count); updates keep the gradients' dtype.

  References:
    Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
    Models", TPAMI 2024 (arXiv:2208.06677, algorithm 1); Optax's ``optax.scale_by_adan``.
  """
  check_not_both_zero("scale_by_adan", eps, eps_root)

  def init(params):
    return ScaleByAdanState(
      moments_init(params),
      moments_init(params),
      squares_init(params),
      moments_init(params),
      zero_count(),
    )

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByAdanState, "scale_by_adan")
    same_structure(updates, state.m, "m")
    started = state.t > 0
    diff = jax.tree.map(lambda g, p: difference_leaf(g, p, started), updates, state.g)
    m = jax.tree.map(lambda g, m: ema_leaf(b1, m, g), updates, state.m)
    v = jax.tree.map(lambda d, v: ema_leaf(b2, v, d), diff, state.v)
    n = jax.tree.map(
      lambda g, d, n: ema_leaf(b3, n, square_leaf(adan_sum_leaf(b2, g, d), n)),
      updates,
      diff,
      state.n,
    )
    t = safe_increment(state.t)
    c1, c2, c3 = debias_factor(b1, t), debias_factor(b2, t), debias_factor(b3, t)
    new = jax.tree.map(
      lambda m, v, n: adam_direction_leaf(
        adan_sum_leaf(b2, debias_leaf(m, c1), debias_leaf(v, c2)), debias_leaf(n, c3), eps, eps_root
      ),
      m,
      v,
      n,
    )
    cast = otree.cast_like
    state = ScaleByAdanState(
      cast(m, state.m), cast(v, state.v), cast(n, state.n), cast(updates, state.g), t
    )
    return in_grad_dtypes(updates, new), state

  return GradientTransformation(init, update)


__all__ = ["ScaleByAdanState"]  # and the builders it registers
