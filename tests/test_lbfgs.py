"""L-BFGS and the line searches against Optax 0.2.8, in the official loop::

    value, grad = value_and_grad_from_state(f)(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=f)
    params = apply_updates(params, updates)

Both libraries run it jitted in float64 on one objective with two faces (a data keyword
selects them, so one compiled step per library and configuration serves both): a
Rosenbrock valley, and an ill-conditioned quadratic. The searches branch on the data (which
phase, which interpolant, when to stop), so the comparison is of trajectories at a
tolerance far above rounding (1e-8 of each leaf's magnitude; measured: bitwise equal on this
CPU): two programs can round one comparison the other way only at a near-tie. Near the
minimum every decision is such a tie -- the values the searches compare differ by rounding
-- so there the trial counts and step sizes may legitimately differ while the parameters
agree (both at the minimum to rounding); those are compared only while the objective is
well above rounding (``f > 1e-12``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import assert_rel_close, standard_promotion, x64

pytestmark = pytest.mark.numerics


class Pair(NamedTuple):  # a NamedTuple node, a scalar leaf and a vector leaf
  scalar: jax.Array
  vector: jax.Array


X_CURV, X_MIN = [1.0, 3.0, 10.0, 300.0], [0.5, -1.0, 2.0, 0.25]  # the quadratic face in x
Y_CURV, Y_MIN = ([5.0], [0.3, 100.0]), ([-0.5], [1.5, -2.0])  # the quadratic in y (both)


def objective(params, rosenbrock):
  """``rosenbrock`` = 1: Rosenbrock in x (minimum at ones) plus a quadratic in y; 0: a
  quadratic in x and y (condition number 1e3)."""
  x, y = params["x"], params["y"]
  const = functools.partial(jnp.asarray, dtype=x.dtype)
  valley = jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
  bowl = 0.5 * jnp.sum(const(X_CURV) * (x - const(X_MIN)) ** 2)
  quad_y = 0.5 * (Y_CURV[0][0] * (y.scalar - Y_MIN[0][0]) ** 2
                  + jnp.sum(const(Y_CURV[1]) * (y.vector - const(Y_MIN[1])) ** 2))
  return rosenbrock * valley + (1.0 - rosenbrock) * bowl + quad_y


def start():
  return {"x": jnp.asarray([-1.2, 1.0, -1.2, 1.0]), "y": Pair(jnp.asarray(0.0), jnp.zeros(2))}


def minimum(rosenbrock):
  return {"x": np.ones(4) if rosenbrock else np.asarray(X_MIN),
          "y": Pair(np.asarray(Y_MIN[0][0]), np.asarray(Y_MIN[1]))}


CONFIGS = {  # name -> builder of the optimizer from the library (optcompose or optax)
    "zoom": lambda lib: lib.lbfgs(),
    "backtracking": lambda lib: lib.lbfgs(linesearch=lib.scale_by_backtracking_linesearch(
        max_backtracking_steps=15, store_grad=True)),
    # A small memory (the ring buffer wraps every 3 steps), and the zoom search's other
    # branches: the last step size as the guess, a bounded step, Armijo's decrease alone.
    "memory_3": lambda lib: lib.lbfgs(memory_size=3, linesearch=lib.scale_by_zoom_linesearch(
        max_linesearch_steps=15, max_learning_rate=1.5, initial_guess_strategy="keep",
        approx_dec_rtol=None)),
}
STEPS = 60


def solve(lib, opt, rosenbrock_faces, steps=STEPS):
  """The official loop, jitted once; per face the list of (params, value, lr, trials)."""
  value_and_grad = lib.value_and_grad_from_state(objective)

  def step(params, state, rosenbrock):
    value, grad = value_and_grad(params, state=state, rosenbrock=rosenbrock)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=objective, rosenbrock=rosenbrock)
    return lib.apply_updates(params, updates), state, value

  step = jax.jit(step if lib is oc else standard_promotion(step))
  runs = []
  for face in rosenbrock_faces:
    params, state, path = start(), opt.init(start()), []
    for _ in range(steps):
      params, state, value = step(params, state, jnp.float64(face))
      search = state[-1]
      path.append((params, float(value), float(search.learning_rate),
                   int(search.info.num_linesearch_steps)))
    runs.append(path)
  return runs


@pytest.mark.float64
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_lbfgs_follows_optax_in_the_official_loop_and_converges(config):
  with x64():
    ours = solve(oc, CONFIGS[config](oc), (1.0, 0.0))
    ref = solve(optax, standard_promotion(CONFIGS[config](optax)), (1.0, 0.0))
  searched = 0
  for face, path, ref_path in zip((1.0, 0.0), ours, ref):
    for t, ((p, f, lr, n), (p_ref, f_ref, lr_ref, n_ref)) in enumerate(zip(path, ref_path)):
      assert_rel_close(p, p_ref, 1e-8, what=f"face {face}, step {t}:")
      if f_ref > 1e-12:  # above rounding: the same decisions
        assert n == n_ref, f"face {face}, step {t}: {n} trials, Optax {n_ref}"
        np.testing.assert_allclose(lr, lr_ref, rtol=1e-8, err_msg=f"face {face}, step {t}")
        searched += n > 1
    for leaf in jax.tree.leaves(path[-1][0]):
      assert leaf.dtype == jnp.float64
    assert_rel_close(path[-1][0], minimum(face), 1e-6, what=f"face {face}: the minimum")
  assert searched >= 2, "the line search never needed a second trial: a weak comparison"
