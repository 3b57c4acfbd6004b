"""Adafactor's factored second moment where the parity cases cannot look: the formula on
3-D leaves and tied axes against an independent NumPy formula (float64), the default decay,
Optax's state continued by ours, the state's size, float16, bad input, jit, sharding and
FlatParams.

Symbols (tests/cases_adafactor.py runs the registry's matrix): per leaf, G = |g|^2 + eps,
d0 the largest axis and d1 the second largest; R, C the row and column statistics
(``v_row``, ``v_col``), v the full one; rho_t = decay_rate_fn(t - 1, decay_rate).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import factorized as optax_factorized

import optcompose as oc
from numerics import assert_rel_close, assert_ulps_close, standard_promotion, x64
from optcompose.transforms.factored import decay_rate_pow, factored_dims

# min_dim_size_to_factor=2 factors every leaf but the vector, the scalar and (5, 1).
SHAPES = {
  "tall": (6, 4),
  "wide": (3, 5),
  "tie": (4, 4),
  "cube": (3, 2, 5),
  "tie3": (2, 3, 3),
  "vec": (7,),
  "scalar": (),
  "thin": (5, 1),
}


def make_tree(dtype=np.float64, seed=0):
  rng = np.random.default_rng(seed)
  return {k: np.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}


def grads_at(t, dtype=np.float64):
  """Gradients that change with the step, with a zero row in the tall leaf (only eps
  keeps its statistics positive)."""
  g = make_tree(dtype, seed=t + 1)
  g["tall"][2] = 0.0
  return g


# --- an independent NumPy formula -----------------------------------------------------------


def axes_np(shape, min_dim):
  """(d1, d0): d0 the last axis of the largest size, d1 the last of the largest among the
  others; None for fewer than 2 axes or a second largest below ``min_dim``."""
  if len(shape) < 2:
    return None
  d0 = max(range(len(shape)), key=lambda i: (shape[i], i))
  d1 = max((i for i in range(len(shape)) if i != d0), key=lambda i: (shape[i], i))
  return None if shape[d1] < min_dim else (d1, d0)


def adafactor_np(grads, steps_rho, eps, min_dim):
  """Shazeer and Stern's estimate with sums: R = ema of the sums of G over d0, C = ema of
  the sums over d1, V_hat = R C / sum(R); u = g / sqrt(V_hat). Returns the updates of
  every step and the final (R, C, v)."""
  state, out = {}, []
  for g_tree, rho in zip(grads, steps_rho):
    u_tree = {}
    for k, g in g_tree.items():
      G = g * g + eps
      dims = axes_np(g.shape, min_dim)
      if dims is None:
        v = rho * state.get(k, 0.0) + (1 - rho) * G
        state[k] = v
        u_tree[k] = g / np.sqrt(v)
        continue
      d1, d0 = dims
      R0, C0 = state.get(k, (0.0, 0.0))
      R = rho * R0 + (1 - rho) * G.sum(axis=d0, keepdims=True)
      C = rho * C0 + (1 - rho) * G.sum(axis=d1, keepdims=True)
      state[k] = (R, C)
      u_tree[k] = g / np.sqrt(R * C / R.sum(axis=d1, keepdims=True))
    out.append(u_tree)
  return out, state


def power_decay_f64(step, c):
  """A float64 decay (the default computes in float32, as Optax's does)."""
  return 1.0 - (jnp.asarray(step).astype(jnp.float64) + 1.0) ** -c


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("factored", [True, False])
def test_factored_formula_matches_numpy_in_float64(factored):
  """6 steps with a step offset: updates and statistics to float64 rounding; the state
  holds the means (sums / size) and (1,) placeholders where a leaf does not use a field."""
  eps, c, offset, steps = 1e-3, 0.7, -3, 6
  with x64():
    tx = oc.scale_by_factored_rms(factored, c, offset, 2, eps, decay_rate_fn=power_decay_f64)
    params = jax.tree.map(jnp.asarray, make_tree())
    state, update = tx.init(params), jax.jit(tx.update)
    grads = [grads_at(t) for t in range(steps)]
    ours = []
    for g in grads:
      u, state = update(jax.tree.map(jnp.asarray, g), state, params)
      ours.append(u)
  rhos = [1 - (t - offset + 1.0) ** -c for t in range(steps)]
  ref, ref_state = adafactor_np(grads, rhos, eps, 2 if factored else 10**9)
  for t in range(steps):
    for k in SHAPES:
      assert ours[t][k].dtype == jnp.float64
      np.testing.assert_allclose(ours[t][k], ref[t][k], rtol=1e-12, atol=0, err_msg=f"{t} {k}")
  for k, shape in SHAPES.items():
    dims = axes_np(shape, 2) if factored else None
    assert factored_dims(shape, factored, 2) == dims
    if dims is None:
      np.testing.assert_allclose(state.v[k], ref_state[k], rtol=1e-12, atol=0)
      assert state.v_row[k].shape == state.v_col[k].shape == (1,)
    else:
      d1, d0 = dims
      R, C = ref_state[k]
      np.testing.assert_allclose(state.v_row[k], R.squeeze(d0) / shape[d0], rtol=1e-12)
      np.testing.assert_allclose(state.v_col[k], C.squeeze(d1) / shape[d1], rtol=1e-12)
      assert state.v[k].shape == (1,)
  assert int(state.count) == steps


@pytest.mark.numerics
def test_default_decay_is_adafactor_s_power_schedule_in_float32():
  """rho = 1 - t^(-0.8), t from 1 (rho_1 = 0: the first statistic is G itself), in float32
  as Optax computes it (so float64 runs match Optax's), also under x64."""
  steps = jnp.arange(0, 5000, 7, dtype=jnp.int32)
  for enable in (False, True):
    with x64() if enable else jax.numpy_dtype_promotion("strict"):
      rho = decay_rate_pow(steps, 0.8)
      theirs = standard_promotion(optax_factorized._decay_rate_pow)(steps, 0.8)
    assert rho.dtype == jnp.float32 and float(rho[0]) == 0.0
    assert_ulps_close(rho, theirs, 1)
    exact = 1 - (np.asarray(steps, np.float64) + 1) ** -0.8
    assert_ulps_close(rho, exact, 2, dtype=jnp.float32)


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize(
  "kwargs",
  [
    dict(min_dim_size_to_factor=2),
    dict(
      min_dim_size_to_factor=1,
      decay_rate=0.5,
      step_offset=2,
      epsilon=1e-6,
      decay_rate_fn=lambda s, c: jnp.minimum(optax_factorized._decay_rate_pow(s, c), 0.9),
    ),
  ],
)
def test_odd_shapes_and_options_match_optax_in_float64(kwargs):
  """3-D leaves, tied axes, a custom decay and an offset (the count passes it at step 3),
  against Optax's own transformation, which is given the same arguments."""
  with x64():
    params = jax.tree.map(jnp.asarray, make_tree())
    ours = oc.scale_by_factored_rms(**kwargs)
    ref = standard_promotion(optax.scale_by_factored_rms(**kwargs))
    s_ours, s_ref = ours.init(params), ref.init(params)
    assert [x.shape for x in jax.tree.leaves(s_ours)] == [x.shape for x in jax.tree.leaves(s_ref)]
    count = int(kwargs.get("step_offset", 0))
    s_ours, s_ref = s_ours._replace(count=jnp.int32(count)), s_ref._replace(count=jnp.int32(count))
    for t in range(8):
      g = jax.tree.map(jnp.asarray, grads_at(t))
      u_ours, s_ours = jax.jit(ours.update)(g, s_ours, params)
      u_ref, s_ref = jax.jit(ref.update)(g, s_ref, params)
      assert_rel_close((u_ours, tuple(s_ours)), (u_ref, tuple(s_ref)), 1e-12, what=f"step {t}")


@pytest.mark.numerics
@pytest.mark.float64
def test_optax_s_state_continues_in_ours():
  """A checkpoint of Optax's Adafactor state (factored, with momentum) has our state's
  leaves: 3 steps of Optax, then 3 of ours from its state, equal 6 of Optax's."""
  kwargs = dict(min_dim_size_to_factor=2, momentum=0.9, weight_decay_rate=1e-3)
  with x64():
    ours, ref = oc.adafactor(1e-2, **kwargs), standard_promotion(optax.adafactor(1e-2, **kwargs))

    def stepper(tx, apply):
      @jax.jit
      def step(params, state, g):
        u, state = tx.update(g, state, params)
        return apply(params, u), state

      return step

    step_ours, step_ref = stepper(ours, oc.apply_updates), stepper(ref, optax.apply_updates)
    pick = lambda tree: {k: jnp.asarray(tree[k]) for k in ("tall", "cube", "vec")}  # noqa: E731
    params = pick(make_tree())
    p_ref, s_ref = params, ref.init(params)
    for t in range(6):
      if t == 3:  # the checkpoint: Optax's leaves into our state's structure
        s_ours = jax.tree.unflatten(jax.tree.structure(ours.init(params)), jax.tree.leaves(s_ref))
        p_ours = p_ref
      g = pick(grads_at(t))
      if t >= 3:
        p_ours, s_ours = step_ours(p_ours, s_ours, g)
      p_ref, s_ref = step_ref(p_ref, s_ref, g)
    assert_rel_close((p_ours, jax.tree.leaves(s_ours)), (p_ref, jax.tree.leaves(s_ref)), 1e-12)


# --- the state's size ------------------------------------------------------------------------


def state_bytes(tx, params):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params)))


