"""L-BFGS and the line searches against Optax 0.2.8, in the official loop::

    value, grad = value_and_grad_from_state(f)(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=f)
    params = apply_updates(params, updates)

Both libraries run it jitted in float64 on one objective with two faces, a Rosenbrock valley
and an ill-conditioned quadratic, selected by a data keyword that ``update`` passes on to
``value_fn`` (so one compiled step per library and configuration serves both). The searches
branch on the data (which phase, which interpolant, when to stop), and L-BFGS's dynamics
amplify rounding, so two correct programs are compared two ways (measurements at
HORIZON below):

- in lockstep, at every step from the reference's parameters with the same value and
  gradient, over the whole run: to F64_RTOL, as any formula;
- free-running, the official loop as written, for HORIZON steps: to 1e-8 of each leaf's
  magnitude. Beyond it the runs may legitimately drift apart (both still converge).

Step sizes and trial counts are compared while the objective is above 1e-12: near the
minimum the values a search compares differ by rounding only, so its decisions there are
ties that two programs may break differently while the parameters agree.
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
from numerics import F64_RTOL, assert_rel_close, standard_promotion, x64


class Pair(NamedTuple):  # a NamedTuple node, a scalar leaf and a vector leaf
  scalar: jax.Array
  vector: jax.Array


X_CURV, X_MIN = [1.0, 1000.0], [0.5, -1.0]  # the quadratic face in x
Y_CURV, Y_MIN = ([5.0], [0.3, 100.0]), ([-0.5], [1.5, -2.0])  # the quadratic in y (both)


def objective(params, rosenbrock):
  """``rosenbrock`` = 1: Rosenbrock in x (minimum at ones) plus a quadratic in y; 0: a
  quadratic in x and y (condition number 3e3)."""
  x, y = params["x"], params["y"]
  const = functools.partial(jnp.asarray, dtype=x.dtype)
  valley = jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
  bowl = 0.5 * jnp.sum(const(X_CURV) * (x - const(X_MIN)) ** 2)
  quad_y = 0.5 * (
    Y_CURV[0][0] * (y.scalar - Y_MIN[0][0]) ** 2
    + jnp.sum(const(Y_CURV[1]) * (y.vector - const(Y_MIN[1])) ** 2)
  )
  return rosenbrock * valley + (1.0 - rosenbrock) * bowl + quad_y


def start():
  return {"x": jnp.asarray([-1.2, 1.0]), "y": Pair(jnp.asarray(0.0), jnp.zeros(2))}


def minimum(rosenbrock):
  return {
    "x": np.ones(2) if rosenbrock else np.asarray(X_MIN),
    "y": Pair(np.asarray(Y_MIN[0][0]), np.asarray(Y_MIN[1])),
  }


CONFIGS = {  # name -> builder of the optimizer from the library (optcompose or optax)
  "zoom": lambda lib: lib.lbfgs(),
  "backtracking": lambda lib: lib.lbfgs(
    linesearch=lib.scale_by_backtracking_linesearch(max_backtracking_steps=15, store_grad=True)
  ),
  # The ring buffer wraps every 3 steps. Three pairs converge slowly here (SciPy's L-BFGS-B
  # with maxcor=3: 462 and 335 iterations on the two faces; with 10: 65 and 40).
  "memory_3": lambda lib: lib.lbfgs(memory_size=3),
}
STEPS = 90


class Runner(NamedTuple):
  opt: object
  value_and_grad: object  # jitted value_and_grad_from_state(objective)
  step: object  # jitted: (params, state, face, value, grad) -> (new params, state)


def runner(lib, opt):
  """The official loop of ``lib`` split in its two calls, each jitted once."""
  wrap = (lambda f: f) if lib is oc else standard_promotion
  value_and_grad = lib.value_and_grad_from_state(objective)

  def step(params, state, rosenbrock, value, grad):
    updates, state = opt.update(
      grad, state, params, value=value, grad=grad, value_fn=objective, rosenbrock=rosenbrock
    )
    return lib.apply_updates(params, updates), state

  return Runner(
    opt,
    jax.jit(wrap(lambda p, s, a: value_and_grad(p, state=s, rosenbrock=a))),
    jax.jit(wrap(step)),
  )


FRESH = jax.jit(jax.value_and_grad(objective))


def solve(run, face, follow=None, steps=STEPS):
  """``steps`` steps, each recorded as (new params, value, step size, trials).

  Free-running (the official loop), or in lockstep with ``follow``, the reference's path:
  each step then starts from the reference's parameters with the value and gradient there
  (freshly computed, not the ones stored at this run's own accepted point), so both
  libraries see identical inputs and only one step's rounding is compared."""
  params, state, path = start(), run.opt.init(start()), []
  face = jnp.float64(face)
  for t in range(steps):
    if follow is None:
      value, grad = run.value_and_grad(params, state, face)
    else:
      params = follow[t - 1][0] if t else params
      value, grad = FRESH(params, face)
    params, state = run.step(params, state, face, value, grad)
    path.append(
      (
        params,
        float(value),
        float(state[-1].learning_rate),
        int(state[-1].info.num_linesearch_steps),
      )
    )
  return path


def assert_paths_close(path, ref_path, face, rtol):
  """Parameters within ``rtol`` of each leaf's magnitude; step sizes and trial counts the
  same while the value is above rounding. Returns the number of multi-trial searches."""
  searched = 0
  for t, ((p, _, lr, n), (p_ref, f_ref, lr_ref, n_ref)) in enumerate(zip(path, ref_path)):
    assert_rel_close(p, p_ref, rtol, what=f"face {face}, step {t}:")
    if f_ref > 1e-12:
      assert n == n_ref, f"face {face}, step {t}: {n} trials, Optax {n_ref}"
      np.testing.assert_allclose(lr, lr_ref, rtol=rtol, err_msg=f"face {face}, step {t}")
      searched += n > 1
  return searched


# In lockstep (identical inputs at every step) the two programs agree to rounding over the
# whole run (measured here and at the minimum versions under AVX2: parameters 6e-16, step
# sizes 5e-15). Free-running, the dynamics amplify rounding, and more with 3 pairs on the
# ill-conditioned face: about tenfold every 2-5 steps, to 1e-8 near step 40 at the minimum
# versions (near 55 here) and O(1e-2) by step 90, where trial counts then differ too. So the
# free runs, the official loop itself, are compared for HORIZON steps (measured, both
# environments: parameters 4e-12, step sizes 7e-12).
HORIZON = 25


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_lbfgs_follows_optax_in_the_official_loop_and_converges(config):
  searched = 0
  with x64():
    ours = runner(oc, CONFIGS[config](oc))
    theirs = runner(optax, standard_promotion(CONFIGS[config](optax)))
    for face in (1.0, 0.0):
      ref = solve(theirs, face)
      searched += assert_paths_close(solve(ours, face, follow=ref), ref, face, F64_RTOL)
      path = solve(ours, face)
      assert_paths_close(path[:HORIZON], ref[:HORIZON], face, 1e-8)
      for leaf in jax.tree.leaves(path[-1][0]):
        assert leaf.dtype == jnp.float64
      values = [f for _, f, _, _ in path]
      assert all(b <= a for a, b in zip(values, values[1:])), "a decrease at every step"
      if config == "memory_3":
        assert values[-1] < 1e-5 * values[0]
      else:
        assert_rel_close(path[-1][0], minimum(face), 1e-6, what=f"face {face}: the minimum")
  assert searched >= 2, "the line search never needed a second trial: a weak comparison"


# --- The searches alone: data keywords, non-finite values, and their other options ---------


def barrier_loss(params, x, y):
  """A least-squares term on one sample plus a log barrier: NaN outside the ball |w| < 2, so
  long trial steps see non-finite values."""
  return 0.5 * (jnp.dot(x, params) - y) ** 2 - 0.1 * jnp.log(4.0 - jnp.sum(params**2))


SEARCHES = {  # after sgd(1.0): the plain gradient step, often out of the domain
  "backtracking": lambda lib: lib.scale_by_backtracking_linesearch(max_backtracking_steps=15),
  "zoom": lambda lib: lib.scale_by_zoom_linesearch(  # the options lbfgs's default leaves out
    max_linesearch_steps=15, max_learning_rate=0.8, approx_dec_rtol=None
  ),
}


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_line_search_passes_data_to_value_fn_and_survives_non_finite_values(search):
  """Optax's documented use with data (``x=``, ``y=``, passed on to ``value_fn``), over a
  domain edge. Ours also ignores keywords ``value_fn`` does not take (Optax raises)."""
  rng = np.random.default_rng(0)
  xs, ys = rng.normal(size=(6, 3)) * 5.0, rng.normal(size=6)
  results = []
  with x64():
    start_at = jnp.asarray([0.5, -0.5, 0.5])
    # Both searches' first trials (1 and 0.8 times sgd's step) leave the domain.
    g = jax.grad(barrier_loss)(start_at, xs[0], ys[0])
    for first_trial in (1.0, 0.8):
      assert np.isnan(barrier_loss(start_at - first_trial * g, xs[0], ys[0]))
    for lib in (oc, optax):
      opt = lib.chain(lib.sgd(learning_rate=1.0), SEARCHES[search](lib))
      extra = {"unused_by_value_fn": 1.0} if lib is oc else {}

      def step(params, state, x, y, opt=opt, lib=lib, extra=extra):
        value, grad = jax.value_and_grad(barrier_loss)(params, x, y)
        updates, state = opt.update(
          grad, state, params, value=value, grad=grad, value_fn=barrier_loss, x=x, y=y, **extra
        )
        return lib.apply_updates(params, updates), state

      step = jax.jit(step if lib is oc else standard_promotion(step))
      params, state, path = start_at, opt.init(start_at), []
      for x, y in zip(jnp.asarray(xs), jnp.asarray(ys)):
        params, state = step(params, state, x, y)
        path.append(
          (
            params,
            float(state[-1].learning_rate),
            int(state[-1].info.num_linesearch_steps),
            float(state[-1].info.decrease_error),
          )
        )
      results.append(path)
  ours, ref = results
  for t, ((p, lr, n, dec), (p_ref, lr_ref, n_ref, dec_ref)) in enumerate(zip(ours, ref)):
    assert_rel_close(p, p_ref, F64_RTOL, what=f"step {t}:")
    assert (n, lr, dec) == pytest.approx((n_ref, lr_ref, dec_ref), rel=F64_RTOL), f"step {t}"
    assert np.sum(np.asarray(p) ** 2) < 4.0 and dec == 0.0  # inside, sufficient decrease
  assert ours[0][2] >= 2  # the first trial's value was NaN: the search went on


def test_value_and_grad_from_state_reuses_the_stored_evaluation_and_says_what_is_missing():
  f = lambda p: jnp.sum(p**2)  # noqa: E731
  params = jnp.asarray([1.0, -2.0])
  value_and_grad = oc.value_and_grad_from_state(f)
  opt = oc.lbfgs()
  state = opt.init(params)
  value, grad = value_and_grad(params, state=state)  # +inf stored: computed
  np.testing.assert_allclose(value, 5.0)
  np.testing.assert_allclose(grad, [2.0, -4.0])
  stored = (
    state[0],
    state[1],
    state[2]._replace(value=jnp.float32(7.0), grad=jnp.asarray([3.0, 4.0])),
  )
  value, grad = value_and_grad(params, state=stored)  # finite: taken as stored
  assert float(value) == 7.0 and grad.tolist() == [3.0, 4.0]
  with pytest.raises(ValueError, match="stores no value"):
    value_and_grad(params, state=oc.sgd(0.1).init(params))
  no_grad = oc.chain(oc.sgd(1.0), oc.scale_by_backtracking_linesearch(5)).init(params)
  with pytest.raises(ValueError, match="stores no gradient.*store_grad=True"):
    value_and_grad(params, state=no_grad)
  two = oc.chain(oc.scale_by_zoom_linesearch(5), oc.scale_by_zoom_linesearch(5)).init(params)
  with pytest.raises(KeyError, match="2 entries named 'value'"):
    value_and_grad(params, state=two)


def _signature(state):
  return [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(state)]


def test_states_have_optax_fields_shapes_and_dtypes():
  """Traced only (jax.eval_shape): the state after init and after one step."""
  params = {"w": jnp.ones((2, 3)), "b": Pair(jnp.float32(0.5), jnp.zeros(3))}
  f = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))  # noqa: E731
  value, grad = jax.value_and_grad(f)(params)
  builders = {
    "scale_by_lbfgs": lambda lib: lib.scale_by_lbfgs(memory_size=4),
    "zoom": lambda lib: lib.scale_by_zoom_linesearch(max_linesearch_steps=5),
    "backtracking": lambda lib: lib.scale_by_backtracking_linesearch(5),
    "backtracking_store_grad": lambda lib: lib.scale_by_backtracking_linesearch(5, store_grad=True),
    "lbfgs": lambda lib: lib.lbfgs(),
  }
  for name, build in builders.items():
    states = []
    for lib in (oc, optax):
      tx = build(lib) if lib is oc else standard_promotion(build(lib))
      state = tx.init(params)
      extra = {} if name == "scale_by_lbfgs" else dict(value=value, grad=grad, value_fn=f)
      stepped = jax.eval_shape(lambda s, tx=tx, e=extra: tx.update(grad, s, params, **e)[1], state)
      states.append((state, stepped))
    (ours, ours_stepped), (ref, ref_stepped) = states
    assert [type(s).__name__ for s in jax.tree.leaves(ours, is_leaf=_is_state)] == [
      type(s).__name__ for s in jax.tree.leaves(ref, is_leaf=_is_state)
    ], name
    for a, b in ((ours, ref), (ours_stepped, ref_stepped), (ours_stepped, ours)):
      assert _signature(a) == _signature(b), name


