"""Checkpoints under faults: saves killed at random moments (SIGKILL) leave the old checkpoint
or the new one, whole, in both formats, and the next save leaves no leftovers; a crash
between the two renames of the fallback swap is repaired; concurrent saves to one path leave
one whole checkpoint; a flipped byte, a damaged Orbax directory and a FlatParams of another
layout are refused with errors that say so. tools/kill_test.py is the full measurement."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc
from optcompose import checkpoint as ck
from optcompose.checkpoint import CheckpointCorruptError, CheckpointMismatchError

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
import kill_test  # tools/kill_test.py: the child process and the kill rounds)

MB = 2  # the state's size in the subprocess tests (the tool's default is 64)
SUBPROCESSES = pytest.mark.xdist_group("checkpoint_subprocesses")  # timing: one worker


def functions(fmt: str):
  """(save with overwrite, restore, file name) of a format; Orbax is a test extra."""
  if fmt.startswith("orbax"):
    pytest.importorskip("orbax.checkpoint")
  return kill_test.functions(fmt)


def listing(path: pathlib.Path) -> list:
  return sorted(os.listdir(path.parent))


# ----------------------------------------------------------------------------------------
# Crashes.


@pytest.mark.parametrize("fmt,kills", [("msgpack", 4), ("orbax", 4), ("orbax-renames", 2)])
@SUBPROCESSES
def test_killed_saves_leave_a_whole_checkpoint(tmp_path, fmt, kills):
  functions(fmt)  # skips without Orbax
  results = kill_test.measure(fmt, kills, MB, seed=14, directory=tmp_path)
  for r in results:
    assert r["ok"], r  # restored, whole, and the old version or the new one
    assert r["left_after_next_save"] == [], r


def test_leftovers_of_interrupted_saves_are_removed_by_the_next_save(tmp_path):
  functions("orbax")
  hexname = "0123456789abcdef" * 2
  ours = [
    f".ckpt.msgpack.{hexname}.tmp",
    f".ckpt_orbax.{hexname}.optcompose-new",
    f".ckpt_orbax.{hexname}.optcompose-new.orbax-checkpoint-tmp-17",
    "ckpt_orbax.orbax-checkpoint-tmp-1723",
    f".ckpt_orbax.{hexname}.optcompose-old",
  ]
  theirs = [".ckpt.msgpack.notes", f".other.{hexname}.tmp", "ckpt_orbax.txt"]
  tree = {"w": jnp.arange(3.0)}
  ck.save_checkpoint(tmp_path / "ckpt.msgpack", tree)
  ck.save_orbax_checkpoint(tmp_path / "ckpt_orbax", tree)
  for name in ours + theirs:
    if "optcompose" in name or "orbax-checkpoint-tmp" in name:
      (tmp_path / name).mkdir()
      (tmp_path / name / "data").write_bytes(b"x" * 100)
    else:
      (tmp_path / name).write_bytes(b"x")
  ck.save_checkpoint(tmp_path / "ckpt.msgpack", tree)
  ck.save_orbax_checkpoint(tmp_path / "ckpt_orbax", tree, overwrite=True)
  assert listing(tmp_path / "x") == sorted(theirs + ["ckpt.msgpack", "ckpt_orbax"])


_CRASH_BETWEEN_RENAMES = """
import os, sys
sys.path.insert(0, {tools!r})
import kill_test
from optcompose import _checkpoint_io
_checkpoint_io._exchange = lambda a, b: False  # the two-rename fallback
rename = os.rename
def crash_after_setting_the_old_aside(src, dst):
  rename(src, dst)
  if str(dst).endswith(".optcompose-old"):
    os._exit(9)  # as if killed: no cleanup runs