def test_factored_state_is_rows_plus_cols_per_matrix():
  """Bytes per parameter: a factored (r, c) matrix keeps r + c (+ a 1-element placeholder)
  numbers; unfactored, r * c; Adafactor's other members keep nothing but the momentum."""
  params = {
    "w": jax.ShapeDtypeStruct((1024, 4096), jnp.float32),
    "emb": jax.ShapeDtypeStruct((32000, 512), jnp.bfloat16),
    "b": jax.ShapeDtypeStruct((4096,), jnp.float32),
  }
  n = 1024 * 4096 + 32000 * 512 + 4096
  factored = 4 * (1024 + 4096 + 1) + 2 * (512 + 32000 + 1) + 4 * (1 + 1 + 4096) + 4  # + count
  full = 4 * 1024 * 4096 + 2 * 32000 * 512 + 4 * 4096 + 4 * 2 + 2 * 2 + 4 * 2 + 4
  assert state_bytes(oc.scale_by_factored_rms(), params) == factored
  assert state_bytes(oc.adafactor(1e-3), params) == factored
  assert factored / n < 0.01  # against 8 bytes per parameter for Adam's two float32 moments
  assert state_bytes(oc.scale_by_factored_rms(factored=False), params) == full
  assert state_bytes(oc.scale_by_factored_rms(min_dim_size_to_factor=4097), params) == full
  # The momentum costs a float32 per parameter (dtype_momentum), as in Optax.
  with_momentum = state_bytes(oc.adafactor(1e-3, momentum=0.9), params)
  assert with_momentum == factored + 4 * n + 4  # + its count
  assert with_momentum == state_bytes(optax.adafactor(1e-3, momentum=0.9), params)


