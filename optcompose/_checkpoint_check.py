"""Comparing a checkpoint with the template it is restored into (see :mod:`optcompose.checkpoint`).

Saved leaves are keyed by their path of key names, as Flax's state dicts and Orbax's metadata
spell them; the template's paths are made the same way, with :func:`optcompose.tree.key_name`.
"""

from __future__ import annotations

import sys

import os
from typing import Any, NamedTuple, Optional, Union

import jax
import numpy as np

from optcompose import tree as otree

PathLike = Union[str, os.PathLike]


class CheckpointMismatchError(ValueError):
  """The checkpoint does not match the template given to restore it."""

  __module__ = "optcompose.checkpoint"  # defined here for _check; public there


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
  """Orbax's record of a saved Python number (only Orbax's own reads produce one, so Orbax is
  then imported already; nothing is imported here)."""
  metadata = sys.modules.get("orbax.checkpoint.metadata")
  return metadata is not None and isinstance(leaf, metadata.ScalarMetadata)


def _spec(leaf: Any) -> _Spec:
  """The spec of a template leaf, of a leaf read from a msgpack file, or of Orbax metadata."""
  if _is_orbax_scalar(leaf):
    kind = np.dtype(leaf.dtype).kind
    python = next((t for t, kinds in _KIND_OF_PYTHON.items() if kind in kinds), None)
    return _Spec((), np.dtype(leaf.dtype), python)
  if isinstance(leaf, _PYTHON_SCALARS):
    return _Spec((), None, type(leaf))
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
      problems.append(f"{name} is a {type(leaf).__name__} in `target`; a checkpoint holds "
                      "arrays and Python numbers")
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
    if want.python is not None and got.python is None and got.shape == () and (
        got.dtype.kind in _KIND_OF_PYTHON.get(want.python, "")):
      continue  # a Python number in the template: a 0-d array of its kind, kept as saved
    if want.python is not None or got.python is not None:
      if want.python is not got.python:
        problems.append(f"{name} is {got.describe()} in the checkpoint but "
                        f"{want.describe()} in `target`")
    elif got.shape != want.shape:
      problems.append(f"{name} has shape {got.shape} in the checkpoint but {want.shape} "
                      "in `target`")
    elif got.dtype != want.dtype:
      problems.append(f"{name} has dtype {got.dtype} in the checkpoint but {want.dtype} in "
                      "`target` (nothing is cast: build the template with the saved dtype)")
  target_prefixes = {p[:i] for p in target_paths for i in range(len(p))}
  for path in saved:  # leaves that `target` lacks (those related to a target leaf are above)
    if (path not in target_paths and path not in target_prefixes
        and not any(path[:i] in target_paths for i in range(len(path)))):
      problems.append(f"the checkpoint has `{_saved_keystr(path)}`, which `target` lacks")
  return problems


def _check(fn: str, where: PathLike, saved: dict, target: Any) -> None:
  problems = _mismatches(saved, target)
  if problems:
    more = (f" (and {len(problems) - 1} more difference{'s' if len(problems) > 2 else ''})"
            if len(problems) > 1 else "")
    raise CheckpointMismatchError(
        f"{fn}: the checkpoint {os.fspath(where)} does not match `target`: "
        f"{problems[0]}{more}.")


def _like(value: Any, template: Any) -> Any:
  """``value`` (already checked against ``template``) as the kind of object the template is."""
  if isinstance(template, (jax.Array, jax.ShapeDtypeStruct)):
    if isinstance(value, jax.Array):  # Orbax placed it as the template asked
      return value
    sharding = getattr(template, "sharding", None)
    return jax.device_put(np.asarray(value), sharding)  # sharding None: the default device
  if isinstance(template, np.ndarray):
    return np.array(value, copy=True)  # writable, not a view of the file's buffer
  if isinstance(template, np.generic):
    return np.asarray(value)[()]
  if isinstance(value, (np.ndarray, np.generic)):  # a 0-d array for a Python number
    return jax.device_put(value)
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
        "file holds host arrays only: use save_orbax_checkpoint.")
  if state is None or isinstance(state, (np.ndarray, np.generic, jax.Array) + _PYTHON_SCALARS):
    return
  hint = (" (for an nnx.State: save nnx.to_pure_dict(state))"
          if type(state).__module__.startswith("flax.nnx") else "")
  raise TypeError(
      f"save_checkpoint: `{_saved_keystr(path)}` is a {type(state).__name__}, which "
      "flax.serialization does not know how to store. Convert it to a dict of arrays"
      f"{hint}, or register its type with flax.serialization.register_serialization_state.")


def _abstract(leaf: Any, saved: Any) -> Any:
  """The restore request Orbax expects for a template leaf (``saved``: its metadata)."""
  if isinstance(leaf, _PYTHON_SCALARS) and _spec(saved).python is None:
    return jax.ShapeDtypeStruct((), saved.dtype)  # a 0-d array saved for a Python number
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if isinstance(leaf, (np.ndarray, np.generic)):
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)  # Orbax returns NumPy for these
  return leaf  # a Python number
