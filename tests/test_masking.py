"""Masks and partitions on plain dicts (linen), nnx.State and Equinox modules."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optcompose as oc
from compat import pure
from numerics import standard_promotion

PARAMS = {
  "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
  "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
}
NO_DECAY = r"bias|scale"


def test_path_mask_and_labels_on_a_linen_style_dict():
  mask = oc.mask_from_paths(exclude=NO_DECAY)(PARAMS)
  assert mask == {
    "dense": {"kernel": True, "bias": False},
    "LayerNorm_0": {"scale": False, "bias": False},
  }
  labels = oc.labels_from_paths([(r"LayerNorm", "frozen"), (r"kernel", "decay")], "other")(PARAMS)
  assert labels == {
    "dense": {"kernel": "decay", "bias": "other"},
    "LayerNorm_0": {"scale": "frozen", "bias": "frozen"},
  }


def test_masked_decay_with_path_patterns_on_nnx_leaves_bias_and_norm_scale():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)

  model = Net(nnx.Rngs(0))
  model.dense.bias[...] = jnp.full(4, 0.5)
  opt = nnx.Optimizer(
    model, oc.adamw(0.1, weight_decay=0.5, mask=oc.mask_from_paths(exclude=NO_DECAY)), wrt=nnx.Param
  )
  before = jax.tree.map(np.asarray, pure(nnx.state(model, nnx.Param)))
  opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
  after = pure(nnx.state(model, nnx.Param))
  np.testing.assert_allclose(after["dense"]["kernel"], before["dense"]["kernel"] * 0.95, rtol=1e-6)
  for path in (("dense", "bias"), ("norm", "scale"), ("norm", "bias")):
    np.testing.assert_array_equal(after[path[0]][path[1]], before[path[0]][path[1]])


def test_partition_with_frozen_leaves_has_no_state_for_them():
  labels = oc.labels_from_paths([(r"LayerNorm", "frozen")], "train")
  tx = oc.partition({"train": oc.adam(0.1), "frozen": oc.set_to_zero()}, labels)
  state = tx.init(PARAMS)
  sizes = sum(x.size for x in jax.tree.leaves(state))
  trainable = sum(x.size for x in jax.tree.leaves(PARAMS["dense"]))
  assert sizes == 2 * trainable + 1  # mu and nu for the dense layer only, plus the count
  u, state = jax.jit(tx.update)(PARAMS, state, PARAMS)
  for leaf in jax.tree.leaves(u["LayerNorm_0"]):
    np.testing.assert_array_equal(leaf, 0.0)
  np.testing.assert_allclose(u["dense"]["kernel"], -0.1, rtol=1e-5)


def test_partition_errors_name_the_leaf_and_the_labels():
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\] has label 'b'"):
    oc.partition(
      {"a": oc.sgd(0.1)}, {"dense": {"kernel": "a", "bias": "b"}, "LayerNorm_0": "a"}
    ).init(PARAMS)


def _layout(state):
  """A state's layout, comparable across the two libraries (whose state classes differ but
  share their names): node names and fields, and each array's shape and dtype."""
  if hasattr(state, "_fields"):
    return type(state).__name__, tuple(_layout(getattr(state, f)) for f in state._fields)
  if isinstance(state, dict):
    return {k: _layout(v) for k, v in state.items()}
  if isinstance(state, (tuple, list)):
    return tuple(_layout(v) for v in state)
  return jnp.shape(state), jnp.result_type(state)


def test_partition_allows_a_label_without_leaves_as_optax_does():
  """Muon-style recipes name groups a model may lack: the unused label's transformation
  sees one MaskedNode for the whole tree, and its state is Optax's (here a bare count)."""
  ours = oc.partition({"a": oc.adam(0.1), "unused": oc.adam(0.1)}, "a")
  theirs = standard_promotion(
    optax.partition({"a": optax.adam(0.1), "unused": optax.adam(0.1)}, "a")
  )
  state, ref = ours.init(PARAMS), theirs.init(PARAMS)
  assert _layout(state) == _layout(ref)
  assert isinstance(state.inner_states["unused"].inner_state[0].mu, oc.MaskedNode)
  u, state = jax.jit(ours.update)(PARAMS, state, PARAMS)
  u_ref, ref = theirs.update(PARAMS, ref, PARAMS)
  assert _layout(state) == _layout(ref)
  np.testing.assert_allclose(u["dense"]["kernel"], u_ref["dense"]["kernel"], rtol=1e-6)
  assert int(state.inner_states["unused"].inner_state[0].count) == 1  # counted, as Optax


