"""Optimizer-step benchmark: optcompose, Optax and PyTorch side by side.

Every configuration (an optimizer, a tree shape, a size) runs in its own process; inside
it, every library's step is compiled, then every library's buffers are allocated, then the
steps are timed *alternately*, step by step (the order rotating), so that drift on the
machine affects all alike. The bounded rows run in several processes, half of which build
the libraries in reverse order (the first built is otherwise favoured or penalised by a few
percent). Per row the table gives:

- the median step time and its spread (10th-90th percentile), in ms;
- effective GB/s over the *ideal* bytes: each gradient read once, each parameter and
  optimizer-state array read and written once (AdamW in float32: 4 + 2 (4 + 8) = 28 B per
  parameter; SGD with momentum: 20 B);
- that as a fraction of the in-place streaming bandwidth measured in the same process
  (``x <- a x + b`` on a donated buffer of the same number of float32 elements);
- compile time (lower + compile), the optimizer state in bytes per parameter, and peak
  memory of the step: XLA's own accounting (arguments + outputs - donated + temporaries) for
  JAX, parameters + gradients + state for PyTorch (its temporaries are not counted);
- the step time as a ratio to Optax's.

Libraries: ``optcompose`` (the default per-leaf path on the model's tree),
``optcompose-flat`` (the same optimizer on :class:`optcompose.FlatParams`, parameters and
state kept in one buffer per dtype across steps), ``optax``, and, when PyTorch is
installed, ``torch-fused`` and ``torch-foreach``. JAX steps are jitted with parameters and
state donated; gradients are fixed arrays passed in each step.

The "whole training step" section (``benchmarks/train_step.py``) times nanoGPT's training
step end to end instead: the forward and backward passes with the optimizer, to show each
optimizer's and wrapper's share of a real step and of its compile time.

Run ``make bench`` (writes benchmarks/RESULTS.md), or ``python benchmarks/run.py`` with
``--quick`` (small sizes, a few rows), ``--full`` (adds the per-leaf clip+AdamW rows on
4096 leaves, whose compilation takes minutes), ``--out PATH``. It runs unchanged on GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OPTIMIZERS = ("sgd_nesterov", "adam", "adamw", "clip_adamw_cosine", "adamw_bf16_moments")
# Issue 15's optimizers: Lion (one moment, sign update), LAMB (per-leaf trust ratio),
# Adafactor (factored second moment: its state per parameter is the point), L-BFGS (a
# history of memory_size pairs and a line search that evaluates the loss).
NEW_OPTIMIZERS = ("lion", "lamb", "adafactor", "lbfgs")
# Issue 16's wrappers around AdamW, and the parameter-sized arrays each must read besides
# AdamW's own (its ideal bytes): apply_if_finite tests the gradients; with_diagnostics takes
# the norms of the gradients, the updates and the parameters.
WRAPPERS = (
  "apply_if_finite_adamw",
  "apply_if_finite_checked_adamw",
  "apply_if_finite_step_adamw",
  "apply_if_finite_checked_step_adamw",
  "step_if_finite_adamw",
  "diagnostics_adamw",
  "diagnostics_every10_adamw",
  "masked_adamw",
  "partition_adamw",
  "inject_adamw",
  "multi_steps4_adamw",
  "multi_steps4_step_adamw",
  "ema_params_adamw",
  "swa_adamw",
  "lookahead5_adamw",
  "lookahead5_step_adamw",
  "plateau_adamw",
  "sam_adamw",
)
# Each wrapper's ideal bytes per float32 parameter beyond the count every row gets (the
# gradients read, the parameters and the whole state read and written: AdamW's 28, or 36
# with an accumulator or an average in the state): apply_if_finite reads the gradients once
# more (as a transformation, through optcompose.step, and as step_if_finite: the last two
# with the whole step inside the conditional); check_updates=True everything AdamW reads
# (g, mu, nu, p), either way; with_diagnostics the
# gradients, updates and parameters (three norms); masked, partition, inject_hyperparams and
# ema_params (its average is in the state) nothing; multi_steps(k=4) (as a transformation or
# through MultiSteps.step, which writes no zero update on a micro-step), per call on average,
# three micro-steps (read g, read and write the accumulator: 12) and a real step (AdamW on
# the accumulator, which is read and reset: 28 + 4): (3 * 12 + 32) / 4 = 17, i.e. 36 - 19;
# with_diagnostics(every_k=10) a tenth of the three norms' 12; swa (its average is in the
# state) nothing; reduce_on_plateau (a scalar scale) nothing; lookahead_in_state with
# sync_period=5 (the slow copy in the state: 36 counted; as a transformation or through
# optcompose.step) reads and writes the slow copy and writes the parameters on one call in
# five: 28 + 12 / 5 = 30.4, i.e. 36 - 5.6; sharpness_aware (its second gradient, from a
# loss whose gradient at w is w - g, read inside AdamW's loops) the norm of the gradients: 4.
EXTRA_BYTES = {
  "apply_if_finite_adamw": 4,
  "apply_if_finite_checked_adamw": 16,
  "apply_if_finite_step_adamw": 4,
  "apply_if_finite_checked_step_adamw": 16,
  "step_if_finite_adamw": 4,
  "diagnostics_adamw": 12,
  "diagnostics_every10_adamw": 1.2,
  "masked_adamw": 0,
  "partition_adamw": 0,
  "inject_adamw": 0,
  "multi_steps4_adamw": -19,
  "multi_steps4_step_adamw": -19,
  "swa_adamw": 0,
  "lookahead5_adamw": -5.6,
  "lookahead5_step_adamw": -5.6,
  "plateau_adamw": 0,
  "sam_adamw": 4,
  "ema_params_adamw": 0,
}
# Rows whose calls differ in cost by design (a real step every 4th call, a measurement every
# 10th): their ratios are of total times (the mean cost of a call), not medians of paired
# ratios, which would report the cheap calls only.
# Rows whose step is optcompose.step (the transformation's step-level form), not update +
# apply_updates.
STEP_FORM = (
  "lookahead5_step_adamw",
  "apply_if_finite_step_adamw",
  "apply_if_finite_checked_step_adamw",
)
AMORTIZED = (
  "multi_steps4_adamw",
  "multi_steps4_step_adamw",
  "diagnostics_every10_adamw",
  "lookahead5_adamw",
  "lookahead5_step_adamw",
)
# The bound each "clipping and wrappers" row is held to, as a paired ratio to bare AdamW.
CLIP_BOUND, CLIP_VS_OPTAX, WRAPPER_SLACK, DIAGNOSTICS_BOUND = 1.2, 1.8, 1.15, 1.2
LR, WD, CLIP = 1e-3, 1e-4, 1.0


# --- trees --------------------------------------------------------------------------------


def tree_shapes(kind: str, total: int) -> dict:
  """{name: (shape, dtype)} with about ``total`` parameters."""
  if kind == "flat":
    return {"w": ((total,), "float32")}
  if kind in ("transformer", "mixed"):
    # GPT-2-like: 12 blocks of 12 leaves, token and position embeddings, final norm: 148.
    d = max(64, int(round((total / 12 / 12) ** 0.5 / 64)) * 64)
    mat = "bfloat16" if kind == "mixed" else "float32"
    block = {
      "ln1_scale": (d,),
      "ln1_bias": (d,),
      "qkv": (d, 3 * d),
      "qkv_bias": (3 * d,),
      "proj": (d, d),
      "proj_bias": (d,),
      "ln2_scale": (d,),
      "ln2_bias": (d,),
      "fc": (d, 4 * d),
      "fc_bias": (4 * d,),
      "fc_proj": (4 * d, d),
      "fc_proj_bias": (d,),
    }
    shapes = {
      f"h{i:02d}.{k}": (s, mat if len(s) == 2 else "float32")
      for i in range(12)
      for k, s in block.items()
    }
    rest = max(total - sum(int(np.prod(s)) for s, _ in shapes.values()), 1024 * d)
    shapes.update(
      {
        "wpe": ((1024, d), mat),
        "wte": ((max((rest - 1024 * d) // d, 1), d), mat),
        "ln_f_scale": ((d,), "float32"),
        "ln_f_bias": ((d,), "float32"),
      }
    )
    return shapes
  if kind.startswith("leaves"):
    count = int(kind[len("leaves") :])
    return {f"p{i:04d}": ((max(total // count, 1),), "float32") for i in range(count)}
  raise ValueError(f"unknown tree kind {kind!r}")


def tree_label(kind: str, shapes: dict) -> str:
  n = len(shapes)
  size = next(iter(shapes.values()))[0]
  return {
    "flat": "1 flat leaf",
    "transformer": f"transformer-like ({n} leaves)",
    "mixed": f"transformer, bf16 matrices ({n} leaves)",
  }.get(kind, f"{n} leaves of {int(np.prod(size))}")


# --- JAX libraries ------------------------------------------------------------------------


def jax_optimizer(lib: str, name: str):
  import jax
  import optax
  import optcompose

  m = optcompose if lib.startswith("optcompose") else optax
  if name == "sgd_nesterov":
    return m.sgd(LR, momentum=0.9, nesterov=True)
  if name == "adam":
    return m.adam(LR)
  if name == "adamw":
    return m.adamw(LR, weight_decay=WD)
  if name == "adamw_bf16_moments":  # Optax has mu_dtype only: its second moment stays float32
    extra = {"nu_dtype": "bfloat16"} if m is optcompose else {}
    return m.adamw(LR, weight_decay=WD, mu_dtype="bfloat16", **extra)
  if name == "adamw_bf16_mu":  # the same dtypes in both libraries
    return m.adamw(LR, weight_decay=WD, mu_dtype="bfloat16")
  if name == "lion":
    return m.lion(LR / 10, weight_decay=WD)
  if name == "lamb":
    return m.lamb(LR, weight_decay=WD)
  if name == "adafactor":
    return m.adafactor(LR)
  if name == "lbfgs":
    return m.lbfgs()
  if name == "apply_if_finite_adamw":
    return m.apply_if_finite(m.adamw(LR, weight_decay=WD), 5)
  if name in ("apply_if_finite_checked_adamw", "apply_if_finite_checked_step_adamw"):
    if m is not optcompose:
      raise NotImplementedError("Optax's apply_if_finite tests the gradients only")
    return m.apply_if_finite(m.adamw(LR, weight_decay=WD), 5, check_updates=True)
  if name == "apply_if_finite_step_adamw":  # through optcompose.step
    if m is not optcompose:
      raise NotImplementedError("Optax has no step-level call (optax.apply_if_finite wraps)")
    return m.apply_if_finite(m.adamw(LR, weight_decay=WD), 5)
  if name == "masked_adamw":  # every leaf selected: the mask machinery, no less work
    return m.masked(m.adamw(LR, weight_decay=WD), lambda p: jax.tree.map(lambda _: True, p))
  if name == "partition_adamw":  # one label for every leaf
    return m.partition(
      {"all": m.adamw(LR, weight_decay=WD)}, lambda p: jax.tree.map(lambda _: "all", p)
    )
  if name == "inject_adamw":
    return m.inject_hyperparams(m.adamw)(learning_rate=LR, weight_decay=WD)
  if name == "multi_steps4_adamw":
    if m is optcompose:
      return m.multi_steps(m.adamw(LR, weight_decay=WD), 4)
    return m.MultiSteps(m.adamw(LR, weight_decay=WD), 4).gradient_transformation()
  if name == "multi_steps4_step_adamw":
    if m is not optcompose:
      raise NotImplementedError("Optax's MultiSteps has no step-level call")
    return m.MultiSteps(m.adamw(LR, weight_decay=WD), 4)  # the step calls its .step
  if name == "swa_adamw":
    if m is not optcompose:
      raise NotImplementedError("Optax has no average of the parameters")
    return m.chain(m.adamw(LR, weight_decay=WD), m.swa())
  if name in ("lookahead5_adamw", "lookahead5_step_adamw"):  # the second: optcompose.step
    if m is not optcompose:
      raise NotImplementedError("Optax's lookahead takes (fast, slow) parameter pairs")
    return m.lookahead_in_state(m.adamw(LR, weight_decay=WD), 5, 0.5)
  if name == "sam_adamw":  # the step passes grad_fn=
    if m is not optcompose:
      raise NotImplementedError("Optax's sam takes two update calls per step (contrib API)")
    return m.chain(m.sharpness_aware(0.05), m.adamw(LR, weight_decay=WD))
  if name == "plateau_adamw":  # the step passes value=
    plateau = optcompose.reduce_on_plateau if m is optcompose else optax.contrib.reduce_on_plateau
    return m.chain(m.adamw(LR, weight_decay=WD), plateau(patience=5))
  if name == "ema_params_adamw":
    if m is not optcompose:
      raise NotImplementedError("Optax has no EMA of the parameters (optax.ema averages updates)")
    return m.chain(m.adamw(LR, weight_decay=WD), m.ema_params(0.999))
  if name == "step_if_finite_adamw":
    if m is not optcompose:
      raise NotImplementedError("Optax has no step-level skip (optax.apply_if_finite wraps)")
    return m.adamw(LR, weight_decay=WD)  # the step calls step_if_finite with it
  if name in ("diagnostics_adamw", "diagnostics_every10_adamw"):
    if m is not optcompose:
      raise NotImplementedError("Optax has no with_diagnostics")
    every_k = 10 if name == "diagnostics_every10_adamw" else 1
    return m.with_diagnostics(m.adamw(LR, weight_decay=WD), every_k=every_k)
  if name == "clip_adamw_cosine":
    schedule = m.warmup_cosine_decay_schedule(0.0, LR, 100, 10_000, LR / 10)
    return m.chain(m.clip_by_global_norm(CLIP), m.adamw(schedule, weight_decay=WD))
  raise ValueError(name)


class JaxRun:
  """One JAX library's step: compiled at construction on abstract arguments (no device
  buffer yet), its buffers made by :meth:`allocate`. run_config compiles every library
  before allocating any, so that where one library's buffers land does not depend on
  another's compilation."""

  def __init__(self, lib, opt, shapes, seed=0):
    import jax
    import jax.numpy as jnp
    import optcompose

    tx = jax_optimizer(lib, opt)

    def arguments(params, grads):  # the step's arguments from its parameters and gradients
      if lib == "optcompose-flat":
        params, grads = optcompose.flat_params(params), optcompose.flat_params(grads)
      state = tx.init(params)
      if opt == "lbfgs":
        # Optax 0.2.8's lbfgs init gives its two history fields one buffer, which the
        # donating step below cannot take twice: a copy per leaf (ours has one per leaf).
        state = jax.tree.map(jnp.copy, state)
      return params, state, grads

    def make():  # drawn when allocated: no host copy outlives its transfer to the device
      rng = np.random.default_rng(seed)
      params, grads = (
        {
          k: jnp.asarray(rng.normal(size=s).astype(np.float32) * scale, d)
          for k, (s, d) in shapes.items()
        }
        for scale in (0.02, 1e-3)
      )
      return arguments(params, grads)

    abstract = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    params, state, grads = jax.eval_shape(arguments, abstract, abstract)
    nbytes = lambda leaves: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)  # noqa: E731
    self.state_bytes = nbytes(x for x in jax.tree.leaves(state) if x.ndim)
    param_bytes = nbytes(jax.tree.leaves(params))
    self.ideal_bytes = (
      nbytes(jax.tree.leaves(grads))
      + 2 * (param_bytes + self.state_bytes)
      + EXTRA_BYTES.get(opt, 0) / 4 * param_bytes
    )

    if opt == "lbfgs":
      # L-BFGS needs the loss: a quadratic around the drawn gradients' direction, whose value
      # and gradient are computed in the step (its line search evaluates the loss again).
      def loss(p, grads):
        return sum(
          0.5 * jnp.sum(jnp.square(x.astype(jnp.float32) - g.astype(jnp.float32)))
          for x, g in zip(jax.tree.leaves(p), jax.tree.leaves(grads))
        )

      def step(params, state, grads):
        value_fn = lambda p: loss(p, grads)  # noqa: E731
        value, g = jax.value_and_grad(value_fn)(params)
        updates, state = tx.update(g, state, params, value=value, grad=g, value_fn=value_fn)
        return optcompose.apply_updates(params, updates), state
    elif opt == "sam_adamw":

      def step(params, state, grads):
        # the loss 0.5 |w - g|^2 at w, whose gradient at the perturbed w' is w' - g
        grad_fn = lambda p: jax.tree.map(lambda x, g: x - g, p, grads)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optcompose.apply_updates(params, updates), state
    elif opt == "plateau_adamw":

      def step(params, state, grads):
        updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
        return optcompose.apply_updates(params, updates), state
    elif opt in STEP_FORM:

      def step(params, state, grads):
        return optcompose.step(tx, grads, state, params)
    elif opt == "multi_steps4_step_adamw":

      def step(params, state, grads):
        return tx.step(grads, state, params)
    elif opt == "step_if_finite_adamw":

      def step(params, state, grads):
        return optcompose.step_if_finite(tx, grads, state, params)[:2]
    else:

      def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optcompose.apply_updates(params, updates), state

    t = time.perf_counter()
    self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    self.compile_s = time.perf_counter() - t
    mem = self.compiled.memory_analysis()
    self.peak_bytes = (
      None
      if mem is None
      else (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
      )
    )
    self.make = make
    self.block = jax.block_until_ready

  def allocate(self):
    self.params, self.state, self.grads = self.make()
    self.make = None
    self.step()  # the first call allocates its outputs; not timed

  def step(self):
    self.params, self.state = self.compiled(self.params, self.state, self.grads)
    self.block(self.params)


