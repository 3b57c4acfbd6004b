"""Count the XLA fusions of a whole optimizer step, to see that a refactor kept the kernels.

Run from a checkout, with its package on the path::

    PYTHONPATH=$PWD .venv/bin/python tools/fusions.py [--json OUT] [--against BASE.json]
                                                     [--dump DIR]

For a representative parameter tree (an MLP-like dict: 4 float32 matrices and their biases,
8 leaves, 984,960 params; shapes only, nothing is allocated) and each optimizer below, a full
step ``(params, state, grads) -> (apply_updates(params, u), new_state)`` is jitted, lowered
and compiled, and its optimized HLO (``.compile().as_text()``) counted:

- ``fusions``: ``fusion`` instructions of the ENTRY computation (one kernel each);
- ``fusions_all``: ``fusion`` instructions in the whole module (ENTRY and any control-flow
  body; fused computations themselves hold none);
- ``entry``: instructions of ENTRY, everything included;
- ``kernels``: those of ENTRY that do work, i.e. without parameter, constant, tuple,
  get-tuple-element and bitcast.

Prints one line per optimizer; ``--json`` writes the counts, ``--against`` compares them with a
saved file and exits 1 if any differs, ``--dump`` writes each HLO text (to diff). The counts
depend on the jax/XLA version (and may on the CPU): compare on the same machine and venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax
import jax.numpy as jnp

import optcompose as oc

# (in, out) of four dense layers: 524288 + 262144 + 131072 + 65536 weights, 1920 biases.
LAYERS = [(512, 1024), (1024, 256), (256, 512), (512, 128)]
PARAMS = {
  f"dense{i}": {
    "kernel": jax.ShapeDtypeStruct(shape, jnp.float32),
    "bias": jax.ShapeDtypeStruct(shape[1:], jnp.float32),
  }
  for i, shape in enumerate(LAYERS)
}
OPTIMIZERS = {
  "sgd_momentum": lambda: oc.sgd(1e-2, momentum=0.9),
  "adam": lambda: oc.adam(1e-3),
  "adamw": lambda: oc.adamw(1e-3),
  "clip+adamw": lambda: oc.chain(oc.clip_by_global_norm(1.0), oc.adamw(1e-3)),
}
TRIVIAL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
OPCODE = re.compile(r" = .*? ([a-z][\w-]*)\(")  # the first `name(` after the type


def step_hlo(tx):
  """The optimized HLO text of one jitted step of ``tx`` on ``PARAMS``."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return oc.apply_updates(params, updates), state

  state = jax.eval_shape(tx.init, PARAMS)
  return jax.jit(step).lower(PARAMS, state, PARAMS).compile().as_text()


def count(hlo):
  entry, in_entry, fusions_all = [], False, 0
  for line in hlo.splitlines():
    if line.startswith("ENTRY "):
      in_entry = True
    elif in_entry and line.startswith("}"):
      in_entry = False
    elif " = " in line and (m := OPCODE.search(line)):
      fusions_all += m.group(1) == "fusion"
      if in_entry:
        entry.append(m.group(1))
  return {
    "fusions": entry.count("fusion"),
    "fusions_all": fusions_all,
    "entry": len(entry),
    "kernels": sum(op not in TRIVIAL for op in entry),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--json", help="write the counts here")
  ap.add_argument("--against", help="a --json file to compare with (exit 1 on a difference)")
  ap.add_argument("--dump", help="a folder for each optimizer's HLO text")
  args = ap.parse_args()
  n = sum(s.size for s in jax.tree.leaves(PARAMS))
  print(
    f"optcompose from {oc.__file__}; jax {jax.__version__}; "
    f"{len(jax.tree.leaves(PARAMS))} leaves, {n} params"
  )
  counts = {}
  for name, make in OPTIMIZERS.items():
    hlo = step_hlo(make())
    counts[name] = count(hlo)
    print(f"{name:14s} " + "  ".join(f"{k} {v:3d}" for k, v in counts[name].items()))
    if args.dump:
      os.makedirs(args.dump, exist_ok=True)
      with open(os.path.join(args.dump, f"{name}.hlo.txt"), "w") as f:
        f.write(hlo)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "params": n, "counts": counts}, f, indent=1)
  if args.against:
    with open(args.against) as f:
      base = json.load(f)
    if base["jax"] != jax.__version__:
      print(f"NOTE: {args.against} is from jax {base['jax']}")
    diffs = [
      f"{name}: {base['counts'].get(name)} -> {c}"
      for name, c in counts.items()
      if base["counts"].get(name) != c
    ]
    diffs += [f"{name}: only in {args.against}" for name in base["counts"] if name not in counts]
    print("\n".join(diffs) if diffs else f"same counts as {args.against}")
    return int(bool(diffs))
  return 0


if __name__ == "__main__":
  sys.exit(main())
