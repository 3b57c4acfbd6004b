"""Checkpoints: save a training run and resume it exactly, without pickle.

Everything that changes while training -- parameters, moments, step counts, the position of
every schedule, early-stopping records -- is a pytree of arrays, and the optimizer object
itself holds none (see :mod:`optcompose.core.base`). A checkpoint is therefore just a pytree,
and resuming is rebuilding the same objects from code and filling in their arrays::

    save_checkpoint("run/ckpt.msgpack", {"params": params, "opt_state": opt_state, "step": step})
    # Later, in a new process: rebuild the optimizer (same code) and a template.
    template = {"params": init_params(), "opt_state": tx.init(init_params()), "step": 0}
    run = restore_checkpoint("run/ckpt.msgpack", template)

The template fixes the structure, every leaf's shape and dtype, and the type each leaf comes
back as: a ``jax.Array`` placed with the template leaf's sharding, NumPy, or a Python number
(also for a saved 0-d array of its kind, returned as a ``jax.Array``, or exactly as a number
where one would narrow it: Flax's ``TrainState`` step starts at the int 0, then int32).
Leaves may be ``jax.ShapeDtypeStruct``: ``jax.eval_shape(tx.init, params)`` costs no memory.

**Checks.** Restoring compares the checkpoint with the template before anything is built and
raises :class:`CheckpointMismatchError` (a ``ValueError``) naming the first path that differs
(``['opt_state'][1][0].mu['dense']['kernel']``): a leaf missing or unexpected, another shape
or dtype (nothing is cast or broadcast). A :class:`~optcompose.FlatParams` is saved with its
layout (each model leaf's path, shape, bucket, dtype, offset: :func:`flat_layouts`) and
restores only into it; a checkpoint without that record (Orbax's alone) needs ``layouts=``.

**Integrity and crash safety.** Every leaf's CRC-32 is saved with it and compared on
restore (:class:`CheckpointCorruptError` names a damaged leaf); a save never removes the
previous checkpoint before the new one is complete and flushed, and saves into one directory
take turns under ``flock`` (docs/guides/checkpoints.md says what each covers).

**Formats.** :func:`save_checkpoint` writes one msgpack file, :func:`save_orbax_checkpoint`
an Orbax directory (``block=False``: an :class:`AsyncSave`; a URL such as ``gs://...`` goes
to Orbax as it is); :func:`check_against_template` makes the restore's check for what an
Orbax ``CheckpointManager`` reads. The files' layouts, the swap and the multi-process
protocol: docs/guides/checkpoints.md, "File formats".

Flax and Orbax are imported on first use. A checkpoint cannot hold the optimizer's code
(rebuild it), Python objects other than numbers, strings and ``None``, or containers Flax's
serialization does not know (for ``nnx.State`` save ``nnx.to_pure_dict(state)`` and restore
with ``nnx.replace_by_pure_dict``).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import uuid
from typing import Any

import jax
import numpy as np

from optcompose._checkpoint_check import (  # the checks and the formats' records
  CHECKSUM,
  FORMAT,
  FORMAT_KEY,
  CheckpointCorruptError,
  CheckpointMismatchError,
  PathLike,
  _check,
  _checksums,
  _leaves,
  _saved_leaves,
  _verify,
)
from optcompose import _checkpoint_guard as guard
from optcompose._checkpoint_layout import replaceable
from optcompose._checkpoint_async import AsyncSave
from optcompose._checkpoint_leaves import _check_storable, orbax_storable
from optcompose._checkpoint_nodes import _check_layouts, _mismatched_nodes, flat_layouts
from optcompose._checkpoint_io import (  # the file handling
  SIDECAR,
  _read_msgpack,
  _read_metadata,
  _written,
  _read_sidecar,
  _metadata_tree,
  _flax_serialization,
  _orbax,
  _directory,
  _finish,
  _hosts,
  _install,
  _locked,
  _recover,
  _remove,
  _remove_leftovers,
  _remove_new,
  _restore_arrays,
  _write_atomically,
)

__all__ = [
  "CheckpointMismatchError",
  "CheckpointCorruptError",
  "save_checkpoint",
  "restore_checkpoint",
  "save_orbax_checkpoint",
  "restore_orbax_checkpoint",
  "AsyncSave",
  "check_against_template",
  "flat_layouts",
]


def save_checkpoint(path: PathLike, tree: Any) -> pathlib.Path:
  """Write ``tree`` to the msgpack file ``path``, atomically (see the module docstring).

  Args:
    path: the file to write; its directory is created if needed. An existing checkpoint
      (this library's, an empty file, or a Flax msgpack file of exactly ``tree``'s tree,
      which cannot be told from an older checkpoint of the run: save elsewhere than your
      inputs) is replaced only once the new one is complete; any other file is refused and
      kept. Temporary files that interrupted saves to ``path`` left are removed.
    tree: any pytree of arrays and Python numbers that Flax's serialization knows: dicts,
      lists, tuples, NamedTuples (all optcompose states), Flax ``struct`` dataclasses such as
      ``TrainState``, :class:`~optcompose.FlatParams`.

  Returns:
    The path written, as a ``pathlib.Path``.

  Raises:
    TypeError: a leaf or container cannot be stored, or would not read back as it was (NumPy
      strings, ``float0``, ints wider than 64 bits, a deleted array): its path is named and
      nothing is written.
    ValueError: an array is sharded across processes (use :func:`save_orbax_checkpoint`);
      ``path`` is a directory, not a regular file, or a file that is not a checkpoint.
  """
  path = guard.followed(path)
  guard.file_target("save_checkpoint", path, tree)
  serialization = _flax_serialization()
  state = serialization.to_state_dict(tree)
  _check_storable(state, tree)
  state = jax.device_get(state)  # one transfer to host memory for all arrays
  data = serialization.msgpack_serialize(
    {
      FORMAT_KEY: FORMAT,
      "checksum": CHECKSUM,
      "leaves": _checksums(_saved_leaves(state)),
      "layouts": flat_layouts(tree),
      "state": state,
    },
    in_place=True,
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  with _locked(path.parent):
    guard.file_target("save_checkpoint", path, tree, check_keys=False)  # again, locked
    _remove_leftovers(path)
    _write_atomically(path, data)
  return path


def restore_checkpoint(path: PathLike, target: Any, *, layouts: Any = None) -> Any:
  """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``target``.

  Args:
    path: the msgpack file.
    target: a template with the saved tree's structure, shapes and dtypes (its values are not
      used; ``jax.ShapeDtypeStruct`` leaves are fine). ``None`` returns the raw state dict
      (nested dicts of NumPy arrays), for inspecting a file.
    layouts: the FlatParams layouts of the saved tree (:func:`flat_layouts`), needed only
      for a file of the previous format (a bare state dict records none) restored into a
      ``target`` holding a FlatParams; compared as the file's own record is.

  Returns:
    A tree like ``target`` holding the saved values, each leaf of the template's kind (see
    the module docstring).

  Raises:
    CheckpointMismatchError: the checkpoint differs from ``target``; the message names the
      first differing path (missing, unexpected, different shape or dtype, FlatParams layout,
      a saved Python number that the template's dtype cannot hold).
    CheckpointCorruptError: the file is damaged (a leaf differs from its checksum, or the
      file cannot be decoded); the message names the leaf.
    ValueError: the file is not a msgpack checkpoint (an Orbax directory, a FIFO); ``target``
      holds a FlatParams whose layout neither the file nor ``layouts`` records.
  """
  serialization = _flax_serialization()
  guard.file_source("restore_checkpoint", path)
  saved_layouts, saved = _read_msgpack("restore_checkpoint", path, serialization)
  if target is None:
    return saved
  _check("restore_checkpoint", path, _saved_leaves(saved), target)
  _check_layouts("restore_checkpoint", path, saved_layouts, target, layouts)
  try:
    restored = serialization.from_state_dict(target, saved)
  except (ValueError, KeyError) as e:  # an empty node present on one side only
    _mismatched_nodes("restore_checkpoint", path, saved, target, e)
  return guard.like_target("restore_checkpoint", path, restored, target)


# ----------------------------------------------------------------------------------------
# Orbax directories.


def save_orbax_checkpoint(
  directory: Any, tree: Any, *, overwrite: bool = False, block: bool = True
) -> Any:
  """Write ``tree`` with Orbax's ``StandardCheckpointer``, swap it in when it is complete.

  A local ``directory`` is written as the module docstring says (a hidden sibling swapped in,
  under the directory lock). A URL (``gs://``, ``s3://``, anything with ``://``, as a str or
  an ``etils.epath.Path``) goes to Orbax unchanged and Orbax's own atomic save applies: it
  writes a temporary directory and finalizes it when complete (a rename, or on GCS a
  ``commit_success.txt`` marker); no lock is taken (keep one writer per path). There
  ``overwrite=True`` is Orbax's ``force=True``, which deletes the old checkpoint first: on
  object stores save each step under a new name (a ``CheckpointManager``; see
  docs/guides/checkpoints-at-scale.md). The checksums are added after Orbax's commit.

  Args:
    directory: the checkpoint directory: a local path (made absolute, as Orbax requires) or
      a URL that ``etils.epath`` knows.
    tree: any pytree of arrays and Python numbers.
    overwrite: replace an existing checkpoint (locally, only once the new one is complete,
      and never a directory of other files); otherwise saving over one is an error.
    block: return when the checkpoint is in place (the default); with False, return as soon
      as Orbax has copied the arrays to host memory (and the checksums are computed), and
      finish in a background thread: the caller may then update, donate or delete ``tree``.

  Returns:
    The directory (a ``pathlib.Path``; an ``etils.epath.Path`` for a URL); with
    ``block=False`` an :class:`AsyncSave` whose ``wait()`` returns it (with several processes,
    all must call ``wait()``; a later save to the same parent directory waits for this one).

  Raises:
    ValueError: ``directory`` exists and ``overwrite`` is False, or it holds files but no
      checkpoint; a URL of an unknown scheme; a path with ``[`` in it.
    TypeError: ``directory`` is not a path, ``overwrite`` or ``block`` is not a bool, or a
      leaf is not an array or a Python bool, int or float, or one Orbax cannot store (a dtype
      TensorStore lacks, an empty or deleted array, an int wider than 64 bits): nothing is
      written then.
  """
  fn, ocp = "save_orbax_checkpoint", _orbax()
  for name, flag in (("overwrite", overwrite), ("block", block)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{fn}: `{name}` must be a bool, got {flag!r}.")
  directory, remote = _directory(fn, directory)
  tree = orbax_storable(fn, tree, directory)  # and no bracket in the path
  hosts, primary = _hosts(), jax.process_index() == 0  # 0 locks, swaps, cleans up
  guard.same_directory(fn, directory, hosts)
  stack, new, locked, hold, checkpointer = contextlib.ExitStack(), None, False, None, None
  try:
    if not remote:
      token = np.frombuffer(uuid.uuid4().bytes, np.uint8)
      token = bytes(np.asarray(hosts.broadcast_one_to_all(token) if hosts else token, np.uint8))
      new = directory.with_name(f".{directory.name}.{token.hex()}.optcompose-new")  # same on all
      if primary:
        directory.parent.mkdir(parents=True, exist_ok=True)
        hold = stack.enter_context(_locked(directory.parent))
        locked = True
        _recover(directory)
        _remove_leftovers(directory)
      if hosts:
        hosts.sync_global_devices("optcompose_save_start")
    if directory.exists() and not overwrite:
      raise ValueError(f"{fn}: {directory} already exists: pass overwrite=True to replace it.")
    if not remote and directory.exists():
      replaceable(fn, directory)  # a checkpoint, never a user's other files
    checkpointer = stack.enter_context(ocp.StandardCheckpointer())  # closed before unlocking
    if remote:
      checkpointer.save(directory, tree, force=bool(overwrite))
    else:
      checkpointer.save(new, tree)
    text = primary and json.dumps(
      {  # while Orbax writes
        "format": FORMAT,
        "checksum": CHECKSUM,
        "leaves": _checksums(_leaves(tree)),
        "layouts": flat_layouts(tree),
      }
    )
  except BaseException:
    with contextlib.suppress(Exception):  # Orbax may be writing still: let it end first
      checkpointer and checkpointer.wait_until_finished()
    if locked:  # ours and Orbax's temporary directories (not another save's, unlocked)
      _remove_leftovers(directory)
    elif new is not None and primary:
      _remove(new)
    stack.close()
    raise

  def finish():
    with stack:
      try:
        checkpointer.wait_until_finished()
        if primary and remote:
          (directory / SIDECAR).write_text(text)
        elif primary:
          assert new is not None and isinstance(text, str)  # both set when primary and local
          _written(checkpointer, new, directory)  # readable, or the old one is kept
          _finish(new, SIDECAR, text)
          _install(new, directory)
      except BaseException:
        if new is not None and primary:  # and Orbax's temporary directories of it
          _remove_new(new)
        raise

  save = AsyncSave(directory, finish, hosts, bool(block), hold)
  return save.wait() if block else save


def restore_orbax_checkpoint(directory: Any, target: Any, *, layouts: Any = None) -> Any:
  """Read a checkpoint written by Orbax's ``StandardCheckpointer`` into ``target``'s structure.

  Orbax's metadata is compared with ``target`` first, as in :func:`restore_checkpoint`, and
  the restored arrays with their checksums (if the checkpoint has them).

  Args:
    directory: the checkpoint directory, local or a URL (as for
      :func:`save_orbax_checkpoint`). If a local save was interrupted between its two renames
      (systems without ``renameat2``), the checkpoint is first put back in place.
    target: a template as for :func:`restore_checkpoint` (arrays or ``jax.ShapeDtypeStruct``
      leaves; a ``jax.Array`` or struct with a sharding places the restored array so).
    layouts: the FlatParams layouts of the saved tree (:func:`flat_layouts`), needed only
      for a checkpoint that Orbax wrote alone (no ``optcompose_checkpoint.json`` in it)
      restored into a ``target`` holding a FlatParams; compared as that file's record is.

  Returns:
    A tree like ``target`` holding the saved values.

  Raises:
    CheckpointMismatchError: the checkpoint differs from ``target``; the message names the
      first differing path (an empty node such as ``EmptyState`` on one side only, too).
    CheckpointCorruptError: the checkpoint is damaged: Orbax cannot read it (the message
      gives Orbax's error) or a leaf differs from its checksum (the message names it).
    FileNotFoundError: there is no such directory.
    ValueError: ``target`` holds a FlatParams whose layout neither the checkpoint nor
      ``layouts`` records.
  """
  fn, ocp = "restore_orbax_checkpoint", _orbax()
  directory, remote = _directory(fn, directory)
  hosts = _hosts()
  if not remote:
    if jax.process_index() == 0 and not directory.exists() and directory.parent.is_dir():
      with _locked(directory.parent):
        _recover(directory)
    if hosts:
      hosts.sync_global_devices("optcompose_restore_start")
  if not directory.is_dir():
    raise FileNotFoundError(f"{fn}: no checkpoint directory {directory}.")
  lock = contextlib.nullcontext() if remote else _locked(directory.parent, exclusive=False)
  with lock, ocp.StandardCheckpointer() as checkpointer:
    sidecar = _read_sidecar(directory)
    metadata = _read_metadata(checkpointer, directory)
    _check(fn, directory, _saved_leaves(metadata), target)
    _check_layouts(fn, directory, sidecar["layouts"] if sidecar else None, target, layouts)
    restored = _restore_arrays(fn, checkpointer, directory, metadata, target)
  checked = guard.like_target(fn, directory, restored, target)
  if sidecar:  # on the leaves as saved (a Python number saved for a 0-d array: as a number)
    _verify(fn, directory, sidecar["leaves"], _leaves(restored))
  return checked


def check_against_template(
  checkpoint: Any, target: Any, *, where: Any = None, layouts: Any = None
) -> None:
  """Raise :class:`CheckpointMismatchError` if a checkpoint's tree differs from ``target``.

  The check :func:`restore_orbax_checkpoint` makes, for checkpoints read otherwise, e.g. by
  an Orbax ``CheckpointManager`` (whose restore would cast every leaf to the template's dtype
  without a word)::

      check_against_template(manager.item_metadata(step), template)
      restored = manager.restore(step, args=ocp.args.StandardRestore(template))

  Orbax's metadata holds a :class:`~optcompose.FlatParams` as its buffers only, not which
  model leaf each slot holds: a ``target`` holding one needs ``layouts``, the record
  :func:`flat_layouts` made of the saved tree and saved beside it
  (docs/guides/checkpoints-at-scale.md shows a ``CheckpointManager`` doing so).

  Args:
    checkpoint: Orbax metadata (a ``StepMetadata``, its ``item_metadata``, or their ``tree``
      of array metadata), or a restored tree (arrays and Python numbers).
    target: the template: the tree, shapes and dtypes expected (arrays or
      ``jax.ShapeDtypeStruct`` leaves).
    where: the checkpoint's name or path, for the message (optional).
    layouts: the saved tree's :func:`flat_layouts` (required where ``target`` holds a
      FlatParams; ``flat_layouts(target)`` checks nothing: it is your word that the layout
      is the one saved).

  Returns:
    None, when every path, shape and dtype agrees (and every FlatParams' layout).

  Raises:
    CheckpointMismatchError: naming the first differing path (missing, unexpected, another
      shape or dtype, another FlatParams layout), as :func:`restore_orbax_checkpoint` does.
    ValueError: ``checkpoint`` is None (Orbax gives no metadata for an item it has no handler
      for: build the ``CheckpointManager`` with ``item_handlers=ocp.StandardCheckpointHandler()``);
      ``target`` holds a FlatParams and ``layouts`` has no layout for it.
  """
  tree = _metadata_tree(checkpoint)
  if tree is None:
    raise ValueError(
      "check_against_template: `checkpoint` is None: Orbax returns no metadata for an item "
      "it has no handler for (build the CheckpointManager with "
      "item_handlers=ocp.StandardCheckpointHandler(), or restore once first)."
    )
  _check("check_against_template", where, _leaves(tree), target)
  _check_layouts("check_against_template", where, None, target, layouts)
