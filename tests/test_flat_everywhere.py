"""FlatParams where the model keeps its own tree, and FlatParams sharded (ZeRO stage 1).

``oc.flat_optimizer(tx)`` runs ``tx`` on FlatParams for a caller that hands it the model's
tree: Flax NNX's ``nnx.Optimizer`` and an Optax-style Equinox loop train with it unchanged and
follow the per-leaf optimizer (float64 trajectories to rounding; float32 per step from
identical inputs to a few epsilons). ``oc.sharding.zero1_flat_shardings`` splits every bucket
of the state over 8 simulated devices (tests/conftest.py): each holds 1/8 of it, and the
trajectory is the unsharded one.
"""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optcompose as oc
from numerics import F64_RTOL, assert_rel_close, assert_ulps_close, on_cpu, x64
from problems import mlp


def matrices(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


def moved(final, start):
  """It trained: the comparison is not between two frozen runs."""
  return max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(start))
  )


class Net(nnx.Module):
  """Linear, LayerNorm, Linear, and a variable that is not an ``nnx.Param`` (not trained)."""

  def __init__(self, rngs, dtype):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.l1, self.norm = nnx.Linear(6, 16, **kw), nnx.LayerNorm(16, **kw)
    self.l2 = nnx.Linear(16, 3, **kw)
    self.gain = nnx.BatchStat(jnp.linspace(0.5, 1.5, 16, dtype=dtype))

  def __call__(self, x):
    with jax.numpy_dtype_promotion("standard"):  # Flax's LayerNorm promotes to float32
      return self.l2(jnp.tanh(self.norm(self.l1(x)) * self.gain[...][None, :]))


def data(dtype):
  rng = np.random.default_rng(0)
  return (
    jnp.asarray(rng.normal(size=(32, 6)), dtype),
    jnp.asarray(np.sin(rng.normal(size=(32, 3))), dtype),
  )


def train_nnx(tx, dtype, steps=20):
  model = Net(nnx.Rngs(0), dtype)
  start = nnx.as_pure(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = data(dtype)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(steps):
    step(model, optimizer)
  return nnx.as_pure(nnx.state(model, nnx.Param)), start, optimizer


@pytest.mark.numerics
@pytest.mark.float64
def test_nnx_optimizer_with_flat_optimizer_matches_the_per_leaf_optimizer():
  """20 AdamW steps (decay on kernels only) through nnx.Optimizer, in float64."""
  with x64():
    tx = lambda: oc.adamw(1e-2, weight_decay=0.1, mask=matrices)
    flat, start, optimizer = train_nnx(oc.flat_optimizer(tx(), labels=matrices), jnp.float64)
    ref, _, _ = train_nnx(tx(), jnp.float64)
  assert_rel_close(flat, ref, F64_RTOL)
  assert moved(ref, start) > 1e-2
  # The state is AdamW's on two buckets (kernels, biases and scales): moments are 4 buffers.
  moments = [x for x in jax.tree.leaves(nnx.as_pure(optimizer.opt_state)) if x.ndim]
  assert sorted(x.size for x in moments) == [16 + 16 + 16 + 3] * 2 + [6 * 16 + 16 * 3] * 2
  assert all(x.dtype == jnp.float64 for x in moments)


def train_eqx(tx, dtype, steps=20):
  model = eqx.nn.MLP(6, 3, 16, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0), dtype=dtype)
  start = eqx.filter(model, eqx.is_array)
  state = tx.init(start)
  x, y = data(dtype)

  @eqx.filter_jit
  def step(model, state):
    grads = eqx.filter_grad(lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2))(model)
    updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state

  for _ in range(steps):
    model, state = step(model, state)
  return eqx.filter(model, eqx.is_array), start, state


