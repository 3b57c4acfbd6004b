"""A pytest plugin that runs Optax's own test files against optcompose.

Loaded with ``-p shim`` (``run.py`` puts this folder on ``PYTHONPATH``). At configure time,
before any test file is imported, it

1. imports optcompose, then every (non-test) module of the real Optax, and keeps references
   to the real modules: optcompose's own code and Optax's code keep using these;
2. replaces, in ``sys.modules``, Optax's optimizer-domain modules (``optax``, ``optax._src``
   and its modules, ``optax.transforms``, ``optax.schedules``, ``optax.tree``,
   ``optax.tree_utils`` and their private submodules) with proxy modules.

A proxy's attribute ``N`` is resolved once, and then served on every access:

* a submodule -> that submodule's proxy (or the real module outside the proxied domain,
  e.g. ``optax.losses``);
* an object Optax exposes publicly -> optcompose's object at the matching public path. The
  public paths are found by identity: ``optax._src.transform.scale_by_adam`` is the object
  ``optax.scale_by_adam`` and ``optax.transforms.scale_by_adam`` ..., so it resolves to
  ``optcompose.scale_by_adam`` (or ``optcompose.transforms.scale_by_adam``); a private
  module's name is tried first at the public module of its own family (``transforms``,
  ``schedules``, ``tree_utils``/``tree``), then at the top level;
* otherwise (a private helper, a test utility, a name optcompose lacks, or one optcompose
  itself takes from Optax, e.g. the losses) -> real Optax's object: a *fallback*.

Every access made by a test file's code is counted, per file and per test, as ``ours`` or
``optax`` (fallback), so a test that touched only fallbacks can be told apart.

No recursion between the proxies and optcompose's lazy routing (``optcompose.__getattr__`` ->
``optcompose._from_optax.resolve`` -> ``importlib.import_module("optax")``, which now returns
the proxy): an access made while a proxy is resolving, or made by code of optcompose or of
the real Optax (by the caller's module name), is served the real Optax's attribute directly.

At the end of the session the outcomes and the counts are written as JSON to
``$OPTAX_SUITE_OUT``.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
import threading
import types
from typing import Any

# The folder holding the copied test files; accesses from files under it are "test" accesses.
TEST_DIR = os.path.realpath(os.environ.get("OPTAX_SUITE_TEST_DIR", os.getcwd()))

# Optax's public modules, and optcompose's module at the same path.
PUBLIC = {
  "optax": "optcompose",
  "optax.transforms": "optcompose.transforms",
  "optax.schedules": "optcompose.schedules",
  "optax.tree": "optcompose.tree",
  "optax.tree_utils": "optcompose.tree_utils",
}
# Real Optax modules that stay real (not proxied) even inside the proxied packages.
_KEEP_REAL = {"optax._src.test_utils"}

_REAL: dict[str, types.ModuleType] = {}  # module name -> the real Optax module
_PROXIES: dict[str, "_Proxy"] = {}
_CACHE: dict[tuple[str, str], tuple[Any, str, str]] = {}
_ALIASES: dict[int, list[tuple[str, str]]] = {}  # id(object) -> Optax's public (module, name)s
_state = threading.local()

# Records. file -> {"ours": {qualname: where}, "optax": {qualname: why}}
_NAMES: dict[str, dict[str, dict[str, str]]] = {}
# nodeid -> {"ours": set(qualname), "optax": set(qualname)}
_PER_TEST: dict[str, dict[str, set]] = {}
_RESULTS: dict[str, dict[str, Any]] = {}
_COLLECT_ERRORS: dict[str, str] = {}
_RESOLVE_ERRORS: dict[str, str] = {}


def _is_proxied(name: str) -> bool:
  if name in _KEEP_REAL or name.rsplit(".", 1)[-1].endswith("_test"):
    return False
  return name in ("optax", "optax._src", "optax.tree") or name.startswith(
    ("optax._src.", "optax.transforms", "optax.schedules", "optax.tree_utils")
  )


def _family(module_name: str) -> tuple[str, ...]:
  """Optax's public modules in the order a private module's names are looked up in."""
  if module_name.startswith("optax.transforms"):
    return ("optax.transforms", "optax", "optax.tree_utils", "optax.tree")
  if module_name.startswith("optax.schedules"):
    return ("optax.schedules", "optax", "optax.transforms", "optax.tree_utils", "optax.tree")
  if module_name.startswith("optax.tree"):  # optax.tree, optax.tree_utils[._x]
    return ("optax.tree_utils", "optax.tree", "optax", "optax.transforms", "optax.schedules")
  return ("optax", "optax.transforms", "optax.schedules", "optax.tree_utils", "optax.tree")


def _indexable(value: Any) -> bool:
  # Identity is meaningful for functions and classes, not for interned constants.
  return callable(value) and not isinstance(value, types.ModuleType)


def _load_real() -> None:
  import optcompose  # noqa: F401 -- first: whatever it keeps of Optax is the real Optax
  import optax

  _REAL["optax"] = optax
  for info in pkgutil.walk_packages(optax.__path__, "optax."):
    if info.name.rsplit(".", 1)[-1].endswith("_test"):
      continue
    try:
      _REAL[info.name] = importlib.import_module(info.name)
    except Exception as error:  # noqa: BLE001 -- an optional dependency of a corner of Optax
      _RESOLVE_ERRORS[info.name] = f"not importable: {type(error).__name__}: {error}"
  for module in list(sys.modules):
    if module.startswith("optax.") and module not in _REAL and not module.endswith("_test"):
      _REAL[module] = sys.modules[module]
  for public in PUBLIC:
    module = _REAL[public]
    for name in dir(module):
      if name.startswith("_"):
        continue
      value = getattr(module, name)
      if _indexable(value):
        _ALIASES.setdefault(id(value), []).append((public, name))


class _Proxy(types.ModuleType):
  """Stands in for one real Optax module; attributes resolve lazily (see the module doc)."""

  def __getattr__(self, name: str) -> Any:
    real = _REAL[self.__name__]
    caller = sys._getframe(1).f_globals
    file = os.path.realpath(caller.get("__file__") or "")
    in_tests = file.startswith(TEST_DIR + os.sep)
    if (
      name.startswith("__")
      or getattr(_state, "resolving", False)
      or (not in_tests and str(caller.get("__name__", "")).startswith(("optax", "optcompose")))
    ):
      return getattr(real, name)  # AttributeError as the real module raises it
    value, kind, where = _resolve(self.__name__, name)
    if in_tests and kind in ("ours", "optax"):
      _record(os.path.relpath(file, TEST_DIR), f"{self.__name__}.{name}", kind, where)
    return value

  def __dir__(self):
    return dir(_REAL[self.__name__])


def _lookup(module_name: str, name: str) -> Any:
  """optcompose's ``module_name.name``, or None; never recurses into the proxies."""
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    return None
  if name in vars(module):
    return vars(module)[name]
  _state.resolving = True
  try:
    return getattr(module, name)
  except AttributeError:
    return None
  except Exception as error:  # noqa: BLE001 -- a lazy route that fails otherwise: a fallback
    _RESOLVE_ERRORS[f"{module_name}.{name}"] = f"{type(error).__name__}: {error}"
    return None
  finally:
    _state.resolving = False


