"""What each checkpoint format can store and read back (the module is private; its functions
are :mod:`optcompose.checkpoint`'s): the leaf checks made before a save writes anything, so
that a leaf a format would store wrongly, or not read back, is a TypeError naming its path
while the previous checkpoint is still whole.

Msgpack (Flax's serialization) stores an array as its shape, its dtype's name and its bytes,
and reads it back with ``np.dtype(name)``: an array round-trips when that name gives its dtype
back (not so for strings, ``float0``, structured or big-endian arrays), and a Python int when
it fits in 64 bits. Orbax writes arrays through TensorStore, which knows fewer dtypes (no
``uint4``, no strings or dates) and no empty arrays; and it cannot save into a path with ``[``
in it (it finds its own files again with a glob, which reads ``[...]`` as a pattern).
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Optional

import jax
import numpy as np

from optcompose._checkpoint_check import _PYTHON_SCALARS, _namer
from optcompose._checkpoint_guard import creatable

_INT_RANGE = (-(2**63), 2**64 - 1)  # what both formats store of a Python int


def _common_problem(leaf: Any) -> Optional[str]:
  """What keeps either format from storing the array or number ``leaf`` (None: nothing)."""
  if isinstance(leaf, jax.Array) and leaf.is_deleted():
    return (
      "a deleted jax.Array (donated to a jitted step, say), whose values are gone: save "
      "the arrays before the step that donates them, or save that step's outputs"
    )
  if isinstance(leaf, int) and not isinstance(leaf, bool):
    if not _INT_RANGE[0] <= leaf <= _INT_RANGE[1]:
      return (
        f"the Python int {leaf}, wider than 64 bits, which a checkpoint does not store: "
        "store it as a float, or as several ints"
      )
    return None
  dtype = getattr(leaf, "dtype", None)
  if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return None
  dtype = np.dtype(dtype)
  if dtype.hasobject:
    return "a NumPy array of Python objects, which a checkpoint does not store"
  if dtype == np.dtype(jax.dtypes.float0):
    return (
      "a float0 array (the gradient of an integer or a key), which holds no values: leave "
      "it out of the saved tree"
    )
  if dtype.kind in "US":
    return f"an array of strings ({dtype}): store a string as a Python str, or encode it"
  return None


def _msgpack_problem(leaf: Any) -> Optional[str]:
  """What keeps a msgpack file from storing ``leaf`` and reading it back (None: nothing)."""
  problem = _common_problem(leaf)
  if problem is not None or isinstance(leaf, _PYTHON_SCALARS) or leaf is None:
    return problem
  dtype = np.dtype(leaf.dtype)
  try:
    back = np.dtype(dtype.name)  # how Flax reads the dtype back (bfloat16 by its name too)
  except TypeError:
    back = None
  if back == dtype:
    return None
  if dtype.kind in "biufc" and not dtype.isnative:
    how = "convert it with .astype(x.dtype.newbyteorder('='))"
  else:
    how = "convert it to an array of numbers"
  return f"an array of dtype {dtype}, which a msgpack file does not read back: {how}"


def _check_storable(state: Any, tree: Any, path: tuple = ()) -> None:
  """Raise a TypeError naming the first entry of the state dict of ``tree`` that msgpack
  cannot store and read back (its path written as ``tree``'s paths are)."""
  if type(state) is dict:  # noqa: E721 -- msgpack (strict types) stores exact dicts only
    for key, value in state.items():
      _check_storable(value, tree, path + (key,))
    return
  if state is None or isinstance(state, (np.ndarray, np.generic, jax.Array) + _PYTHON_SCALARS):
    problem = _msgpack_problem(state)
    if problem is not None:
      raise TypeError(f"save_checkpoint: `{_namer(tree)(path)}` is {problem}.")
    if isinstance(state, jax.Array) and not state.is_fully_addressable:
      raise ValueError(
        f"save_checkpoint: `{_namer(tree)(path)}` is sharded across processes; a msgpack "
        "file holds host arrays only: use save_orbax_checkpoint."
      )
    return
  nnx = type(state).__module__.startswith("flax.nnx")
  hint = " (for an nnx.State: save nnx.to_pure_dict(state))" if nnx else ""
  raise TypeError(
    f"save_checkpoint: `{_namer(tree)(path)}` is a {type(state).__name__}, which "
    "flax.serialization does not know how to store. Convert it to a dict of arrays"
    f"{hint}, or register its type with flax.serialization.register_serialization_state."
  )


# ----------------------------------------------------------------------------------------
# Orbax (StandardCheckpointer).

# What Orbax's StandardCheckpointer stores (it refuses str, bytes and complex Python numbers).
_ORBAX_LEAVES = (jax.Array, np.ndarray, np.generic, bool, int, float)


@functools.lru_cache(maxsize=None)
def _tensorstore_knows(dtype: np.dtype) -> bool:
  """Whether TensorStore (Orbax's array store) has ``dtype`` (True where it cannot be asked)."""
  try:
    import tensorstore
  except ImportError:  # an Orbax without it: let Orbax say
    return True
  try:
    tensorstore.dtype(dtype.name)
  except (ValueError, TypeError):
    return False
  return True


def _orbax_problem(leaf: Any) -> Optional[str]:
  """What keeps Orbax from storing the array or number ``leaf`` (None: nothing)."""
  problem = _common_problem(leaf)
  if problem is not None or isinstance(leaf, (bool, int, float)):
    return problem
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return None  # Orbax stores a typed key as its bits
  dtype = np.dtype(leaf.dtype)
  if not _tensorstore_knows(dtype):
    return (
      f"an array of dtype {dtype}, which Orbax (TensorStore) does not store: convert it to a "
      "dtype it stores (int8 for uint4, say), or save with save_checkpoint"
    )
  if np.size(leaf) == 0:
    return f"an empty array (shape {tuple(np.shape(leaf))}), which Orbax does not store"
  return None


def orbax_storable(fn: str, tree: Any, directory: Any = None) -> Any:
  """Raise before anything is written: a TypeError naming the first leaf Orbax cannot store,
  or a ValueError where ``directory`` has ``[`` in it (Orbax would write a checkpoint
  without its arrays there, and report success) or cannot be created (``creatable``).
  Return ``tree`` with each NumPy scalar that is no Python number (``np.float32(1)``,
  ``np.bool_``) as a 0-d array: what Orbax 0.12 stores it as, and Orbax 0.10 refuses
  ("Unsupported type") when given the scalar."""
  text = "" if directory is None else os.fspath(directory)
  if isinstance(directory, pathlib.Path):  # a local one
    creatable(fn, directory)
  if "[" in text:  # a lone "]" is no pattern: Orbax saves and restores such a path
    raise ValueError(
      f"{fn}: the path {text} has a '[' in it, and Orbax cannot save under such a "
      "path (its glob for its own files reads brackets as a pattern, so the checkpoint "
      "would lack its arrays): use another name, e.g. with '_' or '-' instead of the brackets "
      "('run_lr=0.1' for 'run[lr=0.1]')."
    )
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(key_path)
    if not isinstance(leaf, _ORBAX_LEAVES):
      hint = (
        "keep the arrays only (an Equinox model: eqx.filter(model, eqx.is_array))"
        if callable(leaf)
        else "convert it to an array, or save with save_checkpoint (msgpack stores strings too)"
      )
      raise TypeError(
        f"{fn}: `{name}` is a {type(leaf).__name__}, which Orbax "
        f"does not store (arrays, NumPy values and Python bool, int and float only): {hint}."
      )
    problem = _orbax_problem(leaf)
    if problem is not None:
      raise TypeError(f"{fn}: `{name}` is {problem}.")
  return jax.tree.map(_as_orbax_leaf, tree)


def _as_orbax_leaf(leaf: Any) -> Any:
  """A NumPy scalar that is no Python number as a 0-d array (as Orbax 0.12 converts it)."""
  if isinstance(leaf, np.generic) and not isinstance(leaf, (int, float)):
    return np.asarray(leaf)
  return leaf
