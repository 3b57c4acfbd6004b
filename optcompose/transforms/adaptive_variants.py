"""Adam with another second-moment statistic or another direction: AdaBelief (the EMA of
the squared prediction error), RAdam (a rectified Adam direction) and AMSGrad (the running
maximum of the second moment).

Formulas (g: gradient, t: step count from 1; EMA, bias correction, Nadam's moment and Adam's
direction as in :mod:`.statistics`)::

    m_t = (1 - b1) g_t + b1 m_{t-1}                       m_hat = m_t / (1 - b1^t)
    AdaBelief:  s_t = (1 - b2) (g_t - m_t)^2 + b2 s_{t-1} + eps_root
                u = m_hat / (sqrt(s_t / (1 - b2^t)) + eps)
    RAdam:      rho_inf = 2 / (1 - b2) - 1,  rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
                r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
                u = r_t m_hat / (sqrt(v_hat + eps_root) + eps) if rho_t >= threshold else m_hat
    AMSGrad:    v_max_t = max(v_max_{t-1}, v_hat_t)
                u = m_hat / (sqrt(v_max_t + eps_root) + eps)
    nesterov:   m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  DECAY,
  DTYPE,
  EPS,
  EPS_ROOT,
  FLAG,
  GradientTransformation,
  ScalarOrSchedule,
  check_hyperparameter,
  check_not_both_zero,
  default_float,
  expect_state,
  public,
  real,
  safe_increment,
  zero_count,
)
from optcompose.transforms.adaptive import ScaleByAdamState
from optcompose.transforms.statistics import (
  in_grad_dtypes,
  like_params,
  squares_init,
  _wide_enough,
  adam_direction_leaf,
  debias_factor,
  debias_leaf,
  ema_leaf,
  nesterov_moment_leaf,
  same_structure,
  square_leaf,
)

# ----------------------------------------------------------------------------------------
# The new formulas.


def belief_leaf(b2, s, g, m, eps_root):
  """AdaBelief's statistic ``(1 - b2) (g - m)^2 + b2 s + eps_root`` (m the new first moment;
  eps_root is added to the stored statistic, as in Optax)."""
  error = jnp.subtract(*otree.promote(g, m))
  s = ema_leaf(b2, s, square_leaf(error, s))
  return jnp.add(*otree.promote(s, eps_root))


def radam_rectification(b2, count, threshold):
  """RAdam's ``(rho_t >= threshold, r_t or 1)`` at step ``count``: scalars computed once per
  step, in float32 or wider (r_t, NaN where rho_t < 4, is used only from the threshold on)."""
  # rho_t is a difference of two terms ~rho_inf (1999 for b2 = 0.999) at the first steps,
  # where it is ~t: an error in either term is magnified ~300 times. With L = -log b2 and
  # x = t L, 2 t b2^t / (1 - b2^t) = 2 t / expm1(x) = (2 / L) x / expm1(x), and x / expm1(x)
  # = 1 - x/2 + x^2/12 - x^4/720 + ... (Bernoulli numbers), so for x < 1/2
  #     rho_t = (rho_inf - 2 / L) + t (1 - x/6 + x^3/360 - x^5/15120 + x^7/604800)
  # with nothing large subtracted at run time (the first term is ~(1 - b2)/6, from Python
  # floats for a Python b2; the series' next term is below 1e-7 of t); beyond, the direct
  # form (rho_t > 300). Optax's `b2 ** t` subtracts a rounded b2^t from 1: in float32 its
  # rho_6 is 5.955 eagerly, 5.975 jitted (true 5.994), and its r_6 1.2% low eagerly.
  rho_inf = 2.0 / (1.0 - b2) - 1.0
  wide = otree.promote_types(jnp.result_type(b2), default_float())  # float64 under x64
  t = jnp.asarray(count).astype(wide)
  python = isinstance(b2, (int, float)) and 0 < b2 < 1
  log_b2 = -math.log(b2) if python else -jnp.log(jnp.asarray(b2, wide))
  offset = rho_inf - 2.0 / log_b2  # Python floats for a Python b2; else it cancels (b2 =
  if not python:  # 0.999: 1999 - 1998.9998 in float32), so its series in e = 1 - b2 (Gregory's
    e = 1 - jnp.asarray(b2, wide)  # coefficients) where e < 0.01 (next term below 1e-9 of it)
    offset = jnp.where(e < 0.01, e * (1 / 6 + e * (1 / 12 + e * (19 / 360 + e * 3 / 80))), offset)
  x = t * log_b2
  small = jnp.minimum(x, 0.5)  # each branch finite, and its gradient, whichever is taken
  x2 = small * small
  series = t * (1 + small * (-1 / 6 + x2 * (1 / 360 + x2 * (-1 / 15120 + x2 / 604800))))
  direct = rho_inf - 2 * t / jnp.expm1(jnp.minimum(x, 80.0))  # beyond 80: < 1e-25, not inf
  rho = jnp.where(x < 0.5, offset + series, direct)
  rectified = rho >= threshold
  rho = jnp.where(rectified, rho, rho_inf)  # r = 1 there: no sqrt(< 0), whose gradient is NaN
  r = jnp.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
  return rectified, jnp.where(rectified, r, 1)


def rectified_direction_leaf(rectified, r, m_hat, v_hat, eps, eps_root):
  """``r m_hat / (sqrt(v_hat + eps_root) + eps)`` if ``rectified`` (a scalar; then r = r_t)
  else ``m_hat`` (r = 1 and the denominator 1: no select of the whole update)."""
  m_hat, v_hat = _wide_enough(m_hat), _wide_enough(v_hat)
  root = jnp.add(*otree.promote(jnp.sqrt(jnp.add(*otree.promote(v_hat, eps_root))), eps))
  scaled = r.astype(jnp.result_type(m_hat)) * m_hat
  return jnp.divide(*otree.promote(scaled, jnp.where(rectified, root, 1)))


def running_max_leaf(v_max, v):
  """AMSGrad's ``max(v_max, v)``, in the wider of the two dtypes."""
  return jnp.maximum(*otree.promote(v_max, v))


