"""Gradient accumulation and non-finite skipping: the semantics a training loop relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc
from optcompose.wrappers.finite import all_finite

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(48, 5)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(48, 1)), jnp.float32)
P0 = {"w": jnp.asarray(RNG.normal(size=(5, 1)) * 0.3, jnp.float32), "b": jnp.zeros((1,))}


def loss(p, x, y):
  return jnp.mean((x @ p["w"] + p["b"][None, :] - y) ** 2)


def inner():
  """Weight decay, clipping and a schedule: all must advance only on real steps."""
  lr = oc.warmup_cosine_decay_schedule(0.0, 0.05, 2, 12)
  return oc.chain(oc.clip_by_global_norm(0.5), oc.adamw(lr, weight_decay=0.1))


@pytest.mark.parametrize("k", [2, 3])
def test_accumulation_equals_one_step_on_the_k_times_larger_batch(k):
  micro = 48 // (4 * k)  # 4 real steps, k micro-batches each
  acc_tx, big_tx = oc.multi_steps(inner(), k), inner()
  p_acc, s_acc = P0, acc_tx.init(P0)
  p_big, s_big = P0, big_tx.init(P0)
  acc_step = jax.jit(lambda p, s, x, y: acc_tx.update(jax.grad(loss)(p, x, y), s, p))
  big_step = jax.jit(lambda p, s, x, y: big_tx.update(jax.grad(loss)(p, x, y), s, p))
  for real in range(4):
    start = real * k * micro
    for j in range(k):
      xs, ys = (
        X[start + j * micro : start + (j + 1) * micro],
        Y[start + j * micro : start + (j + 1) * micro],
      )
      u, s_acc = acc_step(p_acc, s_acc, xs, ys)
      p_acc = oc.apply_updates(p_acc, u)
      if j < k - 1:  # no movement on micro-steps
        assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u))
    u, s_big = big_step(p_big, s_big, X[start : start + k * micro], Y[start : start + k * micro])
    p_big = oc.apply_updates(p_big, u)
    for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_big)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s_acc.inner_opt_state), jax.tree.leaves(s_big)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # counts, moments, norm
    assert int(s_acc.gradient_step) == real + 1


def test_accumulation_k_may_follow_a_schedule():
  tx = oc.multi_steps(oc.sgd(0.1), lambda step: jnp.where(step < 2, 1, 3))
  params, state = {"w": jnp.zeros(2)}, None
  state = tx.init(params)
  real = []
  for t in range(8):
    u, state = tx.update({"w": jnp.ones(2)}, state, params)
    real.append(bool(jnp.any(u["w"] != 0)))
  assert real == [True, True, False, False, True, False, False, True]
  assert oc.MultiSteps(oc.sgd(0.1), 2).has_updated(state) == (int(state.mini_step) == 0)


def run_with(batches, tx):
  p, s = P0, tx.init(P0)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for g in batches:
    u, s = step(p, s, g)
    p = oc.apply_updates(p, u)
  return p, s


def test_nan_step_is_skipped_exactly_and_counted():
  grads = [jax.grad(loss)(P0, X[i : i + 8], Y[i : i + 8]) for i in range(0, 40, 2)]  # 20 batches
  bad = dict(grads[5])
  bad["w"] = bad["w"].at[2, 0].set(jnp.nan)
  with_nan = grads[:5] + [bad] + grads[6:]
  p_nan, s_nan = run_with(with_nan, oc.apply_if_finite(oc.adam(0.01), 3))
  p_skip, s_skip = run_with(grads[:5] + grads[6:], oc.apply_if_finite(oc.adam(0.01), 3))
  for a, b in zip(
    jax.tree.leaves((p_nan, s_nan.inner_state)), jax.tree.leaves((p_skip, s_skip.inner_state))
  ):
    np.testing.assert_array_equal(a, b)
  assert int(s_nan.total_notfinite) == 1 and int(s_nan.notfinite_count) == 0
  assert not bool(s_nan.gave_up)


def test_gives_up_after_consecutive_bad_steps_without_corrupting_params():
  inf = {"w": jnp.full((5, 1), jnp.inf), "b": jnp.zeros((1,))}
  p, s = run_with([inf] * 4, oc.apply_if_finite(oc.sgd(0.1), 3))
  assert bool(s.gave_up) and int(s.notfinite_count) == 4 and int(s.total_notfinite) == 4
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(P0)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jit", [False, True])
def test_apply_if_finite_skips_an_update_that_overflows_from_a_finite_gradient(jit):
  """The wrapper tests what it applies: a huge learning rate times a finite gradient gives an
  infinite update, which is skipped and counted like a non-finite gradient."""
  params = {"w": jnp.array([1.0, 2.0, 3.0])}
  tx = oc.apply_if_finite(oc.sgd(1e30, 0.9), 3, check_updates=True)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  u, new_state = update({"w": jnp.array([1e10, 1.0, 1.0])}, state, params)
  np.testing.assert_array_equal(u["w"], np.zeros(3))
  assert int(new_state.notfinite_count) == 1 and int(new_state.total_notfinite) == 1
  assert not bool(new_state.last_finite)
  for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(a, b)  # the momentum did not absorb the bad step
  u, ok_state = update({"w": jnp.array([1e-31, 0.0, 0.0])}, new_state, params)
  assert bool(jnp.all(jnp.isfinite(u["w"]))) and float(u["w"][0]) != 0.0
  assert int(ok_state.notfinite_count) == 0 and int(ok_state.total_notfinite) == 1


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan, "overflow"])
def test_all_finite_is_exact_under_jit(bad):
  """The one-pass test sees every non-finite element, including a product that overflowed
  inside the same program (which ``isfinite(sum(y * c * 0))`` misses once XLA folds the
  constants)."""
  y = jnp.linspace(-1.0, 1.0, 1001)
  if bad == "overflow":
    check = jax.jit(lambda y: all_finite({"a": y, "b": y.at[7].set(1e10) * jnp.float32(1e30)}))
  else:
    check = jax.jit(lambda y: all_finite({"a": y, "b": y.at[7].set(bad)}))
  assert not bool(check(y))
  assert bool(jax.jit(lambda y: all_finite({"a": y, "b": y * 1e30}))(y))  # 1e30 is finite
  assert bool(all_finite({}))


def test_apply_if_finite_tests_the_gradients_by_default():
  """As Optax does, the default tests the gradients (one read of them): an update that
  overflows from finite gradients is applied; ``check_updates=True`` skips it (tested above)."""
  params = {"w": jnp.array([1.0, 2.0, 3.0])}
  tx = oc.apply_if_finite(oc.sgd(1e30), 3)
  u, state = jax.jit(tx.update)({"w": jnp.array([1e10, 1.0, 1.0])}, tx.init(params), params)
  assert not bool(jnp.isfinite(u["w"][0])) and int(state.total_notfinite) == 0


@pytest.mark.xla_cpu_program
@pytest.mark.parametrize("check_updates", [False, True])
def test_apply_if_finite_compiles_to_one_conditional_without_copies(check_updates):
  """The inner step runs inside one ``lax.cond`` on the finiteness test, whose untaken branch
  costs nothing, and the donated state is updated in place: no copy of a parameter-sized
  array (a select between the new and the old state makes XLA copy the moments)."""
  import re

  tx = oc.apply_if_finite(oc.adamw(1e-3, weight_decay=1e-4), 5, check_updates=check_updates)
  params = {"w": jnp.zeros(4096)}

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return oc.apply_updates(p, u), s

  text = (
    jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile().as_text()
  )
  assert text.count(" conditional(") == 1
  assert not re.findall(r"f32\[4096\]\{0\} copy\(", text)


def test_multi_steps_resumed_with_a_smaller_k_steps_at_the_next_call():
  """A state saved after 3 micro-steps of k = 4, resumed with k = 2, steps at once (it used
  to wait for mini_step == 1 forever)."""
  params = {"w": jnp.array([1.0, 2.0, 3.0])}
  g = {"w": jnp.array([0.5, -1.0, 2.0])}
  long = oc.multi_steps(oc.sgd(0.1), 4)
  state = long.init(params)
  for _ in range(3):
    u, state = long.update(g, state, params)
    np.testing.assert_array_equal(u["w"], np.zeros(3))
  short = oc.multi_steps(oc.sgd(0.1), 2)
  u, state = short.update(g, state, params)
  np.testing.assert_allclose(u["w"], -0.1 * np.asarray(g["w"]), rtol=1e-6)  # the mean of 4 g
  assert int(state.mini_step) == 0 and int(state.gradient_step) == 1


def test_multi_steps_k_must_be_a_whole_number():
  with pytest.raises(ValueError, match="`every_k_schedule` must be a whole number"):
    oc.multi_steps(oc.sgd(0.1), 2.5)
  oc.multi_steps(oc.sgd(0.1), jnp.float32(2.0))  # a live k, injected, is a float array
