"""The file handling of :mod:`optcompose.checkpoint` that keeps a checkpoint whole: a lock on
the directory, leftovers of interrupted saves removed, atomic writes and swaps, the repair of
a swap that a crash cut between two renames; local paths told from URLs; Orbax's errors made
this module's (a save finishing in the background: :mod:`optcompose._checkpoint_async`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import glob
import os
import pathlib
import re
import shutil
import sys
import uuid
import warnings
from typing import Any, Optional

import jax

from optcompose._checkpoint_check import (
  CHECKSUM,
  FORMAT,
  FORMAT_KEY,
  CheckpointCorruptError,
  PathLike,
  _abstract,
  _saved_leaves,
  _verify,
)
from optcompose._checkpoint_guard import _locked, followed  # noqa: F401 -- _locked: checkpoint's
from optcompose._checkpoint_layout import SIDECAR, _is_damage, metadatas_whole
from optcompose._checkpoint_nodes import (
  _flat_from_state_dict,
  _flat_to_state_dict,
  _mismatched_orbax_nodes,
)
from optcompose import tree as otree
from optcompose.flat import FlatParams


def _ours(path: pathlib.Path) -> re.Pattern:
  """Names our saves (and Orbax, saving into them or into ``path``) give temporary files."""
  name = re.escape(path.name)
  return re.compile(
    rf"^(\.{name}\.[0-9a-f]{{32}}\.(tmp|optcompose-(new|old).*)|{name}\.orbax-checkpoint-tmp.*)$"
  )


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)


def _remove_new(new: pathlib.Path) -> None:
  """Delete the new checkpoint ``new`` of a failed save and Orbax's temporary directories of
  it (``new.orbax-checkpoint-tmp*``), nothing else: a swap cut between its two renames left
  the previous checkpoint set aside, for :func:`_recover`."""
  for entry in os.listdir(new.parent):
    if entry == new.name or entry.startswith(f"{new.name}.orbax-checkpoint-tmp"):
      _remove(new.parent / entry)


def _remove_leftovers(path: pathlib.Path) -> None:
  """Delete what interrupted saves to ``path`` left (call with the lock held)."""
  pattern = _ours(path)
  for entry in os.listdir(path.parent):
    if pattern.match(entry):
      _remove(path.parent / entry)


def _fsync(path: pathlib.Path) -> None:
  """Flush a file to disk: an I/O error raises (its data may not be there), a flush the system
  does not support does not; a directory (its entries) best effort."""
  folder = path.is_dir()
  try:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
  except OSError:
    if folder:
      return
    raise
  try:
    os.fsync(fd)
  except OSError as e:  # unsupported: a read-only handle on Windows, some file systems
    unsupported = e.errno in (errno.EBADF, errno.EINVAL, errno.EOPNOTSUPP)
    if not folder and not unsupported:
      raise
  finally:
    os.close(fd)


def _raise(error: OSError) -> None:
  raise error


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where
  the system or file system cannot."""
  renameat2 = (
    getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if (sys.platform == "linux")
    else None
  )
  if renameat2 is None:
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _install(new: pathlib.Path, path: pathlib.Path) -> None:
  """Put the complete checkpoint ``new`` at ``path``; at every instant ``path`` holds the old
  checkpoint or the new one, or (between two renames) :func:`_recover` can restore one."""
  old = new
  if not path.exists():
    os.rename(new, path)
  elif not _exchange(new, path):
    old = new.with_name(new.name.replace(".optcompose-new", ".optcompose-old"))
    os.rename(path, old)
    os.rename(new, path)
  _fsync(path.parent)
  _remove(old)
  if old.exists():  # the previous checkpoint, set aside: a full copy the user should know of
    warnings.warn(
      f"the checkpoint that {path} held before this save could not be (wholly) deleted; it is "
      f"left as {old} (the new one is complete); the next save to {path} removes it.",
      stacklevel=4,
    )


