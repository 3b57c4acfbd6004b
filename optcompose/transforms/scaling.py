"""Scaling: multiply the updates by a step size or by the (negated) learning rate.

Formula (the only one in this module)::

    u <- s * u        with s cast to u's dtype
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import (
  FLAG,
  SCHEDULE,
  EmptyState,
  GradientTransformation,
  ScalarOrSchedule,
  public,
  real,
  stateless,
)
from optcompose.core import identity as _identity

identity = public("transformation", optax="identity", any_dtype=True)(_identity)


def scale_leaf(s, u):
  """``s * u`` in u's dtype: the step size is rounded to the update's precision."""
  if type(s) in (float, int) and isinstance(u, jax.Array):  # weakly typed: u's dtype
    return u * s  # the same bits, without a host-to-device copy of s per leaf (eager calls)
  return jnp.asarray(s, dtype=jnp.result_type(u)) * u


@public("transformation", optax="scale", step_size=real(draw=(-1.0, 1.0)))
def scale(step_size: ScalarOrSchedule) -> GradientTransformation:
  """Scale updates by ``step_size``: ``u <- step_size * u``.

  The step size is cast to each update's dtype before the product.

  Args:
    step_size: a number (any sign) or a schedule of the step count.

  Returns:
    A stateless transformation (:class:`EmptyState`); with a schedule, the state is an
    :class:`~optcompose.InjectHyperparamsState` that keeps the count.

  References:
    Optax's ``optax.scale``.
  """

  def init(params):
    # An Equinox model may be given whole, as to Optax's (functions and flags among its
    # leaves: left alone); an integer or boolean array would have its step truncated by
    # Optax's apply_updates (Flax's TrainState), so it is refused here.
    arrays = lambda x: x if isinstance(x, (jax.Array, np.ndarray)) else 0.0  # noqa: E731
    otree.check_floating(jax.tree.map(arrays, params), "params")
    return EmptyState()

  update = stateless(
    lambda updates, params: jax.tree.map(lambda u: scale_leaf(step_size, u), updates)
  ).update
  return GradientTransformation(init, update)


@public("transformation", optax="scale_by_schedule", step_size_fn=SCHEDULE)
def scale_by_schedule(step_size_fn) -> GradientTransformation:
  """Scale updates by ``step_size_fn(count)``; the count lives in the state.

  Update: ``u <- s_t * u`` with ``s_t = step_size_fn(t - 1)`` at the t-th update.

  Args:
    step_size_fn: a schedule, a function of the int32 step count.

  Returns:
    :func:`scale` with the schedule: its state is an
    :class:`~optcompose.InjectHyperparamsState` holding the count.

  References:
    Optax's ``optax.scale_by_schedule``.
  """
  if not callable(step_size_fn):
    raise TypeError("scale_by_schedule: `step_size_fn` must be a callable of the step count.")
  return scale(step_size_fn)


@public(
  "transformation",
  optax="scale_by_learning_rate",
  learning_rate=real(0.0, draw=(1e-5, 1.0), optional=True),
  flip_sign=FLAG,
)
def scale_by_learning_rate(
  learning_rate: ScalarOrSchedule | None = None, *, flip_sign: bool = True
) -> GradientTransformation:
  """Scale updates by ``-learning_rate`` (or ``+learning_rate`` with ``flip_sign=False``).

  Update: ``u <- -lr_t * u`` where ``lr_t`` is the learning rate (or schedule value) at the
  current step.

  Args:
    learning_rate: >= 0, a number or a schedule; ``None`` means no scaling. A negative
      learning rate is an error (use ``flip_sign=False`` to ascend).
    flip_sign: descend (multiply by ``-lr``, the default); False multiplies by ``+lr``.

  Returns:
    :func:`scale` with ``-lr`` (or ``lr``): an :class:`EmptyState`, or with a schedule an
    :class:`~optcompose.InjectHyperparamsState`; with ``learning_rate=None``,
    :func:`identity`.

  References:
    Optax's ``optax.scale_by_learning_rate``.
  """
  if learning_rate is None:
    return identity()
  # A number here: `public` rebuilds the transformation with each value of a schedule.
  learning_rate = cast("float | jax.Array", learning_rate)
  return scale(-learning_rate if flip_sign else learning_rate)


@public("transformation", optax="set_to_zero", any_dtype=True)
def set_to_zero() -> GradientTransformation:
  """Replace the updates by zeros (frozen parameters): ``u <- 0``.

  Returns:
    A stateless transformation (:class:`EmptyState`).

  References:
    Optax's ``optax.set_to_zero``.
  """
  return stateless(lambda updates, params: jax.tree.map(jnp.zeros_like, updates))


ScaleState = EmptyState  # Optax's name for scale's (empty) state

__all__ = ["ScaleState"]  # and the builders it registers
