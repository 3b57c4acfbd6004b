"""Checkpoints: save a training run and resume it exactly, without pickle.

Everything that changes while training -- parameters, moments, step counts, the position of
every schedule, early-stopping records -- is a pytree of arrays, and the optimizer object
itself holds none (see :mod:`optcompose.core.base`). A checkpoint is therefore just a pytree,
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
from typing import Any

import jax

from optcompose import tree as otree
from optcompose.flat import FlatParams
from optcompose._checkpoint_check import (  # the template checks
    CheckpointMismatchError, PathLike, _abstract, _check, _check_storable, _like, _saved_leaves,
)

__all__ = [
    "CheckpointMismatchError", "save_checkpoint", "restore_checkpoint", "save_orbax_checkpoint",
    "restore_orbax_checkpoint",
]


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
# Msgpack files (flax.serialization).


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
