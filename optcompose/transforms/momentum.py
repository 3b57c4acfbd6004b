"""First moments: the heavy-ball trace (with Nesterov's look-ahead), the exponential moving
average, and bias correction as a piece of its own.

Formulas, in the symbols the tests use (g: incoming update, v: trace, rho: its decay,
m: EMA, beta: its decay, t: this transformation's step count from 1)::

    trace:            v_t = rho * v_{t-1} + g_t ;   u_t = v_t   (nesterov: g_t + rho * v_t)
    ema:              m_t = (1 - beta) * g_t + beta * m_{t-1} ;   u_t = m_t (debias: m_hat_t)
    bias correction:  u_t = g_t / (1 - beta^t)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  DECAY,
  DTYPE,
  FLAG,
  MOMENTUM,
  GradientTransformation,
  ScalarOrSchedule,
  expect_state,
  public,
  safe_increment,
  zero_count,
)
from optcompose.transforms.statistics import (
  like_params,
  debias_factor,
  debias_leaf,
  ema_leaf,
  same_structure,
)


class TraceState(NamedTuple):
  """The momentum buffer ``v``."""

  trace: Any


def trace_leaf(rho, v, g):
  """``g + rho * v``: both the trace update and Nesterov's look-ahead."""
  # Each operation in the wider of its operands' dtypes (the casts written out).
  return jnp.add(*otree.promote(g, jnp.multiply(*otree.promote(rho, v))))


@public("transformation", optax="trace", decay=MOMENTUM, nesterov=FLAG, accumulator_dtype=DTYPE)
def trace(
  decay: ScalarOrSchedule, nesterov: bool = False, accumulator_dtype: Optional[Any] = None
) -> GradientTransformation:
  """Heavy-ball momentum: ``v_t = decay * v_{t-1} + g_t``, output ``v_t``.

  Update (rho = ``decay``, ``v_0 = 0``)::

      v_t = rho * v_{t-1} + g_t
      u_t = v_t                  (nesterov=False)
      u_t = g_t + rho * v_t      (nesterov=True: the look-ahead)

  Args:
    decay: the momentum coefficient rho in [0, 1] (a number or a schedule).
    nesterov: output Nesterov's look-ahead ``g_t + rho * v_t`` instead of ``v_t``.
    accumulator_dtype: dtype of the stored trace (e.g. ``jnp.bfloat16`` to halve its memory);
      ``None`` keeps the parameters' dtype. The arithmetic runs in the wider of the two.

  Returns:
    A transformation with state :class:`TraceState`; updates keep the gradients' dtype.

  References:
    Polyak, "Some methods of speeding up the convergence of iteration methods", 1964;
    Sutskever, Martens, Dahl and Hinton, "On the importance of initialization and momentum
    in deep learning", ICML 2013; Optax's ``optax.trace``.
  """

  def init(params):
    otree.check_floating(params, "params")
    return TraceState(trace=like_params(params, accumulator_dtype, "trace: `accumulator_dtype`"))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, TraceState, "trace")
    otree.check_same_structure(updates, state.trace, "updates", "state.trace")
    new_trace = jax.tree.map(lambda g, v: trace_leaf(decay, v, g), updates, state.trace)
    if nesterov:
      out = jax.tree.map(lambda g, v: trace_leaf(decay, v, g), updates, new_trace)
    else:
      out = new_trace
    # Updates keep the gradients' dtype (float16 gradients with a bfloat16 trace would
    # otherwise come out float32).
    out = otree.cast_like(out, updates)
    # The state keeps its dtype (set at init): a float32 momentum from a schedule or
    # inject_hyperparams would otherwise promote a bfloat16 trace (under x64 a float32 one),
    # and a lax.scan carry, a conditional's branches or a jitted step's next call differ.
    return out, TraceState(trace=otree.cast_like(new_trace, state.trace))

  return GradientTransformation(init, update)


class EmaState(NamedTuple):
  count: jax.Array
  ema: Any


@public("transformation", optax="ema", decay=DECAY, debias=FLAG, accumulator_dtype=DTYPE)
def ema(
  decay: ScalarOrSchedule, debias: bool = True, accumulator_dtype: Optional[Any] = None
) -> GradientTransformation:
  """Exponential moving average of the updates: ``m_t = (1 - decay) g_t + decay m_{t-1}``.

  Update (beta = ``decay``, ``m_0 = 0``, t counts this transformation's steps from 1)::

      m_t = (1 - beta) * g_t + beta * m_{t-1}
      u_t = m_t / (1 - beta^t)   (debias=True)     u_t = m_t   (debias=False)

  Args:
    decay: beta in [0, 1) (a number or a schedule).
    debias: output ``m_t / (1 - decay^t)`` (the stored average stays ``m_t``); False
      outputs ``m_t``, which is biased toward ``m_0 = 0`` in the first steps.
    accumulator_dtype: dtype of the stored average (e.g. ``jnp.bfloat16`` to halve its
      memory); ``None`` keeps the parameters'.

  Returns:
    A transformation with state :class:`EmaState` (``count``, ``ema``); updates keep the
    gradients' dtype.

  References:
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (bias correction);
    Optax's ``optax.ema``.
  """

  def init(params):
    otree.check_floating(params, "params")
    return EmaState(
      zero_count(), like_params(params, accumulator_dtype, "ema: `accumulator_dtype`")
    )

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, EmaState, "ema")
    same_structure(updates, state.ema, "ema")
    new = jax.tree.map(lambda g, m: ema_leaf(decay, m, g), updates, state.ema)
    count = safe_increment(state.count)
    if debias:
      factor = debias_factor(decay, count)
      out = jax.tree.map(lambda m: debias_leaf(m, factor), new)
    else:
      out = new
    # Updates keep the gradients' dtype (float16 is debiased in float32).
    out = otree.cast_like(out, updates)
    return out, EmaState(count, otree.cast_like(new, state.ema))  # its dtype kept: see trace

  return GradientTransformation(init, update)


class BiasCorrectionState(NamedTuple):
  count: jax.Array


@public("transformation", decay=DECAY)
def scale_by_bias_correction(decay: ScalarOrSchedule) -> GradientTransformation:
  """Divide the incoming EMA by ``1 - decay^t`` (t counts this transformation's steps).

  Update: ``u_t = g_t / (1 - decay^t)``, t from 1. Place it right after an un-debiased EMA
  (``ema(decay, debias=False)``) of the same decay.

  Args:
    decay: the EMA's beta in [0, 1) (a number or a schedule).

  Returns:
    A transformation with state :class:`BiasCorrectionState` (its count).

  References:
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, section 3.
  """

  def init(params):
    del params
    return BiasCorrectionState(zero_count())

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, BiasCorrectionState, "scale_by_bias_correction")
    count = safe_increment(state.count)
    factor = debias_factor(decay, count)
    out = jax.tree.map(lambda m: debias_leaf(m, factor).astype(jnp.result_type(m)), updates)
    return out, BiasCorrectionState(count)

  return GradientTransformation(init, update)


__all__ = ["TraceState", "EmaState", "BiasCorrectionState"]  # and the builders it registers
