"""The benchmark's own accounting, on tiny configurations (nothing here is timed).

The suite must not rot between `make bench` runs: one configuration runs in-process, and
the ideal-byte and state-size columns are checked against the textbook counts (AdamW in
float32: 28 B and 8 B of state per parameter; SGD with momentum: 20 B and 4 B).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import run as bench  # noqa: E402


def run_config(cfg):
  """The benchmark as ``make bench`` runs it: under standard dtype promotion (its Optax rows
  run Optax's code, which promotes implicitly; the suite's promotion is strict). What is
  checked here is the benchmark's accounting."""
  with jax.numpy_dtype_promotion("standard"):
    return bench.run_config(cfg)


@pytest.mark.parametrize(
  "opt, ideal, state", [("adamw", 28, 8), ("sgd_nesterov", 20, 4), ("clip_adamw_cosine", 28, 8)]
)
def test_one_configuration_reports_textbook_bytes(opt, ideal, state):
  cfg = dict(
    section="t",
    opt=opt,
    tree="leaves8",
    size=8 * 512,
    reps=2,
    libs=("optcompose", "optcompose-flat", "optax"),
  )
  res = run_config(cfg)
  assert res["params"] == 8 * 512 and not res["skipped"]
  assert [r["lib"] for r in res["rows"]] == list(cfg["libs"])
  for r in res["rows"]:
    assert r["ideal_bytes"] == ideal * res["params"]
    assert r["state_bytes_per_param"] == state
    assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
  lines = bench.table([res])
  assert len(lines) == 2 + len(cfg["libs"])
  assert all(line.count("|") == 14 for line in lines[2:])


def test_an_odd_process_builds_in_reverse_and_reports_in_order(monkeypatch):
  built = []
  compile_run = bench.JaxRun.__init__
  allocate = bench.JaxRun.allocate

  def logged_init(self, lib, opt, *args, **kw):
    built.append(("compile", lib, opt))
    compile_run(self, lib, opt, *args, **kw)

  def logged_allocate(self):
    built.append(("allocate", self))
    allocate(self)
    assert self.make is None  # no host copy of the arrays kept while timing

  monkeypatch.setattr(bench.JaxRun, "__init__", logged_init)
  monkeypatch.setattr(bench.JaxRun, "allocate", logged_allocate)
  libs = ("optcompose", bench.BARE, "optax")
  cfg = dict(section="t", opt="clip_adamw_cosine", tree="leaves8", size=8 * 512, reps=2, libs=libs)
  res = run_config({**cfg, "process": 1})
  assert [b[1:] for b in built[:3]] == [
    ("optax", "clip_adamw_cosine"),
    ("optcompose", "adamw"),
    ("optcompose", "clip_adamw_cosine"),
  ]
  assert [b[0] for b in built] == ["compile"] * 3 + ["allocate"] * 3  # all compiled first
  runs = [b[1] for b in built[3:]]  # allocated in the same (reversed) order as compiled
  assert [r.compile_s for r in runs] == [r["compile_s"] for r in reversed(res["rows"])]
  assert [r["lib"] for r in res["rows"]] == list(libs)
  assert [r["state_bytes_per_param"] for r in res["rows"]] == [8, 8, 8]


def test_flat_layout_really_has_one_buffer_per_dtype():
  shapes = bench.tree_shapes("mixed", 1 << 20)
  assert len(shapes) == 148
  run = bench.JaxRun("optcompose-flat", "adamw", shapes)
  assert not hasattr(run, "params")  # compiled on abstract arguments: nothing allocated yet
  run.allocate()
  dtypes = sorted(str(x.dtype) for x in jax.tree.leaves(run.params))
  assert dtypes == ["bfloat16", "float32"]
  assert sum(x.size for x in jax.tree.leaves(run.params)) == sum(
    int(np.prod(s)) for s, _ in shapes.values()
  )


def test_tree_shapes_hit_the_requested_size():
  for kind in ("flat", "transformer", "leaves1000", "leaves4096"):
    n = sum(int(np.prod(s)) for s, _ in bench.tree_shapes(kind, 16 << 20).values())
    assert abs(n - (16 << 20)) / (16 << 20) < 0.02, kind


def test_bf16_moments_halve_the_state_and_optax_keeps_nu_in_float32():
  cfg = dict(
    section="t",
    opt="adamw_bf16_moments",
    tree="leaves8",
    size=8 * 512,
    reps=2,
    libs=("optcompose", "optcompose-flat", "optax"),
  )
  res = run_config(cfg)
  state = {r["lib"]: r["state_bytes_per_param"] for r in res["rows"]}
  # bfloat16 mu and nu: 2 + 2 bytes; Optax has mu_dtype only, so its nu stays float32: 2 + 4.
  assert state == {"optcompose": 4, "optcompose-flat": 4, "optax": 6}
  ideal = {r["lib"]: r["ideal_bytes"] / res["params"] for r in res["rows"]}
  assert ideal == {
    "optcompose": 4 + 2 * (4 + 4),
    "optcompose-flat": 4 + 2 * (4 + 4),
    "optax": 4 + 2 * (4 + 6),
  }
  # The paired ratio against Optax is reported for every JAX row (Optax's own is 1).
  assert [r["paired_vs_optax"] for r in res["rows"] if r["lib"] == "optax"] == [1.0]


