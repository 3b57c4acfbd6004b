"""What a checkpoint's leaves do not show (:mod:`optcompose._checkpoint_check` compares the
leaves): an empty container (an ``EmptyState``, an empty dict) present on one side only, and
the layout of a :class:`~optcompose.FlatParams` -- which model leaf each slot of its buffers
holds -- recorded with the checkpoint and compared when restoring; a FlatParams as Flax's
serialization stores it.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np

from optcompose import tree as otree
from optcompose._checkpoint_check import (
  CheckpointMismatchError,
  PathLike,
  _damaged_record,
  _is_int,
  _namer,
  _record_problem,
  _saved_keystr,
)
from optcompose.flat import FlatParams


def _mismatched_nodes(fn: str, path: PathLike, saved: dict, target: Any, error: Exception):
  """Raise the CheckpointMismatchError for Flax's ``error`` restoring state dict ``saved``
  into the tree ``target``, naming the first container entry on one side only (else Flax's
  words)."""
  from flax import serialization

  found = _node_difference(saved, serialization.to_state_dict(target))
  why = f"`{_namer(target)(found[0])}` is only in {found[1]}{_GUESS}" if found else error
  raise CheckpointMismatchError(
    f"{fn}: the checkpoint {os.fspath(path)} does not match `target`: {why}"
  ) from error


_GUESS = " (another optimizer's state, or another chain?)"


def _mismatched_orbax_nodes(fn: str, where: PathLike, metadata: Any, target: Any, error: Exception):
  """For Orbax's ``error`` restoring into ``target``: raise a CheckpointMismatchError where
  the trees' structures differ though every leaf matched (an empty node such as an
  ``EmptyState`` on one side only), naming the first such node (else, where Orbax says the
  structures differ, giving its words without its advice to restore partially, which would
  keep the template's values); return for any other error."""
  saved, wanted = _empty_saved(metadata), _empty_target(target)
  found = sorted(
    [(p, "the checkpoint") for p in saved - wanted] + [(p, "`target`") for p in wanted - saved]
  )
  if found:
    why = f"`{_namer(target)(found[0][0])}` is only in {found[0][1]}{_GUESS}"
  elif "tree structures do not match" in str(error):
    why = str(error).split("\nIf this mismatch is")[0]
  else:
    return
  raise CheckpointMismatchError(
    f"{fn}: the checkpoint {os.fspath(where)} does not match `target`: {why}"
  ) from error


def _empty_saved(saved: Any, prefix: tuple = ()) -> set:
  """The key-name paths of the empty nodes (None, {}, []) of Orbax's metadata tree."""
  if saved is None or (isinstance(saved, (dict, list, tuple)) and not saved):
    return {prefix}
  if not isinstance(saved, (dict, list, tuple)):
    return set()  # a leaf
  items = saved.items() if isinstance(saved, dict) else enumerate(saved)
  return set().union(*(_empty_saved(v, prefix + (str(k),)) for k, v in items))


def _empty_target(tree: Any, prefix: tuple = ()) -> set:
  """The key-name paths of the empty nodes (an ``EmptyState``, None, {}, ()) of a pytree."""
  children = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)[0]
  if not children:
    return {prefix}
  if len(children) == 1 and not children[0][0]:  # a leaf
    return set()
  return set().union(
    *(_empty_target(child, prefix + (otree.key_name(path[0]),)) for path, child in children)
  )


def _node_difference(saved: Any, target: Any, path: tuple = ()) -> Optional[tuple]:
  """``(key-name path, side)`` of the first entry of a container in one state dict and not in
  the other (side: "the checkpoint" or "`target`"), or None."""
  if not (isinstance(saved, dict) and isinstance(target, dict)):
    return None
  for extra, where in (
    (saved.keys() - target.keys(), "the checkpoint"),
    (target.keys() - saved.keys(), "`target`"),
  ):
    if extra:
      return path + (sorted(extra)[0],), where
  for key in saved:
    found = _node_difference(saved[key], target[key], path + (key,))
    if found:
      return found
  return None


# ----------------------------------------------------------------------------------------
# FlatParams layouts: recorded with a checkpoint, compared when restoring.


