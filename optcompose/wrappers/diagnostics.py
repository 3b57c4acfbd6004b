"""Training diagnostics kept in the optimizer state, and a flat dict of them for logging.

``with_diagnostics(inner)`` behaves exactly like ``inner`` (it returns ``inner``'s updates
untouched) and records, at each update, in :class:`DiagnosticsState`. With g the incoming
updates (the gradients when the whole optimizer is wrapped), u the updates ``inner``
returns and w the ``params`` passed to ``update`` (the parameters in force during this
step, before ``u`` is applied)::

    grad_norm     = ||g||                      global L2 norm over all leaves
    update_norm   = ||u||
    param_norm    = ||w||
    update_ratio  = ||u|| / ||w||              0 if u = w = 0; +inf if w = 0 only
    learning_rate = the learning rate used by this update (see below); None if unknown
    zero_fraction = #(w == 0) / size(w)        over all elements of all leaves together
    nonfinite     = #(g is NaN or +-inf)       int32

``zero_fraction`` is measured on the parameters passed in, so the zeros an L1 proximal step
creates at step t show at step t + 1; it is NaN while a parameter is NaN. On
:class:`~optcompose.FlatParams` it counts the model's elements only, not the zeros that pad a
bucket (``pad_to``).

No extra pass where the chain already measures: if ``inner`` *starts* with
``clip_by_global_norm`` (the first member of its chain, through nested chains, schedules
and ``inject_hyperparams``), the norm that clipping stored in its state is ``grad_norm``,
and the gradients are not reduced a second time. Anywhere else in the chain clipping sees
other updates, so ``grad_norm`` is then computed from g.

The learning rate in force (``used_learning_rate``, logged as ``learning_rate``): the first
``learning_rate`` recorded in a ``hyperparams`` dict inside ``inner``'s state (ours or
Optax's ``inject_hyperparams``, or an optimizer of ours given a learning-rate *schedule*),
the value ``inner``'s latest update used (inside ``apply_if_finite`` or ``multi_steps`` too,
whose skipped steps and micro-steps move no schedule); otherwise, given ``learning_rate`` (a
number or a schedule), its value at the wrapper's own step count (0 for the first update,
skipped steps and micro-steps counted); otherwise None (a constant learning rate, and
Optax's schedules, are stored in no state: pass it), and the logs leave the key out (a NaN
marker would trip ``jax_debug_nans`` at every step).

Where to wrap: around ``apply_if_finite`` (inside it, a skipped step is not measured at
all: the wrapped state is kept as it was, ``count``, ``nonfinite`` and the norms stay those
of the latest finite step, so a log keyed on ``step`` writes that row again; only
``skipped_steps`` shows it), and inside ``multi_steps``, ``MultiSteps(with_diagnostics(
adamw(...)), k)``: the real steps are then measured, on the mean gradient (around it,
``grad_norm`` is one micro-batch's while a leading clip's norm is the mean's, and the
micro-steps record ``update_norm`` 0). At ``init`` the measurements are 0 and the learning
rate is the first step's.

Cost: the measurements read the gradients and the parameters once more, and run ``inner``
a second time for the updates' norm (its results discarded), all inside one ``lax.cond``
that runs before the step (XLA then updates the donated parameters and state in place: see
:mod:`optcompose.core.ordering`). So ``update_norm`` is the norm of that second run's
updates: the same arithmetic as the returned ones, compiled apart (equal to float32
rounding; with bfloat16 parameters, to bfloat16 rounding of the updates, 1e-4 to 5e-4
relative under ``jit``), and a measured update runs whatever ``inner`` evaluates twice (a
line search's ``value_fn`` included). AdamW on 8M float32 parameters, donated, on XLA CPU:
about 2.5-3.5x the bare step when measuring every update (2.65x in the latest
``make bench``), 1.1-1.25x on the updates that ``every_k`` skips (so 1.1-1.3x on average
with ``every_k=10``; see docs/performance.md). Compiling takes about 2-3.5x the inner
step's time (it is traced twice; the most on trees of many small leaves). In nanoGPT's
whole training step (6 layers of width 384, 76 leaves, on XLA CPU) ``every_k=10`` cost 7-13%
of the step on average and 1.6-2x its compile time (docs/performance.md, "A whole training
step"). Memory: about two parameter-sized temporaries more (the rerun's updates). Leaves
under 2^14 elements are read without that ordering (a copy of them costs microseconds).

:func:`optcompose.step` on a ``with_diagnostics`` transformation measures the same way, then
takes ``inner``'s step through :func:`optcompose.step`, so the step-level form of the
wrapped optimizer (``apply_if_finite``, ``multi_steps``, ``lookahead_in_state``) is kept.

Logging any optimizer state -- with or without diagnostics, optcompose's or Optax's::

    diagnostics_dict(state)
    # {"count": 12, "grad_norm": 0.83, "update_norm": 0.01, ..., "nonfinite": 0,
    #  "inner_state/0/count": 12, "inner_state/2/hyperparams/learning_rate": 0.001}

Key format: the fields of the first :class:`DiagnosticsState` found (in tree order) under
their bare names; every other 0-d leaf under its path from the root of the given state,
the attribute names, tuple indices and dict keys joined by "/" (so ``"0/count"`` is
``state[0].count``; a Flax ``Variable``'s trailing ``value``, as in ``nnx.Optimizer``'s
state, is left out). A later DiagnosticsState's fields also get path keys. Arrays of rank
1 or more (moments, parameters) are skipped; a 0-d *parameter*'s moments are 0-d too, so
they are listed (e.g. ``"inner_state/0/mu/scale"``). Values are Python ``float``, ``int`` or
``bool``, copied to the host in one ``jax.device_get``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import (
  INNER,
  LEARNING_RATE,
  MASK,
  STEP,
  GradientTransformation,
  ScalarOrSchedule,
  as_transformation,
  cond,
  expect_state,
  integer,
  needs_params,
  ordered_after,
  public,
  safe_increment,
  step,
  value_at,
  with_step,
  zero_count,
)
from optcompose.wrappers.measures import (
  grouped,
  leading_clip_norm,
  nonfinite_count,
  recorded_learning_rate,
  update_ratio,
  zero_fraction,
)


# The smallest leaf the step reads only after the measurements (see optcompose.core.ordering).
ORDERED_SIZE = 1 << 14

# The fields measured together (every k-th update), in this order.
MEASURED = ("grad_norm", "update_norm", "param_norm", "update_ratio", "zero_fraction", "nonfinite")


LOGGED_AS = {"used_learning_rate": "learning_rate"}  # fields logged under another name


class DiagnosticsState(NamedTuple):
  """State of :func:`with_diagnostics`: the inner state and the latest measurements.

  Attributes:
    inner_state: the wrapped transformation's state.
    count: int32, updates seen.
    grad_norm, update_norm, param_norm, update_ratio, zero_fraction: float32 scalars (see
      the module docstring).
    used_learning_rate: float32, the latest update's, or None if unknown; logged as
      ``"learning_rate"`` (so named here, Optax's ``tree_set(state, learning_rate=...)``
      would set it and not the hyperparameter the update uses).
    nonfinite: int32, non-finite entries of the latest incoming gradients.
  """

  inner_state: Any
  count: jax.Array
  grad_norm: jax.Array
  update_norm: jax.Array
  param_norm: jax.Array
  update_ratio: jax.Array
  used_learning_rate: Optional[jax.Array]
  zero_fraction: jax.Array
  nonfinite: jax.Array


# ---------------------------------------------------------------------------------------
# The wrapper.


@public(
  "wrapper",
  inner=INNER,
  learning_rate=LEARNING_RATE._replace(optional=True),
  zero_mask=MASK,
  every_k=integer(1, draw=(1, 3)),
)
def with_diagnostics(
  inner: Any,
  learning_rate: Optional[ScalarOrSchedule] = None,
  *,
  zero_mask: Any = None,
  every_k: int = 1,
) -> GradientTransformation:
  """Wrap ``inner`` so that its state also records norms, ratios and counts of each step.

  Recorded at each update (g: incoming updates, u: ``inner``'s updates, w: ``params``)::

      grad_norm = ||g||     update_norm = ||u||     param_norm = ||w||
      update_ratio = ||u|| / ||w||    zero_fraction = #(w == 0) / size(w)
      nonfinite = #(g is NaN or +-inf)    learning_rate = the one in force (else None)

  The updates are ``inner``'s, unchanged (the same arrays); only the state grows. Works
  inside ``optcompose.chain`` and ``optax.chain``, with Flax's ``TrainState`` and under
  ``jax.jit``. ``update`` needs ``params``.

  Args:
    inner: any gradient transformation (optcompose's or Optax's). Wrap the whole optimizer
      so that its input, on which ``grad_norm`` and ``nonfinite`` are measured, is the
      gradient.
    learning_rate: the learning rate (a number >= 0 or a schedule of the step count) to record
      where ``inner``'s state stores none (a constant one, or Optax's schedules): a schedule
      is evaluated at this wrapper's count of updates, skipped ones included. Where the
      state stores it (see the module docstring), that value is recorded: the one ``inner``
      used, also inside ``apply_if_finite`` and ``multi_steps``. Without either, None.
    zero_mask: the leaves ``zero_fraction`` counts (a mask tree, a prefix of one, or a
      callable of the params, as ``add_decayed_weights`` takes), e.g. the kernels only, which
      is where L1 is usually applied; by default every leaf.
    every_k: measure at every k-th update only (the updates numbered 0, k, 2k, ...); in
      between, the state keeps the latest measurements (``count`` and ``learning_rate``
      still advance) and the step costs about what ``inner``'s alone does.

  Returns:
    A transformation whose state is :class:`DiagnosticsState`; read it with
    :func:`diagnostics_dict`.

  References:
    You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks",
    arXiv:1708.03888, 2017 (layer-wise ratios of weight and gradient norms); Optax's
    ``optax.global_norm`` (the norms).
  """
  fn = "with_diagnostics"
  inner = as_transformation(inner, fn)

  def lr_in_force(count, inner_state):
    # The value inner's state records is the one its update used (a skipped update, in
    # apply_if_finite, or a micro-step of multi_steps, moves no count of inner's); the
    # argument, at this wrapper's count, serves where none is recorded.
    value = recorded_learning_rate(inner_state)
    if value is None and learning_rate is not None:
      value = value_at(learning_rate, count)
    # Unknown: None, the same at every step (a NaN marker would trip jax_debug_nans).
    # Known: a copy, since the value recorded in inner's state is an array of the state
    # too, and two leaves of one buffer cannot both be donated.
    return None if value is None else jnp.array(value, jnp.float32, copy=True)

  def init(params):
    inner_state = inner.init(params)
    count = zero_count()
    zero = functools.partial(jnp.zeros, [], jnp.float32)  # a buffer each: donatable
    lr, g, u, w, r = lr_in_force(count, inner_state), zero(), zero(), zero(), zero()
    return DiagnosticsState(inner_state, count, g, u, w, r, lr, zero(), zero_count())

  def measured_first(updates, state, params, extra, only_updates=False):
    """The measurements, and the step's inputs ordered after them (``only_updates``: only
    the updates; see step_form)."""
    expect_state(state, DiagnosticsState, fn)
    needs_params(params, f"{fn} (for the parameter norm and zero fraction)")
    # The measurements run first, inside one lax.cond (every_k == 1: a predicate that is
    # always true but not known to XLA, which would otherwise inline the branch and share
    # its second run of inner with the real one, writing out what fused before: 8.9x the
    # bare step). They read the parameters and the state that the step then writes in
    # place: ordered_after makes the step read all its inputs after them, so XLA need not
    # copy those buffers first (see optcompose.core.ordering).
    take = state.count >= 0 if every_k == 1 else state.count % every_k == 0
    previous = tuple(getattr(state, f) for f in MEASURED)
    measured = cond(
      take, lambda _: measure(updates, state.inner_state, params, extra), lambda _: previous, None
    )
    if only_updates:
      updates = ordered_after(updates, measured[0], min_size=ORDERED_SIZE)
      return measured, (updates, state.inner_state, params)
    inputs = ordered_after((updates, state.inner_state, params), measured[0], min_size=ORDERED_SIZE)
    return measured, inputs

  def recorded(state, inner_state, measured):
    return state._replace(
      inner_state=inner_state,
      count=safe_increment(state.count),
      used_learning_rate=lr_in_force(state.count, inner_state),
      **dict(zip(MEASURED, measured)),
    )

  def update(updates, state, params=None, **extra):
    measured, (updates_in, inner_in, params_in) = measured_first(updates, state, params, extra)
    new_updates, inner_state = inner.update(updates_in, inner_in, params_in, **extra)
    return new_updates, recorded(state, inner_state, measured)

  def step_form(grads, state, params, **extra):  # optcompose.step: inner's own step form
    # An inner step form that is a conditional takes its inputs as operands: ordered ones
    # would be written out (a copy of each). Ordering the gradients alone orders that
    # conditional, which reads them, after the measurements (one copy, of the gradients).
    conditional = getattr(inner.update, STEP, None) is not None
    measured, (grads_in, inner_in, params_in) = measured_first(
      grads, state, params, extra, only_updates=conditional
    )
    new_params, inner_state = step(inner, grads_in, inner_in, params_in, **extra)
    return new_params, recorded(state, inner_state, measured)

  def measure(updates, inner_state, params, extra):
    # inner runs a second time here, for its updates' norm only: its results are discarded.
    # Taking the norm of the step's own updates instead made XLA write them out and copy
    # the parameters (4.5x the bare AdamW step on XLA CPU, against 2.5x this way).
    new_updates, new_inner_state = inner.update(updates, inner_state, params, **extra)
    grad_norm = leading_clip_norm(new_inner_state)
    if grad_norm is None:
      grad_norm = otree.global_norm(grouped(jax.tree.leaves(updates)))
    # The updates are written out before their norm is taken: XLA CPU's library reduction
    # (YNNPACK) would take inner's whole arithmetic into the reduction and evaluate it an
    # operation at a time (AdamW's updates' norm: 11 ms at 8M parameters, against 5.4 ms for
    # XLA's own parallel loop writing them plus 0.9 ms reading them). A bitcast, which that
    # library does not take, keeps the loop apart; the values are unchanged.
    new_updates = ordered_after(new_updates, grad_norm, min_size=ORDERED_SIZE)
    update_norm = otree.global_norm(grouped(jax.tree.leaves(new_updates))).astype(jnp.float32)
    param_norm = otree.global_norm(grouped(jax.tree.leaves(params))).astype(jnp.float32)
    return (
      jnp.asarray(grad_norm, jnp.float32),
      update_norm,
      param_norm,
      update_ratio(update_norm, param_norm),
      zero_fraction(params, zero_mask),
      nonfinite_count(updates, norm=grad_norm),
    )

  return GradientTransformation(init, with_step(update, step_form))


# ---------------------------------------------------------------------------------------
# Logging.


def _names(key_path) -> tuple:
  """The path's keys as strings, without a Flax ``Variable``'s trailing ``.value`` (as in
  :func:`optcompose.labels_from_fn`)."""
  keys = list(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return tuple(otree.key_name(k) for k in keys)


def _python_scalar(value: Any) -> Any:
  value = np.asarray(value)
  if value.dtype == np.bool_:
    return bool(value)
  if np.issubdtype(value.dtype, np.integer):
    return int(value)
  if np.issubdtype(value.dtype, np.complexfloating):
    return complex(value)
  return float(value)  # every floating dtype, bfloat16 included


def _is_diag(node: Any) -> bool:
  return isinstance(node, DiagnosticsState) or otree.is_state_mapping(
    node, DiagnosticsState._fields
  )


def _join(path: tuple) -> str:
  return "/".join(path) if path else "value"


def diagnostics_dict(opt_state: Any) -> dict:
  """Every 0-d value of an optimizer state as ``{key: Python scalar}``, ready to log.

  ``opt_state`` may be any nesting of NamedTuples, tuples, lists, dicts and registered
  pytrees (Optax's states, a Flax ``TrainState``, ...). The fields of the first
  :class:`DiagnosticsState` get their bare names (``"grad_norm"``, ``"update_norm"``,
  ``"param_norm"``, ``"update_ratio"``, ``"learning_rate"``, ``"zero_fraction"``,
  ``"nonfinite"``, ``"count"``); every other scalar leaf its path, e.g.
  ``"inner_state/0/count"``; see the module docstring for the whole format. Call it outside
  ``jax.jit``: the values are fetched to the host, all in one transfer.

  Args:
    opt_state: any optimizer state, with or without :func:`with_diagnostics`.

  Returns:
    ``{key: float | int | bool | complex}``, one entry per 0-d leaf (arrays of rank 1 or
    more are skipped).

  Raises:
    TypeError: called inside ``jax.jit`` (on traced values).

  References:
    JAX's ``jax.tree_util.tree_flatten_with_path`` (the key paths); no Optax counterpart.
  """
  entries: dict = {}
  claimed = [False]  # whether the bare names are taken

  def add(path: tuple, leaf: Any) -> None:
    if leaf is None or np.ndim(leaf) != 0:
      return
    if isinstance(leaf, jax.core.Tracer):
      raise TypeError("diagnostics_dict reads values on the host: call it outside jax.jit.")
    entries[_join(path)] = leaf

  def visit(path: tuple, node: Any) -> None:
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(node, is_leaf=_is_diag)[0]:
      here = path + _names(key_path)
      if not _is_diag(leaf):
        add(here, leaf)
        continue
      bare = not claimed[0]
      claimed[0] = True
      # A state turned into a mapping of its fields (nnx.state, to_pure_dict) alike.
      get = leaf.get if isinstance(leaf, Mapping) else functools.partial(getattr, leaf)
      for field in DiagnosticsState._fields[1:]:  # may be wrapped (nnx.Optimizer's OptArray)
        name = LOGGED_AS.get(field, field)
        visit((name,) if bare else here + (name,), get(field))
      visit(here + ("inner_state",), get("inner_state"))

  visit((), opt_state)
  values = jax.device_get(list(entries.values()))
  return {key: _python_scalar(v) for key, v in zip(entries, values)}


__all__ = ["DiagnosticsState", "diagnostics_dict", "with_diagnostics"]