def adafactor_state_bytes(shapes, min_dim_size_to_factor=128):
  """Adafactor's second moment, by its definition: a matrix whose two last dimensions are
  both at least ``min_dim_size_to_factor`` keeps one float32 per row and one per column; any
  other leaf keeps a full float32 second moment. (In Optax's state layout each leaf also
  has a one-element float32 placeholder for each statistic it does not use: the full
  moment of a factored leaf, the row and column factors of another.)"""
  total = 0
  for shape, _ in shapes.values():
    if len(shape) >= 2 and min(shape[-2:]) >= min_dim_size_to_factor:
      total += 4 * (int(np.prod(shape[:-1])) + int(np.prod(shape[:-2])) * shape[-1] + 1)
    else:
      total += 4 * (int(np.prod(shape)) + 2)
  return total


def state_per_param(opt, tree, size):
  res = run_config(
    dict(section="t", opt=opt, tree=tree, size=size, reps=1, libs=("optcompose", "optax"))
  )
  return {r["lib"]: r["state_bytes_per_param"] for r in res["rows"]}


@pytest.mark.parametrize("opt, want", [("lion", 4.0), ("lamb", 8.0), ("lbfgs", None)])
def test_issue_15_optimizers_report_their_state_size_as_optax_does(opt, want):
  """lion keeps one moment (4 B/param), lamb two (8 B), lbfgs its history (2 x memory_size
  copies of the parameters, at least); ours as Optax's."""
  state = state_per_param(opt, "leaves8", 8 * 512)
  assert state["optcompose"] == pytest.approx(state["optax"], rel=1e-9)
  if want is not None:
    assert state["optcompose"] == want
  else:
    assert state["optcompose"] >= 2 * 10 * 4  # memory_size=10 by default


def test_adafactor_reports_its_factored_state_as_optax_does():
  """On the transformer tree at 2.4M parameters (its matrices 128 wide: factored), the
  state is the factored second moment, far below Adam's 8 B/param."""
  size = 144 * 128 * 128
  shapes = bench.tree_shapes("transformer", size)
  n = sum(int(np.prod(s)) for s, _ in shapes.values())
  state = state_per_param("adafactor", "transformer", size)
  assert state["optcompose"] == pytest.approx(state["optax"], rel=1e-9)
  assert state["optcompose"] == pytest.approx(adafactor_state_bytes(shapes) / n, rel=1e-9)
  assert state["optcompose"] < 0.5


@pytest.mark.parametrize(
  "opt, extra",
  [
    ("apply_if_finite_adamw", 4),
    ("apply_if_finite_checked_adamw", 16),
    ("apply_if_finite_step_adamw", 4),
    ("apply_if_finite_checked_step_adamw", 16),
    ("step_if_finite_adamw", 4),
    ("diagnostics_adamw", 12),
    ("diagnostics_every10_adamw", 1.2),
    ("masked_adamw", 0),
    ("partition_adamw", 0),
    ("inject_adamw", 0),
    ("multi_steps4_adamw", (3 * 12 + 32) / 4 - 28),
    ("ema_params_adamw", 8),
    ("sam_adamw", 4),
  ],
)
def test_wrapper_rows_count_the_bytes_their_work_needs(opt, extra):
  """AdamW's 28 B/param, plus: one 4-byte read of the gradients for the finiteness test; of
  everything AdamW reads (g, mu, nu, p) for the test of the updates; of the gradients,
  updates and parameters for the three norms; the average's read and write for ema_params;
  nothing for the mask, partition and injected hyperparameters; and for multi_steps(k=4) the
  mean over four calls of three accumulations (12 B) and one real step (32 B); for SAM the
  gradients' norm (4 B; its second gradient, w' - g, is computed inside AdamW's loops). The state
  stays AdamW's 8 B plus the wrapper's own arrays (scalars, or the accumulator or average).
  Optax has no with_diagnostics, no test of the updates and no EMA of the parameters: those
  rows are skipped. The bare AdamW runs beside it, paired."""
  res = run_config(
    dict(
      section="t",
      opt=opt,
      tree="leaves8",
      size=8 * 512,
      reps=2,
      libs=("optcompose", bench.BARE, "optax"),
    )
  )
  rows = {r["lib"]: r for r in res["rows"]}
  assert rows["optcompose"]["ideal_bytes"] == pytest.approx((28 + extra) * res["params"])
  assert rows[bench.BARE]["ideal_bytes"] == 28 * res["params"]
  own = {"multi_steps4_adamw": 4, "ema_params_adamw": 4}.get(opt, 0)
  assert rows["optcompose"]["state_bytes_per_param"] == 8 + own
  assert rows[bench.BARE]["paired_vs_bare"] == 1.0
  skipped = ("apply_if_finite_checked_adamw", "step_if_finite_adamw", "ema_params_adamw")
  skipped += ("apply_if_finite_step_adamw", "apply_if_finite_checked_step_adamw", "sam_adamw")
  assert ("optax" in rows) == (opt not in skipped and not opt.startswith("diagnostics"))
  ours, bare = rows["optcompose"], rows[bench.BARE]
  if opt in bench.AMORTIZED:  # a call's mean cost: the ratio of the total times
    assert ours["paired_vs_bare"] == pytest.approx(ours["mean_ms"] / bare["mean_ms"], rel=1e-9)