os.rename = crash_after_setting_the_old_aside
kill_test.functions("orbax")[0]({path!r}, kill_test.make_state(2, 0.1))
"""


@SUBPROCESSES
def test_a_crash_between_the_two_renames_is_repaired(tmp_path):
  save, restore, name = functions("orbax")
  path = tmp_path / name
  template = kill_test.make_state(0, 0.1)
  for roll in ("forward", "back"):
    save(path, kill_test.make_state(1, 0.1))
    code = _CRASH_BETWEEN_RENAMES.format(tools=str(kill_test.ROOT / "tools"), path=str(path))
    env = {**os.environ, "PYTHONPATH": str(kill_test.ROOT)}
    crashed = subprocess.run(
      [sys.executable, "-c", code], env=env, capture_output=True, check=False
    )
    assert crashed.returncode == 9, crashed.stderr[-2000:]
    assert name not in listing(path)  # the checkpoint is set aside, the new one is complete
    if roll == "back":  # the new one lost as well: the old one is put back
      for entry in tmp_path.glob(".*optcompose-new"):
        shutil.rmtree(entry)
    want = 2 if roll == "forward" else 1
    assert kill_test.version_of(restore(path, template), 0.1) == want
    save(path, kill_test.make_state(3, 0.1))
    assert listing(path) == [name]


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
@SUBPROCESSES
def test_concurrent_saves_leave_one_whole_checkpoint(tmp_path, fmt):
  save, restore, name = functions(fmt)
  path = tmp_path / name
  save(path, kill_test.make_state(0, MB))
  children = [
    kill_test.spawn(fmt, path, MB, start, count=4, stderr=subprocess.PIPE) for start in (100, 200)
  ]
  outputs = [child.communicate(timeout=120) for child in children]
  assert [child.returncode for child in children] == [0, 0], [e[-2000:] for _, e in outputs]
  assert len("".join(out for out, _ in outputs).splitlines()) == 8
  assert kill_test.version_of(restore(path, kill_test.make_state(0, MB)), MB) in (104, 204)
  assert listing(path) == [name]


def test_saves_take_turns_under_the_directory_lock(tmp_path):
  from optcompose._checkpoint_io import _locked

  done = threading.Event()
  with _locked(tmp_path):
    thread = threading.Thread(
      target=lambda: (ck.save_checkpoint(tmp_path / "ckpt.msgpack", {"w": np.ones(3)}), done.set())
    )
    thread.start()
    time.sleep(0.3)
    assert not done.is_set()  # waits for the lock
  thread.join(timeout=30)
  assert done.is_set() and listing(tmp_path / "x") == ["ckpt.msgpack"]


# ----------------------------------------------------------------------------------------
# Damaged checkpoints.


def _flip_a_byte(path: pathlib.Path, at: int) -> None:
  data = bytearray(path.read_bytes())
  data[at] ^= 0x10
  path.write_bytes(bytes(data))


def _state():
  return {
    "params": {
      "w": np.random.default_rng(1).integers(-(2**31), 2**31, 50_000, np.int32),
      "b": jnp.arange(4.0),
    },
    "step": jnp.asarray(7, jnp.int32),
  }


def test_a_flipped_byte_is_detected_msgpack(tmp_path):
  path = tmp_path / "ckpt.msgpack"
  ck.save_checkpoint(path, _state())
  at = path.read_bytes().find(_state()["params"]["w"].tobytes())
  assert at > 0
  _flip_a_byte(path, at + 12345)
  with pytest.raises(CheckpointCorruptError, match=r"damaged: the data of `\['params'\]\['w'\]`"):
    ck.restore_checkpoint(path, _state())
  with pytest.raises(CheckpointCorruptError):  # also without a template
    ck.restore_checkpoint(path, None)
  assert (
    isinstance(CheckpointCorruptError("x"), ValueError) and "CheckpointCorruptError" in ck.__all__
  )


def test_a_flipped_byte_is_detected_orbax(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  path = tmp_path / "ckpt_orbax"
  ck.save_orbax_checkpoint(path, _state())
  biggest = max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  assert biggest.stat().st_size >= 200_000  # the int32 array, stored as it is
  _flip_a_byte(biggest, biggest.stat().st_size // 2)
  with pytest.raises(CheckpointCorruptError, match=r"damaged: the data of `\['params'\]\['w'\]`"):
    ck.restore_orbax_checkpoint(path, _state())


@pytest.mark.parametrize(
  "victim,message",
  [
    (
      "manifest.ocdbt",
      (
        r"is damaged or unreadable: Orbax cannot read its metadata "
        r"\(ValueError: DATA_LOSS"
      ),
    ),
    ("_METADATA", r"is damaged or unreadable: Orbax cannot read its metadata \(FileNotFoundError"),
    (
      "optcompose_checkpoint.json",
      (
        r"is damaged or of another format: its "
        r"optcompose_checkpoint.json is unreadable"
      ),
    ),
  ],
)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's loop
def test_a_damaged_orbax_checkpoint_says_so(tmp_path, victim, message):
  pytest.importorskip("orbax.checkpoint")
  path = tmp_path / "ckpt_orbax"
  ck.save_orbax_checkpoint(path, _state())
  if victim == "_METADATA":
    os.remove(path / victim)
  else:
    with open(path / victim, "r+b") as f:
      f.truncate(os.path.getsize(path / victim) // 2)
  with pytest.raises(CheckpointCorruptError, match=message) as info:
    ck.restore_orbax_checkpoint(path, _state())
  assert str(path) in str(info.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no Orbax checkpoint"):
    ck.restore_orbax_checkpoint(tmp_path / "empty", _state())


# ----------------------------------------------------------------------------------------
# Formats and layouts.


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_flat_params_restore_only_into_their_layout(tmp_path, fmt):
  save, restore, name = functions(fmt)
  name = tmp_path / name
  saved = {
    "params": oc.flat_params({"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([10.0, 11.0, 12.0])})
  }
  save(name, saved)
  same = restore(name, {"params": oc.flat_params({"a": jnp.zeros(2), "b": jnp.zeros(3)})})
  assert np.array_equal(same["params"].unflatten()["b"], [10.0, 11.0, 12.0])
  other = {"params": oc.flat_params({"a": jnp.zeros(3), "b": jnp.zeros(2)})}  # same bucket size
  with pytest.raises(
    CheckpointMismatchError,
    match=r"the FlatParams at `\['params'\]` has another layout: its leaf 0 is "
    r"`\['a'\]` of shape \(2,\) at offset 0 of bucket 'float32' in the checkpoint "
    r"but `\['a'\]` of shape \(3,\) at offset 0 of bucket 'float32' in `target`",
  ):
    restore(name, other)


def test_msgpack_files_of_the_previous_format_restore(tmp_path):
  from flax import serialization

  tree = {"w": jnp.arange(3.0), "step": jnp.asarray(2, jnp.int32)}
  (tmp_path / "old.msgpack").write_bytes(serialization.to_bytes(tree))  # no checksums
  restored = ck.restore_checkpoint(tmp_path / "old.msgpack", tree)
  assert np.array_equal(restored["w"], tree["w"]) and int(restored["step"]) == 2
  # The new files: Flax reads their "state" entry (the module docstring says how).
  ck.save_checkpoint(tmp_path / "new.msgpack", tree)
  raw = serialization.msgpack_restore((tmp_path / "new.msgpack").read_bytes())
  assert np.array_equal(serialization.from_state_dict(tree, raw["state"])["w"], tree["w"])


def test_plain_orbax_reads_our_directories_and_overwrite_is_refused(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  path = tmp_path / "ckpt_orbax"
  tree = {"w": np.arange(3.0, dtype=np.float32)}
  ck.save_orbax_checkpoint(path, tree)
  with ocp.StandardCheckpointer() as checkpointer:  # our optcompose_checkpoint.json is ignored
    assert np.array_equal(checkpointer.restore(path, tree)["w"], tree["w"])
  with pytest.raises(ValueError, match="already exists: pass overwrite=True"):
    ck.save_orbax_checkpoint(path, {"w": np.zeros(3, np.float32)})
  assert listing(path) == ["ckpt_orbax"]
  assert np.array_equal(ck.restore_orbax_checkpoint(path, tree)["w"], tree["w"])
