"""Transformations applied at some steps only, and two tree updates for slow copies.

``conditionally_transform(inner, should_transform_fn)`` and ``conditionally_mask(...)``
count their own calls (``step``, int32 from 0) and run ``inner`` only when
``should_transform_fn(step)`` holds (``lax.cond`` under jit: the other branch costs
nothing). Otherwise ``inner``'s state is untouched and the updates are passed through
unchanged (``conditionally_transform``) or zeroed (``conditionally_mask``)::

    pred = should_transform_fn(step)          (**extra too, when forward_extra_args)
    pred:      u, inner_state = inner.update(g, inner_state, params)
    otherwise: u = g  (transform)  or  u = 0  (mask);  inner_state unchanged
    step <- step + 1

``apply_every(k)`` sums the incoming updates and emits the sum every k-th call (zero
updates in between); unlike ``multi_steps`` it is a member of a chain, so the members
before it advance at every call.

``periodic_update`` and ``incremental_update`` are not transformations: they update a slow
copy of the parameters (a target network, a Polyak average) from the current ones.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  FLAG,
  INNER,
  INT32_MAX,
  GradientTransformation,
  Hyper,
  as_transformation,
  check_hyperparameter,
  choice,
  cond,
  expect_state,
  public,
  safe_increment,
  zero_count,
)
from optcompose.wrappers.branching import update_if
from optcompose.wrappers.control import check_whole


class ConditionallyTransformState(NamedTuple):
  """Optax's fields, in Optax's order."""

  inner_state: Any
  step: jax.Array  # int32, calls so far


class ConditionallyMaskState(NamedTuple):
  """Optax's fields, in Optax's order."""

  step: jax.Array  # int32, calls so far
  inner_state: Any


def _every_other_step(step, **extra):
  """A condition the property kit draws: even steps."""
  del extra
  return step % 2 == 0


def _condition(fn: Callable, who: str, step: jax.Array, extra: dict) -> jax.Array:
  """``fn(step, **extra)`` as a boolean scalar (an integer counts as true when nonzero, as
  in ``lax.cond``); a TypeError or ValueError naming ``should_transform_fn`` otherwise."""
  pred = fn(step, **extra)
  try:
    dtype, shape = jnp.result_type(pred), jnp.shape(pred)
  except TypeError:
    raise TypeError(
      f"{who}: `should_transform_fn` must return a boolean scalar, got {type(pred).__name__}."
    ) from None
  if shape != ():
    raise ValueError(
      f"{who}: `should_transform_fn` must return a boolean scalar, got shape {shape}."
    )
  if dtype == jnp.bool_:
    return jnp.asarray(pred)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.asarray(pred) != 0
  raise TypeError(
    f"{who}: `should_transform_fn` must return a boolean scalar, got dtype "
    f"{dtype} (compare it: step % 2 == 0)."
  )


def _conditional(
  who: str, inner, should_transform_fn, forward_extra_args, state_type, pass_through: bool
) -> GradientTransformation:
  """The body of both wrappers: they differ in the state's field order and in what a step
  that does not run ``inner`` returns."""
  inner = as_transformation(inner, who)
  if not callable(should_transform_fn):
    raise TypeError(
      f"{who}: `should_transform_fn` must be a function of the step count, got "
      f"{type(should_transform_fn).__name__}."
    )

  def init(params):
    return state_type(inner_state=inner.init(params), step=zero_count())

  def update(updates, state, params=None, **extra):
    expect_state(state, state_type, who)
    pred = _condition(should_transform_fn, who, state.step, extra if forward_extra_args else {})
    new_updates, inner_state = update_if(
      pred,
      inner,
      updates,
      state.inner_state,
      params,
      extra,
      pass_through=who if pass_through else None,
    )
    return new_updates, state_type(inner_state=inner_state, step=safe_increment(state.step))

  return GradientTransformation(init, update)


_CONDITION = dict(
  inner=INNER, should_transform_fn=choice(_every_other_step), forward_extra_args=FLAG
)


@public("wrapper", optax="conditionally_transform", **_CONDITION)
def conditionally_transform(
  inner, should_transform_fn: Callable, forward_extra_args: bool = False
) -> GradientTransformation:
  """Run ``inner`` at the steps ``should_transform_fn`` picks; else pass the updates through.

  Update (see the module docstring): ``u, inner_state = inner.update(g, inner_state,
  params)`` when ``should_transform_fn(step)``; else ``u = g`` (cast to the dtypes inner's
  updates have) and ``inner_state`` unchanged. ``step`` counts every call.

  Args:
    inner: the wrapped transformation (optcompose's or Optax's).
    should_transform_fn: ``step -> bool scalar`` (an int32 ``step`` from 0; an integer
      result counts as true when nonzero).
    forward_extra_args: also pass ``update``'s keyword arguments to
      ``should_transform_fn``.

  Returns:
    A transformation with state :class:`ConditionallyTransformState` (Optax's fields).

  References:
    Optax's ``optax.conditionally_transform``.
  """
  return _conditional(
    "conditionally_transform",
    inner,
    should_transform_fn,
    forward_extra_args,
    ConditionallyTransformState,
    pass_through=True,
  )


@public("wrapper", optax="conditionally_mask", **_CONDITION)
def conditionally_mask(
  inner, should_transform_fn: Callable, forward_extra_args: bool = False
) -> GradientTransformation:
  """Run ``inner`` at the steps ``should_transform_fn`` picks; else zero updates.

  Update (see the module docstring): ``u, inner_state = inner.update(g, inner_state,
  params)`` when ``should_transform_fn(step)``; else ``u = 0`` and ``inner_state``
  unchanged. ``step`` counts every call.

  Args:
    inner: the wrapped transformation (optcompose's or Optax's).
    should_transform_fn: ``step -> bool scalar`` (an int32 ``step`` from 0; an integer
      result counts as true when nonzero).
    forward_extra_args: also pass ``update``'s keyword arguments to
      ``should_transform_fn``.

  Returns:
    A transformation with state :class:`ConditionallyMaskState` (Optax's fields).

  References:
    Optax's ``optax.conditionally_mask``.
  """
  return _conditional(
    "conditionally_mask",
    inner,
    should_transform_fn,
    forward_extra_args,
    ConditionallyMaskState,
    pass_through=False,
  )


class ApplyEvery(NamedTuple):
  """Optax's state of :func:`apply_every`."""

  count: jax.Array  # int32, calls since the last emission (0 <= count < k)
  grad_acc: Any  # the sum of this window's updates (after an emission: the emitted sum)


@public(
  "transformation",
  optax="apply_every",
  k=Hyper(("int", 1, 4), 1, INT32_MAX, numeric=True, whole=True),
)
def apply_every(k: int = 1) -> GradientTransformation:
  """Sum the updates and emit the sum every ``k``-th call (zero updates in between).

  Update, with c = count (calls so far, modulo k)::

      acc = g              (c = 0: a new window)     acc = acc + g   (otherwise)
      u   = acc            (c = k - 1)               u = 0           (otherwise)
      count <- (count + 1) mod k

  The sum is accumulated in the parameters' dtype (as Optax does); a non-finite update
  stays within its window (Optax's ``0 * acc`` would carry a NaN into the next ones).
  Members of a chain before it advance at every call: for one real step per k micro-
  batches of the whole optimizer, use :func:`multi_steps`.

  Args:
    k: the window, a whole number >= 1.

  Returns:
    A transformation with state :class:`ApplyEvery` (Optax's fields).

  References:
    Optax's ``optax.apply_every``.
  """
  check_whole("apply_every", "k", k)

  def init(params):
    otree.check_floating(params, "params")
    return ApplyEvery(zero_count(), otree.zeros_like(params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ApplyEvery, "apply_every")
    otree.check_same_structure(updates, state.grad_acc, "updates", "state.grad_acc")
    window = jnp.asarray(k).astype(jnp.int32)  # a live k (inject_hyperparams) is a float
    c = state.count % window
    new_window, emit = c == 0, c == window - 1
    acc = jax.tree.map(
      lambda g, a: jnp.add(*otree.promote(jnp.where(new_window, jnp.zeros_like(a), a), g)).astype(
        a.dtype
      ),
      updates,
      state.grad_acc,
    )
    out = jax.tree.map(
      lambda a, g: jnp.where(emit, a, jnp.zeros_like(a)).astype(g.dtype), acc, updates
    )
    return out, ApplyEvery(safe_increment(state.count) % window, acc)

  return GradientTransformation(init, update)


def _same_trees(fn: str, new_tensors: Any, old_tensors: Any, dtypes: bool) -> None:
  """The target-network functions' check: the same tree and leaf shapes (and dtypes)."""
  try:
    otree.check_same_structure(new_tensors, old_tensors, "new_tensors", "old_tensors")
    if dtypes:
      otree.check_same_dtypes(new_tensors, old_tensors, "new_tensors", "old_tensors")
  except (TypeError, ValueError) as e:
    raise type(e)(f"{fn}: {e}") from None


def periodic_update(new_tensors: Any, old_tensors: Any, steps: Any, update_period: Any) -> Any:
  """The new tensors every ``update_period`` steps, else the old ones (a target network).

  ``steps mod update_period == 0 ? new_tensors : old_tensors`` (``lax.cond`` under jit:
  the trees are not read where they are not returned).

  Args:
    new_tensors: the current parameters (the online network).
    old_tensors: the slow copy (the target network), of the same tree and dtypes.
    steps: the number of update steps taken on the online network (an integer).
    update_period: how many steps between copies, a whole number >= 1.

  Returns:
    ``new_tensors`` or ``old_tensors``.

  References:
    Optax's ``optax.periodic_update``; Mnih et al., "Human-level control through deep
    reinforcement learning", Nature 2015; Grill et al., "Bootstrap Your Own Latent",
    NeurIPS 2020.
  """
  check_hyperparameter("periodic_update", "update_period", update_period, low=1)
  check_whole("periodic_update", "update_period", update_period)
  _same_trees("periodic_update", new_tensors, old_tensors, dtypes=True)
  return cond(
    jnp.mod(steps, update_period) == 0, lambda _: new_tensors, lambda _: old_tensors, None
  )


def incremental_update(new_tensors: Any, old_tensors: Any, step_size: Any) -> Any:
  """Move a running average toward the new tensors: ``s * new + (1 - s) * old``.

  Polyak (exponential moving) averaging of the parameters: with ``s = 1 - decay`` this is
  ``ema_params``' rule, written as a function of two trees for a training loop that keeps
  the average itself (``None`` leaves of ``new_tensors`` stay ``None``). Each leaf keeps
  ``old_tensors``' dtype (Optax's takes the promoted one; the same for a Python float
  ``step_size``).

  Args:
    new_tensors: the latest parameters.
    old_tensors: the running average, of the same tree and leaf shapes (a ValueError names
      the first path that differs; nothing is broadcast). Its dtypes may differ.
    step_size: s in [0, 1], the weight of the new tensors (a number or a scalar array).

  Returns:
    The updated average ``s * new + (1 - s) * old``.

  References:
    Optax's ``optax.incremental_update``; Polyak and Juditsky, "Acceleration of Stochastic
    Approximation by Averaging", SIAM J. Control Optim. 30(4), 1992.
  """
  check_hyperparameter("incremental_update", "step_size", step_size, low=0.0, high=1.0)
  # A None of new_tensors stays None (Optax's rule): compared as the old leaf it stands for.
  try:
    filled = jax.tree.map(
      lambda n, o: o if n is None else n, new_tensors, old_tensors, is_leaf=lambda x: x is None
    )
  except (TypeError, ValueError):  # other structures: the check below names the difference
    filled = new_tensors
  _same_trees("incremental_update", filled, old_tensors, dtypes=False)

  def average(new, old):
    if new is None:
      return None
    s, n, o = otree.promote(step_size, new, old)
    return (s * n + (1 - s) * o).astype(jnp.result_type(old))

  return jax.tree.map(average, new_tensors, old_tensors, is_leaf=lambda x: x is None)


__all__ = [
  "ApplyEvery",
  "ConditionallyMaskState",
  "ConditionallyTransformState",
  "incremental_update",
  "periodic_update",
]  # and the builders it registers