# --- low precision ---------------------------------------------------------------------------

NO_F16C = "xla_cpu_max_isa=SSE" in os.environ.get("XLA_FLAGS", "")


@pytest.mark.numerics
@pytest.mark.skipif(NO_F16C, reason="XLA CPU cannot compile float16 arithmetic without F16C")
def test_float16_statistics_are_computed_in_float32():
  """In float16, eps = 1e-30 is 0 and 300^2 overflows: Optax's first step is NaN for a zero
  gradient and 0 for a large one. Ours computes and stores the statistics in float32
  (Optax stores float16), and is within an ulp or two of float64."""
  params = {"w": jnp.ones((4, 6), jnp.float16), "b": jnp.ones(4, jnp.float16)}
  g = {
    "w": jnp.asarray(np.outer([0.0, 1.0, 30.0, -2.0], np.linspace(-1, 1, 6)), jnp.float16),
    "b": jnp.asarray([0.0, 300.0, 0.05, -4.0], jnp.float16),
  }
  g64 = jax.tree.map(lambda x: np.asarray(x, np.float64), g)
  tx = oc.scale_by_factored_rms(min_dim_size_to_factor=2)
  u, state = jax.jit(tx.update)(g, tx.init(params), params)
  ref, _ = adafactor_np([g64], [0.0], 1e-30, 2)
  assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(u))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tuple(state)[1:]))
  assert_ulps_close(u, ref[0], 2, dtype=jnp.float16)
  theirs = standard_promotion(optax.scale_by_factored_rms(min_dim_size_to_factor=2))
  u_optax, _ = theirs.update(g, theirs.init(params), params)
  assert np.isnan(np.asarray(u_optax["b"][0], np.float32))  # 0 * (0 + 0)^(-1/2)
  assert float(u_optax["b"][1]) == 0.0 and float(u["b"][1]) == 1.0  # 300 / sqrt(inf)
  # Three steps: the statistics keep float32, so the large entry stays within an ulp too.
  g64 = jax.tree.map(lambda x: np.asarray(x, np.float64), g)
  state = tx.init(params)
  for t in range(3):
    u, state = jax.jit(tx.update)(g, state, params)
  ref, _ = adafactor_np([g64] * 3, [1 - (s + 1.0) ** -0.8 for s in range(3)], 1e-30, 2)
  assert_ulps_close(u, ref[-1], 2, dtype=jnp.float16)


