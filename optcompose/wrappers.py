"""Wrappers: live hyperparameters, and reading the hyperparameters in force.

``inject_hyperparams(factory)(**kwargs)`` builds any optimizer so that its numeric
hyperparameters live in the optimizer *state* as arrays::

    tx = inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=1e-4)
    state = tx.init(params)
    state = set_hyperparams(state, learning_rate=3e-4)   # no recompilation of the step
    current_hyperparams(state)  # {'learning_rate': Array(3e-4), 'b1': ..., ...}

Each update evaluates the schedules at the state's count, rebuilds the inner transformation
from the values (a Python-level closure, free under ``jit``), and records the values it used.
The transformation object itself holds no arrays, so it works as a static attribute of Flax's
``nnx.Optimizer``. Hyperparameters are stored as float32 (float64 under x64; ``hyperparam_dtype``) whatever
the parameters' dtype: with bfloat16 parameters, ``b2 = 0.999`` is not rounded to 1.0.
"""

from __future__ import annotations

import functools
import re
import inspect
import numbers
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from optcompose._core import (
    GradientTransformation, ScheduledState, _as_transformation, _takes_extra, as_hyperparam,
    checks_done, default_float, forward_extra, init_empty_state, safe_increment, wants_raw_grads, zero_count,
)
from optcompose.flat import per_leaf_values
from optcompose.tree import broadcast_prefix, first_difference, resolve_mask


class InjectHyperparamsState(NamedTuple):
  """Optax's field names: the step count, the hyperparameters in force, the inner state."""

  count: jax.Array
  hyperparams: dict
  inner_state: Any


def _is_static_by_name(name: str) -> bool:
  return name == "mask" or name.endswith("_mask")


def inject_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    static_args: Union[str, Iterable[str]] = (),
    hyperparam_dtype: Optional[Any] = None,
) -> Callable[..., GradientTransformation]:
  """Wrap an optimizer factory so that its numeric hyperparameters live in the state.

  Args:
    inner_factory: e.g. ``optcompose.adamw`` or any function returning a transformation.
    static_args: names of arguments to keep out of the state (they are baked in). Arguments
      named ``mask`` or ``*_mask``, booleans, ``None`` and dtypes are always static.
    hyperparam_dtype: the stored dtype (by default float32, or float64 under x64, whatever
      the parameters' dtype).

  Returns:
    A factory with ``inner_factory``'s signature. Numbers become float arrays in
    ``state.hyperparams``; callables (other than masks) are schedules, evaluated at the
    state's count before each update.
  """
  static = {static_args} if isinstance(static_args, str) else set(static_args)
  signature = inspect.signature(inner_factory)
  unknown = static - set(signature.parameters)
  if unknown:
    raise ValueError(f"inject_hyperparams: `static_args` {sorted(unknown)} are not parameters "
                     f"of {getattr(inner_factory, '__name__', inner_factory)}.")
  dtype = hyperparam_dtype or default_float()

  @functools.wraps(inner_factory)
  def factory(*args, **kwargs) -> GradientTransformation:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    numeric, schedules, fixed = {}, {}, {}
    for name, value in bound.arguments.items():
      if name in static or _is_static_by_name(name) or isinstance(value, bool) or value is None:
        fixed[name] = value
      elif callable(value) and not isinstance(value, type):
        schedules[name] = value
      elif isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
        numeric[name] = value
      else:
        fixed[name] = value

    def build(values):
      return inner_factory(**fixed, **values)

    def values_at(count, stored):
      values = dict(stored)
      values.update({n: as_hyperparam(s(count), dtype) for n, s in schedules.items()})
      return values

    def init(params):
      count = zero_count()
      values = values_at(count, {n: as_hyperparam(v, dtype) for n, v in numeric.items()})
      return InjectHyperparamsState(count, values, build(values).init(params))

    @wants_raw_grads  # forwarded only if the inner transformation asks for it
    def update(updates, state, params=None, **extra):
      if not isinstance(state, InjectHyperparamsState):
        raise TypeError(f"inject_hyperparams expects an InjectHyperparamsState, "
                        f"got {type(state).__name__}.")
      values = values_at(state.count, state.hyperparams)
      with checks_done():  # the values were checked at init; live changes are the user's
        inner = build(values)
      inner_update = inner.update
      if not _takes_extra(inner_update):
        updates, inner_state = inner_update(updates, state.inner_state, params)
      else:
        updates, inner_state = inner_update(updates, state.inner_state, params,
                                            **forward_extra(inner_update, extra))
      return updates, InjectHyperparamsState(safe_increment(state.count), values, inner_state)

    return GradientTransformation(init, update)

  return factory


def _foreign_injected(node) -> bool:
  """Another library's injection state (Optax's): a ``hyperparams`` dict and an inner state."""
  return (isinstance(getattr(node, "hyperparams", None), dict)
          and hasattr(node, "inner_state") and hasattr(node, "_fields"))


