"""The conditional step that ``apply_if_finite``, ``multi_steps`` and
``conditionally_transform`` share: the inner update in one branch of a ``lax.cond``, the
state as it was in the other."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import cond


def update_if(
  pred,
  inner,
  updates,
  state,
  params,
  extra,
  pass_through: Optional[str] = None,
  *,
  prepare: Optional[Callable] = None,
  token: bool = False,
):
  """``inner.update`` when ``pred`` holds; else zero updates (or, given ``pass_through``,
  the wrapper's name: the incoming updates) and the state untouched. Only the branch taken
  runs (``lax.cond`` under jit); either branch gives the types of the inner step's updates.

  ``prepare`` (a function of the updates) makes, inside the taken branch, what ``inner``
  receives. ``token=True`` also returns a float32 scalar computed by the conditional (1 when
  ``pred`` holds, else 0), for :func:`optcompose.core.ordered_after`: what reads after it
  may then overwrite, in place, the buffers the conditional read."""

  traced = []  # the types of run's updates, once traced (lax.cond traces run, then hold)

  def run(operands):
    updates, state, params = operands
    given = updates if prepare is None else prepare(updates)
    out = inner.update(given, state, params, **extra)
    traced[:] = [
      jax.tree.map(lambda u: jax.ShapeDtypeStruct(jnp.shape(u), jnp.result_type(u)), out[0])
    ]
    return (*out, jnp.float32(1))

  def hold(operands):
    shapes = traced[0] if traced else jax.eval_shape(run, operands)[0]  # inner's updates
    if pass_through is None:
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      return zeros, operands[1], jnp.float32(0)
    try:
      otree.check_same_structure(operands[0], shapes, "updates", "the inner updates")
    except ValueError as e:
      raise ValueError(
        f"{pass_through}: the inner transformation changes the updates' "
        f"structure or shapes, so they cannot be passed through unchanged: "
        f"{e}"
      ) from None
    passed = jax.tree.map(lambda x, s: jnp.asarray(x).astype(s.dtype), operands[0], shapes)
    return passed, operands[1], jnp.float32(0)

  out = cond(pred, run, hold, (updates, state, params))
  return out if token else out[:2]