def _flat_nodes(tree: Any) -> list:
  """``[(key path, FlatParams), ...]`` for every FlatParams in ``tree``, in its order."""
  nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, FlatParams))
  return [(key_path, node) for key_path, node in nodes[0] if isinstance(node, FlatParams)]


def _layout(flat: FlatParams) -> list:
  """A FlatParams' layout: ``[path, shape, bucket, dtype, offset]`` for each model leaf."""
  layout = flat.layout
  return [
    [
      leaf.path,
      [int(n) for n in leaf.shape],
      layout.buckets[leaf.bucket],
      np.dtype(layout.dtypes[leaf.bucket]).name,
      int(leaf.offset),
    ]
    for leaf in layout.leaves
  ]


def flat_layouts(tree: Any) -> list:
  """The layout of every :class:`~optcompose.FlatParams` in ``tree``, as a checkpoint records it.

  A FlatParams is saved as its buffers, one per bucket; its layout says which model leaf each
  slot of them holds. :func:`save_checkpoint` and :func:`save_orbax_checkpoint` record it
  with the checkpoint, and a restore compares it with the template's (a renamed or resized
  leaf would otherwise move values into another leaf's slots). Orbax's own savers (a
  ``CheckpointManager``, ``ocp.StandardCheckpointer``) save only the buffers: save this
  record beside them (``ocp.args.JsonSave(flat_layouts(state))``) and give it back as
  ``layouts=`` to :func:`check_against_template` or :func:`restore_orbax_checkpoint`.

  Args:
    tree: any pytree: a training state, an optimizer state, a template.

  Returns:
    ``[[path, layout], ...]``, one entry per FlatParams: its path in ``tree`` as a list of key
    names (as Orbax's metadata spells them) and its layout, a list of ``[path, shape, bucket,
    dtype, offset]`` per model leaf. Lists, strings and ints only (``json.dumps`` writes it
    as it is); empty for a tree without FlatParams.

  Examples:
    >>> import jax.numpy as jnp, optcompose as oc
    >>> flat = oc.flat_params({"b": jnp.zeros(2), "w": jnp.ones((2, 3))})
    >>> [(path, layout)] = flat_layouts({"params": flat})  # one FlatParams, at ['params']
    >>> path, layout[1]  # the leaf ['w']: path, shape, bucket, dtype, offset
    (['params'], ["['w']", [2, 3], 'float32', 'float32', 2])
  """
  return [
    [[otree.key_name(k) for k in key_path], _layout(flat)] for key_path, flat in _flat_nodes(tree)
  ]


flat_layouts.__module__ = "optcompose.checkpoint"  # defined here for the checks; public there

_EXPECTED = "[path, layout] pairs (a layout: a list of [path, shape, bucket, dtype, offset])"


def _is_layout_leaf(entry: Any) -> bool:
  """Whether ``entry`` is a layout's ``[path, shape, bucket, dtype, offset]``."""
  return (
    isinstance(entry, (list, tuple))
    and len(entry) == 5
    and isinstance(entry[0], str)
    and isinstance(entry[1], (list, tuple))
    and all(_is_int(n) for n in entry[1])
    and isinstance(entry[2], str)
    and isinstance(entry[3], str)
    and _is_int(entry[4])
  )


def _malformed(record: Any) -> Optional[str]:
  """What is wrong with a layouts record (None: a list of ``[path, layout]`` pairs)."""
  problem = _record_problem(record, _EXPECTED)
  if problem is not None:
    return problem
  for entry in record:
    if not (isinstance(entry[1], (list, tuple)) and all(_is_layout_leaf(e) for e in entry[1])):
      at = _saved_keystr(tuple(entry[0]))
      return f"the layout of `{at}` is {entry[1]!r:.80}, expected {_EXPECTED}"
  return None


