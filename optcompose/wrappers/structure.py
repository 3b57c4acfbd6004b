"""Structural wrappers, with Optax's names: a chain with named states, freezing, one flat
vector for the inner transformation, and partition's former name.

::

    named_chain(("name", tx), ...)            chain; the state is {name: tx's state}, in order
    freeze(mask)                              u <- 0 where mask is True
    selective_transform(tx, freeze_mask=m)    tx where m is False, 0 (and no state) elsewhere
    flatten(tx)                               tx on one vector holding every leaf, raveled
    multi_transform(transforms, labels)       partition (its old name, kept as Optax keeps it)
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Hashable, Mapping
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import (
  INNER,
  MASK,
  GradientTransformation,
  StateMismatchError,
  as_transformation,
  chain,
  default_float,
  public,
)
from optcompose.core.explicit import split_count, type_sharding
from optcompose.masks import is_function_of_params, resolve_mask
from optcompose.transforms.scaling import set_to_zero
from optcompose.wrappers.masking import PartitionState, masked, partition

# Optax's former name of PartitionState (``optax.MultiTransformState`` is the same class).
MultiTransformState = PartitionState


def _pairs(args: tuple) -> list:
  """``named_chain``'s ``(name, transformation)`` pairs, checked, as (name, transformation)."""
  pairs = []
  for i, pair in enumerate(args):
    if isinstance(pair, GradientTransformation) or (
      callable(getattr(pair, "init", None)) and callable(getattr(pair, "update", None))
    ):
      raise TypeError(
        f"named_chain: argument {i} is a transformation without a name; give "
        "(name, transformation) pairs: named_chain((\"adam\", adam(1e-3)), ...)."
      )
    if isinstance(pair, (str, bytes)) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise TypeError(
        f"named_chain: argument {i} must be a (name, transformation) pair, got "
        f"{type(pair).__name__} {pair!r:.60}."
      )
    name, tx = pair
    if not isinstance(name, Hashable):
      raise TypeError(
        f"named_chain: the name of argument {i} is {type(name).__name__}, which "
        "cannot be a key of the state (give a string)."
      )
    try:
      pairs.append((name, as_transformation(tx, "named_chain")))
    except TypeError:
      raise TypeError(
        f"named_chain: the transformation named {name!r} (argument {i}) is "
        f"{type(tx).__name__}, not a gradient transformation (an object with "
        "callable `init` and `update`)."
      ) from None
  names = [name for name, _ in pairs]
  repeated = [n for n in dict.fromkeys(names) if names.count(n) > 1]
  if repeated:
    raise ValueError(
      f"named_chain: the names must be unique (each keys a state), but "
      f"{repeated} appear more than once in {names}."
    )
  return pairs


class _TakesPairs(Protocol):
  """``named_chain``'s signature as Optax's, for type checkers too (pyright read the written
  ``args: tuple`` and refused two pairs)."""

  def __call__(self, *args: tuple[Hashable, Any]) -> GradientTransformation: ...


def _pairs_given_positionally(builder) -> _TakesPairs:
  """``builder(args=(...))`` declared as Optax's ``named_chain(*args)``: the registry binds a
  call to the declared signature and passes the bound arguments by keyword."""
  declared = inspect.signature(builder)
  builder.__signature__ = declared.replace(
    parameters=[inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]
  )
  return cast(_TakesPairs, builder)


@public("wrapper", optax="named_chain")
@_pairs_given_positionally
def named_chain(args: tuple = ()) -> GradientTransformation:
  """Apply transformations one after the other, keeping each one's state under its name.

  Update: ``u = t_n(... t_1(g))`` as in :func:`optcompose.chain`; state
  ``OrderedDict(name_1=s_1, ..., name_n=s_n)``, so ``state["name"]`` is that member's.

  Args:
    *args: ``(name, transformation)`` pairs: a unique name (a string, as Optax documents;
      any hashable is accepted) and an optcompose or Optax transformation.

  Returns:
    A transformation whose state is a ``collections.OrderedDict`` from each name to its
    member's state, in the order given (Optax's layout). ``update`` also accepts a plain
    dict with the same names (a restored checkpoint's).

  Raises:
    TypeError: an argument that is not a pair, an unhashable name, or a member that is not a
      transformation (naming it). ValueError: repeated names (naming them), or members
      ordered as :func:`optcompose.chain` refuses (an averager followed by a change).

  References:
    Optax's ``optax.named_chain`` (same argument and state).
  """
  pairs = _pairs(args)
  names = [name for name, _ in pairs]
  try:
    chain(*[tx for _, tx in pairs])  # the member-order rules of chain (averagers last)
  except ValueError as e:
    raise ValueError(f"named_chain ({names}): {e}") from None

  def init(params):
    return collections.OrderedDict((name, tx.init(params)) for name, tx in pairs)

  def update(updates, state, params=None, **extra):
    if not isinstance(state, Mapping) or set(state) != set(names):
      got = (
        f"a {type(state).__name__} with keys {list(state)}"
        if isinstance(state, Mapping)
        else f"a {type(state).__name__}"
      )
      raise ValueError(
        f"named_chain of {names} got {got} as its state; pass the state "
        "returned by this named_chain's init."
      )
    new_state = collections.OrderedDict()
    for name, tx in pairs:
      try:
        updates, new_state[name] = tx.update(updates, state[name], params, **extra)
      except StateMismatchError as e:
        raise e.at(f"[{name!r}]") from None
    return updates, new_state

  return GradientTransformation(init, update)


