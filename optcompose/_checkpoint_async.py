"""A save that finishes in the background (``save_orbax_checkpoint(..., block=False)``): its
handle, the directory lock it takes over from the caller, and the wait for it at exit.

At exit Python first runs the exit hooks of ``threading`` (``threading._register_atexit``),
in the reverse order of their registration, and only then joins the threads left running.
``concurrent.futures`` registers one that stops every thread pool: a save still running then
fails inside Orbax ("cannot schedule new futures after interpreter shutdown") and its
checkpoint is never put in place. So the pending saves are waited for by a hook of the same
kind registered after that one (it runs before it), not by the thread join alone.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable, Optional

import numpy as np

_PENDING: set = set()  # the AsyncSaves whose background part has not finished
_UNSEEN: set = set()  # those that failed, and whose wait() has not raised the error yet
_PENDING_GUARD = threading.Lock()
_HOOKED = False


def _wait_for_pending_saves() -> None:
  """At exit, before the thread pools stop: let every pending save finish, then report the
  failures that no ``wait()`` raised."""
  stranded: set = set()  # saves of several processes that can no longer agree
  while True:
    with _PENDING_GUARD:  # a thread that is not running will not finish (a forked child's)
      pending = [s for s in _PENDING if s._thread is not None and s._thread.is_alive()]
    stranded.update(s for s in pending if s._hosts is not None and not _distributed())
    pending = [s for s in pending if s not in stranded]
    if not pending:
      break
    for save in pending:
      save._thread.join()
  for save in sorted(stranded, key=lambda save: os.fspath(save.directory)):
    print(
      f"optcompose: the background save of {os.fspath(save.directory)} could not finish: "
      "jax.distributed was shut down before it (its processes wait for one another); call "
      "wait() before jax.distributed.shutdown(). The previous checkpoint there, if any, is "
      "left in place.",
      file=sys.stderr,
    )
  with _PENDING_GUARD:
    unseen = sorted(_UNSEEN, key=lambda save: os.fspath(save.directory))
    _UNSEEN.clear()
  for save in unseen:
    print(
      f"optcompose: the background save of {os.fspath(save.directory)} failed "
      f"({type(save._error).__name__}: {save._error}); the previous checkpoint there, if any, "
      "is left in place.",
      file=sys.stderr,
    )


def _distributed() -> bool:
  """Whether jax.distributed is still up (a save of several processes can finish only then)."""
  import jax

  is_initialized = getattr(jax.distributed, "is_initialized", None)
  return is_initialized is None or bool(is_initialized())


def _after_fork_in_child() -> None:
  """In a forked child (a DataLoader worker, say): the parent's saves are the parent's (their
  threads do not run here), so its exit waits for none of them, and reports none."""
  global _PENDING_GUARD
  _PENDING_GUARD = threading.Lock()  # another thread may have held it at the fork
  _PENDING.clear()
  _UNSEEN.clear()


if hasattr(os, "register_at_fork"):
  os.register_at_fork(after_in_child=_after_fork_in_child)


def _hook_exit() -> None:
  """Register :func:`_wait_for_pending_saves` once, after ``concurrent.futures``' own hook."""
  global _HOOKED
  if _HOOKED:
    return
  import concurrent.futures.thread  # noqa: F401 -- registers its hook first: ours runs before

  register = getattr(threading, "_register_atexit", None)
  if register is not None:
    try:
      register(_wait_for_pending_saves)
    except RuntimeError:  # the interpreter is exiting already: the thread join still waits
      return
  _HOOKED = True


class AsyncSave:
  """A checkpoint save finishing in the background: ``save_orbax_checkpoint(..., block=False)``.

  The arrays were copied to host memory before it was returned, so the caller may update,
  donate or delete them. The new checkpoint replaces the previous one only when it is
  complete (as with a blocking save); until then the previous one is left in place. An
  exiting interpreter waits for it, and reports on stderr a failure that ``wait()`` did not
  raise (with several processes, call ``wait()`` before ``jax.distributed.shutdown()``: the
  save cannot finish after it, and the exit reports it instead of waiting forever).

  Attributes:
    directory: the checkpoint being written (``pathlib.Path``; ``etils.epath.Path`` for a URL).
  """

  __module__ = "optcompose.checkpoint"

  def __init__(
    self, directory: Any, finish: Callable[[], None], hosts: Any, block: bool, hold: Any = None
  ):
    self.directory, self._hosts, self._settled = directory, hosts, False
    self._error: Optional[BaseException] = None
    self._thread = None
    if block:
      self._run(finish)
      return
    if hold is not None:  # the lock is the background thread's now: the caller may wait for it
      hold.hand_over()
    _hook_exit()
    self._thread = threading.Thread(  # a daemon where the exit hook waits for it (or not:
      target=self._run,  # one of several processes after jax.distributed.shutdown())
      args=(finish,),
      daemon=_HOOKED and hasattr(threading, "_register_atexit"),
      name=f"optcompose-save-{getattr(directory, 'name', '')}",
    )
    with _PENDING_GUARD:
      _PENDING.add(self)
    try:
      self._thread.start()
    except RuntimeError:  # no new thread (the interpreter is exiting): finish it here
      with _PENDING_GUARD:
        _PENDING.discard(self)
      self._thread = None
      self._run(finish)

  def _run(self, finish: Callable[[], None]) -> None:
    try:
      finish()
    except BaseException as e:  # re-raised by wait()
      self._error = e
    if self._thread is not None:
      with _PENDING_GUARD:
        _PENDING.discard(self)
        if self._error is not None:
          _UNSEEN.add(self)

  def done(self) -> bool:
    """Whether this process's part of the save has finished (successfully or not)."""
    return self._thread is None or not self._thread.is_alive()

  def wait(self) -> Any:
    """Block until the checkpoint is complete and in place; return its directory.

    With several processes every process must call it: they wait for each other (the
    checkpoint is in place for all of them on return), and each raises if any failed.

    Returns:
      The checkpoint's directory, as :func:`save_orbax_checkpoint` returns it when blocking.

    Raises:
      Exception: the error of the save on this process (Orbax's, or of the file handling),
        again at every call.
      RuntimeError: the save failed on another process (the message names which).
    """
    if self._thread is not None:
      self._thread.join()
    if self._hosts is not None and not self._settled:  # once, on every process: a collective
      self._settled = True
      ok = np.asarray(self._hosts.process_allgather(np.int32(self._error is None))).reshape(-1)
      failed = [i for i, good in enumerate(ok) if not good]
      if failed and self._error is None:
        self._error = RuntimeError(
          f"save_orbax_checkpoint: the save of {self.directory} failed "
          f"on process(es) {failed}: see their errors."
        )
    if self._error is not None:
      with _PENDING_GUARD:
        _UNSEEN.discard(self)
      raise self._error
    return self.directory

  wait_until_finished = wait  # Orbax's name

  def __repr__(self) -> str:
    return f"AsyncSave({os.fspath(self.directory)!r}, {'done' if self.done() else 'in progress'})"
