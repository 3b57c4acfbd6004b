"""Masking combinators: apply a transformation to some leaves only, or a different
transformation to each group of leaves.

::

    masked(inner, mask)                      inner on the leaves where mask is True
    partition({label: tx, ...}, labels)      tx on the leaves labelled label

The inner transformation never sees the other leaves: it keeps no state and does no work
for them. As in Optax, a mask (or labels) given as a prefix of the parameters replaces each
unselected *subtree* by one :class:`MaskedNode` in the inner transformation's view (mask
``{'b': False}`` on ``{'b': {'x': .., 'y': ..}}`` gives ``{'b': MaskedNode()}``), so the
inner state has Optax's layout. Masks and labels are validated by :mod:`optcompose.masks`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from optcompose.core import (
  INNER,
  INNER_PAIR,
  LABELS,
  MASK,
  FLAG,
  GradientTransformation,
  StateMismatchError,
  as_transformation,
  expect_state,
  public,
)
from optcompose.masks import broadcast_prefix, per_leaf_values, resolve_mask, searched_model
from optcompose.tree import first_difference


class MaskedNode(NamedTuple):
  """Stands in for a leaf that a masked transformation does not see (it holds nothing)."""


class MaskedState(NamedTuple):
  inner_state: Any


def _is_masked(x) -> bool:
  return isinstance(x, MaskedNode)


def _keep(tree, on):
  """``tree`` with each subtree where ``on`` (a prefix of ``tree``) is False replaced by one
  MaskedNode (Optax's ``mask_pytree``)."""
  return jax.tree.map(lambda keep, x: x if keep else MaskedNode(), on, tree)


def _prefix(values, tree, name: str, check):
  """``values`` (a mask or labels, or a callable returning one) evaluated for ``tree`` and
  validated by ``check(values, target)`` (which broadcasts it to ``target`` and raises the
  named errors), kept as the prefix it was given as: Optax's layout of masked subtrees. A
  registered layout (FlatParams) gets one value per bucket instead (its spread)."""

  def broadcast(values, target):
    try:
      full = check(values, target)
    except ValueError:  # a static mask finer than a subtree an outer mask hid: collapse it
      values = _collapsed(values, target)
      full = check(values, target)
    return values if target is tree else full

  return per_leaf_values(values, tree, name, broadcast)


def _collapsed(values, tree):
  """``values`` with its subtree at each MaskedNode of ``tree`` (hidden by an outer mask)
  replaced by False; ``values`` itself if that does not fit (the caller's error stands)."""
  if not any(_is_masked(x) for x in jax.tree.leaves(tree, is_leaf=_is_masked)):
    return values
  try:
    return jax.tree.map(
      lambda x, v: False if _is_masked(x) else v, tree, values, is_leaf=_is_masked
    )
  except (ValueError, TypeError):
    return values


def _is_params_placeholder(params) -> bool:
  """Whether ``params`` is the stand-in ``optax.tree.map_params`` (ours is Optax's) passes to
  ``init`` to find the copies of the parameters in a state: a mask cannot apply to it, so
  the inner transformation gets it whole (as Optax's ``masked`` does)."""
  from optax.tree_utils import _state_utils  # Optax's private class: absent -> never it

  placeholder = getattr(_state_utils, "_ParamsPlaceholder", None)
  return placeholder is not None and isinstance(params, placeholder)


def _mask_prefix(mask, tree):
  """The boolean mask for ``tree`` as a prefix of it (see :func:`_prefix`)."""
  on = _prefix(mask, tree, "mask", lambda values, target: resolve_mask(values, target))
  return jax.tree.map(bool, on)


@public("wrapper", optax="masked", inner=INNER, mask=MASK, mask_compatible_extra_args=FLAG)
def masked(
  inner: GradientTransformation, mask, *, mask_compatible_extra_args: bool = False
) -> GradientTransformation:
  """Apply ``inner`` only to the leaves where ``mask`` is True; the others pass unchanged.

  Update, per leaf l: ``u_l <- inner(u restricted to the masked leaves)_l`` where
  ``mask_l``, else ``u_l``.

  Args:
    inner: the transformation (optcompose's or Optax's).
    mask: a tree of Python bools with the parameters' structure (or a prefix of it), or a
      callable returning one from the parameters (at ``init``) and from the updates (at
      ``update``, as in Optax).
    mask_compatible_extra_args: also mask the keyword arguments that have the updates' tree
      structure (Optax's option).

  Returns:
    A transformation with state :class:`MaskedState`; the inner transformation keeps no
    state and does no work for the other leaves. In its view each subtree where the mask
    (as given, a prefix or not) is False is one :class:`MaskedNode`, so its state has
    Optax's layout. A static mask finer than a subtree an outer ``masked``/``partition``
    already hid is accepted (Optax's raises there).

  References:
    Optax's ``optax.masked`` (same arguments and state layout).
  """
  inner = as_transformation(inner, "masked")

  def init(params):
    if _is_params_placeholder(params):  # optax.tree.map_params finding the params' copies
      return MaskedState(inner.init(params))
    with searched_model(params):  # path patterns inside are checked against all of params
      return MaskedState(inner.init(_keep(params, _mask_prefix(mask, params))))

  def update(updates, state, params=None, **extra):
    expect_state(state, MaskedState, "masked")
    on = _mask_prefix(mask, updates)
    kept_params = None if params is None else _keep_like(params, on)
    if mask_compatible_extra_args:
      structure = jax.tree.structure(updates)
      extra = {
        k: _keep(v, on) if jax.tree.structure(v) == structure else v for k, v in extra.items()
      }
    with searched_model(updates):
      new, inner_state = inner.update(_keep(updates, on), state.inner_state, kept_params, **extra)
    out = jax.tree.map(lambda keep, n, u: n if keep else u, on, new, updates)
    return out, MaskedState(inner_state)

  return GradientTransformation(init, update)


def _keep_like(tree, on):
  """:func:`_keep` for ``tree`` (e.g. params with wrapper nodes) from a mask for updates."""
  try:
    return _keep(tree, on)
  except (ValueError, TypeError):
    raise ValueError(
      f"`params` do not have the structure of `updates`: {first_difference(tree, on)}."
    ) from None


class PartitionState(NamedTuple):
  inner_states: dict


def _member(tx, label) -> GradientTransformation:
  """``transforms[label]`` of :func:`partition` as a transformation, or a TypeError naming it."""
  try:
    return as_transformation(tx, "partition")
  except TypeError:
    raise TypeError(
      f"partition: `transforms[{label!r}]` is {type(tx).__name__}, not a gradient "
      "transformation (an object with callable `init` and `update`)."
    ) from None


@public(
  "wrapper",
  optax="partition",
  transforms=INNER_PAIR,
  param_labels=LABELS,
  mask_compatible_extra_args=FLAG,
)
def partition(
  transforms: dict, param_labels, *, mask_compatible_extra_args: bool = False
) -> GradientTransformation:
  """Apply ``transforms[label]`` to the leaves labelled ``label`` (Optax's ``partition``).

  Update, per leaf l: ``u_l <- transforms[label_l](u restricted to label_l's leaves)_l``.

  Args:
    transforms: ``{label: transformation}``. A label no leaf has is allowed (as in
      Optax: a recipe may name a group a model lacks); its transformation then sees a tree
      without leaves, and its state is what its ``init`` gives for that tree (a count, say).
    param_labels: a tree of labels with the parameters' structure (or a prefix), or a
      callable returning one (see :func:`optcompose.labels_from_paths`). Every label must
      name a transformation.
    mask_compatible_extra_args: as in :func:`masked`.

  Returns:
    A transformation with state :class:`PartitionState` (``inner_states``: one
    :class:`MaskedState` per label, whose inner state sees one :class:`MaskedNode` for each
    subtree of another label, as in Optax).
    Use :func:`optcompose.set_to_zero` for frozen leaves: they then cost neither state nor
    computation.

  Raises:
    TypeError: ``transforms`` is not a non-empty dict, or its labels are not mutually
      comparable (e.g. 0 and "x": JAX sorts the state's dict keys); a value of ``transforms``
      that is not a transformation (naming ``transforms[label]``); a label leaf that is
      unhashable (from ``init``/``update``). ValueError: a leaf's label names no
      transformation (from ``init``/``update``).

  References:
    Optax's ``optax.partition`` (formerly ``optax.multi_transform``).
  """
  if not isinstance(transforms, dict) or not transforms:
    raise TypeError("partition: `transforms` must be a non-empty dict {label: transformation}.")
  known = sorted(transforms, key=repr)  # for messages: any labels, listed the same each time
  try:
    sorted(transforms)
  except TypeError:  # the state is a dict keyed by label: JAX sorts its keys to flatten it
    raise TypeError(
      f"partition: the labels of `transforms` must be mutually comparable (one "
      f"type, e.g. all str or all int: JAX sorts the state's dict keys), got "
      f"{known}."
    ) from None

  def checked(labels, target):
    full = broadcast_prefix(labels, target, "param_labels", "the parameter tree")
    for path, label in jax.tree_util.tree_flatten_with_path(full)[0]:
      where = jax.tree_util.keystr(tuple(path))
      try:
        found = label in transforms
      except TypeError:  # unhashable, e.g. an array
        raise TypeError(
          f"partition: `param_labels{where}` is {type(label).__name__}, which "
          f"cannot be a label (labels: {known})."
        ) from None
      if not found:
        raise ValueError(
          f"partition: leaf {where} has label "
          f"{label!r}, which names no transformation (labels: {known})."
        )
    return full

  def mask_for(label):  # a prefix of the tree where the labels are one (Optax's layout)
    return lambda tree: jax.tree.map(
      lambda l: l == label, _prefix(param_labels, tree, "param_labels", checked)
    )

  inners = {
    label: masked(
      _member(tx, label), mask_for(label), mask_compatible_extra_args=mask_compatible_extra_args
    )
    for label, tx in transforms.items()
  }

  def init(params):
    return PartitionState({label: tx.init(params) for label, tx in inners.items()})

  def update(updates, state, params=None, **extra):
    expect_state(state, PartitionState, "partition")
    new_states = {}
    for label, tx in inners.items():
      try:
        updates, new_states[label] = tx.update(updates, state.inner_states[label], params, **extra)
      except StateMismatchError as e:  # name the group (a state kept from other transforms)
        raise e.at(f".inner_states[{label!r}]") from None
    return updates, PartitionState(new_states)

  return GradientTransformation(init, update)


__all__ = ["MaskedNode", "MaskedState", "PartitionState"]  # and the builders it registers
