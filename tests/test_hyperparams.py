"""Live hyperparameters, reading the values in force, and reduce-on-plateau."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optcompose as oc
from numerics import F64_RTOL, assert_rel_close, standard_promotion, x64
from problems import assert_resumes_exactly, mlp, run


@pytest.mark.numerics
@pytest.mark.float64
def test_injected_adamw_follows_the_same_trajectory_as_optax_injected_adamw():
  """Two programs: compared in float64 (tests/numerics.py); the injected values are float64
  there, as Optax's are."""
  with x64():
    prob = mlp(jnp.float64)
    ours, s = run(oc.inject_hyperparams(oc.adamw)(learning_rate=1e-2, weight_decay=0.1),
                  prob, 100, True, oc.apply_updates)
    ref, _ = run(standard_promotion(
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)),
                 prob, 100, True, optax.apply_updates)
  assert s.hyperparams["learning_rate"].dtype == jnp.float64
  for t, (a, b) in enumerate(zip(ours, ref)):
    assert_rel_close(a, b, F64_RTOL, what=f"step {t}:")


def test_changing_a_live_hyperparameter_does_not_recompile():
  tx = oc.inject_hyperparams(oc.sgd)(learning_rate=0.1, momentum=0.9)
  params = {"w": jnp.ones(4)}
  grads = {"w": jnp.ones(4)}

  @jax.jit
  def step(params, state):
    u, state = tx.update(grads, state, params)
    return oc.apply_updates(params, u), state, u

  state = tx.init(params)
  params, state, u1 = step(params, state)
  state = oc.set_hyperparams(state, learning_rate=0.01, momentum=0.0)
  params, state, u2 = step(params, state)
  state = oc.set_hyperparams(state, learning_rate=0.5)
  params, state, u3 = step(params, state)
  assert step._cache_size() == 1  # one compilation for three differently-valued steps
  # The values took effect: trace after step 2 is g + 0 * v = 1, so u2 = -0.01 * 1.
  np.testing.assert_allclose(u1["w"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(u2["w"], -0.01, rtol=1e-6)
  np.testing.assert_allclose(u3["w"], -0.5, rtol=1e-6)
  assert float(oc.current_hyperparams(state)["learning_rate"]) == 0.5


def test_set_hyperparams_rejects_unknown_names():
  tx = oc.inject_hyperparams(oc.adam)(learning_rate=0.1)
  with pytest.raises(KeyError, match="not hyperparameters held in this state"):
    oc.set_hyperparams(tx.init({"w": jnp.ones(2)}), learning_rat=0.2)


def test_live_hyperparameters_with_nnx_optimizer():
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  tx = oc.inject_hyperparams(oc.sgd)(learning_rate=0.1)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(opt.tx))
  x = jnp.ones((2, 3))

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)
    opt.update(model, grads)

  before = np.asarray(model.bias[...])
  step(model, opt)
  after_one = np.asarray(model.bias[...])
  opt.opt_state.hyperparams["learning_rate"][...] = 0.0  # freeze training, live
  step(model, opt)
  np.testing.assert_allclose(after_one - before, -0.1 * 2.0, rtol=1e-6)  # d sum / d bias = 2
  np.testing.assert_array_equal(np.asarray(model.bias[...]), after_one)


def test_bfloat16_params_keep_float32_hyperparameters_and_finite_updates():
  """b2 = 0.999 rounds to 1.0 in bfloat16; stored as float32 the first update is finite."""
  params = {"w": jnp.ones(8, jnp.bfloat16)}
  grads = {"w": jnp.linspace(-1, 1, 8).astype(jnp.bfloat16)}
  tx = oc.inject_hyperparams(oc.adam)(learning_rate=1e-3, b2=0.999)
  state = tx.init(params)
  assert state.hyperparams["b2"].dtype == jnp.float32
  u, state = jax.jit(tx.update)(grads, state, params)
  assert u["w"].dtype == jnp.bfloat16
  u32 = np.asarray(u["w"], np.float32)
  assert np.all(np.isfinite(u32))
  g = np.asarray(grads["w"], np.float32)
  np.testing.assert_allclose(u32, -1e-3 * g / (np.abs(g) + 1e-8), rtol=1e-2, atol=1e-6)


