"""Schedules: values equal Optax's (where Optax has the schedule) and an independent
float64 formula, jitted and eager, at step 0, at and around every boundary, and past the end."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from optcompose import schedules as S
from numerics import standard_promotion, x64


def steps_around(*points, end):
  s = {0, 1, 2, end, end + 1, 2 * end + 7}
  for p in points:
    s |= {max(p - 1, 0), p, p + 1}
  return sorted(s)


def evaluate(schedule, steps, jit):
  f = jax.jit(schedule) if jit else schedule
  return np.array([float(f(jnp.int32(t))) for t in steps])


def assert_values(ours, expected, scale):
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7 * scale)


# (name, our schedule, Optax's, steps): the same arguments to both libraries.
OPTAX_PAIRS = [
  ("constant", lambda m: m.constant_schedule(0.3), steps_around(end=10)),
  (
    "piecewise_constant",
    lambda m: m.piecewise_constant_schedule(0.5, {10: 0.1, 25: 0.5}),
    steps_around(10, 25, end=30),
  ),
  (
    "exponential",
    lambda m: m.exponential_decay(1.0, 10, 0.5, transition_begin=5),
    steps_around(5, 15, end=60),
  ),
  (
    "exponential_staircase_end",
    lambda m: m.exponential_decay(2.0, 7, 0.3, staircase=True, end_value=0.05),
    steps_around(7, 14, end=40),
  ),
  (
    "exponential_growth_end",
    lambda m: m.exponential_decay(0.1, 5, 2.0, end_value=1.0),
    steps_around(5, 20, end=30),
  ),
  (
    "polynomial",
    lambda m: m.polynomial_schedule(1.0, 0.1, 2.0, 50, 10),
    steps_around(10, 60, end=60),
  ),
  ("linear", lambda m: m.linear_schedule(0.0, 1.0, 40), steps_around(40, end=40)),
  (
    "cosine",
    lambda m: m.cosine_decay_schedule(0.8, 100, alpha=0.1, exponent=2.0),
    steps_around(50, 100, end=100),
  ),
  ("warmup_constant", lambda m: m.warmup_constant_schedule(0.0, 1.0, 20), steps_around(20, end=30)),
  (
    "warmup_cosine",
    lambda m: m.warmup_cosine_decay_schedule(0.0, 1.0, 20, 200, 1e-3),
    steps_around(20, 110, 200, end=200),
  ),
  (
    "warmup_cosine_no_warmup",
    lambda m: m.warmup_cosine_decay_schedule(0.0, 1.0, 0, 50),
    steps_around(25, 50, end=50),
  ),
  (
    "warmup_exponential",
    lambda m: m.warmup_exponential_decay_schedule(
      0.01, 1.0, 10, 20, 0.5, staircase=True, end_value=0.1
    ),
    steps_around(10, 30, 50, end=90),
  ),
  (
    "sgdr",
    lambda m: m.sgdr_schedule(
      [
        dict(init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=30),
        dict(init_value=0.0, peak_value=0.5, warmup_steps=5, decay_steps=60),
      ]
    ),
    steps_around(5, 30, 35, 90, end=90),
  ),
  (
    "cosine_onecycle",
    lambda m: m.cosine_onecycle_schedule(100, 1.0),
    steps_around(30, 100, end=100),
  ),
  (
    "linear_onecycle",
    lambda m: m.linear_onecycle_schedule(100, 1.0, 0.25, 0.8),
    steps_around(25, 80, 100, end=100),
  ),
  (
    "piecewise_interpolate",
    lambda m: m.piecewise_interpolate_schedule("cosine", 1.0, {10: 0.5, 30: 0.1}),
    steps_around(10, 30, end=40),
  ),
  (
    "join",
    lambda m: m.join_schedules(
      [m.constant_schedule(1.0), m.linear_schedule(1.0, 0.0, 10), m.constant_schedule(0.2)], [5, 15]
    ),
    steps_around(5, 15, end=20),
  ),
]


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("name, make, steps", OPTAX_PAIRS, ids=[p[0] for p in OPTAX_PAIRS])
def test_schedule_matches_optax(name, make, steps, jit):
  # Optax's schedules mix Python floats with the int32 count: standard promotion for them.
  ours, ref = evaluate(make(oc), steps, jit), evaluate(standard_promotion(make(optax)), steps, jit)
  assert_values(ours, ref, np.max(np.abs(ref)))


# Independent float64 formulas for every schedule, including those Optax lacks.
def ref_inverse_time(t, v=0.5, T=10, r=2.0, staircase=False):
  p = math.floor(t / T) if staircase else t / T
  return v / (1 + r * p)


def ref_inverse_sqrt(t, peak=1.0, W=20, v0=0.0):
  if t < W:
    return v0 + (peak - v0) * t / W
  return peak * math.sqrt(W / t)


def ref_transformer(t, d_model=512, W=40):
  """Vaswani et al.: lrate = d^-0.5 min(step^-0.5, step W^-1.5) with step = t (t >= 1)."""
  step = max(t, 1)
  return d_model**-0.5 * min(step**-0.5, step * W**-1.5)


def ref_cosine(t, v=0.8, T=100, alpha=0.1, e=2.0):
  c = 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
  return v * ((1 - alpha) * c**e + alpha)


def ref_warm_restarts(t, v=1.0, T0=10, mult=2, d=0.5, eta_min=0.01):
  """PyTorch's CosineAnnealingWarmRestarts bookkeeping, step by step, plus peak decay."""
  i, T_i, t_cur = 0, T0, t
  while t_cur >= T_i:
    t_cur -= T_i
    T_i *= mult
    i += 1
  peak = v * d**i
  return eta_min + (peak - eta_min) * (1 + math.cos(math.pi * t_cur / T_i)) / 2


