"""The machinery of :mod:`optcompose.checkpoint`: checking a checkpoint against the template
it is restored into, against the checksums saved with it and the layouts of its FlatParams;
the formats' records (the file handling is in :mod:`optcompose._checkpoint_io`).

Saved leaves are keyed by their path of key names, as Flax's state dicts and Orbax's metadata
spell them; the template's paths are made the same way, with :func:`optcompose.tree.key_name`.
"""

from __future__ import annotations

import os
import sys
import zlib
from typing import Any, NamedTuple, Optional, Union

import jax
import numpy as np

from optcompose import tree as otree
from optcompose.flat import FlatParams

PathLike = Union[str, os.PathLike]


class CheckpointMismatchError(ValueError):
  """The checkpoint does not match the template given to restore it."""

  __module__ = "optcompose.checkpoint"  # defined here for _check; public there


class CheckpointCorruptError(ValueError):
  """The checkpoint is damaged: unreadable, or its data differs from the checksums saved."""

  __module__ = "optcompose.checkpoint"


class _Spec(NamedTuple):
  """What the checks need of a leaf: shape and dtype, or the Python type of a number."""

  shape: tuple
  dtype: Any  # a NumPy dtype; None for a Python value
  python: Optional[type]  # bool, int, float, complex, str, bytes; None for an array

  def describe(self) -> str:
    if self.python is not None:
      return f"a Python {self.python.__name__}"
    return f"an array of shape {self.shape} and dtype {self.dtype}"


_PYTHON_SCALARS = (bool, int, float, complex, str, bytes)
_KIND_OF_PYTHON = {bool: "b", int: "iu", float: "f", complex: "c"}


def _is_orbax_scalar(leaf: Any) -> bool:
  """Orbax's record of a saved Python number (only Orbax's reads make one: nothing imported)."""
  metadata = sys.modules.get("orbax.checkpoint.metadata")
  return metadata is not None and isinstance(leaf, metadata.ScalarMetadata)


def _spec(leaf: Any) -> _Spec:
  """The spec of a template leaf, of a leaf read from a msgpack file, or of Orbax metadata."""
  if _is_orbax_scalar(leaf):
    kind = np.dtype(leaf.dtype).kind
    python = next((t for t, kinds in _KIND_OF_PYTHON.items() if kind in kinds), None)
    return _Spec((), np.dtype(leaf.dtype), python)
  if isinstance(leaf, _PYTHON_SCALARS) and not isinstance(leaf, np.generic):  # np.float64 too
    return _Spec((), None, type(leaf))
  if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)  # a typed key: saved as its bits
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):  # arrays, ShapeDtypeStruct, metadata
    return _Spec(tuple(leaf.shape), np.dtype(leaf.dtype), None)
  raise TypeError(f"cannot describe a leaf of type {type(leaf).__name__}")


def _saved_leaves(saved: Any, prefix: tuple = ()) -> dict:
  """Flatten a restored state dict, or Orbax's metadata tree: {key-name path: leaf}."""
  if isinstance(saved, dict):
    items = saved.items()
  elif isinstance(saved, (list, tuple)):
    items = enumerate(saved)
  elif saved is None:  # an empty node (Orbax writes EmptyState as None)
    return {}
  else:
    return {prefix: saved}
  leaves = {}
  for key, value in items:
    leaves.update(_saved_leaves(value, prefix + (str(key),)))
  return leaves


