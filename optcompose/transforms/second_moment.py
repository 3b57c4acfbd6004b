"""Second-moment scaling: AdaGrad's sum of squares, RMSProp's average (plain and centered),
and a second moment that divides any direction.

Formulas, in the symbols the tests use (g: gradient, v: second moment, m: first moment,
t: step count from 1, beta: EMA decay)::

    AdaGrad (rss):    G_t = G_{t-1} + g_t^2 ;  u = g / sqrt(G_t + eps)   (0 where G_t = 0)
    RMSProp (rms):    v_t = ema of g^2 ;       u = g / sqrt(v_t + eps)   (or sqrt(v_t) + eps)
    centered (std):   u = g / sqrt(v_t - m_t^2 + eps)
    second moment:    u = d / (sqrt(v_hat_t + eps_root) + eps),  d = direction(g) (default g)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  DECAY,
  DTYPE,
  EPS,
  EPS_POSITIVE,
  EPS_ROOT,
  FLAG,
  EmptyState,
  Hyper,
  GradientTransformation,
  ScalarOrSchedule,
  as_transformation,
  check_not_both_zero,
  expect_state,
  public,
  real,
  safe_increment,
  zero_count,
)
from optcompose.transforms.statistics import (
  adam_direction_leaf,
  debias_factor,
  debias_leaf,
  ema_leaf,
  inverse_rms_leaf,
  moments_init,
  squares_init,
  same_structure,
  second_moment_ema_leaf,
  square_leaf,
  variance_leaf,
)


class ScaleByRssState(NamedTuple):
  sum_of_squares: Any


@public(
  "transformation",
  optax="scale_by_rss",
  initial_accumulator_value=real(0.0, draw=(0.0, 1.0), schedule=False),
  eps=EPS,
)
def scale_by_rss(
  initial_accumulator_value: float = 0.1, eps: ScalarOrSchedule = 1e-7
) -> GradientTransformation:
  """AdaGrad's scaling: ``G_t = G_{t-1} + g_t^2``, ``u = g / sqrt(G_t + eps)`` (0 where G_t = 0).

  Update: ``G_t = G_{t-1} + g_t^2``; ``u_t = g_t / sqrt(G_t + eps)`` where ``G_t > 0``,
  else 0.

  Args:
    initial_accumulator_value: ``G_0`` (>= 0), a number (Optax's default 0.1).
    eps: added under the square root (a number or a schedule).

  Returns:
    A transformation with state :class:`ScaleByRssState` (``sum_of_squares``, G).

  References:
    Duchi, Hazan and Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011; Optax's ``optax.scale_by_rss``.
  """

  def init(params):
    return ScaleByRssState(squares_init(params, value=initial_accumulator_value))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByRssState, "scale_by_rss")
    same_structure(updates, state.sum_of_squares, "sum_of_squares")
    # Each operation in the wider of its operands' dtypes (float32 statistics for float16).
    total = jax.tree.map(
      lambda g, s: jnp.add(*otree.promote(square_leaf(g, s), s)), updates, state.sum_of_squares
    )
    updates = jax.tree.map(
      lambda g, s: jnp.multiply(
        *otree.promote(jnp.where(s > 0, inverse_rms_leaf(s, eps, True), 0.0), g)
      ).astype(jnp.result_type(g)),
      updates,
      total,
    )
    return updates, ScaleByRssState(otree.cast_like(total, state.sum_of_squares))

  return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
  nu: Any


class ScaleByRmsWithCountState(NamedTuple):
  count: jax.Array
  nu: Any


class ScaleByRStdDevState(NamedTuple):
  mu: Any
  nu: Any


class ScaleByRStdDevWithCountState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def _rms_scaling(who, centered, decay, eps, initial_scale, eps_in_sqrt, bias_correction):
  """RMSProp's scaling, plain or centered: the one implementation of both builders."""
  if centered:
    state_type = ScaleByRStdDevWithCountState if bias_correction else ScaleByRStdDevState
  else:
    state_type = ScaleByRmsWithCountState if bias_correction else ScaleByRmsState

  def init(params):
    stats: dict[str, Any] = {"nu": squares_init(params, value=initial_scale)}
    if centered:
      stats["mu"] = moments_init(params)
    if bias_correction:
      stats["count"] = zero_count()
    return state_type(**stats)

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, state_type, who)
    same_structure(updates, state.mu if centered else state.nu, "mu" if centered else "nu")
    new = {}
    if centered:
      new["mu"] = jax.tree.map(lambda g, m: ema_leaf(decay, m, g), updates, state.mu)
    new["nu"] = jax.tree.map(lambda g, v: ema_leaf(decay, v, square_leaf(g, v)), updates, state.nu)
    hat = dict(new)
    if bias_correction:
      new["count"] = safe_increment(state.count)
      factor = debias_factor(decay, new["count"])
      hat = {
        k: jax.tree.map(lambda x: debias_leaf(x, factor), v) for k, v in new.items() if k != "count"
      }
    if centered:
      denominator = jax.tree.map(variance_leaf, hat["mu"], hat["nu"])
    else:
      denominator = hat["nu"]
    updates = jax.tree.map(
      lambda g, v: jnp.multiply(*otree.promote(inverse_rms_leaf(v, eps, eps_in_sqrt), g)).astype(
        jnp.result_type(g)
      ),
      updates,
      denominator,
    )
    stored = {
      k: v if k == "count" else otree.cast_like(v, getattr(state, k)) for k, v in new.items()
    }
    return updates, state_type(**stored)

  return GradientTransformation(init, update)


