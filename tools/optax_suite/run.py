"""Run Optax's own test files against optcompose, through proxies of Optax's modules.

    .venv/bin/python tools/optax_suite/run.py                 # every file below
    .venv/bin/python tools/optax_suite/run.py clipping inject # files whose path contains these
    .venv/bin/python tools/optax_suite/run.py alias -k lbfgs  # pytest's -k, within them
    .venv/bin/python tools/optax_suite/run.py --real          # plain Optax: the reference

The listed test files are copied from the installed Optax (0.2.8) into a temporary folder
and each is run by its own pytest process with ``shim.py`` as a plugin: it replaces Optax's
optimizer-domain modules with proxies whose names resolve to optcompose's objects where
optcompose has them, and to Optax's otherwise (see shim.py). The outcome of every test, the
first line of each failure, and which names each file resolved to optcompose ("ours") or to
Optax ("optax": a fallback, which does not test optcompose) are written to
``results.json`` next to this file (``results_real.json`` with ``--real``), and a table is
printed. FAILURES.md classifies the failures.

In Optax 0.2.8 there is no ``lbfgs_test.py`` nor ``wrappers_test.py``: L-BFGS is tested in
``_src/alias_test.py`` (``LBFGSTest``) and ``_src/linesearch_test.py``; the wrappers
(``MultiSteps``, ``apply_if_finite``, ``masked``, ...) in ``transforms/_*_test.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]

FILES = (
  "_src/alias_test.py",
  "_src/transform_test.py",
  "_src/linesearch_test.py",
  "_src/update_test.py",
  "transforms/_accumulation_test.py",
  "transforms/_adding_test.py",
  "transforms/_clipping_test.py",
  "transforms/_combining_test.py",
  "transforms/_conditionality_test.py",
  "transforms/_constraining_test.py",
  "transforms/_freezing_test.py",
  "transforms/_layouts_test.py",
  "transforms/_masking_test.py",
  "transforms/_monitoring_test.py",
  "schedules/_inject_test.py",
  "schedules/_join_test.py",
  "schedules/_schedule_test.py",
  "tree_utils/_casting_test.py",
  "tree_utils/_random_test.py",
  "tree_utils/_state_utils_test.py",
  "tree_utils/_tree_math_test.py",
)
# Not in the list; --extras adds them.
EXTRAS = (
  "_src/base_test.py",
  "_src/combine_test.py",
  "_src/lookahead_test.py",
  "_src/numerics_test.py",
  "_src/utils_test.py",
  "_src/factorized_test.py",
)
# alias_test is also imported by schedules/_schedule_test.py.
_ALWAYS_COPY = ("_src/alias_test.py",)


def _optax_dir() -> pathlib.Path:
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      "import optax, os; print(os.path.dirname(optax.__file__)); print(optax.__version__)",
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  return pathlib.Path(out[0]), out[1]


def _run_file(rel: str, tmp: pathlib.Path, args, index: int) -> dict:
  out = tmp / f"result_{index}.json"
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
  env["OPTAX_SUITE_TEST_DIR"] = str(tmp)
  env["OPTAX_SUITE_OUT"] = str(out)
  if args.real:
    env["OPTAX_SUITE_REAL"] = "1"
  cmd = [
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-p",
    "shim",
    "-p",
    "no:cacheprovider",
    "--rootdir",
    str(tmp),
    "-o",
    "addopts=",
    "--tb=short",
    rel,
  ]
  if args.k:
    cmd += ["-k", args.k]
  if args.x:
    cmd += ["-x"]
  started = time.time()
  log = (tmp / f"log_{index}.txt").open("w")
  process = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
  timed_out = False
  try:
    process.wait(timeout=args.timeout)
  except subprocess.TimeoutExpired:
    timed_out = True
    process.send_signal(signal.SIGINT)  # pytest still writes its session's results
    try:
      process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
  log.close()
  data = json.loads(out.read_text()) if out.exists() else {}
  tail = (tmp / f"log_{index}.txt").read_text().strip().splitlines()[-15:]
  return _summarize(
    rel, data, process.returncode, timed_out, time.time() - started, tail, args.real
  )


def _summarize(rel, data, returncode, timed_out, seconds, tail, real=False) -> dict:
  tests = data.get("tests", {})
  counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
  failing = []
  passed_without_ours = []
  skip_reasons = {}
  for nodeid, entry in sorted(tests.items()):
    outcome = entry.get("outcome") or "error"
    counts[outcome] = counts.get(outcome, 0) + 1
    if outcome == "skipped":
      reason = entry.get("message", "")
      skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    if outcome in ("failed", "error"):
      failing.append(
        {
          "id": nodeid,
          "outcome": outcome,
          "error": entry.get("message", ""),
          "exception": entry.get("exception", ""),
          "optcompose_frame": entry.get("optcompose_frame", ""),
          "ours_touched": entry.get("ours_touched", 0),
        }
      )
    elif outcome == "passed" and not entry.get("ours_touched") and not real:
      passed_without_ours.append(nodeid)
  names = {}
  for file, kinds in data.get("names", {}).items():
    for kind, table in kinds.items():
      names.setdefault(kind, {}).update(table)
  # A file imported by another (alias_test by _schedule_test) counts under its importer.
  return {
    "file": rel,
    "returncode": returncode,
    "timed_out": timed_out,
    "seconds": round(seconds, 1),
    **counts,
    "total": sum(counts.values()),
    "collect_errors": data.get("collect_errors", {}),
    "names_ours": len(names.get("ours", {})),
    "names_optax": len(names.get("optax", {})),
    "ours": dict(sorted(names.get("ours", {}).items())),
    "optax": dict(sorted(names.get("optax", {}).items())),
    "passed_without_ours": passed_without_ours,
    "skip_reasons": skip_reasons,
    "failing": failing,
    "log_tail": tail if (returncode not in (0, 1) or timed_out or not tests) else [],
  }


def _table(files: list[dict]) -> str:
  head = ("file", "pass", "fail", "err", "skip", "ours", "optax", "no-ours", "s")
  rows = [head]
  totals = [0] * 7
  for f in files:
    values = [
      f["passed"],
      f["failed"],
      f["error"],
      f["skipped"],
      f["names_ours"],
      f["names_optax"],
      len(f["passed_without_ours"]),
    ]
    totals = [a + b for a, b in zip(totals, values)]
    flag = " (timeout)" if f["timed_out"] else (" (collect error)" if f["collect_errors"] else "")
    rows.append((f["file"] + flag, *map(str, values), str(int(f["seconds"]))))
  rows.append(("TOTAL", *map(str, totals), str(int(sum(f["seconds"] for f in files)))))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = [
    "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    for r in rows
  ]
  lines.insert(1, "-" * len(lines[0]))
  lines.insert(len(lines) - 1, "-" * len(lines[0]))
  legend = (
    "ours/optax: distinct names the file's code resolved to optcompose / fell back to "
    "Optax; no-ours: tests that passed without touching an optcompose name while "
    "running (names taken at import time, e.g. in parameterizations, not counted)"
  )
  return "\n".join(lines + ["", legend])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("select", nargs="*", help="run only files whose path contains one")
  parser.add_argument("-k", help="pytest -k expression")
  parser.add_argument("-x", action="store_true", help="pytest -x")
  parser.add_argument("--real", action="store_true", help="plain Optax, no proxies")
  parser.add_argument("--extras", action="store_true", help="also " + ", ".join(EXTRAS))
  parser.add_argument("--timeout", type=float, default=1200, help="seconds per file")
  parser.add_argument("--out", help="JSON summary (default: results.json here)")
  parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
  args = parser.parse_args(argv)

  optax_dir, version = _optax_dir()
  files = list(FILES) + (list(EXTRAS) if args.extras else [])
  if args.select:
    files = [f for f in files if any(s in f for s in args.select)]
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="optax_suite_"))
  for rel in sorted(set(files) | set(_ALWAYS_COPY)):
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(optax_dir / rel, tmp / rel)
  (tmp / "pytest.ini").write_text("[pytest]\n")
  results = []
  try:
    for index, rel in enumerate(files):
      print(f"[{index + 1}/{len(files)}] {rel} ...", flush=True)
      result = _run_file(rel, tmp, args, index)
      results.append(result)
      print(
        f"    passed {result['passed']}, failed {result['failed']}, errors "
        f"{result['error']}, skipped {result['skipped']} ({result['seconds']} s)"
        + ("  TIMED OUT" if result["timed_out"] else ""),
        flush=True,
      )
      for line in result["log_tail"]:
        print("    | " + line)
  finally:
    if args.keep:
      print(f"kept {tmp}")
    else:
      shutil.rmtree(tmp, ignore_errors=True)
  keys = ("passed", "failed", "error", "skipped", "total")
  summary = {
    "mode": "real Optax (no proxies)" if args.real else "optcompose through proxies",
    "optax_version": version,
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "command": " ".join(["tools/optax_suite/run.py", *(argv or sys.argv[1:])]),
    "totals": {k: sum(r[k] for r in results) for k in keys},
    "files": results,
  }
  default = "results_real.json" if args.real else "results.json"
  out = pathlib.Path(args.out) if args.out else HERE / default
  out.write_text(json.dumps(summary, indent=1) + "\n")
  print()
  print(_table(results))
  print(f"\ntotals: {summary['totals']}  -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
