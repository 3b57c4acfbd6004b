"""When ``flat_optimizer`` pays: the optimizer step on trees of several leaf counts.

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
      .venv/bin/python benchmarks/flat_optimizer_cost.py [steps] [tree ...]

Trees (float32): ``LEAVESxSIZE``, e.g. ``148x54000`` (8M parameters in 148 leaves). For
each tree, AdamW in four forms, alternated step by step in this process (parameters and
state donated, a 128 MB buffer written before every step, the first 5 steps not counted):

- optax: ``optax.adamw`` on the tree;
- per-leaf: ``optcompose.adamw`` on the tree;
- FlatParams: ``optcompose.adamw`` on ``flat_params(tree)`` (the caller keeps the buckets);
- flat_optimizer: ``flat_optimizer(optcompose.adamw)`` on the tree (the caller keeps its
  tree; the gradients and parameters are packed into the buckets inside every step).

Printed: each form's median step time relative to Optax's, and its compile time.
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optcompose as oc

TREES = ("4096x1024", "1000x8000", "148x54000", "16x500000")


def tree(leaves: int, size: int, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(leaves)
  return {
    f"p{i:04d}": jnp.asarray(rng.normal(size=size).astype(np.float32) * scale)
    for i in range(leaves)
  }


def forms(leaves: int, size: int) -> dict:
  """{name: (transformation, params, grads)}."""
  p, g = (lambda: tree(leaves, size)), (lambda: tree(leaves, size, 1e-3))
  return {
    "optax": (optax.adamw(1e-3), p(), g()),
    "per-leaf": (oc.adamw(1e-3), p(), g()),
    "FlatParams": (oc.adamw(1e-3), oc.flat_params(p()), oc.flat_params(g())),
    "flat_optimizer": (oc.flat_optimizer(oc.adamw(1e-3)), p(), g()),
  }


def compiled(tx, params, grads):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return oc.apply_updates(p, u), s

  state = tx.init(params)
  start = time.perf_counter()
  fn = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  return fn, state, time.perf_counter() - start


def measure(spec: str, steps: int) -> None:
  leaves, size = (int(x) for x in spec.split("x"))
  runs = {}
  for name, (tx, p, g) in forms(leaves, size).items():
    fn, s, seconds = compiled(tx, p, g)
    runs[name] = [fn, p, s, g, seconds, []]
  scratch = np.ones(1 << 25, np.float32)
  for k in range(steps + 5):
    for run in runs.values():
      scratch += 1.0
      start = time.perf_counter()
      run[1], run[2] = run[0](run[1], run[2], run[3])
      jax.block_until_ready(run[1])
      if k >= 5:
        run[5].append(time.perf_counter() - start)
  base = statistics.median(runs["optax"][5])
  for name, run in runs.items():
    median = statistics.median(run[5])
    print(
      f"{spec:>10} {name:15s} {median * 1e3:8.2f} ms  / optax {median / base:5.2f}"
      f"  compile {run[4]:6.2f} s"
    )


if __name__ == "__main__":
  count = int(sys.argv[1]) if len(sys.argv) > 1 else 40
  for spec in sys.argv[2:] or TREES:
    measure(spec, count)