@pytest.mark.numerics
@pytest.mark.float64
def test_equinox_loop_with_flat_optimizer_matches_the_per_leaf_optimizer():
  with x64():
    tx = lambda: oc.chain(oc.clip_by_global_norm(1.0), oc.adamw(1e-2, weight_decay=0.1))
    flat, start, state = train_eqx(oc.flat_optimizer(tx()), jnp.float64)
    ref, _, _ = train_eqx(tx(), jnp.float64)
  assert_rel_close(flat, ref, F64_RTOL)
  assert moved(ref, start) > 1e-2
  buckets = [x for x in jax.tree.leaves(state, is_leaf=oc.flat.is_flat) if oc.flat.is_flat(x)]
  assert buckets and all(b.layout.buckets == ("float64",) for b in buckets)


@pytest.mark.numerics
@pytest.mark.parametrize("pad_to", [1, 8])
def test_flat_optimizer_matches_per_leaf_per_step_on_mixed_dtypes(pad_to):
  """float32 and bfloat16 buckets (padded or not), Nesterov SGD with a stateless first member;
  each step from the tree run's own parameters and gradients."""
  problem = mlp()
  params = {**problem.params, "half": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.bfloat16)}
  tx, flat_tx = (
    oc.chain(oc.identity(), oc.sgd(0.1, momentum=0.9, nesterov=True)) for _ in range(2)
  )
  flat_tx = oc.flat_optimizer(flat_tx, pad_to=pad_to)
  state, flat_state = tx.init(params), flat_tx.init(params)
  for t in range(10):
    grads = {
      **problem.grad({k: params[k] for k in problem.params}, t),
      "half": jnp.cos(params["half"] * (t + 1)),
    }
    u, state = jax.jit(tx.update)(grads, state, params)
    u_flat, flat_state = jax.jit(flat_tx.update)(grads, flat_state, params)
    assert_ulps_close(u_flat, u, 2, what=f"step {t}: ")
    params = oc.apply_updates(params, u)
  (trace,) = [x for x in jax.tree.leaves(flat_state, is_leaf=oc.flat.is_flat) if oc.flat.is_flat(x)]
  assert {b: x.size for b, x in zip(trace.layout.buckets, trace.buffers)} == {
    "float32": -(-(8 * 16 + 16 + 16 + 1) // pad_to) * pad_to,
    "bfloat16": -(-5 // pad_to) * pad_to,
  }


def test_flat_optimizer_without_state_buckets_packs_the_caller_s_tree():
  """A stateless ``tx`` keeps no layout: update packs the tree it is given."""
  params = mlp().params
  tx = oc.flat_optimizer(oc.sgd(0.5))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, -0.5 * np.ones(u.shape, np.float32))


def test_flat_optimizer_names_the_leaf_that_does_not_match_the_state():
  params = mlp().params
  tx = oc.flat_optimizer(oc.adam(1e-3))
  state = tx.init(params)
  other = {**params, "extra": jnp.ones(3)}
  with pytest.raises(
    ValueError,
    match=r"flat_optimizer: `updates` is not the tree of the "
    r"state: `updates\['extra'\]` is not in it",
  ):
    tx.update(other, state, params)
  fewer = {"dense1": params["dense1"]}
  with pytest.raises(ValueError, match=r"`params\['dense2'\]\['bias'\]` is missing"):
    tx.update(params, state, fewer)
  wrong = jax.tree.map(lambda x: x, params)
  wrong["dense1"]["bias"] = jnp.ones(15)
  with pytest.raises(
    ValueError,
    match=r"`updates\['dense1'\]\['bias'\]` is a float32\[15\] "
    r"array, but the state holds it as float32\[16\]",
  ):
    tx.update(wrong, state, params)
  wrong["dense1"]["bias"] = jnp.ones(16, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"bfloat16\[16\] array.*float32\[16\]"):
    tx.update(wrong, state, params)


def test_flat_optimizer_mask_needs_the_same_labels():
  params = mlp().params
  tx = oc.flat_optimizer(oc.adamw(1e-3, mask=matrices))  # one bucket for kernels and biases
  with pytest.raises(
    ValueError,
    match=r"\['dense1'\]\['bias'\].*\['dense1'\]\['kernel'\].*"
    r"bucket 'float32'.*flat_optimizer\) with labels=",
  ):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="flat_optimizer: `pad_to` must be a positive int"):
    oc.flat_optimizer(oc.sgd(0.1), pad_to=0)


