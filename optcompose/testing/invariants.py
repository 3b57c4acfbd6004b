"""Invariant checks that any gradient transformation should pass.

Each ``check_*`` function takes a transformation, parameters and gradients, runs a few steps,
and raises an ``AssertionError`` that names the tree path and the property when one fails.
:func:`check_invariants` runs them all. They need only JAX and NumPy (no hypothesis), so they
can run in a user's own test suite on any backend; pair them with the strategies in
:mod:`optcompose.testing.strategies` to draw the inputs.

``grads`` is either a tree like ``params`` (used at every step) or a function
``(params, step) -> grads``. ``extra`` holds keyword arguments that ``update`` needs (e.g.
``{"value": loss}`` for plateau control, ``{"grad_fn": f}`` for ``sharpness_aware``); they are
closed over, not passed through ``jit`` as arguments, so functions are fine.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optcompose import tree as otree
from optcompose.core import GradientTransformation, apply_updates
from optcompose.core.base import as_transformation, update_pair
from optcompose.testing._compare import (
  _assert_jax_dtypes,
  _assert_layout_kept,
  _assert_same_tree,
  _assert_trees_close,
  _layout,
  _loosest_tolerance,
)
from optcompose.testing._state_checks import (
  _assert_inputs_kept,
  _unknown,
  _assert_donatable,
  _py,
  _retraced,
  _strong,
  check_state_can_be_donated,
)

__all__ = [
  "check_invariants",
  "check_jit_matches_eager",
  "check_state_keeps_its_layout",
  "check_updates_like_grads",
  "check_no_recompilation",
  "check_vmap",
  "check_ignores_unknown_kwargs",
  "check_finite",
  "check_state_can_be_donated",
  "run_steps",
  "record_steps",
]


def _grads_fn(grads) -> Callable:
  return grads if callable(grads) else (lambda params, step: grads)


def _bound(tx, extra, jit: bool = False) -> Callable:
  """``(grads, state, params) -> (updates, state)`` with ``extra`` bound, optionally jitted."""
  extra = dict(extra or {})
  update = lambda g, state, params: tx.update(g, state, params, **extra)
  return jax.jit(update) if jit else update


def record_steps(
  tx: GradientTransformation,
  params: Any,
  grads,
  steps: int = 2,
  extra: Optional[dict] = None,
  update: Optional[Callable] = None,
):
  """Apply ``steps`` updates; return the list of ``(grads, updates, state)`` per step and
  the final parameters. ``update`` (default: ``tx.update`` with ``extra`` bound) is called
  as ``update(grads, state, params)``."""
  grad_fn = _grads_fn(grads)
  update = update or _bound(tx, extra)
  params = _strong(params)
  state, records = tx.init(params), []
  flat = jax.tree_util.tree_flatten_with_path
  for t in range(steps):
    g = grad_fn(params, t)
    given = [flat(tree)[0] for tree in (state, g, params)]
    updates, new_state = update_pair(update(g, state, params), f"step {t}")
    _assert_inputs_kept(given, [flat(tree)[0] for tree in (state, g, params)], f"step {t}")
    # Before the next step, which would fail on a changed tree in the user's own code.
    _assert_same_tree(new_state, state, f"step {t}: the state update returned", "its input")
    state = new_state
    records.append((g, updates, state))
    params = apply_updates(params, updates)
  return records, params


def run_steps(
  tx: GradientTransformation,
  params: Any,
  grads,
  steps: int = 2,
  extra: Optional[dict] = None,
  update: Optional[Callable] = None,
):
  """Apply ``steps`` updates; return ``(params, state, updates)`` after the last one."""
  records, params = record_steps(tx, params, grads, steps, extra, update)
  _, updates, state = records[-1]
  return params, state, updates


def check_jit_matches_eager(tx, params, grads, steps: int = 2, extra=None) -> None:
  """``jax.jit(tx.update)`` gives the eager result, to a few ulps (XLA may fuse and reorder)."""
  eager = run_steps(tx, params, grads, steps, extra)
  jitted = run_steps(tx, params, grads, steps, extra, update=_bound(tx, extra, jit=True))
  _assert_trees_close(
    jitted, eager, "jit against eager: (params, state, updates)", _loosest_tolerance(eager)
  )


def _assert_updates_like(updates, grads, label: str) -> None:
  """Updates have the gradients' tree, shapes and dtypes."""
  _assert_same_tree(updates, grads, f"{label}: the updates", "the gradients")
  for (path, shape, dtype, _), (_, gshape, gdtype, _) in zip(_layout(updates), _layout(grads)):
    assert (shape, dtype) == (gshape, gdtype), (
      f"{label}: updates{path} is {dtype}{list(shape)}, the gradient {gdtype}{list(gshape)}"
    )


def _inputs_finite(params, records) -> bool:
  return all(
    bool(jnp.all(jnp.isfinite(x)))
    for x in jax.tree.leaves((params, [g for g, _, _ in records]))
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  )