def ref_linear_warmup_exponential(t, W=10, v=1.0, T=5, r=0.5):
  if t < W:
    return v * t / W
  return v * r ** ((t - W) / T)


OWN_CASES = [
  ("inverse_time", S.inverse_time_decay(0.5, 10, 2.0), ref_inverse_time, steps_around(10, end=100)),
  (
    "inverse_time_staircase",
    S.inverse_time_decay(0.5, 10, 2.0, staircase=True),
    lambda t: ref_inverse_time(t, staircase=True),
    steps_around(10, 20, end=100),
  ),
  (
    "inverse_sqrt",
    S.inverse_sqrt_schedule(1.0, 20),
    ref_inverse_sqrt,
    steps_around(20, 80, end=500),
  ),
  (
    "inverse_sqrt_transformer",
    S.inverse_sqrt_schedule(512**-0.5 * 40**-0.5, 40),
    ref_transformer,
    [t for t in steps_around(40, 160, end=1000) if t >= 1],
  ),
  (
    "cosine_floor_exponent",
    S.cosine_decay_schedule(0.8, 100, 0.1, 2.0),
    ref_cosine,
    steps_around(50, 100, end=100),
  ),
  (
    "warm_restarts",
    S.cosine_warm_restarts_schedule(1.0, 10, 2, 0.5, 0.01),
    ref_warm_restarts,
    steps_around(10, 30, 70, 150, 310, end=700),
  ),
  (
    "warm_restarts_constant_period",
    S.cosine_warm_restarts_schedule(1.0, 7, 1, 1.0, 0.0),
    lambda t: ref_warm_restarts(t, 1.0, 7, 1, 1.0, 0.0),
    steps_around(7, 14, 21, end=100),
  ),
  (
    "linear_warmup_of_exponential",
    S.linear_warmup(S.exponential_decay(1.0, 5, 0.5), 10),
    ref_linear_warmup_exponential,
    steps_around(10, 15, end=60),
  ),
  (
    "multiply",
    S.multiply_schedules(S.constant_schedule(2.0), S.inverse_time_decay(0.5, 10, 2.0)),
    lambda t: 2.0 * ref_inverse_time(t),
    steps_around(10, end=50),
  ),
  (
    "from_function",
    S.schedule_from_function(lambda t: 0.1 * jnp.exp(-t / 50.0)),
    lambda t: 0.1 * math.exp(-t / 50.0),
    steps_around(50, end=200),
  ),
]


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("name, schedule, formula, steps", OWN_CASES, ids=[c[0] for c in OWN_CASES])
def test_schedule_matches_its_formula(name, schedule, formula, steps, jit):
  expected = np.array([formula(t) for t in steps])
  assert_values(evaluate(schedule, steps, jit), expected, np.max(np.abs(expected)))


def test_sgdr_restarts_exactly_at_each_boundary():
  s = S.cosine_warm_restarts_schedule(1.0, 10, 2, 0.5, 0.0)
  starts = [0, 10, 30, 70, 150, 310, 630]
  for i, b in enumerate(starts):
    assert float(s(jnp.int32(b))) == pytest.approx(0.5**i, rel=1e-6)
    assert float(s(jnp.int32(b + 1))) < 0.5**i


def test_onecycle_anneals_far_below_the_start():
  s = S.cosine_onecycle_schedule(1000, 1.0, div_factor=25.0, final_div_factor=1e4)
  assert float(s(0)) == pytest.approx(1 / 25, rel=1e-6)
  assert float(s(300)) == pytest.approx(1.0, rel=1e-6)
  assert float(s(1000)) == pytest.approx(1 / 25 / 1e4, rel=1e-5)
  assert float(s(1000)) < float(s(0)) / 1000


