"""Skipping non-finite steps: ``apply_if_finite``.

``apply_if_finite(inner, max_consecutive_errors, check_updates=False)``: skip a step whose
gradients hold a NaN or an Inf (with ``check_updates=True``, also one whose update from
finite gradients is not finite): parameters and inner state stay untouched, and the state
counts skipped steps (consecutive and total). After ``max_consecutive_errors`` consecutive
bad steps the state's ``gave_up`` flag is set for the training loop to act on; unlike Optax,
which then applies them, a non-finite gradient is never applied.

Cost: the test reads the gradients once more (``isfinite(sum(g - g))``: ``g - g`` is 0 for a
finite element and NaN otherwise, so the sum is exact and cannot overflow), and the inner
step runs inside one ``lax.cond`` on it, whose untaken branch costs nothing. Testing the
updates as well needs them before any state is written, so ``check_updates=True`` computes
the inner step twice: once to test its updates, once inside the ``lax.cond`` (one more read
of everything the inner step reads: 16 B per parameter for AdamW in float32).

On XLA CPU a ``lax.cond`` that returns the updates costs about 1.4x the step it holds (the
updates are written out, then read by ``apply_updates``; 2x where glibc maps their block
afresh at every step: see docs/performance.md). :func:`optcompose.step` on an
``apply_if_finite`` transformation takes its step-level form instead: the same test and
state, with the parameters' update inside the conditional, so a skipped step writes nothing
and a taken one costs about what the inner step does. :func:`step_if_finite` is that call
for any transformation, with the flag returned instead of counted in a state.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from optcompose.core.base import is_float0
from optcompose.core import (
  FLAG,
  INNER,
  INT32_MAX,
  GradientTransformation,
  Hyper,
  as_transformation,
  cond,
  expect_state,
  public,
  safe_increment,
  step,
  with_step,
  zero_count,
)
from optcompose.wrappers.branching import update_if


class ApplyIfFiniteState(NamedTuple):
  """Optax's fields, plus ``gave_up``."""

  notfinite_count: jax.Array  # consecutive non-finite steps
  last_finite: jax.Array  # whether the latest step was finite
  total_notfinite: jax.Array  # non-finite steps in all
  inner_state: Any
  # Whether the consecutive count reached the maximum. The default (Optax's four fields given)
  # is a NumPy bool: a device array made at import would start JAX's backend.
  gave_up: Union[jax.Array, np.bool_] = np.False_


def valued_leaves(tree) -> list:
  """``tree``'s leaves that hold values: not the ``float0`` ones (the gradients of integer
  inputs, as ``jax.grad(..., allow_int=True)`` gives them), which have no elements to test
  or measure."""
  return [x for x in jax.tree.leaves(tree) if not is_float0(x)]


