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
``nnx.Optimizer``. Hyperparameters are stored as float32 (``hyperparam_dtype``) whatever the
parameters' dtype: with bfloat16 parameters, ``b2 = 0.999`` is not rounded to 1.0.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from optcompose._core import _takes_extra
from optcompose._core import (
    GradientTransformation, ScheduledState, as_hyperparam, checks_done, forward_extra,
    safe_increment, wants_raw_grads, zero_count,
)


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
    hyperparam_dtype: the stored dtype (float32 by default, whatever the parameters' dtype).

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
  dtype = hyperparam_dtype or jnp.float32

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


def _hyperparam_states(state) -> list:
  """(path, state) for every state node that records hyperparameters, in tree order."""
  found = []

  def visit(path, node):
    if isinstance(node, (InjectHyperparamsState, ScheduledState)):
      found.append((path, node))
      inner = node.inner_state if isinstance(node, InjectHyperparamsState) else node.inner
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