@pytest.mark.parametrize(
  "build, match",
  [
    (lambda: S.warmup_cosine_decay_schedule(0.0, 1.0, 200, 100), "warmup .* shorter than the run"),
    (lambda: S.warmup_cosine_decay_schedule(0.0, 1.0, 100, 100), "warmup"),
    (lambda: S.cosine_decay_schedule(1.0, 0), "`decay_steps` must be > 0"),
    (lambda: S.exponential_decay(1.0, -5, 0.5), "`transition_steps`"),
    (lambda: S.exponential_decay(1.0, 5, 0.0), "`decay_rate`"),
    (lambda: S.polynomial_schedule(1.0, 0.0, 1.0, -1), "`transition_steps`"),
    (lambda: S.cosine_warm_restarts_schedule(1.0, 0), "`first_period`"),
    (lambda: S.cosine_warm_restarts_schedule(1.0, 10, period_mult=0.5), "`period_mult`"),
    (lambda: S.cosine_warm_restarts_schedule(1.0, 10, peak_decay=1.5), "`peak_decay`"),
    (lambda: S.cosine_onecycle_schedule(0, 1.0), "`transition_steps`"),
    (lambda: S.cosine_onecycle_schedule(100, 1.0, pct_start=1.2), "`pct_start`"),
    (lambda: S.linear_onecycle_schedule(100, 1.0, pct_start=0.5, pct_final=0.4), "`pct_final`"),
    (lambda: S.piecewise_constant_schedule(1.0, {10: -0.5}), "boundaries_and_scales"),
    (lambda: S.join_schedules([S.constant_schedule(1.0)] * 3, [10]), "need 2 boundaries"),
    (lambda: S.join_schedules([S.constant_schedule(1.0)] * 3, [10, 5]), "non-decreasing"),
    (lambda: S.inverse_sqrt_schedule(1.0, -1), "`warmup_steps`"),
    (lambda: S.linear_schedule(1.0, 0.0, 10.5), "whole number"),
    (lambda: S.constant_schedule("0.1"), "`value` must be a number"),
    (lambda: S.schedule_from_function(lambda t: jnp.ones(3) * t), "not a scalar"),
  ],
)
def test_bad_schedule_arguments_are_named(build, match):
  with pytest.raises((ValueError, TypeError), match=match):
    build()


def test_schedule_drives_an_optimizer_and_resumes_exactly():
  """Saving the state at step k and resuming gives the same learning rates afterwards."""
  s = S.warmup_cosine_decay_schedule(0.0, 0.1, 10, 60)
  tx = oc.sgd(s)
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.ones(3)}
  update = jax.jit(tx.update)
  state = tx.init(params)
  seen = []
  for t in range(40):
    if t == 17:
      saved = jax.tree.map(np.asarray, state)
    u, state = update(grads, state, params)
    seen.append(-float(u["w"][0]))
  state = jax.tree.map(jnp.asarray, saved)
  resumed = []
  for t in range(17, 40):
    u, state = update(grads, state, params)
    resumed.append(-float(u["w"][0]))
  assert resumed == seen[17:]
  np.testing.assert_allclose(seen, [float(s(t)) for t in range(40)], rtol=1e-6)


# The Optax-named schedules against their textbook formulas too (not only against Optax).
def ref_piecewise(t):
  return 0.5 * (0.1 if t >= 10 else 1.0) * (0.5 if t >= 25 else 1.0)


def ref_exponential_staircase(t, v=2.0, T=7, r=0.3, end=0.05):
  return max(v * r ** math.floor(t / T), end)


def ref_polynomial(t, v0=1.0, v1=0.1, p=2.0, T=50, begin=10):
  frac = 1 - min(max(t - begin, 0), T) / T
  return (v0 - v1) * frac**p + v1


def ref_warmup_cosine(t, v0=0.0, peak=1.0, W=20, T=200, end=1e-3):
  if t < W:
    return v0 + (peak - v0) * t / W
  tau = min(t - W, T - W)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * tau / (T - W)))


def ref_cosine_onecycle(t, T=100, peak=1.0, pct=0.3, div=25.0, final=1e4):
  lo, hi, end = peak / div, peak, peak / (div * final)
  up = int(pct * T)
  if t < up:
    return hi + (lo - hi) / 2 * (1 + math.cos(math.pi * t / up))
  if t < T:
    return end + (hi - end) / 2 * (1 + math.cos(math.pi * (t - up) / (T - up)))
  return end


def ref_linear_onecycle(t, T=100, peak=1.0, a=0.25, b=0.8, div=25.0, final=1e4):
  lo, end = peak / div, peak / (div * final)
  p1, p2 = int(a * T), int(b * T)
  if t < p1:
    return lo + (peak - lo) * t / p1
  if t < p2:
    return peak + (lo - peak) * (t - p1) / (p2 - p1)
  if t < T:
    return lo + (end - lo) * (t - p2) / (T - p2)
  return end