def _recover(path: pathlib.Path) -> None:
  """Finish a swap that two renames left half done (``path`` missing, its old checkpoint set
  aside): roll forward to the complete new checkpoint, or back to the old (lock held)."""
  if path.exists():
    return
  for entry in sorted(
    path.parent.glob(f".{glob.escape(path.name)}.*.optcompose-old"),
    key=lambda p: p.stat().st_ctime,
    reverse=True,
  ):
    if _ours(path).match(entry.name):
      new = entry.with_name(entry.name.replace(".optcompose-old", ".optcompose-new"))
      os.rename(new if new.is_dir() else entry, path)
      _fsync(path.parent)
      return


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Write ``data`` to a temporary file next to ``path``, flush it, and rename it over."""
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 minus the umask
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    _remove(tmp)
    if isinstance(e, OSError) and e.errno and e.filename is None:  # a write: names no file
      raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    raise
  _fsync(path.parent)  # make the rename durable


def _finish(new: pathlib.Path, sidecar: str, text: str) -> None:
  """Write the checksums and layouts into the complete checkpoint ``new`` and flush it all."""
  (new / sidecar).write_text(text)
  for folder, _, files in os.walk(new, onerror=_raise):  # a folder unlisted: files unflushed
    for name in files + [""]:  # the files, then their folder
      _fsync(pathlib.Path(folder, name))


# ----------------------------------------------------------------------------------------
# Where a checkpoint goes: a local directory, or a URL that Orbax writes through etils.epath.


def _directory(fn: str, directory: Any) -> tuple:
  """``(path, remote)``: a local ``directory`` made absolute as a ``pathlib.Path`` (False),
  or a URL (``gs://``, ``s3://``: anything with ``://``) as an ``etils.epath.Path`` (True).

  Raises:
    TypeError: ``directory`` is not a path.
    ValueError: a URL whose scheme ``etils.epath`` does not know (it would become a local path).
  """
  try:
    text = os.fspath(directory)  # an epath.Path of a URL gives the URL
  except TypeError:
    text = None
  if not isinstance(text, str):
    raise TypeError(
      f"{fn}: `directory` must be a path (a str, os.PathLike or "
      f"etils.epath.Path), got {type(directory).__name__}."
    )
  if "://" not in text:  # a link followed: a save writes where it points
    return pathlib.Path(os.path.abspath(followed(text))), False
  from etils import epath  # a dependency of Orbax

  try:
    path = epath.Path(text)
  except (KeyError, NotImplementedError):  # etils raises these for an unknown scheme
    path = None
  if path is None or "://" not in os.fspath(path):
    raise ValueError(
      f"{fn}: `directory` {text!r} is a URL of a scheme etils.epath does not "
      "know (it knows gs://, s3://, az://, hf://); pass a local path or one of "
      "those."
    )
  return path, True


# ----------------------------------------------------------------------------------------
# Several processes (a save that finishes in the background: optcompose._checkpoint_async).


def _hosts():
  """``jax.experimental.multihost_utils`` in a multi-process run, else None."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils
  return None


def _flax_serialization():
  try:
    from flax import serialization
  except ImportError as e:
    raise ImportError(
      "optcompose.checkpoint: msgpack checkpoints need Flax (`pip install flax`), which "
      "provides flax.serialization."
    ) from e
  if not serialization.is_serializable(FlatParams):
    serialization.register_serialization_state(
      FlatParams, _flat_to_state_dict, _flat_from_state_dict
    )
  return serialization


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise ImportError(
      "optcompose.checkpoint: Orbax checkpoints need orbax-checkpoint "
      "(`pip install orbax-checkpoint`)."
    ) from e
  return ocp


# ----------------------------------------------------------------------------------------
# Msgpack files (flax.serialization).


def _read_msgpack(fn: str, path: PathLike, serialization: Any) -> tuple:
  """``(layouts, state)`` of the msgpack checkpoint ``path``, its checksums verified (a file
  of the bare state dict, format 1, records no ``layouts``: None). CheckpointCorruptError: a
  damaged file (undecodable after our header, a header or entries damaged, a leaf unlike its
  checksum); ValueError: not a msgpack checkpoint, or of a newer format."""
  data = pathlib.Path(path).read_bytes()
  try:
    saved: Any = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack's errors for a truncated or foreign file vary
    error = CheckpointCorruptError if FORMAT_KEY.encode() in data[:64] else ValueError
    raise error(
      f"{fn}: {os.fspath(path)} is not a msgpack checkpoint, or is "
      f"damaged ({type(e).__name__}: {e})."
    ) from e
  ours = isinstance(saved, dict) and {"checksum", "layouts", "leaves", "state"} <= saved.keys()
  if ours and FORMAT_KEY not in saved:  # a flipped bit in our key: not Flax's bare state dict
    raise CheckpointCorruptError(f"{fn}: {os.fspath(path)} is damaged: its header {sorted(saved)}.")
  if not (isinstance(saved, dict) and FORMAT_KEY in saved):
    return None, saved
  version, checksum = saved[FORMAT_KEY], saved.get("checksum")
  if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT:
    raise ValueError(
      f"{fn}: {os.fspath(path)} has format {version!r} ({checksum!r}); this optcompose reads "
      f"format {FORMAT} ({CHECKSUM}) and the bare state dict: the file is of a newer "
      "optcompose (upgrade it), or damaged."
    )
  if (version, checksum) != (FORMAT, CHECKSUM):  # a flipped bit (1 was the bare state dict)
    raise CheckpointCorruptError(
      f"{fn}: {os.fspath(path)} is damaged: its header gives format {version!r} "
      f"({checksum!r}), where format {FORMAT} uses {CHECKSUM!r}."
    )
  if not {"layouts", "leaves", "state"} <= saved.keys():
    raise CheckpointCorruptError(
      f"{fn}: {os.fspath(path)} is damaged: it lacks entries ({sorted(saved)})."
    )
  _verify(fn, path, saved["leaves"], _saved_leaves(saved["state"]))
  return saved["layouts"], saved["state"]


# --- Orbax's side: the checksums file inside a directory, Orbax's metadata and errors.


def _read_metadata(checkpointer: Any, directory: Any) -> Any:
  """The tree of Orbax's metadata of ``directory``; the error of :func:`_damaged` if none."""
  try:  # Orbax raises (0.10) or logs the reason and returns None (0.12), then reading raises
    metadata = _metadata_tree(checkpointer.metadata(directory))
    if metadata is None:
      checkpointer.restore(directory)
      raise ValueError("no metadata")
  except Exception as e:  # reported in the error
    raise _damaged(directory, e, "metadata") from e
  return metadata


def _written(checkpointer: Any, new: Any, directory: Any) -> None:
  """Raise unless ``new``'s metadata (for ``directory``) reads back: Orbax commits some it
  cannot read. Its arrays are not read (a data file damaged as written goes unseen)."""
  try:
    _read_metadata(checkpointer, new)
  except ValueError as e:
    raise CheckpointCorruptError(
      f"save_orbax_checkpoint: Orbax wrote a checkpoint it cannot read back ({e}); {directory} "
      "keeps what it held."
    ) from e


def _restore_arrays(fn: str, checkpointer: Any, directory: Any, metadata: Any, target: Any):
  """Orbax's restore of ``directory`` (its ``metadata`` checked against ``target`` already)
  into ``target``'s structure, Orbax's errors made this module's.

  Raises:
    CheckpointCorruptError: TensorStore cannot read the arrays (a data file truncated or
      missing), whichever error of Orbax's wraps its error.
    CheckpointMismatchError: the trees differ in an empty node only (Orbax compares those).
  """
  saved = _saved_leaves(metadata)
  abstract = jax.tree_util.tree_map_with_path(
    lambda path, leaf: _abstract(leaf, saved[tuple(otree.key_name(k) for k in path)]), target
  )
  try:
    return checkpointer.restore(directory, abstract)
  except Exception as e:  # Orbax wraps TensorStore's errors in a bare Exception
    damage = next((c for c in _chain(e) if _is_damage(c)), None)
    if damage is not None or not metadatas_whole(directory):
      raise _damaged(directory, damage or e, "arrays") from e
    if isinstance(e, ValueError):  # Orbax's words vary ("List arity mismatch" in 0.10)
      _mismatched_orbax_nodes(fn, directory, metadata, target, e)
    raise


def _chain(error: BaseException) -> list:
  """``error`` and the errors it was raised from or during, outermost first."""
  chain: list = []
  link: Optional[BaseException] = error
  while link is not None and all(link is not c for c in chain):
    chain.append(link)
    link = link.__cause__ or link.__context__
  return chain


def _damaged(directory: Any, error: BaseException, what: str) -> ValueError:
  """The error for a directory Orbax cannot read, naming it and Orbax's error."""
  message = str(error).split(" [tensorstore_spec=")[0]
  if not any((directory / n).exists() for n in ("_METADATA", "_CHECKPOINT_METADATA", SIDECAR)):
    return ValueError(
      f"restore_orbax_checkpoint: {directory} holds no Orbax checkpoint "
      f"({type(error).__name__}: {message})."
    )
  return CheckpointCorruptError(
    f"restore_orbax_checkpoint: the Orbax checkpoint {directory} is damaged or unreadable: "
    f"Orbax cannot read its {what} ({type(error).__name__}: {message})."
  )


def _read_sidecar(directory: Any) -> Any:
  """The checksums and layouts saved in ``directory``; None for a checkpoint without."""
  try:
    sidecar = json.loads((directory / SIDECAR).read_text())
    if (sidecar["format"], sidecar["checksum"]) != (FORMAT, CHECKSUM):
      raise ValueError(f"format {sidecar['format']} ({sidecar['checksum']}), not {FORMAT}")
    sidecar["layouts"], sidecar["leaves"]  # noqa: B018 -- both records must be there
    return sidecar
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointCorruptError(
      f"restore_orbax_checkpoint: the Orbax checkpoint {directory} is damaged or of "
      f"another format: its {SIDECAR} is unreadable ({type(e).__name__}: {e})."
    ) from e


def _metadata_tree(metadata: Any) -> Any:
  """The tree of an Orbax ``StepMetadata`` (recent Orbax) or its ``item_metadata``."""
  metadata = getattr(metadata, "item_metadata", metadata)
  return getattr(metadata, "tree", metadata)
