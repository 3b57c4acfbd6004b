"""Property-based tests through optcompose.testing: every invariant over every public
transformation, drawn hyperparameters, drawn trees, extreme gradients, chain associativity,
and the completeness of the strategy table."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import optcompose as oc
from jax.sharding import PartitionSpec as P
from optcompose.core.registry import REGISTRY
from optcompose import testing as oct
from optcompose.testing import strategies as ocst
from registry import CASES

PUBLIC = oc.TRANSFORMATIONS + oc.OPTIMIZERS + oc.WRAPPERS


def fast(max_examples):
  """Few examples, reproducible (derandomized), no deadline (the first call compiles)."""
  return settings(
    max_examples=max_examples,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
  )


# Nested dict, tuple and NamedTuple nodes, a scalar and a zero-size leaf.
PARAMS = {
  "dense": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.zeros(4)},
  "pair": ocst.Pair(jnp.float32(0.5), jnp.zeros((0, 3))),
  "stack": (jnp.linspace(0.1, 0.9, 4).reshape(2, 2), jnp.cos(jnp.arange(5.0))),
}


def grads_at(params, step):
  """A deterministic gradient that changes with the step and the parameters."""
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + 0.7 * step) + 0.1 * p, params)


def sam_extra(params):
  return {"grad_fn": lambda p: grads_at(p, 0)}


def objective(params):
  """A smooth objective for the line searches, which evaluate it (0.5 |w|^2, gradient w)."""
  return sum(0.5 * jnp.sum(jnp.asarray(x, jnp.float32) ** 2) for x in jax.tree.leaves(params))


LINE_SEARCHES = ("scale_by_zoom_linesearch", "scale_by_backtracking_linesearch")


def linesearch_extra(params):
  """What a line search's update needs besides the updates: the objective, its value and
  gradient at ``params`` (held fixed over the few steps of a check)."""
  return {"value": objective(params), "grad": params, "value_fn": objective}


# --- 1. every invariant, every registry case -----------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_invariant_holds_for_every_registry_case(case):
  extra = {"value": jnp.float32(1.5)} if case.with_value else None
  oct.check_invariants(case.ours(), PARAMS, grads_at, extra=extra)


def test_every_invariant_holds_for_sharpness_aware():
  tx = oc.chain(oc.sharpness_aware(0.05), oc.sgd(0.1, 0.9))
  oct.check_invariants(tx, PARAMS, grads_at, extra=sam_extra(PARAMS), vmap=False)


def missing_strategies(table, public):
  return sorted(set(public) - set(table))


def test_every_public_name_has_a_hyperparameter_strategy():
  assert missing_strategies(ocst.HYPERPARAMETERS, PUBLIC) == []
  assert set(ocst.HYPERPARAMETERS) <= set(PUBLIC), "a strategy for a name that is not public"


def test_strategy_completeness_check_catches_a_missing_name():
  without = {k: v for k, v in ocst.HYPERPARAMETERS.items() if k != "clip_by_global_norm"}
  assert missing_strategies(without, PUBLIC) == ["clip_by_global_norm"]


# --- 2. drawn hyperparameters, every public name ----------------------------------------------

SMALL = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.full((3,), 0.25)}


@pytest.mark.parametrize("name", sorted(ocst.HYPERPARAMETERS))
def test_drawn_hyperparameters_give_finite_well_formed_steps(name):
  extra = {"value": jnp.float32(2.0)}
  if name == "sharpness_aware":
    extra["grad_fn"] = lambda p: grads_at(p, 0)
  if name in LINE_SEARCHES:
    extra.update(linesearch_extra(SMALL))

  # Optax-style lookahead trains a (fast, slow) pair from gradients of the fast weights and
  # returns updates for the pair, so its updates are not shaped like its gradients.
  pair = name == "lookahead"
  params = oc.LookaheadParams.init_synced(SMALL) if pair else SMALL
  grads = (lambda p, t: grads_at(p.fast, t)) if pair else grads_at

  # A line search's eager step compiles its while_loop anew (as Optax's): fewer draws.
  @fast(2 if name in LINE_SEARCHES else 6)
  @given(ocst.hyperparameters(name))
  def check(kwargs):
    tx = ocst.build(name, kwargs)
    if name == "sharpness_aware":
      tx = oc.chain(tx, oc.sgd(0.1))
    if not pair:
      oct.check_updates_like_grads(tx, params, grads, steps=3, extra=extra)
    oct.check_finite(tx, params, grads, steps=3, extra=extra)

  check()


# --- 3. drawn trees: every structure and dtype ------------------------------------------------

TREE_OPTIMIZERS = {
  "sgd_nesterov": lambda: oc.sgd(0.1, 0.9, nesterov=True),
  "adamw": lambda: oc.adamw(1e-2, weight_decay=0.1),
  "rmsprop_centered": lambda: oc.rmsprop(1e-2, centered=True),
  "clip_adagrad": lambda: oc.chain(oc.clip_by_global_norm(1.0), oc.adagrad(0.1)),
  "masked_adam": lambda: oc.masked(oc.adam(1e-2), lambda p: jax.tree.map(lambda x: x.ndim > 0, p)),
}


@pytest.mark.parametrize("name", sorted(TREE_OPTIMIZERS))
def test_any_tree_of_any_float_dtype_keeps_structure_and_dtypes(name):
  tx = TREE_OPTIMIZERS[name]()

  @fast(8)
  @given(ocst.pytrees().flatmap(lambda p: st.tuples(st.just(p), ocst.gradients_like(p, False))))
  def check(params_grads):
    params, grads = params_grads
    oct.check_updates_like_grads(tx, params, grads)
    oct.check_state_keeps_its_layout(tx, params, grads, jit=False)  # a new tree: no compile
    oct.check_finite(tx, params, grads)

  check()


def test_drawn_trees_cover_what_the_strategy_promises():
  """The strategy really draws scalars, zero-size leaves, NamedTuples and every dtype."""
  seen = set()

  @fast(150)
  @given(ocst.pytrees(max_leaves=6))
  def collect(tree):
    for leaf in jax.tree.leaves(tree):
      seen.add(str(leaf.dtype))
      seen.add("scalar" if leaf.ndim == 0 else "empty" if leaf.size == 0 else "array")
    if any(
      isinstance(n, ocst.Pair)
      for n in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, ocst.Pair))
    ):
      seen.add("namedtuple")

  collect()
  assert {"float32", "bfloat16", "float16", "scalar", "empty", "array", "namedtuple"} <= seen


# --- 4. extreme gradients: compiled once per optimizer, values drawn --------------------------

EXTREME_CASES = [
  "sgd_momentum",
  "adam",
  "adamw",
  "rmsprop",
  "adagrad",
  "clip_by_global_norm",
  "nadamw",
  "lookahead",
  "clip",
  "adaptive_grad_clip",
]


@pytest.mark.parametrize("name", EXTREME_CASES)
def test_gradients_from_1e_minus30_to_1e30_give_no_nan(name):
  """Finite gradients of any magnitude, zeros and signed zeros: updates and parameters
  never become NaN (a second moment may saturate to inf, and then divides to zero)."""
  tx = next(c for c in CASES if c.name == name).ours()
  params = {"w": jnp.linspace(-1.0, 1.0, 8), "b": jnp.float32(0.5)}
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))

  @fast(25)
  @given(st.lists(ocst.gradients_like(params), min_size=3, max_size=3))
  def check(grads_seq):
    p, state = params, tx.init(params)
    for g in grads_seq:
      u, state = step(g, state, p)
      p = oc.apply_updates(p, u)
      for path, x in jax.tree_util.tree_flatten_with_path((u, p))[0]:
        assert not bool(jnp.any(jnp.isnan(x))), f"NaN at {jax.tree_util.keystr(path)}"

  check()


# --- 5. chain is associative -------------------------------------------------------------------

# Every public transformation: a chain hands each member its input, the params and the
# caller's keywords (here the loss for reduce_on_plateau and the second gradient evaluation
# for sharpness_aware), and nothing else. The averagers (ema_params, swa) come last, the only
# place a chain accepts them.
_NOT_AVERAGERS = tuple(n for n in oc.TRANSFORMATIONS if not REGISTRY[n].averager)


@fast(40)
@given(
  st.lists(ocst.transformations(_NOT_AVERAGERS), min_size=2, max_size=2),
  ocst.transformations(oc.TRANSFORMATIONS),
)
def test_chain_is_associative(two, last):
  (_, a), (_, b), (_, c) = *two, last
  left, right = oc.chain(oc.chain(a, b), c), oc.chain(a, oc.chain(b, c))
  state_l, state_r = left.init(SMALL), right.init(SMALL)
  np.testing.assert_equal(len(jax.tree.leaves(state_l)), len(jax.tree.leaves(state_r)))
  p = SMALL
  for t in range(3):
    g = grads_at(p, t)
    extra = {**linesearch_extra(p), "grad_fn": lambda q, t=t: grads_at(q, t)}
    u_l, state_l = left.update(g, state_l, p, **extra)
    u_r, state_r = right.update(g, state_r, p, **extra)
    for x, y in zip(jax.tree.leaves((u_l, state_l)), jax.tree.leaves((u_r, state_r))):
      np.testing.assert_array_equal(x, y)
    p = oc.apply_updates(p, u_l)


# --- 6. docs/guides/testing.md's example of testing your own transformation -------------------


def test_readme_example_of_testing_a_user_transformation(tmp_path):
  """Hypothesis reads a test's source, so the block runs as a real module, not via exec."""
  import importlib.util
  import re
  from pathlib import Path

  readme = (Path(__file__).parents[1] / "docs" / "guides" / "testing.md").read_text()
  block = next(
    b for b in re.findall(r"```py\n(.*?)```", readme, re.S) if "runs this block as a module" in b
  )
  path = tmp_path / "readme_property_example.py"
  path.write_text(block)
  spec = importlib.util.spec_from_file_location("readme_property_example", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # the block ends by calling its test
  # And the kit would catch a broken transformation: one that changes the update's dtype.
  good = module.sign_descent(0.1)
  broken = oc.GradientTransformation(
    good.init,
    lambda u, s, p=None, **e: (
      jax.tree.map(lambda x: x.astype(jnp.float16), good.update(u, s, p)[0]),
      s,
    ),
  )
  with pytest.raises(AssertionError, match="updates"):
    oct.check_invariants(broken, SMALL, grads_at)


def test_the_donation_check_catches_a_state_sharing_a_buffer():
  zeros = {"w": jnp.zeros(3)}
  shared = oc.GradientTransformation(lambda p: (zeros, zeros), lambda u, s, p=None, **k: (u, s))
  with pytest.raises(AssertionError, match=r"one buffer"):
    oct.check_state_can_be_donated(shared, {"w": jnp.ones(3)})
  oct.check_state_can_be_donated(oc.lbfgs(), {"w": jnp.ones(3)})  # Optax 0.2.8's shares two


def test_the_donation_check_reads_the_shards_of_replicated_parameters():
  """Parameters replicated over 8 devices (each shard its own buffer): a stateless and a
  stateful transformation pass; a state that keeps the parameters is reported."""
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices")
  mesh = jax.make_mesh((8,), ("data",), devices=devices[:8])
  params = jax.device_put({"w": jnp.ones(16)}, jax.sharding.NamedSharding(mesh, P()))
  for tx in (oc.sgd(0.1), oc.adam(1e-3)):
    oct.check_state_can_be_donated(tx, params)
  keeps = oc.GradientTransformation(lambda p: {"avg": p}, lambda u, s, p=None, **k: (u, s))
  with pytest.raises(AssertionError, match="one buffer"):
    oct.check_state_can_be_donated(keeps, params)


def test_the_donation_check_catches_a_state_that_is_the_parameters():
  """An ``init`` that keeps the parameters themselves (an average started at them, without a
  copy): a step donating parameters and state would donate one buffer twice."""
  keeps = oc.GradientTransformation(lambda p: {"avg": p}, lambda u, s, p=None, **k: (u, s))
  params = {"w": jnp.ones(3)}
  with pytest.raises(
    AssertionError,
    match=r"state\['avg'\]\['w'\] and params\['w'\] are one "
    r"buffer.*must copy",
  ):
    oct.check_state_can_be_donated(keeps, params)
  copies = oc.GradientTransformation(
    lambda p: {"avg": jax.tree.map(jnp.copy, p)}, lambda u, s, p=None, **k: (u, s)
  )
  oct.check_state_can_be_donated(copies, params)


def test_the_finiteness_check_skips_inputs_whose_arithmetic_overflows_but_not_a_fault():
  """Gradients near float32's largest value: three steps of ``identity`` overflow the
  parameters by arithmetic alone, which check_invariants does not report; an update that
  overflows from moderate gradients (a factor of 1e40) is reported."""
  params = {"w": jnp.zeros(2)}
  huge = lambda p, t: {"w": jnp.asarray([3e38, 1.0])}  # noqa: E731
  for tx in (oc.identity(), oc.sgd(1.0), oc.centralize()):
    oct.check_invariants(tx, params, huge)
  blows_up = oc.GradientTransformation(
    lambda p: oc.EmptyState(),
    lambda u, s, p=None, **k: (jax.tree.map(lambda g: g * jnp.float32(1e30) * 1e10, u), s),
  )
  with pytest.raises(AssertionError, match="finite inputs, but"):
    oct.check_invariants(blows_up, PARAMS, grads_at)
  # Moderate user inputs (gradients that do not follow the parameters), a state that
  # overflows at the second step from the parameters the transformation itself blew up.
  squares = oc.GradientTransformation(
    lambda p: {"sq": jnp.zeros([])},
    lambda u, s, p=None, **k: (
      jax.tree.map(lambda g: g * 1e20, u),
      {"sq": sum(jnp.sum(x * x) for x in jax.tree.leaves(p))},
    ),
  )
  with pytest.raises(AssertionError, match=r"step 1: .*\['sq'\] is not finite"):
    oct.check_invariants(
      squares, {"w": jnp.full(2, 0.5, jnp.float32)}, lambda p, t: {"w": jnp.ones(2)}, vmap=False
    )


def test_the_donation_check_tells_empty_arrays_apart_by_object():
  """An empty leaf has no memory to point at (on GPU every empty array reports one address):
  two empty arrays pass, one empty array object twice does not (JAX refuses to donate it
  twice, empty or not)."""
  empty = jnp.zeros((0, 3))
  twice = oc.GradientTransformation(lambda p: (empty, empty), lambda u, s, p=None, **k: (u, s))
  with pytest.raises(AssertionError, match=r"one buffer"):
    oct.check_state_can_be_donated(twice, {"w": empty})
  two = oc.GradientTransformation(
    lambda p: (jnp.zeros((0, 3)), jnp.zeros((0, 3))), lambda u, s, p=None, **k: (u, s)
  )
  oct.check_state_can_be_donated(two, {"w": empty})


def test_lbfgs_steps_with_its_state_donated():
  params = {"w": jnp.linspace(-1.0, 1.0, 5)}
  tx = oc.lbfgs()
  objective = lambda p: jnp.sum((p["w"] - 0.5) ** 2)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state):
    value, grad = jax.value_and_grad(objective)(params)
    updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return oc.apply_updates(params, updates), state

  params, state = step(params, tx.init(params))
  params, state = step(params, state)
  np.testing.assert_allclose(params["w"], 0.5, atol=1e-5)