@pytest.mark.xla_cpu_program
def test_flat_optimizer_step_has_a_fixed_number_of_optimizer_fusions():
  """The optimizer's math runs as a fixed number of fused kernels whatever the leaf count; what
  grows is one kernel per leaf (the updates split into the caller's tree, fused with
  ``apply_updates``). Per leaf, AdamW runs several kernels for every leaf."""

  def fusions(n, flat):
    params = {f"w{i:03d}": jnp.full((17 + i,), 0.5) for i in range(n)}
    tx = oc.flat_optimizer(oc.adamw(1e-3)) if flat else oc.adamw(1e-3)

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return oc.apply_updates(p, u), s

    hlo = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    return len(re.findall(r"= \S+ fusion\(", entry[: entry.index("\n}")]))

  assert fusions(64, True) - fusions(32, True) <= 32
  assert fusions(64, False) - fusions(32, False) >= 2 * 32


# ------------------------------------------------------------------------------------------
# ZeRO stage 1 on FlatParams.


def mesh8():
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:8])


def test_padded_flat_params_round_trip_and_pad_with_zeros():
  problem = mlp()  # 8*16 + 16*1 = 144 kernel, 16 + 1 = 17 bias elements
  flat = oc.flat_params(problem.params, labels=matrices, pad_to=8)
  assert [b.shape for b in flat.buffers] == [(24,), (144,)]
  np.testing.assert_array_equal(flat["False/float32"][17:], np.zeros(7, np.float32))
  for got, want in zip(jax.tree.leaves(flat.unflatten()), jax.tree.leaves(problem.params)):
    np.testing.assert_array_equal(got, want)
  grads = jax.grad(lambda f: problem.loss(f.unflatten()))(flat)
  np.testing.assert_array_equal(grads["False/float32"][17:], np.zeros(7, np.float32))
  assert float(jnp.max(jnp.abs(grads["False/float32"][:17]))) > 0


@pytest.mark.numerics
def test_zero1_flat_splits_every_bucket_over_8_devices_and_matches_the_unsharded_run():
  """Replicated padded FlatParams, AdamW's moment buckets split over "data": each device holds
  1/8 of the state, parameters stay replicated, and 5 steps equal the unsharded run (the
  unsharded flat run, and the per-leaf run on the model's tree) to a few epsilons."""
  with on_cpu():  # the unsharded runs on the simulated devices' backend
    mesh = mesh8()
    problem = mlp()  # buckets of 17 and 144 elements: the first is padded to 24
    tx = oc.adamw(1e-2, weight_decay=1e-3, mask=matrices)
    flat = oc.flat_params(problem.params, labels=matrices, pad_to=8)
    replicated = NamedSharding(mesh, P())
    placement = oc.sharding.zero1_flat_shardings(tx, flat, mesh, axis="data")
    params = jax.device_put(flat, replicated)
    state = jax.jit(tx.init, out_shardings=placement)(params)

    def loss(p, t):  # another objective at each step
      return problem.loss(p) + 0.1 * t * jnp.sum(jnp.sin(p["dense1"]["kernel"]))

    def step(params, state, t):  # on FlatParams or on the tree
      view = lambda p: p.unflatten() if oc.flat.is_flat(p) else p
      grads = jax.grad(lambda p: loss(view(p), t))(params)
      updates, state = tx.update(grads, state, params)
      return oc.apply_updates(params, updates), state

    sharded_step = jax.jit(
      step, in_shardings=(replicated, placement, replicated), out_shardings=(replicated, placement)
    )
    # flat_optimizer's state on the tree is this state: the same shardings place it.
    wrapped = oc.flat_optimizer(tx, labels=matrices, pad_to=8).init(problem.params)
    assert jax.tree.structure(wrapped) == jax.tree.structure(state)
    plain, plain_state, plain_step = flat, tx.init(flat), jax.jit(step)
    tree, tree_state = problem.params, tx.init(problem.params)
    for t in range(5):
      t = jnp.float32(t)
      params, state = sharded_step(params, state, t)
      plain, plain_state = plain_step(plain, plain_state, t)
      tree, tree_state = plain_step(tree, tree_state, t)

    buckets = [x for x in jax.tree.leaves(state) if x.ndim]
    assert len(buckets) == 4  # mu and nu of two buckets
    device = jax.devices("cpu")[0]
    on_one = sum(s.data.nbytes for x in buckets for s in x.addressable_shards if s.device == device)
    assert on_one * 8 == sum(x.nbytes for x in buckets)
    for x in buckets:
      assert x.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1), x.sharding
    for x in jax.tree.leaves(params):
      assert x.sharding.is_equivalent_to(replicated, x.ndim)
    assert_ulps_close(jax.tree.leaves((params, state)), jax.tree.leaves((plain, plain_state)), 8)
    assert_ulps_close(params.unflatten(), tree, 8)
    assert moved(tree, problem.params) > 1e-2
  np.testing.assert_array_equal(params["False/float32"][17:], np.zeros(7, np.float32))


