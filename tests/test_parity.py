"""Trajectories of every registry case against its reference, 200 steps, two problems."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from problems import mlp, quadratic, run
from registry import CASES

STEPS = 200


@functools.cache
def problem(name, dtype=jnp.float32):
  return {"quadratic": quadratic, "mlp": mlp}[name](dtype)


def stack(path):
  """Trajectory as one float64 array per leaf: shape (steps, *leaf.shape)."""
  return [np.stack([np.asarray(leaf, np.float64) for leaf in leaves])
          for leaves in zip(*(jax.tree.leaves(p) for p in path))]


def assert_close_trajectories(ours, ref, rtol):
  for a, b in zip(stack(ours), stack(ref)):
    scale = max(np.max(np.abs(b)), 1e-3)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


OPTAX_CASES = [c for c in CASES if c.optax is not None]
BY_NAME = {c.name: c for c in CASES}


@functools.cache
def our_trajectory(case_name, problem_name, jit=True):
  case, prob = BY_NAME[case_name], problem(problem_name)
  return run(case.ours(), prob, STEPS, jit, oc.apply_updates, case.with_value)[0]


@functools.cache
def optax_trajectory(case_name, problem_name, jit=True):
  """Optax's trajectory in the same mode as ours (eager runs of either library round bfloat16
  intermediates that XLA keeps in float32 under jit), computed once per mode."""
  case, prob = BY_NAME[case_name], problem(problem_name)
  return run(case.optax(), prob, STEPS, jit, optax.apply_updates, case.with_value)[0]
NUMPY_CASES = [c for c in CASES if c.numpy_step is not None]


TRAJECTORY_RUNS = [
    pytest.param(case, problem_name, jit, id=f"{case.name}-{problem_name}-{'jit' if jit else 'eager'}",
                 marks=pytest.mark.xdist_group(case.name))  # one worker per case: caches hit
    for case in OPTAX_CASES for problem_name in ("quadratic", "mlp") for jit in (True, False)
    if jit or problem_name == "quadratic" or case.eager_on_mlp
]


@pytest.mark.parametrize("case, problem_name, jit", TRAJECTORY_RUNS)
def test_trajectory_matches_optax(case, problem_name, jit):
  prob = problem(problem_name)
  ours = our_trajectory(case.name, problem_name, jit)
  # Some Optax wrappers run lax.cond, which is slow eagerly; their jitted run serves.
  ref = optax_trajectory(case.name, problem_name, jit or case.slow_eager_ref)
  assert_close_trajectories(ours, ref, rtol=case.rtol)
  # The problem is actually being optimised: the comparison is not between two frozen runs.
  assert float(prob.loss(ours[-1])) != float(prob.loss(prob.params))


@pytest.mark.parametrize("case", [c for c in OPTAX_CASES if c.bf16_like_optax],
                         ids=lambda c: c.name)
def test_trajectory_matches_optax_bfloat16(case):
  prob = problem("quadratic", jnp.bfloat16)
  ours, _ = run(case.ours(), prob, 50, True, oc.apply_updates, case.with_value)
  ref, _ = run(case.optax(), prob, 50, True, optax.apply_updates, case.with_value)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits: allow a few units in the last place.
  assert_close_trajectories(ours, ref, rtol=2 ** -6)


@pytest.mark.parametrize("case", [c for c in OPTAX_CASES if c.same_state],
                         ids=lambda c: c.name)
def test_state_has_optax_shapes_and_dtypes(case):
  params = problem("mlp").params
  grads = jax.tree.map(jnp.ones_like, params)

  def stepped_state(tx):
    state = tx.init(params)
    extra = {"value": jnp.float32(1.0)} if case.with_value else {}
    return tx.update(grads, state, params, **extra)[1]

  def strip(state):
    """Our scheduled states also record the values in force (one scalar per scheduled
    hyperparameter, for logging); apart from those, the leaves are Optax's."""
    return jax.tree.map(
        lambda s: (s.count, strip(s.inner)) if isinstance(s, oc.ScheduledState) else s,
        state, is_leaf=lambda s: isinstance(s, oc.ScheduledState))

  def signature(state):
    return [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(state)]

  assert signature(strip(stepped_state(case.ours()))) == signature(stepped_state(case.optax()))


def numpy_trajectory(step, prob, steps):
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), prob.params)
  path = []
  for t in range(steps):
    g = prob.grad(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), w), t)
    w = jax.tree.map(lambda wi, gi: step(wi, np.asarray(gi, np.float64), t), w, g)
    path.append(w)
  return path


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("problem_name", ["quadratic", "mlp"])
@pytest.mark.parametrize("case", NUMPY_CASES, ids=lambda c: c.name)
def test_trajectory_matches_numpy(case, problem_name, jit):
  prob = problem(problem_name)
  ours, _ = run(case.ours(), prob, STEPS, jit, oc.apply_updates)
  ref = numpy_trajectory(case.numpy_step, prob, STEPS)
  assert_close_trajectories(ours, ref, rtol=1e-5)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=pytest.mark.xdist_group(c.name))
                                  for c in OPTAX_CASES if c.bitwise])
def test_jitted_trajectory_is_bitwise_optax(case):
  """Same formulas in the same order: under jit, XLA compiles both to the same arithmetic
  (cases with bias correction are not bitwise: see _DEBIASED in registry.py).

  (Eager runs differ by an ulp now and then: XLA turns ``x / scalar`` inside a compiled
  function into ``x * (1 / scalar)``, and Optax compiles its bias correction as one unit.)
  """
  ours = our_trajectory(case.name, "mlp")
  ref = optax_trajectory(case.name, "mlp")
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)
