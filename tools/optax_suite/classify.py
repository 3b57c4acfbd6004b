"""Classify the failures in results.json and write FAILURES.md.

    .venv/bin/python tools/optax_suite/classify.py     # after run.py (and run.py --real)

Each failing test is matched against RULES below (test id and first error line, by regular
expression); the first rule that matches gives its category (specific rules first, the generic
"missing name" rule last):

  a  a name optcompose does not have yet (the test ran Optax's, or failed on the missing name)
  b  a real behaviour difference: to fix, in the optcompose file named
  c  a deliberate, documented difference (stricter validation, another state layout, ...)
  d  fails with Optax itself in this environment (results_real.json), so says nothing of ours

A failure no rule matches is listed as "unclassified": add a rule once it is understood.
Tests skipped under the shim but run by Optax itself are listed too (they test nothing).
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent

# (key, category, test-id regex, error regex, responsible file, Optax expects, we do / why)
RULES = [
  # ---------------------------------------------------------------- (a) not there yet
  (
    "stateful-schedules",
    "a",
    r"test_inject_stateful_hyperparams|test_tree_get_all_with_path",
    r"",
    "optcompose/wrappers/hyperparams.py",
    "`inject_hyperparams` accepts a `StatefulSchedule` (e.g. `WrappedSchedule`): state "
    "`InjectStatefulHyperparamsState` with `hyperparams_states`",
    "optcompose has no stateful schedules (`base.StatefulSchedule`, "
    "`schedules.WrappedSchedule` fall back to Optax's): our `inject_hyperparams` refuses "
    "one with a TypeError pointing to Optax's `inject_stateful_hyperparams`, which takes "
    "optcompose's optimizers (tests/test_hyperparams.py); the state-utils test expects the "
    "stateful state class",
  ),
  # ---------------------------------------------------------------- (b) behaviour
  (
    "optimistic-adam-warning",
    "b",
    r"",
    r"use `optimistic_adam_v2` instead\" does not match",
    "optcompose/optimizers/optimistic.py",
    "`optimistic_adam` warns `DeprecationWarning('`optimistic_adam` is deprecated, please "
    "use `optimistic_adam_v2` instead.')`; the tests match 'use `optimistic_adam_v2` "
    "instead'",
    "our warning says 'optimistic_adam is deprecated (as in Optax): use "
    "optimistic_adam_v2, which takes ...' (no backquotes, no 'instead'): every "
    "test of optimistic_adam fails on the message before running the optimizer",
  ),
  (
    "plain-gradient-transformation-extra-args",
    "b",
    r"_combining_test|combine_test|base_test.py::ExtraArgsTest",
    r"unexpected keyword argument|is an instance of",
    "optcompose/core/base.py",
    "`GradientTransformation(init, update)` built by a user has an `update` without "
    "`**kwargs`; `chain`/`partition` drop the extra keyword arguments for it (only "
    "`GradientTransformationExtraArgs` members receive them)",
    "`optcompose.GradientTransformation` is one class for both (and "
    "`GradientTransformationExtraArgs` is the same class): `chain` "
    "(optcompose/core/base.py) and `partition` (optcompose/wrappers/masking.py) pass every "
    "keyword argument to every member, and a user's plain `update_fn` raises TypeError "
    "(with --extras, base_test.py's `test_isinstance` fails on the same conflation)",
  ),
  (
    "none-updates",
    "c",
    r"test_none_argument",
    r"",
    "optcompose/core/base.py, "
    "optcompose/transforms/decay.py (via optcompose/tree.py check_same_structure)",
    "`None` as the updates (or params) tree is accepted and passed through: "
    "`apply_updates(None, u)` and `add_decayed_weights(...).update(None, 0, params)` "
    "return `None` ('test_none_argument')",
    "the structure check refuses `None` against a tree: ValueError '`updates` does not "
    "have the structure of `params`'. Deliberate: `None` where a tree is expected is a "
    "bug in the caller, named early, not an empty step",
  ),
  (
    "inject-casts-non-floats",
    "b",
    r"test_prng_key_not_hyperparameter|test_optimizers_can_be_wrapped_in_inject_hyperparams18\b",
    r"",
    "optcompose/wrappers/hyperparams.py (rebuilt_each_step in optcompose/core/hyperparams.py)",
    "`inject_hyperparams` converts only floating-point hyperparameters to "
    "`hyperparam_dtype`; ints and PRNG keys pass through unchanged (e.g. `noisy_sgd(key=0)`"
    ", a `key=jax.random.key(17)` argument)",
    "every numeric scalar becomes a float array: `key=0` reaches `add_noise` as a float "
    "tracer (TypeError: 'add_noise: `key` must be an int seed ...'), a typed key fails in "
    "`convert_element_type` (key<fry> to float32)",
  ),
  (
    "rprop-under-inject",
    "b",
    r"test_optimizers_can_be_wrapped_in_inject_hyperparams27\b",
    r"",
    "optcompose/transforms/step_size.py",
    "`inject_hyperparams(rprop)` works (hyperparameters traced under jit)",
    "`scale_by_rprop` compares `min_step_size > max_step_size` in Python at build time: "
    "TracerBoolConversionError when inject_hyperparams rebuilds it with traced values",
  ),
  (
    "linesearch-unused-kwargs",
    "c",
    r"raises_on_unused_extra_args",
    r"",
    "optcompose/transforms/linesearch.py",
    "an extra keyword argument of `update` that `value_fn` does not take raises "
    "TypeError('Unexpected keyword arguments ...')",
    "ignored, as by every optcompose transformation. Deliberate: the contract passes "
    "each keyword argument of a chain's `update` to every member, and each takes what it "
    "uses (a search inside `chain` with a plateau controller receives `value=` for both); "
    "what `value_fn` receives is exactly what it declares",
  ),
  (
    "linesearch-verbose-flags",
    "c",
    r"ZoomLinesearchTest::test_failure_",
    r"not found in",
    "optcompose/transforms/linesearch.py",
    "`verbose=True` prints the cause of a failed zoom line search with Optax's flag texts "
    "(`FLAG_NOT_A_DESCENT_DIRECTION`, `FLAG_INTERVAL_TOO_SMALL`, "
    "`FLAG_INTERVAL_NOT_FOUND`, `FLAG_NO_STEPSIZE_FOUND`)",
    "one line of our own words naming the conditions that failed (the value, the slope and "
    "the step size reached). Deliberate: diagnostic text, not API; the tests match Optax's "
    "sentences word for word",
  ),
  (
    "masked-tree-map-params",
    "b",
    r"MaskedTest::test_(masked|tree_map_params)",
    r"neither the parameter tree's structure nor a prefix",
    "optcompose/wrappers/masking.py (mask broadcast in optcompose/masks.py)",
    "`optax.tree.map_params(masked_opt, f, state)` works: it calls `init` with its "
    "`_ParamsPlaceholder`, which Optax's `masked.init` passes to the inner init unmasked",
    "our `masked.init` broadcasts the mask against the placeholder and raises ValueError "
    "('`mask` is neither the parameter tree's structure nor a prefix of it'); optcompose's "
    "`tree.map_params` is Optax's, so the two do not fit",
  ),
  (
    "callable-pytree-mask",
    "b",
    r"test_mask_compatible_callable_pytree",
    r"",
    "optcompose/masks.py (per_leaf_values)",
    "a mask that is a pytree whose leaves are not callables is a tree, even when the "
    "object is callable (an Equinox module; Optax issue 913)",
    "any callable mask is called as a function of the parameters: `mask(params)` runs the "
    "module's `__call__` (AttributeError: 'bool' object has no attribute 'dot')",
  ),
  (
    "safe-increment-complex",
    "b",
    r"test_safe_increment_exceptions",
    r"not raised",
    "optcompose/core/base.py (safe_increment)",
    "`safe_increment` of a complex (or bool) count raises ValueError",
    "a complex count is incremented (only with --extras: numerics_test.py)",
  ),
  # ---------------------------------------------------------------- (c) deliberate
  (
    "integer-leaves",
    "c",
    r"",
    r"has dtype u?int\d+; .*floating-point",
    "optcompose/tree.py (check_floating)",
    "integer parameters / gradients are updated (Optax casts silently)",
    "TypeError: optimizers need floating-point leaves (an integer gradient is a bug: "
    "jax.grad never gives one)",
  ),
  (
    "underflowing-hyperparameter",
    "c",
    r"",
    r"which is 0 in float32",
    "optcompose/core/validation.py",
    "`scale(0.1**50)` scales by 0 (the factor rounds to 0 in float32)",
    "ValueError: a nonzero hyperparameter that rounds to 0 in its dtype is refused (give 0 "
    "if 0 is meant)",
  ),
  (
    "build-time-validation",
    "c",
    r"test_lion_invalid_mode_raises",
    r"",
    "optcompose/transforms/sign.py",
    "`scale_by_lion(mode='invalid_mode')` builds, and `update` raises ValueError",
    "the builder raises the ValueError (arguments are checked when the transformation is built)",
  ),
  (
    "linesearch-hyperparameter-ranges",
    "c",
    r"test_dtype_stability",
    r"must lie in|must be [<>]",
    "optcompose/transforms/linesearch.py",
    "any value is accepted (the test gives 1e-5 to every float argument, "
    "`increase_factor` included, to check dtype stability only)",
    "ValueError: `increase_factor` must lie in (1, inf)",
  ),
  (
    "own-structure-errors",
    "c",
    r"",
    r"\"Dict key mismatch\" does not match",
    "optcompose/masks.py",
    "JAX's ValueError text ('Dict key mismatch')",
    "a ValueError of the same type whose message names the first differing path",
  ),
  (
    "apply-if-finite-never-applies-nan",
    "c",
    r"test_apply_if_finite",
    r"False is not true",
    "optcompose/wrappers/control.py",
    "after `max_consecutive_errors` non-finite steps the next non-finite update is applied "
    "(parameters become NaN)",
    "a non-finite gradient is never applied; the state's `gave_up` flag is set instead "
    "(module docstring: 'unlike Optax, which then applies them, a non-finite gradient is "
    "never applied')",
  ),
  (
    "hyperparameters-stay-float32",
    "c",
    r"test_hyperparam_default_dtype",
    r"",
    "optcompose/wrappers/hyperparams.py",
    "the default `hyperparam_dtype` follows the parameters' dtype (bfloat16 parameters: "
    "bfloat16 `b1`, `b2`), and a strongly typed array argument keeps its dtype",
    "hyperparameters are stored as float32 (float64 under x64) whatever the parameters' "
    "dtype, so `b2=0.999` is not rounded to 1.0 in bfloat16 (module docstring)",
  ),
  (
    "schedule-count-in-inject-state",
    "c",
    r"test_map_non_params_to_none",
    r"ScaleByScheduleState",
    "optcompose/transforms/scaling.py",
    "`scale_by_schedule` state `ScaleByScheduleState(count)`",
    "a scheduled hyperparameter's count lives in an `InjectHyperparamsState` (one state "
    "type for every scheduled hyperparameter; optcompose/migrate.py maps Optax's "
    "ScaleByScheduleState onto it)",
  ),
  (
    "schedule-arguments-validated",
    "c",
    r"test_nonvalid_decay_rate|test_nonvalid_transition_steps|test_zero_steps_schedule",
    r"must be",
    "optcompose/schedules/_checks.py",
    "`transition_steps <= 0` or `decay_rate == 0` silently give a constant schedule",
    "ValueError when the schedule is built (schedules/__init__.py: 'Optax silently turns "
    "some invalid ones into a constant')",
  ),
  (
    "int32-step-counts",
    "c",
    r"test_with_giant_int_steps",
    r"2\*\*31",
    "optcompose/schedules/_checks.py",
    "`decay_steps=10**10` accepted (the schedule then runs on int64/float counts)",
    "step-count arguments must fit the int32 step count (<= 2**31 - 1); schedules/__init__.py",
  ),
  (
    "complex-state-dtype",
    "c",
    r"test_explicit_dtype",
    r"complex dtype of 16 bits|dtype\('float32'\) != dtype\('complex64'\)",
    "optcompose/transforms/statistics.py",
    "a real `mu_dtype`/`accumulator_dtype` on complex parameters gives a real state (the "
    "imaginary part dropped); bfloat16 likewise",
    "a real state dtype on complex parameters means its complex counterpart (float32: "
    "complex64), and a 16-bit one, which has none, is a TypeError naming the leaf: a real "
    "moment of a complex gradient loses its imaginary part silently (coming-from-optax.md)",
  ),
  # ---------------------------------------------------------------- last: generic
  (
    "missing-attribute",
    "a",
    r"",
    r"module '?optcompose[\w.]*'? has no attribute|cannot import name",
    "(in progress)",
    "the name exists",
    "optcompose lacks a name (or one of its modules refers to a helper "
    "not written yet): work in progress",
  ),
]


# Why a name falls back, where known.
NAME_NOTES = {
  "ScaleByScheduleState": "deliberately absent: see `schedule-count-in-inject-state`",
  "StatefulSchedule": "see `stateful-schedules`",
  "WrappedSchedule": "see `stateful-schedules`",
}


def _load(name):
  path = HERE / name
  return json.loads(path.read_text()) if path.exists() else None


def _real_failures(real) -> set:
  if not real:
    return set()
  return {t["id"] for f in real["files"] for t in f["failing"]}


def classify(results, real):
  real_failing = _real_failures(real)
  rows = []
  for f in results["files"]:
    for t in f["failing"]:
      rule = None
      if t["id"] in real_failing:
        rule = (
          "fails-with-optax",
          "d",
          "",
          "",
          "-",
          "",
          "fails with Optax 0.2.8 itself "
          "here (results_real.json): says nothing about optcompose. The "
          "'Dict key mismatch' tests expect JAX's old structure-error text, which JAX "
          "0.10 words differently; optcompose raises a ValueError of its own there "
          "(same type, a message naming the first differing path), so they would "
          "fail for us anyway, deliberately. test_clip_by_block_rms: float32 rounding "
          "(0.9999999 against places=7), identical in Optax and optcompose",
        )
      else:
        for r in RULES:
          if re.search(r[2], t["id"]) and re.search(r[3], t["error"]):
            rule = r
            break
      rows.append((t, rule))
  return rows


def _skips_only_here(results, real):
  if not real:
    return []
  real_outcome = {}
  for f in real["files"]:
    failing = {t["id"] for t in f["failing"]}
    for t in failing:
      real_outcome[t] = "failed"
  real_skipped = collections.Counter()
  for f in real["files"]:
    for reason, n in f.get("skip_reasons", {}).items():
      real_skipped[(f["file"], reason)] += n
  out = []
  for f in results["files"]:
    for reason, n in f.get("skip_reasons", {}).items():
      extra = n - real_skipped.get((f["file"], reason), 0)
      if extra > 0:
        out.append((f["file"], reason, extra))
  return out


def _names_missing(results):
  missing = collections.defaultdict(set)
  for f in results["files"]:
    for qualname, why in f["optax"].items():
      if "no optcompose." in why and "Optax's own" not in why:
        missing[qualname.rsplit(".", 1)[-1]].add(f["file"])
  return missing


def render(results, real) -> str:
  rows = classify(results, real)
  totals = results["totals"]
  by_category = collections.Counter(rule[1] if rule else "?" for _, rule in rows)
  out = []
  out.append("# Optax's own tests against optcompose: failures, classified\n")
  out.append(
    "Generated by `tools/optax_suite/classify.py` from `results.json` "
    f"({results['date']}, Optax {results['optax_version']}, "
    f"`{results['command']}`)"
    + (f" and `results_real.json` ({real['date']})" if real else "")
    + ". Do not edit by hand: "
    "change the RULES in classify.py and run it again.\n"
  )
  out.append(
    "How to run: `.venv/bin/python tools/optax_suite/run.py` (all files, ~15-20 min "
    "on 2 cores), then `.venv/bin/python tools/optax_suite/classify.py`; "
    "`run.py --real` once for the reference run of plain Optax; `run.py clipping "
    "-k block_rms` for a subset. See run.py and shim.py for how the proxies "
    "work.\n"
  )
  out.append(
    "How the shim works: Optax's optimizer-domain modules (`optax`, `optax._src.*`, "
    "`optax.transforms[._*]`, `optax.schedules[._*]`, `optax.tree`, "
    "`optax.tree_utils[._*]`) are replaced in `sys.modules` by proxies. A name Optax "
    "exposes publicly resolves to optcompose's object at the same public path "
    "(found by identity: `optax._src.transform.scale_by_adam` is "
    "`optax.scale_by_adam`, so it becomes `optcompose.scale_by_adam`); private "
    "helpers, test utilities, names optcompose lacks and names optcompose itself "
    "takes from Optax fall back to Optax's object and are counted as such. "
    "optcompose's and Optax's own code always see the real Optax.\n"
  )
  out.append("## Counts\n")
  out.append(
    f"Tests: **{totals['total']}**: {totals['passed']} passed, {totals['failed']} "
    f"failed, {totals['error']} errors, {totals['skipped']} skipped.\n"
  )
  if real:
    rt = real["totals"]
    out.append(
      f"Plain Optax, same files, same machine: {rt['passed']} passed, "
      f"{rt['failed']} failed, {rt['error']} errors, {rt['skipped']} skipped.\n"
    )
  names = {
    "a": "(a) not in optcompose yet",
    "b": "(b) behaviour differences (to fix)",
    "c": "(c) deliberate differences",
    "d": "(d) fail with Optax itself",
    "?": "unclassified",
  }
  out.append(
    "Failing tests by category: "
    + ", ".join(f"{names[k]}: {by_category[k]}" for k in "abcd?" if by_category[k])
    + ".\n"
  )
  out.append(
    "Per file (ours/optax: distinct names the file's code resolved to optcompose / "
    "fell back to Optax; no-ours: tests that passed without touching an optcompose "
    "name while running):\n"
  )
  out.append("| file | passed | failed | errors | skipped | ours | optax | no-ours |")
  out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
  for f in results["files"]:
    flag = " (timed out)" if f["timed_out"] else ""
    out.append(
      f"| {f['file']}{flag} | {f['passed']} | {f['failed']} | {f['error']} | "
      f"{f['skipped']} | {f['names_ours']} | {f['names_optax']} | "
      f"{len(f['passed_without_ours'])} |"
    )
  out.append("")
  out.append(
    "In Optax 0.2.8 there is no `lbfgs_test.py` nor `wrappers_test.py`: L-BFGS is "
    "tested by `_src/alias_test.py` (`LBFGSTest`) and `_src/linesearch_test.py`, the "
    "wrappers by `transforms/_*_test.py`.\n"
  )

  grouped = collections.OrderedDict()
  for t, rule in rows:
    key = rule[0] if rule else "unclassified"
    grouped.setdefault(key, (rule, []))[1].append(t)
  for category, title in (
    ("b", "(b) Behaviour differences, by number of failing tests"),
    ("a", "(a) Not in optcompose yet"),
    ("c", "(c) Deliberate differences"),
    ("d", "(d) Failing with Optax itself here"),
    ("?", "Unclassified"),
  ):
    groups = [(k, r, ts) for k, (r, ts) in grouped.items() if (r[1] if r else "?") == category]
    groups.sort(key=lambda g: -len(g[2]))
    if not groups:
      continue
    out.append(f"## {title}\n")
    for number, (key, rule, tests) in enumerate(groups, 1):
      if rule:
        out.append(
          f"### {category}{number}. `{key}`: {len(tests)} test{'s' if len(tests) > 1 else ''}\n"
        )
        if rule[4] and rule[4] != "-":
          out.append(f"- responsible: {rule[4]}")
        if rule[5]:
          out.append(f"- Optax: {rule[5]}")
        if rule[6]:
          out.append(f"- optcompose: {rule[6]}")
      else:
        out.append(f"### {len(tests)} unclassified\n")
      out.append("- tests:")
      for t in tests:
        where = f" [{t['optcompose_frame']}]" if t.get("optcompose_frame") else ""
        out.append(f"  - `{t['id']}`: {t['error'][:200]}{where}")
      out.append("")

  skips = _skips_only_here(results, real)
  if skips:
    out.append("## Skipped here, run by Optax itself\n")
    out.append("These tests did not test optcompose at all:\n")
    for file, reason, n in skips:
      extra = ""
      if "learning schedule" in reason:
        extra = (
          " -- the test reads `inspect.signature(opt).parameters['learning_rate']."
          "annotation` and runs only when it *is* `base.ScalarOrSchedule`; "
          "optcompose's modules use `from __future__ import annotations`, so the "
          "annotation is the string 'ScalarOrSchedule' (and `base.ScalarOrSchedule` "
          "is Optax's own type alias). A (b)-kind difference for code that "
          "introspects annotations; `inspect.signature(..., eval_str=True)` sees "
          "the type."
        )
      out.append(f"- {file}: {n} x '{reason}'{extra}")
    out.append("")

  missing = _names_missing(results)
  if missing:
    out.append("## Names that fell back to Optax because optcompose lacks them\n")
    out.append("Tests using these ran Optax's code (they pass or fail for Optax, not for us):\n")
    for name, files in sorted(missing.items()):
      note = f": {NAME_NOTES[name]}" if name in NAME_NOTES else ""
      out.append(f"- `{name}` ({', '.join(sorted(files))}){note}")
    out.append("")
  return "\n".join(out) + "\n"


# The page that lists every failing test of Optax's suite, between the two markers.
PAGE = HERE.parent.parent / "docs" / "coming-from-optax.md"
START, END = "<!-- optax-suite:start -->", "<!-- optax-suite:end -->"
_KINDS = {"a": "not in optcompose", "b": "to fix", "c": "deliberate", "d": "fails with Optax"}


def readme_block(results, real) -> str:
  """The list in docs/coming-from-optax.md of every failing test of Optax's suite, with its
  reason (one line per reason, its tests named after it)."""
  rows, totals = classify(results, real), results["totals"]
  grouped = collections.OrderedDict()
  for t, rule in rows:
    grouped.setdefault(rule[0] if rule else "unclassified", (rule, []))[1].append(t["id"])
  out = [
    START,
    "",
    f"Optax's own test files through the shim (`tools/optax_suite`, Optax "
    f"{results['optax_version']}, {results['date'][:10]}): **{totals['total']} tests, "
    f"{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} "
    "skipped**"
    + (
      f" (plain Optax on the same files: {real['totals']['passed']} "
      f"passed, {real['totals']['failed']} failed)"
      if real
      else ""
    )
    + ". Every failing test, by reason (details: `tools/optax_suite/FAILURES.md`):",
    "",
  ]
  order = {"b": 0, "a": 1, "c": 2, "d": 3}
  for key, (rule, ids) in sorted(
    grouped.items(), key=lambda g: (order.get(g[1][0][1] if g[1][0] else "?", 4), -len(g[1][1]))
  ):
    kind = _KINDS.get(rule[1], "unclassified") if rule else "unclassified"
    why = (rule[6] if rule else "not understood yet").split(". Deliberate: ")[-1]
    names = ", ".join(f"`{i.split('::', 1)[-1]}`" for i in ids)
    out.append(f"- `{key}` ({kind}, {len(ids)}): {why}. Tests: {names}.")
  return "\n".join(out + ["", END])


def write_readme_block(block: str) -> None:
  text = PAGE.read_text()
  if START not in text or END not in text:
    raise SystemExit(f"{PAGE} has no {START} ... {END} block")
  head, rest = text.split(START, 1)
  PAGE.write_text(head + block + rest.split(END, 1)[1])


def main() -> int:
  results = _load("results.json")
  if results is None:
    print("no results.json: run tools/optax_suite/run.py first", file=sys.stderr)
    return 1
  real = _load("results_real.json")
  text = render(results, real)
  (HERE / "FAILURES.md").write_text(text)
  write_readme_block(readme_block(results, real))
  rows = classify(results, real)
  counts = collections.Counter(rule[1] if rule else "?" for _, rule in rows)
  print(
    f"{len(rows)} failing tests: "
    + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    + f" -> {HERE / 'FAILURES.md'}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