def test_bounds_hold_each_row_to_its_issue_bound():
  """The bounds section reads the paired ratios: a clip row at 1.1x AdamW and 2x faster than
  Optax passes both; a wrapper at 1.5x fails the 1.14 x 1.15 of one extra read."""

  def res(opt, ours, others):
    rows = [
      {
        "lib": "optcompose",
        "paired_vs_bare": ours,
        "paired_vs_optax": others.get("optax"),
        "paired_vs": others,
        "compile_s": 1.0,
        "ideal_bytes": 32,
      },
      {"lib": bench.BARE, "paired_vs_bare": 1.0, "compile_s": 1.0, "ideal_bytes": 28},
    ]
    return {"cfg": {"opt": opt}, "label": "L", "rows": rows}

  lines = bench.bounds(
    [
      res("clip_adamw_cosine", 1.1, {"optax": 0.5, "torch-fused": 0.9}),
      res("apply_if_finite_adamw", 1.5, {}),
      res("adamw", 1.03, {}),  # the noise floor: reported, held to no bound
    ]
  )
  assert [line.split(":")[0] for line in lines] == [
    "- PASS",
    "- PASS",
    "- PASS",
    "- FAIL",
    "- NOISE FLOOR (no bound)",
  ]
  assert "1.50 (bound <= 1.31)" in lines[3]
  assert lines[-1].endswith("compiled again, L: 1.03")


def test_bounded_rows_are_medians_over_processes():
  """A bounded row runs in PROCESSES processes: every number is the median over them, each
  ratio computed in its own process, and the bounds section shows the per-process ratios.
  A configuration run once is passed through as it is."""

  def res(ours, vs_optax, ms):
    rows = [
      {
        "lib": "optcompose",
        "median_ms": ms,
        "paired_vs_bare": ours,
        "paired_vs_optax": vs_optax,
        "paired_vs": {"optax": vs_optax, bench.BARE: ours},
        "compile_s": 1.0,
        "ideal_bytes": 32,
      },
      {
        "lib": bench.BARE,
        "median_ms": 10.0,
        "paired_vs_bare": 1.0,
        "paired_vs_optax": None,
        "paired_vs": {"optcompose": 1 / ours},
        "compile_s": 1.0,
        "ideal_bytes": 28,
      },
    ]
    return {
      "cfg": {"opt": "apply_if_finite_adamw"},
      "label": "L",
      "rows": rows,
      "bandwidth_gbs": 1.0,
    }

  one = res(1.5, 0.5, 15.0)
  assert bench.merge([one]) is one
  merged = bench.merge([res(1.5, 0.5, 15.0), res(1.2, 0.4, 12.0), res(1.25, 0.45, 11.0)])
  ours = next(r for r in merged["rows"] if r["lib"] == "optcompose")
  assert merged["processes"] == 3
  assert ours["paired_vs_bare"] == pytest.approx(1.25, rel=1e-12) and ours["median_ms"] == 12.0
  assert ours["paired_vs"]["optax"] == pytest.approx(0.45, rel=1e-12)
  assert ours["each"]["paired_vs_bare"] == [1.5, 1.2, 1.25]
  (line,) = bench.bounds([merged])
  assert line.startswith("- PASS") and "1.25 (median of 1.50, 1.20, 1.25)" in line
  # Over an even number of processes a ratio's median is the geometric mean of the middle
  # two, so that inverting the pairing inverts it exactly (the arithmetic mean would not).
  four = bench.merge([res(1.5, 0.5, 15.0), res(1.2, 0.4, 12.0), res(1.25, 0.45, 11.0), one])
  ours, bare = (
    next(r for r in four["rows"] if r["lib"] == lib) for lib in ("optcompose", bench.BARE)
  )
  assert ours["paired_vs_bare"] == pytest.approx((1.25 * 1.5) ** 0.5, rel=1e-12)
  assert bare["paired_vs"]["optcompose"] == pytest.approx(1 / ours["paired_vs_bare"], rel=1e-12)
  bounded = [c for c in bench.suite(False, False) if c.get("reps") == 100]
  assert bounded and all(c.get("processes") == bench.PROCESSES for c in bounded)