_RMS_HYPERS = dict(
  decay=DECAY,
  eps=EPS_POSITIVE,
  initial_scale=real(0.0, draw=(0.0, 1.0), schedule=False),
  eps_in_sqrt=FLAG,
  bias_correction=FLAG,
)


@public("transformation", optax="scale_by_rms", **_RMS_HYPERS)
def scale_by_rms(
  decay: ScalarOrSchedule = 0.9,
  eps: ScalarOrSchedule = 1e-8,
  initial_scale: float = 0.0,
  eps_in_sqrt: bool = True,
  bias_correction: bool = False,
) -> GradientTransformation:
  """RMSProp's scaling: ``v_t = (1 - decay) g_t^2 + decay v_{t-1}``, ``u = g / sqrt(v_t + eps)``.

  Update (beta = ``decay``, t from 1)::

      v_t = (1 - beta) g_t^2 + beta v_{t-1}
      v_hat = v_t / (1 - beta^t)  (bias_correction=True)   v_hat = v_t  (otherwise)
      u_t = g_t / sqrt(v_hat + eps)  (eps_in_sqrt=True)     g_t / (sqrt(v_hat) + eps)  (False)

  Args:
    decay: beta in [0, 1) (a number or a schedule).
    eps: the regularising constant (a number or a schedule).
    initial_scale: ``v_0`` (>= 0), a number.
    eps_in_sqrt: where ``eps`` goes: True (the default, Optax's) gives
      ``g / sqrt(v_t + eps)``; False gives ``g / (sqrt(v_t) + eps)``, as in PyTorch.
    bias_correction: divide ``v_t`` by ``1 - decay^t`` first, as Adam does (the state
      keeps a count).

  Returns:
    A transformation with state :class:`ScaleByRmsState` (``nu``), or
    :class:`ScaleByRmsWithCountState` (``count``, ``nu``) with ``bias_correction``.

  References:
    Tieleman and Hinton, Lecture 6.5 of "Neural Networks for Machine Learning", Coursera,
    2012; Optax's ``optax.scale_by_rms``.
  """
  return _rms_scaling(
    "scale_by_rms", False, decay, eps, initial_scale, eps_in_sqrt, bias_correction
  )


@public("transformation", optax="scale_by_stddev", **_RMS_HYPERS)
def scale_by_stddev(
  decay: ScalarOrSchedule = 0.9,
  eps: ScalarOrSchedule = 1e-8,
  initial_scale: float = 0.0,
  eps_in_sqrt: bool = True,
  bias_correction: bool = False,
) -> GradientTransformation:
  """Centered RMSProp: ``u = g / sqrt(v_t - m_t^2 + eps)`` with m, v EMAs of g and g^2.

  Update (beta = ``decay``, t from 1, ``m_0 = 0``)::

      m_t = (1 - beta) g_t + beta m_{t-1}      v_t = (1 - beta) g_t^2 + beta v_{t-1}
      (bias_correction: m_t, v_t divided by 1 - beta^t)
      u_t = g_t / sqrt(max(v_t - m_t^2, 0) + eps)    (eps_in_sqrt=False: sqrt(...) + eps)

  ``v_t - m_t^2`` is clamped at 0 (rounding can make it negative; Optax then returns NaN).

  Args:
    decay: beta in [0, 1) (a number or a schedule), the decay of both EMAs.
    eps: the regularising constant (a number or a schedule).
    initial_scale: ``v_0`` (>= 0), a number; ``m_0`` is 0.
    eps_in_sqrt: True: ``eps`` under the square root; False: added after it.
    bias_correction: divide ``m_t`` and ``v_t`` by ``1 - decay^t`` first (the state keeps
      a count).

  Returns:
    A transformation with state :class:`ScaleByRStdDevState` (``mu``, ``nu``), or
    :class:`ScaleByRStdDevWithCountState` (``count``, ``mu``, ``nu``) with
    ``bias_correction``.

  References:
    Graves, "Generating Sequences With Recurrent Neural Networks", arXiv:1308.0850, 2013;
    Optax's ``optax.scale_by_stddev``.
  """
  return _rms_scaling(
    "scale_by_stddev", True, decay, eps, initial_scale, eps_in_sqrt, bias_correction
  )


