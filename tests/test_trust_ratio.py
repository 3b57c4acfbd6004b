"""The trust ratio and the parameter-block scales where the parity cases cannot look: the
ratio's guards (a zero parameter or update norm), the norm floors, float16 parameters too
small to square in float16, Fromage's negative decay, and LARS's bare-bool masks.

Symbols: u the incoming update, w the parameters, per leaf p = max(||w||, min_norm),
n = max(||u||, min_norm), r = trust_coefficient * p / (n + eps) (1 where p = 0 or n = 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import assert_ulps_close, standard_promotion, x64


def trust_ratio_np(u, w, min_norm=0.0, trust_coefficient=1.0, eps=0.0):
  p = max(np.linalg.norm(w), min_norm)
  n = max(np.linalg.norm(u), min_norm)
  r = 1.0 if p == 0 or n == 0 else trust_coefficient * p / (n + eps)
  return r * u


PARAMS = {"zero": np.zeros(3), "w": np.array([[0.3, -1.2], [2.0, 0.1]]), "s": np.array(0.7)}
UPDATES = {
  "zero": np.array([0.5, -0.1, 0.2]),
  "w": np.array([[1e-3, 0.4], [-0.2, 0.0]]),
  "s": np.array(0.0),
}


@pytest.mark.parametrize(
  "min_norm, trust_coefficient, eps", [(0.0, 1.0, 0.0), (0.5, 2.0, 1e-3), (1e-6, 1e-3, 0.0)]
)
def test_trust_ratio_matches_the_formula_in_float64(min_norm, trust_coefficient, eps):
  """A zero parameter leaf moves with r = 1 (without a floor), a zero update stays 0 (no
  0 / 0), a floor replaces a small norm."""
  with x64():
    params, updates = jax.tree.map(jnp.asarray, PARAMS), jax.tree.map(jnp.asarray, UPDATES)
    tx = oc.scale_by_trust_ratio(min_norm, trust_coefficient, eps)
    out, _ = tx.update(updates, tx.init(params), params)
    for k in PARAMS:
      np.testing.assert_allclose(
        out[k],
        trust_ratio_np(UPDATES[k], PARAMS[k], min_norm, trust_coefficient, eps),
        rtol=1e-15,
        atol=0,
      )
      assert out[k].dtype == jnp.float64


def test_float16_parameter_blocks_are_measured_in_float32():
  """Parameters below 8e-3 square to float16 subnormals or 0: the scales are sums of float32
  squares, so the float16 result is within an ulp or so of float64's."""
  w = {
    "tiny": jnp.asarray([1e-3, -2e-3, 5e-4, 3e-3], jnp.float16),
    "big": jnp.asarray([[300.0, -200.0], [150.0, 250.0]], jnp.float16),
  }  # 300^2 > 65504
  u = jax.tree.map(lambda x: jnp.full_like(x, 0.37), w)
  for tx, scale in [
    (oc.scale_by_param_block_norm(1e-4), lambda x: max(np.linalg.norm(x), 1e-4)),
    (oc.scale_by_param_block_rms(1e-5), lambda x: max(np.sqrt(np.mean(x * x)), 1e-5)),
    (
      oc.scale_by_trust_ratio(),
      lambda x: np.linalg.norm(x) / np.linalg.norm(np.full(x.shape, 0.37)),
    ),
  ]:
    out, _ = tx.update(u, tx.init(w), w)
    ref = {k: 0.37 * scale(np.asarray(w[k], np.float64)) * np.ones(w[k].shape) for k in w}
    assert_ulps_close(out, ref, 1, dtype=jnp.float16)


def test_fromage_shrinks_by_mu_with_a_negative_decay():
  """``w <- mu (w - lr r g)``, ``mu = 1 / sqrt(1 + lr^2)``: the step of
  ``add_decayed_weights(mu - 1)``, a negative rate."""
  lr, w, g = 0.5, jnp.asarray([3.0, -4.0]), jnp.asarray([1.0, 1.0])
  tx = oc.fromage(lr)
  u, _ = tx.update(g, tx.init(w), w)
  mu = 1 / np.sqrt(1 + lr**2)
  r = 5.0 / np.sqrt(2.0)
  np.testing.assert_allclose(w + u, mu * (np.asarray(w) - lr * r * np.asarray(g)), rtol=1e-6)
  oc.add_decayed_weights(-0.25)  # any finite rate, as in Optax
  for bad in (float("nan"), float("inf"), -float("inf")):
    with pytest.raises(ValueError, match="`weight_decay` must be finite"):
      oc.add_decayed_weights(bad)


@pytest.mark.parametrize("lr", [3e-3, 1e-1, 1.0, 1e20])
def test_fromage_shrink_of_a_float32_learning_rate_does_not_cancel(lr):
  """An injected (float32) lr: ``mu - 1`` was computed as ``1 / sqrt(1 + lr^2) - 1``, which
  cancels: 1.4% off at lr = 3e-3, and jit and eager differed by as much (the property kit
  found it once its tolerance became relative to each leaf). lr^2 overflowing float32 gave
  ``lr mu`` = 0 where it is 1."""
  tx = oc.inject_hyperparams(oc.fromage)(learning_rate=lr)
  w, g = jnp.asarray([3.0, -4.0]), jnp.asarray([1.0, 2.0])
  for update in (tx.update, jax.jit(tx.update)):
    u, _ = update(g, tx.init(w), w)
    mu = 1 / np.sqrt(1 + np.float64(np.float32(lr)) ** 2)
    lr64 = np.float64(np.float32(lr))
    r = 5.0 / np.sqrt(5.0)
    step = -lr64 * mu * r * np.asarray(g, np.float64)
    want = step + (mu - 1) * np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=4e-7)


