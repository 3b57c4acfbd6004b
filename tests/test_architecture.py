"""The package's shape: floors without cycles or upward imports, no type checks by class name,
modules of a readable size, the test kit kept out of ``import optcompose``."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "optcompose"
MAX_LINES = 400

# Floors, bottom up: a module may import modules of its own floor or below, never above.
FLOORS = [
  ("optcompose.tree", "optcompose._tree_diff"),
  ("optcompose.core", "optcompose.masks"),
  ("optcompose.schedules",),
  ("optcompose.transforms",),
  ("optcompose.wrappers",),
  ("optcompose.optimizers",),
  (
    "optcompose.recipe",
    "optcompose.flat",
    "optcompose.metrics",
    "optcompose.checkpoint",
    "optcompose._checkpoint_check",
    "optcompose._checkpoint_io",
    "optcompose._checkpoint_guard",
    "optcompose._checkpoint_layout",
    "optcompose._checkpoint_nodes",
    "optcompose._checkpoint_leaves",
    "optcompose._checkpoint_async",
    "optcompose.sharding",
    "optcompose._from_optax",
  ),
  ("optcompose.testing",),
  # The package's __init__ (re-exports only), and optcompose.migrate, which reads the
  # package's namespace and which __init__ loads on first use (a module __getattr__).
  ("optcompose", "optcompose.migrate", "optcompose._migrate_match"),
]


def module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str) -> int:
  best = None
  for level, prefixes in enumerate(FLOORS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + "."):
        if best is None or len(prefix) > best[1]:
          best = (level, len(prefix))
  if best is None:
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")
  return best[0]


def imports_of(module: str) -> set:
  """The optcompose modules ``module`` imports explicitly (at any depth of its code)."""
  tree = ast.parse(MODULES[module].read_text())
  package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(
          package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
        )
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
      continue
    found |= {n for n in names if n.split(".")[0] == "optcompose" and n != module}
  return {n if n in MODULES else n.rpartition(".")[0] for n in found}


GRAPH = {m: imports_of(m) for m in MODULES}


def find_cycle(graph: dict):
  """A list of modules forming a cycle, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_import_graph_has_no_cycle():
  assert find_cycle(GRAPH) is None


def test_the_cycle_finder_finds_a_planted_cycle():
  planted = {**GRAPH, "optcompose.tree": GRAPH["optcompose.tree"] | {"optcompose.flat"}}
  assert find_cycle(planted) is not None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_floor_above(module):
  upward = sorted(
    m
    for m in GRAPH[module]
    if floor(m) > floor(module)
    and not (module == "optcompose" or module.startswith("optcompose.testing"))
  )
  assert upward == [], f"{module} (floor {floor(module)}) imports {upward}"


def test_tree_imports_nothing_from_the_package():
  """The ground floor: tree (and its structure-difference helper, split off for size)."""
  assert GRAPH["optcompose.tree"] <= {"optcompose._tree_diff"}
  assert GRAPH["optcompose._tree_diff"] == set()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_type_check_by_class_name(module):
  source = MODULES[module].read_text()
  assert not re.search(r"__name__\s*(==|!=|in\b)|(==|!=)\s*[^\n]*\.__name__", source), module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
  lines = len(MODULES[module].read_text().splitlines())
  assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_import_optcompose_leaves_the_test_kit_and_hypothesis_alone():
  code = (
    "import sys, optcompose\n"
    "bad = [m for m in sys.modules if m.startswith(('optcompose.testing', 'hypothesis'))]\n"
    "assert not bad, bad\n"
    "assert optcompose.testing.check_invariants\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_registered_builder_is_exported_and_declares_its_hyperparameters():
  import inspect
  import optcompose as oc
  from optcompose.core.registry import REGISTRY

  for name, entry in REGISTRY.items():
    assert getattr(oc, name) is entry.builder, name
    assert set(entry.hypers) <= set(inspect.signature(entry.builder).parameters), name
  assert set(oc.TRANSFORMATIONS) | set(oc.WRAPPERS) | set(oc.OPTIMIZERS) == set(REGISTRY)
