"""Every optimizer against Optax's: step time, compile time, fusions and state, paired.

    .venv/bin/python benchmarks/every_optimizer.py --tree transformer
    .venv/bin/python benchmarks/every_optimizer.py --tree transformer --order 1

For every optimizer in ``optcompose.core.registry.names('optimizer')`` except L-BFGS (its
step evaluates the loss; ``benchmarks/run.py`` times it), plus SGD with Nesterov momentum,
optcompose's and Optax's optimizer of that name are built with the learning rate 1e-3 and
every other argument at its default (SPECIAL lists the exceptions). Each step,
``tx.update`` then ``apply_updates``, is jitted with parameters and state donated and
compiled on abstract arguments (lower + compile timed, once each), then both libraries'
buffers are made from the same drawn numbers, and the two steps are timed alternately in
this process (who goes first rotating every repetition), a 128 MB buffer written before
every timed step (``run.Scrub``). Per optimizer it prints the paired median of ours / Optax's
step time (and the 10th-90th percentile of the per-step ratios), the ratio of compile
times, the fusions XLA runs as their own kernels (outside fused computations) in each
compiled step, and the optimizer state in bytes per parameter (a PRNG key not counted).

Whoever is built first is favoured or penalised in its pairing: on one leaf of 16.8M, Optax's
AdamW against itself measured 0.92 and 1.17 by build order (1.00 either way on 148 leaves).
``--order 0`` builds optcompose first, ``--order 1`` Optax; run both and take the geometric
mean of the two ratios. A ratio that moves with the order is likely that bias; equal fusion
counts do not prove equal code (polyak_sgd's extra ``abs`` was inside a fusion): compare the
compiled steps. Each step compiles once, so the compile ratio is rough (a throwaway step is
compiled first, so that neither library pays the process's first compilation). The process
re-executes itself with run.py's malloc settings (MALLOC there) unless ``--default-malloc``.
See "Every optimizer against Optax" in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MALLOC, Scrub, tree_label, tree_shapes  # noqa: E402

LR = 1e-3
# name: (how each library builds it, extra step arguments), where the default
# ``getattr(lib, name)(LR)`` does not do. Polyak's step size needs the loss value (a traced
# scalar argument of the step); its only rate is max_learning_rate, left at 1.0.
SPECIAL = {
  "polyak_sgd": (lambda m, jax: m.polyak_sgd(), ("value",)),
  "noisy_sgd": (lambda m, jax: m.noisy_sgd(LR, key=jax.random.key(0)), ()),
  "sgd_nesterov": (lambda m, jax: m.sgd(LR, momentum=0.9, nesterov=True), ()),
}
SKIPPED = ("lbfgs",)  # its update needs value_fn: in benchmarks/run.py


def optimizer_names() -> list:
  from optcompose.core import registry

  names = [n for n in registry.names("optimizer") if n not in SKIPPED]
  return sorted(names + [n for n in SPECIAL if n not in names])


def fusions(compiled) -> int | None:
  """The fusions XLA runs as kernels of their own: those outside fused computations (in the
  entry computation, loop bodies and conditional branches)."""
  try:
    module = compiled.runtime_executable().hlo_modules()[0]
  except (AttributeError, IndexError):  # not exposed by this jaxlib
    return None
  return sum(
    i.opcode.name == "kFusion"
    for c in module.make_nonfusion_computations()
    for i in c.instructions()
  )


class Step:
  """One library's optimizer step: compiled at construction on abstract arguments, its
  buffers made by :meth:`allocate` (after every library has compiled)."""

  def __init__(self, lib: str, name: str, shapes: dict, n: int):
    import jax
    import jax.numpy as jnp
    import optax
    import optcompose

    m = optcompose if lib == "optcompose" else optax
    build, extra = SPECIAL.get(name, (lambda m, jax: getattr(m, name)(LR), ()))
    self.tx = tx = build(m, jax)

    def step(params, state, grads, *scalars):
      updates, state = tx.update(grads, state, params, **dict(zip(extra, scalars)))
      return optcompose.apply_updates(params, updates), state

    abstract = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    state = jax.eval_shape(tx.init, abstract)
    self.scalars = [jnp.float32(1.0) for _ in extra]
    t = time.perf_counter()
    self.compiled = (
      jax.jit(step, donate_argnums=(0, 1)).lower(abstract, state, abstract, *self.scalars).compile()
    )
    self.compile_s = time.perf_counter() - t
    self.fusions = fusions(self.compiled)
    self.state_per_param = (
      sum(
        int(np.prod(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(state)
        if x.ndim and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)
      )
      / n
    )
    self.shapes, self.block = shapes, jax.block_until_ready

  def allocate(self):
    import jax.numpy as jnp

    rng = np.random.default_rng(0)  # the same numbers for both libraries
    params, grads = (
      {
        k: jnp.asarray(rng.normal(size=s).astype(np.float32) * scale, d)
        for k, (s, d) in self.shapes.items()
      }
      for scale in (0.02, 1e-3)
    )
    self.args = [params, self.tx.init(params), grads, *self.scalars]

  def __call__(self):
    self.args[0], self.args[1] = self.compiled(*self.args)
    self.block(self.args[:2])


def measure(name: str, shapes: dict, reps: int, warmup: int, order: int) -> dict:
  n = sum(int(np.prod(s)) for s, _ in shapes.values())
  libs = ["optcompose", "optax"][:: -1 if order else 1]
  steps = {lib: Step(lib, name, shapes, n) for lib in libs}  # both compiled, then allocated
  for lib in libs:
    steps[lib].allocate()
  for _ in range(1 + warmup):  # the first call allocates the outputs
    for lib in libs:
      steps[lib]()
  scrub, times = Scrub(), {lib: [] for lib in libs}
  for rep in range(reps):
    for lib in libs[rep % 2 :] + libs[: rep % 2]:
      scrub()  # cold caches and idle worker threads before every timed step
      t = time.perf_counter()
      steps[lib]()
      times[lib].append(time.perf_counter() - t)
  ours, theirs = steps["optcompose"], steps["optax"]
  ratios = np.asarray(times["optcompose"]) / np.asarray(times["optax"])
  return {
    "name": name,
    "ms": [float(np.median(times[lib])) * 1e3 for lib in ("optcompose", "optax")],
    "ratio": float(np.median(ratios)),
    "spread": (float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90))),
    "compile": ours.compile_s / theirs.compile_s,
    "fusions": (ours.fusions, theirs.fusions),
    "state": (ours.state_per_param, theirs.state_per_param),
  }


def size(text: str) -> int:
  """A parameter count: 16M is 16 * 2**20 (16.8M), 256K is 256 * 2**10; else an integer."""
  scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
  return int(float(text[:-1] if scale > 1 else text) * scale)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tree", choices=("flat", "transformer"), default="flat")
  parser.add_argument("--size", type=size, default=16 << 20, help="parameters: 16M (default)")
  parser.add_argument("--reps", type=int, default=30, help="timed steps per library")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps per library")
  parser.add_argument("--only", nargs="+", metavar="NAME", help="these optimizers only")
  parser.add_argument("--order", type=int, choices=(0, 1), default=0, help="1: Optax built first")
  parser.add_argument("--default-malloc", action="store_true", help="keep glibc's settings")
  args = parser.parse_args(argv)
  names = optimizer_names()
  unknown = sorted(set(args.only or ()) - set(names))
  if unknown:
    parser.error(f"--only: unknown {', '.join(unknown)} (one of {', '.join(names)})")
  if not args.default_malloc and any(os.environ.get(k) != v for k, v in MALLOC.items()):
    # glibc reads these at startup: run again with them (freed buffers reused, not re-mapped)
    argv = sys.argv if argv is None else [sys.argv[0], *argv]
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **MALLOC})
  import jax
  import jax.numpy as jnp
  import optax

  jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(8)).compile()  # first-use costs, not timed
  shapes = tree_shapes(args.tree, args.size)
  n = sum(int(np.prod(s)) for s, _ in shapes.values())
  first = "Optax" if args.order else "optcompose"
  print(
    f"{tree_label(args.tree, shapes)}, {n / 1e6:.1f}M parameters, jax {jax.__version__}, "
    f"optax {optax.__version__}, {jax.devices()[0].device_kind}; {args.reps} timed steps "
    f"each, {first} built first (run --order {1 - args.order} too)\n"
  )
  print(
    "| optimizer | tree | median ms ours / Optax | time ours/Optax (paired) | p10-p90 | compile "
    "ours/Optax | fusions ours/Optax | state B/param ours/Optax |"
  )
  print("|---|---|---|---|---|---|---|---|")
  label = f"{args.tree} ({len(shapes)} leaves)" if len(shapes) > 1 else "1 leaf"
  for name in args.only or names:
    r = measure(name, shapes, args.reps, args.warmup, args.order)
    print(
      f"| {name} | {label} | {r['ms'][0]:.2f} / {r['ms'][1]:.2f} | {r['ratio']:.2f} "
      f"| {r['spread'][0]:.2f}-{r['spread'][1]:.2f} | {r['compile']:.2f} "
      f"| {r['fusions'][0]}/{r['fusions'][1]} "
      f"| {r['state'][0]:.3g}/{r['state'][1]:.3g} |",  # Adafactor's: far below 1
      flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
