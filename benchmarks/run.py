"""Update-step benchmark: optcompose against Optax, side by side in one process.

For each tree shape, both libraries' jitted AdamW steps (params, grads and state donated) are
timed alternately; the table gives median step time, the spread (p10-p90), effective GB/s
over the ideal 28 bytes per float32 parameter (read p, g, m, v; write p, m, v), the fraction
of this machine's in-place streaming bandwidth measured in the same run, compile time, and
the optcompose/Optax time ratio. Results go to benchmarks/RESULTS.md.

Run: `make bench` (or `python benchmarks/run.py [--quick]`). The fuller suite (more
optimizers, sizes, PyTorch, memory) is issue 3's work.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optcompose

BYTES_PER_PARAM = {"adamw": 28}


def trees(total: int):
  """Tree shapes with about `total` float32 parameters."""
  d = int(round((total / 12 / 12) ** 0.5 / 64) * 64) or 64
  block = {"ln1": (d,), "qkv": (d, 3 * d), "qkv_b": (3 * d,), "proj": (d, d), "proj_b": (d,),
           "ln2": (d,), "fc1": (d, 4 * d), "fc1_b": (4 * d,), "fc2": (4 * d, d), "fc2_b": (d,)}
  transformer = {f"block{i}": {k: np.zeros(s, np.float32) for k, s in block.items()}
                 for i in range(12)}
  small = 4096
  return {
      "1 flat leaf": {"w": np.zeros(total, np.float32)},
      f"transformer-like ({len(jax.tree.leaves(transformer))} leaves)": transformer,
      f"{total // small} leaves of {small}": {f"p{i}": np.zeros(small, np.float32)
                                              for i in range(total // small)},
  }


def stream_bandwidth(n: int, reps: int) -> float:
  """In-place streaming bandwidth (GB/s): x <- a*x + b on a donated buffer (8 B/element)."""
  f = jax.jit(lambda x: x * 0.999 + 1e-3, donate_argnums=0)
  x = jnp.ones(n, jnp.float32)
  x = f(x).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    x = f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return 8 * n / statistics.median(times) / 1e9


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def bench_tree(tree, reps: int):
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-3, jnp.float32), tree)
  runs = {}
  for name, tx in (("optcompose", optcompose.adamw(1e-3, weight_decay=1e-4)),
                   ("optax", optax.adamw(1e-3, weight_decay=1e-4))):
    params = jax.tree.map(lambda x: jnp.asarray(x) + 1.0, tree)
    state = tx.init(params)
    step = make_step(tx)
    t = time.perf_counter()
    compiled = step.lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t
    params, state = compiled(params, state, grads)
    runs[name] = {"step": compiled, "params": params, "state": state, "times": [],
                  "compile": compile_s}
  for _ in range(reps):  # alternate the two libraries so drift affects both alike
    for run in runs.values():
      t = time.perf_counter()
      run["params"], run["state"] = run["step"](run["params"], run["state"], grads)
      jax.block_until_ready(run["params"])
      run["times"].append(time.perf_counter() - t)
  return runs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="1M parameters, fewer repetitions")
  parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
  args = parser.parse_args(argv)
  total = 1 << 20 if args.quick else 1 << 22
  reps = 10 if args.quick else 30
  bw = stream_bandwidth(total * 4, reps)
  device = jax.devices()[0]
  lines = [
      "# Benchmark results", "",
      f"- date: {datetime.date.today()}", f"- machine: {platform.machine()}, "
      f"{jax.device_count()} {device.platform} device(s) ({device.device_kind}), "
      f"python {platform.python_version()}",
      f"- versions: jax {jax.__version__}, optax {optax.__version__}, "
      f"optcompose {optcompose.__version__}",
      f"- in-place streaming bandwidth (x <- a x + b, donated, 8 B/elem): {bw:.1f} GB/s",
      f"- AdamW float32, {total / 1e6:.1f}M parameters, jitted step with donated buffers, "
      f"{reps} timed steps each, libraries alternated", "",
      "| tree | library | median ms | p10-p90 ms | GB/s (28 B/param) | of bandwidth | compile s | time / Optax |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for label, tree in trees(total).items():
    n = sum(x.size for x in jax.tree.leaves(tree))
    runs = bench_tree(tree, reps)
    ref = statistics.median(runs["optax"]["times"])
    for name, run in runs.items():
      ts = np.asarray(run["times"]) * 1e3
      med = float(np.median(ts))
      gbs = BYTES_PER_PARAM["adamw"] * n / (med / 1e3) / 1e9
      lines.append(
          f"| {label} | {name} | {med:.2f} | {np.percentile(ts, 10):.2f}-{np.percentile(ts, 90):.2f}"
          f" | {gbs:.1f} | {gbs / bw:.2f} | {run['compile']:.2f} | {med / 1e3 / ref:.2f} |")
    print(lines[-2], lines[-1], sep="\n", flush=True)
  Path(args.out).write_text("\n".join(lines) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
