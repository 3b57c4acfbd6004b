"""Where two checkpoint state dicts differ in their containers, not their leaves: an empty
container (an ``EmptyState``, an empty dict) present on one side only, which no leaf shows
(:mod:`optcompose._checkpoint_check` compares the leaves)."""

from __future__ import annotations

import os
from typing import Any, Optional

from optcompose._checkpoint_check import CheckpointMismatchError, PathLike, _saved_keystr


def _mismatched_nodes(fn: str, path: PathLike, saved: dict, target: dict, error: Exception):
  """Raise the CheckpointMismatchError for Flax's ``error`` restoring state dict ``saved``
  into ``target``'s, naming the first container entry on one side only (else Flax's words)."""
  why = _node_difference(saved, target) or error
  raise CheckpointMismatchError(
    f"{fn}: the checkpoint {os.fspath(path)} does not match `target`: {why}"
  ) from error


def _node_difference(saved: Any, target: Any, path: tuple = ()) -> Optional[str]:
  """The first entry of a container in one state dict and not in the other, named as the
  target's paths are (``['opt_state'][2]``), or None."""
  if not (isinstance(saved, dict) and isinstance(target, dict)):
    return None
  for extra, where in (
    (saved.keys() - target.keys(), "the checkpoint"),
    (target.keys() - saved.keys(), "`target`"),
  ):
    if extra:
      first = _saved_keystr(path + (sorted(extra)[0],))
      return f"`{first}` is only in {where} (another optimizer's state, or another chain?)"
  for key in saved:
    found = _node_difference(saved[key], target[key], path + (key,))
    if found:
      return found
  return None
