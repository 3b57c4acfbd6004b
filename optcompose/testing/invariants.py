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

from optcompose._core import GradientTransformation, apply_updates

__all__ = [
    "check_invariants", "check_jit_matches_eager", "check_state_keeps_its_layout",
    "check_updates_like_grads", "check_no_recompilation", "check_vmap",
    "check_ignores_unknown_kwargs", "check_finite", "run_steps",
]


def _grads_fn(grads) -> Callable:
  return grads if callable(grads) else (lambda params, step: grads)


def _path(path) -> str:
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def _tolerance(dtype) -> float:
  """Relative tolerance for two compilations of the same math: a few ulps of the dtype."""
  return 32 * float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.inexact) else 0.0


def _bound(tx, extra, jit: bool = False) -> Callable:
  """``(grads, state, params) -> (updates, state)`` with ``extra`` bound, optionally jitted."""
  extra = dict(extra or {})
  update = lambda g, state, params: tx.update(g, state, params, **extra)
  return jax.jit(update) if jit else update


def run_steps(tx: GradientTransformation, params: Any, grads, steps: int = 2,
              extra: Optional[dict] = None, update: Optional[Callable] = None):
  """Apply ``steps`` updates; return ``(params, state, updates)`` after the last one.

  ``update`` (default: ``tx.update`` with ``extra`` bound) is called as
  ``update(grads, state, params)``."""
  grad_fn = _grads_fn(grads)
  update = update or _bound(tx, extra)
  state, updates = tx.init(params), None
  for t in range(steps):
    updates, state = update(grad_fn(params, t), state, params)
    params = apply_updates(params, updates)
  return params, state, updates


def _loosest_tolerance(*trees) -> float:
  """The tolerance of the least precise floating dtype anywhere in ``trees``: a bfloat16
  moment rounds differently when XLA keeps an intermediate in float32."""
  dtypes = {jnp.result_type(x) for x in jax.tree.leaves(trees)}
  return max([_tolerance(d) for d in dtypes if jnp.issubdtype(d, jnp.inexact)], default=0.0)