@pytest.mark.parametrize("how", ["flat_params", "flat_optimizer"])
def test_zero1_flat_on_an_explicit_mesh_with_a_decay_mask(how):
  """The sharding guide's ZeRO-1 on ``jax.make_mesh``'s default explicit axes, with the
  weight-decay mask passed as ``labels`` too: each bucket is split over "data" (its type says
  so), splitting it back into leaves gathers it first (JAX refuses to split an explicitly
  sharded dimension; auto mode gathers implicitly), and 4 steps equal the per-leaf run on
  the model's tree to a few epsilons. Through ``flat_params`` (the step on FlatParams) and
  through ``flat_optimizer`` (the model's tree; the buckets inside)."""
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  if not hasattr(jax.sharding, "reshard"):  # JAX 0.6: the model's matmul needs jax.set_mesh
    pytest.skip("explicit sharding is experimental before JAX 0.7")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=devices[:8])
  replicated = NamedSharding(mesh, P())
  problem = mlp()  # buckets of 17 and 144 elements: the first is padded to 24
  tx = oc.adamw(1e-2, weight_decay=1e-3, mask=matrices)
  flat = oc.flat_params(problem.params, labels=matrices, pad_to=8)
  placement = oc.sharding.zero1_flat_shardings(tx, flat, mesh)
  if how == "flat_optimizer":
    opt = oc.flat_optimizer(tx, labels=matrices, pad_to=8)
    params = jax.device_put(problem.params, replicated)
  else:
    opt, params = tx, jax.device_put(flat, replicated)

  def step(params, state):
    view = lambda p: p.unflatten() if oc.flat.is_flat(p) else p
    grads = jax.grad(lambda p: problem.loss(view(p)))(params)
    updates, state = opt.update(grads, state, params)
    return oc.apply_updates(params, updates), state

  state = jax.jit(opt.init, out_shardings=placement)(params)
  sharded_step = jax.jit(
    step, in_shardings=(replicated, placement), out_shardings=(replicated, placement)
  )
  with on_cpu():
    tree, tree_state = problem.params, tx.init(problem.params)
    for _ in range(4):
      params, state = sharded_step(params, state)
      tree, tree_state = jax.jit(
        lambda p, s: (lambda u, s: (oc.apply_updates(p, u), s))(
          *tx.update(jax.grad(problem.loss)(p), s, p)
        )
      )(tree, tree_state)
  buckets = [x for x in jax.tree.leaves(state) if x.ndim]
  assert len(buckets) == 4
  # A bucket of one leaf, unpadded, whose first dimension the mesh does not divide: gathered
  # to be reshaped (the placement itself unflattens it, for the mask).
  one = {"w": jnp.ones((4, 6)), "b": jnp.zeros(6)}  # buckets of 8 (padded) and 24
  flat_one = oc.flat_params(one, labels=matrices, pad_to=8)
  one_placement = oc.sharding.zero1_flat_shardings(tx, flat_one, mesh)
  flat_one = jax.device_put(flat_one, replicated)
  with on_cpu():
    one_state = jax.jit(tx.init, out_shardings=one_placement)(flat_one)
    unsharded = tx.update(flat_one, tx.init(flat_one), flat_one)[0]
    sharded = jax.jit(lambda p, s: tx.update(p, s, p)[0], in_shardings=(replicated, one_placement))(
      flat_one, one_state
    )
  assert_ulps_close(sharded.unflatten(), unsharded.unflatten(), 8)
  device = devices[0]
  on_one = sum(s.data.nbytes for x in buckets for s in x.addressable_shards if s.device == device)
  assert on_one * 8 == sum(x.nbytes for x in buckets)
  assert_ulps_close(params.unflatten() if how == "flat_params" else params, tree, 8)
  assert moved(tree, problem.params) > 1e-2


