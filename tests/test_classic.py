"""What the parity cases cannot show for the classic family (adadelta, novograd, sm3, rprop,
polyak_sgd, noisy_sgd): documented differences from Optax, edge cases against NumPy, and the
random stream of add_noise for every kind of key."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import standard_promotion


def loss(p):
  return sum(jnp.sum(x * x) for x in jax.tree.leaves(p))


def test_adadelta_without_learning_rate_descends():
  """lr=None is the paper's lr = 1 (Optax 0.2.8 applies +dx there and ascends)."""
  tx, p = oc.adadelta(), {"w": jnp.array([1.0, 2.0])}
  state = tx.init(p)
  for _ in range(20):
    u, state = tx.update(jax.grad(loss)(p), state, p)
    p = oc.apply_updates(p, u)
  assert float(loss(p)) < 5.0


@pytest.mark.parametrize("kind", ["int", "rbg", "raw"])
def test_add_noise_reproduces_optax_for_every_key_kind(kind):
  keys = {
    "int": (7, 7),
    "rbg": (jax.random.key(7, impl="rbg"),) * 2,
    "raw": (jax.random.PRNGKey(7), jax.random.wrap_key_data(jax.random.PRNGKey(7))),
  }
  ours_key, optax_key = keys[kind]
  ours, ref = (
    oc.add_noise(0.1, 0.55, ours_key),
    standard_promotion(optax.add_noise(0.1, 0.55, optax_key)),
  )
  g = {"a": jnp.ones(3), "b": (jnp.zeros((2, 2), jnp.bfloat16), jnp.float32(1.0))}
  s_ours, s_ref = ours.init(g), ref.init(g)
  up_ours, up_ref = jax.jit(ours.update), jax.jit(ref.update)
  for _ in range(2):  # the second step checks that the key moved on as Optax's does
    u_ours, s_ours = up_ours(g, s_ours)
    u_ref, s_ref = up_ref(g, s_ref)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
      np.testing.assert_array_equal(
        np.asarray(a, np.float32), np.asarray(b.astype(a.dtype), np.float32)
      )
  assert np.any(np.asarray(u_ours["a"]) != 1.0)


def test_add_noise_key_arguments():
  with pytest.warns(DeprecationWarning, match="seed"):
    oc.add_noise(0.1, 0.5, seed=3)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with pytest.raises(ValueError, match="only one of"):
      oc.add_noise(0.1, 0.5, 1, seed=3)
  with pytest.raises(TypeError, match="key"):
    oc.add_noise(0.1, 0.5, "seed")
  with pytest.raises(TypeError, match="bool"):
    oc.add_noise(0.1, 0.5, True)


def test_polyak_step_edge_cases_against_numpy():
  """Zero gradient: step 0, not 0 / 0; sps+ below f_min: step 0; else the NumPy formula."""
  tx = oc.scale_by_polyak(f_min=1.0, max_learning_rate=10.0, eps=1e-3, variant="sps+")
  g = {"w": jnp.array([0.5, -1.0]), "b": jnp.float32(2.0)}
  u, _ = tx.update(g, tx.init(g), value=jnp.float32(3.0))
  q = 0.25 + 1.0 + 4.0
  step = min((3.0 - 1.0) / (q + 1e-3), 10.0)
  np.testing.assert_allclose(np.asarray(u["w"]), step * np.array([0.5, -1.0]), rtol=1e-6)
  below, _ = tx.update(g, tx.init(g), value=jnp.float32(0.5))
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(below))
  zero = jax.tree.map(jnp.zeros_like, g)
  u0, _ = oc.scale_by_polyak().update(zero, oc.EmptyState(), value=jnp.float32(3.0))
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u0))
  with pytest.raises(TypeError, match="value="):
    oc.scale_by_polyak().update(g, oc.EmptyState())


@pytest.mark.xla_cpu_program
def test_polyak_squares_its_gradients_as_x_times_x():
  """The step's one sum of squares is written x * x, the form XLA CPU's library reduction
  reads fastest: with |x| * |x| (the form for a norm beside a second moment) polyak_sgd took
  1.06-1.08x Optax's time, whose program it now equals."""
  params = {"w": jnp.ones(1 << 12)}
  for m in (oc, optax):
    tx = m.polyak_sgd()
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))  # noqa: B023
    hlo = step.lower(params, tx.init(params), params, jnp.float32(1.0)).compile().as_text()
    assert "abs(" not in hlo, m.__name__


def test_rprop_lags_one_step_and_checks_its_bounds():
  tx, g = oc.rprop(0.1), {"w": jnp.array([1.0, -2.0])}
  state = tx.init(g)
  u1, state = tx.update(g, state)
  u2, state = tx.update(g, state)
  np.testing.assert_array_equal(u1["w"], [0.0, 0.0])  # Optax's lag: the first step is 0
  np.testing.assert_allclose(u2["w"], [-0.1, 0.1], rtol=1e-6)  # s_1 = lr (p = 0 at step 1)
  with pytest.raises(ValueError, match="min_step_size"):
    oc.rprop(0.1, min_step_size=2.0, max_step_size=1.0)


def test_sm3_scalar_and_empty_leaves_and_novograd_first_step():
  """SM3 keeps a 0-d accumulator for a scalar (Optax's update fails there); NovoGrad's first
  step is g / ||g|| (n_1 = ||g||^2, no b2 weighting) against NumPy."""
  p = {"s": jnp.float32(2.0), "e": jnp.zeros((0, 3)), "m": jnp.ones((2, 3))}
  tx = oc.scale_by_sm3(b1=0.0)
  u, state = tx.update(p, tx.init(p))
  np.testing.assert_allclose(float(u["s"]), 2.0 / np.sqrt(4.0 + 1e-8), rtol=1e-6)
  assert u["e"].shape == (0, 3) and [c.shape for c in state.mu["e"]] == [(0,), (3,)]
  g = {"w": jnp.array([3.0, 4.0])}
  u, _ = oc.scale_by_novograd(eps=0.0, eps_root=1e-30).update(g, oc.scale_by_novograd().init(g))
  np.testing.assert_allclose(np.asarray(u["w"]), [0.6, 0.8], rtol=1e-6)