def _is_state(x):
  return isinstance(x, tuple) and hasattr(x, "_fields")


def test_verbose_searches_print_why_they_failed(capfd):
  f = lambda w: jnp.sum(w**2)  # noqa: E731
  w = jnp.asarray([1.0, 2.0])
  value, grad = jax.value_and_grad(f)(w)
  for search, what in (
    (oc.scale_by_zoom_linesearch(2, verbose=True), "curvature error"),
    (oc.scale_by_backtracking_linesearch(2, verbose=True), "no step size with sufficient decrease"),
  ):
    # The gradient itself (not its negative) is not a descent direction.
    _, state = jax.jit(
      lambda s, search=search: search.update(grad, s, w, value=value, grad=grad, value_fn=f)
    )(search.init(w))
    jax.effects_barrier()
    assert what in capfd.readouterr().out
    assert float(state.info.decrease_error) > 0.0


# --- Bad input: named errors ------------------------------------------------------------------


@pytest.mark.parametrize(
  "build, error, match",
  [
    (lambda: oc.scale_by_lbfgs(memory_size=0), ValueError, r"scale_by_lbfgs: `memory_size`"),
    (lambda: oc.lbfgs(memory_size=0), ValueError, r"lbfgs: `memory_size` must lie in \[1"),
    (lambda: oc.scale_by_lbfgs(memory_size=2.0), TypeError, "must be a Python int"),
    (lambda: oc.lbfgs(linesearch=3), TypeError, "lbfgs: `linesearch` is int, not a gradient"),
    (lambda: oc.lbfgs(learning_rate=-1.0), ValueError, "lbfgs: `learning_rate`"),
    (
      lambda: oc.scale_by_zoom_linesearch(10, slope_rtol=0.5, curv_rtol=0.4),
      ValueError,
      r"`curv_rtol` must be > `slope_rtol` \(0.5\)",
    ),
    (lambda: oc.scale_by_zoom_linesearch(10, slope_rtol=0.0), ValueError, "`slope_rtol`"),
    (lambda: oc.scale_by_zoom_linesearch(10, slope_rtol=1.0), ValueError, "`slope_rtol`"),
    (lambda: oc.scale_by_zoom_linesearch(10, curv_rtol=float("nan")), ValueError, "curv_rtol"),
    (lambda: oc.scale_by_zoom_linesearch(0), ValueError, "`max_linesearch_steps`"),
    (lambda: oc.scale_by_zoom_linesearch(10, increase_factor=1.0), ValueError, "`increase_factor`"),
    (
      lambda: oc.scale_by_zoom_linesearch(10, max_learning_rate=0.0),
      ValueError,
      "`max_learning_rate`",
    ),
    (
      lambda: oc.scale_by_zoom_linesearch(10, initial_guess_strategy="two"),
      ValueError,
      "`initial_guess_strategy` must be 'one' or 'keep'",
    ),
    (lambda: oc.scale_by_backtracking_linesearch(-1), ValueError, "`max_backtracking_steps`"),
    (
      lambda: oc.scale_by_backtracking_linesearch(10, decrease_factor=1.0),
      ValueError,
      "`decrease_factor`",
    ),
    (
      lambda: oc.scale_by_backtracking_linesearch(10, increase_factor=0.5),
      ValueError,
      "`increase_factor` must be >= 1",
    ),
    (lambda: oc.scale_by_backtracking_linesearch(10, atol=-1e-3), ValueError, "`atol`"),
  ],
)
def test_bad_hyperparameters_raise_named_errors(build, error, match):
  with pytest.raises(error, match=match):
    build()


