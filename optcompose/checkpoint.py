"""Checkpoints: save a training run and resume it exactly, without pickle.

Everything that changes while training -- parameters, moments, step counts, the position of
every schedule, early-stopping records -- is a pytree of arrays, and the optimizer object
itself holds none (see :mod:`optcompose._core`). A checkpoint is therefore just a pytree,
and resuming is rebuilding the same objects from code and filling in their arrays::

    from optcompose.checkpoint import save_checkpoint, restore_checkpoint

    save_checkpoint("run/ckpt.msgpack", {"params": params, "opt_state": opt_state, "step": step})

    # Later, in a new process: rebuild the optimizer and a template of the same structure.
    tx = make_optimizer()                        # the same code as before
    params = init_params()                       # any values: only the structure is used
    template = {"params": params, "opt_state": tx.init(params), "step": 0}
    run = restore_checkpoint("run/ckpt.msgpack", template)
    params, opt_state, step = run["params"], run["opt_state"], run["step"]

The template fixes the structure, every leaf's shape and dtype, and the type each leaf comes
back as: a ``jax.Array`` leaf comes back as a ``jax.Array`` placed with the template leaf's
sharding, a NumPy leaf as NumPy, a Python number as a Python number. A Python number in the
template also accepts a saved 0-d array of its kind (integer, floating, bool), which comes
back as a ``jax.Array`` with its saved dtype: Flax's ``TrainState.create`` starts ``step`` at
the Python int 0, and a jitted step makes it an int32 array. Leaves may be
``jax.ShapeDtypeStruct``, so ``jax.eval_shape(tx.init, params)`` is a template that costs no
memory (give the structs shardings to place the restored arrays).

**Checks.** Restoring compares the checkpoint with the template before anything is built and
raises :class:`CheckpointMismatchError` (a ``ValueError``) naming the first path that differs,
as ``jax.tree_util.keystr`` writes it (``['opt_state'][1][0].mu['dense']['kernel']``): a
leaf missing from the checkpoint, a leaf the template lacks, a different shape, a different
dtype. Nothing is cast or broadcast: a bfloat16 moment does not load into a float32 template,
and an int32 count does not load into an int64 one.

**Msgpack files** (:func:`save_checkpoint`, :func:`restore_checkpoint`). One file holding
``flax.serialization.to_state_dict(tree)`` in Flax's msgpack encoding: NamedTuple states
become dicts keyed by field name, tuples dicts keyed ``"0"``, ``"1"``, ...; arrays are stored
as shape, dtype name and raw bytes, so bfloat16 values and int32 counts come back bit for bit.
The file is written to a temporary file in the same directory, flushed to disk and renamed
over the destination (``os.replace``): a crash leaves the old checkpoint or the new one, never
half of one. ``flax.serialization.from_bytes(template, data)`` also reads these files (without
the checks). Good for states that fit in host memory, on one process.

**Orbax directories** (:func:`save_orbax_checkpoint`, :func:`restore_orbax_checkpoint`). The
same through ``orbax.checkpoint.StandardCheckpointer``, which writes a directory of
TensorStore arrays and handles arrays sharded across devices and processes. Orbax on its own
casts a stored array to whatever dtype the template asks for; these wrappers first compare
Orbax's stored metadata with the template, with the checks above. Plain Orbax, for
reference::

    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:       # paths must be absolute
      checkpointer.save(os.path.abspath("run/step_12"), tree)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.restore(os.path.abspath("run/step_12"), abstract)

Neither path uses pickle. Flax and Orbax are optional dependencies: they are imported when a
function here is first called.

What a checkpoint cannot hold: the optimizer's code (rebuild it), Python objects other than
numbers, strings and ``None``, and containers that Flax's serialization does not know (for
``nnx.State`` save ``nnx.to_pure_dict(state)`` and restore with ``nnx.replace_by_pure_dict``).
:class:`~optcompose.FlatParams` is supported (its buckets are stored by name).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import uuid
from typing import Any, NamedTuple, Optional, Union

import jax
import numpy as np

from optcompose import tree as otree
from optcompose.flat import FlatParams

__all__ = [
    "CheckpointMismatchError", "save_checkpoint", "restore_checkpoint", "save_orbax_checkpoint",
    "restore_orbax_checkpoint",
]

PathLike = Union[str, os.PathLike]


class CheckpointMismatchError(ValueError):
  """The checkpoint does not match the template given to restore it."""


# ----------------------------------------------------------------------------------------
# Optional dependencies, imported on first use.


def _flax_serialization():
  try:
    from flax import serialization
  except ImportError as e:
    raise ImportError(
        "optcompose.checkpoint: msgpack checkpoints need Flax (`pip install flax`), which "
        "provides flax.serialization.") from e
  if not serialization.is_serializable(FlatParams):
    serialization.register_serialization_state(FlatParams, _flat_to_state_dict,
                                               _flat_from_state_dict)
  return serialization


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise ImportError(
        "optcompose.checkpoint: Orbax checkpoints need orbax-checkpoint "
        "(`pip install orbax-checkpoint`).") from e
  return ocp


def _flat_to_state_dict(flat: FlatParams) -> dict:
  from flax import serialization
  return {name: serialization.to_state_dict(buf)
          for name, buf in zip(flat.layout.buckets, flat.buffers)}


def _flat_from_state_dict(flat: FlatParams, state: dict) -> FlatParams:
  from flax import serialization
  return FlatParams(tuple(serialization.from_state_dict(buf, state[name], name=name)
                          for name, buf in zip(flat.layout.buckets, flat.buffers)),
                    flat.layout)


# ----------------------------------------------------------------------------------------
# Comparing what was saved with the template.


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


def _spec(leaf: Any) -> _Spec:
  """The spec of a template leaf, of a leaf read from a msgpack file, or of Orbax metadata."""
  if type(leaf).__name__ == "ScalarMetadata":  # Orbax's record of a saved Python number
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


# ----------------------------------------------------------------------------------------
# Msgpack files (flax.serialization).


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


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Write ``data`` to a temporary file next to ``path``, flush it, and rename it over."""
  directory = path.parent
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / f".{path.name}.{uuid.uuid4().hex}.tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 minus the umask
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  with contextlib.suppress(OSError, AttributeError):  # make the rename durable (POSIX)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def save_checkpoint(path: PathLike, tree: Any) -> pathlib.Path:
  """Write ``tree`` to the msgpack file ``path``, atomically (see the module docstring).

  Args:
    path: the file to write; its directory is created if needed. An existing file is
      replaced only once the new one is complete.
    tree: any pytree of arrays and Python numbers that Flax's serialization knows: dicts,
      lists, tuples, NamedTuples (all optcompose states), Flax ``struct`` dataclasses such as
      ``TrainState``, :class:`~optcompose.FlatParams`.

  Returns:
    The path written, as a ``pathlib.Path``.

  Raises:
    TypeError: a leaf or container cannot be stored (the message names its path).
    ValueError: an array is sharded across processes (use :func:`save_orbax_checkpoint`).
  """
  serialization = _flax_serialization()
  state = serialization.to_state_dict(tree)
  _check_storable(state)
  state = jax.device_get(state)  # one transfer to host memory for all arrays
  data = serialization.msgpack_serialize(state, in_place=True)
  path = pathlib.Path(path)
  _write_atomically(path, data)
  return path


