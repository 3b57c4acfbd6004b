"""One training call, update and apply: :func:`step`, and :func:`with_step`, by which a
transformation offers a faster way to take it.

A gradient transformation must return its updates, and some cannot be fast that way: on XLA
CPU a ``lax.cond`` that returns AdamW's updates costs about 1.4x AdamW, so gradient
accumulation (zero updates on micro-steps) and Lookahead's synchronisations (two copies of
the weights, each read by the other's update) pay for returning updates the parameters could
take directly. Such a transformation attaches a step-level function to its ``update``
(:func:`with_step`); :func:`step` uses it, and otherwise runs ``update`` and
:func:`apply_updates`. The transformation is unchanged (Optax's two fields), so it still
works in ``chain``, ``TrainState`` and ``nnx.Optimizer``. The forms compose where the step
is taken last: ``apply_if_finite``'s and ``with_diagnostics``' take their inner
transformation's step through :func:`step`, and a ``chain`` whose last member has a form
runs the members before it, then that form. Any other wrapper that builds its own
``update`` (``inject_hyperparams``, ``masked``, ``partition``, an Optax combinator, ...)
takes the usual path, and so does :func:`step` on it. :func:`step_train_state` and
:func:`step_nnx` bring :func:`step` to Flax's ``TrainState`` and ``nnx.Optimizer``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from optcompose.core.base import STEP, apply_updates, as_transformation


def with_step(update: Callable, step_fn: Callable) -> Callable:
  """``update``, carrying ``step_fn(grads, opt_state, params, **extra) -> (params,
  opt_state)``: the same training call as ``update`` then :func:`apply_updates`, to
  rounding, that :func:`step` runs instead.

  Args:
    update: a transformation's update function (a function object of this transformation
      alone: the attribute is set on it).
    step_fn: the step-level form.

  Returns:
    ``update`` itself.

  Raises:
    TypeError: ``update`` cannot carry an attribute (a bound method, a builtin).
  """
  try:
    setattr(update, STEP, step_fn)
  except AttributeError:
    raise TypeError(
      f"with_step: `update` must be a function object of its own (a def or a lambda), "
      f"got {type(update).__name__}: a bound method cannot carry the step-level form."
    ) from None
  return update


def step(tx: Any, grads: Any, opt_state: Any, params: Any, **extra) -> tuple:
  """One training call: ``(params, opt_state)`` after ``tx`` takes ``grads``.

  ``updates, opt_state = tx.update(grads, opt_state, params, **extra)`` then
  ``apply_updates(params, updates)``, or, for a transformation that offers one, its
  step-level form, which computes the same (to rounding) with the parameters' update where
  it is cheapest: ``multi_steps`` (a micro-step only accumulates: 0.6x AdamW per call at
  k=4 on XLA CPU, against 1.1x through ``update``), ``lookahead_in_state`` (the
  synchronisation on the two copies alone) and ``apply_if_finite`` (the step inside its
  conditional: a skip writes nothing). The state is the transformation's own either
  way: the two can alternate, and a checkpoint of one resumes with the other.

  Args:
    tx: any gradient transformation (optcompose's or Optax's).
    grads: the gradients.
    opt_state: ``tx``'s state.
    params: the parameters (donate them under ``jax.jit``: they are updated in place).
    **extra: passed on to ``tx.update`` (e.g. ``value=``).

  Returns:
    ``(params, opt_state)``.
  """
  fast = getattr(getattr(tx, "update", None), STEP, None)
  tx = as_transformation(tx, "step")
  if params is None:  # named here, not by whichever member reads them first
    raise ValueError("step: `params` is None; the step updates the parameters.")
  if fast is not None:
    new_params, opt_state = fast(grads, opt_state, params, **extra)

    # Strongly typed, as apply_updates returns them: a weakly typed parameter kept by a
    # skipped or accumulating call would later be promoted otherwise (a float64 gradient of
    # it averaged in float32 beside a float32 accumulator).
    def strong(x):  # a Python number, a weakly typed array or tracer: a strong array
      number = isinstance(x, (int, float, complex)) and not isinstance(x, bool)
      weak = number or getattr(x, "weak_type", False)
      return jnp.asarray(x).astype(jnp.result_type(x)) if weak else x

    return jax.tree.map(strong, new_params), opt_state
  updates, opt_state = tx.update(grads, opt_state, params, **extra)
  return apply_updates(params, updates), opt_state


# Flax's key, in a TrainState's parameters, for the entries its gradients overwrite (fp8
# scaling factors and the like) instead of the optimizer stepping them.
OVERWRITE_WITH_GRADIENT = "_overwrite_with_gradient"


def step_train_state(state: Any, grads: Any, **extra) -> Any:
  """Flax's ``TrainState.apply_gradients(grads=grads)``, through :func:`step`: the new
  ``state`` (``step`` + 1, new ``params`` and ``opt_state``), with the transformation's
  step-level form where it has one (``multi_steps``, ``apply_if_finite``,
  ``lookahead_in_state``).

  Entries of the gradients under Flax's ``"_overwrite_with_gradient"`` key replace the
  parameters' as ``apply_gradients`` does (the optimizer steps ``params["params"]``).

  Args:
    state: a ``flax.training.train_state.TrainState`` (or a subclass, e.g. with
      ``batch_stats``), or any object with its fields (``step``, ``params``, ``tx``,
      ``opt_state``) and ``replace``.
    grads: the gradients, shaped like ``state.params``.
    **extra: a keyword naming another field of ``state`` (a dataclass field, e.g.
      ``batch_stats=``) replaces it, as in ``apply_gradients``; any other is passed on to
      ``tx.update`` (e.g. ``value=``).

  Returns:
    ``state.replace(step=state.step + 1, params=..., opt_state=..., **fields)``.

  Raises:
    TypeError: ``state`` lacks a field, or a keyword names ``step``, ``params``,
      ``opt_state`` or ``tx`` (set by the step itself).
  """
  missing = [f for f in ("step", "params", "tx", "opt_state", "replace") if not hasattr(state, f)]
  if missing:
    raise TypeError(
      f"step_train_state: `state` must be a Flax TrainState (or have its fields); "
      f"{type(state).__name__} has no {', '.join(missing)}."
    )
  names = {f.name for f in dataclasses.fields(state)} if dataclasses.is_dataclass(state) else ()
  fields = {k: v for k, v in extra.items() if k in names}
  extra = {k: v for k, v in extra.items() if k not in names}
  taken = sorted(set(fields) & {"step", "params", "opt_state", "tx"})
  if taken:
    raise TypeError(f"step_train_state: `{taken[0]}` is set by the step; it cannot be passed.")
  params, overwrite = state.params, None
  if isinstance(grads, dict) and OVERWRITE_WITH_GRADIENT in grads:
    params, grads, overwrite = params["params"], grads["params"], grads[OVERWRITE_WITH_GRADIENT]
  params, opt_state = step(state.tx, grads, state.opt_state, params, **extra)
  if overwrite is not None:
    params = {"params": params, OVERWRITE_WITH_GRADIENT: overwrite}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **fields)


def step_nnx(optimizer: Any, model: Any, grads: Any, **extra) -> None:
  """Flax NNX's ``optimizer.update(model, grads)``, through :func:`step`: the model's
  parameters (those ``optimizer.wrt`` selects) and the optimizer's state and step count
  are updated in place, with the transformation's step-level form where it has one.

  Args:
    optimizer: a ``flax.nnx.Optimizer``.
    model: the module it optimizes.
    grads: the gradients, as ``nnx.grad`` returns them.
    **extra: passed on to ``tx.update`` (e.g. ``value=``).

  Returns:
    None. (Flax 0.12's ``optimizer.update`` returns the updates; a step-level form never
    forms them, which is what it saves: to log their norm, wrap the transformation in
    :func:`optcompose.with_diagnostics` and read ``update_norm`` from the state.)
  """
  from flax import nnx  # only here: optcompose does not need Flax

  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
      f"step_nnx: `optimizer` must be a flax.nnx.Optimizer, got {type(optimizer).__name__}."
    )
  # What Optimizer.update reads, in this Flax's own calls (they moved between releases).
  pure = getattr(nnx, "as_pure", None) or nnx.pure
  freeze = getattr(nnx, "freeze", lambda tree: tree)
  graph = {"graph": optimizer.graph} if hasattr(optimizer, "graph") else {}
  params = freeze(pure(nnx.state(model, optimizer.wrt, **graph)))
  grads = freeze(pure(nnx.state(grads, optimizer.wrt, **graph)))
  opt_state = freeze(pure(optimizer.opt_state))
  params, opt_state = step(optimizer.tx, grads, opt_state, params, **freeze(pure(extra)))
  nnx.update(model, params)
  nnx.update(optimizer.opt_state, nnx.state(opt_state, **graph))
  optimizer.step[...] += 1


__all__ = ["step", "step_nnx", "step_train_state", "with_step"]
