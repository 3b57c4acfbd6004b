"""The structural wrappers against Optax's of the same names (named_chain, freeze,
selective_transform, flatten, multi_transform, partition with an unused label): float64
trajectories, the states' layout, and bad input named. The registry cases
(tests/cases_structure.py) run them through the whole parity matrix besides."""

from __future__ import annotations

import collections
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import F64_RTOL, assert_rel_close, standard_promotion, x64
from problems import mlp, run

LR = 1e-2
# The MLP's biases, frozen (a static mask, as Optax's selective_transform takes).
FREEZE_BIASES = {
  "dense1": {"kernel": False, "bias": True},
  "dense2": {"kernel": False, "bias": True},
}
LABELS = {"dense1": "matrix", "dense2": {"kernel": "matrix", "bias": "vector"}}  # a prefix


def layout(state):
  """A state's layout, comparable across the two libraries (whose state classes differ but
  share their names): node names and fields, dict keys in order, and each array's shape and
  dtype."""
  if hasattr(state, "_fields"):
    return type(state).__name__, tuple(layout(getattr(state, f)) for f in state._fields)
  if isinstance(state, dict):
    return type(state).__name__, [(k, layout(v)) for k, v in state.items()]
  if isinstance(state, (tuple, list)):
    return tuple(layout(v) for v in state)
  return jnp.shape(state), jnp.result_type(state)


PAIRS = {  # name: (ours, Optax's), each a builder
  "named_chain": (
    lambda: oc.named_chain(
      ("clip", oc.clip(0.05)), ("trace", oc.trace(0.9)), ("adam", oc.adam(LR))
    ),
    lambda: optax.named_chain(
      ("clip", optax.clip(0.05)), ("trace", optax.trace(0.9)), ("adam", optax.adam(LR))
    ),
  ),
  "freeze": (
    lambda: oc.chain(oc.freeze(FREEZE_BIASES), oc.sgd(LR, 0.9)),
    lambda: optax.chain(optax.freeze(FREEZE_BIASES), optax.sgd(LR, 0.9)),
  ),
  "selective_transform": (
    lambda: oc.selective_transform(oc.adam(LR), freeze_mask=FREEZE_BIASES),
    lambda: optax.selective_transform(optax.adam(LR), freeze_mask=FREEZE_BIASES),
  ),
  "flatten": (lambda: oc.flatten(oc.adam(LR)), lambda: optax.flatten(optax.adam(LR))),
  "partition_unused_and_prefix_labels": (
    lambda: oc.partition(
      {"matrix": oc.adam(LR), "vector": oc.sgd(LR, 0.9), "unused": oc.adamw(LR)}, LABELS
    ),
    lambda: optax.partition(
      {"matrix": optax.adam(LR), "vector": optax.sgd(LR, 0.9), "unused": optax.adamw(LR)}, LABELS
    ),
  ),
}


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_float64_trajectory_and_state_match_optax(name):
  ours, theirs = PAIRS[name]
  with x64():
    prob = mlp(jnp.float64)
    got, state = run(ours(), prob, 60, True, oc.apply_updates)
    want, ref = run(standard_promotion(theirs()), prob, 60, True, optax.apply_updates)
    assert layout(state) == layout(ref)
  for t, (a, b) in enumerate(zip(got, want)):
    assert_rel_close(a, b, F64_RTOL, what=f"{name}, step {t}:")
  for leaf in jax.tree.leaves(got[-1]):
    assert leaf.dtype == jnp.float64
  moved = [
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got[-1]), jax.tree.leaves(prob.params))
  ]
  assert any(moved)
  if name in ("freeze", "selective_transform"):  # the biases stay, the kernels move
    assert moved == [False, True, False, True]  # dense1 bias, kernel; dense2 bias, kernel


