"""Step counts and branches: the int32 count every stateful transformation keeps, its
saturating increment, and the one ``cond`` (a Python branch where the predicate is known)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


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
  ``lax.cond`` of fresh closures would compile both branches at every call."""
  if not isinstance(pred, jax.core.Tracer):
    return (if_true if bool(pred) else if_false)(operand)
  return jax.lax.cond(pred, if_true, if_false, operand)
