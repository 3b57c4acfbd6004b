"""How a skipped step can be written, measured (issue 16's audit of apply_if_finite).

    .venv/bin/python benchmarks/skip_step_variants.py
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_ARENA_MAX=1 \\
        .venv/bin/python benchmarks/skip_step_variants.py

AdamW on one leaf of 16.8M float32 parameters, donated, each variant jitted, alternated step by
step in this process (20 steps, the first 4 not counted); times relative to AdamW alone:

- plain: AdamW alone;
- cond_true: AdamW inside a ``lax.cond`` on a predicate that is always true (no test): what
  the conditional itself costs (1.38x AdamW at 16.8M parameters with all three malloc
  settings below, where its materialized updates predict 1.29x; 1.8-2.0x without
  ``MALLOC_ARENA_MAX=1``);
- cond_apply: the same, with the parameters' update inside the conditional too (0.96-1.04x
  AdamW: the conditional's cost is in the updates it returns, not in the inner step);
- cond_sub: the inner step inside ``lax.cond`` on ``isfinite(sum(g - g))`` (what
  ``apply_if_finite`` does; ``g * 0`` is folded with a preceding constant product by XLA);
- split: the updates outside the conditional, the state inside it (copies: the worst);
- probe: the updates computed once to test them, then the step again inside ``lax.cond``
  (``check_updates=True``);
- current: ``optcompose.apply_if_finite`` itself.

Run it with and without the environment variables above: glibc returns large freed blocks
to the system, so each fresh XLA buffer (a conditional's outputs are not the donated
inputs) costs page faults on every step. The thresholds alone do not stop it at this size:
XLA CPU allocates the updates on a worker thread, whose glibc arena cannot hold a 64 MB
block, so it is mapped afresh at every call (16386 page faults per step) until
``MALLOC_ARENA_MAX=1`` puts every thread on the main heap. One run with all three (Intel
Xeon, 2 cores): plain 17.7 ms, cond_true 1.38x, cond_apply 0.96x, cond_sub 1.54x, split
2.06x, probe 2.73x, current 1.48x.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import optcompose as oc

N = 1 << 24
INNER = oc.adamw(1e-3, weight_decay=1e-4)
WRAPPED = oc.apply_if_finite(INNER, 5)


def finite(tree):
  return jnp.isfinite(sum(jnp.sum(x * jnp.float32(0)) for x in jax.tree.leaves(tree)))


def finite_all(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def finite_sub(tree):
  return jnp.isfinite(sum(jnp.sum(x - x) for x in jax.tree.leaves(tree)))


def split(g, s, p):
  ok = finite_sub(g)
  u = jax.tree.map(lambda x: jnp.where(ok, x, 0), INNER.update(g, s, p)[0])
  return u, jax.lax.cond(ok, lambda o: INNER.update(*o)[1], lambda o: o[1], (g, s, p))


def cond_true(g, s, p):
  return jax.lax.cond(s[0].count >= 0, lambda o: INNER.update(*o), zeros_and_state, (g, s, p))


def cond_all(g, s, p):
  return jax.lax.cond(finite_all(g), lambda o: INNER.update(*o), zeros_and_state, (g, s, p))


def cond_sub(g, s, p):
  return jax.lax.cond(finite_sub(g), lambda o: INNER.update(*o), zeros_and_state, (g, s, p))


def zeros_and_state(operands):
  return jax.tree.map(jnp.zeros_like, operands[0]), operands[1]


def plain(g, s, p):
  return INNER.update(g, s, p)


def test_only(g, s, p):
  ok = finite(g)
  u, s = INNER.update(g, s, p)
  return jax.tree.map(lambda x: jnp.where(ok, x, 0), u), s


def cond(g, s, p):
  return jax.lax.cond(finite(g), lambda o: INNER.update(*o), zeros_and_state, (g, s, p))


def where(g, s, p):
  u, new = INNER.update(g, s, p)
  ok = jnp.logical_and(finite(g), finite(u))
  return (
    jax.tree.map(lambda x: jnp.where(ok, x, 0), u),
    jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, s),
  )


def where_g(g, s, p):
  ok = finite(g)
  u, new = INNER.update(g, s, p)
  return (
    jax.tree.map(lambda x: jnp.where(ok, x, 0), u),
    jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, s),
  )


def probe_where(g, s, p):
  ok = jnp.logical_and(finite(g), finite(INNER.update(g, s, p)[0]))
  u, new = INNER.update(g, s, p)
  return (
    jax.tree.map(lambda x: jnp.where(ok, x, 0), u),
    jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, s),
  )


def current(g, s, p):
  return WRAPPED.update(g, s, p)


def probe(g, s, p):
  ok = jnp.logical_and(finite(g), finite(INNER.update(g, s, p)[0]))
  return jax.lax.cond(ok, lambda o: INNER.update(*o), zeros_and_state, (g, s, p))


def cond_apply(g, s, p):
  """Not a transformation: the whole step, the parameters' update inside the conditional
  (what a gradient transformation cannot do, since it returns the updates)."""

  def taken(o):
    u, s = INNER.update(*o)
    return oc.apply_updates(o[2], u), s

  return jax.lax.cond(s[0].count >= 0, taken, lambda o: (o[2], o[1]), (g, s, p))


def main():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=N).astype(np.float32))}
  grads = {"w": params["w"] * 1e-3}
  runs = {}
  for fn in (plain, cond_true, cond_apply, cond_sub, split, probe, current):

    def step(p, s, g, fn=fn):
      if fn is cond_apply:
        return cond_apply(g, s, p)
      u, s = fn(g, s, p)
      return oc.apply_updates(p, u), s

    state = (WRAPPED if fn is current else INNER).init(params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    runs[fn.__name__] = [compiled, jax.tree.map(jnp.copy, params), state]
  times = {k: [] for k in runs}
  scrub = np.ones(1 << 24)  # 128 MB written before each step: cold caches, as in make bench
  for _ in range(20):
    for name, run in runs.items():
      scrub += 1.0
      t = time.perf_counter()
      run[1], run[2] = run[0](run[1], run[2], grads)
      jax.block_until_ready(run[1])
      times[name].append(time.perf_counter() - t)
  base = np.median(times["plain"][4:])
  for name, ts in times.items():
    median = np.median(ts[4:])
    print(f"{name:10s} {median * 1e3:7.2f} ms  {median / base:.2f}x AdamW")


if __name__ == "__main__":
  main()
