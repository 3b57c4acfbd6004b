"""Diagnostics in the optimizer state against NumPy float64 measurements, and the flat dict."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optcompose as oc
import optcompose.testing as oct
import optcompose.wrappers.diagnostics as diag_module
from optcompose.wrappers.diagnostics import (
  DiagnosticsState,
  diagnostics_dict,
  leading_clip_norm,
  with_diagnostics,
)
from numerics import assert_ulps_close, standard_promotion, x64

STEPS = 5
MEASURED = (
  "count",
  "grad_norm",
  "update_norm",
  "param_norm",
  "update_ratio",
  "learning_rate",
  "zero_fraction",
  "nonfinite",
)


def schedule(count):
  return optax.linear_schedule(0.1, 0.02, 4)(count)


def initial_params():
  """Leaves of different sizes and zero fractions (1/2 of "b", none of "w", the scalar)."""
  rng = np.random.default_rng(0)
  return {
    "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    "b": jnp.asarray([0.0, 0.5, 0.0, -0.25], jnp.float32),
    "s": jnp.asarray(1.5, jnp.float32),
  }


def grads_at(t, params):
  rng = np.random.default_rng(100 + t)
  # In float32 whatever the params' dtype (bfloat16 params are widened; callers cast back).
  return jax.tree.map(
    lambda p: (
      jnp.asarray(rng.normal(size=np.shape(p)), jnp.float32) + jnp.asarray(p).astype(jnp.float32)
    ),
    params,
  )


def np_norm(tree):
  return math.sqrt(
    sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree))
  )


def np_zero_fraction(tree):
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  return sum(int(np.sum(x == 0)) for x in leaves) / sum(x.size for x in leaves)


def train(tx, steps=STEPS, jit=True, params=None, grads=grads_at):
  """Run ``steps`` updates; record (grads, params in force, updates, state) per step."""
  params = initial_params() if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  records = []
  for t in range(steps):
    g = grads(t, params)
    u, state = update(g, state, params)
    records.append((g, params, u, state))
    params = oc.apply_updates(params, u)
  return records


OPTIMIZERS = {
  # learning rate read from the schedule's record in the state
  "adamw": (lambda: oc.adamw(schedule, weight_decay=0.1), None, schedule),
  # L1 makes exact zeros; the learning rate is given to the wrapper
  "sgd_l1": (lambda: oc.sgd(0.1, 0.9, l1=0.2), 0.1, lambda t: 0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("jit", [True, False])
def test_values_equal_independent_numpy_measurements(name, jit):
  make, lr, expected_lr = OPTIMIZERS[name]
  records = train(with_diagnostics(make(), lr), jit=jit)
  fractions = []
  for t, (g, params, u, state) in enumerate(records):
    assert isinstance(state, DiagnosticsState)
    np.testing.assert_allclose(float(state.grad_norm), np_norm(g), rtol=1e-6)
    np.testing.assert_allclose(float(state.update_norm), np_norm(u), rtol=1e-6)
    np.testing.assert_allclose(float(state.param_norm), np_norm(params), rtol=1e-6)
    np.testing.assert_allclose(float(state.update_ratio), np_norm(u) / np_norm(params), rtol=2e-6)
    np.testing.assert_allclose(float(state.used_learning_rate), float(expected_lr(t)), rtol=1e-6)
    np.testing.assert_allclose(float(state.zero_fraction), np_zero_fraction(params), rtol=1e-6)
    fractions.append(float(state.zero_fraction))
    assert int(state.nonfinite) == 0 and int(state.count) == t + 1
    for key in MEASURED:
      field = "used_learning_rate" if key == "learning_rate" else key
      value = getattr(state, field)
      assert value.shape == () and value.dtype == (
        jnp.int32 if field in ("count", "nonfinite") else jnp.float32
      ), field
  # Over all 17 elements (2 zeros), not the mean of the leaves' fractions (1/6).
  assert fractions[0] == pytest.approx(2 / 17, rel=1e-6)
  if name == "sgd_l1":
    assert fractions[-1] > fractions[0]  # L1 at work, seen one step later


@pytest.mark.numerics
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("jit", [True, False])
def test_updates_and_inner_state_are_bitwise_the_inner(name, jit):
  """Eagerly, the wrapper runs the inner's very operations: bitwise equal. Jitted, the wrapper
  and the inner are two programs (XLA may fuse the inner's arithmetic with the norms, and
  contract a multiply-add into an FMA differently): equal to an ulp or two."""
  make, lr, _ = OPTIMIZERS[name]
  ours = train(with_diagnostics(make(), lr), jit=jit)
  ref = train(make(), jit=jit)
  for (_, p, u, s), (_, p_ref, u_ref, s_ref) in zip(ours, ref):
    assert_same(jit, (p, u, s.inner_state), (p_ref, u_ref, s_ref))


@pytest.mark.parametrize("jit", [True, False])
def test_every_k_measures_the_updates_numbered_0_k_2k_and_holds_them_between(jit):
  """With ``every_k=3`` the measurements of updates 0, 3, 6 are those of the every-step
  wrapper (to float32 rounding: two programs), held unchanged in between, while the updates,
  the inner state, ``count`` and ``learning_rate`` follow every step."""
  make, lr, expected_lr = OPTIMIZERS["adamw"]
  every = train(with_diagnostics(make(), lr), steps=8, jit=jit)
  sparse = train(with_diagnostics(make(), lr, every_k=3), steps=8, jit=jit)
  for t, ((_, p, u, s), (_, p_k, u_k, s_k)) in enumerate(zip(every, sparse)):
    assert_same(jit, (p_k, u_k, s_k.inner_state), (p, u, s.inner_state))
    assert int(s_k.count) == t + 1
    np.testing.assert_allclose(float(s_k.used_learning_rate), float(expected_lr(t)), rtol=1e-6)
    measured_at = every[t - t % 3][3]
    for field in ("grad_norm", "update_norm", "param_norm", "update_ratio", "zero_fraction"):
      np.testing.assert_allclose(
        float(getattr(s_k, field)),
        float(getattr(measured_at, field)),
        rtol=1e-6,
        err_msg=f"{field} after update {t}",
      )
    assert float(s_k.grad_norm) != float(every[t][3].grad_norm) or t % 3 == 0


def assert_same(jit, ours, ref):
  if jit:
    assert_ulps_close(ours, ref, 2)
  else:
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_state():
  params = initial_params()
  state = with_diagnostics(oc.adamw(schedule)).init(params)
  assert float(state.used_learning_rate) == pytest.approx(float(schedule(0)))
  assert int(state.count) == 0 and float(state.grad_norm) == 0.0 and int(state.nonfinite) == 0
  assert with_diagnostics(oc.adam(0.1)).init(params).used_learning_rate is None  # not known


def test_an_unknown_learning_rate_is_left_out_and_trips_no_debug_nans():
  # A NaN marker for "not known" was reported by jax_debug_nans at init and at every
  # jitted step: the flag users turn on to hunt NaNs, with the wrapper they log them with.
  params = initial_params()
  for lr, keys in ((None, set()), (1e-3, {"learning_rate"})):
    tx = with_diagnostics(oc.adamw(1e-3), learning_rate=lr)

    @jax.jit
    def step(grads, state, params, tx=tx):
      _, state = tx.update(grads, state, params)
      return state, oc.metrics.metrics(state)

    with jax.debug_nans(True), jax.debug_infs(True):
      state, logged = step(params, tx.init(params), params)
      assert set(logged) & {"learning_rate"} == keys
      assert set(diagnostics_dict(state)) & {"learning_rate"} == keys
      assert int(logged["step"]) == 1 and np.isfinite(float(logged["update_norm"]))


@pytest.mark.numerics
def test_reuses_the_norm_measured_by_leading_clipping():
  lr = 1e-2
  reused = train(with_diagnostics(oc.chain(oc.clip_by_global_norm(0.5), oc.adam(lr))))
  recomputed = train(
    with_diagnostics(
      standard_promotion(optax.chain(optax.clip_by_global_norm(0.5), optax.adam(lr)))
    )
  )
  for (g, _, u, s), (_, _, u_ref, s_ref) in zip(reused, recomputed):
    assert leading_clip_norm(s.inner_state) is not None
    assert leading_clip_norm(s_ref.inner_state) is None  # Optax's clipping keeps no norm
    np.testing.assert_allclose(float(s.grad_norm), float(s_ref.grad_norm), rtol=1e-6)
    np.testing.assert_allclose(float(s.grad_norm), np_norm(g), rtol=1e-6)
    # Two programs (ours and Optax's), each on its own trajectory: to a few float32 epsilons
    # of the update's scale (an element near 0 has no relative precision to compare).
    scale = float(np.max(np.abs(np.asarray(u_ref["w"]))))
    np.testing.assert_allclose(
      np.asarray(u["w"]), np.asarray(u_ref["w"]), rtol=1e-6, atol=1e-6 * scale
    )


def _fixed_norm_clip(value):
  """Passes the updates through and records ``value`` as if it had measured it."""
  return oc.GradientTransformation(
    lambda params: oc.ClipByGlobalNormState(jnp.float32(0)),
    lambda u, s, params=None, **extra: (u, oc.ClipByGlobalNormState(jnp.float32(value))),
  )


def test_the_stored_norm_is_used_only_when_clipping_comes_first():
  params = initial_params()
  g = grads_at(0, params)

  def grad_norm(inner):
    tx = with_diagnostics(inner)
    return float(tx.update(g, tx.init(params), params)[1].grad_norm)

  assert grad_norm(_fixed_norm_clip(42.0)) == 42.0
  assert grad_norm(oc.chain(oc.chain(_fixed_norm_clip(42.0), oc.sgd(0.1)), oc.identity())) == 42.0
  assert (
    grad_norm(
      oc.inject_hyperparams(
        lambda learning_rate: oc.chain(_fixed_norm_clip(42.0), oc.sgd(learning_rate))
      )(0.1)
    )
    == 42.0
  )
  # Clipping later in the chain measured other updates: recompute.
  assert grad_norm(oc.chain(oc.scale(2.0), _fixed_norm_clip(42.0))) == pytest.approx(np_norm(g))
  # A scheduled clipping threshold keeps its state under InjectHyperparamsState.
  state = with_diagnostics(oc.chain(oc.clip_by_global_norm(schedule), oc.sgd(0.1))).init(params)
  assert leading_clip_norm(state.inner_state) is not None


def test_nonfinite_counts_nan_and_inf():
  params = initial_params()
  g = jax.tree.map(jnp.zeros_like, params)
  g["w"] = g["w"].at[0, 1].set(jnp.nan).at[2, 3].set(jnp.inf).at[1, 1].set(-jnp.inf)
  g["s"] = jnp.float32(jnp.nan)
  tx = with_diagnostics(oc.sgd(0.1))
  _, state = jax.jit(tx.update)(g, tx.init(params), params)
  assert int(state.nonfinite) == 4 and state.nonfinite.dtype == jnp.int32
  assert math.isnan(float(state.grad_norm))


def test_update_ratio_is_safe_for_zero_params():
  zeros = jax.tree.map(jnp.zeros_like, initial_params())
  tx = with_diagnostics(oc.sgd(0.1))
  _, s = tx.update(grads_at(0, initial_params()), tx.init(zeros), zeros)
  assert float(s.param_norm) == 0.0 and float(s.update_ratio) == math.inf
  assert float(s.zero_fraction) == 1.0
  _, s = tx.update(zeros, tx.init(zeros), zeros)
  assert float(s.update_ratio) == 0.0
  assert not np.isnan(float(s.update_ratio))


@pytest.mark.parametrize(
  "make,expected",
  [
    (lambda: with_diagnostics(oc.sgd(schedule), schedule), schedule),
    (lambda: with_diagnostics(oc.inject_hyperparams(oc.adam)(learning_rate=schedule)), schedule),
    (
      lambda: with_diagnostics(
        standard_promotion(optax.inject_hyperparams(optax.adam)(learning_rate=schedule))
      ),
      schedule,
    ),
    (lambda: with_diagnostics(oc.adam(0.05), 0.05), lambda t: 0.05),
  ],
  ids=["given", "ours_injected", "optax_injected", "constant"],
)
def test_learning_rate_matches_the_schedule_at_each_step(make, expected):
  for t, (*_, state) in enumerate(train(make(), steps=6)):
    np.testing.assert_allclose(float(state.used_learning_rate), float(expected(t)), rtol=1e-6)


def test_the_learning_rate_recorded_is_the_one_used_when_steps_are_skipped():
  # Inside apply_if_finite a skipped step moves no schedule: the value inner's state
  # records is the one used, where the given schedule at the wrapper's count ran ahead.
  sched = oc.linear_schedule(0.1, 0.0, 10)
  tx = with_diagnostics(oc.apply_if_finite(oc.sgd(sched), 5), sched)
  params = {"w": jnp.ones(2)}
  state, seen = tx.init(params), []
  for g in (1.0, jnp.nan, jnp.nan, 1.0, 1.0):
    _, state = jax.jit(tx.update)({"w": jnp.full(2, g)}, state, params)
    seen.append(float(state.used_learning_rate))
  # the real updates used the schedule at 0, 1 and 2; skipped ones record the latest used
  np.testing.assert_allclose(seen, [0.1, 0.1, 0.1, 0.09, 0.08], rtol=1e-6)


def test_needs_params_and_its_own_state():
  tx = with_diagnostics(oc.sgd(0.1))
  params = initial_params()
  state = tx.init(params)
  with pytest.raises(ValueError, match="`params`"):
    tx.update(grads_at(0, params), state)
  with pytest.raises(ValueError, match="expected a DiagnosticsState"):
    tx.update(grads_at(0, params), state.inner_state, params)
  with pytest.raises(ValueError, match="`learning_rate`"):
    with_diagnostics(oc.sgd(0.1), learning_rate=math.nan)


@pytest.mark.numerics
def test_inside_optcompose_and_optax_chains():
  inner = oc.adam(1e-2)
  for outer in (oc.chain, optax.chain):
    ours = train(outer(oc.clip(1.0), with_diagnostics(inner)))
    ref = train(outer(oc.clip(1.0), inner))
    for (g, _, u, s), (_, _, u_ref, _) in zip(ours, ref):
      assert_same(True, u, u_ref)
      clipped = jax.tree.map(lambda x: jnp.clip(x, -1.0, 1.0), g)  # what the wrapper sees
      np.testing.assert_allclose(float(s[1].grad_norm), np_norm(clipped), rtol=1e-6)
      assert diagnostics_dict(s)["update_norm"] == pytest.approx(np_norm(u), rel=1e-6)


@pytest.mark.numerics
def test_flax_train_state():
  params = initial_params()
  ours = train_state.TrainState.create(
    apply_fn=None, params=params, tx=with_diagnostics(oc.adamw(schedule, weight_decay=0.1))
  )
  ref = train_state.TrainState.create(
    apply_fn=None, params=params, tx=oc.adamw(schedule, weight_decay=0.1)
  )
  step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  for t in range(3):
    g = grads_at(t, ref.params)
    ours, ref = step(ours, g), step(ref, g)
    assert_same(True, ours.params, ref.params)
  logged = diagnostics_dict(ours.opt_state)
  assert logged["count"] == 3 and logged["learning_rate"] == pytest.approx(float(schedule(2)))
  whole = diagnostics_dict(ours)  # the whole TrainState: step, then the optimizer state
  assert whole["step"] == 3 and whole["grad_norm"] == logged["grad_norm"]


def test_flax_nnx_optimizer():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, with_diagnostics(oc.sgd(schedule)), wrt=nnx.Param)
  x = jnp.ones((4, 3))
  for _ in range(2):
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)
  logged = diagnostics_dict(opt.opt_state)
  assert logged["count"] == 2 and logged["learning_rate"] == pytest.approx(float(schedule(1)))
  assert logged["param_norm"] == pytest.approx(np_norm(before), rel=1e-6)
  assert logged["grad_norm"] == pytest.approx(np_norm(grads), rel=1e-6)
  # The scheduled learning-rate step's count, without the OptArray's trailing "value".
  assert logged["inner_state/1/count"] == 2 and not any(k.endswith("value") for k in logged)


def test_diagnostics_dict_keys_and_python_values(monkeypatch):
  tx = with_diagnostics(oc.adamw(schedule, weight_decay=0.1))
  *_, state = train(tx, steps=2)[-1]
  calls = []
  real = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
  logged = diagnostics_dict(state)
  assert len(calls) == 1  # one transfer for all values
  assert list(logged)[: len(MEASURED)] == list(MEASURED)
  # adamw = chain(scale_by_adam, add_decayed_weights, scheduled scale_by_learning_rate); the
  # moments are skipped but those of the 0-d parameter "s", which are 0-d too.
  assert set(logged) - set(MEASURED) == {
    "inner_state/0/count",
    "inner_state/2/count",
    "inner_state/2/hyperparams/learning_rate",
    "inner_state/0/mu/s",
    "inner_state/0/nu/s",
  }
  assert logged["inner_state/0/count"] == 2 == logged["count"]
  for key, value in logged.items():
    assert type(value) is (int if key.endswith(("count", "nonfinite")) else float), key
  assert logged["grad_norm"] == float(state.grad_norm)
  assert logged["inner_state/2/hyperparams/learning_rate"] == logged["learning_rate"]


def test_diagnostics_dict_on_any_state():
  params = initial_params()
  # An Optax state: path keys only; moments skipped (but for 0-d parameters).
  optax_state = optax.adam(1e-3).init({"w": params["w"], "b": params["b"]})
  assert diagnostics_dict(optax_state) == {"0/count": 0}
  # Dicts, lists, bfloat16 and bool scalars, None; a second DiagnosticsState gets path keys.
  inner = with_diagnostics(oc.sgd(0.1))
  state = {
    "a": [jnp.bfloat16(1.5), jnp.array(True), None, jnp.ones(3)],
    "d": (with_diagnostics(inner).init(params),),
  }
  logged = diagnostics_dict(state)
  assert logged["a/0"] == 1.5 and type(logged["a/0"]) is float
  assert logged["a/1"] is True
  assert "a/3" not in logged and "a/2" not in logged
  assert logged["count"] == 0 and "d/0/inner_state/grad_norm" in logged
  assert "d/0/inner_state/count" in logged and "d/0/count" not in logged
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(lambda s: diagnostics_dict(s) and 0)(optax_state)


def test_bfloat16_params_measure_in_float32():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), initial_params())
  records = train(
    with_diagnostics(oc.adam(1e-2)),
    steps=2,
    params=params,
    grads=lambda t, p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads_at(t, p)),
  )
  g, p, u, state = records[-1]
  assert state.grad_norm.dtype == jnp.float32 and state.update_ratio.dtype == jnp.float32
  np.testing.assert_allclose(float(state.param_norm), np_norm(p), rtol=1e-6)


def test_module_exports():
  assert diag_module.__all__ == ["DiagnosticsState", "diagnostics_dict", "with_diagnostics"]


def test_zero_mask_restricts_the_zero_fraction_to_the_selected_leaves():
  """L1 on the matrices only: the fraction among them, not diluted by the vectors."""
  kernels = lambda p: jax.tree.map(lambda x: np.ndim(x) > 1, p)
  tx = with_diagnostics(oc.sgd(0.1, 0.9, l1=0.2, reg_mask=kernels), 0.1, zero_mask=kernels)
  records = train(tx)
  for _, params, _, state in records:
    assert float(state.zero_fraction) == pytest.approx(np_zero_fraction(params["w"]), abs=1e-7)
  assert float(records[-1][3].zero_fraction) > 0  # L1 has made zeros in "w" by then
  with pytest.raises(ValueError, match="zero_mask"):
    bad = with_diagnostics(oc.sgd(0.1), 0.1, zero_mask={"w": True, "nope": False})
    bad.update(initial_params(), bad.init(initial_params()), initial_params())


@pytest.mark.parametrize("n", [(1 << 24) + (1 << 20), 1 << 24, (1 << 24) + 3])
def test_counts_are_exact_beyond_float32_integers(n):
  """The zero and non-finite counts are float32 sums over rows of at most 2^24 elements
  (or integer counts where such rows would be short): exact at and beyond 2^24 elements,
  whatever order XLA adds in."""
  from optcompose.wrappers.measures import nonfinite_count, zero_fraction

  rng = np.random.default_rng(n)
  # Nearly every element non-finite: beyond 2^24 the count (n - 1001, odd) is no float32
  # integer, so a single float32 sum could not give it.
  x = np.full(n, np.nan, np.float32)
  x[rng.choice(n, n // 3, replace=False)] = np.inf
  x[: n // 5] = -np.inf
  x[rng.choice(n, 1001, replace=False)] = 1.0
  want = int(np.count_nonzero(~np.isfinite(x)))
  assert want == n - 1001
  got = jax.jit(nonfinite_count)({"x": jnp.asarray(x)})
  assert got.dtype == jnp.int32 and int(got) == want
  z = np.ones(n, np.float32)
  z[rng.choice(n, 12345, replace=False)] = 0.0
  frac = jax.jit(zero_fraction)({"z": jnp.asarray(z)})
  assert float(frac) == pytest.approx(np.count_nonzero(z == 0) / n, rel=2e-7)  # 1 in 12345: 8e-5


def test_nonfinite_count_stays_int32_under_x64():
  """Under x64 an int32 sum defaults to int64: the count must still match the int32 of the
  conditional's other branch (and of DiagnosticsState.nonfinite)."""
  from optcompose.wrappers.measures import nonfinite_count

  with x64():
    g = {"a": jnp.array([1.0, jnp.nan, jnp.inf]), "b": jnp.array([[-jnp.inf, 2.0]])}
    got = jax.jit(nonfinite_count)(g)
    assert got.dtype == jnp.int32 and int(got) == 3


