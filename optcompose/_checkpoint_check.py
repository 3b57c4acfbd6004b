"""The machinery of :mod:`optcompose.checkpoint`: checking a checkpoint against the template
it is restored into and against the checksums saved with it; the formats' records (the
FlatParams layouts are in :mod:`optcompose._checkpoint_nodes`, the file handling in
:mod:`optcompose._checkpoint_io`).

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
_DTYPES_OF_PYTHON = {
  bool: np.bool_,
  int: np.integer,
  float: np.floating,
  complex: np.complexfloating,
}


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


def _namer(tree: Any):
  """A function writing a saved key-name path as ``tree``'s paths are written (jax's
  ``keystr``: ``['opt'][0].mu['w']``, not ``['opt'][0]['mu']['w']``): its longest prefix
  that ``tree`` has, then the rest as :func:`_saved_keystr` writes it."""
  known: dict = {(): ""}
  for key_path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    for i in range(1, len(key_path) + 1):
      names = tuple(otree.key_name(k) for k in key_path[:i])
      known.setdefault(names, jax.tree_util.keystr(tuple(key_path[:i])))

  def name(path: tuple) -> str:
    i = max(i for i in range(len(path) + 1) if path[:i] in known)
    return (known[path[:i]] + (_saved_keystr(path[i:]) if i < len(path) else "")) or "<root>"

  return name


_PADDING = (
  " (a FlatParams bucket: its length includes the zeros that pad it to `pad_to`; was the "
  "state saved with another pad_to, for another device count? Build the template with the "
  "saved one: docs/guides/checkpoints-at-scale.md, 'Another device count')"
)


def _mismatches(
  saved: dict, target: Any, theirs: str = "the checkpoint", ours: str = "`target`"
) -> list:
  """Every difference between the saved leaves and ``target``'s, in ``target``'s order
  (``theirs`` and ``ours`` name the two in the messages)."""
  from optcompose.flat import FlatParams  # flat imports no checkpoint module

  saved_prefixes = {p[:i] for p in saved for i in range(len(p))}
  problems, target_paths = [], set()
  nodes = jax.tree_util.tree_flatten_with_path(target, is_leaf=lambda x: isinstance(x, FlatParams))
  flat = [tuple(map(otree.key_name, kp)) for kp, x in nodes[0] if isinstance(x, FlatParams)]
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    path = tuple(otree.key_name(k) for k in key_path)
    target_paths.add(path)
    name = f"`{otree.path_str(key_path)}`"
    try:
      want = _spec(leaf)
    except TypeError:
      problems.append(
        f"{name} is a {type(leaf).__name__} in {ours}; a checkpoint holds arrays and Python numbers"
      )
      continue
    if path not in saved:
      if path in saved_prefixes:
        problems.append(f"{name} is a subtree in {theirs} but a leaf in {ours}")
      elif any(path[:i] in saved for i in range(len(path))):
        problems.append(f"{name} is inside a leaf of {theirs} (a subtree in {ours})")
      else:
        problems.append(f"{name} is missing from {theirs}")
      continue
    got = _spec(saved[path])
    if _number_and_scalar(want, got) or _number_and_scalar(got, want):
      continue  # a Python number on one side, a 0-d array of its kind on the other
    if want.python is not None or got.python is not None:
      if want.python is not got.python:
        problems.append(f"{name} is {got.describe()} in {theirs} but {want.describe()} in {ours}")
    elif got.shape != want.shape:
      bucket = any(path[: len(f)] == f for f in flat) and len(got.shape) == len(want.shape) == 1
      problems.append(
        f"{name} has shape {got.shape} in {theirs} but {want.shape} in {ours}"
        + (_PADDING if bucket and ours == "`target`" else "")
      )
    elif got.dtype != want.dtype:
      cast = " (nothing is cast: build the template with the saved dtype)"
      a, b = got.dtype, want.dtype
      if jax.dtypes.canonicalize_dtype(b) != b:  # a dtype no JAX array has now: NumPy's
        cast = (
          f" (the template holds a NumPy {b} array there, which JAX keeps in 32 bits without "
          "x64: build that leaf with jax.numpy, as tx.init does; nothing is cast)"
        )
      elif {a.itemsize, b.itemsize} == {4, 8} and a.kind == b.kind:
        cast = (
          " (saved with jax_enable_x64 set otherwise than now? Restore with x64 set as when "
          "saving: nothing is cast)"
        )
      problems.append(
        f"{name} has dtype {got.dtype} in {theirs} but {want.dtype} in {ours}"
        + (cast if ours == "`target`" else "")
      )
  target_prefixes = {p[:i] for p in target_paths for i in range(len(p))}
  namer = None  # built once, on the first leaf `target` lacks (it walks the whole target)
  for path in saved:  # leaves that `target` lacks (those related to a target leaf are above)
    if (
      path not in target_paths
      and path not in target_prefixes
      and not any(path[:i] in target_paths for i in range(len(path)))
    ):
      namer = namer or _namer(target)
      problems.append(f"{theirs} has `{namer(path)}`, which {ours} lacks")
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
    hint = ""
    if " lacks" in problems[0] and " has `" in problems[0]:  # `target` is part of the tree
      hint = (
        " (To read part of a checkpoint, e.g. the weights of a run that also saved its "
        "optimizer state, read it without a template and check the part against one: see "
        "'Reading part of a checkpoint' in docs/guides/checkpoints.md.)"
      )
    elif " is missing" in problems[0] or " lacks" in problems[0]:
      hint = (
        " (Was the optimizer, or a wrapper around it, changed since the save? An Optax "
        "optimizer's state converts with optcompose.migrate.from_optax_state: read it "
        "without a template first.)"
      )
    raise CheckpointMismatchError(
      f"{fn}: the checkpoint{name} does not match `target`: {problems[0]}{more}.{hint}"
    )


def _number_and_scalar(number: Any, array: Any) -> bool:
  """A Python number's spec and a 0-d array's of its kind (Flax's ``TrainState`` step: 0)."""
  kind = _DTYPES_OF_PYTHON.get(number.python)  # issubdtype: bfloat16 is of NumPy kind "V"
  return (
    kind is not None
    and array.python is None
    and array.shape == ()
    and (jax.dtypes.issubdtype(array.dtype, kind))
  )


def _like(value: Any, template: Any) -> Any:
  """``value`` (already checked against ``template``) as the kind of object the template is."""
  if isinstance(template, (jax.Array, jax.ShapeDtypeStruct)):
    if isinstance(value, jax.Array):  # Orbax placed it as the template asked
      return value
    sharding = concrete(getattr(template, "sharding", None))
    dtype = template.dtype if isinstance(value, _PYTHON_SCALARS) else None  # Flax's step 0
    return jax.device_put(np.asarray(value, dtype), sharding)  # sharding None: default device
  number = isinstance(value, _PYTHON_SCALARS) and not isinstance(value, np.generic)
  if isinstance(template, np.ndarray):  # writable, not a view of the file's buffer:
    return np.array(value, template.dtype if number else None, copy=True)
  if isinstance(template, np.generic):
    return np.asarray(value, template.dtype if number else None)[()]
  if isinstance(value, (np.ndarray, np.generic)):  # a 0-d array for a Python number
    kept = np.asarray(value).dtype  # a jax.Array would narrow int64 / float64 without x64:
    exact = jax.dtypes.canonicalize_dtype(kept) == kept  # then the exact Python number
    return jax.device_put(value) if exact else np.asarray(value).item()
  return value  # a Python value


def concrete(sharding: Any) -> Any:
  """``sharding``, a NamedSharding on an abstract mesh (``jax.eval_shape``'s on explicit axes)
  made one on the mesh of ``jax.set_mesh`` (a placement needs devices)."""
  mesh, abstract = getattr(sharding, "mesh", None), getattr(jax.sharding, "AbstractMesh", ())
  if not isinstance(mesh, abstract):
    return sharding
  current = getattr(jax.sharding, "get_mesh", lambda: None)()  # JAX 0.7 and later
  if current is None or getattr(current, "abstract_mesh", None) != mesh:
    raise ValueError(
      f"restoring: a template leaf is placed on an abstract mesh ({mesh}), as jax.eval_shape "
      "places it on explicit axes, and no mesh of those axes is set: restore inside "
      "`with jax.set_mesh(mesh):`, or give the leaf NamedSharding(mesh, spec)."
    )
  return jax.sharding.NamedSharding(current, sharding.spec, memory_kind=sharding.memory_kind)


def _abstract(leaf: Any, saved: Any) -> Any:
  """The restore request Orbax expects for a template leaf (``saved``: its metadata)."""
  if (number := _spec(saved).python) is not None and not isinstance(leaf, _PYTHON_SCALARS):
    return number()  # a Python number saved for a 0-d array: read as saved
  if isinstance(leaf, _PYTHON_SCALARS) and _spec(saved).python is None:
    return jax.ShapeDtypeStruct((), saved.dtype)  # a 0-d array saved for a Python number
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=concrete(leaf.sharding))
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if isinstance(leaf, (np.ndarray, np.generic)):
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)  # Orbax returns NumPy for these
  return leaf  # a Python number


