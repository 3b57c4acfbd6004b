"""Checkpoints that would have been lost or misread, found by a tester: a background save cut
short by the interpreter's exit; leaves a format stores but does not read back (or stores
wrongly); a path Orbax saves into without its arrays; a next save in the thread that started a
background one; a saved Python number that its template's dtype cannot hold; Orbax's raw
errors for a damaged data file or an empty node on one side; a FIFO at the path. Each test
fails without its fix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc
from optcompose import _checkpoint_guard as guard
from optcompose import checkpoint as ck
from optcompose.checkpoint import CheckpointCorruptError, CheckpointMismatchError

ocp = pytest.importorskip("orbax.checkpoint")


def listing(directory) -> list:
  return sorted(os.listdir(directory))


# ----------------------------------------------------------------------------------------
# A background save still running when the script ends.


def run_script(code: str, tmp_path) -> subprocess.CompletedProcess:
  script = tmp_path / "script.py"
  script.write_text(textwrap.dedent(code))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this optcompose
  path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
  return subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=tmp_path,
    env={**os.environ, "PYTHONPATH": path},
  )


def test_a_script_ending_right_after_a_background_save_leaves_the_checkpoint(tmp_path):
  """The last line of a training script, ``save_orbax_checkpoint(..., block=False)``: the
  interpreter stopped the thread pools Orbax finishes with before the save was done, so the
  script exited with status 0 and no checkpoint, only a hidden temporary directory. It now
  waits for the save first; the checkpoint restores in another process."""
  done = run_script(
    """
    import jax, jax.numpy as jnp
    from optcompose.checkpoint import save_orbax_checkpoint
    state = {"w": jax.random.uniform(jax.random.key(0), (1_000_000,)), "step": jnp.int32(7)}
    save_orbax_checkpoint("final", state, block=False)  # and nothing after it
    """,
    tmp_path,
  )
  assert done.returncode == 0, done.stderr
  assert "cannot schedule new futures" not in done.stderr
  assert listing(tmp_path) == ["final", "script.py"]
  expected = {"w": jax.random.uniform(jax.random.key(0), (1_000_000,)), "step": jnp.int32(7)}
  restored = ck.restore_orbax_checkpoint(tmp_path / "final", expected)
  assert int(restored["step"]) == 7
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(expected["w"]))


def test_a_background_save_that_fails_unwaited_is_reported_at_exit(tmp_path):
  """Nobody called ``wait()``, so nothing raised the save's error: the exiting interpreter
  says on stderr that it failed and that the previous checkpoint stays."""
  done = run_script(
    """
    import jax.numpy as jnp
    from optcompose import checkpoint as ck
    ck.save_orbax_checkpoint("ckpt", {"w": jnp.ones(3)})
    def full_disk(new, directory):
      raise OSError(28, "No space left on device")
    ck._install = full_disk
    ck.save_orbax_checkpoint("ckpt", {"w": jnp.zeros(3)}, overwrite=True, block=False)
    """,
    tmp_path,
  )
  assert done.returncode == 0, done.stderr
  assert "the background save of" in done.stderr and "No space left on device" in done.stderr
  assert listing(tmp_path) == ["ckpt", "script.py"]
  restored = ck.restore_orbax_checkpoint(tmp_path / "ckpt", {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(3))


def test_a_child_forked_during_a_background_save_exits_and_frees_the_lock(tmp_path):
  """A child forked (a DataLoader worker, say) while a background save ran inherited the
  pending save, whose thread does not run in it: its exit waited for it forever; and its copy
  of the lock's descriptor kept the directory locked, so the parent's next save there waited
  until the child was killed. The child forgets both now (closing the copy leaves the
  parent's lock in place)."""
  done = run_script(
    """
    import fcntl, multiprocessing, os, threading
    import jax.numpy as jnp
    from optcompose import checkpoint as ck
    go, install = threading.Event(), ck._install
    def held_install(new, directory):
      assert go.wait(600)
      install(new, directory)
    ck._install = held_install
    save = ck.save_orbax_checkpoint("ckpt", {"w": jnp.ones(3)}, block=False)
    context = multiprocessing.get_context("fork")
    release = context.Event()
    child = context.Process(target=release.wait)  # does nothing with checkpoints
    child.start()
    go.set()
    save.wait()
    fd = os.open(".", os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      print("lock free: True")
    except BlockingIOError:
      print("lock free: False")
    os.close(fd)
    release.set()
    child.join(300)
    print("child ended:", not child.is_alive(), child.exitcode)
    if child.is_alive():
      child.kill()
    """,
    tmp_path,
  )
  assert done.returncode == 0, done.stderr
  assert "lock free: True" in done.stdout, done.stdout
  assert "child ended: True 0" in done.stdout, done.stdout
  assert listing(tmp_path) == ["ckpt", "script.py"]


def test_a_save_of_several_processes_after_distributed_shutdown_is_reported_not_awaited(tmp_path):
  """With several processes, each ending with ``save_orbax_checkpoint(..., block=False)`` and
  ``jax.distributed.shutdown()``, a process could wait at exit forever for a save whose
  processes can no longer agree. Such a save (simulated here: one of several processes, which
  never finishes, with jax.distributed not running) is reported on stderr instead."""
  done = run_script(
    """
    import threading
    from optcompose._checkpoint_async import AsyncSave
    never = threading.Event()
    AsyncSave("ckpt", never.wait, hosts=object(), block=False)
    """,
    tmp_path,
  )
  assert done.returncode == 0, done.stderr
  assert "could not finish: jax.distributed was shut down" in done.stderr, done.stderr
  assert "wait() before jax.distributed.shutdown()" in done.stderr


# ----------------------------------------------------------------------------------------
# The directory lock of a background save.


@pytest.mark.parametrize("then", ["save", "restore"])
def test_a_save_or_restore_after_a_background_save_in_the_same_thread_waits(
  tmp_path, monkeypatch, then
):
  """The lock a background save holds was counted against the thread that started it, so a
  next save or restore in that directory from the same thread took itself for a signal
  handler interrupting its own save and raised. It now waits for the save to finish (the
  background save is held until this thread is about to wait for the lock)."""
  state = {"w": jnp.arange(4.0), "step": jnp.int32(1)}
  release = threading.Event()
  install = ck._install

  def held_install(new, directory):
    assert release.wait(600)
    install(new, directory)

  real_fcntl = guard.fcntl

  class Fcntl:  # the lock call: the caller is about to wait for the background save
    LOCK_EX, LOCK_SH = real_fcntl.LOCK_EX, real_fcntl.LOCK_SH

    @staticmethod
    def flock(fd, operation):
      if threading.current_thread() is threading.main_thread():
        release.set()
      return real_fcntl.flock(fd, operation)

  monkeypatch.setattr(ck, "_install", held_install)
  monkeypatch.setattr(guard, "fcntl", Fcntl)
  pending = ck.save_orbax_checkpoint(tmp_path / "step_1", state, block=False)
  try:
    if then == "save":
      ck.save_orbax_checkpoint(tmp_path / "step_2", {**state, "step": jnp.int32(2)})
      assert pending.done()  # it waited for the first save
      restored = ck.restore_orbax_checkpoint(tmp_path / "step_2", state)
      assert int(restored["step"]) == 2
    else:
      restored = ck.restore_orbax_checkpoint(tmp_path / "step_1", state)
      assert int(restored["step"]) == 1
  finally:
    release.set()  # (had the call raised, the held save would wait for nothing)
  assert pending.wait() == tmp_path / "step_1"


def test_the_signal_handler_guard_still_holds_for_a_blocking_save(tmp_path):
  """What that check is for: a save holding the lock in this thread (a handler interrupted
  it) makes a second one in this thread raise instead of waiting for itself."""
  with guard._locked(tmp_path):
    with pytest.raises(RuntimeError, match="would wait for it forever"):
      ck.save_checkpoint(tmp_path / "c.msgpack", {"w": jnp.ones(2)})


# ----------------------------------------------------------------------------------------
# Leaves a format cannot store, or not read back: refused before anything is written.

MSGPACK_REFUSED = {
  "np.str_": (lambda: np.array(["adamw"])[0], "an array of strings"),
  "string array": (lambda: np.array(["a", "b"]), "an array of strings"),
  "bytes array": (lambda: np.array([b"a"]), "an array of strings"),
  "float0": (lambda: np.zeros(3, jax.dtypes.float0), "a float0 array"),
  "structured": (lambda: np.zeros(2, [("a", "i4")]), "does not read back"),
  "big-endian": (lambda: np.arange(3, dtype=">f4"), r"newbyteorder"),
  "objects": (lambda: np.array([object()], dtype=object), "Python objects"),
  "int beyond 64 bits": (lambda: 2**70, "wider than 64 bits"),
  "deleted": (lambda: _deleted(), "a deleted jax.Array"),
}


def _deleted():
  x = jnp.ones(3)
  x.delete()  # as a donated buffer is
  return x


@pytest.mark.parametrize("kind", sorted(MSGPACK_REFUSED))
def test_a_leaf_msgpack_would_not_read_back_is_refused_and_the_old_file_kept(tmp_path, kind):
  """The save succeeded, replaced the previous checkpoint, and every restore then raised
  CheckpointCorruptError (or, big-endian, restored byte-swapped values): the run was lost."""
  make, words = MSGPACK_REFUSED[kind]
  path = tmp_path / "ck.msgpack"
  ck.save_checkpoint(path, {"w": jnp.ones(3), "meta": 1})
  before = path.read_bytes()
  with pytest.raises(TypeError, match=rf"save_checkpoint: `\['meta'\]` is .*{words}"):
    ck.save_checkpoint(path, {"w": jnp.full(3, 2.0), "meta": make()})
  assert path.read_bytes() == before and listing(tmp_path) == ["ck.msgpack"]


def test_what_msgpack_reads_back_is_still_saved(tmp_path):
  """Kinds the check must not refuse: they round-trip exactly."""
  tree = {
    "bf16": jnp.arange(3, dtype=jnp.bfloat16),
    "int4": np.arange(3).astype(jnp.int4),
    "date": np.array(["2024-01-01"], "datetime64[D]"),
    "name": "adamw",
    "big": 2**64 - 1,
    "small": -(2**63),
    "c": 1 + 2j,
    "none": None,
  }
  path = ck.save_checkpoint(tmp_path / "ck.msgpack", tree)
  restored = ck.restore_checkpoint(path, tree)
  for name, value in tree.items():
    if name != "none":
      assert np.asarray(restored[name]).dtype == np.asarray(value).dtype, name
      assert np.asarray(restored[name]).tobytes() == np.asarray(value).tobytes(), name


ORBAX_REFUSED = {
  "objects": (lambda: np.array([object()], dtype=object), "Python objects"),
  "int beyond 64 bits": (lambda: 2**70, "wider than 64 bits"),
  "float0": (lambda: np.zeros(2, jax.dtypes.float0), "a float0 array"),
  "np.str_": (lambda: np.str_("adamw"), "an array of strings"),
  "uint4": (lambda: jnp.asarray([1], jnp.uint4), "dtype uint4, which Orbax"),
  "datetime64": (lambda: np.array(["2024-01-01"], "datetime64[D]"), "datetime64"),
  "float128": (lambda: np.zeros(2, np.longdouble), "which Orbax"),
  "empty": (lambda: np.zeros((0, 3)), "an empty array"),
  "deleted": (lambda: _deleted(), "a deleted jax.Array"),
}


@pytest.mark.parametrize("kind", sorted(ORBAX_REFUSED))
def test_a_leaf_orbax_cannot_store_is_named_before_anything_is_written(tmp_path, kind):
  """These passed the check and failed inside Orbax, naming no leaf (NumPy's "Cannot change
  data-type for array of references", TensorStore's "Unsupported data type"), and left
  Orbax's temporary directory behind."""
  make, words = ORBAX_REFUSED[kind]
  path = tmp_path / "ckpt"
  ck.save_orbax_checkpoint(path, {"w": jnp.ones(3)})
  for block in (True, False):
    with pytest.raises(TypeError, match=rf"`\['meta'\]\['x'\]` is .*{words}"):
      ck.save_orbax_checkpoint(
        path, {"w": jnp.zeros(3), "meta": {"x": make()}}, overwrite=True, block=block
      )
  assert listing(tmp_path) == ["ckpt"]
  restored = ck.restore_orbax_checkpoint(path, {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(3))


def test_numpy_scalars_round_trip_through_orbax(tmp_path):
  """Orbax 0.10 refused a NumPy scalar that is no Python number with its own "Unsupported
  type", naming no leaf path; Orbax 0.12 stores it as a 0-d array. It is given to every Orbax
  as that array now, and restores as the template's kind, of its dtype and value."""
  saved = {"f32": np.float32(1.5), "i64": np.int64(3), "b": np.bool_(True), "u8": np.uint8(7)}
  ck.save_orbax_checkpoint(tmp_path / "ckpt", {"w": jnp.ones(2), "meta": saved})
  template = {"w": jnp.zeros(2), "meta": {k: type(v)(0) for k, v in saved.items()}}
  restored = ck.restore_orbax_checkpoint(tmp_path / "ckpt", template)["meta"]
  for name, value in saved.items():
    assert type(restored[name]) is type(value), name
    assert restored[name] == value, name


@pytest.mark.parametrize("block", [True, False])
def test_a_save_that_fails_while_orbax_writes_removes_orbax_s_temporary_directory(
  tmp_path, monkeypatch, block
):
  """A full disk, say, while Orbax writes: its temporary directory
  (``.NAME.<hex>.optcompose-new.orbax-checkpoint-tmp``) stayed until the next save to the same
  name (never, for a save under a new name each step). It is removed with the failure; the
  previous checkpoint stays."""
  path = tmp_path / "ckpt"
  ck.save_orbax_checkpoint(path, {"w": jnp.ones(3)})
  failed = []

  def writing_save(self, directory, *args, **kwargs):
    os.makedirs(f"{directory}.orbax-checkpoint-tmp")  # as Orbax starts writing

  def full_disk(self):
    if not failed:
      failed.append(True)
      raise OSError(28, "No space left on device")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", writing_save)
  monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", full_disk)
  with pytest.raises(OSError, match="No space left"):
    save = ck.save_orbax_checkpoint(path, {"w": jnp.zeros(3)}, overwrite=True, block=block)
    save.wait()
  assert listing(tmp_path) == ["ckpt"]
  monkeypatch.undo()
  restored = ck.restore_orbax_checkpoint(path, {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(3))


def test_that_cleanup_keeps_a_previous_checkpoint_set_aside_by_a_cut_swap(tmp_path, monkeypatch):
  """Where the swap takes two renames (no ``renameat2``) and the second fails, the previous
  checkpoint is set aside under a temporary name: the failed save's cleanup removes its own
  directories only, and the next restore puts the previous checkpoint back."""
  from optcompose import _checkpoint_io

  path = tmp_path / "ckpt"
  ck.save_orbax_checkpoint(path, {"w": jnp.ones(3)})
  rename = os.rename

  def second_rename_fails(src, dst):
    if str(src).endswith(".optcompose-new") and str(dst) == str(path):
      raise OSError(5, "Input/output error")
    rename(src, dst)

  monkeypatch.setattr(_checkpoint_io, "_exchange", lambda a, b: False)
  monkeypatch.setattr(os, "rename", second_rename_fails)
  with pytest.raises(OSError, match="Input/output error"):
    ck.save_orbax_checkpoint(path, {"w": jnp.zeros(3)}, overwrite=True)
  monkeypatch.undo()
  assert not path.exists()  # set aside, between the two renames
  restored = ck.restore_orbax_checkpoint(path, {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(3))


@pytest.mark.parametrize("name", ["run[lr=0.1]", "sweep[0]/step_1", "run["])
def test_an_orbax_path_with_a_bracket_is_refused_before_anything_is_written(tmp_path, name):
  """Orbax finds its per-process files with a glob of the path, which reads brackets as a
  pattern: the save returned normally and wrote a checkpoint without its arrays (a second
  save replaced a good one with it)."""
  with pytest.raises(ValueError, match=r"has a '\[' in it.*use another name"):
    ck.save_orbax_checkpoint(tmp_path / name, {"w": jnp.ones(3)})
  assert listing(tmp_path) == []


@pytest.mark.parametrize("name", ["a]b", "run]/step_1"])
def test_an_orbax_path_with_a_closing_bracket_alone_is_saved_and_restored(tmp_path, name):
  """Only ``[`` makes a glob pattern: a path with a ``]`` alone saved and restored fine, and
  was refused with the ``[``."""
  ck.save_orbax_checkpoint(tmp_path / name, {"w": jnp.arange(3.0)})
  restored = ck.restore_orbax_checkpoint(tmp_path / name, {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(3.0))


# ----------------------------------------------------------------------------------------
# Restoring.


@pytest.mark.parametrize("backend", ["msgpack", "orbax"])
def test_a_saved_python_number_its_template_dtype_cannot_hold_is_a_mismatch(tmp_path, backend):
  """1e300 came back as inf in a float32 template, without a word; 2**40 into int32 raised
  NumPy's bare OverflowError (and into an np.int32 template came back as an int64). Each is
  a CheckpointMismatchError naming the leaf; what fits still restores, in the template's
  dtype (a float rounded to float32, as any float32 arithmetic rounds it)."""
  save, restore = {
    "msgpack": (ck.save_checkpoint, ck.restore_checkpoint),
    "orbax": (ck.save_orbax_checkpoint, ck.restore_orbax_checkpoint),
  }[backend]
  for value, template, words in (
    (1e300, jnp.zeros([], jnp.float32), r"float 1e\+300.*would become inf"),
    (2**40, jnp.zeros([], jnp.int32), r"int 1099511627776.*outside its range"),
    (2**40, np.int32(0), r"int 1099511627776.*outside its range"),
    (-5, jax.ShapeDtypeStruct((), jnp.uint32), r"int -5.*outside its range"),
  ):
    path = save(tmp_path / f"c{len(os.listdir(tmp_path))}", {"x": value})
    with pytest.raises(CheckpointMismatchError, match=rf"`\['x'\]` is the Python {words}"):
      restore(path, {"x": template})
  path = save(tmp_path / "fits", {"lr": 0.1, "n": 5, "inf": float("inf")})
  restored = restore(path, {"lr": jnp.zeros([]), "n": np.int32(0), "inf": np.zeros([], np.float32)})
  assert restored["lr"].dtype == jnp.float32 and float(restored["lr"]) == np.float32(0.1)
  assert type(restored["n"]) is np.int32 and restored["n"] == 5
  assert restored["inf"].dtype == np.float32 and np.isinf(restored["inf"])


def test_an_orbax_checkpoint_of_another_chain_names_the_empty_node(tmp_path):
  """Adam's state and AdamW's differ only by an ``EmptyState`` (no leaf): Orbax raised its
  raw "tree structures do not match ... pass partial_restore=True" (an option this module
  does not take; it would keep the template's values). It is a CheckpointMismatchError
  naming the node, as the msgpack restore names it."""
  params = {"w": jnp.ones(3)}
  ck.save_orbax_checkpoint(tmp_path / "adam", {"opt_state": oc.adam(1e-2).init(params)})
  ck.save_orbax_checkpoint(tmp_path / "adamw", {"opt_state": oc.adamw(1e-2).init(params)})
  with pytest.raises(
    CheckpointMismatchError, match=r"`\['opt_state'\]\[2\]` is only in `target` \(another"
  ):
    ck.restore_orbax_checkpoint(tmp_path / "adam", {"opt_state": oc.adamw(1e-2).init(params)})
  with pytest.raises(
    CheckpointMismatchError, match=r"`\['opt_state'\]\[2\]` is only in the checkpoint"
  ):
    ck.restore_orbax_checkpoint(tmp_path / "adamw", {"opt_state": oc.adam(1e-2).init(params)})
  optax = pytest.importorskip("optax")
  injected = optax.inject_hyperparams(optax.adam)(learning_rate=0.1).init(params)
  ck.save_orbax_checkpoint(tmp_path / "optax", {"opt_state": injected})
  ours = oc.inject_hyperparams(oc.adam)(learning_rate=0.1).init(params)
  with pytest.raises(CheckpointMismatchError, match=r"`\['opt_state'\]\['hyperparams_states'\]`"):
    ck.restore_orbax_checkpoint(tmp_path / "optax", {"opt_state": ours})


@pytest.mark.parametrize("damage", ["truncated", "missing", "overwritten"])
def test_a_damaged_orbax_data_file_is_a_corrupt_checkpoint(tmp_path, damage):
  """An interrupted copy of a checkpoint: Orbax wraps TensorStore's error in a bare
  ``Exception`` (a TensorStore spec dump), which no ``except ValueError`` caught. It is the
  documented CheckpointCorruptError, naming the directory and TensorStore's reason."""
  tree = {"a": jax.random.uniform(jax.random.key(0), (100_000,))}
  path = ck.save_orbax_checkpoint(tmp_path / "ck", tree)
  data = path / "ocdbt.process_0" / "d"
  biggest = max(data.iterdir(), key=lambda f: f.stat().st_size)
  if damage == "truncated":
    os.truncate(biggest, biggest.stat().st_size // 2)
  elif damage == "missing":
    biggest.unlink()
  else:
    with open(biggest, "r+b") as f:
      f.write(b"\0" * 64)
  with pytest.raises(CheckpointCorruptError, match=rf"{path} is damaged.*its arrays"):
    ck.restore_orbax_checkpoint(path, tree)


# ----------------------------------------------------------------------------------------
# A path that is not a regular file.


@pytest.mark.parametrize("call", ["save", "restore"])
def test_a_fifo_at_the_path_is_refused_without_opening_it(tmp_path, call):
  """Opening a FIFO waits for a writer: the save (and the restore) hung forever; a device
  such as /dev/zero would be read without end. Both say the path is not a regular file."""
  fifo = tmp_path / "ck.msgpack"
  os.mkfifo(fifo)
  outcome = []

  def attempt():
    try:
      if call == "save":
        ck.save_checkpoint(fifo, {"w": jnp.ones(3)})
      else:
        ck.restore_checkpoint(fifo, {"w": jnp.ones(3)})
    except Exception as e:  # noqa: BLE001 -- checked below
      outcome.append(e)

  worker = threading.Thread(target=attempt, daemon=True)
  worker.start()
  worker.join(120)
  if worker.is_alive():  # hung in open(): give it a writer and an end of file
    os.close(os.open(fifo, os.O_WRONLY))
    worker.join(120)
    pytest.fail("the call opened the FIFO and waited for a writer")
  assert len(outcome) == 1 and isinstance(outcome[0], ValueError), outcome
  assert "is a FIFO (named pipe), not a regular file" in str(outcome[0])


def test_an_orbax_save_whose_data_cannot_be_flushed_fails_and_keeps_the_previous(
  tmp_path, monkeypatch
):
  """Every fsync of the new checkpoint's files failed (EIO: the data may never reach the
  disk), yet save_orbax_checkpoint returned and deleted the previous checkpoint (the
  filesystem-faults trial). A file that cannot be flushed now fails the save; only a
  directory's flush stays best effort."""
  import errno

  path = tmp_path / "ckpt"
  ck.save_orbax_checkpoint(path, {"w": jnp.ones(3)})
  real_fsync = os.fsync

  def failing(fd):
    if not os.path.isdir(f"/proc/self/fd/{fd}"):
      raise OSError(errno.EIO, "Input/output error")
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", failing)
  with pytest.raises(OSError, match="Input/output error"):
    ck.save_orbax_checkpoint(path, {"w": jnp.zeros(3)}, overwrite=True)
  monkeypatch.setattr(os, "fsync", real_fsync)
  restored = ck.restore_orbax_checkpoint(path, {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(restored["w"], np.ones(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries left


def test_a_previous_checkpoint_that_cannot_be_deleted_is_reported(tmp_path, monkeypatch):
  """After the swap the previous checkpoint is deleted; where that failed (a directory the
  user cannot write), a full copy stayed behind under a hidden '...optcompose-new' name,
  silently. Now a warning names it."""
  from optcompose import _checkpoint_io

  path = tmp_path / "ckpt"
  ck.save_orbax_checkpoint(path, {"w": jnp.ones(3)})
  monkeypatch.setattr(_checkpoint_io, "_remove", lambda p: None)  # as if rmtree failed
  with pytest.warns(
    UserWarning, match=r"could not be \(wholly\) deleted; it is left as .*optcompose"
  ):
    ck.save_orbax_checkpoint(path, {"w": jnp.zeros(3)}, overwrite=True)
  restored = ck.restore_orbax_checkpoint(path, {"w": jnp.ones(3)})
  np.testing.assert_array_equal(restored["w"], np.zeros(3))


def test_an_orbax_checkpoint_that_cannot_be_read_back_never_replaces_the_previous(
  tmp_path, monkeypatch
):
  """One failed directory listing inside Orbax (EIO) made it skip merging its arrays' index
  and commit a checkpoint it could not read; the save returned, the previous checkpoint was
  deleted, and the next restore failed (the filesystem-faults trial). The checkpoint written
  is now read back before the swap. Simulated here by removing the merged index Orbax
  writes, as that failure leaves it."""
  import shutil

  real = ck._written

  def index_lost(checkpointer, new, directory):
    (new / "manifest.ocdbt").unlink()
    shutil.rmtree(new / "d")
    return real(checkpointer, new, directory)

  path = tmp_path / "ckpt"
  ck.save_orbax_checkpoint(path, {"w": jnp.ones(3)})
  monkeypatch.setattr(ck, "_written", index_lost)
  with pytest.raises(CheckpointCorruptError, match="cannot read back.*keeps what it held"):
    ck.save_orbax_checkpoint(path, {"w": jnp.zeros(3)}, overwrite=True)
  restored = ck.restore_orbax_checkpoint(path, {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(restored["w"], np.ones(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries left


@pytest.mark.parametrize(
  "damage", ["first-byte", "write_shape", "param_name", "chunk_shape", '"array_metadata"']
)
def test_damaged_orbax_array_metadata_is_a_corrupt_checkpoint(tmp_path, damage):
  """A flipped bit in Orbax's per-array metadata file gave a bare UnicodeDecodeError or
  KeyError from its parser (the filesystem-faults trial), naming neither the checkpoint nor
  the damage; in an entry's key, an AttributeError of Orbax's array handler (the
  reproducibility trial)."""
  path = tmp_path / "ckpt"
  tree = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  ck.save_orbax_checkpoint(path, tree)
  file = path / "array_metadatas" / "process_0"
  if not file.exists():
    pytest.skip("this Orbax writes no per-array metadata file")
  data = bytearray(file.read_bytes())
  if damage == '"array_metadata"':  # a letter of the key: '"array[metadata"', still JSON
    data[data.find(damage.encode()) + 6] ^= 0x04
  else:
    data[0 if damage == "first-byte" else data.find(damage.encode())] ^= (
      0x80 if damage == "first-byte" else 1
    )
  file.write_bytes(bytes(data))
  with pytest.raises(CheckpointCorruptError, match=f"{path.name} is damaged or unreadable"):
    ck.restore_orbax_checkpoint(path, tree)


def test_a_save_through_a_symbolic_link_writes_where_it_points(tmp_path):
  """``run/ckpt -> /scratch/ckpt`` (checkpoints kept on a bigger disk): both formats replaced
  the link with a file or directory of their own in ``run/`` (the filesystem-faults trial),
  so the data landed on the small disk and the target kept a stale checkpoint."""
  scratch, run = tmp_path / "scratch", tmp_path / "run"
  scratch.mkdir()
  run.mkdir()
  for name, save, restore in [
    ("ckpt.msgpack", ck.save_checkpoint, ck.restore_checkpoint),
    ("ckpt", ck.save_orbax_checkpoint, ck.restore_orbax_checkpoint),
  ]:
    link = run / name
    link.symlink_to(scratch / name)  # dangling until the first save
    for value in (1.0, 2.0):
      kwargs = {"overwrite": True} if save is ck.save_orbax_checkpoint else {}
      save(link, {"w": jnp.full(3, value)}, **kwargs)
      assert link.is_symlink() and (scratch / name).exists()
      np.testing.assert_array_equal(restore(link, {"w": jnp.zeros(3)})["w"], np.full(3, value))
  ck.save_orbax_checkpoint(f"{run / 'ckpt'}/", {"w": jnp.full(3, 3.0)}, overwrite=True)
  assert (run / "ckpt").is_symlink()  # written "ckpt/" too
  assert sorted(p.name for p in run.iterdir()) == ["ckpt", "ckpt.msgpack"]  # the two links


def test_save_errors_name_the_path(tmp_path, monkeypatch):
  """A full disk during a msgpack save was '[Errno 28] No space left on device', naming no
  file; an Orbax save to '/' or under a file was pathlib's or mkdir's bare error (the
  filesystem-faults trial). Each now names the path (and the function)."""
  import errno

  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ValueError, match="save_orbax_checkpoint: / is the root"):
    ck.save_orbax_checkpoint("/", {"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="save_orbax_checkpoint: .*a_file is a file, so"):
    ck.save_orbax_checkpoint(tmp_path / "a_file" / "ckpt", {"w": jnp.ones(2)})

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match=r"No space left on device: .*ckpt\.msgpack") as caught:
    ck.save_checkpoint(tmp_path / "ckpt.msgpack", {"w": jnp.ones(2)})
  assert caught.value.errno == errno.ENOSPC
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing left


def test_a_damaged_msgpack_header_is_called_damaged(tmp_path):
  """A flipped bit in the header's format key made the file read as Flax's bare state dict,
  then a template mismatch with a hint to migrate Optax's state; a flipped format number
  was 'upgrade optcompose' only (the filesystem-faults trial)."""
  from optcompose._checkpoint_check import FORMAT_KEY

  path = tmp_path / "ckpt.msgpack"
  tree = {"w": jnp.ones(3)}
  ck.save_checkpoint(path, tree)
  data = path.read_bytes()
  at = data.find(FORMAT_KEY.encode())
  key_flipped = bytearray(data)
  key_flipped[at + 3] ^= 1
  path.write_bytes(bytes(key_flipped))
  with pytest.raises(CheckpointCorruptError, match="is damaged: its header"):
    ck.restore_checkpoint(path, tree)
  number_flipped = bytearray(data)
  number_flipped[at + len(FORMAT_KEY)] ^= 1  # the fixint after the key: format 2 -> 3
  path.write_bytes(bytes(number_flipped))
  with pytest.raises(ValueError, match="has format 3 .*newer optcompose .*or damaged"):
    ck.restore_checkpoint(path, tree)
  name_flipped = bytearray(data)  # this format's checksum name, "crc32" -> "crc#2": damage
  at = data.find(b"crc32", data.find(b"checksum"))
  name_flipped[at + 3] ^= 0x10
  path.write_bytes(bytes(name_flipped))
  with pytest.raises(CheckpointCorruptError, match="format 2 \\('crc#2'\\), where format 2"):
    ck.restore_checkpoint(path, tree)
