"""Scaling: multiply the updates by a step size or by the (negated) learning rate.

Formula (the only one in this module)::

    u <- s * u        with s cast to u's dtype
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose._core import (
    EmptyState, GradientTransformation, ScalarOrSchedule, check_hyperparameter, identity,
    with_schedules,
)


def scale_leaf(s, u):
  """``s * u`` in u's dtype: the step size is rounded to the update's precision."""
  return jnp.asarray(s, dtype=jnp.result_type(u)) * u


@with_schedules("step_size")
def scale(step_size: ScalarOrSchedule) -> GradientTransformation:
  """Scale updates by ``step_size`` (a number or a schedule of the step count).

  Update: ``u <- step_size * u``.
  """
  check_hyperparameter("scale", "step_size", step_size)

  def init(params):
    otree.check_floating(params, "params")
    return EmptyState()

  def update(updates, state, params=None, **extra):
    del params, extra
    return jax.tree.map(lambda u: scale_leaf(step_size, u), updates), state

  return GradientTransformation(init, update)


def scale_by_schedule(step_size_fn) -> GradientTransformation:
  """Scale updates by ``step_size_fn(count)``; the count lives in the state."""
  if not callable(step_size_fn):
    raise TypeError("scale_by_schedule: `step_size_fn` must be a callable of the step count.")
  return scale(step_size_fn)


@with_schedules("learning_rate")
def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule | None = None, *, flip_sign: bool = True
) -> GradientTransformation:
  """Scale updates by ``-learning_rate`` (or ``+learning_rate`` with ``flip_sign=False``).

  Update: ``u <- -lr_t * u`` where ``lr_t`` is the learning rate (or schedule value) at the
  current step. ``None`` means no scaling. A negative learning rate given as a number is an
  error (use ``flip_sign=False`` to ascend).
  """
  if learning_rate is None:
    return identity()
  check_hyperparameter("scale_by_learning_rate", "learning_rate", learning_rate, low=0.0)
  return scale(-learning_rate if flip_sign else learning_rate)