def _moderate(tree) -> bool:
  """Whether every floating-point value of ``tree`` is finite and at most ``sqrt(max) / 16``
  of its dtype in magnitude (float32: 1.1e18; float16: 16): no square, difference or sum of a
  few steps of such values overflows, so a value that does is the transformation's fault.
  Beyond it an overflow can be the arithmetic's own (three steps of 3e38 through
  ``identity``)."""
  for x in jax.tree.leaves(tree):
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact) and jnp.size(x):
      bound = float(np.sqrt(float(jnp.finfo(dtype).max))) / 16
      if not bool(jnp.all(jnp.abs(jnp.asarray(x)) <= bound)):  # NaN and inf included
        return False
  return True


def _assert_finite_while_moderate(params, records, state0) -> None:
  """Each step's updates, state and new parameters are finite where the user's inputs are
  moderate (:func:`_moderate`: the initial parameters and every gradient), or else where the
  step's own parameters and gradient are (the fault of a step whose outputs feed the next
  step's gradients is caught at that step). State leaves that ``init`` made non-finite
  (:func:`_unknown`) may stay so."""
  inputs = _moderate((params, [g for g, _, _ in records]))
  unknown = _unknown(state0)
  for t, (g, updates, state) in enumerate(records):
    if not (inputs or _moderate((params, g))):
      return
    params = apply_updates(params, updates)
    _assert_finite((params, updates, state), f"step {t}: (params, updates, state)", unknown)


def _assert_finite(tree, what: str, unknown: frozenset | set = frozenset()) -> None:
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and tuple(path) not in unknown:
      assert bool(jnp.all(jnp.isfinite(x))), (
        f"finite inputs, but {what}{otree.path_str(path)} is not finite"
      )


def _counting_jit(tx, extra):
  """A jitted update and the list it appends to each time JAX traces it."""
  traces, bound = [], _bound(tx, extra)

  def update(g, state, p):
    traces.append(1)
    return bound(g, state, p)

  return jax.jit(update), traces


def check_state_keeps_its_layout(
  tx, params, grads, steps: int = 2, extra=None, jit: bool = True
) -> None:
  """``init`` and every ``update`` give a state of the same structure, shapes, dtypes and
  shardings, eagerly and (``jit=True``) under ``jit`` (so the state can be donated and
  checkpointed)."""
  state0 = tx.init(params)
  _assert_jax_dtypes(state0)
  runs = {"eager": _bound(tx, extra)}
  if jit:
    _assert_same_tree(jax.jit(tx.init)(params), state0, "jit(init)", "init")
    runs["jit"] = _bound(tx, extra, jit=True)
  for label, update in runs.items():
    for t, (_, _, state) in enumerate(record_steps(tx, params, grads, steps, extra, update)[0]):
      _assert_layout_kept(state, state0, f"{label} step {t}")


def check_updates_like_grads(tx, params, grads, steps: int = 2, extra=None) -> None:
  """Updates have the gradients' structure, shapes and dtypes."""
  for t, (g, updates, _) in enumerate(record_steps(tx, params, grads, steps, extra)[0]):
    _assert_updates_like(updates, g, f"step {t}")


def check_no_recompilation(tx, params, grads, steps: int = 3, extra=None) -> None:
  """The jitted ``update`` is traced once: the state it returns has exactly the types
  (including weak types) of the state it was given, so step 2 reuses step 1's program."""
  update, traces = _counting_jit(tx, extra)
  records = record_steps(tx, params, grads, steps, extra, update)[0]
  assert len(traces) == 1, _retraced(traces, steps, tx.init(_strong(params)), records)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def check_vmap(
  tx, params, grads, batch: int = 2, steps: int = 2, extra=None, update: Optional[Callable] = None
) -> None:
  """Under ``jax.vmap`` over a batch of independent problems, each member gets the result
  it would get alone (problem i has params * (1 + i) and gradients * (1 + 0.5 i)).
  ``update``: the jitted ``update(grads, state, params)`` for the members alone, if the
  caller has one compiled already (default: ``tx.update`` with ``extra`` bound, jitted)."""
  if not jax.tree.leaves(params):
    return  # nothing to batch: jax.vmap needs an array
  grad_fn = _grads_fn(grads)
  members = [
    jax.tree.map(lambda x, i=i: x * jnp.asarray(1 + i, jnp.result_type(x)), params)
    for i in range(batch)
  ]
  scales = [1 + 0.5 * i for i in range(batch)]

  def member_grads(i, p, t):
    return jax.tree.map(lambda x: x * jnp.asarray(scales[i], jnp.result_type(x)), grad_fn(p, t))

  # Both sides jitted: one compilation each (the members share shapes), where eager
  # batching would dispatch every operation of every step separately.
  update = update or jax.jit(_bound(tx, extra))
  alone = [
    run_steps(tx, members[i], lambda p, t, i=i: member_grads(i, p, t), steps, extra, update)
    for i in range(batch)
  ]
  p, state = _stack(members), jax.jit(jax.vmap(tx.init))(_stack(members))
  vupdate = jax.jit(jax.vmap(_bound(tx, extra)))
  updates = None  # set by the loop: run_steps above has raised unless steps >= 1
  for t in range(steps):
    g = _stack([member_grads(i, jax.tree.map(lambda x, i=i: x[i], p), t) for i in range(batch)])
    updates, state = vupdate(g, state, p)
    p = apply_updates(p, updates)
  for i in range(batch):
    got = jax.tree.map(lambda x, i=i: x[i], (p, state, updates))
    _assert_trees_close(
      got, alone[i], f"vmap member {i}: (params, state, updates)", _loosest_tolerance(alone[i])
    )