FORMULA_CASES = [
  (
    "piecewise_constant",
    S.piecewise_constant_schedule(0.5, {10: 0.1, 25: 0.5}),
    ref_piecewise,
    steps_around(10, 25, end=30),
  ),
  (
    "exponential_staircase_end",
    S.exponential_decay(2.0, 7, 0.3, staircase=True, end_value=0.05),
    ref_exponential_staircase,
    steps_around(7, 14, end=40),
  ),
  (
    "polynomial",
    S.polynomial_schedule(1.0, 0.1, 2.0, 50, 10),
    ref_polynomial,
    steps_around(10, 60, end=60),
  ),
  (
    "warmup_cosine",
    S.warmup_cosine_decay_schedule(0.0, 1.0, 20, 200, 1e-3),
    ref_warmup_cosine,
    steps_around(20, 110, 200, end=200),
  ),
  (
    "cosine_onecycle",
    S.cosine_onecycle_schedule(100, 1.0),
    ref_cosine_onecycle,
    steps_around(30, 100, end=100),
  ),
  (
    "linear_onecycle",
    S.linear_onecycle_schedule(100, 1.0, 0.25, 0.8),
    ref_linear_onecycle,
    steps_around(25, 80, 100, end=100),
  ),
]


@pytest.mark.parametrize(
  "name, schedule, formula, steps", FORMULA_CASES, ids=[c[0] for c in FORMULA_CASES]
)
def test_optax_named_schedule_matches_its_formula(name, schedule, formula, steps):
  expected = np.array([formula(t) for t in steps])
  assert_values(evaluate(schedule, steps, True), expected, np.max(np.abs(expected)))


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda: oc.linear_schedule(0.0, 0.1, -1), r"linear_schedule: `transition_steps` must be >= 0"),
    (
      lambda: oc.warmup_constant_schedule(0.0, 0.1, 0),
      r"warmup_constant_schedule: `warmup_steps` must be > 0, got 0 \(Optax's schedule would "
      r"stay at `init_value`.*constant_schedule\(peak_value\)",
    ),
    (lambda: oc.warmup_constant_schedule(0.0, "x", 4), r"warmup_constant_schedule: `peak_value`"),
  ],
)
def test_linear_and_warmup_constant_schedules_name_themselves_and_their_arguments(build, message):
  """Both were built on polynomial_schedule, whose name and argument their errors gave; a
  zero warmup, which Optax turns into init_value at every step, says what to use instead."""
  with pytest.raises((ValueError, TypeError), match=message):
    build()


def test_a_zero_step_warmup_joined_at_boundary_0_is_accepted_and_refused_where_used():
  """Hugging Face's Flax examples join ``linear_schedule(0, lr, warmup)`` and a decay at
  boundary ``warmup``, 0 by default. Optax's 0-step linear schedule stays at its start; unused
  there, it is accepted with Optax's values; given to a builder, or joined where it is used,
  it is refused (it would train at 0 forever)."""
  lr = 5e-5
  warm, decay = oc.linear_schedule(0.0, lr, 0), oc.linear_schedule(lr, 0.0, 100)
  joined = oc.join_schedules([warm, decay], [0])
  expected = [
    optax.join_schedules(
      [optax.linear_schedule(0.0, lr, 0), optax.linear_schedule(lr, 0.0, 100)], [0]
    )(t)
    for t in (0, 1, 50, 100)
  ]
  np.testing.assert_allclose([float(joined(t)) for t in (0, 1, 50, 100)], expected, rtol=1e-6)
  np.testing.assert_allclose(float(warm(7)), float(optax.linear_schedule(0.0, lr, 0)(7)))
  oc.adamw(joined)
  message = r"learning_rate`: linear_schedule with `transition_steps` = 0 stays at `init_value`"
  for build in (
    lambda: oc.adamw(warm),
    lambda: oc.sgd(oc.join_schedules([warm, decay], [10])),
    lambda: oc.sgd(oc.multiply_schedules(warm, decay)),
    lambda: oc.inject_hyperparams(oc.adamw)(learning_rate=warm),
  ):
    with pytest.raises(ValueError, match=message):
      build()
  oc.sgd(oc.linear_schedule(0.1, 0.1, 0))  # constant either way: nothing to refuse


def test_warmup_constant_schedule_takes_a_traced_warmup_length():
  """A warmup length passed through ``jit`` (accepted before its zero-warmup check) still
  gives the linear warmup's values."""
  value = jax.jit(lambda n: oc.warmup_constant_schedule(0.1, 1.0, n)(2))(4)
  np.testing.assert_allclose(float(value), 0.55, rtol=1e-6)


