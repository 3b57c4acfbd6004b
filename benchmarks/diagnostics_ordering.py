"""What ordering a step after a conditional costs, measured apart from ``with_diagnostics``.

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
      .venv/bin/python benchmarks/diagnostics_ordering.py [steps]

AdamW on one leaf of 8M float32 parameters, parameters and state donated, in variants
alternated step by step in this process (the first 10 steps not counted; a 128 MB buffer
written before every step); medians relative to the first plain AdamW, which is measured
again last (the noise floor of the pairing):

- cond_out: beside a ``lax.cond`` (false at these steps) whose scalar result is returned
  and read by nothing else;
- cond_ord: every input ordered (``optcompose.core.ordered_after``) after that result;
- cond_ord_g / cond_ord_p: the gradients only / the parameters only ordered after it;
- noc_ord: every input ordered after a scalar of the gradients, no conditional;
- diag10: ``with_diagnostics(adamw, every_k=10)`` (its mean includes the measured updates).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import optcompose as oc
from optcompose.core.ordering import ordered_after

N = 1 << 23
rng = np.random.default_rng(0)


def fresh():
  return {"w": jnp.asarray(rng.normal(size=N).astype(np.float32))}


g = {"w": fresh()["w"] * 1e-3}
tx = oc.adamw(1e-3, weight_decay=1e-4)
diag = oc.with_diagnostics(tx, every_k=10)


def token_cond(g, k):
  return jax.lax.cond(k % 10 == 0, lambda: jnp.sum(g["w"][:8]), lambda: jnp.float32(0))


VARIANTS = {
  "plain": lambda g, s, p, k: (g, s, p, jnp.float32(0)),
  "cond_out": lambda g, s, p, k: (g, s, p, token_cond(g, k)),
  "cond_ord": lambda g, s, p, k: (*ordered_after((g, s, p), t := token_cond(g, k)), t),
  "cond_ord_g": lambda g, s, p, k: (ordered_after(g, t := token_cond(g, k)), s, p, t),
  "cond_ord_p": lambda g, s, p, k: (g, s, ordered_after(p, t := token_cond(g, k)), t),
  "noc_ord": lambda g, s, p, k: (*ordered_after((g, s, p), t := jnp.sum(g["w"][:8])), t),
}


def make(name):
  inner = diag if name == "diag10" else tx
  prepare = VARIANTS.get(name, VARIANTS["plain"])

  def step(p, s, g, k):
    g, s, p, extra = prepare(g, s, p, k)
    u, s = inner.update(g, s, p)
    return oc.apply_updates(p, u), s, extra

  return inner, jax.jit(step, donate_argnums=(0, 1))


def main(steps: int) -> None:
  names = [*VARIANTS, "diag10", "plain"]
  labels = [f"{n}{i}" for i, n in enumerate(names)]
  k = jnp.int32(1)
  runs = {}
  for label, name in zip(labels, names):
    inner, step = make(name)
    p = fresh()
    p, s, _ = step(p, inner.init(p), g, k)
    jax.block_until_ready(p)
    runs[label] = [step, p, s, []]
  junk = jnp.zeros(1 << 25)
  for _ in range(steps):
    for run in runs.values():
      junk = junk + 1.0
      jax.block_until_ready(junk)
      start = time.perf_counter()
      run[1], run[2], _ = run[0](run[1], run[2], g, k)
      jax.block_until_ready(run[1])
      run[3].append(time.perf_counter() - start)
  base = np.median(runs[labels[0]][3][10:])
  for label, run in runs.items():
    t = np.asarray(run[3][10:])
    print(f"{label:12s} median {np.median(t) / base:.3f}  mean {t.mean() / base:.3f}")


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
