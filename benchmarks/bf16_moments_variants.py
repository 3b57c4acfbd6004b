"""AdamW with bfloat16 moments on XLA CPU: how the step can be written, measured (issue 16).

    .venv/bin/python benchmarks/bf16_moments_variants.py [--reps 40] [--hlo]

AdamW (lr 1e-3, weight decay 1e-4) on one leaf of 16.8M float32 parameters and on the
148-leaf transformer-like tree of benchmarks/run.py (same total), parameters and state
donated, gradients fixed; every variant jitted and all of them alternated step by step in
this process (the order rotating); per variant the median step time and the medians of its
per-round ratios to AdamW with float32 moments and to Optax's ``adamw(mu_dtype=bf16)``.

- ``f32``: ``optcompose.adamw``, float32 moments;
- ``optax_mu``: ``optax.adamw(mu_dtype=bf16)`` (Optax has no ``nu_dtype``: its nu is float32);
- ``lib_mu``, ``lib_mu_nu``, ``lib_nu``: ``optcompose.adamw`` with bfloat16 ``mu_dtype``,
  both, ``nu_dtype`` (since issue 16: ``lib_mu_nu`` is ``stored_wide``; ``lib_mu`` is
  Optax's formulation, and copies m as Optax's step does);
- the prototypes below, all with bfloat16 m and v (``scale_by_adam`` rewritten here with
  the library's per-leaf formulas, then ``add_decayed_weights`` and the learning rate):

  - ``old``: the library's formulation before issue 16 (the update divides the float32 m_t
    by the float32 v_t, each rounded to bfloat16 only when stored);
  - ``stored``: the update divides the *stored* moments (m_t and v_t rounded to bfloat16);
  - ``stored_nu``: the float32 m_t (as Optax's mu_dtype) over the stored v_t;
  - ``*_barrier``: the same with the stored moments behind ``lax.optimization_barrier`` (so
    that XLA cannot fuse their computation into the parameters' loop);
  - ``*_wide``: v's decay in float32 (v converted before ``b2 * v``: 0.999 is 1.0 in
    bfloat16);
  - ``nu_only_stored``: bfloat16 v with float32 m, the update from the stored v.

Measured (2 shared CPU cores, XLA CPU, jax 0.10.2; ratio to f32 / to optax_mu): before,
lib_mu_nu 2.4x-3.2x / 1.4x-1.5x, 2 copies of the donated moments per leaf (64 MiB of
temporaries); stored 0.85x-1.05x / 0.45x-0.5x, no copy, no temporary. The barrier changes
nothing in the compiled step (XLA already reads the stored moments).

``--hlo`` prints, per variant and tree, what the compiled step holds: fusions, copies (of
the donated moments), and XLA's temporary bytes.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optcompose as oc
from optcompose.core import safe_increment
from optcompose.transforms.statistics import (
  adam_direction_leaf,
  debias_factor,
  debias_leaf,
  ema_leaf,
  square_leaf,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import tree_shapes  # noqa: E402

LR, WD, BF16 = 1e-3, 1e-4, jnp.bfloat16
SIZE = 16 * 2**20


def adam_variant(stored: str, barrier: bool = False, wide_nu: bool = False, mu_dtype=BF16):
  """scale_by_adam(mu_dtype, nu_dtype=bf16) with the update computed from the float32 moments
  (``stored=""``), the stored (rounded) ones ("mu_nu") or the stored v only ("nu")."""

  def init(params):
    zeros = lambda dtype: jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
    return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(mu_dtype), zeros(BF16))

  def leaf(g, m, v, c1, c2):
    m_t = ema_leaf(0.9, m, g)
    sq = square_leaf(g, v)
    v_t = ema_leaf(0.999, v.astype(sq.dtype) if wide_nu else v, sq)
    m_s, v_s = m_t.astype(m.dtype), v_t.astype(BF16)
    if barrier:
      m_s, v_s = jax.lax.optimization_barrier((m_s, v_s))
    m_u = m_s.astype(m_t.dtype) if "mu" in stored else m_t
    v_u = v_s.astype(v_t.dtype) if "nu" in stored else v_t
    u = adam_direction_leaf(debias_leaf(m_u, c1), debias_leaf(v_u, c2), 1e-8, 0.0)
    return u.astype(g.dtype), m_s, v_s

  def update(updates, state, params=None):
    count = safe_increment(state.count)
    c1, c2 = debias_factor(0.9, count), debias_factor(0.999, count)
    out = jax.tree.map(lambda g, m, v: leaf(g, m, v, c1, c2), updates, state.mu, state.nu)
    treedef = jax.tree.structure(updates)
    u, mu, nu = (
      jax.tree.unflatten(treedef, [o[i] for o in treedef.flatten_up_to(out)]) for i in range(3)
    )
    return u, optax.ScaleByAdamState(count, mu, nu)

  return oc.chain(
    oc.GradientTransformation(init, update),
    oc.add_decayed_weights(WD),
    oc.scale_by_learning_rate(LR),
  )


def variants():
  v = {
    "f32": oc.adamw(LR, weight_decay=WD),
    "optax_mu": optax.adamw(LR, weight_decay=WD, mu_dtype=BF16),
    "lib_mu": oc.adamw(LR, weight_decay=WD, mu_dtype=BF16),
    "lib_mu_nu": oc.adamw(LR, weight_decay=WD, mu_dtype=BF16, nu_dtype=BF16),
    "old": adam_variant(""),
    "stored": adam_variant("mu_nu"),
    "stored_nu": adam_variant("nu"),
    "stored_barrier": adam_variant("mu_nu", barrier=True),
    "stored_nu_barrier": adam_variant("nu", barrier=True),
    "stored_wide": adam_variant("mu_nu", wide_nu=True),
    "lib_nu": oc.adamw(LR, weight_decay=WD, nu_dtype=BF16),
    "nu_only_stored": adam_variant("nu", mu_dtype=jnp.float32),
  }
  return v


def make_tree(kind):
  shapes = tree_shapes(kind, SIZE)
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s, np.float32)) for k, (s, _) in shapes.items()}
  grads = {
    k: jnp.asarray(rng.standard_normal(s, np.float32) * 1e-2) for k, (s, _) in shapes.items()
  }
  return params, grads


def build(tx, params, grads):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  return compiled, state


def hlo_summary(compiled):
  text = compiled.as_text()
  entry = text[text.index("\nENTRY") :]
  lines = [ln.strip() for ln in entry.splitlines() if " = " in ln]
  ops = [re.search(r"\b([a-z][a-z0-9_-]*)\(", ln.split(" = ", 1)[1]).group(1) for ln in lines]
  temp = compiled.memory_analysis().temp_size_in_bytes
  return dict(fusions=ops.count("fusion"), copies=ops.count("copy"), temp_mb=temp / 2**20)


def measure(kind, reps, show_hlo):
  params, grads = make_tree(kind)
  names = list(variants())
  steps, carry = {}, {}
  for name, tx in variants().items():
    compiled, state = build(tx, params, grads)
    steps[name] = compiled
    carry[name] = (jax.tree.map(jnp.copy, params), state)
    if show_hlo:
      print(f"  {kind:12s} {name:18s} {hlo_summary(compiled)}")
  times = {n: [] for n in names}
  for r in range(reps + 3):
    order = names[r % len(names) :] + names[: r % len(names)]
    for n in order:
      p, s = carry[n]
      t0 = time.perf_counter()
      p, s = steps[n](p, s, grads)
      jax.block_until_ready((p, s))
      dt = time.perf_counter() - t0
      carry[n] = (p, s)
      if r >= 3:
        times[n].append(dt)
  return times


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=40)
  parser.add_argument("--hlo", action="store_true")
  parser.add_argument("--trees", default="flat,transformer")
  args = parser.parse_args()
  for kind in args.trees.split(","):
    times = measure(kind, args.reps, args.hlo)
    n_leaves = len(tree_shapes(kind, SIZE))
    print(
      f"\n{kind} ({n_leaves} leaves, {SIZE / 2**20:.1f}M float32 params), "
      f"{args.reps} rounds, {jax.devices()[0].platform}"
    )
    print(f"{'variant':18s} {'ms':>7s} {'/f32':>6s} {'/optax_mu':>9s}")
    for n, ts in times.items():
      ratio = lambda ref, ts=ts, times=times: statistics.median(
        a / b for a, b in zip(ts, times[ref])
      )
      print(
        f"{n:18s} {1e3 * statistics.median(ts):7.2f} {ratio('f32'):6.2f} {ratio('optax_mu'):9.2f}"
      )


if __name__ == "__main__":
  main()
