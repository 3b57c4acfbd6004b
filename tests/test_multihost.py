"""Many hosts, on one machine: two processes joined by ``jax.distributed.initialize`` (CPU
collectives: gloo), two CPU devices each, train AdamW with parameters and ZeRO-1 optimizer
state sharded across both, and save and restore through ``save_orbax_checkpoint`` into one
shared directory. The result equals the single-process run (here, unsharded, and Optax's
AdamW) to rounding; the checkpoint restores bit for bit, with its shardings.

The work of each process is tests/multihost_worker.py; it is started clean (its own
XLA_FLAGS: two devices, not the eight of tests/conftest.py). If the two processes cannot
connect (no local port, no CPU collectives), the test is skipped with the reason.
"""

from __future__ import annotations

import json

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import multihost_worker as worker
import optcompose as oc
from numerics import assert_ulps_close, on_cpu

pytest.importorskip("orbax.checkpoint")

ROOT = pathlib.Path(__file__).resolve().parents[1]
ULPS = 16  # the sharded run reduces the loss and its gradients in another order


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(shared: pathlib.Path, out: pathlib.Path) -> list:
  """Start the two workers with a clean environment; their (return code, output) pairs."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
  )
  port = free_port()
  script = str(pathlib.Path(__file__).with_name("multihost_worker.py"))
  children = [
    subprocess.Popen(
      [sys.executable, script, str(i), str(port), str(shared), str(out)],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  results = []
  try:
    for child in children:  # a guard against a hang, not a timing
      results.append((child.wait(timeout=240), child.stdout.read()))
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
        child.wait()
      child.stdout.close()
  return results


def reference(steps: int):
  """The same run in this process, unsharded: optcompose's AdamW and Optax's."""
  params = jax.tree.map(jnp.asarray, worker.host_params())
  ours = oc.adamw(worker.LEARNING_RATE, weight_decay=worker.WEIGHT_DECAY)
  theirs = optax.adamw(worker.LEARNING_RATE, weight_decay=worker.WEIGHT_DECAY)

  @jax.jit
  def step(params, state, theirs_params, theirs_state, x, y):
    updates, state = ours.update(jax.grad(worker.loss)(params, x, y), state, params)
    t_updates, theirs_state = theirs.update(
      jax.grad(worker.loss)(theirs_params, x, y), theirs_state, theirs_params
    )
    return (
      oc.apply_updates(params, updates),
      state,
      optax.apply_updates(theirs_params, t_updates),
      theirs_state,
    )

  run = (params, ours.init(params), params, theirs.init(params))
  with jax.numpy_dtype_promotion("standard"):  # Optax raises a Python float to an int32 power
    for i in range(steps):
      run = step(*run, *worker.host_batch(i))
  return run


@pytest.mark.slow
def test_two_processes_train_sharded_and_checkpoint_like_one(tmp_path):
  shared, out = tmp_path / "shared", tmp_path / "out"
  shared.mkdir()
  out.mkdir()
  results = run_two_processes(shared, out)
  unavailable = [o for code, o in results if code == 3 and "UNAVAILABLE:" in o]
  if unavailable:
    reason = unavailable[0].split("UNAVAILABLE:", 1)[1].strip().splitlines()[0]
    pytest.skip(f"two JAX processes cannot connect on this machine: {reason}")
  for i, (code, output) in enumerate(results):
    assert code == 0, f"process {i} exited with {code}:\n{output[-4000:]}"
    assert (
      "OK sharded replicated-scalar msgpack-refused paths-differ restored async-overwrite"
      in output.splitlines()
    ), output[-4000:]

  assert (out / "listing.txt").read_text().split() == ["ckpt"]  # no leftovers of the swaps
  # Checksums: of every leaf no host holds whole, none; of the replicated step count, one
  # (summed from a process' own copy: it had none, as no leaf of a two-process run had).
  sidecar = json.loads((shared / "ckpt" / "optcompose_checkpoint.json").read_text())
  sums = {tuple(path): digest for path, digest in sidecar["leaves"]}
  assert sums[("step",)] is not None and None in sums.values(), sums
  for steps, name in ((worker.STEPS, "step5.npz"), (worker.STEPS + 1, "step6.npz")):
    with np.load(out / name) as saved:
      got = dict(saved)
    with on_cpu():  # the workers' backend (JAX_PLATFORMS=cpu)
      params, state, optax_params, _ = reference(steps)
    want = worker.flat({"params": params, "opt_state": state, "step": np.asarray(steps, np.int32)})
    assert sorted(got) == sorted(want)
    floats = sorted(k for k in want if want[k].dtype.kind == "f")
    assert all(np.array_equal(got[k], want[k]) for k in want if k not in floats)  # counts
    assert_ulps_close([got[k] for k in floats], [want[k] for k in floats], ULPS, what=name)
    assert_ulps_close(
      [got[f"['params'][{k!r}]"] for k in sorted(optax_params)],
      [np.asarray(optax_params[k]) for k in sorted(optax_params)],
      ULPS,
      what=f"{name} against Optax: ",
    )
