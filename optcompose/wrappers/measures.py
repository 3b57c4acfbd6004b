"""The measurements :func:`optcompose.with_diagnostics` records, each written once (also read
by :mod:`optcompose.metrics`)."""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optcompose.core import InjectHyperparamsState, cond, current_hyperparams, zero_count
from optcompose.core.explicit import sharded_axes, type_sharding
from optcompose.masks import model_elements, resolve_mask
from optcompose.transforms.clipping import ClipByGlobalNormState
from optcompose.wrappers.finite import all_finite, valued_leaves


# Leaves below this size are measured together (see grouped).
GROUPED_SIZE = 1 << 14


def grouped(leaves: list) -> list:
  """The arrays to measure ``leaves`` by: each leaf of 2^14 elements or more as it is, the
  smaller ones raveled and concatenated, one array per dtype. A norm, a count or a fraction
  over all the elements is the same, up to the order of float addition; XLA compiles one
  reduction for the group instead of one per leaf (nanoGPT's 76 leaves, 50 of them small:
  with_diagnostics' lowering and compiling took 1.74x the recipe's CPU time, about 1.6x
  grouped, on XLA CPU), and a copy of leaves this small costs microseconds (joining every
  leaf made both the compile and the step slower: docs/performance.md). ``float0`` leaves
  (the gradients of integer inputs) hold no values and are left out.

  Only where JAX has one device (:func:`_one_device`): a leaf split over devices would be
  gathered whole to be joined, where its own reduction is a partial sum on each device and
  an all-reduce of scalars; and under ``jax.jit`` on auto axes a leaf's sharding is unknown
  when this runs. (An explicitly sharded leaf is kept apart even so.)"""
  valued = [jnp.asarray(x) for x in valued_leaves(leaves)]
  if not _one_device():
    return valued
  big, small = [], {}
  for x in valued:
    sharding = type_sharding(x)
    if x.size >= GROUPED_SIZE or (sharding is not None and sharded_axes(sharding.spec)):
      big.append(x)
    else:
      small.setdefault(x.dtype, []).append(jnp.ravel(x))
  return big + [p[0] if len(p) == 1 else jnp.concatenate(p) for p in small.values()]


def _one_device() -> bool:
  """Whether the default backend has a single device (in every process): no array can then
  be split, so joining leaves moves nothing between devices."""
  return jax.device_count() == 1


def update_ratio(update_norm: jax.Array, param_norm: jax.Array) -> jax.Array:
  """``update_norm / param_norm``, with 0/0 = 0 and x/0 = +inf for x > 0: no NaN unless a
  norm is NaN (non-finite parameters or updates)."""
  both_zero = (update_norm == 0) & (param_norm == 0)
  return jnp.where(both_zero, 0.0, update_norm / param_norm).astype(jnp.float32)


def zero_fraction(tree: Any, mask: Any = None) -> jax.Array:
  """The fraction of exactly-zero elements over all leaves together (0 for an empty tree);
  ``mask`` (as in ``add_decayed_weights``) restricts it to the selected leaves. NaN where a
  selected leaf holds a NaN. A :class:`~optcompose.FlatParams` bucket counts without the
  zeros that pad it (``pad_to``): the model has no such elements."""
  leaves = [jnp.asarray(x) for x in model_elements(tree)]
  if mask is not None:
    keep = jax.tree.leaves(resolve_mask(mask, tree, "zero_mask"))
    leaves = [x for x, k in zip(leaves, keep) if k]
  leaves = grouped(leaves)
  size = sum(int(np.size(x)) for x in leaves)
  if size == 0:
    return jnp.zeros([], jnp.float32)
  zeros = functools.reduce(jnp.add, [_zero_count(x) for x in leaves])
  return (zeros / size).astype(jnp.float32)