@pytest.mark.numerics
def test_the_decay_stays_finite_at_the_last_int32_count():
  # The count saturates at 2**31 - 1; the decay's t = count + 1 was computed in int32 and
  # wrapped to -2**31, so (-2**31)^(-0.8) = NaN from then on (Optax's too). Three steps from
  # count 2**31 - 2 against the float64 estimate with the float32 decays 1 - t^(-0.8).
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(3)}
  grads = {"w": jnp.arange(12.0).reshape(3, 4) - 5.5, "b": jnp.asarray([1.0, -2.0, 0.5])}
  tx = oc.scale_by_factored_rms(min_dim_size_to_factor=2)
  state = tx.init(params)._replace(count=jnp.asarray(2**31 - 2, jnp.int32))
  updates = []
  for _ in range(3):
    u, state = jax.jit(tx.update)(grads, state, params)
    updates.append(u)
  assert int(state.count) == 2**31 - 1
  rhos = [
    float(np.float32(1) - np.float32(t) ** np.float32(-0.8)) for t in (2**31 - 1, 2**31, 2**31)
  ]
  g64 = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  ref, _ = adafactor_np([g64] * 3, rhos, 1e-30, 2)
  for got, want in zip(updates, ref):
    assert_rel_close(got, want, 1e-5, "a step at the last count")


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "build, error, argument",
  [
    (lambda: oc.scale_by_factored_rms(decay_rate=-0.8), ValueError, "decay_rate"),
    (lambda: oc.scale_by_factored_rms(decay_rate=float("nan")), ValueError, "decay_rate"),
    (
      lambda: oc.scale_by_factored_rms(min_dim_size_to_factor=0),
      ValueError,
      "min_dim_size_to_factor",
    ),
    (
      lambda: oc.scale_by_factored_rms(min_dim_size_to_factor=2.0),
      TypeError,
      "min_dim_size_to_factor",
    ),
    (lambda: oc.scale_by_factored_rms(epsilon=0.0), ValueError, "epsilon"),
    (lambda: oc.scale_by_factored_rms(epsilon=1e-40), ValueError, "epsilon"),  # flushed to 0
    (lambda: oc.scale_by_factored_rms(step_offset=float("inf")), ValueError, "step_offset"),
    (lambda: oc.scale_by_factored_rms(factored="yes"), TypeError, "factored"),
    (lambda: oc.scale_by_factored_rms(decay_rate_fn=0.8), TypeError, "decay_rate_fn"),
    (lambda: oc.adafactor(1e-3, min_dim_size_to_factor=-1), ValueError, "min_dim_size_to_factor"),
    (lambda: oc.adafactor(-1e-3), ValueError, "learning_rate"),
    (lambda: oc.adafactor(1e-3, decay_rate=-1.0), ValueError, "decay_rate"),
    (lambda: oc.adafactor(1e-3, clipping_threshold=0.0), ValueError, "clipping_threshold"),
    (lambda: oc.adafactor(1e-3, momentum=1.5), ValueError, "momentum"),
    (lambda: oc.adafactor(1e-3, weight_decay_rate=-1e-3), ValueError, "weight_decay_rate"),
    (lambda: oc.adafactor(1e-3, eps=0.0), ValueError, "eps"),
    (lambda: oc.adafactor(1e-3, dtype_momentum=jnp.int32), TypeError, "dtype_momentum"),
  ],
)
def test_bad_hyperparameters_are_named(build, error, argument):
  with pytest.raises(error, match=f"`{argument}`"):
    build()


