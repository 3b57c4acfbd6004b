"""ZeRO stage 1 with Flax NNX's ``nnx.Optimizer``, as the sharding guide writes it: the
placement of ``tx.init``'s state laid onto ``nnx.state(optimizer.opt_state)`` by path
(``oc.sharding.placement_onto``), whose leaves are in another order (each state's fields by
name), on 8 simulated CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import optcompose as oc
from compat import set_mesh
from numerics import assert_ulps_close, on_cpu


class Net(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(8, 16, rngs=rngs)
    self.b = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return self.b(jax.nn.relu(self.a(x)))


def _recipe():
  schedule = oc.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
  return oc.chain(
    oc.clip_by_global_norm(1.0),
    oc.adamw(schedule, weight_decay=0.1, mask=oc.mask_from_paths(include="kernel")),
  )


# Wrappers whose state fields are not in alphabetical order (ApplyIfFiniteState's
# notfinite_count before gave_up, ...): laid on by position, their placements crossed leaves.
WRAPPERS = {
  "recipe": _recipe,
  "apply_if_finite": lambda: oc.apply_if_finite(_recipe(), 3),
  "MultiSteps": lambda: oc.MultiSteps(_recipe(), 2),
  "with_diagnostics": lambda: oc.with_diagnostics(_recipe()),
  # The state in buckets (kernels and biases apart, as the decay mask needs), each split.
  "flat_optimizer": lambda: oc.with_diagnostics(
    oc.flat_optimizer(_recipe(), labels=oc.mask_from_paths(include="kernel"), pad_to=8)
  ),
}


def _loss(model, x):
  return jnp.mean((model(x) - x) ** 2)


def _run(make, mesh, batches):
  """(the parameters after the steps, the optimizer), ZeRO-1 on ``mesh`` or unsharded."""
  tx = make()
  model = Net(nnx.Rngs(0))
  if mesh is None:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def plain_step(model, optimizer, x):
      optimizer.update(model, nnx.grad(_loss)(model, x))

    for x in batches:
      plain_step(model, optimizer, x)
    return nnx.state(model, nnx.Param), optimizer
  replicated = NamedSharding(mesh, P())
  with set_mesh(mesh):
    nnx.update(model, jax.device_put(nnx.state(model), replicated))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    placement = oc.sharding.zero1_state_shardings(tx, nnx.state(model, nnx.Param), "data")
    state = nnx.state(optimizer.opt_state)
    target = oc.sharding.placement_onto(placement, state)
    nnx.update(optimizer.opt_state, jax.device_put(state, target))

    @nnx.jit
    def step(model, optimizer, x):
      optimizer.update(model, nnx.grad(_loss)(model, x))
      params = nnx.state(model, nnx.Param)  # kept replicated: ZeRO-1 shards the state only
      nnx.update(model, jax.sharding.reshard(params, jax.tree.map(lambda _: replicated, params)))
      nnx.update(optimizer.opt_state, jax.sharding.reshard(nnx.state(optimizer.opt_state), target))

    for x in batches:
      step(model, optimizer, x)
  return nnx.state(model, nnx.Param), optimizer


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_zero1_with_nnx_optimizer_matches_the_unsharded_run(wrapper):
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  if not hasattr(jax.sharding, "reshard"):
    pytest.skip("jax.sharding.reshard is newer than this JAX")
  mesh = jax.make_mesh((8,), ("data",), devices=devices[:8])
  batches = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 8)), jnp.float32)
  with on_cpu():
    params, optimizer = _run(WRAPPERS[wrapper], mesh, batches)
    plain_params, plain_optimizer = _run(WRAPPERS[wrapper], None, batches)
  assert_ulps_close(jax.tree.leaves(params), jax.tree.leaves(plain_params), 8)
  state = jax.tree.leaves(nnx.state(optimizer.opt_state))
  plain_state = jax.tree.leaves(nnx.state(plain_optimizer.opt_state))
  floats = [(a, b) for a, b in zip(state, plain_state) if jnp.issubdtype(a.dtype, jnp.floating)]
  assert_ulps_close([a for a, _ in floats], [b for _, b in floats], 8)
  # Every 2-D moment (the kernels': 8 x 16 and 16 x 8), or every bucket of flat_optimizer's
  # moments, holds 1/8 of itself on each device, and the parameters are whole on each.
  moments = [x for x in state if x.ndim == (1 if wrapper == "flat_optimizer" else 2)]
  assert moments
  for x in moments:
    assert {s.data.size for s in x.addressable_shards} == {x.size // 8}, x.sharding
  for x in jax.tree.leaves(params):
    assert {s.data.size for s in x.addressable_shards} == {x.size}


def test_placement_onto_names_a_leaf_it_cannot_place():
  params = {"w": jnp.ones((8, 2))}
  placement = oc.sharding.state_shardings(oc.adam(1e-3), params)
  other = oc.sgd(1e-3, momentum=0.9).init(params)  # another optimizer's state
  with pytest.raises(ValueError, match=r"placement_onto: `tree.*` has no sharding in `placement`"):
    oc.sharding.placement_onto(placement, other)
  # The same state in another container of the same names: placed leaf by leaf.
  state = oc.adam(1e-3).init(params)
  as_dicts = [{"count": s.count, "mu": s.mu, "nu": s.nu} if hasattr(s, "mu") else s for s in state]
  placed = oc.sharding.placement_onto(placement, as_dicts)
  assert jax.tree.structure(placed) == jax.tree.structure(as_dicts)


def test_placement_onto_keeps_a_state_field_named_value_apart_from_a_variables():
  """L-BFGS' line-search state has a field ``value``: in ``nnx.state`` it sits in a Variable
  (``[2]['value'].value``); a Variable's own ``.value`` is told apart from the field."""
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices("cpu")[:1])
  with set_mesh(mesh):
    model = Net(nnx.Rngs(0))
    nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
    tx = oc.lbfgs()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    placement = oc.sharding.zero1_state_shardings(tx, nnx.state(model, nnx.Param), "data")
    state = nnx.state(optimizer.opt_state)
    placed = oc.sharding.placement_onto(placement, state)
  assert len(jax.tree.leaves(placed)) == len(jax.tree.leaves(state))
