"""L1 soft-thresholding and the elastic net: exact zeros, an independent NumPy reference,
and recovery of the true zero pattern on a sparse regression."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import standard_promotion, x64


def soft(x, t):
  return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def test_one_step_matches_the_formula_and_reaches_exact_zeros():
  w = np.array([0.5, -0.5, 0.02, -0.02, 0.0, 1e-3], np.float32)
  u = np.array([0.01, -0.01, -0.01, 0.005, 0.0, -2e-3], np.float32)
  lr, l1 = 0.1, 0.3  # threshold 0.03
  tx = oc.prox_l1(l1, lr)
  out, _ = tx.update({"w": jnp.asarray(u)}, tx.init({"w": w}), {"w": jnp.asarray(w)})
  new_w = np.asarray(oc.apply_updates({"w": jnp.asarray(w)}, out)["w"])
  expected = soft(w.astype(np.float64) + u, lr * l1)
  np.testing.assert_allclose(new_w, expected, rtol=1e-6, atol=1e-7)
  zero = expected == 0
  assert zero.sum() == 4
  assert np.all(new_w[zero] == 0.0)  # exactly zero, not merely small


def test_elastic_net_step_matches_the_proximal_operator():
  rng = np.random.default_rng(0)
  w = rng.normal(size=50).astype(np.float32)
  u = (0.1 * rng.normal(size=50)).astype(np.float32)
  lr, l1, l2 = 0.05, 2.0, 0.5
  tx = oc.prox_elastic_net(l1, l2, lr)
  out, _ = tx.update({"w": jnp.asarray(u)}, tx.init({"w": w}), {"w": jnp.asarray(w)})
  new_w = np.asarray(oc.apply_updates({"w": jnp.asarray(w)}, out)["w"])
  # The proximal operator by definition: argmin_z 1/(2 lr) (z - v)^2 + l1 |z| + l2/2 z^2,
  # minimised here by brute force on a fine grid, independently of the closed form.
  v = w.astype(np.float64) + u
  grid = np.linspace(-4, 4, 400001)
  for i in range(0, 50, 7):
    objective = (grid - v[i]) ** 2 / (2 * lr) + l1 * np.abs(grid) + l2 / 2 * grid**2
    assert abs(new_w[i] - grid[np.argmin(objective)]) < 5e-5


def test_mask_limits_the_proximal_step():
  params = {"kernel": jnp.full((2, 2), 0.01), "bias": jnp.full(2, 0.01)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = oc.sgd(0.1, l1=1.0, reg_mask={"kernel": True, "bias": False})
  u, _ = tx.update(zeros, tx.init(params), params)
  new = oc.apply_updates(params, u)
  assert np.all(np.asarray(new["kernel"]) == 0.0)
  np.testing.assert_array_equal(new["bias"], params["bias"])


@pytest.mark.numerics
def test_adamw_l1_matches_optax_adamw_followed_by_numpy_soft_threshold():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(6, 3)) * 0.1, jnp.float32)}
  lr, wd, l1 = 1e-2, 1e-2, 0.5
  ours = oc.adamw(lr, weight_decay=wd, l1=l1)
  ref = standard_promotion(optax.adamw(lr, weight_decay=wd))  # Optax promotes implicitly
  s_ours, s_ref = ours.init(params), ref.init(params)
  p_ours, p_ref = params, np.asarray(params["w"])
  update = jax.jit(ours.update)
  for t in range(100):
    g = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) * 0.01 + p_ours["w"]}
    u, s_ours = update(g, s_ours, p_ours)
    p_ours = oc.apply_updates(p_ours, u)
    u_ref, s_ref = ref.update(g, s_ref, {"w": jnp.asarray(p_ref, jnp.float32)})
    p_ref = soft(p_ref + np.asarray(u_ref["w"], np.float64), lr * l1).astype(np.float32)
  np.testing.assert_allclose(p_ours["w"], p_ref, rtol=1e-5, atol=1e-6)
  assert np.mean(np.asarray(p_ours["w"]) == 0.0) > 0.5


@pytest.mark.parametrize(
  "make, batches",
  [
    (lambda: oc.sgd(0.05, l1=0.05), 1),
    (lambda: oc.sgd(0.05, momentum=0.5, l1=0.05, l2=1e-3), 1),
    (lambda: oc.adamw(0.01, weight_decay=0.0, l1=0.3), 10),
  ],
  ids=["ista_full_batch", "momentum_elastic_net_full_batch", "adamw_l1_minibatch"],
)
def test_sparse_regression_recovers_the_true_zero_pattern(make, batches):
  """A lasso regression with 6 of 30 true weights, full-batch or in minibatches of 200/batches.

  SGD + prox is ISTA, run full-batch (with cycling minibatches its last iterate keeps
  per-batch noise). AdamW + L1 runs on minibatches, the way it is used: there the normalised
  step of an irrelevant weight, |m_hat| / sqrt(v_hat), is well below l1 and the weight stays at
  exact zero (full-batch, that ratio is ~1 everywhere; see the adamw docstring).
  """
  rng = np.random.default_rng(3)
  n, d = 200, 30
  x = rng.normal(size=(n, d)).astype(np.float32)
  w_true = np.zeros(d, np.float32)
  support = rng.choice(d, 6, replace=False)
  w_true[support] = rng.choice([-1.0, 1.0], 6) * rng.uniform(1.0, 2.0, 6)
  y = x @ w_true + 0.01 * rng.normal(size=n).astype(np.float32)
  x, y = jnp.asarray(x), jnp.asarray(y)
  size = n // batches

  def loss(p, i):
    xb = jax.lax.dynamic_slice_in_dim(x, i * size, size)
    yb = jax.lax.dynamic_slice_in_dim(y, i * size, size)
    return 0.5 * jnp.mean((xb @ p["w"] - yb) ** 2)

  tx = make()

  def body(carry, t):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p, t % batches), s, p)
    return (oc.apply_updates(p, u), s), None

  p0 = {"w": jnp.zeros(d)}
  (p, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(3000)))((p0, tx.init(p0)))
  w = np.asarray(p["w"])
  np.testing.assert_array_equal(w != 0.0, w_true != 0.0)
  # Plain least squares (no L1) has no exact zeros on the same problem.
  lsq = np.linalg.lstsq(np.asarray(x), np.asarray(y), rcond=None)[0]
  assert np.all(lsq != 0.0)


def test_adamw_without_l1_has_no_exact_zeros_on_the_same_run():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(200, 30)), jnp.float32)
  y = x[:, 0] * 2.0
  loss = lambda p, i: (
    0.5 * jnp.mean((x[i * 20 : (i + 1) * 20] @ p["w"] - y[i * 20 : (i + 1) * 20]) ** 2)
  )
  zeros = {}
  for l1 in (0.0, 0.3):
    tx, p = oc.adamw(0.01, weight_decay=0.0, l1=l1), {"w": jnp.zeros(30)}
    s = tx.init(p)
    step = jax.jit(lambda p, s, i, tx=tx: tx.update(jax.grad(loss)(p, i), s, p), static_argnums=2)
    for t in range(500):
      u, s = step(p, s, t % 10)
      p = oc.apply_updates(p, u)
    zeros[l1] = int(np.sum(np.asarray(p["w"]) == 0.0))
  assert zeros[0.0] == 0 and zeros[0.3] >= 25


# ---------------------------------------------------------------------------------------------
# SGD with momentum and the elastic net: the proximal step is lr / (1 - rho), the step the
# momentum takes once settled, so the fixed point is the problem's own (issue: with a step
# of lr both penalties were weakened by 1 - rho).

_RNG = np.random.default_rng(1)
_X = _RNG.normal(size=(50, 10))
_Y = _X @ np.array([2.0, -3.0, 1.5, 0, 0, 0, 0, 0, 0, 0.3]) + 0.1 * _RNG.normal(size=50)
_L = float(np.linalg.eigvalsh(_X.T @ _X / 50).max())


def elastic_net_by_coordinate_descent(l1, l2, sweeps=2000):
  """argmin 1/(2n) |X w - y|^2 + l1 |w|_1 + l2/2 |w|^2, by exact coordinate minimisation."""
  n, d = _X.shape
  w = np.zeros(d)
  for _ in range(sweeps):
    for j in range(d):
      r = _Y - _X @ w + _X[:, j] * w[j]
      z = _X[:, j] @ r / n
      w[j] = np.sign(z) * max(abs(z) - l1, 0.0) / (_X[:, j] @ _X[:, j] / n + l2)
  # The optimality (KKT) conditions hold, so the reference is the solution.
  g = _X.T @ (_X @ w - _Y) / n + l2 * w
  nz = w != 0
  np.testing.assert_allclose(g[nz] + l1 * np.sign(w[nz]), 0.0, atol=1e-12)
  assert np.all(np.abs(g[~nz]) <= l1 + 1e-12)
  return w


def run_full_batch(tx, steps=3000):
  x, y = jnp.asarray(_X), jnp.asarray(_Y)
  loss = lambda w: 0.5 * jnp.mean((x @ w - y) ** 2)

  def body(carry, _):
    w, s = carry
    u, s = tx.update(jax.grad(loss)(w), s, w)
    return (oc.apply_updates(w, u), s), None

  w0 = jnp.zeros(_X.shape[1])
  (w, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((w0, tx.init(w0)))
  return np.asarray(w)


MOMENTUM_PROX = {
  "heavy_ball_0.5": lambda lr, l1, l2: oc.sgd(lr, 0.5, l1=l1, l2=l2),
  "heavy_ball_0.9": lambda lr, l1, l2: oc.sgd(lr, 0.9, l1=l1, l2=l2),
  "nesterov_0.9": lambda lr, l1, l2: oc.sgd(lr, 0.9, nesterov=True, l1=l1, l2=l2),
  "scheduled_lr": lambda lr, l1, l2: oc.sgd(oc.constant_schedule(lr), 0.9, l1=l1, l2=l2),
  "scheduled_momentum": lambda lr, l1, l2: oc.sgd(
    oc.constant_schedule(lr), oc.linear_schedule(0.5, 0.9, 500), l1=l1, l2=l2
  ),
  "injected": lambda lr, l1, l2: oc.inject_hyperparams(oc.sgd)(lr, 0.9, l1=l1, l2=l2),
}


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("l1, l2", [(0.3, None), (0.3, 0.2)], ids=["lasso", "elastic_net"])
@pytest.mark.parametrize("name", sorted(MOMENTUM_PROX))
def test_sgd_with_momentum_converges_to_the_lasso_and_elastic_net_as_given(name, l1, l2):
  with x64():
    ref = elastic_net_by_coordinate_descent(l1, l2 or 0.0)
    assert 3 <= np.sum(ref == 0.0) < ref.size  # exact zeros, and not all of them
    w = run_full_batch(MOMENTUM_PROX[name](1.0 / _L, l1, l2))
  np.testing.assert_allclose(w, ref, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(w == 0.0, ref == 0.0)  # the same exact zeros


def test_sgd_proximal_step_is_the_settled_momentum_step():
  """Without momentum (or with 0) the proximal step is lr as before; with rho, lr / (1 - rho);
  momentum 1 never settles and is refused with l1/l2 (also by set_hyperparams)."""
  w = {"w": jnp.asarray([0.5, 0.04, -0.3])}
  zeros = {"w": jnp.zeros(3)}
  for momentum, threshold in ((None, 0.05), (0.0, 0.05), (0.75, 0.2)):
    tx = oc.sgd(0.1, momentum, l1=0.5)
    u, _ = tx.update(zeros, tx.init(w), w)
    expected = soft(np.asarray(w["w"], np.float64), threshold)
    np.testing.assert_allclose(oc.apply_updates(w, u)["w"], expected, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match=r"sgd: `momentum` must be below 1 with `l1`/`l2`"):
    oc.sgd(0.1, 1.0, l1=0.5)
  with pytest.raises(ValueError, match=r"`momentum` must be below 1"):
    oc.sgd(0.1, oc.linear_schedule(0.9, 1.0, 100), l2=0.5)
  oc.sgd(0.1, 1.0)  # without a proximal step momentum 1 is allowed, as before
  tx = oc.inject_hyperparams(oc.sgd)(0.1, 0.9, l1=0.5)
  with pytest.raises(ValueError, match=r"momentum"):
    oc.set_hyperparams(tx.init(w), momentum=1.0)
  # Put in by hand inside jit (not checked there): a finite step, no NaN from 0 * inf.
  tx = oc.inject_hyperparams(oc.sgd)(0.1, 0.9, l1=0.0, l2=0.5)
  state = tx.init(w)
  state.hyperparams["momentum"] = jnp.float32(1.0)
  u, _ = jax.jit(tx.update)({"w": jnp.ones(3)}, state, w)
  assert np.all(np.isfinite(np.asarray(u["w"])))


def test_a_scheduled_momentum_with_l1_logs_the_learning_rate_not_the_proximal_step():
  # eta = lr / (1 - rho) is held as the proximal member's `learning_rate`; with a constant lr
  # it was the only one in the state, so with_diagnostics and current_hyperparams read 1.0.
  tx = oc.with_diagnostics(
    oc.sgd(0.1, momentum=oc.constant_schedule(0.9), l1=0.01), learning_rate=0.1
  )
  params = {"w": jnp.ones(3)}
  _, state = jax.jit(tx.update)({"w": jnp.ones(3)}, tx.init(params), params)
  np.testing.assert_allclose(float(state.used_learning_rate), 0.1, rtol=1e-6)
  held = oc.current_hyperparams(state)
  np.testing.assert_allclose(float(held["learning_rate"]), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(held["inner_state/2/learning_rate"]), 1.0, rtol=1e-6)