def first_moment_hat(b1, mu, updates, count, nesterov):
  """``m_hat`` for the new count: debiased, or Nadam's look-ahead moment (a tree function)."""
  c1 = debias_factor(b1, count)
  if not nesterov:
    return jax.tree.map(lambda m: debias_leaf(m, c1), mu)
  c1_next = debias_factor(b1, safe_increment(count))
  return jax.tree.map(
    lambda m, g: nesterov_moment_leaf(b1, debias_leaf(m, c1_next), debias_leaf(g, c1)), mu, updates
  )


# ----------------------------------------------------------------------------------------
# The transformations.


class ScaleByBeliefState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


@public(
  "transformation",
  optax="scale_by_belief",
  b1=DECAY,
  b2=DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
  nesterov=FLAG,
)
def scale_by_belief(
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-16,
  eps_root: ScalarOrSchedule = 1e-16,
  *,
  nesterov: bool = False,
) -> GradientTransformation:
  """AdaBelief's scaling: Adam's direction with the EMA of ``(g - m)^2`` for the second moment.

  Update (t from 1, ``m_0 = s_0 = 0``)::

      m_t = (1 - b1) g_t + b1 m_{t-1}                    m_hat = m_t / (1 - b1^t)
      s_t = (1 - b2) (g_t - m_t)^2 + b2 s_{t-1} + eps_root
      u   = m_hat / (sqrt(s_t / (1 - b2^t)) + eps)
      nesterov: m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)

  ``eps_root`` is added to the stored statistic at every step, as in Optax (and the paper).
  ``eps`` and ``eps_root`` may not both be 0 (stricter than Optax: a gradient that is exactly
  0 from the start would give 0 / 0).

  Args:
    b1: the first moment's decay, in [0, 1) (a number or a schedule).
    b2: the decay of the EMA of the squared prediction error, in [0, 1).
    eps: added after the square root (a number or a schedule).
    eps_root: added to the statistic s at every step (keeps it positive; needed when
      differentiating through the optimizer).
    nesterov: Nadam's look-ahead first moment (the ``nesterov`` line above).

  Returns:
    A transformation with state :class:`ScaleByBeliefState` (``count``, ``mu``: m, ``nu``:
    s); updates keep the gradients' dtype.

  References:
    Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
    Gradients", NeurIPS 2020; Optax's ``optax.scale_by_belief``.
  """
  check_not_both_zero("scale_by_belief", eps, eps_root)

  def init(params):
    otree.check_floating(params, "params")
    return ScaleByBeliefState(zero_count(), otree.zeros_like(params), squares_init(params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByBeliefState, "scale_by_belief")
    same_structure(updates, state.mu, "mu")
    mu = jax.tree.map(lambda g, m: ema_leaf(b1, m, g), updates, state.mu)
    nu = jax.tree.map(lambda g, m, s: belief_leaf(b2, s, g, m, eps_root), updates, mu, state.nu)
    count = safe_increment(state.count)
    mu_hat = first_moment_hat(b1, mu, updates, count, nesterov)
    c2 = debias_factor(b2, count)
    new = jax.tree.map(
      lambda m, s: adam_direction_leaf(m, debias_leaf(s, c2), eps, 0.0), mu_hat, nu
    )
    mu, nu = otree.cast_like(mu, state.mu), otree.cast_like(nu, state.nu)
    return in_grad_dtypes(updates, new), ScaleByBeliefState(count, mu, nu)

  return GradientTransformation(init, update)


# rho_inf (a difference of ~rho_inf-sized terms at the first steps) is computed from the
# number b2 as given: b2 is a number, not a schedule (RAdam's rho_t assumes a constant b2,
# and a float32 b2 = 0.99 moves rho_6 by 2e-5). threshold's range (>= 4) is checked in the
# builder: a Hyper's range also binds every other builder's `threshold` in set_hyperparams.
FIXED_DECAY = DECAY._replace(schedule=False)
RADAM_THRESHOLD = real(draw=(4.0, 10.0), schedule=False)


@public(
  "transformation",
  optax="scale_by_radam",
  b1=DECAY,
  b2=FIXED_DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
  threshold=RADAM_THRESHOLD,
  nesterov=FLAG,
)
def scale_by_radam(
  b1: ScalarOrSchedule = 0.9,
  b2: float = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  threshold: float = 5.0,
  *,
  nesterov: bool = False,
) -> GradientTransformation:
  """Rectified Adam's scaling: Adam's direction times ``r_t``, or ``m_hat`` while rho_t is small.

  Update (t from 1; m, v, m_hat, v_hat as in :func:`scale_by_adam`)::

      rho_inf = 2 / (1 - b2) - 1          rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
      r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
      u   = r_t m_hat / (sqrt(v_hat + eps_root) + eps)   if rho_t >= threshold
      u   = m_hat                                        otherwise

  ``rho_t`` and ``r_t`` are scalars computed once per step. ``threshold`` must be at least 4
  (stricter than Optax: below 4, ``r_t`` is the square root of a negative number for
  ``2 < rho_t < 4``, and the update NaN); ``eps`` and ``eps_root`` may not both be 0.

  Args:
    b1: the first moment's decay, in [0, 1) (a number or a schedule).
    b2: the second moment's decay, in [0, 1) (a number: rho_t assumes it constant).
    eps: added after the square root (a number or a schedule).
    eps_root: added under the square root (a number or a schedule); 0 by default.
    threshold: the ``rho_t`` from which the rectified direction is used, >= 4 (a number).
    nesterov: Nadam's look-ahead first moment (as in :func:`scale_by_adam`).

  Returns:
    A transformation with state ``ScaleByAdamState`` (``count``, ``mu``, ``nu``); updates
    keep the gradients' dtype.

  References:
    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020;
    Optax's ``optax.scale_by_radam``.
  """
  check_not_both_zero("scale_by_radam", eps, eps_root)
  check_hyperparameter("scale_by_radam", "threshold", threshold, low=4.0)

  def init(params):
    otree.check_floating(params, "params")
    return ScaleByAdamState(zero_count(), otree.zeros_like(params), squares_init(params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByAdamState, "scale_by_radam")
    same_structure(updates, state.mu, "mu")
    mu = jax.tree.map(lambda g, m: ema_leaf(b1, m, g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: ema_leaf(b2, v, square_leaf(g, v)), updates, state.nu)
    count = safe_increment(state.count)
    mu_hat = first_moment_hat(b1, mu, updates, count, nesterov)
    c2 = debias_factor(b2, count)
    rectified, r = radam_rectification(b2, count, threshold)
    new = jax.tree.map(
      lambda m, v: rectified_direction_leaf(rectified, r, m, debias_leaf(v, c2), eps, eps_root),
      mu_hat,
      nu,
    )
    mu, nu = otree.cast_like(mu, state.mu), otree.cast_like(nu, state.nu)
    return in_grad_dtypes(updates, new), ScaleByAdamState(count, mu, nu)

  return GradientTransformation(init, update)


class ScaleByAmsgradState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any
  nu_max: Any


@public(
  "transformation",
  optax="scale_by_amsgrad",
  b1=DECAY,
  b2=DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
  mu_dtype=DTYPE,
  bias_correction_mu=FLAG,
  bias_correction_nu=FLAG,
)
def scale_by_amsgrad(
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  mu_dtype: Optional[Any] = None,
  bias_correction_mu: bool = True,
  bias_correction_nu: bool = True,
) -> GradientTransformation:
  """AMSGrad's scaling: Adam's direction with the running maximum of the second moment.

  Update (t from 1; m, v as in :func:`scale_by_adam`)::

      m_hat   = m_t / (1 - b1^t)        (m_t if not bias_correction_mu)
      v_hat   = v_t / (1 - b2^t)        (v_t if not bias_correction_nu)
      v_max_t = max(v_max_{t-1}, v_hat)               v_max_0 = 0
      u       = m_hat / (sqrt(v_max_t + eps_root) + eps)

  ``eps`` and ``eps_root`` may not both be 0 (stricter than Optax).

  Args:
    b1: the first moment's decay, in [0, 1) (a number or a schedule).
    b2: the second moment's decay, in [0, 1) (a number or a schedule).
    eps: added after the square root (a number or a schedule).
    eps_root: added under the square root (a number or a schedule); 0 by default.
    mu_dtype: dtype of the stored first moment; ``None`` keeps the parameters'.
    bias_correction_mu: debias the first moment (False: the original paper's AMSGrad).
    bias_correction_nu: debias the second moment before the maximum (False: the paper's).

  Returns:
    A transformation with state :class:`ScaleByAmsgradState` (``count``, ``mu``, ``nu``,
    ``nu_max``); updates keep the gradients' dtype.

  References:
    Reddi, Kale and Kumar, "On the Convergence of Adam and Beyond", ICLR 2018; Optax's
    ``optax.scale_by_amsgrad``.
  """
  check_not_both_zero("scale_by_amsgrad", eps, eps_root)

  def init(params):
    otree.check_floating(params, "params")
    return ScaleByAmsgradState(
      zero_count(),
      like_params(params, mu_dtype, "scale_by_amsgrad: `mu_dtype`"),
      squares_init(params),
      squares_init(params),
    )

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByAmsgradState, "scale_by_amsgrad")
    same_structure(updates, state.mu, "mu")
    mu = jax.tree.map(lambda g, m: ema_leaf(b1, m, g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: ema_leaf(b2, v, square_leaf(g, v)), updates, state.nu)
    count = safe_increment(state.count)
    mu_hat = first_moment_hat(b1, mu, updates, count, False) if bias_correction_mu else mu
    c2 = debias_factor(b2, count)
    nu_max = jax.tree.map(
      lambda w, v: running_max_leaf(w, debias_leaf(v, c2) if bias_correction_nu else v),
      state.nu_max,
      nu,
    )
    new = jax.tree.map(lambda m, w: adam_direction_leaf(m, w, eps, eps_root), mu_hat, nu_max)
    mu, nu = otree.cast_like(mu, state.mu), otree.cast_like(nu, state.nu)
    nu_max = otree.cast_like(nu_max, state.nu_max)
    return in_grad_dtypes(updates, new), ScaleByAmsgradState(count, mu, nu, nu_max)

  return GradientTransformation(init, update)


__all__ = ["ScaleByAmsgradState", "ScaleByBeliefState"]  # and the builders it registers