# --- 7. what a user's own transformation gets wrong (from a user's trial of the kit) ----------


def _python_warmup():
  """A Python-side counter: eager steps scale by 0.5, 1, 1; jit freezes the first trace."""
  calls = [0]

  def update(u, s, p=None, **extra):
    calls[0] += 1
    return jax.tree.map(lambda g: -min(calls[0] / 2, 1.0) * g, u), s

  return oc.GradientTransformation(lambda p: oc.EmptyState(), update)


def test_a_bfloat16_leaf_does_not_hide_a_jit_difference_in_the_others():
  """The tolerance was 32 bfloat16 ulps (0.25) for every leaf once one leaf was bfloat16:
  a 60% difference between jit and eager passed. Now 4 of its ulps for wider leaves, 8 for
  the bfloat16 leaf itself (the registry measures under 1)."""
  params = {"w": jnp.ones(4), "emb": jnp.ones(2, jnp.bfloat16)}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  for check in (oct.check_invariants, oct.check_jit_matches_eager):
    with pytest.raises(AssertionError, match="jit against eager"):
      check(_python_warmup(), params, grads)
  tx = oc.adam(1e-2, mu_dtype=jnp.bfloat16)  # a correct mixed-precision step still passes
  oct.check_invariants(tx, params, grads)