def _zero_count(x: jax.Array) -> jax.Array:
  """``#(x == 0)``, a float32 (NaN if x holds a NaN).

  Counted as ``n - sum(|sign(x)|)`` in float32, which XLA CPU's library reduction takes:
  about six times faster than an integer count of ``x == 0`` (14 ms at 8M elements); see
  :func:`_exact_sums` (beyond 2^24 zeros the rows' float32 sum rounds)."""
  x = jnp.abs(x) if jnp.iscomplexobj(x) else x
  # The sign in x's own dtype: a float64 1e-300 would be 0 in float32.
  ones = (x if x.dtype == jnp.bool_ else jnp.abs(jnp.sign(x))).astype(jnp.float32)
  sums, row = _exact_sums(ones)
  if sums is None:  # rows this short would be slow: count as integers (NaN: as the others)
    nan = jnp.where(jnp.any(jnp.isnan(ones)), jnp.nan, 0.0)
    return jnp.sum(x.reshape(-1) == 0, dtype=jnp.int32).astype(jnp.float32) + nan
  return jnp.sum(row - sums)


def _nonfinite(x: jax.Array) -> jax.Array:
  """``#(x is NaN or +-inf)``, an exact int32: counted in float32 as :func:`_zero_count`
  counts (XLA CPU compiles an integer count of 16.8M elements into five reduction loops:
  +60 ms of compile time for ``with_diagnostics``, against +15 ms for a float sum)."""
  bad = jnp.logical_not(jnp.isfinite(x))
  sums, _ = _exact_sums(bad.astype(jnp.float32))
  if sums is None:
    return jnp.sum(bad, dtype=jnp.int32)
  return jnp.sum(sums.astype(jnp.int32), dtype=jnp.int32)  # int32 under x64 too


def _exact_sums(ones: jax.Array) -> tuple:
  """The sum of a float32 array of 0s and 1s, exactly, as ``(partial sums, elements in
  each)``: one sum for up to 2^24 elements, else one per row of 2^24 (or of the largest power
  of two dividing the size); ``(None, None)`` where those rows would be shorter than 1024
  (slow). Every partial sum is an integer of at most 2^24, so exact in float32 whatever
  order XLA adds in."""
  n = ones.size
  if n <= _EXACT:
    return jnp.sum(ones)[None], n
  row = math.gcd(n, _EXACT)  # a power of two
  return (None, None) if row < 1024 else (jnp.sum(ones.reshape(-1, row), axis=1), row)


_EXACT = 1 << 24  # float32 holds every integer up to 2^24


def nonfinite_count(tree: Any, norm: Optional[jax.Array] = None) -> jax.Array:
  """The number of NaN and infinite elements over all leaves (int32). Counted only when a
  fast test finds some (XLA CPU's integer count of a comparison runs about ten times slower
  than a float sum over the same elements): ``all_finite``, one pass, or, given the tree's
  L2 ``norm`` (already computed), no pass at all: a finite norm means finite elements (a
  norm that overflowed from finite elements only costs the exact count)."""

  def count(leaves):
    counts = [_nonfinite(x) for x in leaves]
    return sum(counts[1:], counts[0]) if counts else zero_count()

  leaves = grouped(jax.tree.leaves(tree))
  fine = all_finite(leaves) if norm is None else jnp.isfinite(norm)
  return cond(fine, lambda _: zero_count(), count, leaves)


def leading_clip_norm(state: Any, through: tuple = ()) -> Optional[jax.Array]:
  """The norm stored by a ``clip_by_global_norm`` that is the *first* step of the
  transformation owning ``state`` (so it measured that transformation's input); else None.

  Follows the first member of chains (plain tuples) and the inner state of scheduled and
  injected hyperparameters, and of the state types in ``through`` (wrappers that hand their
  inner transformation its input unchanged); any other state ends the search.
  """
  while True:
    if isinstance(state, ClipByGlobalNormState):
      return state.global_norm
    if isinstance(state, (InjectHyperparamsState, *through)):  # multi_steps': inner_opt_state
      inner = "inner_opt_state" if hasattr(state, "inner_opt_state") else "inner_state"
      state = getattr(state, inner)
    elif type(state) in (tuple, list) and state:
      state = state[0]
    else:
      return None


def recorded_learning_rate(state: Any) -> Optional[jax.Array]:
  """The learning rate recorded inside ``state`` (the first in tree order, as
  :func:`optcompose.current_hyperparams` finds it: ours or Optax's ``inject_hyperparams``, or
  a scheduled learning rate), or None."""
  return current_hyperparams(state).get("learning_rate")
