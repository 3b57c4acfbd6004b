"""The sign family's edges the parity cases do not reach: Lion's "smooth" and "refined"
modes and its stored dtype, and the optimistic gradient's first step and stored dtype,
against independent NumPy formulas in float64."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax

import optcompose as oc
from numerics import standard_promotion, x64


def _lion_np(grads, b1, b2, mode, smooth_beta):
  m, out = np.zeros_like(grads[0]), []
  for g in grads:
    c = (1 - b1) * g + b1 * m
    out.append(
      {
        "hard": np.sign(c),
        "smooth": np.tanh(smooth_beta * c),
        "refined": np.where(np.abs(c) < 1, c, np.sign(c)),
      }[mode]
    )
    m = (1 - b2) * g + b2 * m
  return out, m


@pytest.mark.parametrize("mode", ["hard", "smooth", "refined"])
def test_lion_modes_match_the_formula(mode):
  rng = np.random.default_rng(0)
  grads = [rng.normal(scale=2.0, size=(7,)) for _ in range(5)]  # |c| on both sides of 1
  grads[0][0] = 0.0  # sign(0) = 0 at the first step (m_0 = 0)
  want, m_want = _lion_np(grads, 0.7, 0.9, mode, 2.5)
  with x64():
    tx = oc.scale_by_lion(0.7, 0.9, mode=mode, smooth_beta=2.5)
    state = tx.init(jnp.zeros(7))
    for g, u_want in zip(grads, want):
      u, state = tx.update(jnp.asarray(g), state)
      np.testing.assert_allclose(np.asarray(u), u_want, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(np.asarray(state.mu), m_want, rtol=1e-14)
    assert int(state.count) == len(grads)


def test_lion_refuses_an_unknown_mode_and_keeps_its_stored_dtype():
  with pytest.raises(ValueError, match="mode"):
    oc.scale_by_lion(mode="soft")
  with pytest.raises(ValueError, match="smooth_beta"):
    oc.scale_by_lion(mode="smooth", smooth_beta=-1.0)
  tx = oc.lion(1e-2, mu_dtype=jnp.bfloat16)
  params = jnp.ones(3, jnp.float32)
  state = tx.init(params)
  u, state = tx.update(jnp.array([1.0, -2.0, 0.0], jnp.float32), state, params)
  assert state[0].mu.dtype == jnp.bfloat16 and u.dtype == jnp.float32


def test_optimistic_gradient_matches_the_formula():
  rng = np.random.default_rng(1)
  grads = [rng.normal(size=(5,)) for _ in range(4)]
  alpha, beta = 0.5, 1.5
  with x64():
    tx = oc.scale_by_optimistic_gradient(alpha, beta)
    state = tx.init(jnp.zeros(5))
    prev = grads[0]  # g_0 = g_1: the first step is alpha g_1
    for g in grads:
      u, state = tx.update(jnp.asarray(g), state)
      np.testing.assert_allclose(np.asarray(u), (alpha + beta) * g - beta * prev, rtol=1e-14)
      prev = g
    np.testing.assert_array_equal(np.asarray(state.previous_gradient), grads[-1])
    assert not bool(state.is_initial_step)


def test_optimistic_gradient_keeps_its_stored_dtype():
  tx = oc.optimistic_gradient_descent(1e-2)
  params = {"w": jnp.ones(3, jnp.float32)}
  state = tx.init(params)
  g = {"w": jnp.array([1.0, -2.0, 0.5], jnp.bfloat16)}
  step = jax.jit(tx.update)
  for _ in range(2):  # the same compiled step twice: the state's dtypes do not change
    u, state = step(g, state, params)
  assert state[0].previous_gradient["w"].dtype == jnp.float32
  assert u["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(u["w"], np.float32),
    np.asarray(-1e-2 * np.array([1.0, -2.0, 0.5]), np.float32)
    .astype(jnp.bfloat16)
    .astype(np.float32),
  )


def test_deprecated_optimistic_adam_warns_and_equals_optax_in_float64():
  with x64():
    params = {"w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)}
    with pytest.warns(DeprecationWarning, match="optimistic_adam_v2"):
      ours = oc.optimistic_adam(0.03, optimism=0.01, b1=0.8)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      ref = standard_promotion(optax.optimistic_adam(0.03, optimism=0.01, b1=0.8))
    s_ours, s_ref, p = ours.init(params), ref.init(params), params
    for t in range(6):
      g = jax.tree.map(lambda w, t=t: jnp.sin(3.0 * w + t), p)
      u_ours, s_ours = ours.update(g, s_ours, p)
      u_ref, s_ref = ref.update(g, s_ref, p)
      np.testing.assert_allclose(u_ours["w"], u_ref["w"], rtol=1e-12, atol=1e-15)
      p = optax.apply_updates(p, u_ref)
    assert p["w"].dtype == jnp.float64
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="schedule"):
      oc.optimistic_adam(lambda c: 0.1)