def test_updates_that_do_not_fit_the_state_are_named():
  tx = oc.scale_by_factored_rms(min_dim_size_to_factor=2)
  state = tx.init({"w": jnp.ones((4, 6)), "b": jnp.ones(3)})
  # (4, 1) would broadcast against the (4,) row statistic of (4, 6): caught, named.
  with pytest.raises(
    ValueError,
    match=r"`updates\['w'\]` has shape \(4, 1\).*\(1,\), \(1,\), "
    r"\(4, 1\).*\(4,\), \(6,\), \(1,\)",
  ):
    tx.update({"w": jnp.ones((4, 1)), "b": jnp.ones(3)}, state)
  with pytest.raises(ValueError, match=r"structure of `state.v_row`.*\['b'\] is missing"):
    tx.update({"w": jnp.ones((4, 6))}, state)
  theirs = optax.scale_by_factored_rms().init({"w": jnp.ones(3)})
  with pytest.raises(oc.StateMismatchError, match="not optcompose's"):
    tx.update({"w": jnp.ones(3)}, theirs)
  with pytest.raises(TypeError, match="floating-point updates"):
    tx.update({"w": jnp.ones((4, 6), jnp.int32), "b": jnp.ones(3)}, state)


def test_params_are_optional_for_the_primitive_and_needed_by_the_parameter_scale():
  """Optax's primitive requires params and reads their shapes only; ours reads the state.
  Adafactor's relative step (scale_by_param_block_rms) needs them."""
  params = {"w": jnp.ones((4, 6))}
  tx = oc.scale_by_factored_rms(min_dim_size_to_factor=2)
  state = tx.init(params)
  without, with_params = (jax.jit(tx.update)(params, state, *p)[0]["w"] for p in ((), (params,)))
  np.testing.assert_array_equal(without, with_params)
  with pytest.raises(ValueError, match="needs `params`"):
    jax.eval_shape(oc.adafactor(1e-3).update, params, oc.adafactor(1e-3).init(params))


# --- jit, sharding, FlatParams ---------------------------------------------------------------


