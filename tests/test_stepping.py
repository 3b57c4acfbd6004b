"""``optcompose.step(tx, grads, opt_state, params)``: one training call, through a
transformation's step-level form where it has one (``multi_steps``, ``lookahead_in_state``,
``apply_if_finite``),
else ``update`` then ``apply_updates`` (issue 16)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import bits, x64

SIZE = 1 << 16


def problem(dtype=jnp.float32, seed=0, calls=10):
  rng = np.random.default_rng(seed)
  params = {
    "w": jnp.asarray(rng.normal(size=(6, 4)), dtype),
    "b": jnp.asarray(rng.normal(size=4), dtype),
  }
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), dtype), params)
    for _ in range(calls)
  ]
  return params, grads


def by_update(tx, params, state, grads, **extra):
  updates, state = tx.update(grads, state, params, **extra)
  return oc.apply_updates(params, updates), state


@pytest.mark.parametrize(
  "tx", [oc.adamw(1e-2, weight_decay=1e-2), optax.sgd(0.1, momentum=0.9)], ids=["ours", "optax"]
)
def test_without_a_step_form_it_is_update_then_apply(tx):
  params, grads = problem()
  a = b = (params, tx.init(params))
  for g in grads[:3]:
    a, b = by_update(tx, *a, g), oc.step(tx, g, b[1], b[0])
    for x, y in zip(bits(a), bits(b), strict=True):
      np.testing.assert_array_equal(x, y)


def test_multi_steps_takes_its_step_form():
  """``step`` on ``multi_steps`` is ``MultiSteps.step``: a micro-step leaves the parameters
  bit for bit (-0.0 stays -0.0, which ``update`` + ``apply_updates`` turns into 0.0)."""
  tx = oc.multi_steps(oc.adamw(1e-2), 3)
  params, grads = problem()
  params = {**params, "b": params["b"].at[0].set(-0.0)}
  new, state = oc.step(tx, grads[0], tx.init(params), params)
  for x, y in zip(bits(new), bits(params), strict=True):
    np.testing.assert_array_equal(x, y)
  assert bits(by_update(tx, params, tx.init(params), grads[0])[0])[0][0] == 0  # "b"[0]: +0.0
  params, grads = problem(seed=1)  # no -0.0: bit for bit with update + apply_updates, eagerly
  a = b = (params, tx.init(params))
  for g in grads:
    a, b = by_update(tx, *a, g), oc.step(tx, g, b[1], b[0])
    for x, y in zip(bits(a), bits(b), strict=True):
      np.testing.assert_array_equal(x, y)


@pytest.mark.float64
@pytest.mark.parametrize(
  "make",
  [
    lambda: oc.multi_steps(oc.sgd(1.0), 2),
    lambda: oc.apply_if_finite(oc.sgd(1.0), 3),
    lambda: oc.lookahead_in_state(oc.sgd(1.0), 2, 0.5),
  ],
  ids=["multi_steps", "apply_if_finite", "lookahead"],
)
def test_step_forms_return_weakly_typed_parameters_strongly_typed(make):
  """A parameter made by ``jnp.asarray(0.3)`` is weakly typed; ``apply_updates`` returns it
  strongly typed, and so does every step form (a micro-step or skip that kept it weak made
  its float64 gradient average in float32 beside the accumulator): bit for bit, eagerly."""
  tx = make()
  loss = lambda p: (p["b"] - 1.0 / 3.0) ** 2 * 1.2345678901234567  # noqa: E731
  with x64():
    for params in ({"b": jnp.asarray(0.3)}, {"b": 0.3}):  # a weak array, a Python number
      a = b = (params, tx.init(params))
      for _ in range(4):
        g_a, g_b = jax.grad(loss)(a[0]), jax.grad(loss)(b[0])
        a, b = by_update(tx, *a, g_a), oc.step(tx, g_b, b[1], b[0])
        assert isinstance(b[0]["b"], jax.Array) and not b[0]["b"].weak_type
        for x, y in zip(bits(a), bits(b), strict=True):
          np.testing.assert_array_equal(x, y)


@pytest.mark.float64
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("reset_state", [False, True])
@pytest.mark.parametrize(
  "fast",
  [
    lambda: oc.adam(0.05),
    lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    # A state initialised from the parameters' values (the average starts at them): the
    # reset at a synchronisation takes the fast weights before the step, as update does.
    lambda: oc.chain(oc.adam(0.05), oc.ema_params(0.5, debias=False)),
  ],
  ids=["adam", "optax_sgd", "ema_params"],
)
def test_lookahead_step_follows_update_then_apply(fast, reset_state, jit):
  """Float64, 10 calls, a synchronisation every 3: parameters and state as ``update`` +
  ``apply_updates`` give them, to rounding (the fast weights reach the slow ones as
  ``theta + u - (1 - alpha) d`` there, as the new slow weights here); the same structure
  and dtypes."""
  with x64():
    tx = oc.lookahead_in_state(fast(), 3, 0.5, reset_state)
    params, grads = problem(jnp.float64)
    plain = lambda p, s, g: by_update(tx, p, s, g)
    stepped = lambda p, s, g: oc.step(tx, g, s, p)
    if jit:
      plain, stepped = jax.jit(plain), jax.jit(stepped)
    a = b = (params, tx.init(params))
    for t, g in enumerate(grads):
      a, b = plain(*a, g), stepped(*b, g)
      assert jax.tree.structure(a) == jax.tree.structure(b)
      assert [x.dtype for x in jax.tree.leaves(a)] == [x.dtype for x in jax.tree.leaves(b)]
      for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(a), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)
      if t % 3 == 2:  # a synchronisation: the fast weights are the slow weights, bit for bit
        for x, y in zip(bits(b[0]), bits(oc.slow_params(b[1])), strict=True):
          np.testing.assert_array_equal(x, y)
    moved = max(
      float(jnp.max(jnp.abs(x - y))) for x, y in zip(*map(jax.tree.leaves, (a[0], params)))
    )
    assert moved > 0.1


def test_lookahead_step_jitted_and_donated_trains():
  tx = oc.lookahead_in_state(oc.adamw(5e-2), 4, 0.5)
  target = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(6, 4)}
  loss = lambda p: jnp.sum((p["w"] - target["w"]) ** 2)
  params = {"w": jnp.zeros((6, 4))}
  state = tx.init(params)
  train = jax.jit(lambda p, s: oc.step(tx, jax.grad(loss)(p), s, p), donate_argnums=(0, 1))
  start = float(loss(params))
  for _ in range(40):
    params, state = train(params, state)
  assert float(loss(params)) < 0.05 * start


@pytest.mark.xla_cpu_program
def test_lookahead_step_copies_nothing():
  """The step form: no copy of a parameter-sized buffer, and no parameter-sized temporary
  (XLA's memory accounting: the new fast weights are written in place). Through ``update`` +
  ``apply_updates``, XLA copies the parameters and the slow weights (each of the two
  updates reads what the other writes in place): two parameter-sized temporaries."""
  params = {"w": jnp.ones(SIZE, jnp.float32)}
  tx = oc.lookahead_in_state(oc.adamw(1e-3, weight_decay=1e-4), 5, 0.5)
  # In the entry computation: at a synchronisation the conditional's branch writes the new
  # weights into both copies (one of them a copy, on one call in five).
  copies = lambda hlo: re.findall(rf"= f32\[{SIZE}\]\S* copy\(", hlo[hlo.index("ENTRY") :])

  def compiled(step):
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    return lowered.compile()

  fast = compiled(lambda p, s, g: oc.step(tx, g, s, p))
  assert copies(fast.as_text()) == []
  assert fast.memory_analysis().temp_size_in_bytes < 4 * SIZE
  slow = compiled(lambda p, s, g: by_update(tx, p, s, g))
  assert len(copies(slow.as_text())) == 2
  assert slow.memory_analysis().temp_size_in_bytes >= 2 * 4 * SIZE


def with_nan(grads, t):
  """The gradients of call ``t``, with a NaN on calls 3 and 4 (two skips in a row)."""
  g = grads[t]
  return {**g, "b": g["b"].at[1].set(jnp.nan)} if t in (3, 4) else g


@pytest.mark.parametrize("check_updates", [False, True], ids=["grads", "updates"])
@pytest.mark.parametrize(
  "inner",
  [
    lambda: oc.adamw(1e-2, weight_decay=1e-2),
    lambda: optax.sgd(0.1, momentum=0.9),
    lambda: oc.multi_steps(oc.adam(1e-2), 2),  # a step form inside the step form
  ],
  ids=["adamw", "optax_sgd", "multi_steps"],
)
def test_apply_if_finite_step_follows_update_then_apply(inner, check_updates):
  """Eagerly bit for bit with ``update`` + ``apply_updates`` (the same operations), jitted to
  2 ulps (two programs), over 8 calls with two non-finite ones: the skipped calls leave the
  parameters bit for bit, and the counts (consecutive, total, ``gave_up`` after 2) agree."""
  from numerics import assert_ulps_close

  tx = oc.apply_if_finite(inner(), 2, check_updates=check_updates)
  params, grads = problem(calls=8)
  if not isinstance(tx.init(params).inner_state, oc.MultiStepsState):
    # -0.0, kept by a skipped step (multi_steps' own micro-step keeps it too, where update +
    # apply_updates adds +0.0)
    params = {**params, "b": params["b"].at[0].set(-0.0)}
  a = b = c = (params, tx.init(params))
  stepped = jax.jit(lambda p, s, g: oc.step(tx, g, s, p))
  for t in range(8):
    g = with_nan(grads, t)
    before = b[0]
    a, b, c = by_update(tx, *a, g), oc.step(tx, g, b[1], b[0]), stepped(*c, g)
    for x, y in zip(bits(a), bits(b), strict=True):
      np.testing.assert_array_equal(x, y)
    assert_ulps_close(c, a, 2)
    if t in (3, 4):  # skipped: nothing written
      for x, y in zip(bits(b[0]), bits(before), strict=True):
        np.testing.assert_array_equal(x, y)
  assert int(b[1].total_notfinite) == 2 and bool(b[1].gave_up)
  assert int(c[1].total_notfinite) == 2 and bool(c[1].gave_up)
  assert not np.array_equal(bits(b[0])[0], bits(params)[0])  # the finite calls stepped


def test_apply_if_finite_step_skips_an_update_that_overflows():
  """``check_updates``: finite gradients whose update overflows are skipped by the step form
  too (the probe runs before the conditional), and counted."""
  tx = oc.apply_if_finite(oc.sgd(1e30, 0.9), 3, check_updates=True)
  params = {"w": jnp.array([1.0, 2.0])}
  g = {"w": jnp.array([1e10, 1.0])}
  for step in (oc.step, jax.jit(oc.step, static_argnums=0)):
    new, state = step(tx, g, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(new["w"]), np.asarray(params["w"]))
    assert int(state.total_notfinite) == 1 and not bool(state.last_finite)


@pytest.mark.xla_cpu_program
@pytest.mark.parametrize("check_updates", [False, True], ids=["grads", "updates"])
def test_apply_if_finite_step_writes_in_place(check_updates):
  """Through ``step``: one conditional, no copy of a parameter-sized buffer and no
  parameter-sized temporary (the parameters' update is in the conditional's branch); through
  ``update`` + ``apply_updates`` the updates are written out: one temporary."""
  params = {"w": jnp.ones(SIZE, jnp.float32)}
  tx = oc.apply_if_finite(oc.adamw(1e-3, weight_decay=1e-4), 5, check_updates=check_updates)
  copies = lambda hlo: re.findall(rf"= f32\[{SIZE}\]\S* copy\(", hlo)

  def compiled(step):
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    return lowered.compile()

  fast = compiled(lambda p, s, g: oc.step(tx, g, s, p))
  assert fast.as_text().count(" conditional(") == 1
  assert copies(fast.as_text()) == []
  assert fast.memory_analysis().temp_size_in_bytes < 4 * SIZE
  slow = compiled(lambda p, s, g: by_update(tx, p, s, g))
  assert slow.memory_analysis().temp_size_in_bytes >= 4 * SIZE


@pytest.mark.parametrize("every_k", [1, 2])
def test_with_diagnostics_step_keeps_the_inner_step_form(every_k):
  """``with_diagnostics(apply_if_finite(...))`` through ``step``: the same parameters, state
  and measurements as ``update`` + ``apply_updates`` (eagerly bit for bit, jitted to 2
  ulps), a skipped call's parameters untouched."""
  from numerics import assert_ulps_close

  tx = oc.with_diagnostics(
    oc.apply_if_finite(oc.adamw(1e-2, weight_decay=1e-2), 2), every_k=every_k
  )
  params, grads = problem(calls=8)
  a = b = c = (params, tx.init(params))
  stepped = jax.jit(lambda p, s, g: oc.step(tx, g, s, p))
  for t in range(8):
    g = with_nan(grads, t)
    a, b, c = by_update(tx, *a, g), oc.step(tx, g, b[1], b[0]), stepped(*c, g)
    for x, y in zip(bits(a), bits(b), strict=True):
      np.testing.assert_array_equal(x, y)
    assert_ulps_close(c, a, 2)
  assert int(b[1].inner_state.total_notfinite) == 2 and int(b[1].count) == 8


@pytest.mark.xla_cpu_program
def test_with_diagnostics_step_writes_in_place():
  """Through ``step``, ``with_diagnostics(apply_if_finite(adamw))`` copies no buffer and
  writes out only the gradients before the inner step form's conditional (which writes the
  parameters in place)."""
  params = {"w": jnp.ones(SIZE, jnp.float32)}
  tx = oc.with_diagnostics(oc.apply_if_finite(oc.adamw(1e-3, weight_decay=1e-4), 5), every_k=10)

  def compiled(step):
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    return lowered.compile()

  fast = compiled(lambda p, s, g: oc.step(tx, g, s, p))
  assert re.findall(rf"= f32\[{SIZE}\]\S* copy\(", fast.as_text()) == []
  entry = fast.as_text()[fast.as_text().index("ENTRY") :]
  # the gradients, ordered after the measurements, are the one array written out before
  # the inner conditional (the parameters and moments are its operands as they are)
  assert len(re.findall(rf"= f32\[{SIZE}\]\S* fusion\(", entry)) == 1


@pytest.mark.parametrize(
  "last",
  [
    lambda: oc.apply_if_finite(oc.adamw(1e-2, weight_decay=1e-2), 2),
    lambda: oc.multi_steps(oc.adam(1e-2), 2),
    lambda: oc.with_diagnostics(oc.adam(1e-2)),
  ],
  ids=["apply_if_finite", "multi_steps", "with_diagnostics"],
)
def test_chain_takes_its_last_members_step_form(last):
  """``chain(clip, X)`` through ``step``: the members before X update, then X's step form
  takes the step (a micro-step of multi_steps writes nothing: the parameters stay bit for
  bit); eagerly bit for bit with ``update`` + ``apply_updates``, jitted to 2 ulps; a chain
  whose last member has no step form takes the usual path. A state mismatch names the
  member's position."""
  from numerics import assert_ulps_close

  tx = oc.chain(oc.clip_by_global_norm(1.0), last())
  assert getattr(tx.update, oc.core.STEP, None) is not None
  assert getattr(oc.chain(last(), oc.scale(1.0)).update, oc.core.STEP, None) is None
  params, grads = problem(calls=8)
  a = b = (params, tx.init(params))
  stepped = jax.jit(lambda p, s, g: oc.step(tx, g, s, p))
  for t in range(8):
    g = with_nan(grads, t) if isinstance(b[1][1], oc.ApplyIfFiniteState) else grads[t]
    before = b[0]
    c = stepped(*a, g)  # jitted, from the same state (two programs' roundings compound)
    a, b = by_update(tx, *a, g), oc.step(tx, g, b[1], b[0])
    for x, y in zip(bits(a), bits(b), strict=True):
      np.testing.assert_array_equal(x, y)
    assert_ulps_close(c, a, 2)
    if isinstance(b[1][1], oc.MultiStepsState) and t % 2 == 0:  # a micro-step
      for x, y in zip(bits(b[0]), bits(before), strict=True):
        np.testing.assert_array_equal(x, y)
  state = tx.init(params)
  with pytest.raises(oc.StateMismatchError, match=r"state\[1\]"):
    oc.step(tx, grads[0], (state[0], oc.sgd(0.1).init(params)), params)
  with pytest.raises(ValueError, match="chain of 2 transformations"):
    oc.step(tx, grads[0], state[:1], params)


def test_with_step_names_an_update_that_cannot_carry_it():
  class Opt:
    def update(self, updates, state, params=None):
      return updates, state

  with pytest.raises(TypeError, match="with_step"):
    oc.core.with_step(Opt().update, lambda *a: a)


def test_step_names_bad_input():
  tx = oc.lookahead_in_state(oc.sgd(0.1), 2, 0.5)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    oc.step(tx, {"w": jnp.ones(3)}, state, None)
  with pytest.raises(ValueError, match="updates"):
    oc.step(tx, {"v": jnp.ones(3)}, state, params)
  with pytest.raises(TypeError, match="params"):
    oc.step(tx, {"w": jnp.ones(3)}, state, {"w": jnp.ones(3, jnp.bfloat16)})
  with pytest.raises(TypeError, match="step"):
    oc.step(object(), {}, (), {})
  finite = oc.apply_if_finite(oc.sgd(0.1), 2)
  with pytest.raises(ValueError, match="params"):
    oc.step(finite, {"w": jnp.ones(3)}, finite.init(params), None)
  adamw = oc.adamw(1e-3)  # no step form: named by step, not by the member that reads them
  with pytest.raises(ValueError, match="step: `params` is None"):
    oc.step(adamw, {"w": jnp.ones(3)}, adamw.init(params), None)
  with pytest.raises(oc.StateMismatchError, match="ApplyIfFiniteState"):
    oc.step(finite, {"w": jnp.ones(3)}, state, params)