# --- PyTorch ------------------------------------------------------------------------------


class TorchRun:
  def __init__(self, mode, opt, shapes, seed=0):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    rng = np.random.default_rng(seed)
    self.params = []
    for s, d in shapes.values():
      p = torch.tensor(
        rng.normal(size=s).astype(np.float32) * 0.02,
        device=device,
        dtype=dtypes[d],
        requires_grad=True,
      )
      p.grad = torch.tensor(
        rng.normal(size=s).astype(np.float32) * 1e-3, device=device, dtype=dtypes[d]
      )
      self.params.append(p)
    flag = {"fused": True} if mode == "torch-fused" else {"foreach": True}
    if opt == "sgd_nesterov":
      self.opt = torch.optim.SGD(self.params, lr=LR, momentum=0.9, nesterov=True, **flag)
    elif opt in ("adamw_bf16_moments", "adamw_bf16_mu"):
      raise NotImplementedError("torch.optim.AdamW keeps its moments in the parameter's dtype")
    elif opt in ("lion", "lamb", "lbfgs"):
      raise NotImplementedError(
        "torch.optim.LBFGS takes a closure per step (no comparable step)"
        if opt == "lbfgs"
        else f"torch.optim has no {opt}"
      )
    elif opt == "adafactor":
      if not hasattr(torch.optim, "Adafactor"):
        raise NotImplementedError("torch.optim.Adafactor needs PyTorch 2.5 or later")
      self.opt = torch.optim.Adafactor(self.params, lr=LR, foreach=mode == "torch-foreach")
    elif opt == "adam":
      self.opt = torch.optim.Adam(self.params, lr=LR, **flag)
    else:
      self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WD, **flag)
    self.clip = opt == "clip_adamw_cosine"
    self.sched = None
    if self.clip:
      import math

      def factor(step):
        if step < 100:
          return step / 100
        frac = min((step - 100) / (10_000 - 100), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

      self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
    self.torch = torch
    self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    self.compile_s = 0.0
    self.step()  # creates the state
    self.state_bytes = sum(
      v.numel() * v.element_size()
      for st in self.opt.state.values()
      for v in st.values()
      if torch.is_tensor(v) and v.ndim
    )
    pbytes = sum(p.numel() * p.element_size() for p in self.params)
    self.ideal_bytes = pbytes + 2 * (pbytes + self.state_bytes)
    self.peak_bytes = 2 * pbytes + self.state_bytes

  def step(self):
    with self.torch.no_grad():
      if self.clip:
        self.torch.nn.utils.clip_grad_norm_(self.params, CLIP, foreach=True)
      self.opt.step()
      if self.sched is not None:
        self.sched.step()
    self.sync()


# --- one configuration, in this process -----------------------------------------------------


def stream_bandwidth(n: int, reps: int) -> float:
  """In-place streaming bandwidth in GB/s: x <- a x + b on a donated float32 buffer."""
  import jax
  import jax.numpy as jnp

  f = jax.jit(lambda x: x * 0.999 + 1e-3, donate_argnums=0)
  x = f(jnp.ones(n, jnp.float32)).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    x = f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return 8 * n / float(np.median(times)) / 1e9


def run_zero1(cfg: dict) -> dict:
  """Optimizer state bytes per device on ``cfg["devices"]`` devices (simulated on CPU): AdamW
  with the state replicated (plain data parallelism), split over the data axis per leaf
  (``zero1_state_shardings``) and on padded FlatParams (``zero1_flat_shardings``); the
  parameters replicated in every case. One step runs each way (not timed: simulated devices
  share this machine's cores), and the trajectories are compared."""
  import jax
  import optcompose
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from optcompose.sharding import zero1_flat_shardings, zero1_state_shardings

  shapes = tree_shapes(cfg["tree"], cfg["size"])
  devices = jax.devices("cpu")  # the simulated ones, also where an accelerator is the default
  mesh = Mesh(np.array(devices), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  rng = np.random.default_rng(0)
  host = {k: rng.normal(size=s).astype(np.float32) * 0.02 for k, (s, _) in shapes.items()}
  grads_host = {k: rng.normal(size=s).astype(np.float32) * 1e-3 for k, (s, _) in shapes.items()}
  tx = optcompose.adamw(LR, weight_decay=WD)
  n = sum(x.size for x in host.values())
  rows, finals = [], {}
  for layout in ("replicated state", "zero1 per leaf", "zero1 FlatParams"):
    params, grads = host, grads_host
    if layout == "zero1 FlatParams":
      params = optcompose.flat_params(params, pad_to=len(devices))
      grads = optcompose.flat_params(grads, pad_to=len(devices))
    params, grads = jax.device_put((params, grads), replicated)
    if layout == "replicated state":
      shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(tx.init, params))
    elif layout == "zero1 per leaf":
      shardings = zero1_state_shardings(tx, params)
    else:
      shardings = zero1_flat_shardings(tx, params, mesh)
    state = jax.jit(tx.init, out_shardings=shardings)(params)

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optcompose.apply_updates(p, u), s

    p_sh = jax.tree.map(lambda _: replicated, params)
    stepper = jax.jit(step, in_shardings=(p_sh, shardings, p_sh), out_shardings=(p_sh, shardings))
    params, state = stepper(params, state, grads)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state) if x.ndim)
    total = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim)
    final = params.unflatten() if layout == "zero1 FlatParams" else params
    finals[layout] = np.concatenate([np.asarray(final[k]).ravel() for k in host])
    rows.append(
      {
        "layout": layout,
        "state_mb_per_device": per_device / 2**20,
        "state_mb_total": total / 2**20,
        "params_mb_per_device": sum(
          x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params)
        )
        / 2**20,
      }
    )
  ref = finals["replicated state"]
  for r in rows:
    r["max_diff_vs_replicated"] = float(np.max(np.abs(finals[r["layout"]] - ref)))
  return {
    "cfg": cfg,
    "label": tree_label(cfg["tree"], shapes),
    "params": n,
    "devices": len(devices),
    "memory_rows": rows,
  }