def test_lars_bare_bool_masks_mean_all_or_no_leaves():
  """``weight_decay_mask`` / ``trust_ratio_mask`` given as a bare bool select every leaf
  (True) or none (False), as in Optax."""
  params = jax.tree.map(jnp.asarray, PARAMS)
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) + 0.25, PARAMS)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  first = []
  for kwargs in [
    dict(weight_decay=0.1, weight_decay_mask=False, trust_ratio_mask=False),
    dict(weight_decay=0.1, trust_ratio_mask={"zero": True, "w": False, "s": True}),
  ]:
    ours, ref = oc.lars(0.1, **kwargs), standard_promotion(optax.lars(0.1, **kwargs))
    u_ours, _ = ours.update(grads, ours.init(params), params)
    u_ref, _ = ref.update(grads, ref.init(params), params)
    assert_ulps_close(u_ours, u_ref, 4)
    first.append(u_ours)
  # All off: the first step of SGD with momentum, -lr g.
  assert_ulps_close(first[0], jax.tree.map(lambda g: -0.1 * g, grads), 1)


@pytest.mark.parametrize(
  "build, argument",
  [
    (lambda: oc.scale_by_trust_ratio(min_norm=-1.0), "min_norm"),
    (lambda: oc.scale_by_trust_ratio(trust_coefficient=-1.0), "trust_coefficient"),
    (lambda: oc.scale_by_trust_ratio(eps=float("nan")), "eps"),
    (lambda: oc.scale_by_param_block_rms(-1e-3), "min_scale"),
    (lambda: oc.lamb(1e-3, weight_decay=-0.1), "weight_decay"),
    (lambda: oc.lars(1e-3, momentum=1.5), "momentum"),
    (lambda: oc.fromage(-1e-3), "learning_rate"),
  ],
)
def test_bad_hyperparameters_are_named(build, argument):
  with pytest.raises(ValueError, match=f"`{argument}`"):
    build()


def test_trust_ratio_needs_params():
  tx = oc.scale_by_param_block_norm()
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


@pytest.mark.parametrize(
  "make",
  [
    lambda m, lr: m.lamb(lr),
    lambda m, lr: m.lars(lr),
    lambda m, lr: m.fromage(lr),
    lambda m, lr: m.adafactor(lr),
    lambda m, lr: m.chain(m.scale_by_trust_ratio(), m.sgd(lr)),
    lambda m, lr: m.chain(m.scale_by_param_block_norm(), m.sgd(lr)),
    lambda m, lr: m.chain(m.scale_by_param_block_rms(), m.sgd(lr)),
  ],
  ids=["lamb", "lars", "fromage", "adafactor", "trust_ratio", "block_norm", "block_rms"],
)
def test_the_gradient_through_steps_is_finite_at_leaves_of_zeros(make):
  """A zero-initialised output layer: its leaves are all zeros, and at the first step the
  hidden layer's gradients are exactly zero. The derivative of the loss after three steps
  with respect to the learning rate (meta-learning) is Optax's, in float64, not NaN (a plain
  square root of the leaf's sum of squares has an infinite derivative at 0)."""
  with x64():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)))
    y = jnp.sin(x[:, :1])
    p0 = {
      "w1": jnp.asarray(np.random.default_rng(1).normal(size=(4, 8))) * 0.5,
      "b1": jnp.zeros(8),
      "w2": jnp.zeros((8, 1)),
      "b2": jnp.zeros(1),
    }

    def loss(p):
      hidden = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
      return jnp.mean((hidden @ p["w2"] + p["b2"][None, :] - y) ** 2)

    def after_steps(m):
      def f(lr):
        tx, p = make(m, lr), p0
        tx = standard_promotion(tx) if m is optax else tx  # Optax's code mixes dtypes
        s = tx.init(p)
        for _ in range(3):
          u, s = tx.update(jax.grad(loss)(p), s, p)
          p = m.apply_updates(p, u)
        return loss(p)

      return f

    ours, theirs = (float(jax.grad(after_steps(m))(0.05)) for m in (oc, optax))
    assert np.isfinite(ours)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("where", ["gradient", "parameter"])
def test_a_nan_still_propagates_through_the_norms(where):
  """The guard on the norm's root at 0 keeps NaN as NaN (a NaN norm is not 0): a NaN in a
  leaf's gradient or parameters makes the whole leaf's LAMB update NaN, as in Optax."""
  params, grads = {"w": jnp.ones(4)}, {"w": jnp.array([0.1, 0.2, 0.3, 0.4])}
  if where == "gradient":
    grads = {"w": grads["w"].at[2].set(jnp.nan)}
  else:
    params = {"w": params["w"].at[1].set(jnp.nan)}
  for m in (oc, optax):
    tx = m.lamb(0.1)
    tx = standard_promotion(tx) if m is optax else tx
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.isnan(np.asarray(updates["w"])).all(), (m.__name__, updates)
