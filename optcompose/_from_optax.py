"""Optax's names that optcompose answers without defining them at the top level.

optcompose rebuilds Optax's optimizer domain (transformations, optimizers, schedules, tree
utilities). What Optax maintains beyond it -- losses, projections, second-order utilities,
perturbations, assignment, microbatching, experimental, and a few linear-algebra helpers --
is Optax's own code, reached through ``optcompose`` so that ``import optcompose as optax``
runs real training code: ``optcompose.losses is optax.losses``, and
``optcompose.softmax_cross_entropy_with_integer_labels`` is Optax's function. Optax is a
dependency; it is imported the first time one of these names is asked for. So are Optax's
names that are types only (``MaskOrFn``, the ``Protocol`` classes): annotations, no behaviour.

Optax's other spellings of names optcompose has are answered with ours: its flat-namespace
aliases (:data:`ALIASES`, without a warning, as in Optax), and the deprecated names real code
still uses (:data:`DEPRECATED`, warning as Optax's do).

A name Optax has in the optimizer domain that optcompose does not have yet raises an
AttributeError that says so and what to use meanwhile. :func:`install` gives
``optcompose.transforms`` the names of ``optax.transforms`` the same way.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import sys
import types
import warnings
from typing import Any, Optional

from optcompose import tree as otree

# Optax's namespaces outside the optimizer domain, and the top-level names they hold.
NAMESPACES = (
  "losses",
  "projections",
  "second_order",
  "perturbations",
  "assignment",
  "microbatching",
  "experimental",
)
_DOMAINS = tuple(f"optax.{n}" for n in NAMESPACES)
# Top-level helpers of Optax's outside any of those namespaces, and outside the optimizers.
_HELPERS = ("matrix_inverse_pth_root", "nnls", "power_iteration", "multi_normal")

# Optax's top-level names for what optcompose has under another name (dotted: an attribute of
# a top-level name): the flat-namespace aliases of its tree utilities, which Optax keeps
# without a warning. (A name the top level defines itself is never looked up here.)
ALIASES = {
  "bias_correction": "tree.bias_correction",
  "update_moment": "tree.update_moment",
  "update_moment_per_elem_norm": "tree.update_moment_per_elem_norm",
  "update_infinity_moment": "tree.update_infinity_moment",
  "tree_map_params": "tree.map_params",
  # The state Optax 0.2.8's inject_hyperparams returns; ours is InjectHyperparamsState, so
  # isinstance(s, (InjectStatefulHyperparamsState, InjectHyperparamsState)) holds as there
  # (a field of Optax's that ours lacks, hyperparams_states, is an AttributeError).
  "InjectStatefulHyperparamsState": "InjectHyperparamsState",
}


def global_norm(updates: Any) -> Any:
  """Optax's deprecated ``optax.global_norm``: :func:`optcompose.tree.norm`, with Optax's warning.

  Args:
    updates: a tree of arrays.

  Returns:
    The L2 norm of all leaves together.

  References:
    Optax's ``optax.global_norm`` (deprecated in favour of ``optax.tree.norm``).
  """
  warnings.warn(
    "optax.global_norm is deprecated in favor of optax.tree.norm", DeprecationWarning, stacklevel=2
  )
  return otree.norm(updates)


def inject_stateful_hyperparams(inner_factory, static_args=(), hyperparam_dtype=None):
  """Optax's deprecated ``optax.inject_stateful_hyperparams``: ``inject_hyperparams``, warning.

  Args:
    inner_factory: as :func:`optcompose.inject_hyperparams`'s.
    static_args: as :func:`optcompose.inject_hyperparams`'s.
    hyperparam_dtype: as :func:`optcompose.inject_hyperparams`'s.

  Returns:
    ``optcompose.inject_hyperparams(inner_factory, static_args, hyperparam_dtype)``.

  References:
    Optax's ``optax.inject_stateful_hyperparams`` (deprecated since 0.1.9, returns
    ``inject_hyperparams(...)`` after the same warning).
  """
  from optcompose.wrappers.hyperparams import inject_hyperparams

  warnings.warn(
    "inject_stateful_hyperparams is deprecated, use inject_hyperparams instead",
    DeprecationWarning,
    stacklevel=2,
  )
  return inject_hyperparams(inner_factory, static_args, hyperparam_dtype)


# Optax's deprecated top-level names that optcompose keeps for the code still using them
# (Optax warns when they are called; its dpsgd & co. warn when looked up, and are contrib's).
DEPRECATED = {
  "global_norm": global_norm,
  "inject_stateful_hyperparams": inject_stateful_hyperparams,
}


# Optax's state classes whose contents optcompose keeps in another class: an ``isinstance``
# test against Optax's class would be False on every optcompose state, silently.
STATES_ELSEWHERE = {
  "MultiTransformState": "PartitionState",
  "ScaleByScheduleState": "InjectHyperparamsState",
}


def _optax(where: str):
  try:
    optax = importlib.import_module("optax")
  except ImportError:  # pragma: no cover -- a dependency, but be clear if it is missing
    raise AttributeError(
      f"{where} (and Optax, where optcompose takes names outside the "
      "optimizer domain, is not installed: pip install optax)"
    ) from None
  if optax is sys.modules.get(__package__ or ""):  # sys.modules["optax"] = optcompose
    raise AttributeError(
      f"{where}: sys.modules['optax'] is optcompose, but optcompose takes the names outside "
      "the optimizer domain (losses, projections, ...) from the real Optax, which it then "
      "cannot reach. Write `import optcompose as optax` in your own code instead."
    )
  return optax


def _types_only(value: Any) -> bool:
  """A typing construct (an alias such as ``Union[...]``, or a ``Protocol`` class)."""
  return bool(getattr(value, "_is_protocol", False)) or type(value).__module__ in (
    "typing",
    "collections.abc",
  )


def _from(theirs: Any, name: str, ours: str) -> Any:
  """Optax's ``theirs.<name>`` when it lies outside the optimizer domain (or is a type only);
  else the AttributeError that says what to use meanwhile. ``ours``: our module's name."""
  missing = object()
  with warnings.catch_warnings():  # a probe: Optax warns on looking up its deprecated names
    warnings.simplefilter("ignore", DeprecationWarning)
    value = getattr(theirs, name, missing)
  if value is missing:
    raise AttributeError(f"module {ours!r} has no attribute {name!r} (nor has Optax)")
  module = getattr(value, "__module__", None) or ""
  if name in _HELPERS or module.startswith(_DOMAINS) or _types_only(value):
    return value
  if name in STATES_ELSEWHERE:
    raise AttributeError(
      f"module {ours!r} has no attribute {name!r}: what Optax keeps in `optax.{name}` "
      f"optcompose keeps in `optcompose.{STATES_ELSEWHERE[name]}`, so test for that class: "
      f"`isinstance(s, optcompose.{STATES_ELSEWHERE[name]})` (an Optax state converts with "
      "optcompose.migrate)."
    )
  path = (
    f"optax.contrib.{name}" if module.startswith("optax.contrib") else (f"{theirs.__name__}.{name}")
  )
  use = path if inspect.ismodule(value) else f"{path}(...)"
  here = ""
  package = sys.modules.get("optcompose")  # loaded: this runs on a lookup in its namespace
  if inspect.ismodule(value) and package is not None:  # what of it our top level has
    found = sorted(n for n in dir(value) if not n.startswith("_") and hasattr(package, n))
    here = f" Rebuilt at optcompose's top level: {', '.join(found)}." if found else ""
  raise AttributeError(
    f"module {ours!r} has no attribute {name!r} yet: Optax's `{theirs.__name__}.{name}` is "
    "in the optimizer domain that optcompose rebuilds, and this one is not rebuilt yet. "
    f"Optax's own works inside optcompose's chains meanwhile: `import optax; {use}` (under "
    f"another name if `optax` names optcompose in your code).{here}"
  )