def _check_layouts(
  fn: str, where: Optional[PathLike], saved: Optional[list], target: Any, given: Any = None
) -> None:
  """Check every FlatParams of ``target`` against the layout recorded at its path: in
  ``saved`` (the checkpoint's record; None where it keeps none) and in ``given`` (the
  ``layouts`` argument; None if not given).

  Raises:
    CheckpointMismatchError: a recorded layout differs from the target's, naming the first
      model leaf that differs.
    ValueError: neither record has a layout at a FlatParams' path (its buffers alone cannot
      show where each leaf lies), or ``given`` is not a layouts record.
    CheckpointCorruptError: ``saved`` is not a layouts record.
  """
  tables = []
  for source, record in (("the checkpoint", saved), ("`layouts`", given)):
    if record is None:
      continue
    problem = _malformed(record)
    if problem and source == "the checkpoint":
      raise _damaged_record(fn, where or "", "layouts", problem)
    if problem:
      raise ValueError(
        f"{fn}: `layouts` is not a layouts record (what flat_layouts returns): {problem}."
      )
    table = {tuple(p): [[e[0], list(e[1]), *e[2:]] for e in layout] for p, layout in record}
    tables.append((source, table))
  name = "" if where is None else f" {os.fspath(where)}"
  nodes = _flat_nodes(target)
  shown = {tuple(otree.key_name(k) for k in p): otree.path_str(p) for p, _ in nodes}
  for key_path, flat in nodes:
    path, want = tuple(otree.key_name(k) for k in key_path), _layout(flat)
    found = [(source, table[path]) for source, table in tables if path in table]
    for source, got in found:
      _same_layout(fn, name, source, otree.path_str(key_path), got, want)
    if found:
      continue
    at = f"the FlatParams at `{otree.path_str(key_path)}` of `target`"
    if given is not None:
      paths = ", ".join(f"`{shown.get(p) or _saved_keystr(p)}`" for p in tables[-1][1])
      raise ValueError(
        f"{fn}: `layouts` records no layout for {at} (it records {paths or 'none'}), nor "
        f"does the checkpoint{name}: pass the flat_layouts of the tree that was saved."
      )
    raise ValueError(
      f"{fn}: the checkpoint{name} records no layout for {at}: written by Orbax alone (a "
      "CheckpointManager, StandardCheckpointer) or by an older optcompose, it holds only the "
      "FlatParams' buffers, which cannot show which model leaf each slot belongs to (a "
      "renamed or resized leaf would restore into another leaf's slots). Save "
      "flat_layouts(state) beside the checkpoint and pass it back as `layouts=`; or, if you "
      "know that the model's leaves (names, shapes, dtypes, labels) are unchanged since the "
      "save, pass layouts=flat_layouts(target)."
    )


def _same_layout(fn: str, name: str, source: str, at: str, got: list, want: list) -> None:
  """Raise CheckpointMismatchError naming the first model leaf where two layouts differ."""
  if got == want:
    return
  i = next(i for i in range(max(len(got), len(want))) if got[i : i + 1] != want[i : i + 1])
  g, w = (got[i] if i < len(got) else None), (want[i] if i < len(want) else None)
  describe = lambda e: (
    "no leaf"
    if e is None
    else f"`{e[0]}` of shape {tuple(e[1])} at offset {e[4]} of bucket {e[2]!r}"
  )
  raise CheckpointMismatchError(
    f"{fn}: the checkpoint{name} does not match `target`: the FlatParams at `{at}` has "
    f"another layout: its leaf {i} is {describe(g)} in {source} but {describe(w)} in "
    "`target` (a FlatParams restores only into the layout it was saved with: build the "
    "template with flat_params of the same tree)."
  )


# ----------------------------------------------------------------------------------------
# A FlatParams in Flax's serialization (msgpack files): its buffers by bucket name.


def _flat_to_state_dict(flat: FlatParams) -> dict:
  """A FlatParams as Flax's serialization stores it: ``{bucket name: buffer}``."""
  from flax import serialization

  return {
    name: serialization.to_state_dict(buf) for name, buf in zip(flat.layout.buckets, flat.buffers)
  }


def _flat_from_state_dict(flat: FlatParams, state: dict) -> FlatParams:
  from flax import serialization

  return FlatParams(
    tuple(
      serialization.from_state_dict(buf, state[name], name=name)
      for name, buf in zip(flat.layout.buckets, flat.buffers)
    ),
    flat.layout,
  )
