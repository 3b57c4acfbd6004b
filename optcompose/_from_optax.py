"""Names outside the optimizer domain, taken from Optax rather than rewritten.

optcompose rebuilds Optax's optimizer domain (transformations, optimizers, schedules, tree
utilities). What Optax maintains beyond it -- losses, projections, second-order utilities,
perturbations, assignment, microbatching, experimental, and a few linear-algebra helpers --
is Optax's own code, reached through ``optcompose`` so that ``import optcompose as optax``
runs real training code: ``optcompose.losses is optax.losses``, and
``optcompose.softmax_cross_entropy_with_integer_labels`` is Optax's function. Optax is a
dependency; it is imported the first time one of these names is asked for.

A name Optax has in the optimizer domain that optcompose does not have yet raises an
AttributeError that says so and what to use meanwhile.
"""

from __future__ import annotations

import importlib
from typing import Any

# Optax's namespaces outside the optimizer domain, and the top-level names they hold.
NAMESPACES = ("losses", "projections", "second_order", "perturbations", "assignment",
              "microbatching", "experimental")
_DOMAINS = tuple(f"optax.{n}" for n in NAMESPACES)
# Top-level helpers of Optax's outside any of those namespaces, and outside the optimizers.
_HELPERS = ("matrix_inverse_pth_root", "nnls", "power_iteration", "multi_normal")


def resolve(name: str) -> Any:
  """Optax's value for ``name`` when it lies outside the optimizer domain.

  Args:
    name: an attribute asked of ``optcompose``.

  Returns:
    Optax's module or object.

  Raises:
    AttributeError: the name is not Optax's either, or it is in the optimizer domain that
      optcompose rebuilds and has not rebuilt yet (the message says what to use meanwhile).
  """
  if name.startswith("__"):
    raise AttributeError(f"module 'optcompose' has no attribute {name!r}")
  try:
    optax = importlib.import_module("optax")
  except ImportError:  # pragma: no cover -- a dependency, but be clear if it is missing
    raise AttributeError(f"module 'optcompose' has no attribute {name!r} (and Optax, where "
                         "optcompose takes names outside the optimizer domain, is not "
                         "installed: pip install optax)") from None
  if name in NAMESPACES:
    return importlib.import_module(f"optax.{name}")
  missing = object()
  value = getattr(optax, name, missing)
  if value is missing:
    raise AttributeError(f"module 'optcompose' has no attribute {name!r} (nor has Optax)")
  module = getattr(value, "__module__", None) or ""
  if name in _HELPERS or module.startswith(_DOMAINS):
    return value
  raise AttributeError(
      f"module 'optcompose' has no attribute {name!r} yet: Optax's `optax.{name}` is in the "
      "optimizer domain that optcompose rebuilds, and this one is not rebuilt yet. Optax's "
      f"own works inside optcompose's chains meanwhile: `import optax; optax.{name}(...)`.")
