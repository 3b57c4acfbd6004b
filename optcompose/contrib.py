"""``optax.contrib``'s names that optcompose has rebuilt, so that code written as
``optax.contrib.reduce_on_plateau(...)`` runs with ``import optcompose as optax`` (and
``import optcompose.contrib``). They are the top level's own objects.

Optax's other contrib optimizers (``muon``, ``prodigy``, ``schedule_free_adamw``, ...) are
not rebuilt: asking for one raises an AttributeError that says so and names Optax's own,
which works inside optcompose's chains.
"""

from __future__ import annotations

from typing import Any

from optcompose import ReduceLROnPlateauState, SAMState, normalize, reduce_on_plateau, sam
from optcompose.transforms.sharpness import NormalizeState  # contrib's only: normalize's state

__all__ = [
  "NormalizeState",
  "ReduceLROnPlateauState",
  "SAMState",
  "normalize",
  "reduce_on_plateau",
  "sam",
]


def __getattr__(name: str) -> Any:
  from optcompose import _from_optax

  if name.startswith("__"):
    raise AttributeError(f"module 'optcompose.contrib' has no attribute {name!r}")
  return _from_optax.not_rebuilt_contrib(name)