def _resolve(module_name: str, name: str) -> tuple[Any, str, str]:
  """(value, kind, where): kind is "module", "ours" or "optax" (a fallback)."""
  key = (module_name, name)
  if key in _CACHE:
    return _CACHE[key]
  real = getattr(_REAL[module_name], name)  # AttributeError as the real module raises it
  if isinstance(real, types.ModuleType):
    result = (_PROXIES.get(real.__name__, real), "module", real.__name__)
  else:
    paths = []
    if module_name in PUBLIC:
      paths.append((module_name, name))
    aliases = _ALIASES.get(id(real), []) if _indexable(real) else []
    # The same name first; another name only for tree_utils' renames in optax.tree
    # (tree_add <-> add). Optax gives some objects several names (ClipByGlobalNormState is
    # EmptyState): a different name is a different thing in optcompose.
    for same in (True, False):
      for public in _family(module_name):
        paths += [
          (p, n)
          for p, n in aliases
          if p == public
          and (p, n) not in paths
          and (n == name) == same
          and (same or n == "tree_" + name or name == "tree_" + n)
        ]
    result = None
    reasons = []
    for public, public_name in paths:
      ours = _lookup(PUBLIC[public], public_name)
      target = f"{PUBLIC[public]}.{public_name}"
      if ours is None or isinstance(ours, types.ModuleType):
        reasons.append(f"no {target}")
      elif ours is real:
        reasons.append(f"{target} is Optax's own")
      else:
        result = (ours, "ours", target)
        break
    if result is None:
      why = "; ".join(reasons) if reasons else "private to Optax (no public name)"
      result = (real, "optax", why)
  _CACHE[key] = result
  return result


