"""Rejecting micro-steps of gradient accumulation: Optax's ``should_skip_update_fn`` protocol
for :func:`optcompose.multi_steps`, and the two functions Optax gives for it."""

from __future__ import annotations

import functools
from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core.validation import check_real_value


class ShouldSkipUpdateFunction(Protocol):
  """Optax's protocol: ``(updates, gradient_step, params) -> (skip, skip_state)``, with
  ``skip`` a boolean scalar and ``skip_state`` a tree stored in ``MultiStepsState``."""

  def __call__(self, updates: Any, gradient_step: jax.Array, params: Optional[Any]) -> tuple: ...


def skip_not_finite(updates: Any, gradient_step: jax.Array, params: Optional[Any]) -> tuple:
  """Skip a micro-step whose updates hold a NaN or an Inf (a ``should_skip_update_fn``).

  Args:
    updates: the micro-step's gradients.
    gradient_step: the real steps taken (unused).
    params: the parameters (unused).

  Returns:
    ``(should_skip, {"should_skip": should_skip, "num_not_finite": n})``: n the int32 count
    of NaN and Inf elements in all leaves (int32 under x64 too; Optax's is JAX's default
    int there).

  References:
    Optax's ``optax.skip_not_finite``.
  """
  del gradient_step, params
  counts = [
    jnp.sum(jnp.logical_not(jnp.isfinite(x)), dtype=jnp.int32) for x in jax.tree.leaves(updates)
  ]
  num_not_finite = functools.reduce(jnp.add, counts, jnp.zeros([], jnp.int32))
  should_skip = num_not_finite > 0
  return should_skip, {"should_skip": should_skip, "num_not_finite": num_not_finite}


def skip_large_updates(
  updates: Any, gradient_step: jax.Array, params: Optional[Any], max_squared_norm: Any
) -> tuple:
  """Skip a micro-step whose updates' squared global norm reaches ``max_squared_norm``.

  Bind the bound first: ``functools.partial(skip_large_updates, max_squared_norm=42.0)``.
  ``should_skip = not (||g||^2 < max_squared_norm)``, so a NaN norm is skipped too; the
  squares are summed in float32 or wider (:func:`optcompose.tree.squared_norm`).

  Args:
    updates: the micro-step's gradients.
    gradient_step: the real steps taken (unused).
    params: the parameters (unused).
    max_squared_norm: the largest squared norm accepted (exclusive), a real number > 0.

  Returns:
    ``(should_skip, {"should_skip": should_skip, "norm_squared": ||g||^2})``.

  References:
    Optax's ``optax.skip_large_updates``.
  """
  del gradient_step, params
  check_real_value(
    "skip_large_updates", "max_squared_norm", max_squared_norm, "the largest squared norm accepted"
  )
  if not isinstance(max_squared_norm, jax.core.Tracer) and not np.all(
    np.asarray(max_squared_norm) > 0
  ):  # no squared norm is below a bound <= 0: every micro-step would be skipped
    raise ValueError(
      f"skip_large_updates: `max_squared_norm` must be > 0, got {max_squared_norm!r} (every "
      "update would be skipped)."
    )
  norm_sq = otree.squared_norm(updates)
  should_skip = jnp.logical_not(jnp.less(*otree.promote(norm_sq, max_squared_norm)))
  return should_skip, {"should_skip": should_skip, "norm_squared": norm_sq}


def _skip_decision(fn, who, updates, gradient_step, params):
  """``fn``'s ``(skip, skip_state)``, ``skip`` checked to be a boolean scalar (Optax's
  ValueError)."""
  out = fn(updates, gradient_step, params)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
      f"{who}: `should_skip_update_fn` must return a pair (should_skip, "
      f"skip_state), got {type(out).__name__}."
    )
  skip, skip_state = out
  try:
    dtype, shape = jnp.result_type(skip), jnp.shape(skip)
  except TypeError:
    dtype, shape = type(skip).__name__, None
  if dtype != jnp.bool_ or shape != ():
    raise ValueError(
      f"{who}: `should_skip_update_fn` must return a boolean scalar array "
      f"first, got dtype {dtype} and shape {shape}."
    )
  return jnp.asarray(skip), skip_state


__all__ = ["ShouldSkipUpdateFunction", "skip_large_updates", "skip_not_finite"]
