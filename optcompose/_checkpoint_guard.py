"""What a save may replace, and what it can store (the module is private; its functions are
this package's): the checks :mod:`optcompose.checkpoint`
makes before it writes anything, so that a mistyped path or an unstorable leaf costs an
error, never a user's file or a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
import stat as stat_module
import threading
from typing import Any, Optional

import jax
import numpy as np

from optcompose._checkpoint_check import (
  _PYTHON_SCALARS,
  FORMAT_KEY,
  CheckpointMismatchError,
  _like,
  _mismatches,
  _saved_leaves,
)

try:
  import fcntl
except ImportError:  # not POSIX: no locks
  fcntl = None

# The directories this process holds a lock on, (device, inode) -> its holds (_Hold): a save
# started by a signal handler that interrupted a save to the same place, in the same thread,
# would wait for its own lock forever (flock is per open file, not per process).
_HELD: dict = {}
_HELD_GUARD = threading.Lock()
_FDS: dict = {}  # the descriptors of the locks this process holds (or waits for) -> _Hold


def _after_fork_in_child() -> None:
  """In a forked child (a DataLoader worker, say): close its copies of the parent's lock
  descriptors (a lock is the open file's, so a copy kept open would keep the parent's next
  save waiting until the child ends; closing, unlike unlocking, leaves the parent's lock in
  place) and forget the holds, which are the parent's."""
  global _HELD_GUARD
  _HELD_GUARD = threading.Lock()  # another thread of the parent may have held it at the fork
  for fd in _FDS:
    with contextlib.suppress(OSError):
      os.close(fd)
  _FDS.clear()
  _HELD.clear()


if hasattr(os, "register_at_fork"):
  os.register_at_fork(after_in_child=_after_fork_in_child)


class _Hold:
  """One hold of a directory's lock, counted against the thread that waits for its release:
  the one that took it, or none once it is handed to a save finishing in the background
  (which releases it on its own: the thread that started it may wait for it)."""

  __slots__ = ("thread",)

  def __init__(self, thread: Optional[int]):
    self.thread = thread

  def hand_over(self) -> None:
    with _HELD_GUARD:
      self.thread = None


@contextlib.contextmanager
def _locked(directory: pathlib.Path, exclusive: bool = True):
  """Hold ``flock`` on ``directory`` itself (nothing to clean up); no lock where unsupported.
  Yields the :class:`_Hold` (None where there is no lock).

  Raises:
    RuntimeError: this thread already holds it (a signal handler saving while the save it
      interrupted holds the lock), instead of waiting for itself forever.
  """
  fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if fcntl else None
  key, hold = None, _Hold(threading.get_ident())
  if fd is not None:
    with _HELD_GUARD:
      _FDS[fd] = hold
  try:
    if fd is not None and fcntl is not None:  # fd is None exactly when fcntl is
      stat = os.fstat(fd)
      held = (stat.st_dev, stat.st_ino)
      with _HELD_GUARD:
        if any(h.thread == hold.thread for h in _HELD.get(held, ())):
          raise RuntimeError(
            f"a checkpoint save or restore in {directory} is under way in this thread, "
            "interrupted (by a signal handler saving, say), and this one would wait for it "
            "forever: save elsewhere, or set a flag in the handler and save after the step"
          )
      try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
      except OSError as e:  # a file system without flock: proceed unlocked
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
          raise
      key = held
      with _HELD_GUARD:
        _HELD.setdefault(key, []).append(hold)
    yield hold if key is not None else None
  finally:
    with _HELD_GUARD:  # after a fork, in the child, the descriptor is closed and forgotten
      holds = _HELD.get(key, []) if key is not None else []
      if hold in holds:
        holds.remove(hold)
        if not holds:
          del _HELD[key]
      mine = fd is not None and _FDS.get(fd) is hold  # not one reopened under its number
      if mine:
        del _FDS[fd]
    if mine:
      os.close(fd)  # releases the lock


def creatable(fn: str, path: pathlib.Path) -> None:
  """Raise a ValueError unless ``path`` is not the root and its nearest existing ancestor is a
  directory (a path under a file, which ``mkdir`` would fail on with a bare OSError)."""
  if not path.name:
    raise ValueError(f"{fn}: {path} is the root; a checkpoint needs a path under it.")
  for parent in path.parents:
    if parent.exists():
      if not parent.is_dir():
        raise ValueError(f"{fn}: {parent} is a file, so {path} cannot be created under it.")
      break


