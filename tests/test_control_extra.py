"""apply_every, the conditional wrappers, periodic/incremental updates, the monitoring
transformations and MultiSteps' should_skip_update_fn: Optax's results in float64, rejected
micro-steps that change nothing, and bad inputs named."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import F64_RTOL, assert_rel_close, standard_promotion, x64

RNG = np.random.default_rng(7)
SHAPES = {"w": (3, 2), "b": (2,)}
GRADS = [{k: RNG.normal(size=s) for k, s in SHAPES.items()} for _ in range(12)]
PARAMS = {k: RNG.normal(size=s) * 0.5 for k, s in SHAPES.items()}


def tree64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def with_nonfinite(grads, where):
  """``grads`` with a NaN (even positions of ``where``) or an Inf (odd) planted at the
  listed steps."""
  grads = [dict(g) for g in grads]
  for i, t in enumerate(where):
    grads[t]["w"] = np.array(grads[t]["w"])
    grads[t]["w"][1, 0] = np.nan if i % 2 == 0 else np.inf
  return grads


def lockstep64(ours, theirs, grads, extras=None, jit=True):
  """Both transformations from the same float64 params and gradients; yields the step,
  both updates and both states after each call (the params move by ours)."""
  theirs = standard_promotion(theirs)
  params = tree64(PARAMS)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  up_ours = jax.jit(ours.update) if jit else ours.update
  up_theirs = jax.jit(theirs.update) if jit else theirs.update
  for t, g in enumerate(grads):
    extra = extras[t] if extras else {}
    u_ours, s_ours = up_ours(tree64(g), s_ours, params, **extra)
    u_theirs, s_theirs = up_theirs(tree64(g), s_theirs, params, **extra)
    yield t, u_ours, u_theirs, s_ours, s_theirs
    params = oc.apply_updates(params, u_ours)


def assert_same_values(ours, theirs, what):
  """Same tree, shapes and values (float64: to rounding; integers and booleans: exactly)."""
  la, ta = jax.tree.flatten(ours)
  lb, tb = jax.tree.flatten(theirs)
  assert len(la) == len(lb), f"{what}: {ta} against {tb}"
  for a, b in zip(la, lb):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, what
    if a.dtype.kind == "f":
      assert_rel_close(a, b, F64_RTOL, what=what)
    else:
      np.testing.assert_array_equal(a, b, err_msg=what)


# --- float64 against Optax ---------------------------------------------------------------------

pytestmark = pytest.mark.numerics


@pytest.mark.float64
@pytest.mark.parametrize("k", [1, 3])
def test_apply_every_matches_optax_with_its_state(k):
  with x64():
    for t, u, v, s, r in lockstep64(
      oc.chain(oc.sgd(0.1, 0.9), oc.apply_every(k)),
      optax.chain(optax.sgd(0.1, 0.9), optax.apply_every(k)),
      GRADS,
    ):
      assert_same_values(u, v, f"step {t}: updates")
      assert_same_values(s[1], r[1], f"step {t}: ApplyEvery state")
      assert type(s[1]).__name__ == type(r[1]).__name__ == "ApplyEvery"
      assert s[1]._fields == r[1]._fields
      assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(u)) == ((t + 1) % k == 0)


@pytest.mark.float64
@pytest.mark.parametrize("name", ["conditionally_transform", "conditionally_mask"])
def test_conditional_wrappers_match_optax_with_extra_args_forwarded(name):
  """The condition reads the step and a forwarded keyword argument; both branches run."""

  def should(step, sign):
    return jnp.logical_and(step % 3 != 1, sign > 0)

  with x64():
    signs = [{"sign": jnp.float64(1.0 if t % 5 else -1.0)} for t in range(len(GRADS))]
    ours = getattr(oc, name)(oc.adam(0.1), should, forward_extra_args=True)
    theirs = getattr(optax, name)(optax.adam(0.1), should, forward_extra_args=True)
    ran = set()
    for t, u, v, s, r in lockstep64(ours, theirs, GRADS, signs):
      assert_same_values(u, v, f"step {t}: updates")
      assert_same_values(s, r, f"step {t}: state")
      assert s._fields == r._fields
      ran.add(bool(should(jnp.int32(t), signs[t]["sign"])))
    assert ran == {True, False}


def test_conditionally_transform_passes_the_updates_through_when_off():
  params = {"w": jnp.ones(3)}
  g = {"w": jnp.array([1.0, -2.0, 3.0])}
  tx = oc.conditionally_transform(oc.sgd(0.5), lambda step: step >= 1)
  state = tx.init(params)
  u, state = jax.jit(tx.update)(g, state, params)
  np.testing.assert_array_equal(u["w"], g["w"])  # step 0: passed through
  u, state = jax.jit(tx.update)(g, state, params)
  np.testing.assert_allclose(u["w"], -0.5 * g["w"])
  assert int(state.step) == 2


@pytest.mark.float64
def test_monitor_snapshot_and_measure_with_ema_measure_what_optax_measures():
  def chain(lib, norm):
    return lib.chain(
      lib.sgd(0.1, 0.9),
      lib.snapshot("before_clip", norm),
      lib.monitor(
        {
          "norm": norm,
          "clipped_ema": lib.measure_with_ema(lambda u: norm(u) > 1.0, 0.9),
          "mean_ema": lib.measure_with_ema(lambda u: jax.tree.map(jnp.mean, u), 0.5, debias=False),
        }
      ),
      lib.clip_by_global_norm(1.0),
    )

  with x64():
    ours, theirs = chain(oc, oc.tree.global_norm), chain(optax, optax.tree.norm)
    seen = set()
    large = [jax.tree.map(lambda x: 3 * x, g) for g in GRADS]  # clipped at some steps
    for t, u, v, s, r in lockstep64(ours, theirs, large):
      assert_same_values(u, v, f"step {t}: updates")
      for name in ("before_clip", "norm", "clipped_ema", "mean_ema"):
        assert_same_values(optax.tree.get(s, name), optax.tree.get(r, name), f"step {t}: {name}")
      assert_same_values(s[2].measure_states, r[2].measure_states, f"step {t}: measure states")
      seen.add(float(optax.tree.get(s, "clipped_ema")))
    assert len(seen) > 2  # the boolean measurement is averaged, not constant


def test_monitor_state_keeps_its_layout_from_init_so_lax_scan_runs():
  """A documented difference: Optax's monitor starts with no measurements (its state changes
  layout at the first update); ours starts with zeros of their layout."""
  tx = oc.chain(
    oc.adam(0.1),
    oc.monitor(
      {
        "norm": oc.tree.global_norm,
        "large": oc.measure_with_ema(lambda u: oc.tree.global_norm(u) > 0.15, 0.9),
      }
    ),
  )
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  assert float(state[1].measurements["large"]) == 0.0
  assert state[1].measurements["large"].dtype == jnp.float32  # the boolean, as a float

  def step(carry, g):
    params, state = carry
    u, state = tx.update(g, state, params)
    return (oc.apply_updates(params, u), state), None

  grads = {"w": jnp.stack([jnp.full(3, 0.5), jnp.full(3, 0.01)])}
  (_, scanned), _ = jax.lax.scan(step, (params, state), grads)
  carry = (params, state)
  for t in range(2):
    carry, _ = step(carry, {"w": grads["w"][t]})
  for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(carry[1])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # Adam's first update is 0.1 sign(g), of norm 0.17 (large); its second, of norm 0.12, is not.
  np.testing.assert_allclose(scanned[1].measurements["large"], 0.09 / (1 - 0.81), rtol=1e-6)


@pytest.mark.float64
def test_periodic_and_incremental_updates_match_optax():
  with x64():
    new, old = tree64(GRADS[0]), tree64(GRADS[1])
    for steps in range(5):
      assert_same_values(
        jax.jit(oc.periodic_update, static_argnums=3)(new, old, steps, 3),
        optax.periodic_update(new, old, jnp.int32(steps), 3),
        "periodic",
      )
      assert_same_values(
        oc.periodic_update(new, old, steps, 3), new if steps % 3 == 0 else old, "periodic, eager"
      )
    for s in (0.0, 0.05, 1.0, jnp.float64(0.3)):
      with jax.numpy_dtype_promotion("standard"):
        want = optax.incremental_update(new, old, s)
      assert_same_values(oc.incremental_update(new, old, s), want, f"incremental {s}")
    with_none = oc.incremental_update({"a": None, "b": new["b"]}, {"a": None, "b": old["b"]}, 0.5)
    assert with_none["a"] is None
  low = oc.incremental_update(
    {"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.zeros(2, jnp.bfloat16)}, jnp.float32(0.25)
  )
  assert low["w"].dtype == jnp.bfloat16  # the average keeps its dtype


# --- MultiSteps' should_skip_update_fn -----------------------------------------------------------

SKIPPED = (2, 6, 7)  # a micro-step of the first real step, two in a row later


@pytest.mark.float64
@pytest.mark.parametrize("skip_fn", ["skip_not_finite", "skip_large_updates"])
def test_multi_steps_skip_matches_optax(skip_fn):
  grads = with_nonfinite(GRADS, SKIPPED)
  if skip_fn == "skip_large_updates":
    grads[4] = jax.tree.map(lambda x: 100 * x, grads[4])  # a large step, skipped too
    ours_fn = functools.partial(oc.skip_large_updates, max_squared_norm=1e3)
    theirs_fn = functools.partial(optax.skip_large_updates, max_squared_norm=1e3)
  else:
    ours_fn, theirs_fn = oc.skip_not_finite, optax.skip_not_finite
  with x64():
    ours = oc.MultiSteps(oc.adam(0.1), 3, should_skip_update_fn=ours_fn)
    theirs = optax.MultiSteps(optax.adam(0.1), 3, should_skip_update_fn=theirs_fn)
    skipped = []
    for t, u, v, s, r in lockstep64(
      ours.gradient_transformation(), theirs.gradient_transformation(), grads
    ):
      assert_same_values(u, v, f"step {t}: updates")
      assert_same_values(s, r, f"step {t}: state")  # skip_state included
      assert bool(ours.has_updated(s)) == bool(theirs.has_updated(r))
      skipped.append(bool(s.skip_state["should_skip"]))
  expected = set(SKIPPED) | ({4} if skip_fn == "skip_large_updates" else set())
  assert {t for t, x in enumerate(skipped) if x} == expected


@pytest.mark.parametrize("jit", [False, True])
def test_a_rejected_micro_step_changes_nothing_but_skip_state(jit):
  """Training with non-finite micro-gradients rejected equals training without them, bitwise
  (the same program either way); skip_state records the latest decision."""
  tx = oc.MultiSteps(oc.adamw(0.05, weight_decay=0.1), 2, should_skip_update_fn=oc.skip_not_finite)
  update = jax.jit(tx.update) if jit else tx.update
  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)

  def train(grads):
    params = f32(PARAMS)
    state = tx.init(params)
    states = []
    for g in grads:
      u, state = update(f32(g), state, params)
      params = oc.apply_updates(params, u)
      states.append(state)
    return params, states

  bad = with_nonfinite(GRADS, SKIPPED)
  p_bad, s_bad = train(bad)
  p_good, s_good = train([g for t, g in enumerate(GRADS) if t not in SKIPPED])
  for a, b in zip(jax.tree.leaves(p_bad), jax.tree.leaves(p_good)):
    np.testing.assert_array_equal(a, b)
  keep = lambda s: s._replace(skip_state=())
  for a, b in zip(jax.tree.leaves(keep(s_bad[-1])), jax.tree.leaves(keep(s_good[-1]))):
    np.testing.assert_array_equal(a, b)
  assert int(s_bad[-1].gradient_step) == (len(GRADS) - len(SKIPPED)) // 2
  assert [int(s.skip_state["num_not_finite"]) for s in s_bad] == [
    1 if t in SKIPPED else 0 for t in range(len(GRADS))
  ]
  # A rejected micro-step leaves the accumulator and the counts where they were.
  before, after = s_bad[SKIPPED[0] - 1], s_bad[SKIPPED[0]]
  for a, b in zip(jax.tree.leaves(keep(after)), jax.tree.leaves(keep(before))):
    np.testing.assert_array_equal(a, b)
  assert bool(after.skip_state["should_skip"]) and not bool(before.skip_state["should_skip"])


def test_multi_steps_builder_takes_should_skip_update_fn_too():
  params = {"w": jnp.zeros(2)}
  tx = oc.multi_steps(oc.sgd(1.0), 1, should_skip_update_fn=oc.skip_not_finite)
  state = tx.init(params)
  assert set(state.skip_state) == {"should_skip", "num_not_finite"}
  u, state = tx.update({"w": jnp.array([jnp.inf, 1.0])}, state, params)
  np.testing.assert_array_equal(u["w"], [0.0, 0.0])
  u, state = tx.update({"w": jnp.array([2.0, 1.0])}, state, params)
  np.testing.assert_array_equal(u["w"], [-2.0, -1.0])
  assert int(state.gradient_step) == 1


# --- bad input, named --------------------------------------------------------------------------

P = {"w": jnp.ones(3)}
G = {"w": jnp.full(3, 0.5)}


def _update(tx):
  return tx.update(G, tx.init(P), P)


BAD = [
  ("apply_every(2.5)", lambda: oc.apply_every(2.5), ValueError, "`k` must be a whole number"),
  ("apply_every(0)", lambda: oc.apply_every(0), ValueError, r"apply_every: `k` must lie in"),
  (
    "condition not callable",
    lambda: oc.conditionally_transform(oc.sgd(0.1), True),
    TypeError,
    "conditionally_transform: `should_transform_fn` must be a function",
  ),
  (
    "inner not a transformation",
    lambda: oc.conditionally_mask(0.1, lambda s: s > 0),
    TypeError,
    "conditionally_mask: the inner transformation is float",
  ),
  (
    "condition returns a float",
    lambda: _update(oc.conditionally_mask(oc.sgd(0.1), lambda s: s.astype(jnp.float32))),
    TypeError,
    "`should_transform_fn` must return a boolean scalar, got dtype float32",
  ),
  (
    "condition returns an array",
    lambda: _update(oc.conditionally_transform(oc.sgd(0.1), lambda s: jnp.ones(2, bool))),
    ValueError,
    r"`should_transform_fn` must return a boolean scalar, got shape \(2,\)",
  ),
  (
    "skip function not callable",
    lambda: oc.MultiSteps(oc.sgd(0.1), 2, should_skip_update_fn=1),
    TypeError,
    "multi_steps: `should_skip_update_fn` must be a function",
  ),
  (
    "skip function returns a float",
    lambda: oc.MultiSteps(
      oc.sgd(0.1), 2, should_skip_update_fn=lambda u, s, p: (jnp.float32(0.0), ())
    ).init(P),
    ValueError,
    ("`should_skip_update_fn` must return a boolean scalar array first, got dtype float32"),
  ),
  (
    "skip function returns one value",
    lambda: oc.MultiSteps(oc.sgd(0.1), 2, should_skip_update_fn=lambda u, s, p: False).init(P),
    TypeError,
    r"`should_skip_update_fn` must return a pair \(should_skip, skip_state\)",
  ),
  (
    "max_squared_norm not a number",
    lambda: oc.skip_large_updates(G, 0, P, max_squared_norm="big"),
    TypeError,
    "skip_large_updates: `max_squared_norm`",
  ),
  (
    "measure_name not a str",
    lambda: oc.snapshot(3, oc.tree.global_norm),
    TypeError,
    "snapshot: `measure_name` must be a str",
  ),
  (
    "measure not callable",
    lambda: oc.snapshot("n", "norm"),
    TypeError,
    "snapshot: `measure` must be a function",
  ),
  (
    "measures not a dict",
    lambda: oc.monitor([oc.tree.global_norm]),
    TypeError,
    "monitor: `measures` must be a dict",
  ),
  (
    "a measure neither",
    lambda: oc.monitor({"n": 3}),
    TypeError,
    r"monitor: `measures\['n'\]` is int",
  ),
  (
    "decay out of range",
    lambda: oc.measure_with_ema(oc.tree.global_norm, 1.0),
    ValueError,
    r"measure_with_ema: `decay` must lie in \[0, 1\)",
  ),
  (
    "decay a schedule",
    lambda: oc.measure_with_ema(oc.tree.global_norm, lambda c: 0.9),
    TypeError,
    "measure_with_ema: `decay` does not accept a schedule",
  ),
  (
    "step_size out of range",
    lambda: oc.incremental_update(P, P, 1.5),
    ValueError,
    r"incremental_update: `step_size` must lie in \[0, 1\]",
  ),
  (
    "update_period 0",
    lambda: oc.periodic_update(P, P, 3, 0),
    ValueError,
    r"periodic_update: `update_period` must lie in \[1, inf\)",
  ),
  (
    "update_period not whole",
    lambda: oc.periodic_update(P, P, 3, 1.5),
    ValueError,
    "periodic_update: `update_period` must be a whole number",
  ),
  (
    "another wrapper's state",
    lambda: oc.conditionally_mask(oc.sgd(0.1), lambda s: s > 0).update(
      G, oc.conditionally_transform(oc.sgd(0.1), lambda s: s > 0).init(P), P
    ),
    oc.StateMismatchError,
    "conditionally_mask: the state is a ConditionallyTransformState",
  ),
]


@pytest.mark.parametrize("make, error, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_named(make, error, message):
  with pytest.raises(error, match=message):
    make()


def test_conditionally_transform_names_an_inner_that_reshapes_the_updates():
  reshape = oc.stateless(lambda u, p: jax.tree.map(lambda x: x[:1], u))
  tx = oc.conditionally_transform(reshape, lambda s: s > 0)
  with pytest.raises(
    ValueError,
    match="conditionally_transform: the inner transformation "
    "changes the updates' structure or shapes",
  ):
    _update(tx)
