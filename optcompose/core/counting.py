"""Step counts and branches: the int32 count every stateful transformation keeps, its
saturating increment, and the one ``cond`` (a Python branch where the predicate is known)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from optcompose.core.explicit import reshard, sharded_axes


def zero_count() -> jax.Array:
  """A fresh int32 step count."""
  return jnp.zeros([], jnp.int32)


def safe_increment(count: jax.Array) -> jax.Array:
  """``count + 1``, saturating at the largest value of the count's dtype (no wrap-around)."""
  count = jnp.asarray(count)
  top = (
    jnp.iinfo(count.dtype).max
    if jnp.issubdtype(count.dtype, jnp.integer)
    else jnp.finfo(count.dtype).max
  )
  top = jnp.asarray(top, count.dtype)
  return jnp.where(count < top, count + jnp.asarray(1, count.dtype), top)


def cond(pred, if_true: Callable, if_false: Callable, operand):
  """``lax.cond``, or a plain Python branch when ``pred`` is a known value: eagerly, a
  ``lax.cond`` of fresh closures would compile both branches at every call.

  Under explicit sharding (a mesh with ``AxisType.Explicit`` axes, ``jax.make_mesh``'s
  default), a sharding is part of an array's type, and the two branches must return the same
  types: a step that reads ZeRO-1 state sharded over ``data`` returns parameters sharded
  over ``data``, where the branch that skips it returns them replicated, as they came. Where
  the branches' shardings of a result differ, both return the more sharded one (the fewer
  mesh axes a leaf is replicated over, the less each device holds; a tie: ``if_true``'s),
  which is what the step without the branch would have returned. The branches are traced
  again only then (the arrays closed over count too: JAX reports the difference)."""
  if not isinstance(pred, jax.core.Tracer):
    return (if_true if bool(pred) else if_false)(operand)
  try:
    return jax.lax.cond(pred, if_true, if_false, operand)
  except TypeError:  # the branches' types differ: reconciled if only in their shardings
    agreeing = _agreeing(if_true, if_false, operand)
    if agreeing == (if_true, if_false):
      raise
  return jax.lax.cond(pred, *agreeing, operand)


def _agreeing(if_true: Callable, if_false: Callable, operand) -> tuple:
  """The two branches, each result resharded where their shardings differ (see cond); the
  branches themselves where anything else differs, or fails (``cond`` then raises JAX's
  error, not a second one)."""
  try:
    (a, tree_a), (b, tree_b) = (
      jax.tree.flatten(jax.eval_shape(f, operand)) for f in (if_true, if_false)
    )
  except Exception:  # a branch's own error: JAX's first report of it stands
    return if_true, if_false
  if tree_a != tree_b:
    return if_true, if_false  # lax.cond names the difference
  targets = []
  for x, y in zip(a, b):
    x, y = getattr(x, "sharding", None), getattr(y, "sharding", None)
    specs = getattr(x, "spec", None), getattr(y, "spec", None)
    if x == y or None in specs:
      targets.append(None)
    else:
      targets.append(x if sharded_axes(specs[0]) >= sharded_axes(specs[1]) else y)
  if all(t is None for t in targets):
    return if_true, if_false

  def resharded(f):
    def branch(o):
      leaves, tree = jax.tree.flatten(f(o))
      leaves = [x if t is None else reshard(x, t) for x, t in zip(leaves, targets)]
      return tree.unflatten(leaves)

    return branch

  return resharded(if_true), resharded(if_false)