def test_empty_and_weakly_typed_parameters_are_not_blamed_on_the_transformation():
  for params in ({}, (), {"temperature": jnp.array(1.0)}):  # the last one weakly typed
    for tx in (oc.identity(), oc.adam(1e-3)):
      oct.check_invariants(tx, params, jax.tree.map(jnp.ones_like, params))
      oct.check_no_recompilation(tx, params, jax.tree.map(jnp.ones_like, params))


def test_the_kit_names_what_a_users_transformation_got_wrong():
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}

  def build(init, update):
    return oc.GradientTransformation(init, update)

  weak_state = build(
    lambda p: {"t": jnp.asarray(0.0)}, lambda u, s, p=None, **e: (u, {"t": s["t"] + jnp.float32(1)})
  )
  with pytest.raises(AssertionError, match=r"traced 2 times.*state\['t'\] is weakly typed float32"):
    oct.check_invariants(weak_state, params, grads)

  def in_place(u, s, p=None, **e):
    s["ring"][0] = jnp.float32(1)
    return u, s

  ring = build(lambda p: {"ring": [jnp.float32(0)]}, in_place)
  with pytest.raises(
    AssertionError, match=r"changed the state it was given, in place \(state\['ring'\]\[0\]\)"
  ):
    oct.check_invariants(ring, params, grads)

  # The updates or parameters rewritten in place were reported as a difference between the
  # jitted and the eager run (the custom-transformation trial).
  def halving(which):
    def update(u, s, p=None, **e):
      tree = u if which == "updates" else p
      tree["w"] = tree["w"] * 0.5
      return jax.tree.map(jnp.negative, u), s

    return build(lambda p: oc.EmptyState(), update)

  for which in ("updates", "params"):
    with pytest.raises(
      AssertionError, match=rf"changed the {which} it was given, in place \({which}\['w'\]\)"
    ):
      oct.check_invariants(halving(which), params, grads)

  twice = build(
    lambda p: {"a": jnp.zeros(3), "b": jnp.ones(3)},
    lambda u, s, p=None, **e: (u, {"a": u["w"], "b": u["w"]}),
  )
  with pytest.raises(AssertionError, match=r"one buffer: the state from update cannot be donated"):
    oct.check_invariants(twice, params, grads)

  # Optax's class claims keyword arguments for an update that takes none (ours wraps it).
  no_kwargs = optax.GradientTransformationExtraArgs(
    lambda p: oc.EmptyState(), lambda u, s, p=None: (u, s)
  )
  with pytest.raises(AssertionError, match=r"end its signature with \*\*extra"):
    oct.check_invariants(no_kwargs, params, grads)
  wrapped = build(lambda p: oc.EmptyState(), lambda u, s, p=None: (u, s))
  oct.check_invariants(wrapped, params, grads)  # ours: takes and drops them

  python_count = build(lambda p: {"n": 0}, lambda u, s, p=None, **e: (u, {"n": s["n"] + 1}))
  with pytest.raises(AssertionError, match=r"init returned a Python number at state\['n'\]"):
    oct.check_invariants(python_count, params, grads)
  no_state = build(lambda p: oc.EmptyState(), lambda u, s, p=None, **e: u)
  with pytest.raises(TypeError, match=r"step 0: `update` must return a pair"):
    oct.check_invariants(no_state, params, grads)


