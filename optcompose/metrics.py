"""Training metrics read from an optimizer state inside the jitted step, and logged in one transfer.

``metrics(opt_state)`` picks, from any optimizer state, the few values a training log shows,
under short keys that depend only on the structure of the state (so they are the same at
every step). It reads fields and returns the same ``jax.Array`` objects, with no
transfer to the host and no callback. It can be called inside ``jax.jit`` (return the dict
from the train step) and inside ``lax.scan`` (return it as the scan output; the values are
then stacked along a leading axis, one row per step)::

    def train_step(params, opt_state, batch):
      grads = jax.grad(loss)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optcompose.apply_updates(params, updates), opt_state, metrics(opt_state)

    def epoch(carry, batch):
      params, opt_state, logged = train_step(*carry, batch)
      return (params, opt_state), logged

    (params, opt_state), stacked = jax.lax.scan(epoch, (params, opt_state), batches)

Nothing waits for the device until the values are asked for on the host:
:func:`to_host` fetches one dict (or a stacked one) in one ``jax.device_get``, and
:func:`unstack` turns a stacked dict into one dict of Python scalars per step, every k-th
step only if asked. Either suits any writer (CLU's ``write_scalars(step, scalars)``,
TensorBoard's ``add_scalar``, W&B's ``run.log(dict, step=step)``); see
``docs/guides/logging.md``.

Measuring costs nothing here: the values are those the state already holds. To measure the
norms, wrap the optimizer in :func:`optcompose.with_diagnostics` (its ``every_k`` measures
every k-th update only; pick the same rows with ``unstack(stacked, every_k=k)``).
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import jax
import numpy as np
import optax

from optcompose import tree as otree
from optcompose.core import current_hyperparams
from optcompose.recipe.early_stopping import EarlyStoppingState
from optcompose.wrappers.control import MultiStepsState
from optcompose.wrappers.finite import ApplyIfFiniteState
from optcompose.wrappers.diagnostics import LOGGED_AS, DiagnosticsState, _python_scalar
from optcompose.wrappers.measures import leading_clip_norm

# The keys metrics() may return, in this order.
KEYS = (
  "grad_norm",
  "update_norm",
  "param_norm",
  "update_ratio",
  "learning_rate",
  "zero_fraction",
  "nonfinite",
  "step",
  "plateau_scale",
  "skipped_steps",
  "gave_up",
  "best_metric",
  "wait",
  "should_stop",
)

_MEASURED = (
  "grad_norm",
  "update_norm",
  "param_norm",
  "update_ratio",
  "learning_rate",
  "zero_fraction",
  "nonfinite",
)
FIELDS = {key: field for field, key in LOGGED_AS.items()}  # a key's DiagnosticsState field
_FINITE_STATES = (ApplyIfFiniteState, optax.ApplyIfFiniteState)
_THROUGH = (*_FINITE_STATES, MultiStepsState, optax.MultiStepsState)
_ARRAY_LIKE = (jax.Array, np.ndarray, np.generic, numbers.Number)


_KINDS = (DiagnosticsState, EarlyStoppingState) + _FINITE_STATES


def _kind_of(node: Any) -> Any:
  """The kind of state ``node`` is, of those metrics() reads, or None. A state turned into a
  mapping of its fields (Flax NNX's ``nnx.state(opt.opt_state)``, ``nnx.to_pure_dict``) is
  one of its kind too, its empty inner state possibly gone."""
  kind = next((k for k in _KINDS if isinstance(node, k)), None)
  return kind or next((k for k in _KINDS if otree.is_state_mapping(node, k._fields)), None)


def _first_of_each_kind(state: Any) -> dict:
  """``{kind: the first node of that kind}`` over ``state`` (in tree order, the root
  included), for the kinds metrics() reads, a mapping as its NamedTuple; one walk."""
  first: dict = {}
  for _, node in otree.find_nodes(state, lambda node: _kind_of(node) is not None):
    kind = _kind_of(node)
    if not isinstance(node, kind):
      node = kind(**{f: node.get(f) for f in kind._fields})
    first.setdefault(_FINITE_STATES if kind in _FINITE_STATES else kind, node)
  return first


def _value(field: Any) -> jax.Array:
  """A 0-d field of a state as it is held (a Flax ``nnx.Variable``, as in ``nnx.Optimizer``'s
  state, gives the array it wraps)."""
  leaves = jax.tree.leaves(field)
  if len(leaves) != 1 or np.ndim(leaves[0]) != 0:
    raise ValueError(
      f"metrics: expected a scalar field, got {type(field).__name__} with "
      f"leaves of shapes {[np.shape(x) for x in leaves]}."
    )
  return leaves[0]


def _check_state(opt_state: Any) -> None:
  leaves, _ = jax.tree_util.tree_flatten_with_path(opt_state)
  for path, leaf in leaves:
    if not isinstance(leaf, _ARRAY_LIKE):
      raise TypeError(
        f"metrics: `opt_state` must be an optimizer state (a pytree of arrays), but its leaf "
        f"{otree.path_str(path)} is a {type(leaf).__name__}"
        + (
          " (pass the state that init/update return, not the transformation)."
          if callable(leaf)
          else "."
        )
      )


def metrics(opt_state: Any) -> dict:
  """The values of an optimizer state worth logging, as ``{short key: jax.Array}``, jittable.

  The keys, each present when the state holds what it reads:

  ```text
  key             dtype    value, and where it is read
  --------------  -------  -----------------------------------------------------------
  grad_norm       float32  ||g|| of the latest update, from the first DiagnosticsState;
                           without one, the norm stored by a
                           clip_by_global_norm that comes first in the chain
                           (inside apply_if_finite and multi_steps too: there,
                           of the latest real step's mean gradient)
  update_norm     float32  ||u||, the update returned (DiagnosticsState)
  param_norm      float32  ||w||, the parameters the update was computed at
  update_ratio    float32  ||u|| / ||w|| (DiagnosticsState)
  learning_rate   float*   the learning rate of the latest update: the
                           DiagnosticsState's where it knows it; otherwise the
                           first "learning_rate" of current_hyperparams(state)
                           (inject_hyperparams, ours or Optax's, or a scheduled one)
  zero_fraction   float32  fraction of exactly-zero parameters (DiagnosticsState)
  nonfinite       int32    NaN and infinite gradient entries (DiagnosticsState)
  step            int32    updates seen by the DiagnosticsState, the latest included
                           (1 after the first update): the step the row belongs to
  plateau_scale   float*   reduce_on_plateau's multiplier of the learning rate
  skipped_steps   int32    steps apply_if_finite skipped in all (total_notfinite; ours
                           or Optax's)
  gave_up         bool     our apply_if_finite: the limit of consecutive skipped steps
                           was reached
  best_metric     float*   an EarlyStoppingState passed in (as in
                           metrics((opt_state, es_state))): the best metric so far
  wait            int32    early stopping: epochs in a row without improvement
  should_stop     bool     early stopping: training should stop
  ```

  (float*: the dtype the state holds, float32 unless x64 is enabled; a
  ``DiagnosticsState``'s learning rate is float32 always.) The measurements
  (``grad_norm`` to ``step``) are those of :func:`optcompose.with_diagnostics`: wrap the
  optimizer in it to have them. A constant learning rate is stored in no state: pass it to
  ``with_diagnostics`` or build the optimizer under ``inject_hyperparams``. The keys depend
  only on the structure of the state, so a jitted step returning them keeps one signature
  and ``lax.scan`` stacks them. Only the first node of each kind counts, in tree order; a
  state holding none of them gives ``{}``.

  Args:
    opt_state: any pytree holding optimizer states (optcompose's or Optax's, a Flax
      ``TrainState`` or ``nnx.Optimizer``'s ``opt_state``, a tuple with an early-stopping
      state), concrete or traced.

  Returns:
    ``{key: 0-d jax.Array}`` in the order of the table: the state's own arrays (tracers
    inside ``jax.jit``), not copies, and nothing is sent to the host. (A dict that a jitted
    function returns comes back with its keys sorted: JAX orders a dict's keys.)

  Raises:
    TypeError: ``opt_state`` has a leaf that is not an array or a number (a transformation
      passed instead of its state, a string).

  References:
    Optax's ``optax.tree_utils.tree_get`` (reading named values from a state); CLU's
    ``clu.metric_writers`` (short scalar names, one dict per step).
  """
  _check_state(opt_state)
  first, out = _first_of_each_kind(opt_state), {}
  diagnostics = first.get(DiagnosticsState)
  if diagnostics is not None:
    # A field is None where the wrapper could not know it (the learning rate): left out.
    fields = {key: getattr(diagnostics, FIELDS.get(key, key)) for key in _MEASURED}
    out.update({key: _value(field) for key, field in fields.items() if field is not None})
    out["step"] = _value(diagnostics.count)
  elif (norm := leading_clip_norm(opt_state, through=_THROUGH)) is not None:
    # Only a clip that comes first measured the gradients (a later one, other updates);
    # apply_if_finite hands its inner transformation the gradients unchanged, multi_steps
    # their mean over the micro-steps (the norm of the latest real step's).
    out["grad_norm"] = _value(norm)
  hyperparams = current_hyperparams(opt_state)
  if "learning_rate" not in out and "learning_rate" in hyperparams:
    out["learning_rate"] = _value(hyperparams["learning_rate"])
  if "plateau_scale" in hyperparams:
    out["plateau_scale"] = _value(hyperparams["plateau_scale"])
  finite = first.get(_FINITE_STATES)
  if finite is not None:
    out["skipped_steps"] = _value(finite.total_notfinite)
    if "gave_up" in finite._fields:
      out["gave_up"] = _value(finite.gave_up)
  stopping = first.get(EarlyStoppingState)
  if stopping is not None:
    out.update(
      best_metric=_value(stopping.best_metric),
      wait=_value(stopping.wait),
      should_stop=_value(stopping.should_stop),
    )
  return {key: out[key] for key in KEYS if key in out}


def _check_metrics(metrics: Any, fn: str) -> None:
  if not isinstance(metrics, Mapping):
    raise TypeError(
      f"{fn}: `metrics` must be a dict of arrays (what metrics() returns), "
      f"got {type(metrics).__name__}."
    )
  for key, value in metrics.items():
    if not isinstance(key, str):
      raise TypeError(f"{fn}: `metrics` keys must be strings, got {key!r}.")
    if isinstance(value, jax.core.Tracer):
      raise TypeError(
        f"{fn}: `metrics[{key!r}]` is traced: call {fn} outside jax.jit, on "
        "the values the jitted step returns."
      )
    if not isinstance(value, _ARRAY_LIKE):
      raise TypeError(
        f"{fn}: `metrics[{key!r}]` must be an array or a number, got {type(value).__name__}."
      )


def to_host(metrics: Mapping[str, Any]) -> dict:
  """Fetch a dict of metrics to the host in one transfer: Python scalars, or NumPy rows.

  Blocks until the values are computed (this is where a training loop waits for the
  device; call it only on the steps you log).

  Args:
    metrics: ``{key: array}``, e.g. what :func:`metrics` returned from a jitted step, or
      the same dict stacked by ``lax.scan`` (each value with a leading axis of steps).

  Returns:
    ``{key: value}`` in the same order: a 0-d value as a Python ``float``, ``int`` or
    ``bool`` (as its dtype is floating, integer or boolean); a value of rank 1 or more as a
    NumPy array (see :func:`unstack` for one dict per step).

  Raises:
    TypeError: ``metrics`` is not a dict of arrays with string keys, or holds traced values
      (called inside ``jax.jit``).

  References:
    JAX's ``jax.device_get`` (one transfer for a whole pytree).
  """
  _check_metrics(metrics, "to_host")
  values = jax.device_get(list(metrics.values()))
  return {
    key: _python_scalar(v) if np.ndim(v) == 0 else np.asarray(v) for key, v in zip(metrics, values)
  }


def unstack(stacked: Mapping[str, Any], every_k: int = 1) -> list:
  """Split metrics stacked by ``lax.scan`` into one dict of Python scalars per step.

  Args:
    stacked: ``{key: array of shape (steps,)}``, on the device or already on the host
      (:func:`to_host`'s output); fetched in one transfer.
    every_k: keep every k-th row only: where ``stacked`` has a ``"step"`` (what
      :func:`metrics` reads from a ``with_diagnostics`` state: its updates seen, the
      latest included), the rows whose ``step - 1`` is a multiple of k, which with
      ``with_diagnostics(..., every_k=k)`` are exactly the updates it measured, wherever
      the scan started (a second epoch's scan starts at another count); without one, the
      rows 0, k, 2k, ... of this scan.

  Returns:
    ``[{key: float | int | bool}, ...]``, one dict per kept row, each ready for a writer
    (``writer.write_scalars(row["step"], row)``); ``[]`` for an empty dict.

  Raises:
    TypeError: ``stacked`` is not a dict of arrays, or ``every_k`` is not an int.
    ValueError: ``every_k < 1``; a value is not of rank 1, or the lengths differ.

  References:
    JAX's ``jax.lax.scan`` (outputs stacked along a new leading axis).
  """
  if isinstance(every_k, bool) or not isinstance(every_k, (numbers.Integral, np.integer)):
    raise TypeError(f"unstack: `every_k` must be an int, got {type(every_k).__name__}.")
  if every_k < 1:
    raise ValueError(f"unstack: `every_k` must be >= 1, got {every_k}.")
  _check_metrics(stacked, "unstack")
  host = to_host(stacked)
  lengths = {}
  for key, value in host.items():
    if np.ndim(value) != 1:
      raise ValueError(
        f"unstack: `stacked[{key!r}]` must have one axis of steps (as "
        f"lax.scan stacks 0-d metrics), got shape {np.shape(value)}."
      )
    lengths[key] = len(value)
  if len(set(lengths.values())) > 1:
    raise ValueError(f"unstack: the values of `stacked` have different lengths: {lengths}.")
  steps = next(iter(lengths.values()), 0)
  if "step" in host and every_k > 1:
    rows = np.flatnonzero((np.asarray(host["step"]).astype(np.int64) - 1) % every_k == 0)
  else:
    rows = range(0, steps, int(every_k))
  return [{key: _python_scalar(value[i]) for key, value in host.items()} for i in rows]


__all__ = ["metrics", "to_host", "unstack"]