def followed(path: Any) -> pathlib.Path:
  """``path`` as a ``pathlib.Path``, a symbolic link as the path it points to: a save writes
  the checkpoint there (a link put where the disk is bigger), as ``open`` would, where
  renaming a file or a directory over the link would replace the link itself."""
  path = pathlib.Path(path)
  return pathlib.Path(os.path.realpath(path)) if path.is_symlink() else path


def file_target(fn: str, path: pathlib.Path, tree: Any = None, check_keys: bool = True) -> None:
  """Raise a ValueError unless ``path`` can take a msgpack checkpoint: its nearest existing
  ancestor is a directory, and ``path`` is absent, empty, or a checkpoint of this library
  (which a save replaces, as saving every epoch to one path expects), or a msgpack state dict
  of Flax's of ``tree``'s whole tree (an older checkpoint of the same run, which restore reads:
  see :func:`_not_older`). Any other file there is the user's: a mistyped path must not
  overwrite a script or another tool's data (a metrics file, downloaded weights). A ``tree``
  given is checked for typed PRNG keys (:func:`no_typed_keys`) unless ``check_keys`` is False
  (checked already)."""
  if tree is not None and check_keys:
    no_typed_keys(fn, tree)
  if path.is_dir():
    raise ValueError(
      f"{fn}: {path} is a directory; pass a file path (an Orbax checkpoint directory is "
      "read and written by restore_orbax_checkpoint / save_orbax_checkpoint)."
    )
  creatable(fn, path)
  if path.exists():
    regular_file(fn, path)
    with open(path, "rb") as f:
      head = f.read(64)
    why = None if FORMAT_KEY.encode() in head or not head else _not_older(path, tree)
    if why is not None:
      raise ValueError(
        f"{fn}: {path} exists and is not an optcompose checkpoint{why}: a save replaces only "
        "a checkpoint (this library's, or Flax's of the same tree), never another file. Move "
        "or delete it, or save under another path."
      )


def _not_older(path: pathlib.Path, tree: Any) -> Optional[str]:
  """Why ``path`` is not an older checkpoint of the run saving ``tree`` (None if it is): it
  is one where it holds a msgpack state dict (``flax.serialization.to_bytes``) that
  :func:`~optcompose.checkpoint.restore_checkpoint` would restore into ``tree``: every leaf
  path of ``tree``'s and no other, each of the same shape and dtype. A save may replace such
  a file like its own (resuming an old run at its path). Top-level keys alone would not do:
  almost every Flax checkpoint and downloaded weights file is ``{"params": ...}``. Dtypes
  count too: a resumed run restored the file into a template of exactly its dtypes (nothing
  is cast), and training keeps them, so only another tree's file (weights of another
  precision, say) differs there."""
  from flax import serialization

  try:
    old = serialization.msgpack_restore(path.read_bytes())
  except Exception:  # not msgpack at all
    return ""
  if not isinstance(old, dict):
    return " (a msgpack file, but not a state dict)"
  if tree is None:
    return " (a msgpack state dict)"
  try:
    problems = _mismatches(_saved_leaves(old), tree, theirs="the file", ours="`tree`")
  except TypeError:  # a value in the file that no checkpoint holds
    problems = ["it holds values a checkpoint does not"]
  if not problems:
    return None
  return (
    " (it is a msgpack state dict of another tree, Flax's weights or another run's "
    f"checkpoint: {problems[0]})"
  )


def file_source(fn: str, path: Any) -> None:
  """Raise a ValueError naming ``path`` where it is a directory (an Orbax checkpoint, say) or
  another file that is not a regular one (see :func:`regular_file`)."""
  if pathlib.Path(path).is_dir():
    raise ValueError(
      f"{fn}: {path} is a directory, not a msgpack checkpoint file (an Orbax checkpoint "
      "directory is read by restore_orbax_checkpoint)."
    )
  if pathlib.Path(path).exists():
    regular_file(fn, pathlib.Path(path))


def regular_file(fn: str, path: pathlib.Path) -> None:
  """Raise a ValueError unless the existing ``path`` is a regular file (a symbolic link to
  one is): reading a device such as /dev/zero would never end, opening a FIFO would wait for
  a writer forever, and neither is a checkpoint."""
  mode = os.stat(path).st_mode
  if not stat_module.S_ISREG(mode):
    kind = next((k for test, k in _SPECIAL if test(mode)), "not a regular file")
    raise ValueError(
      f"{fn}: {path} is {kind}, not a regular file: a msgpack checkpoint is a regular file "
      "(nothing was read from it or written to it). Pass another path."
    )


_SPECIAL = (
  (stat_module.S_ISCHR, "a character device"),
  (stat_module.S_ISBLK, "a block device"),
  (stat_module.S_ISFIFO, "a FIFO (named pipe)"),
  (stat_module.S_ISSOCK, "a socket"),
)