def restore_checkpoint(path: PathLike, target: Any) -> Any:
  """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``target``.

  Args:
    path: the msgpack file.
    target: a template with the saved tree's structure, shapes and dtypes (its values are not
      used; ``jax.ShapeDtypeStruct`` leaves are fine). ``None`` returns the raw state dict
      (nested dicts of NumPy arrays), for inspecting a file.

  Returns:
    A tree like ``target`` holding the saved values, each leaf of the template's kind (see
    the module docstring).

  Raises:
    CheckpointMismatchError: the checkpoint differs from ``target``; the message names the
      first differing path (missing, unexpected, different shape or dtype).
    ValueError: the file is not a msgpack checkpoint.
  """
  serialization = _flax_serialization()
  with open(path, "rb") as f:
    data = f.read()
  try:
    saved = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack's errors for a truncated or foreign file vary
    raise ValueError(f"restore_checkpoint: {os.fspath(path)} is not a msgpack checkpoint "
                     f"({type(e).__name__}: {e}).") from e
  if target is None:
    return saved
  _check("restore_checkpoint", path, _saved_leaves(saved), target)
  try:
    restored = serialization.from_state_dict(target, saved)
  except (ValueError, KeyError) as e:  # an empty node present on one side only
    raise CheckpointMismatchError(
        f"restore_checkpoint: the checkpoint {os.fspath(path)} does not match `target`: "
        f"{e}") from e
  return jax.tree.map(_like, restored, target)


# ----------------------------------------------------------------------------------------
# Orbax directories.


def save_orbax_checkpoint(directory: PathLike, tree: Any, *,
                          overwrite: bool = False) -> pathlib.Path:
  """Write ``tree`` with ``orbax.checkpoint.StandardCheckpointer`` and wait until it is done.

  Orbax writes into a temporary directory and renames it when complete.

  Args:
    directory: the checkpoint directory (made absolute, as Orbax requires).
    tree: any pytree of arrays and Python numbers.
    overwrite: replace an existing checkpoint (Orbax's ``force``); otherwise saving over one
      is an error.

  Returns:
    The absolute directory, as a ``pathlib.Path``.
  """
  ocp = _orbax()
  directory = pathlib.Path(os.path.abspath(os.fspath(directory)))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree, force=overwrite)
    checkpointer.wait_until_finished()
  return directory


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


def restore_orbax_checkpoint(directory: PathLike, target: Any) -> Any:
  """Read a checkpoint written by Orbax's ``StandardCheckpointer`` into ``target``'s structure.

  Orbax's stored metadata is compared with ``target`` first, with the checks of
  :func:`restore_checkpoint`: Orbax alone would cast a stored array to the template's dtype.

  Args:
    directory: the checkpoint directory.
    target: a template as for :func:`restore_checkpoint` (arrays or ``jax.ShapeDtypeStruct``
      leaves; a ``jax.Array`` or struct with a sharding places the restored array so).

  Returns:
    A tree like ``target`` holding the saved values.

  Raises:
    CheckpointMismatchError: the checkpoint differs from ``target``; the message names the
      first differing path.
  """
  ocp = _orbax()
  directory = pathlib.Path(os.path.abspath(os.fspath(directory)))
  if not directory.is_dir():
    raise FileNotFoundError(f"restore_orbax_checkpoint: no checkpoint directory {directory}.")
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(directory)
    metadata = getattr(metadata, "item_metadata", metadata)  # a StepMetadata in recent Orbax
    metadata = getattr(metadata, "tree", metadata)
    if metadata is None:
      raise ValueError(f"restore_orbax_checkpoint: {directory} holds no Orbax checkpoint "
                       "written by StandardCheckpointer (no metadata found).")
    saved = _saved_leaves(metadata)
    _check("restore_orbax_checkpoint", directory, saved, target)
    abstract = jax.tree_util.tree_map_with_path(
        lambda path, leaf: _abstract(leaf, saved[tuple(otree.key_name(k) for k in path)]), target)
    restored = checkpointer.restore(directory, abstract)
  return jax.tree.map(_like, restored, target)
