"""Moment statistics: exponential moving averages, bias correction, second-moment scaling.

Formulas, in the symbols the tests use (g: gradient, m: first moment, v: second moment,
t: step count starting at 1, beta: EMA decay)::

    ema:              m_t = (1 - beta) * g_t + beta * m_{t-1}
    bias correction:  m_hat_t = m_t / (1 - beta^t)       (beta^t in float32 or wider)
    AdaGrad (rss):    G_t = G_{t-1} + g_t^2 ;  u = g / sqrt(G_t + eps)   (0 where G_t = 0)
    RMSProp (rms):    v_t = ema of g^2 ;       u = g / sqrt(v_t + eps)   (or sqrt(v_t) + eps)
    centered (std):   u = g / sqrt(v_t - m_t^2 + eps)
    Adam:             u = m_hat_t / (sqrt(v_hat_t + eps_root) + eps)
    Nadam:            m_hat_t = beta1 * m_t / (1 - beta1^(t+1)) + (1 - beta1) * g_t / (1 - beta1^t)

Each formula is one function below (``*_leaf``) and every transformation is built from them;
bias correction is one function used by every EMA-based statistic.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose._core import (
    RAW_GRADS, GradientTransformation, ScalarOrSchedule, check_hyperparameter, safe_increment,
    wants_raw_grads, with_schedules, zero_count,
)

# ---------------------------------------------------------------------------------------
# Formulas.


def ema_leaf(beta, m, x):
  """One EMA step: ``(1 - beta) * x + beta * m``."""
  return (1 - beta) * x + beta * m


def debias_factor(beta, count):
  """``1 / (1 - beta^count)``, computed in float32 or wider (beta^t rounds to 1 in bfloat16)."""
  beta = jnp.asarray(beta)
  wide = jnp.promote_types(beta.dtype, jnp.float32)
  return 1 / (1 - beta.astype(wide) ** jnp.asarray(count).astype(wide))


def debias_leaf(m, factor):
  """Bias correction ``m / (1 - beta^t)``, as ``m * factor`` with ``factor = debias_factor(beta, t)``.

  The scalar factor is computed once per step, outside the per-leaf map, and multiplies
  each leaf: a division by a broadcast scalar is rewritten by XLA into a multiplication by
  its reciprocal, or merged with the next division, depending on the rest of the graph, so
  its rounding would depend on the tree's shape (FlatParams against a pytree, a
  one-element leaf against a matrix). The product runs in m's precision (float32 for a
  float16 m: 1 / (1 - b2^t) reaches 1e5 for b2 = 0.99999, past float16's range).
  """
  m = _wide_enough(m)
  return m * factor.astype(jnp.result_type(m))


def nesterov_moment_leaf(b1, m_hat_next, g_hat):
  """Nadam's look-ahead moment ``b1 * m_t / (1 - b1^(t+1)) + (1 - b1) * g_t / (1 - b1^t)``,
  given the two debiased terms (this operand order matches Optax's rounding under jit)."""
  return b1 * m_hat_next + (1 - b1) * g_hat


def _wide_enough(x):
  """float16 statistics are divided in float32: float16 cannot hold eps = 1e-8 (it rounds to
  0, and a zero gradient then gives 0 / 0 = NaN). bfloat16 has float32's range and is kept,
  as in Optax. (Store float16 moments with ``nu_dtype=jnp.float32``: g^2 underflows in float16
  below |g| = 2.4e-4.)"""
  x = jnp.asarray(x)
  return x.astype(jnp.float32) if x.dtype == jnp.float16 else x


def variance_leaf(m, v):
  """``v - m^2``, clamped at 0: rounding can make it slightly negative (e.g. at step 1 with
  bias correction, where it is exactly 0 in real arithmetic), and its square root NaN."""
  m, v = _wide_enough(m), _wide_enough(v)
  return jnp.maximum(v - otree.abs_sq(m), 0)


def square_leaf(g, v):
  """``|g|^2`` for a second moment ``v``, squared in the wider of the two dtypes, and in
  float32 for float16: g^2 underflows there below |g| = 2.4e-4 (the step's statistic is then
  float32; it is rounded to the state's dtype only when stored)."""
  g = jnp.asarray(g)
  return otree.abs_sq(_wide_enough(g.astype(jnp.promote_types(g.dtype, jnp.result_type(v)))))


def inverse_rms_leaf(v, eps, eps_in_sqrt):
  """``1 / sqrt(v + eps)`` (``eps_in_sqrt``) or ``1 / (sqrt(v) + eps)``."""
  v = _wide_enough(v)
  if eps_in_sqrt:
    return jax.lax.rsqrt(v + eps)
  return 1 / (jnp.sqrt(v) + eps)


def adam_direction_leaf(m_hat, v_hat, eps, eps_root):
  """``m_hat / (sqrt(v_hat + eps_root) + eps)``."""
  m_hat, v_hat = _wide_enough(m_hat), _wide_enough(v_hat)
  return m_hat / (jnp.sqrt(v_hat + eps_root) + eps)


def _check_decay(fn, name, value):
  check_hyperparameter(fn, name, value, low=0.0, high=1.0, high_open=True)


def _check_eps(fn, name, value):
  check_hyperparameter(fn, name, value, low=0.0)


def _moments_init(params, dtype=None, value=0.0):
  otree.check_floating(params, "params")
  return otree.full_like(params, value, dtype=dtype)


def _same(updates, state_tree, field):
  otree.check_same_structure(updates, state_tree, "updates", f"state.{field}")


# ---------------------------------------------------------------------------------------
# First moment and bias correction as pieces of their own.


class EmaState(NamedTuple):
  count: jax.Array
  ema: Any


@with_schedules("decay")
def ema(decay: ScalarOrSchedule, debias: bool = True,
        accumulator_dtype: Optional[Any] = None) -> GradientTransformation:
  """Exponential moving average of the updates: ``m_t = (1 - decay) g_t + decay m_{t-1}``.

  With ``debias`` the output is ``m_t / (1 - decay^t)``; the stored average is ``m_t``.
  """
  _check_decay("ema", "decay", decay)

  def init(params):
    return EmaState(zero_count(), _moments_init(params, accumulator_dtype))

  def update(updates, state, params=None, **extra):
    del params, extra
    _same(updates, state.ema, "ema")
    new = jax.tree.map(lambda g, m: ema_leaf(decay, m, g), updates, state.ema)
    count = safe_increment(state.count)
    if debias:
      factor = debias_factor(decay, count)
      out = jax.tree.map(lambda m: debias_leaf(m, factor), new)
    else:
      out = new
    # Updates keep the gradients' dtype (float16 is debiased in float32).
    out = otree.cast_like(out, updates)
    return out, EmaState(count, otree.cast(new, accumulator_dtype))

  return GradientTransformation(init, update)


class BiasCorrectionState(NamedTuple):
  count: jax.Array


@with_schedules("decay")
def scale_by_bias_correction(decay: ScalarOrSchedule) -> GradientTransformation:
  """Divide the incoming EMA by ``1 - decay^t`` (t counts this transformation's steps).

  Place it right after an un-debiased EMA (``ema(decay, debias=False)``) of the same decay.
  """
  _check_decay("scale_by_bias_correction", "decay", decay)

  def init(params):
    del params
    return BiasCorrectionState(zero_count())

  def update(updates, state, params=None, **extra):
    del params, extra
    count = safe_increment(state.count)
    factor = debias_factor(decay, count)
    out = jax.tree.map(lambda m: debias_leaf(m, factor).astype(jnp.result_type(m)), updates)
    return out, BiasCorrectionState(count)

  return GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------
# Second-moment scaling.


class ScaleByRssState(NamedTuple):
  sum_of_squares: Any


@with_schedules("eps")
def scale_by_rss(initial_accumulator_value: float = 0.1,
                 eps: ScalarOrSchedule = 1e-7) -> GradientTransformation:
  """AdaGrad's scaling: ``G_t = G_{t-1} + g_t^2``, ``u = g / sqrt(G_t + eps)`` (0 where G_t = 0).

  References: Duchi, Hazan and Singer, "Adaptive Subgradient Methods for Online Learning and
  Stochastic Optimization", JMLR 2011.
  """
  check_hyperparameter("scale_by_rss", "initial_accumulator_value",
                       initial_accumulator_value, low=0.0)
  _check_eps("scale_by_rss", "eps", eps)

  def init(params):
    return ScaleByRssState(_moments_init(params, value=initial_accumulator_value))

  def update(updates, state, params=None, **extra):
    del params, extra
    _same(updates, state.sum_of_squares, "sum_of_squares")
    total = jax.tree.map(lambda g, s: square_leaf(g, s) + s, updates, state.sum_of_squares)
    updates = jax.tree.map(
        lambda g, s: (jnp.where(s > 0, inverse_rms_leaf(s, eps, True), 0.0) * g).astype(
            jnp.result_type(g)), updates, total)
    return updates, ScaleByRssState(otree.cast_like(total, state.sum_of_squares))

  return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
  nu: Any


class ScaleByRmsWithCountState(NamedTuple):
  count: jax.Array
  nu: Any


@with_schedules("decay", "eps")
def scale_by_rms(decay: ScalarOrSchedule = 0.9, eps: ScalarOrSchedule = 1e-8,
                 initial_scale: float = 0.0, eps_in_sqrt: bool = True,
                 bias_correction: bool = False) -> GradientTransformation:
  """RMSProp's scaling: ``v_t = (1 - decay) g_t^2 + decay v_{t-1}``, ``u = g / sqrt(v_t + eps)``.

  ``eps_in_sqrt=False`` uses ``g / (sqrt(v_t) + eps)``; ``bias_correction`` divides v_t by
  ``1 - decay^t`` first (and keeps a count).

  References: Tieleman and Hinton, Lecture 6.5 of "Neural Networks for Machine Learning", 2012.
  """
  _check_decay("scale_by_rms", "decay", decay)
  _check_eps("scale_by_rms", "eps", eps)
  check_hyperparameter("scale_by_rms", "initial_scale", initial_scale, low=0.0)

  def init(params):
    nu = _moments_init(params, value=initial_scale)
    return ScaleByRmsWithCountState(zero_count(), nu) if bias_correction else ScaleByRmsState(nu)

  def update(updates, state, params=None, **extra):
    del params, extra
    _same(updates, state.nu, "nu")
    nu = jax.tree.map(lambda g, v: ema_leaf(decay, v, square_leaf(g, v)), updates, state.nu)
    if bias_correction:
      count = safe_increment(state.count)
      factor = debias_factor(decay, count)
      nu_hat = jax.tree.map(lambda v: debias_leaf(v, factor), nu)
    else:
      nu_hat = nu
    updates = jax.tree.map(
        lambda g, v: (inverse_rms_leaf(v, eps, eps_in_sqrt) * g).astype(jnp.result_type(g)),
        updates, nu_hat)
    nu = otree.cast_like(nu, state.nu)
    new_state = ScaleByRmsWithCountState(count, nu) if bias_correction else ScaleByRmsState(nu)
    return updates, new_state

  return GradientTransformation(init, update)


class ScaleByRStdDevState(NamedTuple):
  mu: Any
  nu: Any


class ScaleByRStdDevWithCountState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


@with_schedules("decay", "eps")
def scale_by_stddev(decay: ScalarOrSchedule = 0.9, eps: ScalarOrSchedule = 1e-8,
                    initial_scale: float = 0.0, eps_in_sqrt: bool = True,
                    bias_correction: bool = False) -> GradientTransformation:
  """Centered RMSProp: ``u = g / sqrt(v_t - m_t^2 + eps)`` with m, v EMAs of g and g^2.

  ``v_t - m_t^2`` is clamped at 0 (rounding can make it negative; Optax then returns NaN).

  References: Graves, "Generating Sequences With Recurrent Neural Networks", 2013.
  """
  _check_decay("scale_by_stddev", "decay", decay)
  _check_eps("scale_by_stddev", "eps", eps)
  check_hyperparameter("scale_by_stddev", "initial_scale", initial_scale, low=0.0)

  def init(params):
    mu = _moments_init(params)
    nu = _moments_init(params, value=initial_scale)
    if bias_correction:
      return ScaleByRStdDevWithCountState(zero_count(), mu, nu)
    return ScaleByRStdDevState(mu, nu)

  def update(updates, state, params=None, **extra):
    del params, extra
    _same(updates, state.mu, "mu")
    mu = jax.tree.map(lambda g, m: ema_leaf(decay, m, g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: ema_leaf(decay, v, square_leaf(g, v)), updates, state.nu)
    if bias_correction:
      count = safe_increment(state.count)
      factor = debias_factor(decay, count)
      mu_hat = jax.tree.map(lambda m: debias_leaf(m, factor), mu)
      nu_hat = jax.tree.map(lambda v: debias_leaf(v, factor), nu)
    else:
      mu_hat, nu_hat = mu, nu
    updates = jax.tree.map(
        lambda g, m, v: (inverse_rms_leaf(variance_leaf(m, v), eps, eps_in_sqrt) * g).astype(
            jnp.result_type(g)),
        updates, mu_hat, nu_hat)
    mu, nu = otree.cast_like(mu, state.mu), otree.cast_like(nu, state.nu)
    if bias_correction:
      return updates, ScaleByRStdDevWithCountState(count, mu, nu)
    return updates, ScaleByRStdDevState(mu, nu)

  return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


@with_schedules("b1", "b2", "eps", "eps_root")
def scale_by_adam(b1: ScalarOrSchedule = 0.9, b2: ScalarOrSchedule = 0.999,
                  eps: ScalarOrSchedule = 1e-8, eps_root: ScalarOrSchedule = 0.0,
                  mu_dtype: Optional[Any] = None, *, nesterov: bool = False,
                  nu_dtype: Optional[Any] = None) -> GradientTransformation:
  """Adam's scaling: ``u = m_hat / (sqrt(v_hat + eps_root) + eps)``.

  ``m_t = (1-b1) g_t + b1 m_{t-1}``, ``v_t = (1-b2) g_t^2 + b2 v_{t-1}``, both bias-corrected by
  ``1 - b^t``. With ``nesterov`` (Nadam) ``m_hat = b1 m_t / (1 - b1^(t+1)) + (1-b1) g_t / (1 - b1^t)``.
  ``mu_dtype`` / ``nu_dtype`` set the stored moments' dtypes (arithmetic runs in the wider one).

  References: Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
  Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
  """
  for name, value in (("b1", b1), ("b2", b2)):
    _check_decay("scale_by_adam", name, value)
  _check_eps("scale_by_adam", "eps", eps)
  _check_eps("scale_by_adam", "eps_root", eps_root)

  def init(params):
    otree.check_floating(params, "params")
    return ScaleByAdamState(zero_count(), otree.zeros_like(params, mu_dtype),
                            otree.zeros_like(params, nu_dtype))

  def update(updates, state, params=None, **extra):
    del params, extra
    _same(updates, state.mu, "mu")
    mu = jax.tree.map(lambda g, m: ema_leaf(b1, m, g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: ema_leaf(b2, v, square_leaf(g, v)), updates, state.nu)
    count = safe_increment(state.count)
    c1, c2 = debias_factor(b1, count), debias_factor(b2, count)
    if nesterov:
      c1_next = debias_factor(b1, safe_increment(count))
      mu_hat = jax.tree.map(
          lambda m, g: nesterov_moment_leaf(b1, debias_leaf(m, c1_next), debias_leaf(g, c1)),
          mu, updates)
    else:
      mu_hat = jax.tree.map(lambda m: debias_leaf(m, c1), mu)
    updates = jax.tree.map(
        lambda g, m, v: adam_direction_leaf(m, debias_leaf(v, c2), eps, eps_root).astype(
            jnp.result_type(g)),
        updates, mu_hat, nu)
    mu, nu = otree.cast_like(mu, state.mu), otree.cast_like(nu, state.nu)
    return updates, ScaleByAdamState(count, mu, nu)

  return GradientTransformation(init, update)


class ScaleBySecondMomentState(NamedTuple):
  count: jax.Array
  nu: Any


@with_schedules("decay", "eps", "eps_root")
def scale_by_second_moment(decay: ScalarOrSchedule = 0.999, eps: ScalarOrSchedule = 1e-8,
                           eps_root: ScalarOrSchedule = 0.0, debias: bool = True,
                           nu_dtype: Optional[Any] = None) -> GradientTransformation:
  """Divide the incoming direction by ``sqrt(v_hat + eps_root) + eps``, v an EMA of g^2.

  The statistic ``v`` is built from the input of the enclosing :func:`optcompose.chain`
  (``raw_grads``), so the direction it divides may be a momentum::

      adam   = chain(ema(b1, debias=False), scale_by_bias_correction(b1),
                   scale_by_second_moment(b2))
      laprop = chain(scale_by_second_moment(b2), ema(b1))

  Keep such pieces in a chain of their own when something precedes them, e.g.
  ``chain(clip_by_global_norm(1.0), adam)``: the inner chain's input is then the clipped
  gradient. Outside an optcompose chain (e.g. directly inside ``optax.chain``) no
  ``raw_grads`` is passed and the statistic is built from the incoming updates.
  """
  _check_decay("scale_by_second_moment", "decay", decay)
  _check_eps("scale_by_second_moment", "eps", eps)
  _check_eps("scale_by_second_moment", "eps_root", eps_root)

  def init(params):
    otree.check_floating(params, "params")
    return ScaleBySecondMomentState(zero_count(), otree.zeros_like(params, nu_dtype))

  @wants_raw_grads
  def update(updates, state, params=None, **extra):
    del params
    grads = extra.get(RAW_GRADS, updates)
    _same(updates, state.nu, "nu")
    _same(grads, state.nu, "nu")
    nu = jax.tree.map(lambda g, v: ema_leaf(decay, v, square_leaf(g, v)), grads, state.nu)
    count = safe_increment(state.count)
    if debias:
      factor = debias_factor(decay, count)
      v_hat = jax.tree.map(lambda v: debias_leaf(v, factor), nu)
    else:
      v_hat = nu
    updates = jax.tree.map(
        lambda u, v: adam_direction_leaf(u, v, eps, eps_root).astype(jnp.result_type(u)),
        updates, v_hat)
    return updates, ScaleBySecondMomentState(count, otree.cast_like(nu, state.nu))

  return GradientTransformation(init, update)