def all_finite(tree) -> jax.Array:
  """True when every element of every leaf is finite: ``isfinite(sum(x - x))`` per leaf, a
  single cheap pass, and exact: ``x - x`` is 0 for a finite element and NaN otherwise, so the
  sum cannot overflow. (Not ``x * 0``: XLA folds ``(y * c) * 0`` into ``y * (c * 0)``, which
  misses a product ``y * c`` that overflowed.)"""
  flags = [jnp.isfinite(jnp.sum(x - x)) for x in valued_leaves(tree)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _all_finite_pairs(grads, updates) -> jax.Array:
  """True when every element of both trees is finite: ``all(isfinite(g) & isfinite(u))``
  per leaf, the probe's updates ``u`` computed inside the test's loop. XLA CPU turns a
  boolean reduction into a parallel loop, where the update's arithmetic runs at a loop's
  speed (a sum of ``u - u`` runs it in the reduction's own, slower loop: AdamW's update at
  16.8M float32 parameters, 10 against 16-19 ms), and the gradients read for the probe are
  tested in the same pass. Trees that do not pair leaf for leaf are tested apart."""
  g_leaves, u_leaves = valued_leaves(grads), valued_leaves(updates)
  if len(g_leaves) != len(u_leaves) or any(
    jnp.shape(g) != jnp.shape(u) for g, u in zip(g_leaves, u_leaves)
  ):
    pairs = [jnp.isfinite(x) for x in g_leaves + u_leaves]
  else:
    pairs = [jnp.isfinite(g) & jnp.isfinite(u) for g, u in zip(g_leaves, u_leaves)]
  flags = [jnp.all(x) for x in pairs]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


@public(
  "wrapper",
  optax="apply_if_finite",
  inner=INNER,
  max_consecutive_errors=Hyper(
    ("int", 1, 5), 1, INT32_MAX, numeric=True, integer=True, optional=True
  ),
  check_updates=FLAG,
)
def apply_if_finite(
  inner, max_consecutive_errors: Optional[int], *, check_updates: bool = False
) -> GradientTransformation:
  """Skip steps whose gradients contain NaN or Inf (see the module docstring).

  Update: ``u, inner_state = inner.update(g, inner_state, params)`` if every element of g is
  finite (and, with ``check_updates``, every element of u); otherwise ``u = 0`` and
  ``inner_state`` unchanged, and the inner update does not run.

  Args:
    inner: the wrapped optimizer (optcompose's or Optax's).
    max_consecutive_errors: after this many consecutive non-finite steps, ``gave_up`` is set
      in the state (the updates are still skipped), and it stays set when finite steps
      follow (the consecutive count restarts at 0): a flag for the training loop to act on
      (stop, or restore a checkpoint), cleared only by a new ``init``. ``None``: never give
      up.
    check_updates: also skip (and count) a step whose update is not finite although its
      gradients are (an overflow: a huge learning rate or gradient). It computes the inner
      step twice (see the module docstring); ours, Optax tests the gradients only.

  Returns:
    A transformation with state :class:`ApplyIfFiniteState` (Optax's fields and ``gave_up``),
    and a step-level form that :func:`optcompose.step` uses (the parameters' update inside
    the conditional; the same state).

  References:
    Optax's ``optax.apply_if_finite``; dynamic loss scaling as in Micikevicius et al., "Mixed
    Precision Training", ICLR 2018.
  """
  inner = as_transformation(inner, "apply_if_finite")

  def init(params):
    return ApplyIfFiniteState(
      zero_count(), jnp.asarray(True), zero_count(), inner.init(params), jnp.asarray(False)
    )

  def decide(updates, state, params, extra):  # the test: before anything is written
    expect_state(state, ApplyIfFiniteState, "apply_if_finite")
    if not check_updates:
      return all_finite(updates)
    # a probe: under jit only its updates are computed, its state is dropped
    probe = inner.update(updates, state.inner_state, params, **extra)[0]
    return _all_finite_pairs(updates, probe)

  def counted(state, finite, inner_state):
    consecutive = jnp.where(finite, 0, safe_increment(state.notfinite_count))
    gave_up = state.gave_up
    if max_consecutive_errors is not None:
      gave_up = jnp.logical_or(gave_up, consecutive >= max_consecutive_errors)
    return ApplyIfFiniteState(
      consecutive,
      finite,
      jnp.where(finite, state.total_notfinite, safe_increment(state.total_notfinite)),
      inner_state,
      gave_up,
    )

  def update(updates, state, params=None, **extra):
    finite = decide(updates, state, params, extra)
    new_updates, inner_state = update_if(finite, inner, updates, state.inner_state, params, extra)
    return new_updates, counted(state, finite, inner_state)

  def step_form(grads, state, params, **extra):  # optcompose.step: the step inside the cond
    finite = decide(grads, state, params, extra)
    params, inner_state = _step_if(finite, inner, grads, state.inner_state, params, extra)
    return params, counted(state, finite, inner_state)

  return GradientTransformation(init, with_step(update, step_form))


def _step_if(finite, tx, grads, opt_state, params, extra) -> tuple:
  """``optcompose.step(tx, ...)`` when ``finite`` holds, else ``(params, opt_state)``, inside
  one conditional (the parameters' update in its branch: nothing is written on a skip)."""
  run = lambda o: step(tx, o[0], o[1], o[2], **extra)  # the step-level form, if tx has one

  def hold(operands):
    if not isinstance(finite, jax.core.Tracer):  # eagerly: the inner step's errors at once
      jax.eval_shape(run, operands)  # (under jit, lax.cond traces run anyway)
    return operands[2], operands[1]

  return cond(finite, run, hold, (grads, opt_state, params))


def step_if_finite(tx, grads, opt_state, params, **extra) -> tuple:
  """One whole training step, skipped when a gradient is not finite:
  ``(apply_updates(params, u), new_state, True)`` with ``u, new_state = tx.update(grads,
  opt_state, params, **extra)`` if every element of ``grads`` is finite, else ``(params,
  opt_state, False)``, the step not run.

  What :func:`apply_if_finite` does, at about the cost of the step itself: the parameters'
  update runs inside the ``lax.cond`` too. A gradient transformation cannot do that (it
  must return the updates), and on XLA CPU a conditional that returns AdamW's updates costs
  about 1.4x AdamW, against 1.0x with the update inside (16.8M float32 parameters:
  ``benchmarks/skip_step_variants.py``; this function with optcompose's AdamW, finiteness
  test included: 1.15-1.19x in ``make bench``). The step inside is
  :func:`optcompose.step`'s, so a transformation's step-level form (``multi_steps``,
  ``lookahead_in_state``) is used there too. Count skipped steps from the returned flag.

  Args:
    tx: any gradient transformation (optcompose's or Optax's).
    grads: the gradients, as ``tx.update`` takes them.
    opt_state: ``tx``'s state.
    params: the parameters (donate them under ``jax.jit``: they are updated in place).
    **extra: passed on to ``tx.update``.

  Returns:
    ``(params, opt_state, finite)``, ``finite`` a boolean scalar.

  References:
    Optax's ``optax.apply_if_finite`` (the same test, as a wrapper).
  """
  as_transformation(tx, "step_if_finite")  # names a bad transformation here
  finite = all_finite(grads)
  return (*_step_if(finite, tx, grads, opt_state, params, extra), finite)


__all__ = ["ApplyIfFiniteState", "all_finite", "step_if_finite"]  # and registered builders