def not_rebuilt_contrib(name: str) -> Any:
  """What ``optcompose.contrib.<name>`` is for a name the module does not define: an
  AttributeError that names Optax's own (or says that Optax has none either)."""
  contrib = importlib.import_module(_optax("optcompose.contrib needs Optax").__name__ + ".contrib")
  return _from(contrib, name, "optcompose.contrib")


class NamespaceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds ``optcompose.losses`` (and Optax's other namespaces outside the optimizer domain,
  :data:`NAMESPACES`) for the import system as Optax's own module, so that ``import
  optcompose.losses`` and ``from optcompose.projections import ...`` work as the attributes
  do (Optax's own modules, imported with Optax, which optcompose imports); and
  ``optcompose._src.<module>`` as :func:`private_module`."""

  def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
    package, _, rest = fullname.partition(".")
    if package != "optcompose" or (rest not in NAMESPACES and not _is_private(rest)):
      return None
    return importlib.util.spec_from_loader(fullname, self, is_package=rest == "_src")

  def create_module(self, spec: Any) -> Any:
    rest = spec.name.partition(".")[2]
    if _is_private(rest):
      return private_module(rest)
    return importlib.import_module("optax." + rest)

  def exec_module(self, module: Any) -> None:
    pass  # Optax's module, imported by create_module


def resolve(name: str, package: Optional[dict] = None) -> Any:
  """What ``optcompose.<name>`` is when the top level does not define it.

  Args:
    name: an attribute asked of ``optcompose``.
    package: the top level's namespace (its ``globals()``), for :data:`ALIASES`.

  Returns:
    Ours under Optax's other name (:data:`ALIASES`, :data:`DEPRECATED`), or Optax's module or
    object outside the optimizer domain.

  Raises:
    AttributeError: the name is not Optax's either, or it is in the optimizer domain that
      optcompose rebuilds and has not rebuilt yet (the message says what to use meanwhile).
  """
  if name.startswith("__"):
    raise AttributeError(f"module 'optcompose' has no attribute {name!r}")
  if name in DEPRECATED:
    return DEPRECATED[name]
  if name in ALIASES and package is not None:
    first, _, rest = ALIASES[name].partition(".")
    if first in package:
      value = package[first]
      return getattr(value, rest) if rest else value
  optax = _optax(f"module 'optcompose' has no attribute {name!r}")
  if name in NAMESPACES:
    return importlib.import_module(f"optax.{name}")
  return _from(optax, name, "optcompose")


def install(module: Any, namespace: str, package: dict) -> None:
  """Give ``module`` (e.g. ``optcompose.transforms``) the names of Optax's
  ``optax.<namespace>``: each is read from the top level (``package``) when asked, so a name
  added anywhere appears there too; types only are Optax's; the rest say they are not rebuilt.
  (The top level calls this: no module imports the floor above it.)

  Args:
    module: our module.
    namespace: Optax's module under ``optax`` of the same role.
    package: the top level's namespace (its ``globals()``).
  """

  def names() -> list:
    theirs = importlib.import_module(f"optax.{namespace}")
    return [
      n for n in dir(theirs) if not n.startswith("_") and not inspect.ismodule(getattr(theirs, n))
    ]

  def __getattr__(name):
    if name.startswith("_") or name not in names():
      raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
    if name in package:
      return package[name]
    if name in ALIASES:  # e.g. optax.schedules.InjectStatefulHyperparamsState
      return resolve(name, package)
    if name in DEPRECATED:  # e.g. optax.schedules.inject_stateful_hyperparams
      return DEPRECATED[name]
    return _from(importlib.import_module(f"optax.{namespace}"), name, module.__name__)

  def __dir__():
    return sorted(set(vars(module)) | {n for n in names() if n in package})

  module.__getattr__, module.__dir__ = __getattr__, __dir__


def _is_private(rest: str) -> bool:
  """Whether ``optcompose.<rest>`` names Optax's private package ``optax._src`` or one of its
  modules."""
  first, _, module = rest.partition(".")
  if first != "_src" or "." in module:
    return False
  return not module or importlib.util.find_spec(f"optax._src.{module}") is not None


def private_module(rest: str) -> Any:
  """``optcompose._src`` or ``optcompose._src.<module>``: Optax's private modules, which real
  training code imports from (``from optax._src.base import init_empty_state``, EasyLM's
  ``optax._src.numerics.safe_int32_increment``). A name is answered with optcompose's
  top-level object of that name, where Optax's module has the name and our top level defines
  it; any other is an AttributeError naming Optax's module."""
  module = types.ModuleType(f"optcompose.{rest}")
  theirs_name = f"optax.{rest}"

  def __getattr__(name: str) -> Any:
    if rest == "_src" and not name.startswith("__") and _is_private(f"_src.{name}"):
      return importlib.import_module(f"optcompose._src.{name}")
    theirs = importlib.import_module(theirs_name)
    if not name.startswith("__") and hasattr(theirs, name):
      try:  # the top level's, defined or answered (global_norm, Optax's helpers)
        value = getattr(sys.modules["optcompose"], name)
      except AttributeError:
        value = None
      if value is not None and not inspect.ismodule(value):
        return value
    raise AttributeError(
      f"module {module.__name__!r} has no attribute {name!r}: it answers the names of "
      f"Optax's private module `{theirs_name}` that optcompose's top level has, and this is "
      "not one of them. Use a public name, or Optax's own object (`import optax`)."
    )

  def __dir__() -> list:
    theirs = importlib.import_module(theirs_name)
    package = sys.modules["optcompose"]
    ours = {n for n in dir(package) if f"optcompose.{n}" not in sys.modules}  # no module
    return sorted(n for n in dir(theirs) if not n.startswith("_") and n in ours)

  module.__getattr__, module.__dir__ = __getattr__, __dir__  # type: ignore[attr-defined]
  if rest == "_src":
    module.__path__ = []  # type: ignore[attr-defined]  (a package: its modules import)
  return module
