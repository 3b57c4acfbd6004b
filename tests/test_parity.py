"""Every registry case against its reference (Optax, or a NumPy step), on two problems.

How (tests/numerics.py):
- float64: 200-step jitted trajectories equal the reference's to ``F64_RTOL``, which only
  rounding meets: this proves the formula, its bias correction, schedules and state.
- float32, jitted and eager, and bfloat16: per step from identical inputs (``lockstep``),
  the updates agree to a few epsilons at the leaf's magnitude. No bitwise claim: ours and
  Optax's are two programs, and XLA rounds them differently on different CPUs.
"""

from __future__ import annotations

import functools
import itertools
import os

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
  x64,
)
from problems import mlp, quadratic, run
from registry import CASES

STEPS = 200  # float64 trajectories: bias correction, the warmup and the whole cosine decay
F32_STEPS = 100  # per-step float32 comparisons (jitted), from identical inputs
EAGER_STEPS = 30  # the same, op by op (eager JAX dispatches every operation: slow)
pytestmark = pytest.mark.numerics
# Optax's apply_updates adds float32 updates to bfloat16 or float16 params implicitly.
OPTAX_APPLY = standard_promotion(optax.apply_updates)


@functools.cache
def problem(name, dtype=jnp.float32):
  return {"quadratic": quadratic, "mlp": mlp}[name](dtype)


OPTAX_CASES = [c for c in CASES if c.optax is not None]
NUMPY_CASES = [c for c in CASES if c.numpy_step is not None]


def by_case(cases, *axes):
  """Parameters grouped per case on one xdist worker (its compiled functions are reused)."""
  return [
    pytest.param(
      c, *rest, id="-".join([c.name, *map(str, rest)]), marks=pytest.mark.xdist_group(c.name)
    )
    for c in cases
    for rest in itertools.product(*axes)
  ]


def ours_and_ref_f64(case, problem_name):
  with x64():
    prob = problem(problem_name, jnp.float64)
    # (jit_apply: the harness's apply_updates as one jitted call, not op by op; same sums.)
    ours, _ = run(case.ours(), prob, STEPS, True, oc.apply_updates, case.with_value, jit_apply=True)
    ref, _ = run(case.optax(), prob, STEPS, True, OPTAX_APPLY, case.with_value, jit_apply=True)
    return prob, ours, ref


def trajectories_within(ours, ref, rtol) -> bool:
  """``assert_rel_close``'s bound at every step, evaluated on all steps at once: True only
  where every step would pass it (same trees and shapes, finite values, each leaf within
  ``rtol`` of its step's largest reference magnitude); anything else (a failure, a NaN, an
  empty leaf) is left to the step-by-step assertions."""
  steps = min(len(ours), len(ref))
  flat_a = [jax.tree.flatten(a) for a in ours[:steps]]
  flat_d = [jax.tree.flatten(d) for d in ref[:steps]]
  if not steps or any(
    ta != flat_d[0][1] or td != flat_d[0][1] for (_, ta), (_, td) in zip(flat_a, flat_d)
  ):
    return False
  for i in range(len(flat_d[0][0])):
    a = [np.asarray(leaves[i], np.float64) for leaves, _ in flat_a]
    d = [np.asarray(leaves[i], np.float64) for leaves, _ in flat_d]
    if len({x.shape for x in a + d}) != 1 or not d[0].size:
      return False
    a, d = np.stack(a), np.stack(d)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(d))):
      return False
    axes = tuple(range(1, d.ndim))
    scale = np.maximum(np.max(np.abs(d), axis=axes), 1e-3)
    if not np.all(np.max(np.abs(a - d), axis=axes) <= rtol * scale):
      return False
  return True


def assert_trajectories_close(ours, ref, rtol):
  if trajectories_within(ours, ref, rtol):
    return
  for t, (a, b) in enumerate(zip(ours, ref)):
    assert_rel_close(a, b, rtol, what=f"step {t}:")