def test_documented_extremes_are_accepted():
  oc.scale_by_zoom_linesearch(10, curv_rtol=float("inf"))  # no curvature condition
  oc.scale_by_backtracking_linesearch(10, increase_factor=float("inf"))  # start at the max


@pytest.mark.parametrize(
  "name", ["lbfgs", "scale_by_zoom_linesearch", "scale_by_backtracking_linesearch"]
)
def test_update_without_its_arguments_raises_named_errors(name):
  """Traced only: each error is raised before any computation."""
  tx = oc.lbfgs() if name == "lbfgs" else getattr(oc, name)(5)
  f = lambda p: jnp.sum(p**2)  # noqa: E731
  params = jnp.asarray([1.0, 2.0])
  value, grad = jax.value_and_grad(f)(params)
  state = tx.init(params)
  update = lambda **kw: jax.eval_shape(lambda s: tx.update(grad, s, **kw), state)  # noqa: E731
  with pytest.raises(TypeError, match=r"update needs `value_fn`: call update\("):
    update(params=params, value=value, grad=grad)
  with pytest.raises(TypeError, match="needs `value`, `grad`, `value_fn`"):
    update(params=params)
  with pytest.raises(TypeError, match="`value_fn` must be the objective"):
    update(params=params, value=value, grad=grad, value_fn="f")
  with pytest.raises(ValueError, match="needs `params`"):
    update(value=value, grad=grad, value_fn=f)
  with pytest.raises(ValueError, match="`value` must be a scalar"):
    update(params=params, value=jnp.ones(2), grad=grad, value_fn=f)
  with pytest.raises(ValueError, match="`grad` does not have the structure of `params`"):
    update(params=params, value=value, grad={"g": grad}, value_fn=f)


def test_lbfgs_without_a_line_search_needs_no_objective():
  tx = oc.lbfgs(learning_rate=0.1, linesearch=None)
  params = jnp.asarray([1.0, 2.0])
  updates, _ = jax.eval_shape(lambda s: tx.update(params, s, params), tx.init(params))
  assert updates.shape == (2,)


@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_a_tree_without_leaves_is_a_step_that_changes_nothing(search):
  # Optax 0.2.8 raises a bare IndexError here (its step size's dtype is the first leaf's).
  tx = oc.lbfgs(linesearch=SEARCHES[search](oc))
  state = tx.init({})
  value = jnp.float32(2.0)
  updates, state = jax.jit(
    lambda s: tx.update({}, s, {}, value=value, grad={}, value_fn=lambda p: value)
  )(state)
  assert updates == {}
  floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and set(floats) == {jnp.dtype(jnp.float32)}