TAKEN_CASES = {
  "constant": lambda: oc.constant_schedule(0.3),
  "piecewise_constant": lambda: oc.piecewise_constant_schedule(1.0, {50: 0.1, 120: 3.0}),
  "exponential": lambda: oc.exponential_decay(1.0, 20, 0.5, 10, end_value=0.05),
  "exponential_growth": lambda: oc.exponential_decay(0.1, 20, 1.5, end_value=0.9),
  "exponential_negative": lambda: oc.exponential_decay(-1.0, 10, 0.5, end_value=-2.0),
  "exponential_staircase": lambda: oc.exponential_decay(1.0, 7, 0.9, 5, staircase=True),
  "inverse_time": lambda: oc.inverse_time_decay(1.0, 10, 0.5),
  "inverse_sqrt": lambda: oc.inverse_sqrt_schedule(1.0, 30, 0.1),
  "polynomial": lambda: oc.polynomial_schedule(1.0, 0.2, 2.0, 100, 10),
  "cosine": lambda: oc.cosine_decay_schedule(0.8, 150, alpha=0.1, exponent=2.0),
  "warmup_cosine": lambda: oc.warmup_cosine_decay_schedule(0.05, 1.0, 20, 150, 0.1),
  "warmup_exponential": lambda: oc.warmup_exponential_decay_schedule(0.0, 1.0, 20, 30, 0.5),
  "warmup_constant": lambda: oc.warmup_constant_schedule(0.0, 0.7, 25),
  "restarts": lambda: oc.cosine_warm_restarts_schedule(1.0, 30, 2.0, 0.5, 0.05),
  "sgdr": lambda: oc.sgdr_schedule(
    [dict(init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=60, end_value=0.1)] * 2
  ),
  "interpolate": lambda: oc.piecewise_interpolate_schedule("cosine", 1.0, {40: 0.5, 90: 4.0}),
  "cosine_onecycle": lambda: oc.cosine_onecycle_schedule(150, 1.0),
  "linear_onecycle": lambda: oc.linear_onecycle_schedule(150, 1.0),
  "linear_warmup": lambda: oc.linear_warmup(oc.cosine_decay_schedule(1.0, 100, 0.2), 20, 0.3),
  "join": lambda: oc.join_schedules(
    [oc.linear_schedule(0.0, 1.0, 10), oc.exponential_decay(1.0, 10, 0.8)], [10]
  ),
}


@pytest.mark.parametrize("name", sorted(TAKEN_CASES))
def test_every_value_a_schedule_takes_lies_between_the_values_it_records(name):
  """What a builder checks besides step 0's value (a schedule's start, peak, floor and end,
  or the limit it decays toward) bounds every value the schedule takes: evaluated at every
  step of its run and far beyond, in float64."""
  from optcompose.core import TAKEN

  with x64():
    schedule = TAKEN_CASES[name]()
    taken = np.asarray(getattr(schedule, TAKEN), np.float64)
    counts = np.concatenate([np.arange(400), [10_000, 1_000_000]])
    values = np.asarray(jax.vmap(schedule)(jnp.asarray(counts, jnp.int32)), np.float64)
  assert values.min() >= taken.min() - 1e-12 and values.max() <= taken.max() + 1e-12, (
    values.min(),
    values.max(),
    taken,
  )


@pytest.mark.parametrize(
  "build, name, value",
  [
    (lambda: oc.sgd(oc.warmup_cosine_decay_schedule(0.0, -0.1, 5, 50)), "learning_rate", -0.1),
    (lambda: oc.sgd(oc.cosine_decay_schedule(0.1, 50, alpha=-1.0)), "learning_rate", -0.1),
    (
      lambda: oc.sgd(
        oc.join_schedules([oc.constant_schedule(0.1), oc.constant_schedule(-0.1)], [10])
      ),
      "learning_rate",
      -0.1,
    ),
    (lambda: oc.adam(1e-3, b1=oc.linear_schedule(0.5, 1.0, 100)), "b1", 1.0),
    (lambda: oc.adamw(1e-3, weight_decay=oc.linear_schedule(0.0, -0.1, 100)), "weight_decay", -0.1),
    (lambda: oc.scale_by_adam(b1=oc.linear_schedule(0.9, 1.0, 100)), "b1", 1.0),
    (lambda: oc.clip_by_global_norm(oc.linear_schedule(1.0, -1.0, 100)), "max_norm", -1.0),
    (  # Optax's idiom: the schedule given to inject_hyperparams
      lambda: oc.inject_hyperparams(oc.adam)(
        learning_rate=oc.cosine_decay_schedule(1e-3, 100), b1=oc.linear_schedule(0.9, 1.0, 10)
      ),
      "b1",
      1.0,
    ),
  ],
)
def test_a_schedule_that_leaves_the_range_later_is_refused_when_built(build, name, value):
  """Optax trains these by gradient ascent (or with b1 = 1, a frozen momentum) once the
  schedule gets there; the value is known from the schedule's own arguments, so the builder
  refuses it, naming the argument and the value."""
  with pytest.raises(
    ValueError,
    match=rf"^(sgd|adam|adamw|scale_by_adam|clip_by_global_norm): `{name}` must lie in "
    rf".*got {value!r}\. The schedule given as `{name}` takes that value",
  ):
    build()


def test_inject_hyperparams_does_not_pair_one_schedules_end_with_anothers_start():
  """``eps`` decaying to 0 while ``eps_root`` rises from 0: never both 0, so accepted, as
  ``adam`` given the schedules accepts them; a constant ``eps_root`` of 0 beside an ``eps``
  reaching 0 is refused."""
  eps, eps_root = oc.linear_schedule(1e-8, 0.0, 100), oc.linear_schedule(0.0, 1e-8, 100)
  params = {"w": jnp.zeros(3)}
  for tx in (
    oc.inject_hyperparams(oc.adam)(learning_rate=1e-3, eps=eps, eps_root=eps_root),
    oc.adam(1e-3, eps=eps, eps_root=eps_root),
  ):
    assert np.isfinite(np.asarray(tx.update(params, tx.init(params), params)[0]["w"])).all()
  with pytest.raises(ValueError, match=r"both 0.*The schedule given as `eps` takes that value"):
    oc.inject_hyperparams(oc.adam)(learning_rate=1e-3, eps=eps, eps_root=0.0)


