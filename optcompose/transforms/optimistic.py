"""Optimistic gradients: a step extrapolated from the last two gradients.

Formula (g_t: the incoming update, t: step count from 1)::

    u_t = (alpha + beta) g_t - beta g_{t-1}        (g_0 = g_1: u_1 = alpha g_1)

With alpha = beta = 1 this is optimistic gradient descent, ``2 g_t - g_{t-1}``, an
approximation of the extra-gradient step that needs one gradient per step.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import GradientTransformation, ScalarOrSchedule, expect_state, public, real
from optcompose.transforms.statistics import moments_init, same_structure

_COEF = real(0.0, draw=(0.0, 2.0))


def optimistic_leaf(ab, beta, g, g_prev):
  """``(alpha + beta) g - beta g_prev``, given ``ab = alpha + beta``, in g's dtype."""
  # Each operation in the wider of its operands' dtypes (Optax's rounding), then g's dtype.
  now = jnp.multiply(*otree.promote(ab, g))
  before = jnp.multiply(*otree.promote(beta, g_prev))
  return jnp.subtract(*otree.promote(now, before)).astype(jnp.result_type(g))


class ScaleByOptimisticGradientState(NamedTuple):
  is_initial_step: jax.Array
  previous_gradient: Any


@public("transformation", optax="scale_by_optimistic_gradient", alpha=_COEF, beta=_COEF)
def scale_by_optimistic_gradient(
  alpha: ScalarOrSchedule = 1.0, beta: ScalarOrSchedule = 1.0
) -> GradientTransformation:
  """Generalised optimistic gradient: ``u_t = (alpha + beta) g_t - beta g_{t-1}``.

  Update (g_t: incoming update; at the first step ``g_{t-1}`` is taken to be ``g_t``, so
  ``u_1 = (alpha + beta) g_1 - beta g_1``, as in Optax)::

      u_t = (alpha + beta) g_t - beta g_{t-1}
      stored: g_t

  Args:
    alpha: the gradient's coefficient, >= 0 (a number or a schedule).
    beta: the negative momentum's coefficient, >= 0 (a number or a schedule). Both ranges
      are stricter than Optax's, which takes any number.

  Returns:
    A transformation with state :class:`ScaleByOptimisticGradientState`
    (``is_initial_step``, a bool scalar, and ``previous_gradient``); updates keep the
    gradients' dtype. The stored gradient keeps its initial dtype (the parameters'), where
    Optax stores the incoming updates as they are (its state's dtype follows the
    gradients').

  References:
    Mokhtari et al., "A Unified Analysis of Extra-gradient and Optimistic Gradient Methods
    for Saddle Point Problems: Proximal Point Approach", AISTATS 2020; Daskalakis et al.,
    "Training GANs with Optimism", ICLR 2018; Optax's ``optax.scale_by_optimistic_gradient``.
  """
  # Numbers here: `public` rebuilds the transformation with each value of a schedule.
  alpha, beta = cast("float | jax.Array", alpha), cast("float | jax.Array", beta)

  def init(params):
    return ScaleByOptimisticGradientState(jnp.array(True), moments_init(params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByOptimisticGradientState, "scale_by_optimistic_gradient")
    same_structure(updates, state.previous_gradient, "previous_gradient")
    first = state.is_initial_step
    ab = alpha + beta  # once per step
    out = jax.tree.map(
      lambda g, p: optimistic_leaf(ab, beta, g, jnp.where(first, *otree.promote(g, p))),
      updates,
      state.previous_gradient,
    )
    stored = otree.cast_like(updates, state.previous_gradient)
    return out, ScaleByOptimisticGradientState(jnp.array(False), stored)

  return GradientTransformation(init, update)


__all__ = ["ScaleByOptimisticGradientState"]  # and the builders it registers