def memory_table(res: dict) -> list:
  lines = [
    f"AdamW on the {res['label']} tree, {res['params'] / 1e6:.1f}M float32 parameters, "
    f"{res['devices']} simulated CPU devices (`--xla_force_host_platform_device_count`); "
    "one step each way, parameters compared with the replicated-state run:",
    "",
    "| state layout | state MB per device | state MB (whole arrays) | parameters MB per device "
    "| max abs difference after one step |",
    "|---|---|---|---|---|",
  ]
  for r in res["memory_rows"]:
    lines.append(
      f"| {r['layout']} | {r['state_mb_per_device']:.1f} | {r['state_mb_total']:.1f} "
      f"| {r['params_mb_per_device']:.1f} | {r['max_diff_vs_replicated']:.1e} |"
    )
  return lines


class Scrub:
  """Writes SCRUB_BYTES before a timed step where the step's data lives: in host memory (the
  CPU's last-level cache) or in an accelerator's (a GPU's L2: 50-60 MB on an H100/H200)."""

  def __init__(self):
    import jax

    self.host = self.device = None
    if jax.default_backend() == "cpu":
      self.host = np.ones(SCRUB_BYTES // 8)
    else:
      self.add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
      self.device = jax.numpy.ones(SCRUB_BYTES // 4, "float32")

  def __call__(self):
    if self.host is not None:
      self.host += 1.0
    else:
      self.device = self.add(self.device).block_until_ready()


def run_config(cfg: dict) -> dict:
  if cfg.get("kind") == "zero1":
    return run_zero1(cfg)
  if cfg.get("kind") == "train":
    from train_step import run_train

    return run_train(cfg)
  shapes = tree_shapes(cfg["tree"], cfg["size"])
  n = sum(int(np.prod(s)) for s, _ in shapes.values())
  runs, skipped = {}, {}
  # Which library is built first biases a pairing within a process (the first built of four
  # copies of one AdamW step took 1.045x the last built, on 148 leaves): every JAX step is
  # compiled before any buffer is allocated, and odd-numbered processes build in reverse
  # order, so that over an even number of processes each pair of libraries is built in
  # either order equally often (a library in the middle stays in the middle).
  libs = list(cfg["libs"])
  if cfg.get("process", 0) % 2:
    libs.reverse()

  def build(lib, phase):
    try:
      if lib.startswith("torch"):
        if phase == "allocate":
          runs[lib] = TorchRun(lib, cfg["opt"], shapes)
      elif phase == "compile":
        bare = lib == BARE  # the bare optimizer the row's recipe is held against
        opt = cfg.get("bare", "adamw") if bare else cfg["opt"]
        runs[lib] = JaxRun("optcompose" if bare else lib, opt, shapes)
      elif lib in runs:
        runs[lib].allocate()
    except Exception as e:  # an optional library missing, or a mode it lacks
      runs.pop(lib, None)
      skipped[lib] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

  for phase in ("compile", "allocate"):
    for lib in libs:
      build(lib, phase)
  runs = {lib: runs[lib] for lib in cfg["libs"] if lib in runs}  # the rows in cfg's order
  times = {lib: [] for lib in runs}
  order = [lib for lib in libs if lib in runs]
  scrub = Scrub()
  for rep in range(cfg["reps"]):
    for lib in order[rep % len(order) :] + order[: rep % len(order)]:  # rotate who goes first
      # Every step starts from the same state: caches cold (as after a training step's
      # forward and backward passes) and the previous step's worker threads idle. Without
      # this, a step's time depended on which library ran before it (up to 15% on AMD EPYC).
      scrub()
      t = time.perf_counter()
      runs[lib].step()
      times[lib].append(time.perf_counter() - t)
  bw = stream_bandwidth(n, max(cfg["reps"], 10))
  rows = []
  ref = np.asarray(times["optax"]) if "optax" in times else None
  bare = np.asarray(times[BARE]) if BARE in times else None

  def ratio(mine, theirs):
    mine, theirs = np.asarray(mine), np.asarray(theirs)
    if cfg["opt"] in AMORTIZED:
      return float(mine.sum() / theirs.sum())
    return float(np.median(mine / theirs))

  for lib, run in runs.items():
    ts = np.asarray(times[lib]) * 1e3
    # Paired: the two steps of one repetition ran back to back, so slow drift of the machine
    # (other tenants, frequency) cancels in their ratio; the median ratio is the comparison.
    paired = None if ref is None else ratio(times[lib], ref)
    vs_bare = None if bare is None else ratio(times[lib], bare)
    vs = {other: ratio(times[lib], times[other]) for other in times if other != lib}
    rows.append(
      {
        "lib": lib,
        "median_ms": float(np.median(ts)),
        "mean_ms": float(np.mean(ts)),
        "p10_ms": float(np.percentile(ts, 10)),
        "p90_ms": float(np.percentile(ts, 90)),
        "ideal_bytes": run.ideal_bytes,
        "compile_s": run.compile_s,
        "state_bytes_per_param": run.state_bytes / n,
        "peak_bytes": run.peak_bytes,
        "paired_vs_optax": paired,
        "paired_vs_bare": vs_bare,
        "paired_vs": vs,
      }
    )
  return {
    "cfg": cfg,
    "label": tree_label(cfg["tree"], shapes),
    "params": n,
    "bandwidth_gbs": bw,
    "rows": rows,
    "skipped": skipped,
  }


# --- the suite -----------------------------------------------------------------------------

JAX_LIBS = ("optcompose", "optcompose-flat", "optax")
# glibc returns freed blocks above these sizes to the system; XLA then faults each new
# buffer's pages in again at every step (a step's outputs are new buffers unless donated).
# The thresholds alone reach only the main thread's arena: XLA CPU allocates a step's
# temporaries on its worker threads, whose arenas are heaps of at most 64 MB, and glibc maps
# a larger block (16.8M float32 elements and one header) afresh at every call, whatever the
# threshold. One arena for all threads puts those blocks on the main heap too, where they
# are reused (measured: a conditional returning AdamW's updates on one leaf of 16.8M, 16386
# page faults per step with the thresholds alone, none with one arena).
MALLOC = {
  "MALLOC_MMAP_THRESHOLD_": "4294967296",
  "MALLOC_TRIM_THRESHOLD_": "4294967296",
  "MALLOC_ARENA_MAX": "1",
}
BARE = "optcompose-bare"  # the bare optimizer (cfg["bare"], AdamW by default), paired
ALL_LIBS = JAX_LIBS + ("torch-fused", "torch-foreach")
M = 1 << 20
SCRUB_BYTES = 128 * M  # written before every timed step: several times any CPU's last cache
# The bounded rows run in this many processes, and their ratios are the medians over them.
# Within one process a pairing is biased by where the buffers landed: two instances of the
# same compiled AdamW step, alternated, measured 0.91-1.06 of each other's time from one
# process to the next (16.8M float32 parameters, AMD EPYC), more than some bounds' margins.
# Even: half the processes build the libraries in reverse order (see run_config).
PROCESSES = 4


def suite(quick: bool, full: bool) -> list:
  if quick:
    return [
      dict(section="trees", opt="adamw", tree=t, size=M, libs=ALL_LIBS, reps=10)
      for t in ("flat", "transformer", "leaves256")
    ]
  # The rows issue 16 bounds get more steps: their ratios are compared with a bound.
  size, reps, bounded = 16 * M, 40, 100
  configs = [
    dict(section="trees", opt="adamw", tree=t, size=size, libs=ALL_LIBS, reps=reps)
    for t in ("flat", "transformer", "leaves1000", "leaves4096", "mixed")
  ]
  configs += [
    dict(section="optimizers", opt=o, tree="transformer", size=size, libs=ALL_LIBS, reps=reps)
    for o in OPTIMIZERS
    if o not in ("adamw", "adamw_bf16_moments")
  ]
  configs += [
    dict(
      section="optimizers",
      opt="clip_adamw_cosine",
      tree="leaves4096",
      size=size,
      libs=ALL_LIBS if full else ("optcompose-flat", "torch-fused", "torch-foreach"),
      reps=reps,
    )
  ]
  # The noise floor of the bounded rows: AdamW paired with the same AdamW step compiled
  # again, timed the same way. A bound whose margin is below this spread is decided by noise.
  configs += [
    dict(
      section="noise floor: AdamW against itself",
      opt="adamw",
      tree=t,
      size=size,
      libs=("optcompose", BARE),
      reps=bounded,
      processes=PROCESSES,
    )
    for t in ("flat", "transformer")
  ]
  configs += [
    dict(
      section="clipping and wrappers",
      opt="clip_adamw_cosine",
      tree=t,
      size=size,
      libs=("optcompose", "optcompose-flat", BARE, "optax", "torch-fused"),
      reps=bounded,
      processes=PROCESSES,
    )
    for t in ("flat", "transformer", "leaves1000")
  ]
  configs += [
    dict(
      section="clipping and wrappers",
      opt=o,
      tree="flat",
      size=size,
      libs=("optcompose", BARE, "optax"),
      reps=bounded,
      processes=PROCESSES,
    )
    for o in WRAPPERS
  ]
  configs += [
    dict(
      section="low-precision state",
      opt="adamw_bf16_mu",
      tree=t,
      size=size,
      libs=("optcompose", "optax"),
      reps=bounded,
      processes=PROCESSES,
    )
    for t in ("flat", "transformer")
  ]
  configs += [
    dict(
      section="low-precision state",
      opt="adamw_bf16_moments",
      tree=t,
      size=size,
      libs=("optcompose", BARE, "optax"),
      reps=bounded,
      processes=PROCESSES,
    )
    for t in ("flat", "transformer")
  ]
  configs += [
    dict(
      section="ZeRO-1: optimizer state per device",
      kind="zero1",
      opt="adamw",
      tree="transformer",
      size=size,
      devices=8,
    )
  ]
  configs += [
    dict(
      section="issue 15 optimizers",
      opt=o,
      tree="transformer",
      size=size,
      libs=("optcompose", "optax", "torch-fused", "torch-foreach"),
      reps=reps,
    )
    for o in NEW_OPTIMIZERS
  ]
  configs += [
    dict(
      section="sizes",
      opt="adamw",
      tree="flat",
      size=s * M,
      libs=("optcompose", "optax", "torch-fused"),
      reps=reps,
    )
    for s in (1, 4, 64)
  ]
  configs += [
    dict(
      section="whole training step",
      kind="train",
      opt="nanogpt_train_step",
      tree="nanogpt",
      reps=60,
      processes=PROCESSES,
    )
  ]
  return configs


def environment() -> list:
  import jax
  import optax
  import optcompose

  try:
    import torch

    torch_version = torch.__version__
  except ImportError:
    torch_version = "not installed (PyTorch rows skipped)"
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return [
    f"- date: {datetime.date.today()}",
    f"- machine: {cpu}, {os.cpu_count()} cores; JAX devices: {jax.device_count()} x "
    f"{dev.platform} ({dev.device_kind})",
    f"- versions: python {platform.python_version()}, jax {jax.__version__}, "
    f"optax {optax.__version__}, optcompose {optcompose.__version__}, torch {torch_version}",
  ]


def _bytes(per_param: float) -> str:
  """State bytes per parameter: a factored state (Adafactor) is far below one byte."""
  return f"{per_param:.1f}" if per_param >= 1 or per_param == 0 else f"{per_param:.3f}"


def table(results: list) -> list:
  lines = [
    "| optimizer | tree | params | library | median ms | p10-p90 ms | GB/s (ideal B) "
    "| of bandwidth | compile s | state B/param | peak MB | time / Optax (paired) "
    "| time / bare (paired) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for res in results:
    for r in res["rows"]:
      gbs = r["ideal_bytes"] / (r["median_ms"] / 1e3) / 1e9
      peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
      ratio = "-" if r.get("paired_vs_optax") is None else f"{r['paired_vs_optax']:.2f}"
      vs_bare = "-" if r.get("paired_vs_bare") is None else f"{r['paired_vs_bare']:.2f}"
      lib = (
        f"{r['lib']} ({res['cfg'].get('bare', 'adamw')} alone)" if r["lib"] == BARE else r["lib"]
      )
      compile_s = "-" if r["lib"].startswith("torch") else f"{r['compile_s']:.2f}"
      lines.append(
        f"| {res['cfg']['opt']}{' (mean of all calls)' if res['cfg']['opt'] in AMORTIZED else ''} "
        f"| {res['label']} | {res['params'] / 1e6:.1f}M | {lib} "
        f"| {r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} | {gbs:.1f} "
        f"({r['ideal_bytes'] / res['params']:.0f} B/param) | {gbs / res['bandwidth_gbs']:.2f} "
        f"| {compile_s} | {_bytes(r['state_bytes_per_param'])} | {peak} | {ratio} "
        f"| {vs_bare} |"
      )
    for lib, why in res["skipped"].items():
      lines.append(
        f"| {res['cfg']['opt']} | {res['label']} | | {lib} | skipped: {why} | | | | | | | | |"
      )
  return lines


def section_lines(results: list) -> list:
  """The tables of one section's results: ZeRO-1's memory, whole training steps, or the
  optimizer-step table."""
  from train_step import train_table

  lines = sum((memory_table(r) for r in results if "memory_rows" in r), [])
  lines += sum((train_table(r) for r in results if r.get("kind") == "train"), [])
  steps = [r for r in results if "memory_rows" not in r and r.get("kind") != "train"]
  return lines + (table(steps) if steps else [])


def merge(results: list) -> dict:
  """One configuration's results from several processes, as one: every number of a row is
  the median over the processes (the ratios included, each computed in its own process; a
  ratio's median is taken on its logarithm),
  and ``each`` keeps the per-process ratios (``paired_vs_bare``, ``paired_vs_optax`` and
  ``paired_vs``), which the bounds section shows."""
  if len(results) == 1:
    return results[0]
  first = results[0]
  if "rows" not in first:
    return first
  median = lambda values: float(np.median(values))
  # Ratios: the median of their logarithms, so that over an even number of processes (the
  # mean of the middle two) the median of x / y is still 1 / the median of y / x.
  ratio = lambda values: float(np.exp(np.median(np.log(values))))  # noqa: E731
  rows = []
  for row in first["rows"]:
    same = [next(r for r in res["rows"] if r["lib"] == row["lib"]) for res in results]
    merged = dict(row)
    for key, value in row.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        merged[key] = (ratio if key.startswith("paired_vs") else median)([r[key] for r in same])
    merged["paired_vs"] = {k: ratio([r["paired_vs"][k] for r in same]) for k in row["paired_vs"]}
    merged["each"] = {
      key: [r[key] for r in same]
      for key in ("paired_vs_bare", "paired_vs_optax")
      if row.get(key) is not None
    }
    merged["each"]["paired_vs"] = {k: [r["paired_vs"][k] for r in same] for k in row["paired_vs"]}
    rows.append(merged)
  merged = {**first, "rows": rows, "processes": len(results)}
  if "bandwidth_gbs" in first:
    merged["bandwidth_gbs"] = median([r["bandwidth_gbs"] for r in results])
  return merged


def bounds(results: list) -> list:
  """Issue 16's bounds, each checked on the paired ratios of one configuration."""
  lines = []

  def check(what, value, op, bound, each=None):
    ok = value <= bound if op == "<=" else value >= bound
    spread = f" (median of {', '.join(f'{v:.2f}' for v in each)})" if each else ""
    lines.append(
      f"- {'PASS' if ok else 'FAIL'}: {what}: {value:.2f}{spread} (bound {op} {bound:.2f})"
    )

  def each(row, key, other=None, invert=False):
    values = row.get("each", {}).get(key)
    if other is not None:
      values = (values or {}).get(other)
    return [1 / v for v in values] if values and invert else values

  for res in results:
    if "rows" not in res:
      continue
    rows, opt, label = {r["lib"]: r for r in res["rows"]}, res["cfg"]["opt"], res["label"]
    ours = rows.get("optcompose")
    if ours is None:
      continue
    if opt == "adamw" and ours.get("paired_vs_bare") is not None:
      values = each(ours, "paired_vs_bare") or [ours["paired_vs_bare"]]
      spread = f" (median of {', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
      lines.append(
        f"- NOISE FLOOR (no bound): AdamW / the same AdamW step compiled again, {label}: "
        f"{ours['paired_vs_bare']:.2f}{spread}"
      )
    elif opt == "clip_adamw_cosine" and ours.get("paired_vs_bare") is not None:
      check(
        f"clip+AdamW+cosine / AdamW alone, {label}",
        ours["paired_vs_bare"],
        "<=",
        CLIP_BOUND,
        each(ours, "paired_vs_bare"),
      )
      if "optax" in ours["paired_vs"]:
        check(
          f"Optax's clip+AdamW+cosine / ours, {label}",
          1 / ours["paired_vs"]["optax"],
          ">=",
          CLIP_VS_OPTAX,
          each(ours, "paired_vs", "optax", invert=True),
        )
      if "torch-fused" in ours["paired_vs"]:
        check(
          f"ours / PyTorch fused (clip_grad_norm_ + fused AdamW), {label}",
          ours["paired_vs"]["torch-fused"],
          "<=",
          1.0,
          each(ours, "paired_vs", "torch-fused"),
        )
      flat = rows.get("optcompose-flat")
      if flat is not None and "optax" in flat["paired_vs"]:
        check(
          f"Optax's clip+AdamW+cosine / ours on FlatParams, {label}",
          1 / flat["paired_vs"]["optax"],
          ">=",
          CLIP_VS_OPTAX,
          each(flat, "paired_vs", "optax", invert=True),
        )
      if flat is not None and "torch-fused" in flat["paired_vs"]:
        check(
          f"ours on FlatParams / PyTorch fused, {label}",
          flat["paired_vs"]["torch-fused"],
          "<=",
          1.0,
          each(flat, "paired_vs", "torch-fused"),
        )
    elif opt in EXTRA_BYTES and ours.get("paired_vs_bare") is not None:
      ideal = ours["ideal_bytes"] / rows[BARE]["ideal_bytes"]
      if opt == "diagnostics_every10_adamw":
        check(
          f"with_diagnostics(AdamW, every_k=10) / AdamW, mean of all calls, {label}",
          ours["paired_vs_bare"],
          "<=",
          DIAGNOSTICS_BOUND,
          each(ours, "paired_vs_bare"),
        )
        check(
          f"with_diagnostics(AdamW, every_k=10) / AdamW, compile time, {label}",
          ours["compile_s"] / rows[BARE]["compile_s"],
          "<=",
          DIAGNOSTICS_BOUND,
        )
      else:
        check(
          f"{opt} / AdamW, {label} (ideal {ideal:.2f} x {WRAPPER_SLACK})",
          ours["paired_vs_bare"],
          "<=",
          ideal * WRAPPER_SLACK,
          each(ours, "paired_vs_bare"),
        )
    elif res.get("kind") == "train":
      diag = rows.get("optcompose with_diagnostics(every_k=10)")
      if diag is not None:
        check(
          f"with_diagnostics(every_k=10) / recipe, mean of all steps, whole step ({label})",
          diag["paired_vs"]["optcompose"],
          "<=",
          DIAGNOSTICS_BOUND,
          each(diag, "paired_vs", "optcompose"),
        )
        check(
          f"with_diagnostics(every_k=10) / recipe, compile time, whole step ({label})",
          diag["compile_s"] / ours["compile_s"],
          "<=",
          DIAGNOSTICS_BOUND,
        )
      if "optax" in ours["paired_vs"]:
        check(
          f"optcompose recipe / Optax's, whole step ({label})",
          ours["paired_vs"]["optax"],
          "<=",
          1.0,
          each(ours, "paired_vs", "optax"),
        )
    elif opt == "adamw_bf16_mu" and ours.get("paired_vs_optax") is not None:
      check(
        f"AdamW, bfloat16 mu, ours / Optax, {label}",
        ours["paired_vs_optax"],
        "<=",
        1.0,
        each(ours, "paired_vs_optax"),
      )
    elif opt == "adamw_bf16_moments" and ours.get("paired_vs_bare") is not None:
      check(
        f"AdamW, bfloat16 mu and nu / float32 moments, {label}",
        ours["paired_vs_bare"],
        "<=",
        1.0,
        each(ours, "paired_vs_bare"),
      )
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="1M parameters, three rows")
  parser.add_argument("--full", action="store_true", help="add per-leaf clip+AdamW on 4096 leaves")
  parser.add_argument(
    "--only", help="comma-separated optimizers: run only their rows, in this order"
  )
  parser.add_argument("--trees", help="comma-separated trees (flat, transformer, ...): only these")
  parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
  parser.add_argument(
    "--default-malloc",
    action="store_true",
    help="leave glibc's malloc settings at their defaults (see MALLOC)",
  )
  parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: run one, print JSON
  args = parser.parse_args(argv)
  if args.config:
    # The machine is described by a configuration's own process: the parent never imports
    # JAX, which on a GPU would hold most of its memory while the configurations run.
    res = {**run_config(json.loads(args.config)), "environment": environment()}
    print("RESULT " + json.dumps(res), flush=True)
    return 0
  results, t0, failed = [], time.perf_counter(), 0
  configs = suite(args.quick, args.full)
  if args.only:
    only = args.only.split(",")
    unknown = sorted(set(only) - {c["opt"] for c in configs})
    if unknown:
      parser.error(f"--only: no rows for {', '.join(unknown)}")
    configs = sorted((c for c in configs if c["opt"] in only), key=lambda c: only.index(c["opt"]))
  if args.trees:
    trees = args.trees.split(",")
    unknown = sorted(set(trees) - {c["tree"] for c in suite(args.quick, args.full)})
    if unknown:
      parser.error(f"--trees: no rows for {', '.join(unknown)}")
    configs = [c for c in configs if c["tree"] in trees]
  if not configs:
    parser.error("no configuration left to run")
  env = dict(os.environ) if args.default_malloc else {**os.environ, **MALLOC}
  for cfg in configs:
    run_env = (
      env
      if "devices" not in cfg
      else {
        **env,
        "XLA_FLAGS": (
          env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={cfg['devices']}"
        ),
      }
    )
    runs = []
    for i in range(cfg.get("processes", 1)):
      proc = subprocess.run(
        [sys.executable, __file__, "--config", json.dumps({**cfg, "process": i})],
        capture_output=True,
        text=True,
        env=run_env,
      )
      line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
      if line is None:  # reported, and the run goes on: a long run keeps the other rows
        print(f"configuration {cfg} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        break
      runs.append(json.loads(line[len("RESULT ") :]))
    if len(runs) < cfg.get("processes", 1):
      failed += 1
      continue
    res = merge(runs)
    results.append(res)
    print("\n".join(section_lines([res])), flush=True)
    # Written after every configuration: a run stopped early keeps what it measured.
    write(args, results, time.perf_counter() - t0, len(configs))
  print(
    (f"wrote {args.out}" if results else f"nothing written to {args.out}")
    + (f"; {failed} configurations failed" if failed else "")
  )
  return 1 if failed else 0


def write(args, results: list, seconds: float, total: int) -> None:
  bws = ", ".join(
    f"{r['params'] / 1e6:.0f}M: {r['bandwidth_gbs']:.1f}"
    for r in {r["params"]: r for r in results if "bandwidth_gbs" in r}.values()
  )
  lines = [
    "# Benchmark results",
    "",
    *next((r for r in results if "rows" in r), results[0])["environment"],
    f"- in-place streaming bandwidth (GB/s, x <- a x + b, donated float32, by size): {bws}",
    f"- jitted steps with parameters and state donated; libraries alternated step by step "
    f"in one process per configuration (the bounded rows: in {PROCESSES} processes, every "
    "number the median over them, since buffer placement biases a pairing within one "
    "process by up to about 9%; every JAX step compiled before any buffer is allocated, "
    "and half the processes building the libraries in reverse order); "
    f"{' or '.join(map(str, sorted({r['cfg']['reps'] for r in results if 'reps' in r['cfg']})))} "
    f"timed steps each (the bounded rows get more); a {SCRUB_BYTES // M} MB buffer written "
    "before every timed step (cold caches, idle threads; on an accelerator in its memory); "
    + (
      f"the whole run took {seconds:.0f} s"
      if len(results) == total
      else f"PARTIAL: {len(results)} of {total} configurations, in {seconds:.0f} s"
    ),
    "- peak MB: XLA's accounting for JAX; parameters + gradients + state for PyTorch",
    "- malloc: "
    + (
      "glibc's defaults"
      if args.default_malloc
      else " ".join(f"{k}={v}" for k, v in MALLOC.items())
      + " (every library: freed buffers are reused, not returned to the "
      "system and faulted in again at every step; see docs/performance.md)"
    ),
    "",
  ]
  for section in dict.fromkeys(r["cfg"]["section"] for r in results):
    these = [r for r in results if r["cfg"]["section"] == section]
    lines += [f"## {section}", "", *section_lines(these), ""]
  if bounds(results):
    lines += ["## bounds (issue 16), on the paired ratios above", "", *bounds(results), ""]
  out = Path(args.out)
  partial = out.with_name(out.name + ".partial")
  partial.write_text("\n".join(lines))
  os.replace(partial, out)  # a run stopped while writing leaves the previous file whole


if __name__ == "__main__":
  sys.exit(main())