# On the MLP only (several leaves, biases and matrices, a moving equilibrium): the float32
# and bfloat16 per-step comparisons below run on both problems. (Compiling the two updates is
# most of a case's cost: the expensive matrix runs once.)
@pytest.mark.parametrize("case, problem_name", by_case(OPTAX_CASES, ("mlp",)))
@pytest.mark.float64
def test_float64_trajectory_matches_optax(case, problem_name):
  prob, ours, ref = ours_and_ref_f64(case, problem_name)
  for leaf in jax.tree.leaves(ours[-1]):
    assert leaf.dtype == jnp.float64
  assert_trajectories_close(ours, ref, case.f64_rtol)
  # The problem is actually being optimised: the comparison is not between two frozen runs.
  with x64():
    assert float(prob.loss(ours[-1])) != float(prob.loss(prob.params))


def assert_lockstep(case, prob, steps, jit, ulps):
  moved = False
  for t, u_ours, u_ref, params in lockstep(
    case.ours(),
    case.optax(),
    prob,
    steps,
    jit,
    OPTAX_APPLY,
    case.with_value,
    jit_ref=jit or case.slow_eager_ref,
    jit_apply=jit,
  ):
    # Our updates keep the parameters' dtype. Optax's are promoted to float32 when a
    # float32 schedule value multiplies bfloat16 parameters (add_decayed_weights with a
    # schedule); its apply_updates rounds them back, so compare what it would apply.
    for u in jax.tree.leaves(u_ours):
      assert u.dtype == jax.tree.leaves(params)[0].dtype
    u_ref = jax.tree.map(lambda r, o: r.astype(o.dtype), u_ref, u_ours)
    assert_ulps_close(u_ours, u_ref, ulps, what=f"step {t}: ")
    moved |= any(bool(np.any(np.asarray(u) != 0)) for u in jax.tree.leaves(u_ref))
  assert moved, "the reference never moved: nothing was compared"


# Jitted on the MLP (four leaves: matrices and biases, a moving equilibrium); eagerly (op by
# op: slow) on the quadratic, for the cases marked eager (tests/registry.py). The quadratic's
# jitted runs are the bfloat16 and float16 tests below.
F32_PARAMS = [
  p
  for p in by_case(
    [c for c in OPTAX_CASES if c.f32_like_optax], ("quadratic", "mlp"), ("jit", "eager")
  )
  if (p.values[1], p.values[2]) == ("mlp", "jit")
  or (p.values[1], p.values[2]) == ("quadratic", "eager")
  and p.values[0].eager
]


@pytest.mark.parametrize("case, problem_name, jit", F32_PARAMS)
def test_float32_steps_match_optax(case, problem_name, jit):
  jit = jit == "jit"
  prob = problem(problem_name)
  assert_lockstep(case, prob, F32_STEPS if jit else EAGER_STEPS, jit, case.f32_ulps)


@pytest.mark.parametrize(
  "case", [c for c in OPTAX_CASES if c.bf16_like_optax], ids=lambda c: c.name
)
def test_bfloat16_steps_match_optax(case):
  prob = problem("quadratic", jnp.bfloat16)
  for leaf in jax.tree.leaves(prob.params):
    assert leaf.dtype == jnp.bfloat16
  assert_lockstep(case, prob, 50, True, case.half_ulps)


# float16: our second-moment statistics are computed and stored in float32 (Optax's are not;
# a documented difference: in float16, eps = 1e-8 is 0 and a zero gradient gives NaN, and a
# small gradient's square is 0), so Optax is the reference only where no second moment is
# involved (tests/test_low_precision_state.py checks float16 against float32).
SECOND_MOMENT = (
  "adam",
  "belief",
  "adan",
  "named_chain",
  "rms",
  "rss",
  "stddev",
  "adagrad",
  "second_moment",
  "l2",
  "masked",
  "partition",
  "inject",
  "multi_steps",
  "apply_if_finite",
  "ema_params",
  "lookahead",
  "diagnostics",
  "adadelta",
  "novograd",
  "sm3",
)
FLOAT16_CASES = [
  c for c in OPTAX_CASES if c.bf16_like_optax and not any(s in c.name for s in SECOND_MOMENT)
]
NO_F16C = "xla_cpu_max_isa=SSE" in os.environ.get("XLA_FLAGS", "")


