"""What with_diagnostics' measurements cost, by part (issue 16's audit), measured.

    .venv/bin/python benchmarks/diagnostics_variants.py

AdamW on one leaf of 8M float32 parameters, donated, each variant jitted, alternated step by
step in this process (20 steps, the first 4 not counted), against AdamW alone: the three
global norms with_diagnostics takes (gradients, updates, parameters), two of them, the
updates' alone, and all three inside a ``lax.cond`` taken every 10th step.
(``with_diagnostics`` itself since measures before the step and orders the step after the
measurements: ``optcompose.core.ordering``.)
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import optcompose as oc
from optcompose import tree as otree

N = 1 << 23
rng = np.random.default_rng(0)
p = {"w": jnp.asarray(rng.normal(size=N).astype(np.float32))}
g = {"w": p["w"] * 1e-3}
inner = oc.adamw(1e-3, weight_decay=1e-4)


def plain(g, s, p):
  u, s = inner.update(g, s, p)
  return u, (s, jnp.float32(0))


def norms_all(g, s, p):
  u, s = inner.update(g, s, p)
  return u, (s, otree.global_norm(g) + otree.global_norm(u) + otree.global_norm(p))


def norms_gp(g, s, p):
  u, s = inner.update(g, s, p)
  return u, (s, otree.global_norm(g) + otree.global_norm(p))


def norm_u(g, s, p):
  u, s = inner.update(g, s, p)
  return u, (s, otree.global_norm(u))


def every_k(g, s, p, k=10):
  u, s2 = inner.update(g, s, p)
  m = jax.lax.cond(
    s2[0].count % k == 0,
    lambda o: otree.global_norm(o[0]) + otree.global_norm(o[1]) + otree.global_norm(o[2]),
    lambda o: jnp.float32(0),
    (g, u, p),
  )
  return u, (s2, m)


wrapped = oc.with_diagnostics(inner)


def diag(g, s, p):
  u, s = wrapped.update(g, s, p)
  return u, (s, jnp.float32(0))


wrapped_k = oc.with_diagnostics(inner, every_k=10)


def diag_every_10(g, s, p):
  u, s = wrapped_k.update(g, s, p)
  return u, (s, jnp.float32(0))


def make(fn):
  def step(p, s, g):
    u, (s, m) = fn(g, s, p)
    return oc.apply_updates(p, u), s, m

  s = {diag: wrapped, diag_every_10: wrapped_k}.get(fn, inner).init(p)
  return [
    jax.jit(step, donate_argnums=(0, 1)).lower(p, s, g).compile(),
    jax.tree.map(jnp.copy, p),
    s,
  ]


runs = {
  f.__name__: make(f) for f in (plain, norms_all, norms_gp, norm_u, every_k, diag, diag_every_10)
}
times = {k: [] for k in runs}
for _ in range(40):
  for k, r in runs.items():
    t = time.perf_counter()
    r[1], r[2], _m = r[0](r[1], r[2], g)
    jax.block_until_ready(r[1])
    times[k].append(time.perf_counter() - t)
base = np.median(times["plain"][4:])
for k, ts in times.items():
  print(f"{k:10s} {np.median(ts[4:]) * 1e3:7.2f} ms {np.median(ts[4:]) / base:.2f}x")