def test_a_recorded_learning_rate_is_a_buffer_of_its_own():
  """The learning rate read from a scheduled inner optimizer's state is copied, at init and
  by an eager update: one buffer in two leaves of the state cannot be donated, and
  MultiSteps(with_diagnostics(adamw(schedule))), the logging guide's accumulation recipe,
  failed its first donated step."""
  schedule = oc.cosine_decay_schedule(1e-3, 100)
  params = {"w": jnp.ones(3)}
  tx = oc.with_diagnostics(oc.adamw(schedule))
  oct.check_state_can_be_donated(tx, params)
  _, state = tx.update(params, tx.init(params), params)  # eagerly
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state) if x.size]
  assert len(pointers) == len(set(pointers))
  accumulate = oc.MultiSteps(tx, every_k_schedule=4)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, x):
    grads = jax.grad(lambda p: jnp.sum((p["w"] - x) ** 2))(params)
    return accumulate.step(grads, opt_state, params)

  params, opt_state = jax.tree.map(jnp.copy, params), accumulate.init(params)
  for i in range(5):
    params, opt_state = train_step(params, opt_state, jnp.full(3, float(i)))
  assert int(opt_state.gradient_step) == 1


def test_float0_gradients_of_masked_integer_leaves_are_measured_and_tested_as_absent():
  # jax.grad(..., allow_int=True) gives an integer input a float0 gradient, which masked
  # passes on untouched; the wrappers around it measured and tested it and failed.
  params = {"w": jnp.array([3.0, 4.0]), "i": jnp.array([0, 0, 7], jnp.int32)}
  only_w = {"w": params["w"]}
  mask = {"w": True, "i": False}

  def grads(scale):
    return jax.grad(lambda p: scale * jnp.sum(p["w"] ** 2), allow_int=True)(params)

  assert grads(1.0)["i"].dtype == jax.dtypes.float0
  diag = with_diagnostics(oc.masked(oc.adam(0.1), mask), 0.1)
  reference = with_diagnostics(oc.adam(0.1), 0.1)
  _, state = jax.jit(diag.update)(grads(1.0), diag.init(params), params)
  _, expected = reference.update({"w": grads(1.0)["w"]}, reference.init(only_w), only_w)
  for name in ("count", "grad_norm", "update_norm", "used_learning_rate", "nonfinite"):
    assert_ulps_close(getattr(state, name), getattr(expected, name), 2, what=name)
  # the parameters are measured whole, the integer leaf included
  np.testing.assert_allclose(state.param_norm, np.sqrt(3**2 + 4**2 + 7**2), rtol=1e-6)
  np.testing.assert_allclose(state.zero_fraction, 2 / 5)
  _, state = jax.jit(diag.update)(grads(jnp.nan), state, params)
  assert state.nonfinite == 2

  skipping = oc.apply_if_finite(oc.masked(oc.adam(0.1), mask), 3)
  state = skipping.init(params)
  for scale, finite in ((1.0, True), (jnp.nan, False)):
    updates, state = jax.jit(skipping.update)(grads(scale), state, params)
    assert bool(state.last_finite) is finite
    assert updates["i"].dtype == jax.dtypes.float0
    assert bool(jnp.all(updates["w"] != 0)) is finite
  new_params, state = jax.jit(lambda g, s, p: oc.step(skipping, g, s, p))(grads(1.0), state, params)
  assert bool(state.last_finite) and not np.array_equal(new_params["w"], params["w"])
  np.testing.assert_array_equal(new_params["i"], params["i"])


@pytest.mark.parametrize("inject", [oc.inject_hyperparams, optax.inject_hyperparams])
def test_optax_s_tree_set_of_the_learning_rate_reaches_the_update_through_the_wrapper(inject):
  # The logged rate was a state field named learning_rate: Optax's tree_set set it (and
  # not the hyperparameter, so the step kept lr 0.01), and tree_get found two values.
  params, grads = {"w": jnp.ones((3, 2))}, {"w": jnp.ones((3, 2))}
  tx = with_diagnostics(inject(optax.sgd)(learning_rate=1e-2))
  state = optax.tree_utils.tree_set(tx.init(params), learning_rate=0.5)
  assert float(optax.tree_utils.tree_get(state, "learning_rate")) == 0.5
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], -0.5)
  assert diagnostics_dict(state)["learning_rate"] == 0.5  # logged under its usual name