class ScaleBySecondMomentState(NamedTuple):
  count: jax.Array
  nu: Any
  direction: Any = EmptyState()  # the state of the `direction` transformation


@public(
  "transformation",
  decay=DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
  debias=FLAG,
  nu_dtype=DTYPE,
  direction=Hyper(("optional", ("inner",))),
)
def scale_by_second_moment(
  decay: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  debias: bool = True,
  nu_dtype: Optional[Any] = None,
  direction: Any = None,
) -> GradientTransformation:
  """Divide a direction by ``sqrt(v_hat + eps_root) + eps``, v an EMA of the incoming g^2.

  Update (beta = ``decay``, t from 1, ``v_0 = 0``, d = ``direction``'s output for g)::

      v_t = (1 - beta) g_t^2 + beta v_{t-1}
      v_hat = v_t / (1 - beta^t)  (debias=True)      v_hat = v_t  (debias=False)
      u_t = d_t / (sqrt(v_hat + eps_root) + eps)

  The statistic is built from this transformation's input g; the direction it divides is
  ``direction``'s output for the same g (g itself by default), so a momentum can be
  preconditioned by the gradient's statistic::

      adam   = scale_by_second_moment(b2, direction=chain(ema(b1, debias=False),
                                                         scale_by_bias_correction(b1)))
      laprop = chain(scale_by_second_moment(b2), ema(b1))

  Args:
    decay: beta2 in [0, 1) (a number or a schedule).
    eps: added after the square root (a number or a schedule).
    eps_root: added under the square root (keeps the derivative finite where v_hat = 0,
      for differentiating through the optimizer); a number or a schedule.
    debias: divide ``v_t`` by ``1 - decay^t`` (Adam's bias correction of ``v_0 = 0``).
    nu_dtype: dtype of the stored second moment; ``None`` keeps the parameters', float32
      for float16 ones (their squares underflow float16).
    direction: a transformation of g giving the direction to scale (it receives the same
      ``params`` and keyword arguments); ``None`` scales g.

  Returns:
    A transformation with state :class:`ScaleBySecondMomentState` (``direction`` holds the
    direction's state).

  References:
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
    Ziyin, Wang and Ueda, "LaProp: Separating Momentum and Adaptivity in Adam",
    arXiv:2002.04839, 2020.
  """
  inner = (
    None
    if direction is None
    else as_transformation(direction, "scale_by_second_moment", "direction")
  )

  check_not_both_zero("scale_by_second_moment", eps, eps_root)

  def init(params):
    otree.check_floating(params, "params")
    return ScaleBySecondMomentState(
      zero_count(),
      squares_init(params, nu_dtype),
      EmptyState() if inner is None else inner.init(params),
    )

  def update(updates, state, params=None, **extra):
    expect_state(state, ScaleBySecondMomentState, "scale_by_second_moment")
    same_structure(updates, state.nu, "nu")
    if inner is None:
      d, d_state = updates, state.direction
    else:
      d, d_state = inner.update(updates, state.direction, params, **extra)
      same_structure(d, state.nu, "nu")
    nu = jax.tree.map(
      lambda g, v: second_moment_ema_leaf(decay, v, square_leaf(g, v)), updates, state.nu
    )
    count = safe_increment(state.count)
    if debias:
      factor = debias_factor(decay, count)
      v_hat = jax.tree.map(lambda v: debias_leaf(v, factor), nu)
    else:
      v_hat = nu
    out = jax.tree.map(
      lambda u, v: adam_direction_leaf(u, v, eps, eps_root).astype(jnp.result_type(u)), d, v_hat
    )
    return out, ScaleBySecondMomentState(count, otree.cast_like(nu, state.nu), d_state)

  return GradientTransformation(init, update)


__all__ = [
  "ScaleByRssState",
  "ScaleByRmsState",
  "ScaleByRmsWithCountState",
  "ScaleByRStdDevState",
  "ScaleByRStdDevWithCountState",
  "ScaleBySecondMomentState",
]  # and the builders it registers