def test_zero_fraction_of_padded_flat_params_counts_the_model_s_elements():
  """``with_diagnostics`` on FlatParams padded by ``pad_to=8``, and inside ``flat_optimizer``:
  ``zero_fraction`` is the model tree's ``#(w == 0) / size(w)`` (counted by NumPy), not
  counting the zeros that pad the buckets; with a ``zero_mask`` (the matrices) too."""
  from optcompose.metrics import metrics

  params = {"w": jnp.arange(15.0).reshape(5, 3), "b": jnp.zeros(3)}  # 4 zeros of 18
  host = jax.tree.map(np.asarray, params)
  want = sum(int(np.sum(x == 0)) for x in jax.tree.leaves(host)) / 18
  want_masked = float(np.mean(host["w"] == 0))  # 1 of 15
  for mask, expected in ((None, want), (matrices, want_masked)):
    diag = oc.with_diagnostics(oc.adamw(1e-3), zero_mask=mask)
    flat = oc.flat_params(params, labels=matrices, pad_to=8)  # buckets of 3 -> 8, 15 -> 16
    assert sum(b.size for b in flat.buffers) == 24
    grads = jax.tree.map(jnp.ones_like, params)
    for tx, p, g in (
      (diag, flat, oc.flat_params(grads, labels=matrices, pad_to=8)),
      (oc.flat_optimizer(diag, labels=matrices, pad_to=8), params, grads),
      (diag, params, grads),  # the tree itself: the reference path
    ):
      _, state = jax.jit(tx.update)(g, tx.init(p), p)
      got = float(metrics(state)["zero_fraction"])
      np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_zero1_flat_shardings_refuse_a_bucket_that_does_not_divide():
  mesh = mesh8()
  flat = oc.flat_params(mlp().params, labels=matrices)  # 17 and 144 elements
  with pytest.raises(
    ValueError,
    match=r"bucket 'False/float32' has 17 elements, not a multiple "
    r"of the 8 devices of mesh axis 'data'.*pad_to=8",
  ):
    oc.sharding.zero1_flat_shardings(oc.adam(1e-3), flat, mesh)
  with pytest.raises(ValueError, match="no axis 'model'"):
    oc.sharding.zero1_flat_shardings(oc.adam(1e-3), flat, mesh, axis="model")
  with pytest.raises(TypeError, match="not a FlatParams"):
    oc.sharding.zero1_flat_shardings(oc.adam(1e-3), mlp().params, mesh)