@pytest.mark.numerics
def test_jit_traces_once_and_matches_eager():
  """The factoring is decided from static shapes: one trace for every step; the jitted
  steps equal the eager ones to a few ulps (XLA fuses the reductions differently)."""
  traces = []
  tx = oc.adafactor(1e-2, min_dim_size_to_factor=2, momentum=0.5)
  pick = ("cube", "vec")  # a factored 3-D leaf, a full one (eager compiles op by op: few)
  as_f32 = lambda tree: {k: jnp.asarray(tree[k], jnp.float32) for k in pick}  # noqa: E731

  @jax.jit
  def step(params, state, g):
    traces.append(1)
    u, state = tx.update(g, state, params)
    return oc.apply_updates(params, u), state, u

  p_jit = p_eager = as_f32(make_tree())
  s_jit, s_eager = jax.jit(tx.init)(p_jit), tx.init(p_eager)
  for t in range(3):
    g = as_f32(grads_at(t))
    p_jit, s_jit, u_jit = step(p_jit, s_jit, g)
    u_eager, s_eager = tx.update(g, s_eager, p_eager)
    p_eager = oc.apply_updates(p_eager, u_eager)
    assert_ulps_close(u_jit, u_eager, 8, what=f"step {t}: ")  # 1.8 measured
  assert len(traces) == 1


def test_factored_statistics_keep_the_sharding_of_their_axis():
  """Under JAX's explicit sharding mode the row and column statistics of a 2-D
  tensor-parallel kernel are created, and stay, sharded along the axis they keep."""
  from compat import set_mesh

  if len(jax.devices("cpu")) < 8 or not hasattr(jax.sharding, "AxisType"):
    pytest.skip("needs 8 CPU devices and JAX's explicit sharding mode")
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh(
    (2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices("cpu")[:8]
  )
  params = {
    "w": jax.device_put(
      jnp.linspace(-1.0, 1.0, 16 * 32).reshape(16, 32), NamedSharding(mesh, P("data", "model"))
    )
  }
  tx = oc.scale_by_factored_rms(min_dim_size_to_factor=2)
  with set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    _, after = jax.jit(tx.update)(params, state, params)
  for s in (state, after):
    assert s.v_row["w"].shape == (16,) and s.v_row["w"].sharding.spec == P("data")
    assert s.v_col["w"].shape == (32,) and s.v_col["w"].sharding.spec == P("model")


def test_factoring_refuses_flat_params():
  """A bucket is 1-D: factoring needs each model leaf's matrix shape."""
  flat = oc.flat_params({"w": jnp.ones((4, 6)), "b": jnp.ones(3)})
  tx = oc.scale_by_factored_rms()
  with pytest.raises(TypeError, match=r"factored=False is elementwise.*one value per leaf"):
    tx.init(flat)
  state = tx.init({"w": jnp.ones((4, 6)), "b": jnp.ones(3)})
  with pytest.raises(TypeError, match="factored=True"):
    tx.update(flat, state)
  for tx in (oc.adafactor(1e-3), oc.adafactor(1e-3, factored=False)):  # clip_by_block_rms
    with pytest.raises(TypeError, match="one value per leaf of the model"):
      tx.update(flat, tx.init(flat), flat)


@pytest.mark.numerics
def test_unfactored_adafactor_runs_on_flat_params_like_the_tree():
  """``factored=False`` without clipping or the parameter scale is elementwise: FlatParams
  give the tree's updates, per step from identical inputs, to a few float32 epsilons."""
  tx = oc.adafactor(
    1e-2, factored=False, clipping_threshold=None, multiply_by_parameter_scale=False, momentum=0.9
  )
  update = jax.jit(tx.update)
  as_f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)  # noqa: E731
  params = as_f32(make_tree())
  s_tree, s_flat = tx.init(params), tx.init(oc.flat_params(params))
  for t in range(3):
    g = as_f32(grads_at(t))
    u_tree, s_tree = update(g, s_tree, params)
    u_flat, s_flat = update(oc.flat_params(g), s_flat, oc.flat_params(params))
    assert isinstance(u_flat, oc.FlatParams)
    assert_ulps_close(u_flat.unflatten(), u_tree, 8, what=f"step {t}: ")  # 2.2 measured
    params = oc.apply_updates(params, u_tree)
