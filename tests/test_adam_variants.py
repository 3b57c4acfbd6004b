"""Adam's variants beyond the registry's one case each: the options those cases leave at
their defaults (against Optax in float64), and the ranges where we are stricter than Optax
or compute otherwise (float16 statistics in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import F64_RTOL, assert_rel_close, standard_promotion, x64

# (builder, keyword arguments): the options the registry's cases do not exercise.
OPTIONS = [
  ("scale_by_belief", dict(b1=0.8, b2=0.99, eps=1e-8, eps_root=1e-10, nesterov=True)),
  ("scale_by_radam", dict(b2=0.99, eps_root=1e-8, threshold=6.0)),
  ("scale_by_amsgrad", dict(b2=0.99, bias_correction_mu=False, bias_correction_nu=False)),
  ("scale_by_yogi", dict(b2=0.9, eps=1e-6, eps_root=1e-8, initial_accumulator_value=0.0)),
  ("scale_by_adamax", dict(b1=0.8, b2=1.0, eps=1e-6)),
  ("scale_by_adan", dict(b1=0.9, b2=0.8, b3=0.95, eps_root=1e-8)),
]


def _trajectory(tx, params, steps=25):
  """Parameters after each step on f(w) = sum(w^4 / 4 - w) (a gradient that changes sign)."""
  grad = lambda w: jax.tree.map(lambda x: x**3 - 1.0, w)  # noqa: E731

  @jax.jit
  def run(params):
    def step(carry, _):
      w, state = carry
      u, state = tx.update(grad(w), state, w)
      w = jax.tree.map(lambda a, b: a - 0.05 * b, w, u)
      return (w, state), w

    return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[1]

  return run(params)


@pytest.mark.float64
@pytest.mark.parametrize("name, kwargs", OPTIONS, ids=[n for n, _ in OPTIONS])
def test_options_match_optax_in_float64(name, kwargs):
  with x64():
    params = {"w": jnp.linspace(-1.5, 2.0, 7), "b": jnp.float64(0.3)}
    ours = _trajectory(getattr(oc, name)(**kwargs), params)
    ref = _trajectory(standard_promotion(getattr(optax, name)(**kwargs)), params)
    assert_rel_close(ours, ref, F64_RTOL)
    assert float(jnp.max(jnp.abs(ours["w"][-1] - params["w"]))) > 0.1  # it moved


def test_radam_threshold_below_4_and_a_scheduled_b2_are_refused():
  with pytest.raises(ValueError, match="threshold"):
    oc.scale_by_radam(threshold=3.0)  # Optax: r_t = sqrt(< 0) = NaN once 2 < rho_t < 4
  with pytest.raises(ValueError, match="threshold"):
    oc.radam(1e-3, threshold=3.0)
  with pytest.raises(TypeError, match="b2"):
    oc.scale_by_radam(b2=lambda count: 0.99)


def _rho_and_r_float64(b2: float, t: int) -> tuple:
  """RAdam's rho_t and r_t in float64, as the paper writes them (its cancellation costs
  about 1e-12 here: far below float32's rounding)."""
  rho_inf = 2 / (1 - b2) - 1
  rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
  if rho < 5:
    return rho, 1.0
  return rho, np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))


def test_radam_rectification_is_exact_to_float32_rounding():
  """r_t in float32 within 4 epsilons of the float64 formula at every step tried; Optax's
  float32 r_6 (b2 = 0.999) is 1.2% low (it subtracts a rounded b2^t from 1)."""
  from optcompose.transforms.adaptive_variants import radam_rectification

  worst = 0.0
  for b2 in (0.9, 0.99, 0.999, 0.9999):
    for t in [*range(1, 80), 100, 1000, 10**4, 10**6, 2**31 - 1]:
      rho, r = _rho_and_r_float64(b2, t)
      rectified, got = radam_rectification(b2, jnp.asarray(t, jnp.int32), 5.0)
      assert bool(rectified) == (rho >= 5), (b2, t)
      worst = max(worst, abs(float(got) - r) / r)
  assert worst <= 4 * np.finfo(np.float32).eps, worst


def test_radam_rectification_has_finite_gradients_in_b2():
  """Differentiating r_t in b2 (an injected b2 in meta-learning): finite at every count,
  before the threshold (where the unused r_t was a square root of a negative number) and
  where a power of a large x would overflow (x = t (-log b2) > 88 in float32)."""
  from optcompose.transforms.adaptive_variants import radam_rectification

  for t in (*range(1, 8), 100, 1000, 10**5, 2**31 - 1):  # rho_t < 4 at steps 2 to 4
    for b2 in (0.9, 0.999):
      grad = jax.grad(lambda b, t=t: radam_rectification(b, jnp.asarray(t, jnp.int32), 5.0)[1])
      assert np.isfinite(float(grad(jnp.float32(b2)))), (t, b2)