def no_typed_keys(fn: str, tree: Any) -> None:
  """Raise a TypeError naming the first typed PRNG key (msgpack stores numbers only)."""
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      raise TypeError(
        f"{fn}: `{jax.tree_util.keystr(key_path)}` is a typed PRNG key ({leaf.dtype}), which "
        "a msgpack file cannot hold: save it with save_orbax_checkpoint, or save "
        "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data (an NNX "
        "model's Rngs: nnx.state(model, nnx.Not(nnx.RngKey)) leaves them out)."
      )


def _key_kind(leaf: Any) -> str:
  """A typed PRNG key's dtype, which names its implementation (``key<fry>``, ``key<rbg>``);
  "" for any other leaf."""
  if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return str(leaf.dtype)
  return ""


def like_target(fn: str, where: Any, restored: Any, target: Any) -> Any:
  """``restored``, each leaf of the kind its template leaf is (see ``_like``), checked for
  typed PRNG keys (:func:`keys_match`)."""

  def like(path: Any, value: Any, template: Any) -> Any:
    if isinstance(value, _PYTHON_SCALARS) and not isinstance(value, np.generic):
      if hasattr(template, "dtype") and not _key_kind(template):  # a Python number saved
        number_fits(fn, where, path, value, np.dtype(template.dtype))
    return _like(value, template)

  restored = jax.tree_util.tree_map_with_path(like, restored, target)
  keys_match(fn, where, restored, target)
  return restored


def number_fits(fn: str, where: Any, path: Any, value: Any, dtype: np.dtype) -> None:
  """Raise CheckpointMismatchError where the Python number ``value``, restored into a 0-d
  template of ``dtype`` (of its kind: the checks allow no other), would change: an int out
  of the dtype's range, a finite float that overflows it (rounding a float to a narrower
  one, as any float32 computation does, is allowed)."""
  if dtype.kind in "iu" and not isinstance(value, bool):
    info = np.iinfo(dtype)
    if info.min <= value <= info.max:
      return
    why = f"outside its range, {info.min} to {info.max}"
  elif jax.dtypes.issubdtype(dtype, np.inexact):  # bfloat16 too (of NumPy kind "V")
    with np.errstate(over="ignore", invalid="ignore"):
      cast = np.asarray(value, dtype)
    if np.isfinite(cast) or not np.isfinite(value):
      return
    why = f"it would become {cast.item()}"
  else:
    return
  raise CheckpointMismatchError(
    f"{fn}: the checkpoint {os.fspath(where)} does not match `target`: "
    f"`{jax.tree_util.keystr(tuple(path))}` is the Python {type(value).__name__} {value!r} in "
    f"the checkpoint but a 0-d array of dtype {dtype} in `target`, which cannot hold it "
    f"({why}; nothing is cast): build the template with a wider dtype there, or with a "
    "Python number."
  )


def keys_match(fn: str, where: Any, restored: Any, target: Any) -> None:
  """Raise CheckpointMismatchError where a restored leaf is a typed PRNG key and the template's
  is not, or the other way, or of another implementation: a key is stored as its bits, which
  Orbax's metadata and a msgpack file describe as a uint32 array, so the shape and dtype
  checks cannot tell them apart."""
  for (path, got), want in zip(
    jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(target)
  ):
    mine, theirs = _key_kind(got), _key_kind(want)
    if mine != theirs:
      raise CheckpointMismatchError(
        f"{fn}: the checkpoint {os.fspath(where)} does not match `target`: "
        f"`{jax.tree_util.keystr(path)}` is {_described(mine)} in the checkpoint but "
        f"{_described(theirs)} in `target` (a key is saved as its bits)."
      )


def _described(kind: str) -> str:
  return f"a PRNG key ({kind})" if kind else "an array of numbers"


def same_directory(fn: str, directory: Any, hosts: Any) -> None:
  """In a run of several processes, raise the same ValueError on every process unless all
  give the same ``directory``: a path on each host's own disk (``/tmp/ckpt_{process}``) would
  otherwise leave Orbax's processes waiting for one another until its timeout."""
  if hosts is None:
    return
  digest = np.frombuffer(hashlib.sha256(os.fspath(directory).encode()).digest(), np.uint8)
  every = np.asarray(hosts.process_allgather(digest))
  if not (every == every[0]).all():
    differ = int((every != every[0]).any(axis=1).sum())
    raise ValueError(
      f"{fn}: the processes give different directories ({differ} of {len(every)} differ from "
      f"process 0's; this one's is {directory}): every process must pass the same path, on "
      "a file system all hosts share."
    )
