"""FlatParams: the model's parameters kept in one buffer per bucket, across steps.

Every registry case runs on the same MLP on the ordinary tree and on FlatParams, side by
side from identical inputs at every step (tests/numerics.py ``lockstep``): the updates agree
to a few float32 epsilons (elementwise math is the same math on the same numbers, but XLA
compiles a leaf and a longer buffer into different loops, which round differently on
different CPUs: a bitwise claim would hold on one machine only), and float64 trajectories
agree to rounding; the per-leaf transformations refuse FlatParams with a clear TypeError.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import train_state

import optcompose as oc
from numerics import F64_RTOL, assert_rel_close, assert_ulps_close, x64
from problems import mlp
from registry import CASES

STEPS = 30
PER_LEAF = {
  "clip_by_leaf_norm",
  "clip_by_block_rms",
  "adaptive_grad_clip",
  "lamb",
  "lars",
  "fromage",
  "scale_by_param_block",
  "novograd",
  "sm3",
  "noisy_sgd",
  "centralize",
  "scale_by_distance_over_gradients",
  "scale_by_distance_over_gradients_options",
  "scale_by_factored_rms",
  "adafactor",
  "adafactor_factored",
}  # per-leaf norms, per-axis covers, per-leaf keys


def matrices(params):
  """The registry's masks and labels split kernels from biases; so do these buckets."""
  return jax.tree.map(lambda x: x.ndim > 1, params)


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


class Pair(NamedTuple):
  w: jax.Array
  b: jax.Array


def odd_tree():
  rng = np.random.default_rng(1)
  return {
    "layer": Pair(
      jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
      jnp.asarray(rng.normal(size=4), jnp.bfloat16),
    ),
    "scalar": jnp.float32(2.5),
    "empty": jnp.zeros((0, 5)),
    "nested": (jnp.arange(6.0).reshape(2, 3), [jnp.ones(2, jnp.bfloat16)]),
  }


def test_round_trip_keeps_every_leaf_shape_dtype_and_value():
  tree = odd_tree()
  flat = oc.flat_params(tree)
  assert flat.layout.buckets == ("float32", "bfloat16")
  assert [b.shape for b in flat.buffers] == [(12 + 1 + 0 + 6,), (4 + 2,)]
  assert_same_tree(flat.unflatten(), tree)
  assert_same_tree(jax.jit(lambda f: f.unflatten())(flat), tree)
  # Buffers in tree order: the first bucket starts with the (3, 4) kernel, row-major.
  np.testing.assert_array_equal(flat["float32"][:12], np.ravel(tree["layer"].w))


def test_labels_split_buckets_and_paths_name_them():
  flat = oc.flat_params(odd_tree(), labels=matrices)
  assert flat.layout.buckets == ("True/float32", "False/bfloat16", "False/float32")
  paths = [oc.tree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(flat)[0]]
  assert paths == ["['True/float32']", "['False/bfloat16']", "['False/float32']"]


@pytest.mark.numerics
def test_gradient_through_unflatten_is_flat_and_equals_the_tree_gradient():
  tree = odd_tree()

  def loss(p):
    return sum(
      jnp.sum(jnp.sin(x.astype(jnp.float32)) * (i + 1)) for i, x in enumerate(jax.tree.leaves(p))
    )

  flat = oc.flat_params(tree)
  g_flat = jax.jit(jax.grad(lambda f: loss(f.unflatten())))(flat)
  assert isinstance(g_flat, oc.FlatParams) and g_flat.layout == flat.layout
  # A jitted buffer against eager leaves: two programs, equal to an ulp or two of cos.
  assert_ulps_close(g_flat.unflatten(), jax.grad(loss)(tree), 2)


def lockstep_pair(case, outputs=1, dtype=jnp.float32, steps=STEPS):
  """The case on the MLP as a tree and as FlatParams, fed the tree run's parameters and
  gradients at every step; yields (t, tree updates, flat updates unflattened)."""
  problem = mlp(dtype, outputs=outputs)
  tree_tx, flat_tx = case.ours(), case.ours()
  params = problem.params
  tree_state = tree_tx.init(params)
  flat_state = flat_tx.init(oc.flat_params(params, labels=matrices))
  tree_update, flat_update = jax.jit(tree_tx.update), jax.jit(flat_tx.update)
  for t in range(steps):
    grads = problem.grad(params, t)
    extra = {"value": problem.loss(params)} if case.with_value else {}
    u_tree, tree_state = tree_update(grads, tree_state, params, **extra)
    u_flat, flat_state = flat_update(
      oc.flat_params(grads, labels=matrices),
      flat_state,
      oc.flat_params(params, labels=matrices),
      **extra,
    )
    assert isinstance(u_flat, oc.FlatParams)
    yield t, u_tree, u_flat.unflatten()
    params = oc.apply_updates(params, u_tree)


FLAT_CASES = [
  pytest.param(c, id=c.name, marks=[pytest.mark.numerics, pytest.mark.xdist_group(c.name)])
  for c in CASES
  if c.name not in PER_LEAF
]


@pytest.mark.parametrize("case", FLAT_CASES)
def test_every_case_on_flat_params_matches_the_tree(case):
  """float32, per step from identical inputs, on the 1-output MLP (its one-element leaf is
  compiled as scalar code, the buffer as vector loops); global norms sum the same squares in
  another order."""
  for t, u_tree, u_flat in lockstep_pair(case):
    assert_ulps_close(u_flat, u_tree, case.f32_ulps, what=f"step {t}: ")


