"""How the property kit compares two runs and two states: values to a few ulps of each
leaf's own scale, typed PRNG keys by their data, and layouts (tree, shapes, dtypes as held,
shardings)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree


def _tolerance(dtype, ulps: Optional[int] = None) -> float:
  """Relative tolerance for two compilations of the same math: a few ulps of the dtype (32
  of a 32- or 64-bit float, 8 of a 16-bit one, whose ulp is already 2^-8 or 2^-11 of the
  value; this project's registry measured at most 1.5 and 0.5 of them on CPU)."""
  if not jnp.issubdtype(dtype, jnp.inexact):
    return 0.0
  if ulps is None:
    ulps = 8 if jnp.finfo(dtype).bits <= 16 else 32
  return ulps * float(jnp.finfo(dtype).eps)


def _loosest_tolerance(trees) -> list:
  """Per leaf of ``trees`` (``(params, state, updates)``), in order: 4 ulps of the least
  precise floating dtype among the leaves of its parameter (the leaves whose path ends in
  that parameter's path: its moments, its update), since a float32 update computed from a
  bfloat16 moment differs where XLA kept the moment in float32 (this project's registry: at
  most 0.02 bfloat16 ulps); for a leaf of no one parameter (a count, a global norm), among
  all leaves. A leaf's own dtype may allow more (:func:`_tolerance`)."""
  leaves = jax.tree_util.tree_flatten_with_path(trees)[0]
  names = [tuple(map(str, path)) for path, _ in leaves]
  tol = [_tolerance(_held_dtype(x), 4) for _, x in leaves]
  params = {name[1:] for name in names if name[:1] == ("[0]",)}
  groups = [next((n[k:] for k in range(1, len(n)) if n[k:] in params), None) for n in names]
  loosest: dict = {None: max(tol, default=0.0)}
  for group, t in zip(groups, tol):
    if group is not None:
      loosest[group] = max(loosest.get(group, 0.0), t)
  return [loosest[group] for group in groups]


def _is_key(x) -> bool:
  """Whether ``x`` is a typed PRNG key array (``jax.random.key``), which NumPy cannot hold."""
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _finite_max(x: np.ndarray) -> float:
  return float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0))


def _assert_trees_close(got, want, what: str, rtol: Optional[list] = None) -> None:
  """Leaf by leaf, the same shape and dtype, and values to ``rtol`` (or the leaf dtype's
  :func:`_tolerance`) of the leaf's own largest magnitude: scale-free, so a wrong update of
  size 1e-6 is not hidden by an absolute bound (the bound had a floor of 1: 3.8e-6 in
  float32, 0.06 in bfloat16, and a doubled step of lr 1e-2 passed in bfloat16). Differences
  below the dtype's smallest normal number are not counted (XLA CPU flushes subnormals in
  some programs and not in others). Integers, booleans and PRNG keys: equal."""
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  want_leaves = jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves), (
    f"{what}: {len(got_leaves)} leaves, not {len(want_leaves)}"
  )
  for i, ((path, a), b) in enumerate(zip(got_leaves, want_leaves)):
    where = f"{what}{otree.path_str(path)}"
    if _is_key(a) or _is_key(b):
      assert _is_key(a) and _is_key(b) and a.dtype == b.dtype and a.shape == b.shape, (
        f"{where}: {a.dtype}{list(jnp.shape(a))} against {b.dtype}{list(jnp.shape(b))}"
      )
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (
      f"{where}: {a.dtype}{list(a.shape)} against {b.dtype}{list(b.shape)}"
    )
    if a.dtype.kind in "fc" or str(a.dtype) == "bfloat16":
      tol = max(_tolerance(a.dtype), rtol[i] if rtol else 0.0)
      a64, b64 = (
        a.astype(np.complex128 if a.dtype.kind == "c" else np.float64),
        b.astype(np.complex128 if a.dtype.kind == "c" else np.float64),
      )
      scale = max(_finite_max(a64), _finite_max(b64))
      tiny = float(jnp.finfo(a.dtype).tiny)
      np.testing.assert_allclose(a64, b64, rtol=tol, atol=max(tol * scale, tiny), err_msg=where)
    else:
      np.testing.assert_array_equal(a, b, err_msg=where)


def _held_dtype(x):
  """The dtype ``x`` holds: a NumPy array's own (float64 stays float64 where JAX, without
  x64, would make it float32 at the first jitted step), else JAX's."""
  return np.dtype(x.dtype) if isinstance(x, (np.ndarray, np.generic)) else jnp.result_type(x)


def _layout(tree):
  return [
    (otree.path_str(p), jnp.shape(x), _held_dtype(x), getattr(x, "sharding", None))
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def _assert_same_tree(tree, reference, what: str, reference_what: str) -> None:
  assert jax.tree.structure(tree) == jax.tree.structure(reference), (
    f"{what} does not have the tree of {reference_what}: {otree.first_difference(tree, reference)}"
  )


def _assert_jax_dtypes(state, made_by: str = "init") -> None:
  """No leaf of ``state`` is a NumPy array of a dtype JAX does not keep (float64 or int64
  without x64): it would change dtype at the first jitted step, and a checkpoint restored
  into a fresh ``init`` would not match."""
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(x, (np.ndarray, np.generic)) and np.dtype(x.dtype) != jnp.result_type(x):
      raise AssertionError(
        f"{made_by} returned a NumPy {x.dtype} array at state{otree.path_str(path)}, which JAX "
        f"holds as {jnp.result_type(x)} (jax_enable_x64 is off): the state changes dtype at "
        "the first step. Build it with jax.numpy (jnp.zeros_like(p)) or in the dtype JAX keeps."
      )


def _assert_layout_kept(state, state0, label: str) -> None:
  """``state`` has the tree, shapes, dtypes and shardings of ``state0``."""
  _assert_same_tree(state, state0, f"{label}: the state", "the state from init")
  for (path, shape, dtype, sharding), (_, shape0, dtype0, sharding0) in zip(
    _layout(state), _layout(state0)
  ):
    assert (shape, dtype) == (shape0, dtype0), (
      f"{label}: state{path} became {dtype}{list(shape)} from {dtype0}{list(shape0)}"
    )
    if sharding is not None and sharding0 is not None:
      assert sharding.is_equivalent_to(sharding0, len(shape)), (
        f"{label}: state{path} moved from {sharding0} to {sharding}"
      )