def _check_static_mask(mask: Any, who: str, name: str) -> None:
  """A TypeError naming ``who``'s ``name`` for a mask that is neither a callable nor a bool
  or tree of bools (its leaves are checked again against the parameters at ``init``)."""
  if is_function_of_params(mask):
    return
  if mask is None:
    raise TypeError(
      f"{who}: `{name}` is None; give a bool, a tree of bools (True: frozen) or "
      "a callable returning one."
    )
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
    ok = isinstance(leaf, (bool, np.bool_)) or (
      isinstance(leaf, (np.ndarray, jax.Array))
      and not isinstance(leaf, jax.core.Tracer)
      and leaf.shape == ()
      and leaf.dtype == bool
    )
    if not ok:
      raise TypeError(
        f"{who}: `{name}{jax.tree_util.keystr(tuple(path))}` is "
        f"{type(leaf).__name__}; the mask must be a bool, a tree of bools (True: "
        "frozen) or a callable returning one."
      )


def _checked_mask(mask, tree, who: str, name: str):
  """``mask`` if it is bools fitting ``tree`` (or a prefix; per bucket for a layout), else
  the error of :func:`optcompose.masks.resolve_mask`, prefixed with ``who``."""
  try:
    resolve_mask(mask, tree, name)
  except (TypeError, ValueError) as e:
    raise type(e)(f"{who}: {e}") from None
  return mask


@public("transformation", optax="freeze", any_dtype=True, mask=MASK)
def freeze(mask) -> GradientTransformation:
  """Zero the updates of the leaves where ``mask`` is True (frozen); pass the others.

  Update, per leaf l: ``u_l <- 0`` where ``mask_l``, else ``u_l``.

  Args:
    mask: a bool (every leaf frozen, or none), a tree of bools with the parameters'
      structure or a prefix of it (True: frozen), or a callable returning one from the
      parameters (as :func:`optcompose.masked` takes).

  Returns:
    ``masked(set_to_zero(), mask)``: state ``MaskedState(EmptyState())``, as Optax's.

  Raises:
    TypeError: a mask leaf that is not a bool (naming its path). ValueError: from
      ``init``, a mask that does not fit the parameters (naming the first difference).

  References:
    Optax's ``optax.freeze`` (same argument and state).
  """
  _check_static_mask(mask, "freeze", "mask")
  tx = masked(set_to_zero(), mask)

  def init(params):  # a mask that does not fit is named as given
    _checked_mask(mask, params, "freeze", "mask")
    return tx.init(params)

  return GradientTransformation(init, tx.update)


def _freeze_labels(freeze_mask):
  """The labels ``selective_transform`` gives ``partition``: "freeze" where the mask is True
  (a tree, or a callable of the parameters returning one)."""

  def labels(mask):
    return jax.tree.map(lambda m: "freeze" if m else "train", mask)

  if not is_function_of_params(freeze_mask):
    return labels(freeze_mask)
  return lambda tree: labels(
    _checked_mask(freeze_mask(tree), tree, "selective_transform", "freeze_mask")
  )


@public("wrapper", optax="selective_transform", optimizer=INNER, freeze_mask=MASK)
def selective_transform(
  optimizer: GradientTransformation, *, freeze_mask
) -> GradientTransformation:
  """Run ``optimizer`` on the leaves where ``freeze_mask`` is False; zero the others.

  Update, per leaf l: ``u_l <- 0`` where ``freeze_mask_l``, else
  ``optimizer(u restricted to the unfrozen leaves)_l``; the optimizer keeps no state for
  the frozen leaves.

  Args:
    optimizer: the transformation for the unfrozen leaves (optcompose's or Optax's).
    freeze_mask: a bool, or a tree of bools with the parameters' structure or a prefix of
      it (True: frozen). A callable returning one from the parameters is accepted too (an
      extension: Optax's maps over the callable itself and freezes everything).

  Returns:
    ``partition({"train": optimizer, "freeze": set_to_zero()}, labels)``: state
    :class:`~optcompose.PartitionState` with those two keys, as Optax's.

  Raises:
    TypeError: ``optimizer`` is not a transformation; a mask leaf that is not a bool
      (naming its path). ValueError: from ``init``, a mask that does not fit the parameters
      (naming the first difference).

  References:
    Optax's ``optax.selective_transform`` (same arguments and state).
  """
  try:
    as_transformation(optimizer, "selective_transform")
  except TypeError:
    raise TypeError(
      f"selective_transform: `optimizer` is {type(optimizer).__name__}, not a "
      "gradient transformation (an object with callable `init` and "
      "`update`)."
    ) from None
  _check_static_mask(freeze_mask, "selective_transform", "freeze_mask")
  tx = partition(
    {"train": optimizer, "freeze": set_to_zero()}, param_labels=_freeze_labels(freeze_mask)
  )
  if is_function_of_params(freeze_mask):
    return tx

  def init(params):  # a static mask that does not fit is named as given
    _checked_mask(freeze_mask, params, "selective_transform", "freeze_mask")
    return tx.init(params)

  return GradientTransformation(init, tx.update)