# float64 trajectories for a few cases that exercise every kind of bucket mapping (a mask, a
# global norm, labels with a frozen partition, state kept per bucket by a wrapper); the
# per-step test above covers every case.
F64_FLAT_CASES = [
  p
  for p in FLAT_CASES
  if p.values[0].name
  in ("adamw_masked_scheduled", "clip_by_global_norm", "partition_frozen", "multi_steps")
]


@pytest.mark.parametrize("case", F64_FLAT_CASES)
@pytest.mark.float64
def test_flat_params_trajectory_matches_the_tree_in_float64(case):
  """float64 trajectories of the flat and tree layouts agree to rounding."""
  with x64():
    problem = mlp(jnp.float64)
    finals = []
    for flat in (False, True):
      tx = case.ours()
      params = oc.flat_params(problem.params, labels=matrices) if flat else problem.params
      state, update = tx.init(params), jax.jit(tx.update)
      for t in range(STEPS):
        view = params.unflatten() if flat else params
        grads = problem.grad(view, t)
        grads = oc.flat_params(grads, labels=matrices) if flat else grads
        extra = {"value": problem.loss(view)} if case.with_value else {}
        updates, state = update(grads, state, params, **extra)
        params = oc.apply_updates(params, updates)
      finals.append(params.unflatten() if flat else params)
    for leaf in jax.tree.leaves(finals[1]):
      assert leaf.dtype == jnp.float64
    assert_rel_close(finals[1], finals[0], F64_RTOL)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in PER_LEAF], ids=lambda c: c.name)
def test_per_leaf_transformations_refuse_flat_params(case):
  params = oc.flat_params(mlp().params)
  tx = case.ours()
  with pytest.raises(TypeError, match="one value per leaf of the model"):
    tx.update(params, tx.init(params), params)


def test_a_mask_that_splits_a_bucket_names_two_leaves():
  params = oc.flat_params(mlp().params)  # one float32 bucket holds kernels and biases
  tx = oc.adamw(1e-3, mask=matrices)
  with pytest.raises(
    ValueError,
    match=r"\['dense1'\]\['bias'\].*\['dense1'\]\['kernel'\].*"
    r"bucket 'float32'.*labels=",
  ):
    tx.update(params, tx.init(params), params)


def test_a_mask_given_per_bucket_is_accepted():
  params = oc.flat_params(mlp().params, labels=matrices)
  per_bucket = jax.tree.map(lambda _: True, params)
  ours = oc.add_decayed_weights(0.1, per_bucket).update(params, (), params)[0]
  ref = oc.add_decayed_weights(0.1).update(params, (), params)[0]
  assert_same_tree(ours, ref)


def test_bad_input():
  with pytest.raises(TypeError, match="already a FlatParams"):
    oc.flat_params(oc.flat_params(mlp().params))
  with pytest.raises(ValueError, match="no leaves"):
    oc.flat_params({})
  with pytest.raises(ValueError, match=r"`labels` is neither the parameter tree's structure"):
    oc.flat_params(mlp().params, labels={"dense1": True})
  # Updates with another layout than the state: the structure check names the bucket.
  params = oc.flat_params(mlp().params, labels=matrices)
  tx = oc.adam(1e-3)
  with pytest.raises(ValueError, match="structure"):
    tx.update(oc.flat_params(mlp().params), tx.init(params), params)


def test_flat_optimizer_names_the_callers_integer_leaf():
  # An Equinox model filtered with eqx.is_array keeps integer arrays: the error names the
  # caller's leaf, as the per-leaf path does, not the bucket it would be packed into.
  params = {"lin": {"w": jnp.ones((3, 2))}, "idx": jnp.arange(3)}
  for tx in (oc.adamw(1e-3), oc.flat_optimizer(oc.adamw(1e-3))):
    with pytest.raises(TypeError, match=r"`params\['idx'\]` has dtype int32"):
      tx.init(params)


class MLP(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype)
    return dense(2)(nn.tanh(dense(16)(x)))


@pytest.mark.numerics
@pytest.mark.float64
def test_linen_train_state_with_flat_params_matches_the_tree():
  """20 AdamW steps through TrainState on both layouts, in float64: equal to rounding."""
  with x64():
    train_both_layouts()


def train_both_layouts():
  model = MLP(jnp.float64)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float64)
  y = jnp.asarray(rng.normal(size=(32, 2)), jnp.float64)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  assert all(p.dtype == jnp.float64 for p in jax.tree.leaves(params))

  def view(p):
    return p.unflatten() if isinstance(p, oc.FlatParams) else p

  @jax.jit
  def step(state):
    def loss(p):
      return jnp.mean((state.apply_fn({"params": view(p)}, x) - y) ** 2)

    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  finals = []
  for p in (params, oc.flat_params(params, labels=matrices)):
    state = train_state.TrainState.create(
      apply_fn=model.apply, params=p, tx=oc.adamw(1e-2, weight_decay=0.1, mask=matrices)
    )
    for _ in range(20):
      state = step(state)
    finals.append(view(state.params))
  assert_rel_close(finals[1], finals[0], F64_RTOL)
  # It trained: the comparison is not between two frozen runs.
  assert (
    max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(params))
    )
    > 1e-2
  )