# ----------------------------------------------------------------------------------------
# Checksums, saved with a checkpoint and compared when restoring (the FlatParams layouts:
# optcompose._checkpoint_nodes).

CHECKSUM = "crc32"  # zlib.crc32 of a leaf's dtype, shape and bytes (the name is stored too)


def _digest(value: Any) -> Optional[int]:
  """The checksum of a leaf; None for an array sharded across processes (no host holds it;
  a replicated one is summed from this process' copy)."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    if not value.is_fully_replicated:
      return None
    value = value.addressable_data(0)
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
  problem = _record_problem(saved, expected)
  if problem is not None:
    raise _damaged_record(fn, where, record, problem)
  return [(tuple(path), value) for path, value in saved]


def _record_problem(saved: Any, expected: str) -> Optional[str]:
  """What keeps ``saved`` from being a list of ``[path, value]`` pairs, ``path`` a list of
  key names (None: nothing)."""
  if not isinstance(saved, (list, tuple)):
    return f"expected a list of {expected}, got {type(saved).__name__}"
  for i, entry in enumerate(saved):
    if not (
      isinstance(entry, (list, tuple))
      and len(entry) == 2
      and isinstance(entry[0], (list, tuple))
      and all(isinstance(k, str) for k in entry[0])
    ):
      return f"entry {i} is {entry!r:.80}, expected {expected}"
  return None


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


# ----------------------------------------------------------------------------------------
# The formats: msgpack header and FlatParams in it; Orbax's sidecar, metadata and errors.

FORMAT_KEY, FORMAT = "__optcompose_checkpoint__", 2  # msgpack files; 1 was the bare state dict