@pytest.mark.skipif(NO_F16C, reason="XLA CPU cannot compile float16 arithmetic without F16C")
@pytest.mark.parametrize("case", FLOAT16_CASES, ids=lambda c: c.name)
def test_float16_steps_match_optax(case):
  prob = problem("quadratic", jnp.float16)
  for leaf in jax.tree.leaves(prob.params):
    assert leaf.dtype == jnp.float16
  assert_lockstep(case, prob, 50, True, case.half_ulps)


@pytest.mark.parametrize("case", [c for c in OPTAX_CASES if c.same_state], ids=lambda c: c.name)
def test_state_has_optax_shapes_and_dtypes(case):
  params = problem("mlp").params
  grads = jax.tree.map(jnp.ones_like, params)

  def stepped_state(tx):
    """The state after one step, abstractly (shapes and dtypes, nothing computed)."""
    extra = {"value": jnp.float32(1.0)} if case.with_value else {}
    return jax.eval_shape(lambda p, g: tx.update(g, tx.init(p), p, **extra)[1], params, grads)

  injected = (oc.InjectHyperparamsState, optax.InjectHyperparamsState)

  def strip(state):
    """Our scheduled states also record the values in force (one scalar per scheduled
    hyperparameter, for logging); apart from those, the leaves are Optax's. (Both sides'
    injected states are stripped alike.)"""
    return jax.tree.map(
      lambda s: (s.count, strip(s.inner_state)) if isinstance(s, injected) else s,
      state,
      is_leaf=lambda s: isinstance(s, injected),
    )

  def signature(state):
    return [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(state)]

  assert signature(strip(stepped_state(case.ours()))) == signature(
    strip(stepped_state(case.optax()))
  )


def numpy_trajectory(step, prob, steps):
  """The NumPy step in float64, fed the problem's gradients at its own iterates."""
  dtype = jax.tree.leaves(prob.params)[0].dtype
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), prob.params)
  path = []
  for t in range(steps):
    g = prob.grad(jax.tree.map(lambda a: jnp.asarray(a, dtype), w), t)
    w = jax.tree.map(lambda wi, gi, t=t: step(wi, np.asarray(gi, np.float64), t), w, g)
    path.append(w)
  return path


@pytest.mark.parametrize("case, problem_name", by_case(NUMPY_CASES, ("quadratic", "mlp")))
@pytest.mark.float64
def test_float64_trajectory_matches_numpy(case, problem_name):
  with x64():
    prob = problem(problem_name, jnp.float64)
    ours, _ = run(case.ours(), prob, STEPS, True, oc.apply_updates)
    ref = numpy_trajectory(case.numpy_step, prob, STEPS)
  assert_trajectories_close(ours, ref, F64_RTOL)


@pytest.mark.parametrize(
  "case, problem_name, jit", by_case(NUMPY_CASES, ("quadratic", "mlp"), ("jit", "eager"))
)
def test_float32_steps_match_numpy(case, problem_name, jit):
  """Per step: our new parameters against the NumPy step (float64) from the same float32
  parameters and gradients, to a few float32 epsilons at the size of the operands (|w| and
  the step: a soft-threshold can cancel them down to ~0)."""
  jit = jit == "jit"
  prob = problem(problem_name)
  tx = case.ours()
  params, state = prob.params, tx.init(prob.params)
  update = jax.jit(tx.update) if jit else tx.update
  for t in range(F32_STEPS if jit else EAGER_STEPS):
    g = prob.grad(params, t)
    u, state = update(g, state, params)
    new = oc.apply_updates(params, u)
    for w, gi, ours in zip(jax.tree.leaves(params), jax.tree.leaves(g), jax.tree.leaves(new)):
      w = np.asarray(w, np.float64)
      expected = case.numpy_step(w, np.asarray(gi, np.float64), t)
      scale = max(np.max(np.abs(w)), np.max(np.abs(expected - w)), np.max(np.abs(expected)))
      assert_ulps_close(
        ours, expected, case.f32_ulps, scale=scale, what=f"step {t}: ", dtype=jnp.float32
      )
    params = new