def test_a_bfloat16_leaf_loosens_the_kit_s_tolerance_for_its_own_parameter_only():
  """A jit-only 2% error on a float32 leaf is caught with a bfloat16 parameter elsewhere in
  the tree (the bfloat16 tolerance used to apply to every leaf), while Adam with a bfloat16
  ``mu`` for float32 parameters (its moment and update of one parameter) still passes."""
  f32, bf16 = jnp.array([100.0, 0.001, 0.002]), jnp.ones(3, jnp.bfloat16)
  jit_only = oc.stateless_with_tree_map(
    lambda g, w: g * 1.02 if isinstance(g, jax.core.Tracer) else g
  )
  for params in ({"a": f32}, {"a": f32, "b": bf16}):
    with pytest.raises(AssertionError, match=r"jit against eager.*\['a'\]"):
      oct.check_invariants(jit_only, params, jax.tree.map(jnp.ones_like, params))
  params = {"a": f32, "b": bf16}
  grads = jax.tree.map(lambda x: jnp.cos(x) + 0.3, params)
  oct.check_invariants(oc.adam(1e-2, mu_dtype=jnp.bfloat16), params, grads)


def test_an_optional_value_argument_is_not_passed_by_the_unknown_keyword_check():
  """Optax's own ``value`` keyword: a transformation that uses it when given is correct."""

  def update(u, s, p=None, value=None, **extra):
    return (u if value is None else jax.tree.map(lambda g: g / 2, u)), s

  oct.check_invariants(
    oc.GradientTransformation(lambda p: oc.EmptyState(), update), SMALL, grads_at
  )


