"""Determinism: the same training run twice gives bitwise the same parameters and state.

Once in this process (a fresh optimizer, fresh jit), and once in two separate Python
processes with different hash seeds (so dict and set ordering, compile caches and anything
that depends on object identity differ between the runs).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import optcompose as oc

RECIPES = {
  "clip_adamw_cosine": lambda: oc.chain(
    oc.clip_by_global_norm(1.0),
    oc.adamw(
      oc.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40),
      weight_decay=1e-2,
      mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    ),
  ),
  "sgd_nesterov_l1": lambda: oc.sgd(0.05, 0.9, nesterov=True, l1=1e-3),
  "partition_multi_steps": lambda: oc.multi_steps(
    oc.partition(
      {"a": oc.adam(1e-2), "b": oc.rmsprop(1e-2, centered=True)},
      lambda p: {k: "a" if k.startswith("w") else "b" for k in p},
    ),
    2,
  ),
  "lookahead_diagnostics": lambda: oc.with_diagnostics(
    oc.lookahead_in_state(oc.nadamw(1e-2), 3, 0.5), learning_rate=1e-2
  ),
}


def train(name: str, steps: int = 20) -> bytes:
  """Train recipe ``name`` on a small regression; return a digest of params and state."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(64, 2)), jnp.float32)
  params = {
    "w1": jnp.asarray(rng.normal(size=(6, 16)) / 3, jnp.float32),
    "b1": jnp.zeros(16),
    "w2": jnp.asarray(rng.normal(size=(16, 2)) / 4, jnp.float32),
    "b2": jnp.zeros(2),
  }
  tx = RECIPES[name]()

  def loss(p, xb, yb):
    h = jnp.tanh(xb @ p["w1"] + p["b1"][None, :])
    return jnp.mean((h @ p["w2"] + p["b2"][None, :] - yb) ** 2)

  @jax.jit
  def step(p, s, i):
    xb = jax.lax.dynamic_slice_in_dim(x, (i % 4) * 16, 16)
    yb = jax.lax.dynamic_slice_in_dim(y, (i % 4) * 16, 16)
    u, s = tx.update(jax.grad(loss)(p, xb, yb), s, p)
    return oc.apply_updates(p, u), s

  state = tx.init(params)
  for i in range(steps):
    params, state = step(params, state, i)
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves((params, state)):
    leaf = np.asarray(leaf)
    digest.update(str((leaf.dtype, leaf.shape)).encode() + leaf.tobytes())
  return digest.hexdigest()


def test_same_run_twice_in_one_process_is_bitwise_identical():
  for name in RECIPES:
    assert train(name) == train(name), name


def test_same_run_in_two_processes_is_bitwise_identical():
  script = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    "import test_determinism as t; print(' '.join(t.train(n) for n in sorted(t.RECIPES)))"
  )
  outs = []
  for seed in ("1", "2"):
    env = {**os.environ, "PYTHONHASHSEED": seed}
    proc = subprocess.run(
      [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    outs.append(proc.stdout.split())
  assert outs[0] == outs[1]
  assert outs[0] == [train(n) for n in sorted(RECIPES)]  # and the same as this process
