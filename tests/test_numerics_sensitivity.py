"""The comparisons of tests/numerics.py are tight enough to catch a wrong formula.

Each planted change is a real mistake a contributor could make (the formula spelled with
public pieces, so the library itself stays right); the same comparison test_parity.py runs
on every registry case must reject it, on every CPU. That the *right* formula passes on
every CPU is what ``make test``'s runs under ``--xla_cpu_max_isa=AVX2`` and ``SSE4_2`` show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import (
  F64_RTOL,
  assert_rel_close,
  assert_ulps_close,
  lockstep,
  standard_promotion,
  ulp_distance,
  x64,
)
from problems import mlp, quadratic, run
from registry import CASES

pytestmark = pytest.mark.numerics
LR = 1e-2

PLANTED = {  # name: (the planted formula, the reference, the registry case it imitates)
  # eps inside the square root: m / sqrt(v + eps^2) instead of m / (sqrt(v) + eps).
  "adam eps inside sqrt": (
    lambda: oc.adam(LR, eps=0.0, eps_root=1e-16),
    lambda: optax.adam(LR),
    "adam",
  ),
  # AdamW's decay added after the learning-rate step instead of before it.
  "adamw decay after lr": (
    lambda: oc.chain(
      oc.scale_by_adam(), oc.scale_by_learning_rate(LR), oc.add_decayed_weights(0.1)
    ),
    lambda: optax.adamw(LR, weight_decay=0.1),
    "adamw",
  ),
  # RMSProp's eps outside the square root.
  "rmsprop eps outside sqrt": (
    lambda: oc.rmsprop(LR, eps=1e-8, eps_in_sqrt=False),
    lambda: optax.rmsprop(LR, eps=1e-8),
    "rmsprop",
  ),
  # Nesterov momentum where heavy ball was asked for.
  "sgd nesterov for heavy ball": (
    lambda: oc.sgd(LR, 0.9, nesterov=True),
    lambda: optax.sgd(LR, 0.9),
    "sgd_momentum",
  ),
}


@pytest.mark.parametrize("name", PLANTED)
@pytest.mark.float64
def test_float64_trajectory_catches_a_planted_formula_change(name):
  ours, ref, _ = PLANTED[name]
  with x64():
    prob = mlp(jnp.float64)
    a, _ = run(ours(), prob, 200, True, oc.apply_updates)
    b, _ = run(standard_promotion(ref()), prob, 200, True, optax.apply_updates)
    # The same comparison test_parity.py makes, at the same tolerance, fails...
    with pytest.raises(AssertionError):
      for x, y in zip(a, b):
        assert_rel_close(x, y, F64_RTOL)
    # ... by orders of magnitude, not by a rounding accident.
    worst = max(
      np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
      / max(np.max(np.abs(np.asarray(y))), 1e-3)
      for pa, pb in zip(a, b)
      for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))
    )
    assert worst > 1e3 * F64_RTOL


# float32 cannot resolve eps = 1e-8 next to sqrt(v) ~ 1e-2..1 (its epsilon is 1.2e-7): moving
# eps into the square root moves a float32 step by ~3 ulps here, which is rounding's size.
# That is why formulas are proved in float64; the float32 comparisons catch what float32 can
# see.
VISIBLE_IN_FLOAT32 = [n for n in PLANTED if n != "adam eps inside sqrt"]


@pytest.mark.parametrize("name", VISIBLE_IN_FLOAT32)
def test_float32_steps_catch_a_planted_formula_change(name):
  ours, ref, case = PLANTED[name]
  bound = next(c for c in CASES if c.name == case).f32_ulps
  worst = max(
    max(ulp_distance(x, y) for x, y in zip(jax.tree.leaves(uo), jax.tree.leaves(ur)))
    for _, uo, ur, _ in lockstep(
      ours(), standard_promotion(ref()), quadratic(), 30, True, optax.apply_updates
    )
  )
  assert worst > 10 * bound  # the registry's float32 bound for the case it imitates


def test_ulps_are_counted_at_the_leaf_magnitude():
  x = np.array([1.0, 1e-3, 0.0], np.float32)
  eps32 = float(np.finfo(np.float32).eps)
  assert ulp_distance(x, x) == 0.0
  assert ulp_distance(x + np.array([0, 0, 2 * eps32], np.float32), x) == pytest.approx(2.0)
  assert ulp_distance(x * (1 + 4 * eps32), x) == pytest.approx(4.0, rel=0.1)
  with pytest.raises(AssertionError, match="ulps apart"):
    assert_ulps_close({"w": x * (1 + 16 * eps32)}, {"w": x}, 8)
  with pytest.raises(AssertionError, match="dtype float32, expected float64"):
    assert_ulps_close({"w": x}, {"w": x.astype(np.float64)}, 8)
  with pytest.raises(AssertionError, match="dtype float64, expected float32"):
    assert_ulps_close({"w": x.astype(np.float64)}, {"w": x}, 8, dtype=np.float32)