def _ravel(tree, name: str) -> jax.Array:
  """Every leaf of ``tree`` raveled and joined into one vector, in the leaves' common dtype
  (JAX's standard promotion; an empty float vector for a tree without leaves)."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if split_count(x) > 1:
      raise ValueError(
        f"flatten: `{name}{jax.tree_util.keystr(path)}` is split over the mesh "
        f"({type_sharding(x).spec}, on explicit axes), but flatten joins every leaf into one "
        "new vector, which cannot keep that sharding: use it for single-device or "
        "replicated parameters (the per-leaf path keeps every leaf's sharding)."
      )
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((0,), default_float())
  dtype = otree.promote_types(*[jnp.result_type(x) for x in leaves])
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def _unravel(like, flat: jax.Array):
  """``flat`` split into ``like``'s leaves: their shapes, and their dtypes."""
  leaves, treedef = jax.tree.flatten(like)
  ends = np.cumsum([np.size(x) for x in leaves])[:-1] if leaves else []
  parts = jnp.split(flat, ends) if leaves else []
  return treedef.unflatten(
    [jnp.reshape(part, jnp.shape(x)).astype(jnp.result_type(x)) for part, x in zip(parts, leaves)]
  )


@public("wrapper", optax="flatten", inner=INNER)
def flatten(inner: GradientTransformation) -> GradientTransformation:
  """Run ``inner`` on one vector holding every leaf, raveled and joined in tree order.

  Update: ``u <- unravel(inner(ravel(u), ravel(w)))``; ``inner`` is initialised with
  ``ravel(params)``.

  Args:
    inner: the transformation to run on the flat vector (optcompose's or Optax's).

  Returns:
    A transformation whose state is ``inner``'s state for the vector (no state of its
    own, as Optax's). Fewer, larger arrays: less overhead for many small leaves, at the
    cost of a concatenation and a split per step (see :class:`optcompose.FlatParams` for a
    layout kept across steps instead). Leaves of different dtypes are joined in their
    common dtype and each update is cast back to its leaf's dtype (Optax's keep the common
    dtype); a tree without leaves passes through. Sharding: the vector is a new array, so
    the updates do not keep their leaves' shardings; use ``flatten`` for single-device or
    replicated parameters (as :class:`~optcompose.FlatParams`): a leaf split over explicit
    mesh axes is a ValueError naming it.

  Raises:
    TypeError: ``inner`` is not a transformation.

  References:
    Optax's ``optax.flatten`` (same argument and state).
  """
  try:
    inner = as_transformation(inner, "flatten")
  except TypeError:
    raise TypeError(
      f"flatten: `inner` is {type(inner).__name__}, not a gradient "
      "transformation (an object with callable `init` and `update`)."
    ) from None

  def init(params):
    return inner.init(_ravel(params, "params"))

  def update(updates, state, params=None, **extra):
    flat_params = None if params is None else _ravel(params, "params")
    flat, state = inner.update(_ravel(updates, "updates"), state, flat_params, **extra)
    return _unravel(updates, cast(jax.Array, flat)), state  # inner's updates: a vector

  return GradientTransformation(init, update)


def multi_transform(
  transforms: dict, param_labels, *, mask_compatible_extra_args: bool = False
) -> GradientTransformation:
  """Optax's former name of :func:`optcompose.partition`; new code should use ``partition``.

  Args:
    transforms: as in :func:`optcompose.partition`.
    param_labels: as in :func:`optcompose.partition`.
    mask_compatible_extra_args: as in :func:`optcompose.partition`.

  Returns:
    ``partition(transforms, param_labels, mask_compatible_extra_args=...)`` (its state,
    :class:`MultiTransformState`, is :class:`~optcompose.PartitionState`). No warning:
    Optax 0.2.8 keeps the name without one, and code run with ``-W error`` must not break.

  References:
    Optax's ``optax.multi_transform`` (kept there "for backwards compatibility" as
    ``partition`` itself, without a warning).
  """
  return partition(transforms, param_labels, mask_compatible_extra_args=mask_compatible_extra_args)


# The deprecated alias is not a registered builder (no case, no strategy): a function.
__all__ = ["MultiTransformState", "multi_transform"]  # and the builders it registers