def _assert_trees_close(got, want, what: str, rtol: Optional[float] = None) -> None:
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  want_leaves = jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves), f"{what}: {len(got_leaves)} leaves, not {len(want_leaves)}"
  for (path, a), b in zip(got_leaves, want_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (
        f"{what}{_path(path)}: {a.dtype}{list(a.shape)} against {b.dtype}{list(b.shape)}")
    if a.dtype.kind in "fc" or str(a.dtype) == "bfloat16":
      tol = max(_tolerance(a.dtype), rtol or 0.0)
      a64, b64 = a.astype(np.float64), b.astype(np.float64)
      scale = max(float(np.max(np.abs(b64[np.isfinite(b64)]), initial=0.0)), 1.0)
      np.testing.assert_allclose(a64, b64, rtol=tol, atol=tol * scale,
                                 err_msg=f"{what}{_path(path)}")
    else:
      np.testing.assert_array_equal(a, b, err_msg=f"{what}{_path(path)}")


def check_jit_matches_eager(tx, params, grads, steps: int = 2, extra=None) -> None:
  """``jax.jit(tx.update)`` gives the eager result, to a few ulps (XLA may fuse and reorder)."""
  eager = run_steps(tx, params, grads, steps, extra)
  jitted = run_steps(tx, params, grads, steps, extra, update=_bound(tx, extra, jit=True))
  _assert_trees_close(jitted, eager, "jit against eager: (params, state, updates)",
                      _loosest_tolerance(eager))


def _layout(tree):
  return [(_path(p), jnp.shape(x), jnp.result_type(x), getattr(x, "sharding", None))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_state_keeps_its_layout(tx, params, grads, steps: int = 2, extra=None,
                                 jit: bool = True) -> None:
  """``init`` and every ``update`` give a state of the same structure, shapes, dtypes and
  shardings, eagerly and (``jit=True``) under ``jit`` (so the state can be donated and
  checkpointed)."""
  state0 = tx.init(params)
  updates_fns = [_bound(tx, extra)]
  if jit:
    jitted_init = jax.jit(tx.init)(params)
    assert jax.tree.structure(jitted_init) == jax.tree.structure(state0), (
        "init: jit changes the tree")
    updates_fns.append(_bound(tx, extra, jit=True))
  grad_fn = _grads_fn(grads)
  for update in updates_fns:
    state, p = state0, params
    for t in range(steps):
      updates, new_state = update(grad_fn(p, t), state, p)
      assert jax.tree.structure(new_state) == jax.tree.structure(state0), (
          f"update changed the state's tree: {jax.tree.structure(new_state)} "
          f"from {jax.tree.structure(state0)}")
      for (path, shape, dtype, sharding), (_, shape0, dtype0, sharding0) in zip(
          _layout(new_state), _layout(state0)):
        assert (shape, dtype) == (shape0, dtype0), (
            f"state{path} became {dtype}{list(shape)} from {dtype0}{list(shape0)}")
        if sharding is not None and sharding0 is not None:
          assert sharding.is_equivalent_to(sharding0, len(shape)), (
              f"state{path} moved from {sharding0} to {sharding}")
      state, p = new_state, apply_updates(p, updates)


def check_updates_like_grads(tx, params, grads, steps: int = 2, extra=None) -> None:
  """Updates have the gradients' structure, shapes and dtypes."""
  grad_fn = _grads_fn(grads)
  state, p, update = tx.init(params), params, _bound(tx, extra)
  for t in range(steps):
    g = grad_fn(p, t)
    updates, state = update(g, state, p)
    assert jax.tree.structure(updates) == jax.tree.structure(g), (
        f"updates are a {jax.tree.structure(updates)}, gradients a {jax.tree.structure(g)}")
    for (path, shape, dtype, _), (_, gshape, gdtype, _) in zip(_layout(updates), _layout(g)):
      assert (shape, dtype) == (gshape, gdtype), (
          f"updates{path} is {dtype}{list(shape)}, the gradient {gdtype}{list(gshape)}")
    p = apply_updates(p, updates)


def check_no_recompilation(tx, params, grads, steps: int = 3, extra=None) -> None:
  """The jitted ``update`` is traced once: the state it returns has exactly the types
  (including weak types) of the state it was given, so step 2 reuses step 1's program."""
  traces, bound = [], _bound(tx, extra)

  def update(g, state, p):
    traces.append(1)
    return bound(g, state, p)

  run_steps(tx, params, grads, steps, extra, update=jax.jit(update))
  assert len(traces) == 1, f"update was traced {len(traces)} times in {steps} steps"


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def check_vmap(tx, params, grads, batch: int = 2, steps: int = 2, extra=None) -> None:
  """Under ``jax.vmap`` over a batch of independent problems, each member gets the result
  it would get alone (problem i has params * (1 + i) and gradients * (1 + 0.5 i))."""
  grad_fn = _grads_fn(grads)
  members = [jax.tree.map(lambda x, i=i: x * jnp.asarray(1 + i, jnp.result_type(x)), params)
             for i in range(batch)]
  scales = [1 + 0.5 * i for i in range(batch)]

  def member_grads(i, p, t):
    return jax.tree.map(lambda x: x * jnp.asarray(scales[i], jnp.result_type(x)), grad_fn(p, t))

  alone = [run_steps(tx, members[i], lambda p, t, i=i: member_grads(i, p, t), steps, extra)
           for i in range(batch)]
  p, state = _stack(members), jax.vmap(tx.init)(_stack(members))
  vupdate = jax.vmap(_bound(tx, extra))
  for t in range(steps):
    g = _stack([member_grads(i, jax.tree.map(lambda x, i=i: x[i], p), t) for i in range(batch)])
    updates, state = vupdate(g, state, p)
    p = apply_updates(p, updates)
  for i in range(batch):
    got = jax.tree.map(lambda x, i=i: x[i], (p, state, updates))
    _assert_trees_close(got, alone[i], f"vmap member {i}: (params, state, updates)",
                        _loosest_tolerance(alone[i]))


def check_ignores_unknown_kwargs(tx, params, grads, extra=None) -> None:
  """``update`` accepts keyword arguments it does not use, and they change nothing."""
  g = _grads_fn(grads)(params, 0)
  state = tx.init(params)
  plain = tx.update(g, state, params, **dict(extra or {}))
  more = tx.update(g, state, params, **{"value": jnp.float32(1.0), **dict(extra or {}),
                                         "an_unknown_argument": object()})
  _assert_trees_close(more, plain, "with an unknown keyword: (updates, state)")


def check_finite(tx, params, grads, steps: int = 3, extra=None) -> None:
  """Finite parameters and gradients give finite updates, parameters and state."""
  for path, x in jax.tree_util.tree_flatten_with_path((params, _grads_fn(grads)(params, 0)))[0]:
    assert bool(jnp.all(jnp.isfinite(x))), f"the inputs are not finite at {_path(path)}"
  out = run_steps(tx, params, grads, steps, extra)
  for path, x in jax.tree_util.tree_flatten_with_path(out)[0]:
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      assert bool(jnp.all(jnp.isfinite(x))), (
          f"(params, state, updates){_path(path)} is not finite after {steps} steps")


def _record(tx, params, grads, steps, update):
  """Run ``steps`` updates; return the list of (grads, updates, state) and the final params."""
  grad_fn, state, records = _grads_fn(grads), tx.init(params), []
  for t in range(steps):
    g = grad_fn(params, t)
    updates, state = update(g, state, params)
    records.append((g, updates, state))
    params = apply_updates(params, updates)
  return records, params


def check_invariants(tx: GradientTransformation, params: Any, grads, *, extra=None,
                     steps: int = 3, vmap: bool = True) -> None:
  """Every check above, sharing one eager and one jitted run (so it compiles once).

  ``vmap=False`` skips the vmap check (for transformations whose ``extra`` arguments are
  written for unbatched shapes, e.g. a ``grad_fn``).
  """
  traces, bound = [], _bound(tx, extra)

  def counted(g, state, p):
    traces.append(1)
    return bound(g, state, p)

  eager, eager_params = _record(tx, params, grads, steps, bound)
  jitted, jitted_params = _record(tx, params, grads, steps, jax.jit(counted))
  state0 = tx.init(params)
  assert jax.tree.structure(jax.jit(tx.init)(params)) == jax.tree.structure(state0), (
      "init: jit changes the tree")
  for label, records in (("eager", eager), ("jit", jitted)):
    for t, (g, updates, state) in enumerate(records):
      assert jax.tree.structure(updates) == jax.tree.structure(g), (
          f"{label} step {t}: updates are a {jax.tree.structure(updates)}, "
          f"gradients a {jax.tree.structure(g)}")
      for (path, shape, dtype, _), (_, gshape, gdtype, _) in zip(_layout(updates), _layout(g)):
        assert (shape, dtype) == (gshape, gdtype), (
            f"{label} step {t}: updates{path} is {dtype}{list(shape)}, "
            f"the gradient {gdtype}{list(gshape)}")
      assert jax.tree.structure(state) == jax.tree.structure(state0), (
          f"{label} step {t} changed the state's tree")
      for (path, shape, dtype, sharding), (_, shape0, dtype0, sharding0) in zip(
          _layout(state), _layout(state0)):
        assert (shape, dtype) == (shape0, dtype0), (
            f"{label} step {t}: state{path} became {dtype}{list(shape)} from "
            f"{dtype0}{list(shape0)}")
        if sharding is not None and sharding0 is not None:
          assert sharding.is_equivalent_to(sharding0, len(shape)), (
              f"{label} step {t}: state{path} moved from {sharding0} to {sharding}")
  assert len(traces) == 1, f"the jitted update was traced {len(traces)} times in {steps} steps"
  final = (eager_params, eager[-1][2], eager[-1][1])
  _assert_trees_close((jitted_params, jitted[-1][2], jitted[-1][1]), final,
                      "jit against eager: (params, state, updates)", _loosest_tolerance(final))
  inputs_finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(
      (params, [r[0] for r in eager])) if jnp.issubdtype(jnp.result_type(x), jnp.inexact))
  if inputs_finite:
    for path, x in jax.tree_util.tree_flatten_with_path((eager_params, eager))[0]:
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        assert bool(jnp.all(jnp.isfinite(x))), (
            f"finite inputs, but (params, records){_path(path)} is not finite")
  check_ignores_unknown_kwargs(tx, params, grads, extra)
  if vmap:
    check_vmap(tx, params, grads, steps=2, extra=extra)
