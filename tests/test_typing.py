"""What a type checker sees of optcompose is what ``import optcompose`` gives at run time.

The top level, ``optcompose.transforms`` and ``optcompose.schedules`` fill their namespaces
at run time (a loop over the modules, the registry, Optax's forwarded names), which checkers
cannot follow; their ``__init__.pyi`` stubs, written by tools/gen_stubs.py, say it
statically. These tests keep the stubs exactly current, check each re-export against the
run-time object, and keep the explicit ``__all__`` of the packages that import their names.
(tests/typecheck/user_script.py, checked by ``make lint``'s pyrefly, is user code against them.)
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import warnings
from pathlib import Path

import optax
import pytest

import optcompose
from optcompose.core.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
STUBBED = ("optcompose", "optcompose.transforms", "optcompose.schedules")


def _gen_stubs():
  spec = importlib.util.spec_from_file_location("gen_stubs", ROOT / "tools" / "gen_stubs.py")
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def stub_path(namespace: str) -> Path:
  return ROOT.joinpath(*namespace.split("."), "__init__.pyi")


def stub_names(namespace: str) -> dict:
  """``{name: module it is imported from, or None for a declaration}`` of a stub."""
  names = {}
  for node in ast.parse(stub_path(namespace).read_text()).body:
    if isinstance(node, ast.ImportFrom) and node.module != "typing":
      for alias in node.names:
        assert alias.asname == alias.name, f"{namespace}: {alias.name} is not re-exported"
        names[alias.name] = node.module
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names[node.target.id] = None
    elif isinstance(node, ast.Assign):  # an alias of a name the stub holds: X = Y
      (target,) = node.targets
      assert isinstance(target, ast.Name) and isinstance(node.value, ast.Name), ast.dump(node)
      assert node.value.id in names, f"{namespace}: {target.id} aliases {node.value.id}, not held"
      names[target.id] = None
  return names


def _own_lines(text: str) -> str:
  """A stub without the names it forwards from Optax (which follow the Optax installed)."""
  keep = [x for x in text.splitlines() if not x.startswith(("from optax", "# Written with"))]
  return "\n".join(keep)


def _stubs_optax() -> str:
  """The Optax version the committed stubs were written with."""
  head = stub_path("optcompose").read_text().splitlines()[2]
  return head.removeprefix(_gen_stubs().OPTAX_VERSION).split(" ")[0]


def test_the_stubs_are_what_tools_gen_stubs_writes():
  # Exactly, with the Optax they were written with; with another (CI installs the newest),
  # the names forwarded from Optax may differ: optcompose's own lines must still be current.
  same_optax = _stubs_optax() == optax.__version__
  stale = []
  for path, text in _gen_stubs().render().items():
    committed = (ROOT / path).read_text() if (ROOT / path).exists() else ""
    if not same_optax:
      committed, text = _own_lines(committed), _own_lines(text)
    if committed != text:
      diff = difflib.unified_diff(
        committed.splitlines(), text.splitlines(), f"{path} (committed)", "(generated)", lineterm=""
      )
      stale.append("\n".join(list(diff)[:40]))
  assert not stale, (
    "the type stubs differ from the run-time namespace; run `.venv/bin/python "
    "tools/gen_stubs.py` and commit the result:\n" + "\n".join(stale)
  )


@pytest.mark.parametrize("namespace", STUBBED)
def test_every_public_name_at_run_time_is_in_the_stub(namespace):
  space = importlib.import_module(namespace)
  for lazy in optcompose._ON_FIRST_USE if namespace == "optcompose" else ():
    getattr(space, lazy)  # loaded on first use: now in dir()
  public = {
    n
    for n in dir(space)
    if not n.startswith("_")
    and not (inspect.ismodule(getattr(space, n)) and namespace != "optcompose")
    and type(getattr(space, n)).__module__ != "__future__"
  }
  if namespace == "optcompose":
    public |= set(REGISTRY) | {"__version__"}
  if _stubs_optax() != optax.__version__:  # names a newer Optax adds are answered as Any
    public = {n for n in public if not type(getattr(space, n)).__module__.startswith("optax")}
  missing = sorted(public - set(stub_names(namespace)))
  assert not missing, f"{namespace}: {missing} missing from its stub (run tools/gen_stubs.py)"


@pytest.mark.parametrize("namespace", STUBBED)
def test_each_reexport_is_the_run_time_object(namespace):
  """``from M import X as X`` in the stub: ``M.X`` is ``namespace.X`` at run time, so the
  checker's type of each name is the type of what the user gets."""
  space = importlib.import_module(namespace)
  wrong = []
  for name, module in stub_names(namespace).items():
    with warnings.catch_warnings():  # Optax's deprecated names warn on look-up
      warnings.simplefilter("ignore", DeprecationWarning)
      if (
        module and module.startswith("optax") and not hasattr(importlib.import_module(module), name)
      ):
        continue  # forwarded from an Optax that had it (see _stubs_optax); gone from this one
      ours = getattr(space, name)
      theirs = getattr(importlib.import_module(module), name) if module else ours
    if theirs is not ours:
      wrong.append(f"{name}: {module}.{name} is not {namespace}.{name}")
  assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", ["optcompose.core", "optcompose.testing"])
def test_packages_that_import_their_names_list_them_in_all(package):
  """Names a package ``__init__`` imports are public to a checker only through ``__all__``."""
  path = ROOT.joinpath(*package.split("."), "__init__.py")
  imported = {
    a.asname or a.name
    for node in ast.parse(path.read_text()).body
    if isinstance(node, ast.ImportFrom)
    for a in node.names
  }
  module = importlib.import_module(package)
  assert sorted(module.__all__) == sorted(imported), set(module.__all__) ^ imported


def test_the_typed_user_script_runs():
  """tests/typecheck/user_script.py is checked by pyrefly (make lint) and is also code that
  must run: its annotations describe what the calls really return."""
  import runpy

  import jax

  with jax.numpy_dtype_promotion("standard"):  # a user's default, not the suite's strict one
    runpy.run_path(str(ROOT / "tests" / "typecheck" / "user_script.py"), run_name="__main__")
