"""Whole training steps: what the optimizer and its wrappers cost inside a real step.

The optimizer-step rows of ``run.py`` time the update alone, on fixed gradients. A training
run pays for the forward and backward passes too, and compiles them with the optimizer; this
measures both on nanoGPT's model (``examples/dropin/nanogpt.py``: pre-LayerNorm GPT blocks,
tied embedding) with the training recipe of ``examples/dropin/nanogpt.py`` (clip by global
norm 1.0, AdamW with warmup + cosine, weight decay on kernels and embeddings only), each
variant one jitted ``train_step(state, x, y)`` with the ``TrainState`` donated:

- ``gradients only``: the loss and its gradients, no update (the floor: the optimizer's
  share of a step is the rest);
- ``optax`` and ``optcompose``: ``state.apply_gradients`` with the recipe;
- ``optcompose with_diagnostics(every_k=10)``: the recipe wrapped (a measurement every 10th
  step; the mean over all steps is what a run pays);
- ``optax apply_if_finite`` and ``optcompose apply_if_finite``: the recipe wrapped, through
  ``apply_gradients`` (the transformation);
- ``optcompose apply_if_finite, step_train_state``: the same through
  :func:`optcompose.step_train_state` (its step-level form).

The variants are alternated step by step in one process (the order rotating), on the same
batches; ratios are medians of paired ratios (means of totals for ``every_k``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
# nanoGPT's "baby GPT" width and depth at a short context and a small per-step batch, so that
# a step runs in about a tenth of a second on two CPU cores.
MODEL = dict(n_layer=6, n_head=6, n_embd=384, block_size=64, vocab_size=65)
BATCH = 4
TRAIN = dict(lr=1e-3, min_lr=1e-4, warmup=100, decay=5000, weight_decay=0.1, clip=1.0)
GRADIENTS_ONLY = "gradients only"
VARIANTS = (
  GRADIENTS_ONLY,
  "optax",
  "optcompose",
  "optcompose with_diagnostics(every_k=10)",
  "optax apply_if_finite",
  "optcompose apply_if_finite",
  "optcompose apply_if_finite, step_train_state",
)
AMORTIZED = ("optcompose with_diagnostics(every_k=10)",)


def recipe(m, train=TRAIN):
  """nanoGPT's optimizer, in library ``m`` (optax or optcompose), with ``train``'s settings."""
  from flax import traverse_util

  def decay_mask(params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] in ("kernel", "embedding") for k in flat})

  schedule = m.warmup_cosine_decay_schedule(
    0.0, train["lr"], train["warmup"], train["decay"], train["min_lr"]
  )
  return m.chain(
    m.clip_by_global_norm(train["clip"]),
    m.adamw(schedule, b1=0.9, b2=0.99, weight_decay=train["weight_decay"], mask=decay_mask),
  )


def variant_step(name, model, train=TRAIN):
  """(tx or None, the un-jitted train_step) for one variant."""
  import jax
  import optax
  import optcompose

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = jax.value_and_grad(loss_fn)
  if name == GRADIENTS_ONLY:
    return None, lambda params, x, y: grad_fn(params, x, y)
  lib = optax if name.startswith("optax") else optcompose
  tx = recipe(lib, train)
  if "with_diagnostics" in name:
    tx = optcompose.with_diagnostics(tx, every_k=10)
  if "apply_if_finite" in name:
    tx = lib.apply_if_finite(tx, 5)
  apply = optcompose.step_train_state if "step_train_state" in name else None

  def step(state, x, y):
    loss, grads = grad_fn(state.params, x, y)
    new = apply(state, grads) if apply else state.apply_gradients(grads=grads)
    return new, loss

  return tx, step


def run_train(cfg: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from flax.training import train_state

  sys.path.insert(0, str(ROOT))
  from examples.dropin.nanogpt import GPT, GPTConfig

  shape = cfg.get("model", MODEL)
  model = GPT(GPTConfig(**shape))
  block, batch = shape["block_size"], cfg.get("batch", BATCH)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, block), jnp.int32))["params"]
  n = sum(x.size for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  vocab = shape["vocab_size"]
  batches = [
    (
      jnp.asarray(rng.integers(0, vocab, (batch, block)), jnp.int32),
      jnp.asarray(rng.integers(0, vocab, (batch, block)), jnp.int32),
    )
    for _ in range(4)
  ]
  # As in run.py's run_config: every variant is compiled before any buffer is allocated, and
  # odd-numbered processes build in reverse order (the first built is otherwise favoured).
  names = list(cfg.get("variants", VARIANTS))
  if cfg.get("process", 0) % 2:
    names.reverse()
  runs = {}
  for name in names:
    tx, step = variant_step(name, model, {**TRAIN, **cfg.get("train", {})})
    if tx is None:
      make = lambda: (params,)  # noqa: E731
      jitted = jax.jit(step)
    else:

      def make(tx=tx):  # bound now: the loop rebinds tx
        copy = jax.tree.map(jnp.copy, params)
        return (train_state.TrainState.create(apply_fn=model.apply, params=copy, tx=tx),)

      jitted = jax.jit(step, donate_argnums=0)
    abstract = jax.eval_shape(make)  # traced before the clock starts, as in run.py
    t = time.perf_counter()
    compiled = jitted.lower(*abstract, *batches[0]).compile()
    compile_s = time.perf_counter() - t
    runs[name] = {"compiled": compiled, "make": make, "compile_s": compile_s, "times": []}
  for name in names:
    runs[name]["args"] = runs[name]["make"]()
  order = names
  runs = {name: runs[name] for name in cfg.get("variants", VARIANTS)}  # the rows in order
  for rep in range(cfg["reps"]):
    x, y = batches[rep % len(batches)]
    for name in order[rep % len(order) :] + order[: rep % len(order)]:
      run = runs[name]
      t = time.perf_counter()
      out = run["compiled"](*run["args"], x, y)
      jax.block_until_ready(out)
      run["times"].append(time.perf_counter() - t)
      if name != GRADIENTS_ONLY:
        run["args"], run["loss"] = (out[0],), out[1]
  # The first calls allocate and are not counted; a multiple of every_k (10) of them, so that
  # the timed steps hold every_k's measured ones in their true proportion (one in ten).
  skip = min(cfg.get("warmup_reps", 10), cfg["reps"] - 1)

  def ratio(mine, theirs, amortized):
    mine, theirs = np.asarray(mine[skip:]), np.asarray(theirs[skip:])
    return float(mine.sum() / theirs.sum()) if amortized else float(np.median(mine / theirs))

  floor = runs[GRADIENTS_ONLY]["times"][skip:] if GRADIENTS_ONLY in runs else None
  rows = []
  for name, run in runs.items():
    ts = np.asarray(run["times"][skip:]) * 1e3
    amortized = name in AMORTIZED
    vs = {
      other: ratio(run["times"], runs[other]["times"], amortized or other in AMORTIZED)
      for other in runs
      if other != name
    }
    typical = float(np.mean(ts) if amortized else np.median(ts))
    rows.append(
      {
        "lib": name,
        "median_ms": float(np.median(ts)),
        "mean_ms": float(np.mean(ts)),
        "p10_ms": float(np.percentile(ts, 10)),
        "p90_ms": float(np.percentile(ts, 90)),
        "compile_s": run["compile_s"],
        # the gradients' mean or median, as the row's own
        "optimizer_ms": None
        if floor is None
        else typical - float(np.mean(floor) if amortized else np.median(floor)) * 1e3,
        "paired_vs": vs,
      }
    )

  def by_path(tree):
    return {jax.tree_util.keystr(k): np.asarray(x) for k, x in jax.tree.leaves_with_path(tree)}

  finals = {}
  if cfg.get("final_params"):  # tests: every variant's parameters and last loss
    finals = {
      name: (by_path(run["args"][0].params), float(run["loss"]))
      for name, run in runs.items()
      if name != GRADIENTS_ONLY
    }
  return {
    "cfg": cfg,
    "kind": "train",
    **({"final_params": finals, "initial_params": by_path(params)} if finals else {}),
    "label": f"nanoGPT {shape['n_layer']} layers x {shape['n_embd']}, batch {batch} x {block}",
    "params": int(n),
    "leaves": len(jax.tree.leaves(params)),
    "rows": rows,
    "skipped": {},
  }


def train_table(res: dict) -> list:
  rows = {r["lib"]: r for r in res["rows"]}
  lines = [
    f"{res['label']} tokens: {res['params'] / 1e6:.1f}M float32 parameters in "
    f"{res['leaves']} leaves. The optimizer's ms: the step's time less the gradients' alone; "
    "rows marked (mean) are means over all steps (a measurement every 10th step).",
    "",
    "| variant | median ms | p10-p90 ms | optimizer ms | compile s | time / optax recipe "
    "| time / optcompose recipe | compile / optcompose recipe |",
    "|---|---|---|---|---|---|---|---|",
  ]
  base = rows.get("optcompose")
  for r in res["rows"]:
    mean = r["lib"] in AMORTIZED
    ms = r["mean_ms"] if mean else r["median_ms"]
    opt_ms = (
      "-"
      if r["optimizer_ms"] is None or r["lib"] == GRADIENTS_ONLY
      else (f"{r['optimizer_ms']:.1f}")
    )
    vs_optax = f"{r['paired_vs']['optax']:.2f}" if "optax" in r["paired_vs"] else "-"
    vs_ours = f"{r['paired_vs']['optcompose']:.2f}" if "optcompose" in r["paired_vs"] else "-"
    compile_ratio = "-" if base is None else f"{r['compile_s'] / base['compile_s']:.2f}"
    lines.append(
      f"| {r['lib']}{' (mean)' if mean else ''} | {ms:.1f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} "
      f"| {opt_ms} | {r['compile_s']:.2f} | {vs_optax} | {vs_ours} | {compile_ratio} |"
    )
  return lines