def test_named_chain_state_is_keyed_in_order_and_reaches_the_members():
  params = mlp().params
  tx = oc.named_chain(("scale", oc.scale(0.5)), ("adam", oc.adam(LR)), ("clip", oc.clip(1.0)))
  state = tx.init(params)
  assert isinstance(state, collections.OrderedDict)
  assert list(state) == ["scale", "adam", "clip"]
  assert layout(state) == layout(
    optax.named_chain(
      ("scale", optax.scale(0.5)), ("adam", optax.adam(LR)), ("clip", optax.clip(1.0))
    ).init(params)
  )
  grads = jax.tree.map(jnp.ones_like, params)
  u, new = jax.jit(tx.update)(grads, state, params)
  assert list(new) == ["scale", "adam", "clip"]
  # The same step as the chain of the same members; a plain dict (a restored checkpoint's
  # sorted keys) is accepted too.
  u_chain, _ = oc.chain(oc.scale(0.5), oc.adam(LR), oc.clip(1.0)).update(
    grads, tuple(state.values()), params
  )
  u_dict, _ = tx.update(grads, dict(sorted(state.items())), params)
  for a, b, c in zip(jax.tree.leaves(u), jax.tree.leaves(u_chain), jax.tree.leaves(u_dict)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  assert int(new["adam"][0].count) == 1


def test_named_chain_passes_extra_arguments_and_nests_in_optax():
  """Optax's docstring example: polyak_sgd needs value= through the named chain."""
  tx = oc.named_chain(("scale", oc.scale(0.1)), ("sgd", oc.polyak_sgd()))
  state = tx.init(0.5)
  u, state = tx.update(0.7, state, 0.7, value=1.0)
  ref = optax.named_chain(("scale", optax.scale(0.1)), ("sgd", optax.polyak_sgd()))
  u_ref, _ = standard_promotion(ref).update(0.7, ref.init(0.5), 0.7, value=1.0)
  np.testing.assert_allclose(u, u_ref, rtol=1e-6)
  outer = optax.chain(optax.clip(1.0), oc.named_chain(("sgd", oc.sgd(0.1))))
  params = {"w": jnp.ones(2)}
  u, _ = outer.update(params, outer.init(params), params)
  np.testing.assert_allclose(u["w"], -0.1, rtol=1e-6)


def test_freeze_and_selective_transform_keep_optax_state_layouts():
  params = mlp().params
  assert layout(oc.freeze(FREEZE_BIASES).init(params)) == layout(
    optax.freeze(FREEZE_BIASES).init(params)
  )
  ours = oc.selective_transform(oc.adam(LR), freeze_mask=FREEZE_BIASES).init(params)
  ref = optax.selective_transform(optax.adam(LR), freeze_mask=FREEZE_BIASES).init(params)
  assert layout(ours) == layout(ref)
  assert isinstance(
    ours.inner_states["train"].inner_state[0].mu["dense1"]["bias"], oc.MaskedNode
  )  # no Adam moments for a frozen bias
  # A bool freezes everything or nothing; a prefix freezes a whole layer.
  grads = jax.tree.map(jnp.ones_like, params)
  for mask, frozen in (
    (True, 4),
    (False, 0),
    ({"dense1": True, "dense2": False}, 2),
    (jnp.asarray(True), 4),
  ):
    for tx in (oc.freeze(mask), oc.selective_transform(oc.sgd(LR), freeze_mask=mask)):
      u, _ = tx.update(grads, tx.init(params), params)
      assert sum(not np.any(np.asarray(x)) for x in jax.tree.leaves(u)) == frozen, mask


def test_a_callable_freeze_mask_equals_the_static_one():
  """An extension: Optax's selective_transform maps over a callable mask (freezing
  everything); ours evaluates it on the parameters, as masked and freeze do."""
  params = mlp().params
  grads = jax.tree.map(jnp.ones_like, params)
  by_fn = lambda p: jax.tree.map(lambda x: x.ndim == 1, p)
  for make in (
    lambda m: oc.freeze(m),
    lambda m: oc.selective_transform(oc.adam(LR), freeze_mask=m),
  ):
    a, b = make(FREEZE_BIASES), make(by_fn)
    sa, sb = a.init(params), b.init(params)
    assert layout(sa) == layout(sb)
    for x, y in zip(
      jax.tree.leaves(a.update(grads, sa, params)), jax.tree.leaves(b.update(grads, sb, params))
    ):
      np.testing.assert_array_equal(x, y)


def test_flatten_runs_the_inner_transformation_on_one_vector():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "s": jnp.float32(2.0)}
  tx = oc.flatten(oc.adam(LR))
  state = tx.init(params)
  assert state[0].mu.shape == (9,)  # one vector: 6 + 2 + 1
  grads = jax.tree.map(lambda p: jnp.full(jnp.shape(p), 0.5), params)
  u, state = jax.jit(tx.update)(grads, state, params)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  for leaf, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
    assert leaf.shape == jnp.shape(p)
    np.testing.assert_allclose(leaf, -LR, rtol=1e-5)
  # Leaves of two dtypes: joined in the common dtype, each update back in its leaf's dtype.
  mixed = {"w": jnp.ones(3, jnp.bfloat16), "v": jnp.ones(2)}
  u, state = tx.update(mixed, tx.init(mixed), mixed)
  assert state[0].mu.dtype == jnp.float32
  assert u["w"].dtype == jnp.bfloat16 and u["v"].dtype == jnp.float32
  # A tree without leaves (a label no leaf has) passes through.
  assert tx.update({}, tx.init({}), {})[0] == {}
  tx = oc.partition({"a": oc.flatten(oc.adam(LR)), "none": oc.flatten(oc.adam(LR))}, "a")
  u, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(u["w"], -LR, rtol=1e-5)