def test_a_state_value_init_marks_unknown_may_stay_unknown():
  """with_diagnostics records NaN as the learning rate where none is recorded or given (as
  documented); the kit's finiteness check failed it (the custom-transformation trial). A
  value init made finite must stay finite."""
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
  for inner in (oc.sgd(0.1), oc.adam(1e-3)):
    oct.check_invariants(oc.with_diagnostics(inner), params, grads, vmap=False)
  nan_later = oc.GradientTransformation(
    lambda p: {"x": jnp.zeros([], jnp.float32)},
    lambda u, s, p=None, **e: (u, {"x": s["x"] + jnp.float32(jnp.nan)}),
  )
  with pytest.raises(AssertionError, match=r"\[2\]\['x'\] is not finite"):
    oct.check_invariants(nan_later, params, grads, vmap=False)
  oct.check_finite(oc.with_diagnostics(oc.sgd(0.1)), params, grads)
  # Only a scalar NaN is a marker: statistics initialised NaN by mistake are still a fault.
  nan_statistics = oc.GradientTransformation(
    lambda p: {"stat": jnp.full(3, jnp.nan)},
    lambda u, s, p=None, **e: (u, {"stat": s["stat"] * 0.9 + 0.1 * u["w"]}),
  )
  with pytest.raises(AssertionError, match=r"\['stat'\] is not finite"):
    oct.check_invariants(nan_statistics, params, grads, vmap=False)


