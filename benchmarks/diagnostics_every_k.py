"""What ``with_diagnostics(every_k=10)`` costs on the updates it does not measure, measured.

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
      .venv/bin/python benchmarks/diagnostics_every_k.py

AdamW on one leaf of 8M float32 parameters, parameters and state donated, against
``with_diagnostics(adamw, every_k=10)`` and against AdamW compiled a second time (the noise
floor), alternated step by step in this process (200 steps each, the first 20 not counted;
a 128 MB buffer written before every step). Prints the mean ratio, and the median ratio at
each position in the cycle of 10 (the measured update is one of them).
"""

import time
import jax
import jax.numpy as jnp
import numpy as np
import optcompose as oc

N = 1 << 23
rng = np.random.default_rng(0)


def fresh():
  return {"w": jnp.asarray(rng.normal(size=N).astype(np.float32))}


g = {"w": fresh()["w"] * 1e-3}
inner = oc.adamw(1e-3, weight_decay=1e-4)


def mk(tx):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return oc.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1))


txs = {
  "adamw": inner,
  "diag10": oc.with_diagnostics(inner, every_k=10),
  "adamw2": oc.adamw(1e-3, weight_decay=1e-4),
}
steps = {k: mk(t) for k, t in txs.items()}
state = {}
for k, t in txs.items():
  p = fresh()
  s = t.init(p)
  p, s = steps[k](p, s, g)
  jax.block_until_ready(p)
  state[k] = (p, s)
junk = jnp.zeros(1 << 25)
times = {k: [] for k in txs}
for i in range(200):
  for k in txs:
    junk = junk + 1.0
    jax.block_until_ready(junk)
    p, s = state[k]
    t0 = time.perf_counter()
    p, s = steps[k](p, s, g)
    jax.block_until_ready(p)
    times[k].append(time.perf_counter() - t0)
    state[k] = (p, s)
a = np.array(times["adamw"][20:])
d = np.array(times["diag10"][20:])
idx = np.arange(20, 200)
measured = (idx + 1) % 10 == 0  # count after the first call (call 0 was the warm-up, count 1..)
print("mean ratio", d.mean() / a.mean(), "median adamw ms", np.median(a) * 1e3)
print(
  "unmeasured median ratio",
  np.median(d[~measured]) / np.median(a),
  "measured median ratio",
  np.median(d[measured]) / np.median(a),
)
print("sorted per-step ratios of diag:", np.round(np.sort(d / np.median(a))[::18], 2))
b = np.array(times["adamw2"][20:])
print("adamw2/adamw mean", b.mean() / a.mean(), "median", np.median(b) / np.median(a))
mask = np.array([(i % 10) for i in range(180)])
for r in range(10):
  print(r, round(float(np.median(d[mask == r]) / np.median(a)), 2), end="; ")
print()