def _leaves(tree: Any) -> dict:
  """Flatten a pytree: {key-name path: leaf} (for Orbax's metadata tree, as _saved_leaves)."""
  return {
    tuple(otree.key_name(k) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _saved_keystr(path: tuple) -> str:
  """A state-dict path written as the target's paths are: sequence positions as ``[1]``."""
  return "".join(f"[{k}]" if k.isdigit() else f"[{k!r}]" for k in path) or "<root>"


def _mismatches(saved: dict, target: Any) -> list:
  """Every difference between the saved leaves and ``target``'s, in ``target``'s order."""
  saved_prefixes = {p[:i] for p in saved for i in range(len(p))}
  problems, target_paths = [], set()
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    path = tuple(otree.key_name(k) for k in key_path)
    target_paths.add(path)
    name = f"`{otree.path_str(key_path)}`"
    try:
      want = _spec(leaf)
    except TypeError:
      problems.append(
        f"{name} is a {type(leaf).__name__} in `target`; a checkpoint holds "
        "arrays and Python numbers"
      )
      continue
    if path not in saved:
      if path in saved_prefixes:
        problems.append(f"{name} is a subtree in the checkpoint but a leaf in `target`")
      elif any(path[:i] in saved for i in range(len(path))):
        problems.append(f"{name} is inside a leaf of the checkpoint (a subtree in `target`)")
      else:
        problems.append(f"{name} is missing from the checkpoint")
      continue
    got = _spec(saved[path])
    if _number_and_scalar(want, got) or _number_and_scalar(got, want):
      continue  # a Python number on one side, a 0-d array of its kind on the other
    if want.python is not None or got.python is not None:
      if want.python is not got.python:
        problems.append(
          f"{name} is {got.describe()} in the checkpoint but {want.describe()} in `target`"
        )
    elif got.shape != want.shape:
      problems.append(
        f"{name} has shape {got.shape} in the checkpoint but {want.shape} in `target`"
      )
    elif got.dtype != want.dtype:
      problems.append(
        f"{name} has dtype {got.dtype} in the checkpoint but {want.dtype} in "
        "`target` (nothing is cast: build the template with the saved dtype)"
      )
  target_prefixes = {p[:i] for p in target_paths for i in range(len(p))}
  for path in saved:  # leaves that `target` lacks (those related to a target leaf are above)
    if (
      path not in target_paths
      and path not in target_prefixes
      and not any(path[:i] in target_paths for i in range(len(path)))
    ):
      problems.append(f"the checkpoint has `{_saved_keystr(path)}`, which `target` lacks")
  return problems


def _check(fn: str, where: Optional[PathLike], saved: dict, target: Any) -> None:
  """Raise CheckpointMismatchError naming the first difference (``where``: None for none)."""
  problems = _mismatches(saved, target)
  if problems:
    more = (
      f" (and {len(problems) - 1} more difference{'s' if len(problems) > 2 else ''})"
      if len(problems) > 1
      else ""
    )
    name = "" if where is None else f" {os.fspath(where)}"
    raise CheckpointMismatchError(
      f"{fn}: the checkpoint{name} does not match `target`: {problems[0]}{more}."
    )


def _number_and_scalar(number: Any, array: Any) -> bool:
  """A Python number's spec and a 0-d array's of its kind (Flax's ``TrainState`` step: 0)."""
  kinds = _KIND_OF_PYTHON.get(number.python, "")
  return array.python is None and array.shape == () and array.dtype.kind in kinds


def _like(value: Any, template: Any) -> Any:
  """``value`` (already checked against ``template``) as the kind of object the template is."""
  if isinstance(template, (jax.Array, jax.ShapeDtypeStruct)):
    if isinstance(value, jax.Array):  # Orbax placed it as the template asked
      return value
    sharding = getattr(template, "sharding", None)
    dtype = template.dtype if isinstance(value, _PYTHON_SCALARS) else None  # Flax's step 0
    return jax.device_put(np.asarray(value, dtype), sharding)  # sharding None: default device
  if isinstance(template, np.ndarray):
    return np.array(value, copy=True)  # writable, not a view of the file's buffer
  if isinstance(template, np.generic):
    return np.asarray(value)[()]
  if isinstance(value, (np.ndarray, np.generic)):  # a 0-d array for a Python number
    kept = np.asarray(value).dtype  # a jax.Array would narrow int64 / float64 without x64:
    exact = jax.dtypes.canonicalize_dtype(kept) == kept  # then the exact Python number
    return jax.device_put(value) if exact else np.asarray(value).item()
  return value  # a Python value


def _check_storable(state: Any, path: tuple = ()) -> None:
  """Raise a TypeError naming the first entry of a state dict that msgpack cannot store."""
  if type(state) is dict:  # noqa: E721 -- msgpack (strict types) stores exact dicts only
    for key, value in state.items():
      _check_storable(value, path + (key,))
    return
  if isinstance(state, jax.Array) and not state.is_fully_addressable:
    raise ValueError(
      f"save_checkpoint: `{_saved_keystr(path)}` is sharded across processes; a msgpack "
      "file holds host arrays only: use save_orbax_checkpoint."
    )
  if state is None or isinstance(state, (np.ndarray, np.generic, jax.Array) + _PYTHON_SCALARS):
    return
  nnx = type(state).__module__.startswith("flax.nnx")
  hint = " (for an nnx.State: save nnx.to_pure_dict(state))" if nnx else ""
  raise TypeError(
    f"save_checkpoint: `{_saved_keystr(path)}` is a {type(state).__name__}, which "
    "flax.serialization does not know how to store. Convert it to a dict of arrays"
    f"{hint}, or register its type with flax.serialization.register_serialization_state."
  )


def _abstract(leaf: Any, saved: Any) -> Any:
  """The restore request Orbax expects for a template leaf (``saved``: its metadata)."""
  if (number := _spec(saved).python) is not None and not isinstance(leaf, _PYTHON_SCALARS):
    return number()  # a Python number saved for a 0-d array: read as saved
  if isinstance(leaf, _PYTHON_SCALARS) and _spec(saved).python is None:
    return jax.ShapeDtypeStruct((), saved.dtype)  # a 0-d array saved for a Python number
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if isinstance(leaf, (np.ndarray, np.generic)):
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)  # Orbax returns NumPy for these
  return leaf  # a Python number


# ----------------------------------------------------------------------------------------
# Checksums and FlatParams layouts, saved with a checkpoint and compared when restoring.

CHECKSUM = "crc32"  # zlib.crc32 of a leaf's dtype, shape and bytes (the name is stored too)


def _digest(value: Any) -> Optional[int]:
  """The checksum of a leaf; None for an array sharded across processes (no host holds it)."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return None
  if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    value = jax.random.key_data(value)  # a typed PRNG key (an NNX model's Rngs): its bits
  array = np.ascontiguousarray(np.asarray(value))  # Python numbers: NumPy's default dtypes
  header = zlib.crc32(f"{array.dtype.name}{array.shape}".encode())
  # An ndarray is a buffer; NumPy's stubs declare it only for Python 3.12 and later.
  return zlib.crc32(array.reshape(-1).view(np.uint8), header)  # pyrefly: ignore[bad-argument-type]


def _checksums(leaves: dict) -> list:
  """``[[path, checksum], ...]`` for ``{key-name path: leaf}`` (JSON and msgpack friendly)."""
  return [[list(path), _digest(value)] for path, value in leaves.items()]


def _damaged_record(fn: str, where: PathLike, record: str, why: str) -> CheckpointCorruptError:
  return CheckpointCorruptError(
    f"{fn}: the checkpoint {os.fspath(where)} is damaged: its {record} record is "
    f"unreadable ({why})."
  )


def _entries(fn: str, where: PathLike, record: str, saved: Any, expected: str) -> list:
  """The ``[path, value]`` pairs of a saved record (checksums or layouts), after checking that
  it is a list of such pairs with ``path`` a list of key names.

  Raises:
    CheckpointCorruptError: naming the checkpoint and the record (the file's header was
      damaged or written by something else).
  """
  if not isinstance(saved, (list, tuple)):
    raise _damaged_record(
      fn, where, record, f"expected a list of {expected}, got {type(saved).__name__}"
    )
  for i, entry in enumerate(saved):
    if not (
      isinstance(entry, (list, tuple))
      and len(entry) == 2
      and isinstance(entry[0], (list, tuple))
      and all(isinstance(k, str) for k in entry[0])
    ):
      raise _damaged_record(fn, where, record, f"entry {i} is {entry!r:.80}, expected {expected}")
  return [(tuple(path), value) for path, value in saved]


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _verify(fn: str, where: PathLike, checksums: list, leaves: dict) -> None:
  """Raise CheckpointCorruptError naming the first leaf whose data differs from its checksum.

  A ``None`` checksum (an array sharded across processes when saved) and a leaf restored
  sharded across processes are not compared. A checksum record that is not a list of
  ``[path, checksum]`` pairs is reported as damaged.
  """
  expected = "[path, checksum] pairs (a checksum: an unsigned 32-bit int or null)"
  table = dict(_entries(fn, where, "checksum", checksums, expected))
  for path, digest in table.items():
    if digest is not None and not (_is_int(digest) and 0 <= digest < 2**32):
      raise _damaged_record(
        fn,
        where,
        "checksum",
        f"the checksum of `{_saved_keystr(path)}` is {digest!r:.80}, expected {expected}",
      )
  for path in [p for p in table if p not in leaves] + [p for p in leaves if p not in table]:
    raise CheckpointCorruptError(
      f"{fn}: the checkpoint {os.fspath(where)} is damaged: `{_saved_keystr(path)}` is "
      f"{'missing from its data' if path in table else 'not in its checksum table'}."
    )
  for path, value in leaves.items():
    got = None if table[path] is None else _digest(value)
    if got is not None and got != table[path]:
      raise CheckpointCorruptError(
        f"{fn}: the checkpoint {os.fspath(where)} is damaged: the data of "
        f"`{_saved_keystr(path)}` does not match the checksum saved with it ({CHECKSUM} "
        f"{got:#010x}, expected {table[path]:#010x})."
      )


def _layouts(tree: Any) -> list:
  """``[[path, layout], ...]`` for every FlatParams in ``tree``; a layout lists each model
  leaf as ``[path, shape, bucket, dtype, offset]``."""
  found = []
  for key_path, node in jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: isinstance(x, FlatParams)
  )[0]:
    if isinstance(node, FlatParams):
      layout = node.layout
      found.append(
        [
          [otree.key_name(k) for k in key_path],
          [
            [
              leaf.path,
              [int(n) for n in leaf.shape],
              layout.buckets[leaf.bucket],
              np.dtype(layout.dtypes[leaf.bucket]).name,
              int(leaf.offset),
            ]
            for leaf in layout.leaves
          ],
        ]
      )
  return found


def _is_layout_leaf(entry: Any) -> bool:
  """Whether ``entry`` is a layout's ``[path, shape, bucket, dtype, offset]``."""
  return (
    isinstance(entry, (list, tuple))
    and len(entry) == 5
    and isinstance(entry[0], str)
    and isinstance(entry[1], (list, tuple))
    and all(_is_int(n) for n in entry[1])
    and isinstance(entry[2], str)
    and isinstance(entry[3], str)
    and _is_int(entry[4])
  )


def _check_layouts(fn: str, where: PathLike, saved: list, target: Any) -> None:
  """Raise CheckpointMismatchError if a FlatParams of ``target`` has another layout than the
  one saved at its path (checkpoints that record none are not compared), and
  CheckpointCorruptError if the saved layouts record is not a list of ``[path, layout]``."""
  expected = "[path, layout] pairs (a layout: a list of [path, shape, bucket, dtype, offset])"
  entries = _entries(fn, where, "layouts", saved, expected)
  for path, layout in entries:
    if not (isinstance(layout, (list, tuple)) and all(_is_layout_leaf(e) for e in layout)):
      raise _damaged_record(
        fn,
        where,
        "layouts",
        f"the layout of `{_saved_keystr(path)}` is {layout!r:.80}, expected {expected}",
      )
  by_path = {path: [list(leaf) for leaf in layout] for path, layout in entries}
  for path, want in _layouts(target):
    got = by_path.get(tuple(path))
    if got is None or got == want:
      continue
    i = next(i for i in range(max(len(got), len(want))) if got[i : i + 1] != want[i : i + 1])
    g, w = (got[i] if i < len(got) else None), (want[i] if i < len(want) else None)
    describe = lambda e: (
      "no leaf"
      if e is None
      else f"`{e[0]}` of shape {tuple(e[1])} at offset {e[4]} of bucket {e[2]!r}"
    )
    raise CheckpointMismatchError(
      f"{fn}: the checkpoint {os.fspath(where)} does not match `target`: the FlatParams at "
      f"`{_saved_keystr(tuple(path))}` has another layout: its leaf {i} is {describe(g)} in "
      f"the checkpoint but {describe(w)} in `target` (a FlatParams restores only into the "
      "layout it was saved with: build the template with flat_params of the same tree)."
    )


# ----------------------------------------------------------------------------------------
# The formats: msgpack header and FlatParams in it; Orbax's sidecar, metadata and errors.

FORMAT_KEY, FORMAT = "__optcompose_checkpoint__", 2  # msgpack files; 1 was the bare state dict