def _record(file: str, qualname: str, kind: str, where: str) -> None:
  _NAMES.setdefault(file, {"ours": {}, "optax": {}})[kind][qualname] = where
  test = getattr(_state, "test", None)
  if test is not None:
    _PER_TEST.setdefault(test, {"ours": set(), "optax": set()})[kind].add(qualname)


def install() -> None:
  if _PROXIES:
    return
  _load_real()
  for name, module in _REAL.items():
    if not _is_proxied(name):
      continue
    proxy = _Proxy(name, module.__doc__)
    for attribute in ("__file__", "__package__"):
      if hasattr(module, attribute):
        setattr(proxy, attribute, getattr(module, attribute))
    proxy.__spec__ = module.__spec__
    proxy.__loader__ = module.__loader__
    if hasattr(module, "__path__"):
      # A test file imported as a submodule (``from optax._src import alias_test``) is the
      # copied one, under the test folder.
      sub = os.path.join(TEST_DIR, *name.split(".")[1:])
      proxy.__path__ = [sub, *module.__path__] if os.path.isdir(sub) else list(module.__path__)
    _PROXIES[name] = proxy
  sys.modules.update(_PROXIES)


# ------------------------------------------------------------------------ pytest hooks


def pytest_configure(config):  # noqa: ARG001
  if not os.environ.get("OPTAX_SUITE_REAL"):  # --real: plain Optax, outcomes only
    install()


def pytest_collectreport(report):
  if report.failed:
    _COLLECT_ERRORS[report.nodeid] = _first_line(report)


def pytest_runtest_setup(item):
  _state.test = item.nodeid


def pytest_runtest_logreport(report):
  entry = _RESULTS.setdefault(report.nodeid, {"outcome": None})
  if report.when == "teardown":
    _state.test = None
  if report.skipped:
    entry["outcome"] = "skipped"
    entry["message"] = _skip_reason(report)
  elif report.failed:
    if report.when == "call":
      entry["outcome"] = "failed"
    elif entry["outcome"] in (None, "passed"):
      entry["outcome"] = "error"
    entry.setdefault("message", _first_line(report))
    entry.setdefault("exception", _exception(report))
    where = _blame(report)
    if where:
      entry.setdefault("optcompose_frame", where)
  elif report.when == "call" and entry["outcome"] is None:
    entry["outcome"] = "passed"


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    return str(longrepr[2]).splitlines()[0] if str(longrepr[2]) else ""
  return str(longrepr).splitlines()[0] if longrepr else ""


def _first_line(report) -> str:
  crash = getattr(report.longrepr, "reprcrash", None)
  if crash is not None and crash.message:
    return crash.message.strip().splitlines()[0][:500]
  text = str(report.longrepr).strip().splitlines()
  lines = [line for line in text if line.startswith("E ")]
  return (lines[0][1:].strip() if lines else (text[-1] if text else ""))[:500]


def _exception(report) -> str:
  message = _first_line(report)
  head = message.split(":", 1)[0].strip()
  return head if head.replace(".", "").replace("_", "").isalnum() else ""


def _blame(report) -> str:
  """The deepest traceback frame in optcompose's own code, 'path:line', if any."""
  traceback = getattr(report.longrepr, "reprtraceback", None)
  chain = getattr(report.longrepr, "chain", None)
  entries = []
  if chain:
    for element in chain:
      entries += list(getattr(element[0], "reprentries", []))
  elif traceback is not None:
    entries = list(traceback.reprentries)
  found = ""
  for entry in entries:
    location = getattr(entry, "reprfileloc", None)
    if location is not None and "/optcompose/" in location.path:
      found = f"optcompose/{location.path.split('/optcompose/', 1)[1]}:{location.lineno}"
  return found


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
  out = os.environ.get("OPTAX_SUITE_OUT")
  if not out:
    return
  tests = {}
  for nodeid, entry in _RESULTS.items():
    touched = _PER_TEST.get(nodeid, {"ours": set(), "optax": set()})
    tests[nodeid] = {
      **entry,
      "ours_touched": len(touched["ours"]),
      "optax_touched": len(touched["optax"]),
    }
  with open(out, "w") as f:
    json.dump(
      {
        "tests": tests,
        "names": _NAMES,
        "collect_errors": _COLLECT_ERRORS,
        "resolve_errors": _RESOLVE_ERRORS,
      },
      f,
      indent=1,
      sort_keys=True,
    )