def test_a_false_prefix_masks_the_subtree_as_one_node_as_optax_does():
  """mask {'dense': ..., 'LayerNorm_0': False} hides the whole LayerNorm subtree behind one
  MaskedNode in the inner state (not one per leaf), in masked and in partition."""
  mask = {"dense": True, "LayerNorm_0": False}
  ours, theirs = oc.masked(oc.scale_by_adam(), mask), optax.masked(optax.scale_by_adam(), mask)
  state = ours.init(PARAMS)
  assert isinstance(state.inner_state.mu["LayerNorm_0"], oc.MaskedNode)
  assert _layout(state) == _layout(theirs.init(PARAMS))
  u, _ = ours.update(PARAMS, state, PARAMS)
  np.testing.assert_array_equal(u["LayerNorm_0"]["scale"], PARAMS["LayerNorm_0"]["scale"])
  labels = {"dense": "train", "LayerNorm_0": "frozen"}
  ours = oc.partition({"train": oc.adam(0.1), "frozen": oc.set_to_zero()}, labels)
  theirs = optax.partition({"train": optax.adam(0.1), "frozen": optax.set_to_zero()}, labels)
  assert _layout(ours.init(PARAMS)) == _layout(theirs.init(PARAMS))
  # A static mask finer than a subtree an outer mask hid still applies (collapsed there).
  inner = oc.masked(
    oc.scale(2.0),
    {"dense": {"kernel": True, "bias": False}, "LayerNorm_0": {"scale": True, "bias": True}},
  )
  tx = oc.masked(inner, mask)
  u, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
  np.testing.assert_array_equal(u["dense"]["kernel"], 2.0)
  np.testing.assert_array_equal(u["dense"]["bias"], 1.0)
  np.testing.assert_array_equal(u["LayerNorm_0"]["scale"], 1.0)


def test_equinox_s_frozen_layer_example_inits_sgd_on_the_whole_model_as_optax():
  """Equinox's frozen-layer example gives sgd's init the whole MLP (its activation, a
  function, among the leaves) and trains the last layer only; a stateless init read the
  leaves and refused the function (the real-code trial). The trajectory is Optax's."""

  def train(lib):
    model = eqx.nn.MLP(1, 1, width_size=8, depth=1, key=jax.random.PRNGKey(5678))
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(
      lambda t: (t.layers[-1].weight, t.layers[-1].bias), spec, replace=(True, True)
    )
    tx = lib.sgd(3e-3)
    state = tx.init(model)

    @eqx.filter_jit
    def step(model, state, x):
      diff, static = eqx.partition(model, spec)
      loss = lambda d: jnp.mean((5 * x - 2 - jax.vmap(eqx.combine(d, static))(x)) ** 2)
      updates, state = tx.update(eqx.filter_grad(loss)(diff), state)
      return eqx.apply_updates(model, updates), state

    for i in range(5):
      model, state = step(model, state, jnp.linspace(-1.0, 1.0, 8)[:, None] * (i + 1))
    return eqx.filter(model, eqx.is_array)

  finals = [train(oc), train(optax)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), *finals)
  with pytest.raises(TypeError, match=r"`params\.activation` is a custom_jvp"):
    oc.adam(1e-3).init(eqx.nn.MLP(1, 1, 8, 1, key=jax.random.PRNGKey(0)))  # keeps moments


def test_equinox_module_with_non_array_leaves():
  model = eqx.nn.MLP(3, 1, width_size=8, depth=1, key=jax.random.PRNGKey(0))
  params = eqx.filter(model, eqx.is_array)
  tx = oc.adamw(1e-2, weight_decay=0.5, mask=oc.mask_from_paths(exclude="bias"))
  state = tx.init(params)
  x = jnp.ones((4, 3))

  @eqx.filter_jit
  def step(model, state):
    grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(x) ** 2))(model)
    updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state

  loss = lambda m: float(jnp.sum(jax.vmap(m)(x) ** 2))
  start = loss(model)
  for _ in range(20):
    model, state = step(model, state)
  assert loss(model) < start
  # A first step with zero gradients: kernels shrink by lr * wd, biases stay.
  params = eqx.filter(model, eqx.is_array)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)  # fresh moments: decay only
  moved = eqx.apply_updates(model, updates)
  for layer_before, layer_after in zip(model.layers, moved.layers):
    np.testing.assert_allclose(
      layer_after.weight, layer_before.weight * (1 - 1e-2 * 0.5), rtol=1e-5
    )
    np.testing.assert_array_equal(layer_after.bias, layer_before.bias)