def _hyperparam_states(state) -> list:
  """(path, state) for every state node that records hyperparameters, in tree order."""
  found = []

  def visit(path, node):
    if isinstance(node, (InjectHyperparamsState, ScheduledState)) or _foreign_injected(node):
      found.append((path, node))
      inner = node.inner if isinstance(node, ScheduledState) else node.inner_state
      visit(path + ("inner",), inner)
    elif hasattr(node, "_fields") and type(node).__name__ == "ReduceLROnPlateauState":
      found.append((path, node))
    elif isinstance(node, (tuple, list)):
      for i, child in enumerate(node):
        visit(path + (str(i),), child)
    elif isinstance(node, dict):
      for k, child in node.items():
        visit(path + (str(k),), child)

  visit((), state)
  return found


def current_hyperparams(state) -> dict:
  """The hyperparameters in force, read from any optimizer state, as ``{name: scalar}``.

  Finds every live or scheduled hyperparameter in the state tree: those of
  :func:`inject_hyperparams` and of every transformation built with a schedule (the values
  used by the latest update; before the first update, step 0's), and the multiplier of
  ``reduce_on_plateau`` (as ``plateau_scale``). A name met twice (e.g. a scheduled learning
  rate used by both the learning-rate step and a proximal step) is returned once under its
  name and again under ``"<path>/<name>"``. Constant numbers are not stored in a state: give
  a schedule or use :func:`inject_hyperparams` to see them here.
  """
  out = {}
  for path, node in _hyperparam_states(state):
    if type(node).__name__ == "ReduceLROnPlateauState":
      items = {"plateau_scale": node.scale}.items()
    else:
      items = node.hyperparams.items()
    for name, value in items:
      key = name if name not in out else "/".join(path + (name,))
      out[key] = value
  return out


def set_hyperparams(state, **values) -> Any:
  """Return ``state`` with live hyperparameters replaced (same dtype and shape, so a jitted
  step does not recompile). Raises if a name is not a live hyperparameter of the state."""
  remaining = dict(values)

  def replace(node):
    if isinstance(node, InjectHyperparamsState):
      new = dict(node.hyperparams)
      for name in list(remaining):
        if name in new:
          old = jnp.asarray(new[name])
          new[name] = jnp.asarray(remaining.pop(name), dtype=old.dtype).reshape(old.shape)
      return node._replace(hyperparams=new, inner_state=replace(node.inner_state))
    if isinstance(node, ScheduledState):
      return node._replace(inner=replace(node.inner))
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
      return tuple(replace(c) for c in node)
    return node

  new_state = replace(state)
  if remaining:
    live = sorted({n for _, s in _hyperparam_states(state) if isinstance(s, InjectHyperparamsState)
                   for n in s.hyperparams})
    raise KeyError(f"set_hyperparams: {sorted(remaining)} are not live hyperparameters of this "
                   f"state (live: {live}; build the optimizer with inject_hyperparams).")
  return new_state


# ---------------------------------------------------------------------------------------
# Masks and partitions.


class MaskedNode(NamedTuple):
  """Stands in for a leaf that a masked transformation does not see (it holds nothing)."""


class MaskedState(NamedTuple):
  inner_state: Any


def _is_masked(x) -> bool:
  return isinstance(x, MaskedNode)


def _keep(tree, on):
  """``tree`` with the leaves where ``on`` is False replaced by MaskedNode."""
  return jax.tree.map(lambda x, keep: x if keep else MaskedNode(), tree, on)


def masked(inner: GradientTransformation, mask, *,
           mask_compatible_extra_args: bool = False) -> GradientTransformation:
  """Apply ``inner`` only to the leaves where ``mask`` is True; the others pass unchanged.

  ``mask`` is a tree of Python bools with the parameters' structure (or a prefix of it), or a
  callable returning one from the parameters (at ``init``) and from the updates (at
  ``update``, as in Optax). The inner transformation never sees the other leaves, so it
  keeps no state and does no work for them. With ``mask_compatible_extra_args``, keyword
  arguments that have the updates' tree structure are masked too (Optax's option).
  """
  inner = _as_gt(inner)

  def init(params):
    return MaskedState(inner.init(_keep(params, _resolve(mask, params))))

  @wants_raw_grads
  def update(updates, state, params=None, **extra):
    on = _resolve(mask, updates)
    kept_params = None if params is None else _keep(params, _resolve_like(on, params))
    structure = jax.tree.structure(updates)
    extra = {k: _keep(v, on) if (k == "raw_grads" or mask_compatible_extra_args)
             and jax.tree.structure(v) == structure else v for k, v in extra.items()}
    new, inner_state = inner.update(_keep(updates, on), state.inner_state, kept_params,
                                    **forward_extra(inner.update, extra))
    out = jax.tree.map(lambda keep, n, u: n if keep else u, on, new, updates,
                       is_leaf=_is_masked)
    return out, MaskedState(inner_state)

  return GradientTransformation(init, update)


