"""How Lookahead's synchronisation can be written, measured (issue 16's audit).

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_ARENA_MAX=1 \\
        .venv/bin/python benchmarks/lookahead_variants.py

AdamW on one leaf of 16.8M float32 parameters, sync_period 5, slow_step_size 0.5, each
variant jitted with parameters and state donated; the mean time of 50 steps after 3 untimed
ones (a 128 MB buffer written before each), two rounds:

- bare: AdamW alone;
- current: ``optcompose.lookahead_in_state`` (the slow weights in the state): XLA copies the
  parameters and the slow weights at every step, because two loops each read both and
  write one (2.2-2.4x AdamW with the three malloc settings above; 3.7-4.3x without
  ``MALLOC_ARENA_MAX=1``, when the copies' 64 MB blocks were mapped afresh at every step);
- scale_where: the fast update ``u - c d`` with a scalar ``c`` (0 between synchronisations)
  instead of a select, the slow weights by a select: the same copies;
- cond: the fast and slow updates inside a ``lax.cond`` on the synchronisation, AdamW's
  update computed outside (a conditional returning updates: worse);
- two_phase: the step-level form: the fast step applied first (``theta' = theta + u``, in
  place), then, on a synchronisation only, ``phi + alpha (theta' - phi)`` written to both
  copies inside a conditional that reads only those two (1.12-1.33x AdamW). It rounds the
  fast weights at a synchronisation differently from Optax's
  ``theta + u - (1 - alpha) (theta + u - phi)``.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import optcompose as oc

N, K, ALPHA = 1 << 24, 5, 0.5
ADAMW = oc.adamw(1e-3, weight_decay=1e-4)


def bare(p, s, g):
  u, s = ADAMW.update(g, s, p)
  return oc.apply_updates(p, u), s


CURRENT = oc.lookahead_in_state(ADAMW, K, ALPHA)


def current(p, s, g):
  u, s = CURRENT.update(g, s, p)
  return oc.apply_updates(p, u), s


def init_pieces(p):
  return ADAMW.init(p), jnp.zeros([], jnp.int32), jax.tree.map(jnp.array, p)


def scale_where(p, s, g):
  inner, count, slow = s
  u, inner = ADAMW.update(g, inner, p)
  sync = count == K - 1
  c = jnp.where(sync, 1 - ALPHA, 0.0)
  d = jax.tree.map(lambda f, x, s: f + x - s, p, u, slow)
  fast_u = jax.tree.map(lambda x, e: x - c * e, u, d)
  slow = jax.tree.map(lambda s, e: jnp.where(sync, s + ALPHA * e, s), slow, d)
  return oc.apply_updates(p, fast_u), (inner, (count + 1) % K, slow)


def cond(p, s, g):
  inner, count, slow = s
  u, inner = ADAMW.update(g, inner, p)

  def on_sync(o):
    p, u, slow = o
    d = jax.tree.map(lambda f, x, s: f + x - s, p, u, slow)
    fast_u = jax.tree.map(lambda x, e: x - (1 - ALPHA) * e, u, d)
    return fast_u, jax.tree.map(lambda s, e: s + ALPHA * e, slow, d)

  fast_u, slow = jax.lax.cond(count == K - 1, on_sync, lambda o: (o[1], o[2]), (p, u, slow))
  return oc.apply_updates(p, fast_u), (inner, (count + 1) % K, slow)


def two_phase(p, s, g):
  inner, count, slow = s
  u, inner = ADAMW.update(g, inner, p)
  q = oc.apply_updates(p, u)

  def on_sync(o):
    q, slow = o
    new = jax.tree.map(lambda s, f: s + ALPHA * (f - s), slow, q)
    return new, jax.tree.map(jnp.copy, new)

  q, slow = jax.lax.cond(count == K - 1, on_sync, lambda o: o, (q, slow))
  return q, (inner, (count + 1) % K, slow)


def mean_ms(step, init, params, grads, reps=50):
  f = jax.jit(step, donate_argnums=(0, 1))
  p = jax.tree.map(jnp.copy, params)
  s = init(p)
  for _ in range(3):
    p, s = f(p, s, grads)
  jax.block_until_ready(p)
  scrub, times = np.ones(1 << 24), []
  for _ in range(reps):
    scrub += 1.0
    t = time.perf_counter()
    p, s = f(p, s, grads)
    jax.block_until_ready(p)
    times.append(time.perf_counter() - t)
  return float(np.mean(times)) * 1e3


def main():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=N).astype(np.float32) * 0.02)}
  grads = {"w": jnp.asarray(rng.normal(size=N).astype(np.float32) * 1e-3)}
  variants = {
    "bare": (bare, ADAMW.init),
    "current": (current, CURRENT.init),
    "scale_where": (scale_where, init_pieces),
    "cond": (cond, init_pieces),
    "two_phase": (two_phase, init_pieces),
  }
  for round_ in range(2):
    base = None
    for name, (step, init) in variants.items():
      ms = mean_ms(step, init, params, grads)
      base = base or ms
      print(f"round {round_}: {name:12s} {ms:7.2f} ms  {ms / base:.2f}x AdamW", flush=True)


if __name__ == "__main__":
  main()