def check_ignores_unknown_kwargs(tx, params, grads, extra=None) -> None:
  """``update`` accepts keyword arguments it does not use, and they change nothing. A plain
  ``optax.GradientTransformation`` (not ``...ExtraArgs``) makes no such promise: it is
  checked as ``chain`` calls it, with the keywords it does not name dropped."""
  if isinstance(tx, optax.GradientTransformation) and not isinstance(
    tx, optax.GradientTransformationExtraArgs
  ):
    tx = as_transformation(tx, "check_ignores_unknown_kwargs")
  g = _grads_fn(grads)(params, 0)
  state = tx.init(params)
  plain = tx.update(g, state, params, **dict(extra or {}))
  try:
    more = tx.update(g, state, params, **dict(extra or {}), an_unknown_argument=object())
  except TypeError as e:
    raise AssertionError(
      f"update(..., an_unknown_argument=object()) raised {e}: an update must accept keyword "
      "arguments it does not use (end its signature with **extra): its transformation is "
      f"a {type(tx).__name__}, which says it takes them, so chain (Optax's and optcompose's) "
      "passes it every keyword of the step"
    ) from None
  _assert_trees_close(more, plain, "with an_unknown_argument=object(): (updates, state)")


def check_finite(tx, params, grads, steps: int = 3, extra=None) -> None:
  """Finite parameters and gradients give finite updates, parameters and state. Draw moderate
  inputs for it (``gradients_like(params, extreme=False)``): values near the dtype's largest
  can overflow through the arithmetic itself (``identity`` adding 3e38 three times)."""
  records, final = record_steps(tx, params, grads, steps, extra)
  assert _inputs_finite(params, records), "the parameters or gradients are not finite"
  unknown = _unknown(tx.init(_strong(params)))
  for t, (_, updates, state) in enumerate(records):
    _assert_finite((final, updates, state), f"step {t}: (final params, updates, state)", unknown)


def check_invariants(
  tx: GradientTransformation, params: Any, grads, *, extra=None, steps: int = 3, vmap: bool = True
) -> None:
  """Every check above, sharing one eager and one jitted run (so it compiles once).

  The finiteness check applies where the initial parameters and every gradient are finite
  and moderate (at most ``sqrt(max) / 16`` of their dtype: float32 1.1e18, float16 16), or
  else to each step whose own parameters and gradient are: there an overflow is the
  transformation's fault; ``check_finite`` applies it to any finite inputs.
  ``vmap=False`` skips the vmap check (for transformations whose ``extra`` arguments are
  written for unbatched shapes, e.g. a ``grad_fn``).
  """
  jitted_update, traces = _counting_jit(tx, extra)
  params = _strong(params)
  numbers = [p for p, x in jax.tree_util.tree_flatten_with_path(tx.init(params))[0] if _py(x)]
  assert not numbers, (
    f"init returned a Python number at state{otree.path_str(numbers[0])}: weakly typed, it "
    "changes dtype under jit; give an array (a count: jnp.zeros([], jnp.int32))."
  )
  _assert_jax_dtypes(tx.init(params))
  eager, eager_params = record_steps(tx, params, grads, steps, extra)
  jitted, jitted_params = record_steps(tx, params, grads, steps, extra, jitted_update)
  state0 = tx.init(params)
  _assert_same_tree(jax.jit(tx.init)(params), state0, "jit(init)", "init")
  check_state_can_be_donated(tx, params)
  _assert_donatable(None, eager[0][2], "update")
  for label, records in (("eager", eager), ("jit", jitted)):
    for t, (g, updates, state) in enumerate(records):
      _assert_updates_like(updates, g, f"{label} step {t}")
      _assert_layout_kept(state, state0, f"{label} step {t}")
  assert len(traces) == 1, _retraced(traces, steps, state0, eager)
  final = (eager_params, eager[-1][2], eager[-1][1])
  _assert_trees_close(
    (jitted_params, jitted[-1][2], jitted[-1][1]),
    final,
    "jit against eager: (params, state, updates)",
    _loosest_tolerance(final),
  )
  _assert_finite_while_moderate(params, eager, state0)
  check_ignores_unknown_kwargs(tx, params, grads, extra)
  if vmap:
    check_vmap(tx, params, grads, steps=2, extra=extra, update=jitted_update)