def test_a_function_of_the_users_is_checked_at_step_0_only():
  """A plain function records nothing: a schedule written for the run's length may leave the
  range after it (``lr * (1 - t / T)``), which is the user's business, as in Optax."""
  tx = oc.sgd(lambda count: 0.1 * (1 - jnp.asarray(count, jnp.float32) / 100))
  tx.init({"w": jnp.ones(3)})  # no error


def test_a_join_is_bounded_by_what_each_piece_takes_while_used():
  """A piece cut off by the next boundary is bounded by the values it takes before it, not
  by all it would take later: a growth used for 100 steps then held at 0.9 never passes 0.9
  (it recorded the largest float), and an eps decaying toward 0 over 2000 steps but used
  for 1000 never reaches 0. Both are built; the same pieces left to run on are refused."""
  growth = oc.exponential_decay(0.5, 100, 1.8)  # 0.5 * 1.8^(t/100): 0.9 at step 100
  params = {"w": jnp.ones(3)}
  for tx in (
    oc.scale_by_adam(b1=oc.join_schedules([growth, oc.constant_schedule(0.9)], [100])),
    oc.adam(
      1e-3,
      eps=oc.join_schedules(
        [oc.cosine_decay_schedule(1e-6, 2000), oc.constant_schedule(1e-8)], [1000]
      ),
    ),
  ):
    assert np.isfinite(np.asarray(tx.update(params, tx.init(params), params)[0]["w"])).all()
  with pytest.raises(ValueError, match="grows without bound"):
    oc.scale_by_adam(b1=growth)
  with pytest.raises(ValueError, match="both 0"):
    oc.adam(1e-3, eps=oc.cosine_decay_schedule(1e-6, 2000))


def test_schedules_whose_values_stay_in_range_are_built():
  """No false refusal: an eps that must be > 0 decaying toward 0 without reaching it within
  the int32 count (inverse-time), a constant exponential (rate 1), an unbounded growth of a
  learning rate (it records the largest float, and a learning rate has no upper bound), a
  schedule between two equal boundaries (never used), a product that underflows to 0 (0 is
  in range), a momentum rising to 1, and schedules built from traced values (a sweep over
  restarts' peak_decay)."""
  params = {"w": jnp.ones(3)}
  for tx in (
    oc.rmsprop(1e-3, eps=oc.inverse_time_decay(1e-6, 100, 1.0)),
    oc.inject_hyperparams(oc.rmsprop)(
      learning_rate=1e-3, eps=oc.inverse_time_decay(1e-6, 100, 1.0)
    ),
    oc.rmsprop(1e-3, eps=oc.exponential_decay(1e-6, 100, 1.0)),
    oc.sgd(oc.exponential_decay(1e-3, 100, 1.5)),
    oc.sgd(
      oc.join_schedules(
        [oc.constant_schedule(0.1), oc.constant_schedule(-5.0), oc.constant_schedule(0.2)], [10, 10]
      )
    ),
    oc.sgd(oc.piecewise_constant_schedule(1e-3, {100: 1e-30, 200: 1e-30})),
    oc.sgd(0.1, momentum=oc.linear_schedule(0.5, 1.0, 100)),
    oc.sgd(oc.cosine_warm_restarts_schedule(0.1, 10, 2.0, 0.5)),
  ):
    tx.update(params, tx.init(params), params)

  def run(decay):
    tx = oc.adam(oc.cosine_warm_restarts_schedule(0.1, 10, peak_decay=decay))
    return tx.update(params, tx.init(params), params)[0]["w"].sum()

  assert np.isfinite(float(jax.jit(run)(0.5)))
  with pytest.raises(ValueError, match=r"rmsprop: `eps` must lie in \(0, inf\), got 0.0"):
    oc.rmsprop(1e-3, eps=oc.exponential_decay(1e-6, 100, 0.5))  # underflows to 0: reached


# ---------------------------------------------------------------------------------------------
# Warm restarts with a non-integer period_mult: the cycle of every integer step (issue: the
# float32 starts T0 (m^i - 1) / (m - 1) came out above whole steps such as 10 and 21, so the
# restart step stayed in the previous cycle).


def exact_cycle_starts(T0, m, last):
  """The cycle starts S_i = T0 + T0 m + ... + T0 m^(i-1), in exact rational arithmetic with
  m as written in decimal (1.1 = 11/10), up to the first one beyond ``last``."""
  from fractions import Fraction

  m, starts, period = Fraction(str(m)), [Fraction(0)], Fraction(T0)
  while starts[-1] <= last:
    starts.append(starts[-1] + period)
    period *= m
  return starts


