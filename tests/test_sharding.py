"""Sharded parameters on 8 simulated CPU devices (tests/conftest.py sets the device count).

Every public transformation and optimizer (a registry case per builder) runs on a tree whose
leaves use the three usual layouts at once on a 2 x 4 ("data", "model") mesh: replicated
(data-parallel), fully sharded over all 8 devices, and 2-D tensor-parallel. The state is
created under ``jax.jit`` from abstract inputs (``jax.eval_shape``) with the parameters'
shardings; a jitted step must keep every sharding and equal the unsharded run. Each pure layout
is also run alone for the main optimizers, under both of JAX's sharding modes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optcompose as oc
from compat import set_mesh
from numerics import assert_ulps_close, on_cpu
from registry import CASES, covering

STEPS = 3

# name: (shape, spec). Shapes are all different, so a state leaf's shape names its parameter.
MIXED = {
  "embed": ((32, 8), P(("data", "model"))),  # fully sharded over 8 devices
  "block": {
    "kernel": ((8, 16), P("data", "model")),  # 2-D tensor parallel
    "bias": ((16,), P("model")),
    "scale": ((24,), P()),
  },  # replicated
  "head": {"kernel": ((16, 4), P("model", None)), "bias": ((4,), P())},
}
LAYOUTS = {
  "replicated": lambda shape: P(),
  "fully_sharded": lambda shape: P(("data", "model")),
  "tensor_parallel": lambda shape: P("data", "model") if len(shape) == 2 else P("model"),
}
PURE_SHAPES = {"w1": (16, 32), "b1": (32,), "w2": (32, 8), "b2": (8,)}


def cpu_mesh(axis_type):
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2, devices=devices[:8])


def make_params(specs, mesh):
  """Deterministic values; returns (unsharded, sharded, expected shardings) trees."""
  leaves, treedef = jax.tree.flatten(
    specs, is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[1], P)
  )
  host = [
    np.sin(np.arange(np.prod(s), dtype=np.float32) * (0.37 + i)).reshape(s) * 0.5
    for i, (s, _) in enumerate(leaves)
  ]
  shardings = [NamedSharding(mesh, spec) for _, spec in leaves]
  # Uncommitted (as a model's init returns them): a committed tree next to the uncommitted
  # state of an eager init is another input signature, so the second step would recompile.
  with on_cpu():  # the reference runs on the backend of the simulated devices
    plain = treedef.unflatten([jnp.asarray(x) for x in host])
  sharded = treedef.unflatten([jax.device_put(x, s) for x, s in zip(host, shardings)])
  return plain, sharded, treedef.unflatten(shardings)


def loss(params):
  return sum(jnp.sum(jnp.cos(3.0 * p) + 0.5 * p * p) for p in jax.tree.leaves(params))


def make_step(tx, with_value):
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    # value= for plateau control, grad_fn= for sharpness_aware; the others ignore both.
    extra = {"value": value, "grad_fn": jax.grad(loss)} if with_value else {}
    updates, state = tx.update(grads, state, params, **extra)
    return oc.apply_updates(params, updates), state, updates

  return jax.jit(step)


def train(tx, params, state, with_value):
  step = make_step(tx, with_value)
  for _ in range(STEPS):
    params, state, updates = step(params, state)
  return params, state, updates


def assert_placed(state, params_shardings, replicated):
  """Independent of optcompose.sharding: a leaf shaped like a parameter has its sharding
  (shapes are unique in these trees), any other leaf is replicated."""
  by_shape = {tuple(s.shape): sh for s, sh in zip(*params_shardings)}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    want = by_shape.get(tuple(leaf.shape), replicated)
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
      f"state{jax.tree_util.keystr(path)}: {leaf.sharding} instead of {want}"
    )


# Cases whose state has leaves shaped like a parameter without being that parameter's: SM3's
# per-axis covers (the (16,) cover of the (8, 16) kernel is not the (16,) bias; XLA shards a
# cover along its axis, e.g. P("data")). Their state placement is not asserted; values are.
# L-BFGS's history stacks memory_size copies of each parameter along a new leading axis,
# placed like the parameter on the others (assert_placed matches by shape only; the history's
# own test is below). Likewise: values checked.
PER_AXIS_STATE = {"sm3", "scale_by_factored_rms", "adafactor_factored", "scale_by_lbfgs"}
# Cases that compute on one raveled vector (flatten: as Optax's, the parameters are gathered
# into one new array, so updates and state have no per-leaf placement). Values are checked.
RAVELED = {"flatten_adam"}
# Tolerances above 8 epsilons: Adan's moments of gradient differences (g_t - g_{t-1}) show
# the rounding of both terms magnified (13.3 measured with XLA limited to AVX2).
ULPS = {"adan": 32}


def check_case(tx, specs, mesh, with_value=False, auto=True, placed=True, kept=True, ulps=8):
  plain, sharded, shardings = make_params(specs, mesh)
  replicated = NamedSharding(mesh, P())
  if auto:
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), sharded
    )
    placement = oc.sharding.state_shardings(tx, abstract)
    state = jax.jit(tx.init, out_shardings=placement)(sharded)
  else:
    with set_mesh(mesh):
      state = jax.jit(tx.init)(sharded)
  params_shardings = (jax.tree.leaves(sharded), jax.tree.leaves(shardings))
  if placed:
    assert_placed(state, params_shardings, replicated)

  if auto:
    out_params, out_state, updates = train(tx, sharded, state, with_value)
  else:
    with set_mesh(mesh):
      out_params, out_state, updates = train(tx, sharded, state, with_value)
  for tree in (out_params, updates) if kept else ():
    for leaf, want in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
      if auto and tree is updates and not np.any(np.asarray(leaf)):
        continue  # a constant zero update (set_to_zero) has no data for auto mode to place
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
  if placed:
    assert_placed(out_state, params_shardings, replicated)

  with on_cpu():
    ref_params, ref_state, _ = train(tx, plain, tx.init(plain), with_value)
  # Elementwise math is the same on every shard, but the sharded program is another program
  # (and reductions -- norms -- add their shards in another order): a few epsilons of each
  # leaf's own dtype, at the leaf's magnitude, after 3 steps.
  floats = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  ints = lambda tree: [
    x for x in jax.tree.leaves(tree) if not jnp.issubdtype(x.dtype, jnp.floating)
  ]
  assert_ulps_close(floats((out_params, out_state)), floats((ref_params, ref_state)), ulps)
  for got, want in zip(ints(out_state), ints(ref_state)):  # counts
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# One case per builder (registry.covering): placement follows the state's layout, which a
# builder's hyperparameter values do not change.
@pytest.mark.parametrize("case", covering(CASES), ids=lambda c: c.name)
def test_every_case_keeps_mixed_shardings_and_matches_unsharded(case):
  check_case(
    case.ours(),
    MIXED,
    cpu_mesh(AxisType.Auto),
    with_value=case.with_value,
    placed=case.name not in PER_AXIS_STATE | RAVELED,
    kept=case.name not in RAVELED,
    ulps=ULPS.get(case.name, 8),
  )


def test_sharpness_aware_keeps_mixed_shardings_and_matches_unsharded():
  """The one public transformation outside the registry (it needs a gradient function)."""
  tx = oc.chain(oc.sharpness_aware(0.05), oc.sgd(0.1, 0.9))
  check_case(tx, MIXED, cpu_mesh(AxisType.Auto), with_value=True)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["adamw", "clip_by_global_norm"])
@pytest.mark.parametrize("auto", [True, False], ids=["auto", "explicit"])
def test_pure_layouts_in_both_sharding_modes(name, layout, auto):
  case = next(c for c in CASES if c.name == name)
  specs = {k: (s, LAYOUTS[layout](s)) for k, s in PURE_SHAPES.items()}
  check_case(case.ours(), specs, cpu_mesh(AxisType.Auto if auto else AxisType.Explicit), auto=auto)


def test_state_shardings_need_sharded_params():
  tx = oc.adam(1e-3)
  with pytest.raises(ValueError, match=r"params\['w'\].*no sharding"):
    oc.sharding.state_shardings(tx, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})


def test_zero1_divides_adamw_state_over_the_data_axis_and_matches_the_unsharded_run():
  """ZeRO stage 1 on 8 devices: parameters replicated, AdamW's moments split over "data"
  (oc.sharding.zero1_state_shardings): each device holds 1/8 of them, and 5 steps equal the
  unsharded run to a few epsilons (the same elementwise math on each slice)."""
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:8])
  replicated = NamedSharding(mesh, P())
  host = {
    k: np.sin(np.arange(np.prod(s), dtype=np.float32) * (0.3 + i)).reshape(s) * 0.5
    for i, (k, s) in enumerate(PURE_SHAPES.items())
  }
  params = {k: jax.device_put(x, replicated) for k, x in host.items()}
  tx = oc.adamw(1e-2, weight_decay=1e-3)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
  )
  placement = oc.sharding.zero1_state_shardings(tx, abstract)
  state = jax.jit(tx.init, out_shardings=placement)(params)
  p_shardings = jax.tree.map(lambda x: x.sharding, params)

  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return oc.apply_updates(params, updates), state

  sharded_step = jax.jit(
    step, in_shardings=(p_shardings, placement), out_shardings=(p_shardings, placement)
  )
  with on_cpu():  # the reference on the simulated devices' backend
    plain_params = {k: jnp.asarray(x) for k, x in host.items()}
    plain_state, plain_step = tx.init(plain_params), jax.jit(step)
    for _ in range(5):
      params, state = sharded_step(params, state)
      plain_params, plain_state = plain_step(plain_params, plain_state)

  moments = [x for x in jax.tree.leaves(state) if x.ndim]
  on_one = sum(
    s.data.nbytes for x in moments for s in x.addressable_shards if s.device == devices[0]
  )
  assert on_one * 8 == sum(x.nbytes for x in moments)  # every shape here divides by 8
  for x in moments:
    assert "data" in str(x.sharding.spec), x.sharding
  for x in jax.tree.leaves(params):
    assert x.sharding.is_equivalent_to(replicated, x.ndim)
  assert_ulps_close(
    jax.tree.leaves((params, state)), jax.tree.leaves((plain_params, plain_state)), 8
  )


def _adamw():
  return oc.adamw(1e-2, weight_decay=1e-3)


# The forms whose step runs inside a conditional (or splits a sharded bucket): under explicit
# sharding each must return the shardings it was given, whichever branch runs.
ZERO1_FORMS = {
  "adamw": (_adamw, "update"),
  "apply_if_finite-update": (lambda: oc.apply_if_finite(_adamw(), 3), "update"),
  "apply_if_finite-step": (lambda: oc.apply_if_finite(_adamw(), 3), "step"),
  "step_if_finite": (_adamw, "step_if_finite"),
  "MultiSteps-update": (lambda: oc.MultiSteps(_adamw(), 2), "update"),
  "MultiSteps-step": (lambda: oc.MultiSteps(_adamw(), 2), "step"),
  "with_diagnostics-update": (lambda: oc.with_diagnostics(_adamw(), every_k=2), "update"),
  "lookahead_in_state-update": (lambda: oc.lookahead_in_state(_adamw(), 2, 0.5), "update"),
  "lookahead_in_state-step": (lambda: oc.lookahead_in_state(_adamw(), 2, 0.5), "step"),
}


@pytest.mark.parametrize("form", sorted(ZERO1_FORMS))
def test_zero1_on_an_explicit_mesh_in_every_step_form(form):
  """ZeRO stage 1 as the sharding guide writes it, on ``jax.make_mesh``'s default explicit
  axes (a sharding is part of an array's type): every step form and wrapper returns the
  parameters replicated and the state split, as they came (``apply_if_finite`` and
  ``MultiSteps`` through ``step`` and ``step_if_finite`` run the step inside a conditional
  whose branches return the parameters sharded differently, which ``cond`` reconciles), and
  4 steps equal the unsharded run to a few epsilons, a NaN gradient at the third skipped
  by the forms that skip; each device holds 1/8 of every parameter-shaped state leaf."""
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  make, how = ZERO1_FORMS[form]
  tx = make()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=devices[:8])
  replicated = NamedSharding(mesh, P())
  host = {
    k: np.sin(np.arange(np.prod(s), dtype=np.float32) * (0.3 + i)).reshape(s) * 0.5
    for i, (k, s) in enumerate(PURE_SHAPES.items())
  }
  skips = form.startswith(("apply_if_finite", "step_if_finite"))

  def step(params, state, t):
    grads = jax.grad(loss)(params)
    if skips:  # a NaN at the third step
      grads = {**grads, "b2": jnp.where(t == 2, jnp.nan, 1.0) * grads["b2"]}
    if how == "step":
      return oc.step(tx, grads, state, params)
    if how == "step_if_finite":
      return oc.step_if_finite(tx, grads, state, params)[:2]
    updates, state = tx.update(grads, state, params)
    return oc.apply_updates(params, updates), state

  params = jax.device_put(host, replicated)
  placement = oc.sharding.zero1_state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=placement)(params)
  sharded_step = jax.jit(
    step, in_shardings=(replicated, placement, None), out_shardings=(replicated, placement)
  )
  with on_cpu():
    plain_params = {k: jnp.asarray(x) for k, x in host.items()}
    plain_state, plain_step = tx.init(plain_params), jax.jit(step)
    for t in range(4):
      params, state = sharded_step(params, state, t)
      plain_params, plain_state = plain_step(plain_params, plain_state, t)

  shapes = set(PURE_SHAPES.values())
  moments = [x for x in jax.tree.leaves(state) if x.shape in shapes]
  assert moments
  on_one = sum(
    s.data.nbytes for x in moments for s in x.addressable_shards if s.device == devices[0]
  )
  assert on_one * 8 == sum(x.nbytes for x in moments)
  for x in jax.tree.leaves(params):
    assert x.sharding.is_equivalent_to(replicated, x.ndim)
  floats = lambda tree: [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert_ulps_close(floats((params, state)), floats((plain_params, plain_state)), 8)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state), strict=True):
    if not jnp.issubdtype(got.dtype, jnp.floating):  # counts, flags
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert all(bool(jnp.all(jnp.isfinite(params[k]))) for k in host)
  assert max(float(jnp.max(jnp.abs(params[k] - host[k]))) for k in host) > 1e-3


def test_cond_reconciles_shardings_of_arrays_closed_over_on_an_explicit_mesh():
  """A conditional whose operand is None and whose branches return arrays they close over
  (``periodic_update``), one split over "data", one replicated: both branches return the
  split one; the line search's stored gradient keeps its loop carry's sharding."""
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  if not hasattr(jax.sharding, "reshard"):  # JAX 0.6 replicates what its conditionals return
    pytest.skip("explicit sharding is experimental before JAX 0.7")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=devices[:8])
  split = jax.device_put(jnp.arange(16.0), NamedSharding(mesh, P("data")))
  whole = jax.device_put(jnp.ones(16), NamedSharding(mesh, P()))
  for step, want in ((2, np.arange(16.0)), (3, np.ones(16))):
    got = jax.jit(lambda a, b, t: oc.periodic_update(a, b, t, 2))(split, whole, step)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert "data" in str(got.sharding.spec)
  tx = oc.chain(oc.adam(1e-2), oc.scale_by_backtracking_linesearch(10, store_grad=True))
  params = jax.device_put({"w": jnp.linspace(-1.0, 1.0, 64).reshape(16, 4)}, whole.sharding)
  value_fn = lambda p: jnp.sum(jnp.cos(p["w"]))  # noqa: E731
  placement = oc.sharding.zero1_state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=placement)(params)

  def step(p, s):
    value, grad = jax.value_and_grad(value_fn)(p)
    u, s = tx.update(grad, s, p, value=value, grad=grad, value_fn=value_fn)
    return oc.apply_updates(p, u), s

  new, _ = jax.jit(step, out_shardings=(whole.sharding, placement))(params, state)
  assert float(value_fn(new)) < float(value_fn(params))


def test_zero1_state_shardings_name_a_parameter_off_the_mesh():
  with pytest.raises(ValueError, match=r"params\['w'\].*'data'"):
    oc.sharding.zero1_state_shardings(
      oc.adam(1e-3),
      {
        "w": jax.ShapeDtypeStruct(
          (8,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
      },
    )


def _collectives(compiled_text, kinds=("all-gather", "all-to-all")):
  """The lines of a compiled program that run one of the collectives ``kinds``."""
  pattern = re.compile(rf" ({'|'.join(kinds)})(-start)?\(")
  return [line.strip() for line in compiled_text.splitlines() if pattern.search(line)]


def _lbfgs_step(tx):
  def step(params, state):
    value, grad = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return oc.apply_updates(params, updates), state

  return step


@pytest.mark.numerics
def test_lbfgs_on_explicit_axes_keeps_split_parameters_and_matches_unsharded():
  """L-BFGS's inner products (the two-loop recursion, the curvature, the zoom line search's
  slopes) contract dimensions split over the mesh: on explicit axes each names its scalar
  result replicated, and the history is created from the parameters' zeros, so each copy is
  placed as its parameter. Three steps on MIXED's layouts keep every parameter's sharding
  and equal the unsharded run (the partial products add in another order)."""
  if not hasattr(jax.sharding, "reshard"):
    pytest.skip("explicit sharding is experimental before JAX 0.7")
  mesh = cpu_mesh(AxisType.Explicit)
  plain, sharded, shardings = make_params(MIXED, mesh)
  tx = oc.lbfgs(memory_size=3)
  step = jax.jit(_lbfgs_step(tx))
  with set_mesh(mesh):
    params, state = sharded, jax.jit(tx.init)(sharded)
    for _ in range(STEPS):
      params, state = step(params, state)
  for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
  with on_cpu():
    ref, ref_state = plain, tx.init(plain)
    for _ in range(STEPS):
      ref, ref_state = step(ref, ref_state)
  # To 1e-5 of each leaf's magnitude: the line search's trials and the history's differences
  # (of nearby points) carry the reordered sums' rounding a few steps on.
  for got, want in zip(jax.tree.leaves((params, state)), jax.tree.leaves((ref, ref_state))):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(np.max(np.abs(want)), 1e-6))
  assert float(loss(params)) < float(loss(plain))


@pytest.mark.numerics
def test_lbfgs_with_zero1_on_explicit_axes_matches_unsharded():
  """ZeRO-1 of L-BFGS on explicit axes: the parameters replicated, the history and the last
  parameters and updates split over "data". The two-loop recursion's carry (the replicated
  update) keeps its sharding through the loops; 3 steps equal the unsharded run."""
  devices = jax.devices("cpu")
  if len(devices) < 8 or not hasattr(jax.sharding, "reshard"):
    pytest.skip("needs 8 CPU devices and explicit sharding (JAX 0.7 or later)")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=devices[:8])
  replicated = NamedSharding(mesh, P())
  specs = {k: (s, P()) for k, s in PURE_SHAPES.items()}
  plain, params, _ = make_params(specs, mesh)
  tx = oc.lbfgs(memory_size=3)
  placement = oc.sharding.zero1_state_shardings(tx, params, "data")
  step = _lbfgs_step(tx)
  sharded_step = jax.jit(
    step, in_shardings=(replicated, placement), out_shardings=(replicated, placement)
  )
  with set_mesh(mesh):
    state = jax.jit(tx.init, out_shardings=placement)(params)
    for _ in range(STEPS):
      params, state = sharded_step(params, state)
  history = state[0].diff_params_memory["w1"]
  assert {s.data.size for s in history.addressable_shards} == {history.size // 8}
  with on_cpu():
    ref, ref_state = plain, tx.init(plain)
    for _ in range(STEPS):
      ref, ref_state = jax.jit(step)(ref, ref_state)
  for got, want in zip(jax.tree.leaves((params, state)), jax.tree.leaves((ref, ref_state))):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(np.max(np.abs(want)), 1e-6))


@pytest.mark.parametrize("zero1", [False, True], ids=["state_shardings", "zero1"])
def test_lbfgs_history_is_placed_like_its_parameters(zero1):
  """L-BFGS's history holds memory_size copies of each parameter stacked along a leading
  axis: state_shardings (and zero1_state_shardings) place each like its parameter's own
  state leaf, the stacking axis whole (a replicated history made the step gather every
  parameter). The compiled step then gathers nothing."""
  mesh = cpu_mesh(AxisType.Auto)
  _, sharded, _ = make_params(MIXED, mesh)
  tx = oc.lbfgs(memory_size=3)
  if zero1:
    placement = oc.sharding.zero1_state_shardings(tx, sharded, "data")
  else:
    placement = oc.sharding.state_shardings(tx, sharded)
  lbfgs_state = placement[0]
  assert isinstance(lbfgs_state, oc.ScaleByLBFGSState)
  for history in (lbfgs_state.diff_params_memory, lbfgs_state.diff_updates_memory):
    for stacked, own in zip(jax.tree.leaves(history), jax.tree.leaves(lbfgs_state.params)):
      assert stacked.spec == P(None, *own.spec), (stacked.spec, own.spec)
  if zero1:
    return
  p_shardings = jax.tree.map(lambda x: x.sharding, sharded)
  state = jax.jit(tx.init, out_shardings=placement)(sharded)
  compiled = (
    jax.jit(_lbfgs_step(tx), in_shardings=(p_shardings, placement)).lower(sharded, state).compile()
  )
  assert _collectives(compiled.as_text()) == []


def test_state_shardings_place_optax_masked_and_partition_states():
  """Optax's masked and partition leave Optax's own MaskedNode in the inner state where a
  parameter is masked out: those subtrees mirror the parameters as optcompose's do, so each
  moment takes its parameter's sharding (the same placement as optcompose's wrappers)."""
  mesh = cpu_mesh(AxisType.Auto)
  _, sharded, _ = make_params(MIXED, mesh)
  mask = {"embed": True, "block": False, "head": {"kernel": True, "bias": False}}
  labels = {"embed": "a", "block": "b", "head": {"kernel": "a", "bias": "b"}}
  for lib in (optax, oc):
    for tx in (
      lib.masked(lib.adam(1e-3), mask),
      lib.partition({"a": lib.adam(1e-3), "b": lib.sgd(1e-3, momentum=0.9)}, labels),
    ):
      placement = oc.sharding.state_shardings(tx, sharded)
      by_shape = {x.shape: x.sharding for x in jax.tree.leaves(sharded)}
      shapes = jax.tree.leaves(jax.eval_shape(tx.init, sharded))
      placed = jax.tree.leaves(placement)
      assert len(shapes) == len(placed)
      assert sum(x.shape in by_shape for x in shapes) >= 3
      for x, sharding in zip(shapes, placed):
        want = by_shape.get(x.shape, NamedSharding(mesh, P()))
        assert sharding == want, (lib.__name__, x.shape, sharding, want)


@pytest.mark.xla_cpu_program
def test_with_diagnostics_measures_split_leaves_without_gathering_them():
  """with_diagnostics' norms and counts over parameters split over 8 devices (auto axes,
  where a leaf's sharding is unknown while jit traces): each leaf is reduced where it lives,
  so the compiled step has no all-gather, and every all-reduce carries scalars only (as
  AdamW's own step, which has none). Small leaves are joined only on a single device."""
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,), devices=devices[:8])
  specs = {
    "a": ((128, 64), P("fsdp", None)),
    "b": ((64, 128), P(None, "fsdp")),
    "bias": ((4096,), P("fsdp")),
    "scale": ((5,), P()),
  }
  _, params, shardings = make_params(specs, mesh)
  tx = oc.with_diagnostics(oc.adamw(1e-3))
  placement = oc.sharding.state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=placement)(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return oc.apply_updates(params, updates), state

  text = (
    jax.jit(step, in_shardings=(shardings, placement, shardings))
    .lower(params, state, params)
    .compile()
    .as_text()
  )
  assert _collectives(text) == []
  reduced = _collectives(text, ("all-reduce",))
  assert reduced
  for line in reduced:  # f32[] or a tuple of them: scalars only
    result = line.split("=", 1)[1].split(" all-reduce")[0]
    assert re.findall(r"\w+\[([\d,]*)\]", result), line
    assert set(re.findall(r"\w+\[([\d,]*)\]", result)) == {""}, line


def test_small_leaves_are_joined_for_their_measures_on_one_device_only(monkeypatch):
  from optcompose.wrappers import measures

  leaves = [jnp.ones(3), jnp.ones((2, 2)), jnp.ones(measures.GROUPED_SIZE)]
  assert measures._one_device() == (jax.device_count() == 1)
  monkeypatch.setattr(measures, "_one_device", lambda: False)  # as on 8 devices
  assert [x.shape for x in measures.grouped(leaves)] == [(3,), (2, 2), (1 << 14,)]
  monkeypatch.setattr(measures, "_one_device", lambda: True)
  assert [x.shape for x in measures.grouped(leaves)] == [(1 << 14,), (7,)]


def test_an_eval_shape_template_on_explicit_axes_restores_inside_set_mesh(tmp_path):
  # jax.eval_shape places the template's structs on an abstract mesh on explicit axes (the
  # checkpoints guide's template, the many-hosts guide's with zero1_state_shardings): both
  # restores failed inside JAX ("is_fully_addressable is not implemented for AbstractMesh").
  from optcompose.checkpoint import (
    restore_checkpoint,
    restore_orbax_checkpoint,
    save_checkpoint,
    save_orbax_checkpoint,
  )

  if not hasattr(jax.sharding, "get_mesh"):
    pytest.skip("this JAX has no jax.sharding.get_mesh")
  mesh = cpu_mesh(AxisType.Explicit)
  tx = oc.adamw(1e-3)
  with set_mesh(mesh):
    params = jax.device_put({"w": jnp.ones((8, 16))}, NamedSharding(mesh, P()))
    place = oc.sharding.zero1_state_shardings(tx, params, "data")
    state = jax.jit(tx.init, out_shardings=place)(params)
    save_checkpoint(tmp_path / "c.msgpack", state)
    save_orbax_checkpoint(tmp_path / "orbax", state)
    abstract = jax.eval_shape(tx.init, params)
    zplace = oc.sharding.zero1_state_shardings(tx, jax.eval_shape(lambda: params), "data")
    template = jax.tree.map(
      lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p), abstract, zplace
    )
    for restore, where in ((restore_checkpoint, "c.msgpack"), (restore_orbax_checkpoint, "orbax")):
      restored = restore(tmp_path / where, template)
      for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), where
        np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r"abstract mesh .*jax.set_mesh"):
    restore_checkpoint(tmp_path / "c.msgpack", template)
