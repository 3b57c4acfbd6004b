"""optcompose: composable, verified gradient transformations for JAX.

``import optcompose as optax`` works for the names below: they follow Optax's names,
argument names and defaults. See :mod:`optcompose.core.base` for the contract.

This module only re-exports. The public builders come from the registry
(:mod:`optcompose.core.registry`: each builder declares itself next to its code); the other
public names from each module's ``__all__``. Type checkers read ``__init__.pyi`` instead,
this namespace written out as re-exports by tools/gen_stubs.py (tests/test_typing.py keeps
it current).
"""

import importlib as _importlib
import pkgutil as _pkgutil
import sys as _sys
import typing as _typing

from optcompose import _from_optax, core, masks, schedules, tree, tree_utils
from optcompose.core import (
  EmptyState,
  GradientTransformation,
  GradientTransformationExtraArgs,
  InjectHyperparamsState,
  OptState,
  Params,
  ScalarOrSchedule,
  Schedule,
  StateMismatchError,
  TransformInitFn,
  TransformUpdateExtraArgsFn,
  TransformUpdateFn,
  Updates,
  apply_updates,
  chain,
  current_hyperparams,
  init_empty_state,
  safe_increment,
  set_hyperparams,
  stateless,
  stateless_with_tree_map,
  step,
  step_nnx,
  step_train_state,
  with_extra_args_support,
  with_schedules,
)
from optcompose.core.registry import REGISTRY as _REGISTRY, names as _names
from optcompose.schedules import *  # noqa: F401,F403  (reachable from the top level, as in Optax)

# The floors above core, bottom up; every module of each package is imported (a new module
# needs no edit here), which registers its builders.
_PACKAGES = ("transforms", "wrappers", "optimizers", "recipe")


def _modules():
  yield "optcompose.masks"
  for package in _PACKAGES:
    path = _importlib.import_module(f"optcompose.{package}").__path__
    for info in sorted(_pkgutil.iter_modules(path), key=lambda m: m.name):
      yield f"optcompose.{package}.{info.name}"
  yield "optcompose.flat"


for _name in _modules():
  _module = _importlib.import_module(_name)
  globals().update({n: getattr(_module, n) for n in getattr(_module, "__all__", ())})
globals().update({n: e.builder for n, e in _REGISTRY.items()})

from optcompose import checkpoint, flat, metrics, sharding  # noqa: E402  (opt-in, top floor)

# Every public transformation, wrapper and optimizer, read from the registry; the test
# registry must cover each of them.
TRANSFORMATIONS = _names("transformation")
WRAPPERS = _names("wrapper")
OPTIMIZERS = _names("optimizer")

# The one place the version is written: pyproject.toml reads it (without importing optcompose).
__version__ = "0.1.0"


# ``optcompose.transforms.<name>`` and ``optcompose.schedules.<name>`` for Optax's
# ``optax.transforms`` and ``optax.schedules`` names (``optax.schedules.inject_hyperparams``):
# read from this namespace when asked (see optcompose._from_optax.install).
from optcompose import transforms  # noqa: E402  (imported above, by _modules)

for _space in (transforms, schedules):
  _importlib.import_module("optcompose._from_optax").install(
    _space, _space.__name__.rpartition(".")[2], globals()
  )


# ``import optcompose.losses`` (and Optax's other namespaces outside the optimizer domain)
# finds Optax's own module, as the attribute ``optcompose.losses`` does.
if not any(isinstance(f, _from_optax.NamespaceFinder) for f in _sys.meta_path):
  _sys.meta_path.append(_from_optax.NamespaceFinder())


# The property kit is not imported by the package; ``optcompose.testing`` loads it.
# optcompose.migrate reads the package's namespace (the state classes), so it is loaded on
# first use too. (tools/gen_stubs.py declares these in __init__.pyi.)
_ON_FIRST_USE = ("testing", "migrate", "contrib")


def __getattr__(name: str) -> _typing.Any:
  if name in _ON_FIRST_USE or name == "_src":  # _src: Optax's private modules' names
    return _importlib.import_module(f"optcompose.{name}")
  # Optax's other names for ours, its names outside the optimizer domain (losses, ...), or an
  # error that says what to use for an optimizer-domain name not rebuilt yet.
  return _importlib.import_module("optcompose._from_optax").resolve(name, globals())