def test_masked_state_maps_with_optax_tree_map_params_as_optax_s():
  """``tree.map_params`` (Optax's own) initialises with a placeholder for the parameters;
  ``masked`` passes it whole to the inner init, so the parameter copies in the state are
  found under a mask as in Optax (e.g. to give the state the parameters' partition specs)."""
  params = {"a": jnp.ones(3), "b": {"c": jnp.ones(2), "d": jnp.ones(1)}}
  mask = {"a": True, "b": {"c": False, "d": True}}
  specs = {}
  for lib in (oc, optax):
    tx = lib.masked(lib.adam(1e-3), mask)
    specs[lib.__name__] = lib.tree.map_params(
      tx, lambda p: f"spec{p.shape}", tx.init(params), transform_non_params=lambda _: "x"
    )
  flat = {name: jax.tree_util.tree_flatten_with_path(s)[0] for name, s in specs.items()}
  assert [(jax.tree_util.keystr(p), v) for p, v in flat["optcompose"]] == [
    (jax.tree_util.keystr(p), v) for p, v in flat["optax"]
  ]
  mu = specs["optcompose"].inner_state[0].mu
  assert mu["a"] == "spec(3,)" and mu["b"]["d"] == "spec(1,)"
  assert isinstance(mu["b"]["c"], oc.MaskedNode)


def test_a_callable_pytree_of_bools_is_a_mask_tree_not_a_function():
  """An Equinox module is callable; as a mask its leaves (bools) make it a tree (Optax
  issue 913): calling it on the parameters would run the model."""

  class Linear(eqx.Module):
    w: jax.Array
    b: jax.Array

    def __call__(self, x):
      return self.w @ x + self.b

  params = Linear(w=jnp.ones((2, 2)), b=jnp.ones(2))
  mask = Linear(w=True, b=False)  # as eqx.tree_at or jax.tree.map would build it
  grads = jax.tree.map(lambda p: 2.0 * p, params)
  for lib in (oc, optax):
    tx = lib.masked(lib.sgd(0.5), mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates.w, -jnp.ones((2, 2)))  # sgd on w
    np.testing.assert_array_equal(updates.b, 2.0 * jnp.ones(2))  # b passed through
  frozen = oc.freeze(mask)  # the same rule for freeze's mask
  updates, _ = frozen.update(grads, frozen.init(params), params)
  np.testing.assert_array_equal(updates.w, 0.0)
  np.testing.assert_array_equal(updates.b, 2.0 * jnp.ones(2))


@pytest.mark.numerics
def test_a_masked_out_integer_leaf_passes_through_multi_steps_and_lookahead_unchanged():
  # Both wrappers refused (multi_steps at init) or turned (lookahead: its interpolation
  # made the update float) an integer leaf that the optimizer inside had masked out.
  params = {"w": jnp.array([3.0, 4.0]), "i": jnp.array([0, 0, 7], jnp.int32)}
  grads = {"w": jnp.array([1.0, -2.0]), "i": jnp.zeros(3, jnp.int32)}
  for kind in ("int32", "float0"):  # jax.grad(..., allow_int=True) gives float0
    if kind == "float0":
      grads = jax.grad(lambda p: jnp.sum(p["w"] * jnp.array([1.0, -2.0])), allow_int=True)(params)
    _masked_out_integer_leaf_passes(params, grads, kind)