def test_zero1_section_reports_an_eighth_of_the_state_per_device():
  """The benchmark's memory rows on 8 simulated devices: AdamW's state (8 B/param) whole on
  every device when replicated, 1/8 of it per device split per leaf or as FlatParams
  buckets, the parameters replicated throughout, and one step equal in all three."""
  if len(jax.devices()) != 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  res = run_config(
    dict(section="z", kind="zero1", opt="adamw", tree="leaves8", size=8 * 512, devices=8)
  )
  rows = {r["layout"]: r for r in res["memory_rows"]}
  whole = 8 * res["params"] / 2**20
  assert rows["replicated state"]["state_mb_per_device"] == pytest.approx(whole)
  for layout in ("zero1 per leaf", "zero1 FlatParams"):
    assert rows[layout]["state_mb_per_device"] == pytest.approx(whole / 8)
    assert rows[layout]["state_mb_total"] == pytest.approx(whole)
    assert rows[layout]["max_diff_vs_replicated"] <= 1e-6
  assert {r["params_mb_per_device"] for r in rows.values()} == {4 * res["params"] / 2**20}
  assert len(bench.memory_table(res)) == 4 + 3


def test_training_step_section_runs_every_variant_on_the_same_recipe():
  """The whole-training-step section on a tiny GPT: every variant runs, and the ones that
  train (all but the gradients alone) reach the same parameters from the same batches, so
  the section compares one recipe in different clothes; its table and bounds render. Twelve
  steps after a one-step warmup: with_diagnostics(every_k=10) measures at step 10, when the
  learning rate is not 0."""
  cfg = dict(
    section="t",
    kind="train",
    opt="nanogpt_train_step",
    tree="nanogpt",
    reps=12,
    warmup_reps=1,
    train=dict(warmup=1, decay=20),
    model=dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11),
    batch=2,
    final_params=True,
    process=1,  # built in reverse order, reported in VARIANTS' order
  )
  res = run_config(cfg)
  import train_step

  assert [r["lib"] for r in res["rows"]] == list(train_step.VARIANTS)
  finals = res["final_params"]
  assert set(finals) == set(train_step.VARIANTS) - {train_step.GRADIENTS_ONLY}
  ours, our_loss = finals["optcompose"]
  start = res["initial_params"]
  assert max(np.max(np.abs(ours[k] - start[k])) for k in start) > 1e-3  # the steps moved them
  for name, (params, loss) in finals.items():
    assert loss == pytest.approx(our_loss, rel=1e-5), name
    for path, p in params.items():
      want, got = ours[path], p
      if path.endswith("['c_attn']['bias']"):
        # The key bias's gradient is 0 in exact arithmetic (softmax ignores a constant added
        # to every logit of a row): Adam normalises its rounding noise, which differs from
        # one compiled program to another. The query and value biases are compared.
        third = want.size // 3
        want, got = (
          np.delete(want, np.s_[third : 2 * third]),
          np.delete(got, np.s_[third : 2 * third]),
        )
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{name} {path}")
  lines = bench.section_lines([res])
  assert any(
    line.startswith("| optcompose with_diagnostics(every_k=10) (mean) |") for line in lines
  )
  checks = bench.bounds([res])
  assert len(checks) == 3 and all(" whole step (nanoGPT 1 layers x 16" in c for c in checks)


def test_every_optimizer_script_compares_each_with_optax():
  """benchmarks/every_optimizer.py (docs/performance.md, "Every optimizer against Optax"):
  a row per optimizer asked for, the state bytes equal to Optax's, and fromage compiled to
  fewer kernels than Optax's (whose safe norm writes a full-size select)."""
  import subprocess

  script = Path(__file__).parents[1] / "benchmarks" / "every_optimizer.py"
  names = ["adamw", "fromage", "polyak_sgd"]
  args = ["--size", "4096", "--reps", "2", "--warmup", "1", "--only", *names]
  out = subprocess.run(
    [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {
    cells[0]: cells
    for line in out.stdout.splitlines()
    if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
  }
  assert set(names) <= set(rows), out.stdout
  for name in names:
    ours, theirs = rows[name][-1].split("/")
    assert float(ours) == float(theirs), rows[name]
  ours, theirs = map(int, rows["fromage"][-2].split("/"))
  assert ours < theirs, rows["fromage"]