def test_radam_float32_steps_follow_the_float64_formula():
  """Twenty float32 steps of radam, from the same gradients, against the update a NumPy
  float64 RAdam computes (m, v, their corrections, rho_t and r_t): within 16 epsilons of the
  update, the rectified steps from step 6 included, beside the rounding that every Adam
  shares, Optax's too: its corrections use b2 rounded to float32 (so does the reference
  here), and float32's 1 - b2^t is off by up to two epsilons of b2^t, which is
  2 eps b2^t / (1 - b2^t) of it (about 4e-5 at step 6), halved by the square root."""
  lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
  rng = np.random.default_rng(0)
  grads = [np.abs(rng.normal(size=6)).astype(np.float32) + 0.1 for _ in range(20)]
  tx = oc.radam(lr, b1, b2, eps)
  params = {"w": jnp.zeros(6, jnp.float32)}
  state = tx.init(params)
  m = v = np.zeros(6)
  for t, g in enumerate(grads, 1):
    u, state = tx.update({"w": jnp.asarray(g)}, state, params)
    g64 = g.astype(np.float64)
    m, v = b1 * m + (1 - b1) * g64, b2 * v + (1 - b2) * g64**2
    b1_32, b2_32 = float(np.float32(b1)), float(np.float32(b2))  # the corrections' b1, b2
    m_hat, v_hat = m / (1 - b1_32**t), v / (1 - b2_32**t)
    rho, r = _rho_and_r_float64(b2, t)
    want = -lr * (r * m_hat / (np.sqrt(v_hat) + eps) if rho >= 5 else m_hat)
    eps32 = np.finfo(np.float32).eps
    rtol = 16 * eps32 + eps32 * b2**t / (1 - b2**t)
    np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=rtol)


def test_negative_initial_accumulator_and_zero_eps_are_refused():
  with pytest.raises(ValueError, match="initial_accumulator_value"):
    oc.scale_by_yogi(initial_accumulator_value=-1e-6)
  for build in (
    oc.scale_by_belief,
    oc.scale_by_amsgrad,
    oc.scale_by_yogi,
    oc.scale_by_adan,
    oc.scale_by_radam,
  ):
    with pytest.raises(ValueError, match="eps"):
      build(eps=0.0, eps_root=0.0)
  with pytest.raises(ValueError, match="eps"):
    oc.scale_by_adamax(eps=0.0)


@pytest.mark.parametrize("tx", [oc.adamax(1e-2), oc.adabelief(1e-2)], ids=["adamax", "adabelief"])
def test_float16_zero_gradients_give_finite_zero_updates(tx):
  """float16 statistics are computed in float32: eps = 1e-8 (1e-16 for AdaBelief) is 0 in
  float16, where a gradient that is 0 from the start would give 0 / 0."""
  params = {"w": jnp.ones(3, jnp.float16)}
  state = tx.init(params)
  for _ in range(2):
    u, state = tx.update({"w": jnp.zeros(3, jnp.float16)}, state, params)
    assert u["w"].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(u["w"], np.float32), 0.0)


@pytest.mark.parametrize("given", ["numpy-float32", "hyperparam_dtype"])
def test_float32_betas_beside_float64_parameters_are_debiased_in_float64(given):
  # 1 / (1 - b^t) was computed and rounded in the decay's float32: Adam's float64 first
  # step came out 4e-8 past the learning rate, which the formula cannot give.
  b1, b2, lr, eps = np.float32(0.9), np.float32(0.999), 0.1, 1e-8
  with x64():
    w = jnp.array([1.0, -2.0, 0.5, 3.0])
    if given == "numpy-float32":
      tx = oc.adam(lr, b1=b1, b2=b2, eps=eps)
    else:
      hyper = oc.inject_hyperparams(oc.adam, hyperparam_dtype=jnp.float32)
      tx = hyper(learning_rate=lr, b1=float(b1), b2=float(b2), eps=eps)
      lr, eps = float(np.float32(lr)), float(np.float32(eps))  # held as float32 too
    state = tx.init(w)
    m = v = np.zeros(4)
    for t in range(1, 6):
      g = np.asarray(w) * t - 1.0
      updates, state = tx.update(jnp.asarray(g), state, w)
      m = float(b1) * m + (1 - float(b1)) * g
      v = float(b2) * v + (1 - float(b2)) * g * g
      m_hat, v_hat = m / (1 - float(b1) ** t), v / (1 - float(b2) ** t)
      np.testing.assert_allclose(updates, -lr * m_hat / (np.sqrt(v_hat) + eps), rtol=1e-13)
      if t == 1:  # m_hat = g and v_hat = g^2: the step is below lr
        assert np.all(np.abs(np.asarray(updates)) <= lr)


def test_radam_with_b2_held_as_a_float32_array_is_rectified_as_with_a_python_b2():
  # rho_inf - 2 / log(1 / b2) cancels in float32 for an array b2 (1999 - 1998.9998 at
  # 0.999): injected, RAdam's first rectified updates were 194 epsilons from oc.radam's.
  w = jnp.array([1.0, -2.0, 0.5, 3.0])
  plain, injected = oc.radam(0.1), oc.inject_hyperparams(oc.radam)(learning_rate=0.1)
  a, b = plain.init(w), injected.init(w)
  for t in range(1, 11):
    g = w * t - 1.0
    ua, a = plain.update(g, a, w)
    ub, b = injected.update(g, b, w)
    np.testing.assert_allclose(ub, ua, rtol=8 * np.finfo(np.float32).eps, err_msg=f"step {t}")
