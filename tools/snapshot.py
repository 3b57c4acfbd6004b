"""A numerical baseline of every registry case, to prove that a refactor moved nothing.

Run from a checkout, with its package and tests on the path::

    PYTHONPATH=$PWD:$PWD/tests .venv/bin/python tools/snapshot.py snapshot OUT.npz
    PYTHONPATH=$PWD:$PWD/tests .venv/bin/python tools/snapshot.py compare OUT.npz

For every case of tests/registry.py and every problem of tests/problems.py (quadratic, mlp),
``snapshot`` runs the case's optcompose transformation (``case.ours()``, ``jax.jit`` of its
update, ``value=`` the loss where ``case.with_value``, as tests/test_parity.py does) and records

- ``case/problem/f64/params/LEAF``: a 200-step float64 trajectory (under ``numerics.x64()``),
  the params after every step, stacked on axis 0;
- ``case/problem/f32/{params,grads,updates}/LEAF`` and ``.../f32/value``: 100 float32 steps,
  the params before each step, its gradients (and loss) and the update computed from them.

``compare`` reruns with whatever optcompose (and registry) is on the path:

- float64: its own trajectory must stay within ``--rtol`` (1e-12) of the snapshot's, relative
  to each leaf's largest magnitude at that step (floored at 1e-3, as ``assert_rel_close``);
- float32 in lockstep: the optimizer is fed the snapshot's params, grads (and loss) at every
  step, carries its own state, and its update must be within ``--ulps`` (1) float32 epsilons of
  the snapshot's at each element's magnitude, ``|u_snapshot|`` floored at float32's ``tiny``
  (so one ulp anywhere, denormals included, counts at most 1).

Cases or problems in one run only are listed, not failures. Prints a table; exits 1 on any
failure (a case that raises included). Same program on the same machine gives 0 and 0 ulps;
XLA rounds differently on another instruction set, so compare on the snapshot's machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import optcompose as oc
from numerics import x64
from problems import mlp, quadratic
from registry import CASES

PROBLEMS = {"quadratic": quadratic, "mlp": mlp}
F64_STEPS, F32_STEPS = 200, 100
EPS32, TINY32 = float(np.finfo(np.float32).eps), float(np.finfo(np.float32).tiny)
APPLY = jax.jit(oc.apply_updates)  # one compiled function per tree structure and dtype


def leaf_names(tree):
  """``dense1.kernel``-style names of a tree's leaves, in flatten order."""
  key = lambda k: str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k))
  return [".".join(map(key, path)) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def stacked(trees):
  """A list of same-structure trees -> {leaf name: its values stacked on a new axis 0}."""
  columns = zip(*(jax.tree.leaves(t) for t in trees))
  return {n: np.stack([np.asarray(x) for x in c]) for n, c in zip(leaf_names(trees[0]), columns)}


def steps(case, prob, n, feed=None):
  """Run ``case.ours()`` jitted for ``n`` steps on ``prob``; yield (params, grads, value,
  update, new params) per step. With ``feed(t) -> (params, grads, value)`` the inputs come
  from there (lockstep; no new params); otherwise from the run's own trajectory."""
  tx = case.ours()
  update = jax.jit(tx.update)
  params = prob.params if feed is None else feed(0)[0]
  state = tx.init(params)
  for t in range(n):
    if feed is None:
      grads, value = prob.grad(params, t), prob.loss(params) if case.with_value else None
    else:
      params, grads, value = feed(t)
    u, state = update(grads, state, params, **({"value": value} if case.with_value else {}))
    new = APPLY(params, u) if feed is None else None
    yield params, grads, value, u, new
    params = new


def f64_path(case, name):
  """The params after every step of the float64 trajectory, stacked per leaf."""
  with x64():
    prob = PROBLEMS[name](jnp.float64)
    return stacked([new for *_, new in steps(case, prob, F64_STEPS)])


def f32_record(case, prob):
  ps, gs, vs, us, _ = zip(*steps(case, prob, F32_STEPS))
  out = {
    f"{kind}/{leaf}": a
    for kind, trees in (("params", ps), ("grads", gs), ("updates", us))
    for leaf, a in stacked(trees).items()
  }
  if case.with_value:
    out["value"] = np.asarray([np.asarray(v) for v in vs])
  return out


def ulps(new, old, leaf=False):
  """max |new - old| in float32 epsilons at max(|old|, tiny), element by element (``leaf``: at
  the leaf's largest |old|, as tests/numerics.py's ``ulp_distance``; shown for information)."""
  a, d = np.asarray(new, np.float64), np.asarray(old, np.float64)
  same = (a == d) | (np.isnan(a) & np.isnan(d))
  if same.all():
    return 0.0
  mag = np.abs(d).max(initial=0.0, where=np.isfinite(d)) if leaf else np.abs(d)
  dist = np.abs(a - d) / (EPS32 * np.maximum(mag, TINY32))
  return float(np.nan_to_num(np.where(same, 0.0, dist), nan=np.inf).max())


def rel(new, old):
  """max |new - old| relative to the leaf's largest magnitude (floored at 1e-3), per step."""
  a, d = np.asarray(new, np.float64), np.asarray(old, np.float64)
  scale = np.maximum(np.abs(d).reshape(len(d), -1).max(axis=1), 1e-3)
  diff = np.abs(a - d).reshape(len(d), -1).max(axis=1)
  return float(np.nan_to_num((diff / scale).max(), nan=np.inf)) if d.size else 0.0


def compare_one(case, name, prob32, snap, prefix):
  """Max float64 relative difference, max float32 ulps (per element, per leaf) of one case on
  one problem."""
  got = f64_path(case, name)
  want = {k: snap[f"{prefix}/f64/params/{k}"] for k in got}  # KeyError: the leaves differ
  r = max(rel(got[k], want[k]) for k in got)
  names, treedef = leaf_names(prob32.params), jax.tree.structure(prob32.params)
  arrays = {kind: [snap[f"{prefix}/f32/{kind}/{n}"] for n in names] for kind in ("params", "grads")}
  tree = lambda kind, t: jax.tree.unflatten(treedef, [jnp.asarray(a[t]) for a in arrays[kind]])
  value = snap[f"{prefix}/f32/value"] if case.with_value else None
  feed = lambda t: (
    tree("params", t),
    tree("grads", t),
    None if value is None else jnp.asarray(value[t]),
  )
  u_snap = {n: snap[f"{prefix}/f32/updates/{n}"] for n in names}
  worst = [0.0, 0.0]
  for t, (_, _, _, u, _) in enumerate(steps(case, prob32, F32_STEPS, feed)):
    for n, x in zip(leaf_names(u), jax.tree.leaves(u)):
      worst = [max(worst[0], ulps(x, u_snap[n][t])), max(worst[1], ulps(x, u_snap[n][t], True))]
  return r, *worst


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("mode", choices=("snapshot", "compare"))
  ap.add_argument("npz")
  ap.add_argument("--rtol", type=float, default=1e-12, help="float64 relative tolerance")
  ap.add_argument("--ulps", type=float, default=1.0, help="float32 tolerance in epsilons")
  ap.add_argument("--cases", nargs="*", help="only these case names")
  args = ap.parse_args()
  print(f"optcompose from {oc.__file__}; jax {jax.__version__}", flush=True)
  start, data, bad = time.perf_counter(), {}, False
  cases = [c for c in CASES if not args.cases or c.name in args.cases]
  prob32 = {n: make() for n, make in PROBLEMS.items()}
  meta = {
    "jax": jax.__version__,
    "machine": platform.machine(),
    "processor": platform.processor(),
    "cases": [c.name for c in cases],
    "problems": list(PROBLEMS),
  }
  if args.mode == "snapshot":
    for case in cases:
      for name, prob in prob32.items():
        prefix = f"{case.name}/{name}"
        try:
          data.update({f"{prefix}/f64/params/{k}": a for k, a in f64_path(case, name).items()})
          data.update({f"{prefix}/f32/{k}": a for k, a in f32_record(case, prob).items()})
        except Exception as e:  # recorded and reported; the other cases go on
          bad = True
          print(f"FAILED {prefix}: {type(e).__name__}: {e}", flush=True)
    np.savez(args.npz, __meta__=np.asarray(json.dumps(meta)), **data)
    print(
      f"{len(data)} arrays from {len(cases)} cases x {len(prob32)} problems -> {args.npz} "
      f"in {time.perf_counter() - start:.0f}s"
    )
    return int(bad)
  snap = np.load(args.npz)
  old_meta = json.loads(str(snap["__meta__"]))
  if (old_meta["jax"], old_meta["machine"]) != (meta["jax"], meta["machine"]):
    print(f"NOTE: snapshot from jax {old_meta['jax']} on {old_meta['machine']}")
  old = {tuple(k.split("/")[:2]) for k in snap.files if k != "__meta__"}
  print(f"{'case':38s} {'f64 max rel':>11s} {'f32 ulps':>9s} {'(at leaf)':>9s}  result")
  for case in cases:
    worst_r = worst_u = worst_l = 0.0
    status, missing = "ok", [n for n in prob32 if (case.name, n) not in old]
    for name in prob32:
      if name in missing:
        continue
      try:
        r, u, lu = compare_one(case, name, prob32[name], snap, f"{case.name}/{name}")
        worst_r, worst_u, worst_l = max(worst_r, r), max(worst_u, u), max(worst_l, lu)
      except Exception as e:
        status = f"ERROR on {name}: {type(e).__name__}: {e}"
    new = len(missing) == len(prob32)
    if new:
      status = "NEW (not in the snapshot)"
    elif status == "ok" and (worst_r > args.rtol or worst_u > args.ulps):
      status = "FAIL"
    bad |= status == "FAIL" or status.startswith("ERROR")
    extra = f" (not in the snapshot: {', '.join(missing)})" if missing and not new else ""
    nums = "" if new else f"{worst_r:11.3g} {worst_u:9.3g} {worst_l:9.3g}"
    print(f"{case.name:38s} {nums:31s}  {status}{extra}", flush=True)
  gone = sorted({c for c, _ in old} - {c.name for c in CASES})
  if gone:
    print(f"in the snapshot only (not compared): {', '.join(gone)}")
  print(
    f"{'FAILED' if bad else 'passed'}: rtol {args.rtol:g}, {args.ulps:g} ulps; "
    f"{time.perf_counter() - start:.0f}s"
  )
  return int(bad)


if __name__ == "__main__":
  sys.exit(main())