def test_current_hyperparams_reads_scheduled_values_without_reevaluating():
  lr = oc.warmup_cosine_decay_schedule(0.0, 0.1, 5, 50)
  wd = lambda count: 1e-3 * (jnp.asarray(count, jnp.float32) + 1)
  tx = oc.chain(oc.adamw(lr, weight_decay=wd), oc.reduce_on_plateau(patience=2))
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(12):
    _, state = update({"w": jnp.ones(3)}, state, params, value=jnp.float32(1.0))
    hp = oc.current_hyperparams(state)
    np.testing.assert_allclose(hp["learning_rate"], lr(t), rtol=1e-6)
    np.testing.assert_allclose(hp["weight_decay"], wd(t), rtol=1e-6)
  # A constant loss: no improvement after the first evaluation; reduced every 2 evaluations.
  np.testing.assert_allclose(hp["plateau_scale"], 0.1 ** 5, rtol=1e-5)


def test_injected_state_resumes_exactly():
  tx = oc.inject_hyperparams(oc.adamw)(learning_rate=oc.linear_schedule(0.02, 0.0, 30))
  assert_resumes_exactly(tx, mlp(), steps=20, save_at=8, apply_updates=oc.apply_updates)


# --- reduce on plateau ----------------------------------------------------------------

LOSSES = [1.0, 0.8, 0.7, 0.69995, 0.7, 0.71, 0.72, 0.6, 0.6, 0.61, 0.62, 0.63, 0.64, 0.65,
          0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.49, 0.3, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36]


@pytest.mark.parametrize("kwargs", [
    dict(patience=2),
    dict(factor=0.5, patience=3, cooldown=2),
    dict(factor=0.5, patience=1, rtol=0.0, atol=0.05, min_scale=0.2),
    dict(factor=0.5, patience=1, accumulation_size=2),
])
def test_reduce_on_plateau_matches_optax(kwargs):
  params = {"w": jnp.ones(2)}
  ours = oc.reduce_on_plateau(**kwargs)
  ref = standard_promotion(optax.contrib.reduce_on_plateau(**kwargs))
  so, sr = ours.init(params), ref.init(params)
  uo_f, ur_f = jax.jit(ours.update), jax.jit(ref.update)
  scales = []
  for v in LOSSES:
    uo, so = uo_f(params, so, value=jnp.float32(v))
    ur, sr = ur_f(params, sr, value=jnp.float32(v))
    # Exact by construction on any CPU: the params are ones, so the update is the scale,
    # built by the same correctly rounded multiplies and max in both libraries.
    np.testing.assert_array_equal(uo["w"], ur["w"])
    assert int(so.plateau_count) == int(sr.plateau_count)
    assert int(so.cooldown_count) == int(sr.cooldown_count)
    scales.append(float(so.scale))
  assert min(scales) < 1.0  # the sequence does trigger reductions


def test_reduce_on_plateau_mode_max_watches_a_rising_metric():
  params = {"w": jnp.ones(2)}
  up, down = oc.reduce_on_plateau(patience=2, mode="max"), oc.reduce_on_plateau(patience=2)
  su, sd = up.init(params), down.init(params)
  for v in LOSSES:
    _, su = up.update(params, su, value=-v)
    _, sd = down.update(params, sd, value=v)
    assert float(su.scale) == float(sd.scale)


def test_reduce_on_plateau_composes_after_a_warmup_schedule_and_needs_a_value():
  lr = oc.warmup_cosine_decay_schedule(0.0, 0.1, 4, 40)
  tx = oc.chain(oc.sgd(lr), oc.reduce_on_plateau(patience=1, factor=0.5))
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  for t, v in enumerate([1.0, 1.0, 1.0, 1.0, 1.0]):
    u, state = tx.update({"w": jnp.ones(2)}, state, params, value=v)
  # plateau after evaluations 2, 3, 4, 5 with patience 1 -> scale 0.5^4; lr at step 4.
  np.testing.assert_allclose(u["w"], -float(lr(4)) * 0.5 ** 4, rtol=1e-6)
  with pytest.raises(TypeError, match="value=loss"):
    tx.update({"w": jnp.ones(2)}, state, params)


def test_current_hyperparams_reads_optax_injection_states_too():
  params = {"w": jnp.ones(3)}
  state = optax.inject_hyperparams(optax.adam)(learning_rate=0.125).init(params)
  assert float(oc.current_hyperparams(state)["learning_rate"]) == 0.125
  nested = oc.chain(oc.clip(1.0), optax.inject_hyperparams(optax.sgd)(learning_rate=0.5))
  assert float(oc.current_hyperparams(nested.init(params))["learning_rate"]) == 0.5
