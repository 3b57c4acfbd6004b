"""The file handling of :mod:`optcompose.checkpoint` that keeps a checkpoint whole: a lock on
the directory, leftovers of interrupted saves removed, atomic writes and swaps, and the
repair of a swap that a crash cut between two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import pathlib
import re
import shutil
import sys
import uuid

try:
  import fcntl
except ImportError:  # not POSIX: no locks
  fcntl = None


@contextlib.contextmanager
def _locked(directory: pathlib.Path, exclusive: bool = True):
  """Hold ``flock`` on ``directory`` itself (nothing to clean up); no lock where unsupported."""
  fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if fcntl else None
  try:
    if fd is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
      except OSError as e:  # a file system without flock: proceed unlocked
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
          raise
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock


def _ours(path: pathlib.Path) -> re.Pattern:
  """Names our saves (and Orbax, saving into them or into ``path``) give temporary files."""
  name = re.escape(path.name)
  return re.compile(rf"^(\.{name}\.[0-9a-f]{{32}}\.(tmp|optcompose-(new|old).*)"
                    rf"|{name}\.orbax-checkpoint-tmp.*)$")


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)


def _remove_leftovers(path: pathlib.Path) -> None:
  """Delete what interrupted saves to ``path`` left (call with the lock held)."""
  pattern = _ours(path)
  for entry in os.listdir(path.parent):
    if pattern.match(entry):
      _remove(path.parent / entry)


def _fsync(path: pathlib.Path) -> None:
  """Flush a file or directory to disk (directories: POSIX only, best effort)."""
  with contextlib.suppress(OSError):
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where
  the system or file system cannot."""
  renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if (
      sys.platform == "linux") else None
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


def _recover(path: pathlib.Path) -> None:
  """Finish a swap that two renames left half done (``path`` missing, its old checkpoint set
  aside): roll forward to the complete new checkpoint, or back to the old (lock held)."""
  if path.exists():
    return
  for entry in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.optcompose-old"),
                      key=lambda p: p.stat().st_ctime, reverse=True):
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
  except BaseException:
    _remove(tmp)
    raise
  _fsync(path.parent)  # make the rename durable