def test_multi_transform_is_partition_without_a_warning_as_in_optax():
  params = mlp().params
  labels = lambda p: jax.tree.map(lambda x: "matrix" if x.ndim > 1 else "vector", p)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Optax 0.2.8 keeps the name silently: -W error must pass
    tx = oc.multi_transform({"matrix": oc.adam(LR), "vector": oc.sgd(LR)}, labels)
  assert oc.MultiTransformState is oc.PartitionState
  ref = optax.multi_transform({"matrix": optax.adam(LR), "vector": optax.sgd(LR)}, labels)
  state = tx.init(params)
  assert isinstance(state, oc.MultiTransformState)
  assert layout(state) == layout(ref.init(params))
  grads = jax.tree.map(jnp.ones_like, params)
  u, _ = tx.update(grads, state, params)
  u_ref, _ = standard_promotion(ref).update(grads, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    oc.partition({"matrix": oc.adam(LR), "vector": oc.sgd(LR)}, labels)  # no warning


BAD = [  # (what, call, error, message)
  (
    "repeated names",
    lambda: oc.named_chain(("a", oc.sgd(0.1)), ("a", oc.adam(0.1))),
    ValueError,
    r"named_chain: the names must be unique.*\['a'\] appear more than once",
  ),
  (
    "a member that is not a transformation",
    lambda: oc.named_chain(("a", oc.sgd(0.1)), ("b", 3)),
    TypeError,
    r"named_chain: the transformation named 'b' \(argument 1\) is int",
  ),
  (
    "a transformation without a name",
    lambda: oc.named_chain(oc.sgd(0.1)),
    TypeError,
    r"named_chain: argument 0 is a transformation without a name",
  ),
  (
    "not a pair",
    lambda: oc.named_chain(("a", oc.sgd(0.1), "extra")),
    TypeError,
    r"named_chain: argument 0 must be a \(name, transformation\) pair",
  ),
  (
    "an unhashable name",
    lambda: oc.named_chain((["a"], oc.sgd(0.1))),
    TypeError,
    r"named_chain: the name of argument 0 is list",
  ),
  (
    "an averager before a change",
    lambda: oc.named_chain(("avg", oc.ema_params(0.9)), ("sgd", oc.sgd(0.1))),
    ValueError,
    r"named_chain \(\['avg', 'sgd'\]\).*averages the parameters",
  ),
  (
    "another state",
    lambda: oc.named_chain(("a", oc.sgd(0.1))).update({"w": jnp.ones(2)}, (), {"w": jnp.ones(2)}),
    ValueError,
    r"named_chain of \['a'\] got a tuple as its state",
  ),
  (
    "a member's state of another kind",
    lambda: oc.named_chain(("a", oc.adam(0.1))).update(
      {"w": jnp.ones(2)}, {"a": oc.sgd(0.1, 0.9).init({"w": jnp.ones(2)})}, {"w": jnp.ones(2)}
    ),
    oc.StateMismatchError,
    r"state\['a'\]\[0\] is a TraceState",
  ),
  (
    "a mask leaf that is not a bool",
    lambda: oc.freeze({"w": 1}),
    TypeError,
    r"freeze: `mask\['w'\]` is int",
  ),
  ("no mask", lambda: oc.freeze(None), TypeError, r"freeze: `mask` is None"),
  (
    "a mask that does not fit",
    lambda: oc.freeze({"v": True}).init({"w": jnp.ones(2)}),
    ValueError,
    r"freeze: `mask` is neither the parameter tree's structure",
  ),
  (
    "an optimizer that is not a transformation",
    lambda: oc.selective_transform(oc.adam, freeze_mask=True),
    TypeError,
    r"selective_transform: `optimizer` is function",
  ),
  (
    "a freeze_mask leaf that is not a bool",
    lambda: oc.selective_transform(oc.adam(0.1), freeze_mask={"w": "yes"}),
    TypeError,
    r"selective_transform: `freeze_mask\['w'\]` is str",
  ),
  (
    "a callable freeze_mask returning non-bools",
    lambda: oc.selective_transform(oc.adam(0.1), freeze_mask=lambda p: {"w": 0}).init(
      {"w": jnp.ones(2)}
    ),
    TypeError,
    r"selective_transform: `freeze_mask\['w'\]` is int",
  ),
  (
    "a freeze_mask that does not fit",
    lambda: oc.selective_transform(oc.adam(0.1), freeze_mask={"v": True}).init({"w": jnp.ones(2)}),
    ValueError,
    r"selective_transform: `freeze_mask` is neither",
  ),
  (
    "freeze_mask given positionally (keyword-only, as in Optax)",
    lambda: oc.selective_transform(oc.adam(0.1), True),
    TypeError,
    "positional",
  ),
  (
    "flatten of a factory",
    lambda: oc.flatten(oc.adam),
    TypeError,
    r"flatten: `inner` is function, not a gradient transformation",
  ),
  (
    "a partition label naming no transformation",
    lambda: oc.partition({"a": oc.sgd(0.1), "unused": oc.sgd(0.1)}, {"w": "b"}).init(
      {"w": jnp.ones(2)}
    ),
    ValueError,
    r"\['w'\] has label 'b', which names no transformation",
  ),
]


@pytest.mark.parametrize("what, call, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named(what, call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_a_user_transformation_without_keyword_arguments_works_in_chain_and_partition():
  """``GradientTransformation(init, update)`` with a plain ``update(updates, state,
  params=None)`` (as Optax's base class allows): the combinators call it without the
  keyword arguments meant for the others."""

  def init(params):
    return ()

  def update(updates, state, params=None):
    return jax.tree.map(lambda u: 2.0 * u, updates), state

  double = oc.GradientTransformation(init, update)
  params = {"w": jnp.ones(2), "v": jnp.ones(1)}
  chained = oc.chain(double, oc.sgd(1.0))
  updates, _ = chained.update(params, chained.init(params), params, value=jnp.float32(1.0))
  np.testing.assert_array_equal(updates["w"], -2.0)
  split = oc.partition({"a": double, "b": oc.sgd(1.0)}, {"w": "a", "v": "b"})
  updates, _ = split.update(params, split.init(params), params, value=jnp.float32(1.0))
  np.testing.assert_array_equal(updates["w"], 2.0)
  np.testing.assert_array_equal(updates["v"], -1.0)


def test_with_extra_args_support_lets_a_plain_update_ignore_keyword_arguments():
  plain = optax.GradientTransformation(lambda params: (), lambda u, s, params=None: (u, s))
  params = {"w": jnp.ones(2)}
  for lib in (oc, optax):
    tx = lib.with_extra_args_support(plain)
    updates, _ = tx.update(params, tx.init(params), params, value=jnp.float32(1.0))
    np.testing.assert_array_equal(updates["w"], 1.0)
  ours = oc.sgd(0.1)
  assert oc.with_extra_args_support(ours) is ours  # already takes them: returned as is
