"""Kill checkpoint saves at random moments and check that a whole checkpoint always survives.

A child process saves a state over the same checkpoint again and again (``overwrite``), each
save one version later; every array of version ``v`` is a fixed random pattern XORed with
``v``, so a checkpoint is whole exactly when all its arrays decode to the same version. The
parent kills the child with SIGKILL at a random moment (uniform over 1.5 times the duration
of the child's second save, counted from its end), then, in this order:

1. restores the checkpoint with ``optcompose.checkpoint`` and checks that it is whole and
   holds the last version the child reported saved, or the one after (the save in flight);
2. saves the next version itself, and lists the directory: only the checkpoint may be left.

Run from a checkout (the full measurement: 20 kills per format, a 64 MB state)::

    .venv/bin/python tools/kill_test.py [--kills 20] [--mb 64] \\
        [--formats msgpack,orbax,orbax-renames]

``orbax-renames`` is Orbax with ``renameat2(RENAME_EXCHANGE)`` disabled in the child, so that
the two-rename fallback (and the repair of a crash between its renames) is what is killed.
Prints one line per kill and a summary per format; exits 1 if any kill lost the checkpoint
or left files behind. tests/test_faults.py runs the same rounds on small states.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORMATS = ("msgpack", "orbax", "orbax-renames")
PIECES = 4  # the state's big arrays, so that a partly written checkpoint is possible


def make_state(version: int, mb: float) -> dict:
  """The state of a version: ``PIECES`` int32 arrays of ``mb`` MB in all, and small leaves."""
  n = max(1, int(mb * (1 << 20)) // (4 * PIECES))
  pattern = np.random.default_rng(0).integers(-(2**31), 2**31, size=(PIECES, n), dtype=np.int32)
  v = np.int32(version)
  return {
    "w": {str(i): pattern[i] ^ v for i in range(PIECES)},
    "b": np.full((3,), version, np.float32),
    "step": np.asarray(version, np.int32),
  }


def version_of(state: dict, mb: float) -> int:
  """The version a restored state holds; ValueError if its leaves disagree (a torn state)."""
  v = int(state["step"])
  if not all(
    np.array_equal(a, b)
    for a, b in zip(
      [state["b"], *state["w"].values()], [make_state(v, mb)["b"], *make_state(v, mb)["w"].values()]
    )
  ):
    raise ValueError(f"the restored state is torn: its leaves hold different versions (step {v})")
  return v


def functions(fmt: str):
  """(save with overwrite, restore, the checkpoint's file name) for a format."""
  from optcompose import checkpoint as ck

  if fmt == "msgpack":
    return ck.save_checkpoint, ck.restore_checkpoint, "ckpt.msgpack"
  return (
    lambda path, tree: ck.save_orbax_checkpoint(path, tree, overwrite=True),
    ck.restore_orbax_checkpoint,
    "ckpt_orbax",
  )


def child(fmt: str, path: str, mb: float, version: int, count: int) -> None:
  """Save versions ``version + 1``, ``version + 2``, ... (``count`` of them; -1: forever),
  printing ``saved V SECONDS`` after each."""
  if fmt == "orbax-renames":  # no atomic exchange: the two-rename fallback
    from optcompose import _checkpoint_io

    _checkpoint_io._exchange = lambda a, b: False
  save = functions(fmt)[0]
  while count != 0:
    version, count = version + 1, count - 1
    state = make_state(version, mb)
    start = time.perf_counter()
    save(path, state)
    print(f"saved {version} {time.perf_counter() - start:.4f}", flush=True)


def spawn(
  fmt: str, path: pathlib.Path, mb: float, version: int, count: int = -1, stderr=subprocess.DEVNULL
) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  return subprocess.Popen(
    [sys.executable, __file__, "--child", fmt, str(path), str(mb), str(version), str(count)],
    stdout=subprocess.PIPE,
    stderr=stderr,
    text=True,
    env=env,
    cwd=ROOT,
  )


def kill_round(fmt: str, path: pathlib.Path, mb: float, rng: random.Random) -> dict:
  """One kill: start a child saving over ``path`` (which holds a whole checkpoint), kill it
  at a random moment, restore, save the next version, list the directory."""
  save, restore, _ = functions(fmt)
  template = make_state(0, mb)
  before = version_of(restore(path, template), mb)
  with tempfile.TemporaryFile("w+") as err:
    proc = spawn(fmt, path, mb, before, stderr=err)
    first = [proc.stdout.readline().split() for _ in range(2)]  # two saves are complete
    if not first[1]:
      err.seek(0)
      raise RuntimeError(f"the child saving {fmt} died: {err.read()[-2000:]}")
    seconds = float(first[1][2])  # the second: the first also imports Flax or Orbax
    delay = rng.uniform(0.0, 1.5 * seconds)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate()
  lines = first + [line.split() for line in rest.splitlines()]
  last = int(lines[-1][1])
  leftovers = sorted(set(os.listdir(path.parent)) - {path.name})
  result = {
    "format": fmt,
    "saves": len(lines),
    "save_s": seconds,
    "delay_s": delay,
    "last_saved": last,
    "leftovers_after_kill": leftovers,
  }
  start = time.perf_counter()
  try:
    got = version_of(restore(path, template), mb)
    result["restored"] = got
    result["ok"] = got in (last, last + 1)
  except Exception as e:  # noqa: BLE001 -- reported
    result["restored"], result["ok"] = f"{type(e).__name__}: {e}", False
  result["restore_s"] = time.perf_counter() - start
  if not result["ok"]:  # start the next round from a whole checkpoint
    last = before
  save(path, make_state(last + 2, mb))
  result["left_after_next_save"] = sorted(set(os.listdir(path.parent)) - {path.name})
  return result


def measure(fmt: str, kills: int, mb: float, seed: int = 0, directory=None) -> list:
  """``kills`` rounds of :func:`kill_round` on a fresh checkpoint; the results."""
  rng = random.Random(seed)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    path = pathlib.Path(tmp) / "run" / functions(fmt)[2]
    functions(fmt)[0](path, make_state(0, mb))
    return [kill_round(fmt, path, mb, rng) for _ in range(kills)]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--mb", type=float, default=64.0)
  parser.add_argument("--formats", default=",".join(FORMATS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dir", default=None, help="where to make the temporary checkpoints")
  parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    fmt, path, mb, version, count = args.child
    child(fmt, path, float(mb), int(version), int(count))
    return 0
  failed = False
  for fmt in args.formats.split(","):
    start = time.perf_counter()
    results = measure(fmt, args.kills, args.mb, args.seed, args.dir)
    for i, r in enumerate(results):
      print(
        f"{fmt:>13} kill {i + 1:2d}: after {r['delay_s']:.3f} s (a save takes "
        f"{r['save_s']:.3f} s; {r['saves']} saves done, last v{r['last_saved']}) -> "
        f"restored {r['restored']!s:.120} in {r['restore_s']:.3f} s"
        f"{'' if r['ok'] else '  ** LOST **'}; left by the kill: "
        f"{len(r['leftovers_after_kill'])}, after the next save: {r['left_after_next_save']}"
      )
    ok = sum(r["ok"] for r in results)
    clean = sum(not r["left_after_next_save"] for r in results)
    new = sum(r["ok"] and r["restored"] == r["last_saved"] + 1 for r in results)
    print(
      f"{fmt}: {ok}/{len(results)} kills left a whole checkpoint ({new} the new version, "
      f"{ok - new} the old); {clean}/{len(results)} directories clean after the next save; "
      f"{args.mb:g} MB state, {time.perf_counter() - start:.1f} s\n",
      flush=True,
    )
    failed |= ok < len(results) or clean < len(results)
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