def _masked_out_integer_leaf_passes(params, grads, kind):
  mask = {"w": True, "i": False}
  cases = {
    "multi_steps": (
      oc.multi_steps(oc.masked(oc.adam(0.1), mask), 2),
      optax.MultiSteps(optax.masked(optax.adam(0.1), mask), 2).gradient_transformation(),
    ),
    "lookahead_in_state": (
      oc.lookahead_in_state(oc.masked(oc.adam(0.1), mask), 2, 0.5),
      oc.lookahead_in_state(oc.adam(0.1), 2, 0.5),  # on the floating-point leaf alone
    ),
  }
  for name, (tx, reference) in cases.items():
    only_w = name == "lookahead_in_state"
    ref_params = {"w": params["w"]} if only_w else params
    ref_grads = {"w": grads["w"]} if only_w else {**grads, "i": jnp.zeros(3, jnp.int32)}
    p, s, q, r = params, tx.init(params), ref_params, reference.init(ref_params)
    for _ in range(5):
      u, s = jax.jit(tx.update)(grads, s, p)
      assert u["i"].dtype == grads["i"].dtype, (name, kind)
      p = oc.apply_updates(p, u)
      v, r = standard_promotion(reference).update(ref_grads, r, q)
      q = optax.apply_updates(q, v)
    np.testing.assert_array_equal(p["i"], params["i"], err_msg=name)
    np.testing.assert_allclose(p["w"], q["w"], rtol=1e-6, err_msg=f"{name} {kind}")
  with pytest.raises(TypeError, match=r"`params\['i'\]` has dtype int32"):
    oc.multi_steps(oc.adam(0.1), 2).init(params)  # not masked: the optimizer inside refuses


@pytest.mark.parametrize(
  "mask,message",
  [
    ({"enc": True}, r"\['head'\] is missing\."),
    ({"enc": True, "head": {"kernel": True}}, r"\['head'\]\['bias'\] is missing\."),
    ({"enc": True, "head": True, "tail": False}, r"\['tail'\] is unexpected\."),
  ],
)
def test_a_mask_that_is_no_prefix_is_named_at_the_shallowest_path(mask, message):
  # A prefix mask lacking a whole subtree was reported leaf by leaf, from the subtree it
  # did cover (`['enc']['dense']['bias'] is missing (and 3 more); ['enc'] is unexpected`).
  params = {"enc": {"dense": PARAMS["dense"]}, "head": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"`mask` is neither .* prefix of it: " + message):
    oc.adamw(0.1, mask=mask).init(params)


def test_a_stale_group_state_is_named_by_its_label():
  # Unfreezing a group (set_to_zero -> adamw) and passing the old state: the chain inside
  # the group raised a bare ValueError that named no group, even inside a named chain.
  params = {"backbone": jnp.ones(3), "head": jnp.ones(2)}
  labels = {"backbone": "backbone", "head": "head"}
  frozen = oc.partition({"head": oc.adam(1e-2), "backbone": oc.set_to_zero()}, labels)
  thawed = oc.partition({"head": oc.adam(1e-2), "backbone": oc.adam(1e-3)}, labels)
  stale = frozen.init(params)
  with pytest.raises(oc.StateMismatchError, match=r"state\.inner_states\['backbone'\] is a"):
    thawed.update(params, stale, params)
  outer = oc.named_chain(("clip", oc.clip_by_global_norm(1.0)), ("opt", thawed))
  state = {"clip": outer.init(params)["clip"], "opt": stale}
  with pytest.raises(oc.StateMismatchError, match=r"state\['opt'\]\.inner_states\['backbone'\]"):
    outer.update(params, state, params)


def test_a_chain_given_a_shorter_tuple_says_its_length():
  # The chain's error had become "a builtins.tuple (not optcompose's)": a tuple is a tuple.
  tx = oc.chain(oc.sgd(1.0), oc.sgd(1.0), oc.sgd(1.0))
  params = {"w": jnp.ones(2)}
  with pytest.raises(oc.StateMismatchError, match="the state is a tuple of length 2, expected"):
    tx.update(params, tx.init(params)[:2], params)


def test_an_escaped_pipe_is_refused_only_where_it_is_a_literal_pipe():
  """``bias\\|scale`` (a Markdown table's escape) matches a literal pipe: refused, naming the
  pattern to write. An escaped backslash before a pipe (``a\\\\|b``: a backslash, then
  either alternative) is a valid pattern and is kept."""
  for pattern, fix in [(r"bias\|scale", "'bias|scale'"), (r"x\|y\|z", "'x|y|z'")]:
    with pytest.raises(ValueError, match=re.escape(fix)):
      oc.mask_from_paths(exclude=pattern)
    with pytest.raises(ValueError, match=re.escape(fix)):
      oc.labels_from_paths([(pattern, "a")], default="b")
  params = {"b": jnp.zeros(1), "w": jnp.ones(1)}
  assert oc.mask_from_paths(exclude=r"a\\|b")(params) == {"b": False, "w": True}
  assert oc.mask_from_paths(exclude=r"[|]")(params) == {"b": True, "w": True}