def _as_gt(t) -> GradientTransformation:
  return _as_transformation(t, 0)


def _resolve(mask, tree):
  return resolve_mask(mask, tree)


def _resolve_like(on, tree):
  """A resolved mask for ``tree`` (e.g. params with wrapper nodes) from one for updates."""
  try:
    return jax.tree.broadcast(on, tree)
  except (ValueError, TypeError):
    raise ValueError(f"`params` do not have the structure of `updates`: "
                     f"{first_difference(tree, on)}.") from None


class PartitionState(NamedTuple):
  inner_states: dict


def partition(transforms: dict, param_labels, *,
              mask_compatible_extra_args: bool = False) -> GradientTransformation:
  """Apply ``transforms[label]`` to the leaves labelled ``label`` (Optax's ``partition``).

  ``param_labels`` is a tree of labels with the parameters' structure (or a prefix), or a
  callable returning one (see :func:`labels_from_paths`). Every label must name a
  transformation; a transformation with no leaves is an error. Use :func:`set_to_zero` for
  frozen leaves: they then cost neither state nor computation.
  """
  if not isinstance(transforms, dict) or not transforms:
    raise TypeError("partition: `transforms` must be a non-empty dict {label: transformation}.")

  def labels_for(tree):
    full = per_leaf_values(param_labels, tree, "param_labels", lambda labels, target:
                           broadcast_prefix(labels, target, "param_labels", "the parameter tree"))
    for path, label in jax.tree_util.tree_flatten_with_path(full)[0]:
      if label not in transforms:
        raise ValueError(f"partition: leaf {jax.tree_util.keystr(tuple(path))} has label "
                         f"{label!r}, which names no transformation (labels: {sorted(transforms)}).")
    return full

  def mask_for(label):
    return lambda tree: jax.tree.map(lambda l: l == label, labels_for(tree))

  inners = {label: masked(tx, mask_for(label), mask_compatible_extra_args=mask_compatible_extra_args)
            for label, tx in transforms.items()}

  def init(params):
    used = set(jax.tree.leaves(labels_for(params)))
    unused = sorted(set(transforms) - used)
    if unused:
      raise ValueError(f"partition: transformations {unused} have no leaves labelled for them.")
    return PartitionState({label: tx.init(params) for label, tx in inners.items()})

  @wants_raw_grads
  def update(updates, state, params=None, **extra):
    new_states = {}
    for label, tx in inners.items():
      updates, new_states[label] = tx.update(updates, state.inner_states[label], params, **extra)
    return updates, PartitionState(new_states)

  return GradientTransformation(init, update)


def set_to_zero() -> GradientTransformation:
  """Replace the updates by zeros (frozen parameters); no state."""

  def update(updates, state, params=None, **extra):
    del params, extra
    return jax.tree.map(jnp.zeros_like, updates), state

  return GradientTransformation(init_empty_state, update)


def _path_string(path) -> str:
  """``keystr`` of a path without Flax ``Variable``'s trailing ``.value``."""
  keys = list(path)
  while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return jax.tree_util.keystr(tuple(keys))


def labels_from_fn(fn: Callable[[str, Any], Any]) -> Callable[[Any], Any]:
  """A labels (or mask) callable from ``fn(path, leaf)``; ``path`` is e.g. ``"['dense']['bias']"``
  (a Flax ``Variable``'s ``.value`` is left out, so the same labels serve ``nnx.State``)."""
  def labels(tree):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(_path_string(p), x), tree)
  return labels


def labels_from_paths(rules, default=None) -> Callable[[Any], Any]:
  """Label each leaf by the first ``(regex, label)`` rule whose regex is found in its path.

  Example: ``labels_from_paths([(r"bias|scale", "no_decay")], default="decay")``. A leaf that
  no rule matches gets ``default``; with ``default=None`` that is an error naming the path.
  """
  compiled = [(re.compile(pattern), label) for pattern, label in rules]

  def label(path, leaf):
    for pattern, lab in compiled:
      if pattern.search(path):
        return lab
    if default is None:
      raise ValueError(f"labels_from_paths: no rule matches {path} and there is no default.")
    return default

  return labels_from_fn(label)


def mask_from_paths(include=None, exclude=None) -> Callable[[Any], Any]:
  """A mask callable: True where the path matches ``include`` (default: every path) and does
  not match ``exclude``. E.g. ``adamw(..., mask=mask_from_paths(exclude=r"bias|scale"))``."""
  inc = re.compile(include) if include is not None else None
  exc = re.compile(exclude) if exclude is not None else None
  return labels_from_fn(lambda path, _: bool((inc is None or inc.search(path))
                                             and not (exc is not None and exc.search(path))))