def ref_restarts_values(steps, T0, m, d):
  """float64 values from the exact starts: t in cycle i when S_i <= t < S_{i+1}."""
  import math

  starts = exact_cycle_starts(T0, m, int(np.max(steps)))
  first_steps = np.array([math.ceil(s) for s in starts], np.int64)  # exact ceilings
  i = np.searchsorted(first_steps, steps, side="right") - 1
  start = np.array([float(s) for s in starts])[i]
  tau = (steps - first_steps[i]) + (first_steps[i] - start)  # exact offset, as float64
  period = T0 * float(m) ** i
  return d**i * 0.5 * (1 + np.cos(np.pi * tau / period)), first_steps


RESTART_GRID = [
  (T0, m) for T0 in (1, 3, 10, 100) for m in (1.05, 1.1, 1.2, 1.25, 1.5, 1.6, 1.7, 2.0, 2.5, 3.0)
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_warm_restarts_put_every_step_in_its_cycle(dtype):
  steps = np.arange(0, 3000)
  wrong = {}
  with x64() if dtype == "float64" else contextlib.nullcontext():
    for T0, m in RESTART_GRID:
      s = S.cosine_warm_restarts_schedule(1.0, T0, period_mult=m, peak_decay=0.97)
      out = jax.jit(jax.vmap(s))(jnp.asarray(steps, jnp.int32))
      assert out.dtype == jnp.dtype(dtype)  # (not called eagerly: 0.4 s of op-by-op dispatch)
      ours = np.asarray(out, np.float64)
      ref, _ = ref_restarts_values(steps, T0, m, 0.97)
      bad = steps[np.abs(ours - ref) > (1e-12 if dtype == "float64" else 2e-6)]
      if bad.size:
        wrong[(T0, m)] = bad[:5].tolist()
  assert not wrong  # before the fix: {(10, 1.1): [10, 21, 1211], (100, 1.2): [100, 220, 364], ...}


def test_warm_restarts_place_whole_float_and_narrow_integer_counts_as_int32_ones():
  # Float counts went through the float estimate (10.0 in the previous cycle for T0=10,
  # m=1.1), and an int8 count cast the table of first steps to int8 (wrapped, unsorted).
  s = S.cosine_warm_restarts_schedule(1.0, 10, period_mult=1.1)
  steps = np.array([9, 10, 11, 20, 21, 22, 100, 127, 1210, 1211])
  ref = np.asarray(jax.vmap(s)(jnp.asarray(steps, jnp.int32)))
  ref_values, _ = ref_restarts_values(steps, 10, 1.1, 1.0)
  np.testing.assert_allclose(ref, ref_values, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(jax.vmap(s)(jnp.asarray(steps, jnp.float32))), ref)
  for dtype in (jnp.int8, jnp.uint8, jnp.int16):
    small = steps[steps <= 127]
    np.testing.assert_array_equal(
      np.asarray(jax.vmap(s)(jnp.asarray(small, dtype))), ref[: len(small)], err_msg=str(dtype)
    )
  assert 0.99 < float(s(jnp.float32(10.5))) < 1.0  # a fractional count: just past the restart


@pytest.mark.parametrize("T0, m", [(10, 1.1), (100, 1.2), (7, 1.7), (1, 2.0), (3, 1.05)])
def test_warm_restarts_restart_at_every_cycle_start_up_to_the_last_int32_count(T0, m):
  """In float32, at each cycle's first step up to 2**31 - 1 the value is back at the peak
  and one step earlier it is at the end of the previous cycle, as in exact arithmetic."""
  _, first_steps = ref_restarts_values(np.array([2**31 - 1]), T0, m, 1.0)
  first_steps = first_steps[(first_steps >= 1000) & (first_steps <= 2**31 - 1)]
  steps = np.concatenate([first_steps - 1, first_steps])
  ref, _ = ref_restarts_values(steps, T0, m, 1.0)
  s = S.cosine_warm_restarts_schedule(1.0, T0, period_mult=m)
  ours = np.asarray(jax.jit(jax.vmap(s))(jnp.asarray(steps, jnp.int32)), np.float64)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
  if m == 2.0:  # starts 2^i - 1: the last int32 count is a restart
    assert float(s(jnp.int32(2**31 - 1))) == 1.0


def test_warm_restarts_beyond_the_tabulated_cycles_use_the_float_estimate(monkeypatch):
  """Cycles past the table (period_mult within ~1e-3 of 1) continue from the float estimate,
  exact in float64."""
  from optcompose.schedules import _restarts

  monkeypatch.setattr(_restarts, "_TABULATED", 8)
  steps = np.arange(0, 3000)
  with x64():
    s = S.cosine_warm_restarts_schedule(1.0, 10, period_mult=1.1, peak_decay=0.97)
    ours = np.asarray(jax.jit(jax.vmap(s))(jnp.asarray(steps, jnp.int32)))
  ref, _ = ref_restarts_values(steps, 10, 1.1, 0.97)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_sgdr_schedule_names_the_cycle_missing_an_argument():
  good = dict(init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=30)
  with pytest.raises(
    TypeError, match=r"sgdr_schedule: cycle 1 \(`cosine_kwargs\[1\]`\): .*decay_steps"
  ):
    S.sgdr_schedule([good, dict(init_value=0.0, peak_value=1.0, warmup_steps=5)])
  with pytest.raises(ValueError, match=r"sgdr_schedule: cycle 0 .*warmup .* shorter than the run"):
    S.sgdr_schedule([dict(good, warmup_steps=40)])


@pytest.mark.parametrize(
  "make",
  [
    lambda v, n: oc.linear_schedule(v, 0.0, n),
    lambda v, n: oc.linear_schedule(v, 0.0, n, transition_begin=n // 3),
    lambda v, n: oc.polynomial_schedule(v, 0.0, 1.0, n),
    lambda v, n: oc.polynomial_schedule(v, 0.0, 2.0, n, n // 2),
    lambda v, n: oc.join_schedules(
      [oc.linear_schedule(0.0, v, n // 2), oc.linear_schedule(v, 0.0, n)], [n // 2]
    ),
  ],
  ids=["linear", "linear-begin", "polynomial", "polynomial-squared", "join"],
)
def test_a_decay_to_zero_reaches_zero_exactly_and_stays_there_under_jit(make):
  """Compiled, the fraction ``1 - t / T`` is a product by 1/T that a fused multiply-add
  left just below 0 at the end, on some CPUs: under jit, linear_schedule(0.1, 0.0, 10) was
  -1.5e-9 from step 10 on (Optax's too), a gradient ascent step (the sweep trial). The
  fraction is clipped to [0, 1]: every value lies between the two ends."""
  for value in (0.1, 3e-4):
    for n in (10, 1000):
      schedule = make(value, n)
      counts = jnp.concatenate([jnp.arange(0, 2 * n + 5), jnp.array([2**31 - 1])]).astype(jnp.int32)
      taken = np.asarray(jax.jit(jax.vmap(schedule))(counts))
      assert taken.min() >= 0.0 and taken.max() <= value, (value, n, taken.min(), taken.max())
      assert (taken[2 * n :] == 0.0).all(), (value, n, taken[2 * n :].min())


@pytest.mark.parametrize(
  "build, values",
  [
    (lambda v: oc.warmup_cosine_decay_schedule(0.0, v, 10, 100, 1e-4), [0.1, 3e-4, 1.0]),
    (lambda v: oc.exponential_decay(0.1, 10, v, end_value=0.05), [0.5, 0.9]),
    (lambda v: oc.exponential_decay(0.1, 10, v, end_value=0.5), [1.5, 2.0]),
    (lambda v: oc.cosine_decay_schedule(0.1, v, 0.1), [30, 100]),
  ],
  ids=["warmup-cosine-peak", "exponential-rate-down", "exponential-rate-up", "cosine-length"],
)
def test_a_sweep_over_a_schedule_argument_under_vmap_equals_each_schedule_alone(build, values):
  """The common sweep, a vmap over the peak of warmup_cosine_decay_schedule, raised JAX's
  TracerBoolConversionError (the sweep trial): the ratio end / peak is taken traced."""
  counts = jnp.arange(0, 130, dtype=jnp.int32)
  swept = jax.vmap(lambda v: jax.vmap(build(v))(counts))(jnp.asarray(values))
  for row, v in zip(np.asarray(swept), values):
    alone = np.asarray(jax.vmap(build(v))(counts))
    np.testing.assert_allclose(row, alone, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
  "build, names",
  [
    (lambda w: oc.warmup_cosine_decay_schedule(0.0, 0.1, w, 100), "`warmup_steps` is"),
    (lambda w: oc.cosine_onecycle_schedule(100, 0.1, pct_start=w / 100), "`pct_start` is"),
    (lambda w: oc.cosine_warm_restarts_schedule(0.1, w, 2.0), "`first_period` is"),
    (lambda w: oc.join_schedules([oc.constant_schedule(1.0)] * 2, [w]), "`boundaries` is"),
    (  # the peak may be traced, the warmup may not: which one is needed is not claimed
      lambda w: oc.warmup_cosine_decay_schedule(0.0, w / 100, w, 100),
      "`peak_value`, `warmup_steps` are",
    ),
  ],
  ids=["warmup", "onecycle", "restarts", "join", "two-traced"],
)
def test_a_traced_argument_a_schedule_needs_the_value_of_is_named(build, names):
  """Arguments that place a boundary are needed as numbers to build the schedule; traced,
  JAX's error named none of them (15 arguments, the sweep trial)."""
  needs = "its value" if names.endswith("is") else "the value of one or more of them"
  with pytest.raises(TypeError, match=f"{names} traced .* needs {needs}.* multiply_schedules"):
    jax.vmap(lambda w: build(w)(jnp.int32(5)))(jnp.asarray([10, 20]))