def test_the_kit_blames_the_input_that_was_rewritten_in_place():
  """A leaf appended to the state's list, in place, shifted the paths of the flattened
  inputs after it, and the kit blamed the updates (the review)."""
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}

  def appending(u, s, p=None, **e):
    s.append(jnp.zeros([], jnp.int32))
    return u, list(s[:1])

  tx = oc.GradientTransformation(lambda p: [jnp.zeros([], jnp.int32)], appending)
  with pytest.raises(
    AssertionError, match=r"changed the state it was given, in place \(state\[1\]\)"
  ):
    oct.check_invariants(tx, params, grads, vmap=False)


def test_hyperparameters_of_a_builder_of_the_users_are_drawn_from_its_spec():
  """An entry added to HYPERPARAMETERS draws; build, which makes the public builders, says
  how to build one's own (it failed with "module 'optcompose' has no attribute")."""
  spec = {"learning_rate": ("float", 1e-4, 1e-1), "steps": ("int", 1, 3)}
  ocst.HYPERPARAMETERS["users_own"] = spec
  try:

    @settings(max_examples=10, deadline=None, database=None)
    @given(ocst.hyperparameters("users_own"))
    def drawn(kw):
      assert set(kw) == set(spec)
      assert 1e-4 <= kw["learning_rate"] <= 1e-1 and kw["steps"] in (1, 2, 3)

    drawn()
    with pytest.raises(KeyError, match=r"hyperparameters\('users_own'\)\.map"):
      ocst.build("users_own", {"learning_rate": 0.1, "steps": 1})
  finally:
    del ocst.HYPERPARAMETERS["users_own"]
