"""ZeRO stage 1 of a ``flat_optimizer``'s state, on 8 simulated CPU devices (tests/conftest.py).

``oc.sharding.zero1_state_shardings(tx, params, "data")`` with ``tx`` built by
``oc.flat_optimizer`` (alone, or inside ``with_diagnostics``, ``apply_if_finite``,
``multi_steps`` or ``inject_hyperparams``) splits every bucket of the state over "data": each
device holds 1/8 of it, the parameters (the model's tree) stay whole, and a few jitted steps
equal the unsharded run to a few epsilons. ``zero1_flat_shardings`` given such a ``tx`` places
the same state. A bucket that the axis does not divide is an error that says to pass
``pad_to``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optcompose as oc
from compat import set_mesh
from numerics import assert_ulps_close, on_cpu

# 15 + 3 + 63 = 81 float32 elements, no leaf with a dimension that 8 divides: per leaf,
# ZeRO-1 would split none of them. With pad_to=8 the bucket has 88.
PARAMS = {
  "w": np.sin(np.arange(15, dtype=np.float32)).reshape(5, 3),
  "b": np.linspace(-0.5, 0.5, 3, dtype=np.float32),
  "odd": np.cos(np.arange(63, dtype=np.float32)).reshape(7, 9),
}


def _inject(pad_to):
  factory = lambda learning_rate: oc.flat_optimizer(  # noqa: E731
    oc.adamw(learning_rate, weight_decay=1e-2), pad_to=pad_to
  )
  return oc.inject_hyperparams(factory)(learning_rate=1e-2)


WRAPPERS = {
  "flat_optimizer": lambda flat: flat,
  "with_diagnostics": lambda flat: oc.with_diagnostics(flat),
  "apply_if_finite": lambda flat: oc.apply_if_finite(flat, 3),
  "multi_steps": lambda flat: oc.multi_steps(flat, 2),
}


def make_tx(wrapper, pad_to=8):
  if wrapper == "inject_hyperparams":
    return _inject(pad_to)
  return WRAPPERS[wrapper](oc.flat_optimizer(oc.adamw(1e-2, weight_decay=1e-2), pad_to=pad_to))


def mesh8(axis_type=AxisType.Auto):
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  if axis_type == AxisType.Explicit and not hasattr(jax.sharding, "reshard"):
    pytest.skip("explicit sharding is experimental before JAX 0.7")
  return jax.make_mesh((8,), ("data",), axis_types=(axis_type,), devices=devices[:8])


def buckets(state):
  """The 1-D buffers of every FlatParams in ``state`` (the moments, in buckets)."""
  nodes = [x for x in jax.tree.leaves(state, is_leaf=oc.flat.is_flat) if oc.flat.is_flat(x)]
  return [b for node in nodes for b in node.buffers if getattr(b, "ndim", 0) == 1]


def loss(params, t):  # another objective at each step
  return sum(jnp.sum(jnp.cos((2.0 + t) * p) + 0.5 * p * p) for p in jax.tree.leaves(params))


def make_step(tx):
  def step(params, state, t):
    updates, state = tx.update(jax.grad(loss)(params, t), state, params)
    return oc.apply_updates(params, updates), state

  return step


@pytest.mark.numerics
@pytest.mark.parametrize(
  "wrapper, explicit",
  [(w, False) for w in [*WRAPPERS, "inject_hyperparams"]] + [("with_diagnostics", True)],
)
def test_zero1_state_shardings_split_a_flat_optimizer_s_buckets(wrapper, explicit):
  mesh = mesh8(AxisType.Explicit if explicit else AxisType.Auto)
  replicated = NamedSharding(mesh, P())
  tx = make_tx(wrapper)
  params = jax.device_put(PARAMS, replicated)
  placement = oc.sharding.zero1_state_shardings(tx, params, "data")
  state = jax.jit(tx.init, out_shardings=placement)(params)
  moments = buckets(state)
  assert len(moments) >= 2  # mu and nu (multi_steps' accumulator is per leaf)
  for x in moments:
    assert x.shape == (88,)
    assert {s.data.size for s in x.addressable_shards} == {x.size // 8}, x.sharding
  # zero1_flat_shardings given the same transformation places the same state.
  flat = jax.device_put(oc.flat_params(PARAMS, pad_to=8), replicated)
  from_flat = oc.sharding.zero1_flat_shardings(tx, flat, mesh)
  assert jax.tree.structure(from_flat) == jax.tree.structure(placement)
  assert jax.tree.leaves(from_flat) == jax.tree.leaves(placement)
  step = make_step(tx)
  sharded_step = jax.jit(
    step, in_shardings=(replicated, placement, None), out_shardings=(replicated, placement)
  )
  with on_cpu():  # the unsharded run on the simulated devices' backend
    plain = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    plain_state, plain_step = tx.init(plain), jax.jit(step)
    for t in range(4):
      t = jnp.float32(t)
      params, state = sharded_step(params, state, t)
      plain, plain_state = plain_step(plain, plain_state, t)
  for x in buckets(state):  # still split after the steps
    assert {s.data.size for s in x.addressable_shards} == {x.size // 8}, x.sharding
  for x in jax.tree.leaves(params):
    assert {s.data.size for s in x.addressable_shards} == {x.size}
  floats = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert_ulps_close(floats((params, state)), floats((plain, plain_state)), 8)
  moved = max(float(np.max(np.abs(np.asarray(params[k]) - PARAMS[k]))) for k in PARAMS)
  assert moved > 1e-2  # it trained


def test_zero1_of_a_flat_optimizer_needs_buckets_the_axis_divides():
  mesh = mesh8()
  params = jax.device_put(PARAMS, NamedSharding(mesh, P()))
  for tx in (make_tx("flat_optimizer", pad_to=1), make_tx("with_diagnostics", pad_to=1)):
    with pytest.raises(
      ValueError,
      match=r"zero1_state_shardings: bucket 'float32' has 81 elements, not a multiple of the "
      r"8 devices of mesh axis 'data': build the flat_optimizer .*pad_to=8",
    ):
      oc.sharding.zero1_state_shardings(tx, params, "data")
    padded = oc.flat_params(PARAMS, pad_to=8)  # the flat_optimizer's own buckets are checked
    with pytest.raises(ValueError, match=r"zero1_flat_shardings: bucket 'float32' has 81"):
      oc.sharding.zero1_flat_shardings(tx, padded, mesh)
  # FlatParams given to zero1_state_shardings: checked as zero1_flat_shardings checks them.
  with pytest.raises(ValueError, match=r"bucket 'float32' has 81 elements.*flat_params\("):
    oc.sharding.zero1_state_shardings(
      oc.adam(1e-3), jax.device_put(oc.flat_params(PARAMS), NamedSharding(mesh, P())), "data"
    )


def test_flat_optimizer_init_names_a_flat_params_given_to_it():
  tx = oc.flat_optimizer(oc.adam(1e-3))
  with pytest.raises(TypeError, match=r"flat_optimizer: `params` is a FlatParams.*unflatten"):
    tx.init(oc.flat_params(PARAMS))


# Leaves that 8 divides along a dimension next to leaves it does not: per leaf, ZeRO-1 splits
# the first, not the others (on 2 x 4: "w" and "b" split over the 2 of "data", "odd" not).
MIXED_SPLITS = {
  "w": np.sin(np.arange(144, dtype=np.float32)).reshape(16, 9),
  "odd": np.cos(np.arange(63, dtype=np.float32)).reshape(7, 9),
  "b": np.linspace(-0.5, 0.5, 10, dtype=np.float32),
}


@pytest.mark.numerics
@pytest.mark.parametrize("shape", [(8,), (2, 4)], ids=["data8", "data2xmodel4"])
def test_zero1_of_a_flat_optimizer_on_explicit_axes_with_leaves_split_and_not(shape):
  """On explicit axes (``jax.make_mesh``'s default) the state's shapes come from the
  parameters as placed: a flat_optimizer cannot join a leaf ZeRO-1 would split per leaf with
  one it would not into a bucket. Every bucket is split over "data", as on auto axes, and
  the steps equal the unsharded run."""
  devices = jax.devices("cpu")
  if len(devices) < 8 or not hasattr(jax.sharding, "reshard"):
    pytest.skip("needs 8 CPU devices and explicit sharding (JAX 0.7 or later)")
  names = ("data", "model")[: len(shape)]
  mesh = jax.make_mesh(
    shape, names, axis_types=(AxisType.Explicit,) * len(shape), devices=devices[:8]
  )
  n = mesh.shape["data"]
  replicated = NamedSharding(mesh, P())
  tx = oc.with_diagnostics(oc.flat_optimizer(oc.adamw(1e-2, weight_decay=1e-2), pad_to=n))
  params = jax.device_put(MIXED_SPLITS, replicated)
  placement = oc.sharding.zero1_state_shardings(tx, params, "data")
  flat = oc.flat_params(MIXED_SPLITS, pad_to=n)
  assert jax.tree.leaves(oc.sharding.zero1_flat_shardings(tx, flat, mesh)) == jax.tree.leaves(
    placement
  )
  state = jax.jit(tx.init, out_shardings=placement)(params)
  step = make_step(tx)
  sharded_step = jax.jit(
    step, in_shardings=(replicated, placement, None), out_shardings=(replicated, placement)
  )
  with on_cpu():
    plain = {k: jnp.asarray(v) for k, v in MIXED_SPLITS.items()}
    plain_state, plain_step = tx.init(plain), jax.jit(step)
    for t in range(3):
      params, state = sharded_step(params, state, jnp.float32(t))
      plain, plain_state = plain_step(plain, plain_state, jnp.float32(t))
  moments = buckets(state)
  assert len(moments) == 2
  for x in moments:  # 217 elements padded to a multiple of n, 1/n of them on each device
    assert x.shape == (-(-217 // n) * n,)
    assert {s.data.size for s in x.addressable_shards} == {x.size // n}, x.sharding
  floats = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert_ulps_close(floats((params, state)), floats((plain, plain_state)), 8)


@pytest.mark.parametrize("spec", [P("data"), P(None, "data")], ids=["leading", "second"])
def test_flat_layouts_refuse_a_leaf_split_on_explicit_axes(spec):
  """A bucket is a new 1-D array: it cannot keep a split leaf's sharding, on whichever
  dimension the leaf is split (on its second, JAX could not even reshape it; on its first,
  the packed state and the updates would come out placed otherwise). An error names the
  leaf; an axis of one device splits nothing and is accepted."""
  mesh = mesh8(AxisType.Explicit)
  params = {
    "w": jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, spec)),
    "b": jax.device_put(jnp.ones(3), NamedSharding(mesh, P())),
  }
  tx = oc.flat_optimizer(oc.adam(1e-3))
  with pytest.raises(ValueError, match=r"flat_optimizer: `params\['w'\]` is split over the mesh"):
    jax.jit(tx.init)(params)
  with pytest.raises(ValueError, match=r"flat_params: `params\['w'\]` is split over the mesh"):
    oc.flat_params(params)
  with set_mesh(mesh):  # a jitted init on explicit axes needs the mesh (JAX's rule)
    state = jax.jit(tx.init)(jax.device_put(params, NamedSharding(mesh, P())))
    with pytest.raises(ValueError, match=r"flat_optimizer: `updates\['w'\]` is split"):
      jax.jit(tx.update)(params, state)
  single = jax.make_mesh(
    (1, 8), ("one", "data"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices("cpu")[:8]
  )
  on_one = jax.device_put({"w": jnp.ones((4, 6))}, NamedSharding(single, P(None, "one")))
  with set_mesh(single):
    assert jax.jit(tx.init)(on_one)[0].mu["float32"].shape == (24,)


def test_flatten_refuses_a_leaf_split_on_explicit_axes():
  """flatten joins the leaves into one new vector (as Optax's, which fails inside JAX's
  reshape or concatenation there): a split leaf is an error naming it."""
  mesh = mesh8(AxisType.Explicit)
  params = {
    "w": jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, P(None, "data"))),
    "b": jax.device_put(jnp.ones(3), NamedSharding(mesh, P())),
  }
  tx = oc.flatten(oc.adam(1e-3))
  with pytest.raises(ValueError, match=r"flatten: `params\['w'\]` is split over the mesh"):
    jax.jit(tx.init)(params)
  with set_mesh(mesh):
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    state = jax.jit(tx.init)(replicated)
    with pytest.raises(ValueError, match=r"flatten: `updates\['w'\]` is split"):
      jax.jit(tx.update)(params, state, replicated)
