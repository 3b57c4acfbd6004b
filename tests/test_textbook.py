"""The optimizers against their textbook formulas, written out independently in NumPy.

Every expected value below is computed in float64 NumPy from the published recurrences
(Kingma and Ba 2015 for Adam, Polyak 1964 / Sutskever et al. 2013 for momentum, Duchi et al.
2011 for AdaGrad, Tieleman and Hinton 2012 for RMSProp, Loshchilov and Hutter 2019 for
AdamW), never from values printed by the library. The library runs in float32, so the
comparisons allow float32 rounding (rtol 1e-6 .. 1e-5, plus an absolute floor where a
quantity is a small difference of two larger ones).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc

F32 = jnp.float32


def f64(x):
  return np.asarray(x, dtype=np.float64)


def run_updates(tx, grads, params):
  """Feed the float32 gradients ``grads[t]`` to ``tx`` with fixed ``params``; the updates."""
  params = jnp.asarray(params, F32)
  state = tx.init(params)
  out = []
  for g in grads:
    u, state = tx.update(jnp.asarray(g, F32), state, params)
    assert u.dtype == F32
    out.append(f64(u))
  return np.stack(out)


# ---------------------------------------------------------------------------------------
# Adam (Kingma and Ba, Algorithm 1).


def adam_reference(grads, lr, b1, b2, eps):
  """Algorithm 1 of Kingma and Ba in float64: the update -lr m_hat / (sqrt(v_hat) + eps)."""
  m = np.zeros_like(grads[0])
  v = np.zeros_like(grads[0])
  out = []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    out.append(-lr * m_hat / (np.sqrt(v_hat) + eps))
  return np.stack(out)


# Mixed signs, magnitudes from 1e-4 to 1e3, and two entries comparable with eps = 1e-8,
# where the step is visibly not lr * sign(g).
G1 = np.array([1.0, -2.5, 3e-4, -1e-4, 0.3, -40.0, 1e3, 3e-8, -1e-8], np.float32)
G2 = np.array([-0.5, -1.0, 2e-4, 5e-4, 0.1, 10.0, -3e2, 1e-8, -3e-8], np.float32)

# Optax's defaults, and dyadic betas that float32 holds exactly (with b = 0.999 the
# float32-rounded beta in the bias correction 1 - b^t is off by ~1e-5 relative, which
# is why the default case uses rtol 1e-5; the exact-beta case is held to 1e-6).
ADAM_SETTINGS = [
  pytest.param(1e-3, 0.9, 0.999, 1e-8, 1e-5, id="defaults"),
  pytest.param(0.05, 0.75, 0.984375, 1e-8, 1e-6, id="dyadic-betas"),
]


@pytest.mark.parametrize("lr, b1, b2, eps, rtol", ADAM_SETTINGS)
def test_adam_first_step_is_lr_times_sign(lr, b1, b2, eps, rtol):
  """Step 1: m_hat = g, v_hat = g^2 exactly, so u = -lr g / (|g| + eps) ~ -lr sign(g)."""
  g = f64(G1)
  (u,) = run_updates(oc.adam(lr, b1=b1, b2=b2, eps=eps), [G1], np.zeros_like(G1))
  expected = -lr * g / (np.abs(g) + eps)
  np.testing.assert_allclose(u, expected, rtol=rtol, atol=0)
  # For |g| >> eps the first step has size lr whatever the gradient's magnitude ...
  # (|u| = lr / (1 + eps / |g|), within lr * eps / |g| of lr).
  big = np.abs(g) > 1e-6
  assert np.all(np.abs(u[big] + lr * np.sign(g[big])) <= lr * (eps / np.abs(g[big]) + rtol))
  # ... and near eps it is visibly smaller: |g| = 3 eps gives 3/4 lr, |g| = eps gives lr/2.
  np.testing.assert_allclose(u[~big], [-0.75 * lr, 0.5 * lr], rtol=max(rtol, 1e-5))
  # The same thing from the generic reference (m_hat = m / (1 - b1), v_hat = v / (1 - b2)).
  np.testing.assert_allclose(u, adam_reference([g], lr, b1, b2, eps)[0], rtol=rtol)


@pytest.mark.parametrize("lr, b1, b2, eps, rtol", ADAM_SETTINGS)
def test_adam_second_step_full_recurrence(lr, b1, b2, eps, rtol):
  """Step 2 with a different gradient against m_2, v_2 and the 1 - b^2 corrections."""
  g1, g2 = f64(G1), f64(G2)
  u = run_updates(oc.adam(lr, b1=b1, b2=b2, eps=eps), [G1, G2], np.zeros_like(G1))
  m2 = b1 * (1 - b1) * g1 + (1 - b1) * g2
  v2 = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
  expected2 = -lr * (m2 / (1 - b1**2)) / (np.sqrt(v2 / (1 - b2**2)) + eps)
  # m2 is a difference when g1 and g2 have opposite signs: allow float32 rounding of the
  # two terms (relative to lr) as an absolute floor.
  np.testing.assert_allclose(u[1], expected2, rtol=rtol, atol=10 * rtol * lr)
  np.testing.assert_allclose(
    u, adam_reference([g1, g2], lr, b1, b2, eps), rtol=rtol, atol=10 * rtol * lr
  )
  # Step 2 is no longer lr * sign(g2): the history matters (the check can fail).
  assert np.max(np.abs(np.abs(u[1]) - lr)) > 0.05 * lr


def test_adam_many_steps_with_apply_updates():
  """Ten steps on f(w) = 1/2 |w - c|^2 through apply_updates, against the reference."""
  lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
  c = np.array([1.0, -2.0, 0.5, 4.0])
  tx = oc.adam(lr, b1=b1, b2=b2, eps=eps)
  w = jnp.zeros(4, F32)
  state = tx.init(w)
  w_ref, m, v = np.zeros(4), np.zeros(4), np.zeros(4)
  for t in range(1, 11):
    u, state = tx.update(w - jnp.asarray(c, F32), state, w)
    w = oc.apply_updates(w, u)
    g = w_ref - c
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w_ref = w_ref - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    assert w.dtype == F32
    np.testing.assert_allclose(f64(w), w_ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Heavy ball and Nesterov momentum on an ill-conditioned quadratic.

H = np.array([1.0, 4.0, 10.0, 25.0, 100.0])  # f(w) = 1/2 w^T diag(H) w; kappa = 100
W0 = np.array([1.0, -1.0, 1.0, -1.0, 1.0])
L_SMOOTH = H.max()
LR, RHO, STEPS = 1.0 / L_SMOOTH, 0.9, 50


def quad_loss(w):
  w = f64(w)
  return 0.5 * float(np.sum(H * w * w))


def momentum_reference(lr, rho, nesterov, steps):
  """v <- rho v + g;  w <- w - lr v (heavy ball) or w - lr (g + rho v) (Nesterov)."""
  w, v = W0.copy(), np.zeros_like(W0)
  path = []
  for _ in range(steps):
    g = H * w
    v = rho * v + g
    w = w - lr * ((g + rho * v) if nesterov else v)
    path.append(w.copy())
  return np.stack(path)


def momentum_library(lr, rho, nesterov, steps):
  tx = oc.sgd(lr, momentum=rho, nesterov=nesterov)
  h = jnp.asarray(H, F32)
  w = jnp.asarray(W0, F32)
  state = tx.init(w)
  path = []
  for _ in range(steps):
    u, state = tx.update(h * w, state, w)
    w = oc.apply_updates(w, u)
    assert w.dtype == F32
    path.append(f64(w))
  return np.stack(path)


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
@pytest.mark.parametrize("lr, rho", [(LR, RHO), (0.005, 0.5)])
def test_momentum_matches_recurrence(nesterov, lr, rho):
  ours = momentum_library(lr, rho, nesterov, STEPS)
  ref = momentum_reference(lr, rho, nesterov, STEPS)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(W0)))
  # The iterates move: the comparison is not between two frozen runs.
  assert quad_loss(ours[-1]) < 0.5 * quad_loss(W0)


def test_nesterov_and_heavy_ball_are_different_trajectories():
  hb = momentum_library(LR, RHO, False, STEPS)
  nag = momentum_library(LR, RHO, True, STEPS)
  # Already after the first step: heavy ball moves by lr g, Nesterov by lr (1 + rho) g.
  g0 = H * W0
  np.testing.assert_allclose(hb[0], W0 - LR * g0, rtol=1e-6)
  np.testing.assert_allclose(nag[0], W0 - LR * (1 + RHO) * g0, rtol=1e-6, atol=1e-7)
  assert np.max(np.abs(hb - nag)) > 0.5


def test_nesterov_beats_heavy_ball_with_lr_one_over_L():
  """With lr = 1/L and rho = 0.9, Nesterov ends far lower than heavy ball after 50 steps.

  The reference trajectories give 0.22 (heavy ball) against 1.5e-3 (Nesterov); the test
  asks for a factor of 10 on the library's own float32 runs.
  """
  hb = momentum_library(LR, RHO, False, STEPS)
  nag = momentum_library(LR, RHO, True, STEPS)
  ref_hb = quad_loss(momentum_reference(LR, RHO, False, STEPS)[-1])
  ref_nag = quad_loss(momentum_reference(LR, RHO, True, STEPS)[-1])
  assert ref_nag < ref_hb / 10  # the textbook claim holds for these settings ...
  assert quad_loss(nag[-1]) < quad_loss(hb[-1]) / 10  # ... and for the library
  np.testing.assert_allclose(quad_loss(hb[-1]), ref_hb, rtol=1e-4)
  np.testing.assert_allclose(quad_loss(nag[-1]), ref_nag, rtol=1e-3)


def test_nesterov_damps_the_stiff_direction():
  """On the stiff eigendirection (h = L, lr h = 1) the iteration matrices on (w, v) are

      heavy ball  [[1 - lr h, -lr rho], [h, rho]]               -> |eigenvalues| = sqrt(rho)
      Nesterov    [[1 - lr h (1 + rho), -lr rho^2], [h, rho]]   -> nilpotent (trace = det = 0)

  so heavy ball keeps oscillating (sign flips, amplitude ~ rho^(t/2)) while Nesterov sends
  that coordinate to 0 in two steps.
  """
  h, lr, rho = L_SMOOTH, LR, RHO
  m_hb = np.array([[1 - lr * h, -lr * rho], [h, rho]])
  m_nag = np.array([[1 - lr * h * (1 + rho), -lr * rho**2], [h, rho]])
  np.testing.assert_allclose(np.abs(np.linalg.eigvals(m_hb)), np.sqrt(rho), rtol=1e-12)
  np.testing.assert_allclose(m_nag @ m_nag, 0.0, atol=1e-12)

  stiff = int(np.argmax(H))
  hb = momentum_library(lr, rho, False, STEPS)[:, stiff]
  nag = momentum_library(lr, rho, True, STEPS)[:, stiff]
  # Heavy ball: still oscillating late in the run, with the predicted envelope.
  flips = np.sum(np.sign(hb[1:]) != np.sign(hb[:-1]))
  assert flips >= 10
  assert np.max(np.abs(hb[-10:])) > 0.1 * rho ** (STEPS / 2)
  # Nesterov: the stiff coordinate is (numerically) zero from step 2 on.
  assert abs(nag[0]) > 0.5  # step 1 overshoots: w = 1 - (1 + rho) = -rho
  np.testing.assert_allclose(nag[0], 1 - (1 + rho), rtol=1e-6)
  assert np.max(np.abs(nag[1:])) < 1e-5


# ---------------------------------------------------------------------------------------
# AdaGrad.


@pytest.mark.parametrize("a, eps", [(0.1, 1e-7), (0.0, 1e-10), (2.0, 1e-7)])
def test_adagrad_step_shrinks_like_inverse_sqrt_t(a, eps):
  """Constant g: G_t = a + t g^2, so |u_t| = lr |g| / sqrt(a + t g^2 + eps)."""
  lr, steps = 0.3, 100
  g = np.array([0.5, -2.0, 0.03, 7.0], np.float32)
  u = run_updates(
    oc.adagrad(lr, initial_accumulator_value=a, eps=eps), [g] * steps, np.zeros_like(g)
  )
  t = np.arange(1, steps + 1, dtype=np.float64)[:, None]
  gg = f64(g)[None, :]
  expected = -lr * gg / np.sqrt(a + t * gg**2 + eps)
  np.testing.assert_allclose(u, expected, rtol=1e-5)
  # The direction is -sign(g) and the size strictly decreases at every step ...
  assert np.all(np.sign(u) == -np.sign(gg))
  size = np.abs(u)
  assert np.all(np.diff(size, axis=0) < 0)
  # ... as 1/sqrt(t): sqrt(t) |u_t| -> lr, monotonically from below; |u_4| ~ |u_1| / 2 and
  # |u_100| ~ |u_1| / 10 up to the a / (t g^2) correction.
  scaled = np.sqrt(t) * size
  assert np.all(scaled <= lr * (1 + 1e-5))
  assert np.all(np.diff(scaled, axis=0) >= -1e-6 * lr)
  # 1 - sqrt(t g^2 / (a + t g^2 + eps)) <= (a + eps) / (2 t g^2): close to lr for large g.
  bound = (a + eps) / (2 * steps * f64(g) ** 2) + 1e-5
  assert np.all(np.abs(scaled[-1] / lr - 1) <= bound)
  assert np.abs(scaled[-1][3] / lr - 1) < 1e-3  # g = 7: 1/sqrt(t) to 0.1 %
  exact_ratio = np.sqrt((a + f64(g) ** 2 + eps) / (a + 4 * f64(g) ** 2 + eps))
  np.testing.assert_allclose(size[3] / size[0], exact_ratio, rtol=1e-5)


def test_adagrad_eps_inside_the_sqrt():
  """a = 0, g = 1e-3, eps = 1e-6 = g^2: |u_t| = lr g / sqrt(t g^2 + g^2) = lr / sqrt(t + 1)."""
  lr, steps = 0.3, 20
  g = np.array([1e-3, -1e-3], np.float32)
  u = run_updates(
    oc.adagrad(lr, initial_accumulator_value=0.0, eps=1e-6), [g] * steps, np.zeros_like(g)
  )
  t = np.arange(1, steps + 1, dtype=np.float64)[:, None]
  gg = f64(g)[None, :]
  np.testing.assert_allclose(u, -lr * gg / np.sqrt(t * gg**2 + 1e-6), rtol=1e-5)
  np.testing.assert_allclose(np.abs(u), np.broadcast_to(lr / np.sqrt(t + 1), u.shape), rtol=1e-4)


# ---------------------------------------------------------------------------------------
# RMSProp.


def test_rmsprop_first_and_second_step():
  """v_1 = (1 - d) g^2, u = -lr g / sqrt(v_1 + eps); then v_2 = d v_1 + (1 - d) g_2^2."""
  lr, d, eps = 0.01, 0.9, 1e-8
  g1 = np.array([1.0, -3.0, 2e-4, -1e-4, 50.0], np.float32)
  g2 = np.array([-1.0, 0.5, 2e-4, 3e-4, 5.0], np.float32)
  u = run_updates(oc.rmsprop(lr, decay=d, eps=eps), [g1, g2], np.zeros_like(g1))
  v1 = (1 - d) * f64(g1) ** 2
  np.testing.assert_allclose(u[0], -lr * f64(g1) / np.sqrt(v1 + eps), rtol=1e-6)
  # For |g|^2 >> eps the first step is lr / sqrt(1 - d) in size, ~3.16 lr for d = 0.9.
  np.testing.assert_allclose(np.abs(u[0][[0, 1, 4]]), lr / np.sqrt(1 - d), rtol=1e-6)
  # With g = 1e-4, (1 - d) g^2 = 1e-9 is small against eps = 1e-8: eps is inside the sqrt.
  np.testing.assert_allclose(u[0][3], lr * 1e-4 / np.sqrt(1e-9 + 1e-8), rtol=1e-5)
  v2 = d * v1 + (1 - d) * f64(g2) ** 2
  np.testing.assert_allclose(u[1], -lr * f64(g2) / np.sqrt(v2 + eps), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# AdamW (decoupled) against Adam + L2 (coupled).

W_DECAY = np.array([1.0, -2.0, 0.5, 3.0, -0.25], np.float32)
DECAY_GRADS = (0.1 * np.random.default_rng(0).normal(size=(5, 5))).astype(np.float32)
DECAY_LR, DECAY_WD, DECAY_STEPS = 0.01, 0.1, 5


@pytest.mark.parametrize("c", [1.0, 1000.0])
def test_adamw_decay_is_lr_wd_w_at_any_gradient_scale(c):
  """AdamW: u = -lr (adam_direction + wd w), so u_adamw - u_adam = -lr wd w for g and c g."""
  lr, wd = DECAY_LR, DECAY_WD
  grads = [np.float32(c) * g for g in DECAY_GRADS]
  u_adam = run_updates(oc.adam(lr), grads, W_DECAY)
  u_adamw = run_updates(oc.adamw(lr, weight_decay=wd), grads, W_DECAY)
  np.testing.assert_allclose(
    u_adam, adam_reference(f64(grads), lr, 0.9, 0.999, 1e-8), rtol=1e-5, atol=1e-5 * lr
  )
  decay = u_adamw - u_adam
  expected = np.broadcast_to(-lr * wd * f64(W_DECAY), decay.shape)
  np.testing.assert_allclose(decay, expected, rtol=1e-5, atol=1e-6 * lr)


def adam_l2_decay_effect(c):
  """Reference: the change in the update that the L2 term causes, at gradient scale c."""
  lr, wd = DECAY_LR, DECAY_WD
  grads = c * f64(DECAY_GRADS)
  with_l2 = adam_reference(grads + wd * f64(W_DECAY), lr, 0.9, 0.999, 1e-8)
  plain = adam_reference(grads, lr, 0.9, 0.999, 1e-8)
  return with_l2, with_l2 - plain


@pytest.mark.parametrize("c", [1.0, 1000.0])
def test_adam_l2_matches_adam_on_penalised_gradient(c):
  """chain(add_l2_penalty(wd), adam(lr)) is Adam on g + wd w (the coupled L2 gradient)."""
  lr, wd = DECAY_LR, DECAY_WD
  grads = [np.float32(c) * g for g in DECAY_GRADS]
  tx = oc.chain(oc.add_l2_penalty(wd), oc.adam(lr))
  u = run_updates(tx, grads, W_DECAY)
  expected, _ = adam_l2_decay_effect(c)
  np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-5 * lr)


def test_adam_l2_decay_weakens_with_gradient_scale_adamw_does_not():
  lr, wd = DECAY_LR, DECAY_WD
  effects = {}
  for c in (1.0, 1000.0):
    grads = [np.float32(c) * g for g in DECAY_GRADS]
    u_l2 = run_updates(oc.chain(oc.add_l2_penalty(wd), oc.adam(lr)), grads, W_DECAY)
    u_adam = run_updates(oc.adam(lr), grads, W_DECAY)
    u_adamw = run_updates(oc.adamw(lr, weight_decay=wd), grads, W_DECAY)
    _, expected = adam_l2_decay_effect(c)
    np.testing.assert_allclose(u_l2 - u_adam, expected, rtol=1e-3, atol=1e-5 * lr)
    effects[c] = (u_l2 - u_adam, u_adamw - u_adam)

  l2_small, adamw_small = effects[1.0]
  l2_big, adamw_big = effects[1000.0]
  # Pull toward zero: the decay effect projected on -w, after the last step.
  w = f64(W_DECAY)

  def pull(effect):
    return float(-effect[-1] @ w / (w @ w))

  # AdamW: the same pull lr * wd at both scales.
  np.testing.assert_allclose(pull(adamw_small), lr * wd, rtol=1e-5)
  np.testing.assert_allclose(pull(adamw_big), lr * wd, rtol=1e-5)
  # Adam + L2: a real pull at scale 1 (comparable with the gradient, wd w ~ g), which the
  # preconditioner all but cancels at scale 1000 (it is divided by sqrt(v_hat) ~ c |g|).
  assert pull(l2_small) > 0.1 * lr * wd
  assert abs(pull(l2_big)) < pull(l2_small) / 100
  assert np.max(np.abs(l2_big)) < np.max(np.abs(l2_small)) / 100
