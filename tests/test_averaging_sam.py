"""Parameter averaging (EMA, SWA), Lookahead and SAM: against Optax and NumPy references.

Symbols as in the modules' docstrings: p_t the parameters after step t, a the stored
average, rho the SAM radius, k the Lookahead sync period, alpha its slow step size.

Trajectories of ours against another program (Optax's wrapper, a NumPy loop, the plain inner
optimizer) run in float64 (``f64_problem``, tests/numerics.py) and agree to ``F64_RTOL``;
averages are checked against NumPy over the path ours produced (no trajectory to amplify
rounding), in float32.
"""

from __future__ import annotations

import functools
import inspect
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from optcompose.transforms.averaging import (
  EmaParamsState,
  SwaState,
  averaged_params,
  ema_params,
  swa,
)
from optcompose.wrappers.lookahead import (
  LookaheadParams,
  LookaheadSlowState,
  LookaheadState,
  lookahead,
  lookahead_in_state,
  slow_params,
  slow_weights_in_state,
)
from optcompose.transforms.sharpness import normalize, sharpness_aware
from optcompose.wrappers.sam import SAMState, sam
from compat import pure
from numerics import F64_RTOL, assert_ulps_close, standard_promotion, x64
from problems import mlp, quadratic, run

ROOT = Path(__file__).resolve().parent.parent
STEPS = 200
pytestmark = pytest.mark.numerics


@functools.cache
def problem(name, dtype=jnp.float32):
  return {"quadratic": quadratic, "mlp": mlp}[name](dtype)


def f64_problem(name):
  """The problem in float64: call inside ``x64()``."""
  return problem(name, jnp.float64)


def f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def assert_close_paths(ours, ref, rtol=1e-6):
  """Per leaf, over the whole trajectory: |a - b| <= rtol |b| + rtol max|b| (as test_parity)."""
  assert len(ours) == len(ref)
  for leaves in zip(*(zip(*(jax.tree.leaves(f64(p)) for p in path)) for path in (ours, ref))):
    a, b = (np.stack(x) for x in leaves)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.max(np.abs(b)), 1e-3))


def assert_bitwise(ours, ref):
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


QUADRATIC_H = {"a": np.logspace(-1.3, 1.7, 6), "b": np.logspace(-1.0, 1.0, 4).reshape(2, 2)}
QUADRATIC_C = {"a": np.linspace(-1.0, 1.0, 6), "b": np.full((2, 2), 0.5)}


def quadratic_grad_np(w):
  """The gradient H (w - c) of problems.quadratic, written out in float64."""
  return {k: QUADRATIC_H[k] * (w[k] - QUADRATIC_C[k]) for k in w}


# ---------------------------------------------------------------------------------------
# Averaging.


def train(tx, prob, steps, read=None):
  """Jitted training; returns the params after each step and ``read(state)`` after each."""
  params, state = prob.params, tx.init(prob.params)

  @jax.jit
  def step(params, state, t):
    u, state = tx.update(prob.grad(params, t), state, params)
    params = oc.apply_updates(params, u)
    return params, state, (read(state) if read else None)

  path, reads = [], []
  for t in range(steps):
    params, state, r = step(params, state, t)
    path.append(params)
    reads.append(r)
  return path, reads, state


def numpy_average(initial, path, weight_fn, taken):
  """a_n = (1 - w_n) a_{n-1} + w_n p_t in float64 at the steps t (from 1) where taken(t);
  a_0 = the initial params."""
  a, n, out = f64(initial), 0, []
  for t, p in enumerate(path, start=1):
    if taken(t):
      n += 1
      w = weight_fn(n)
      a = jax.tree.map(lambda x, y, w=w: (1 - w) * x + w * y, a, f64(p))
    out.append(a)
  return out


def numpy_debiased_ema(path, decay):
  """The textbook form: m_t = decay m + (1 - decay) p_t, m_0 = 0; average m_t / (1 - decay^t)."""
  m, out = jax.tree.map(np.zeros_like, f64(path[0])), []
  for t, p in enumerate(path, start=1):
    m = jax.tree.map(lambda x, y: decay * x + (1 - decay) * y, m, f64(p))
    out.append(jax.tree.map(lambda x, t=t: x / (1 - decay**t), m))
  return out


@functools.cache
def ema_runs():
  """One run, two averages: debiased (state[1]) and started at the initial params (state[2])."""
  tx = oc.chain(oc.sgd(0.05, 0.9), ema_params(0.95), ema_params(0.95, debias=False))
  return train(tx, problem("mlp"), STEPS, lambda s: (s[1].average, s[2].average))


def test_ema_params_is_the_debiased_ema_of_the_params_after_each_step():
  path, reads, state = ema_runs()
  avgs = [r[0] for r in reads]
  assert_close_paths(avgs, numpy_debiased_ema(path, 0.95))
  # The same as Optax's ema (an average of the updates) fed the parameter sequence.
  ema, ref = standard_promotion(optax.ema(0.95, debias=True)), []
  s, update = ema.init(path[0]), jax.jit(ema.update)
  for p in path:
    out, s = update(p, s)
    ref.append(out)
  assert_close_paths(avgs, ref)
  assert int(state[1].count) == int(state[1].n_averaged) == STEPS
  # The average lags behind the params: the comparison is of something that moved.
  lag = avgs[-1]["dense1"]["kernel"] - path[-1]["dense1"]["kernel"]
  assert float(jnp.max(jnp.abs(lag))) > 1e-3


def test_ema_params_without_debias_starts_at_the_initial_params():
  path, reads, _ = ema_runs()
  ref, a = [], problem("mlp").params
  for p in path:
    a = optax.incremental_update(p, a, 0.05)
    ref.append(a)
  assert_close_paths([r[1] for r in reads], ref)
  # Not the debiased average: the two tests compare different things.
  with pytest.raises(AssertionError):
    assert_close_paths([r[1] for r in reads], [r[0] for r in reads], rtol=1e-3)


def test_decay_zero_average_is_exactly_the_params_after_the_step():
  """The average is ema_params' own p + u, apply_updates' p + u in the same jitted step: the
  same sum, but XLA may fuse each into a different kernel (one ulp at most)."""
  tx = oc.chain(oc.adam(1e-2), ema_params(0.0))
  path, avgs, _ = train(tx, problem("quadratic"), 20, averaged_params)
  for p, a in zip(path, avgs):
    assert_ulps_close(a, p, 1)


@pytest.mark.float64
def test_updates_pass_through_unchanged():
  # Each wrapper hands back the very updates it was given...
  prob = problem("quadratic")
  g = prob.grad(prob.params, 0)
  for tx in (ema_params(0.9), swa(10, 5)):
    u, _ = tx.update(g, tx.init(prob.params), prob.params)
    assert all(a is b for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(g)))
  # ... so a chain with them trains as the optimizer alone (two programs: in float64).
  with x64():
    prob = f64_problem("quadratic")
    plain, _, _ = train(oc.adamw(1e-2, weight_decay=0.1), prob, 50)
    ours, _, _ = train(
      oc.chain(oc.adamw(1e-2, weight_decay=0.1), ema_params(0.9), swa(10, 5)), prob, 50
    )
  assert_close_paths(ours, plain, rtol=F64_RTOL)


@pytest.mark.parametrize(
  "kind, start_step, every", [("ema", 5, 3), ("ema", 0, 7), ("swa", 50, 10), ("swa", 0, 1)]
)
def test_start_step_and_every(kind, start_step, every):
  """Snapshots at t >= start_step with (t - start_step) % every == 0 (t counts from 1);
  before the first, the average reads the initial params."""
  steps, decay, initial = 120, 0.9, problem("quadratic").params
  taken = lambda t: t >= start_step and (t - start_step) % every == 0
  average = (
    ema_params(decay, start_step=start_step, every=every)
    if kind == "ema"
    else swa(start_step, every)
  )
  tx = oc.chain(oc.sgd(0.02, 0.9), average)
  path, reads, state = train(
    tx, problem("quadratic"), steps, lambda s: (averaged_params(s, kind=kind), s[1].n_averaged)
  )
  assert isinstance(state[1], EmaParamsState if kind == "ema" else SwaState)
  weight = (lambda n: (1 - decay) / (1 - decay**n)) if kind == "ema" else (lambda n: 1 / n)
  assert_close_paths([r[0] for r in reads], numpy_average(initial, path, weight, taken))
  assert [int(r[1]) for r in reads] == [
    sum(map(taken, range(1, t + 1))) for t in range(1, steps + 1)
  ]
  if start_step > 1:
    assert_bitwise(reads[start_step - 2][0], initial)
  if kind == "swa":  # the plain mean of the snapshots
    snapshots = [f64(p) for t, p in enumerate(path, start=1) if taken(t)]
    mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *snapshots)
    assert_close_paths([reads[-1][0]], [mean])


def test_bfloat16_params_with_a_float32_average():
  prob = problem("quadratic")
  tx = oc.chain(oc.sgd(0.02), ema_params(0.99, accumulator_dtype=jnp.float32))

  @jax.jit
  def step(params, state, t):
    g = jax.tree.map(lambda g, p: g.astype(p.dtype), prob.grad(params, t), params)
    u, state = tx.update(g, state, params)
    return oc.apply_updates(params, u), state

  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), prob.params)
  state, path = tx.init(params), []
  for t in range(50):
    params, state = step(params, state, t)
    path.append(params)
  avg = averaged_params(state)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(avg))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert_close_paths([avg], [numpy_debiased_ema(path, 0.99)[-1]], rtol=1e-6)


def test_averaged_params_is_found_anywhere_in_the_state():
  params = {"w": jnp.ones(3)}
  g = {"w": jnp.full(3, 0.5)}

  def factory(learning_rate):
    return oc.chain(oc.sgd(learning_rate), ema_params(0.5))

  for tx in (
    oc.inject_hyperparams(factory)(learning_rate=0.1),
    oc.chain(oc.identity(), oc.chain(oc.sgd(0.1), ema_params(0.5))),
    oc.chain(oc.sgd(lambda c: 0.1 + 0.0 * jnp.asarray(c, jnp.float32)), ema_params(0.5)),
    optax.chain(optax.sgd(0.1), ema_params(0.5)),
  ):
    state = tx.init(params)
    np.testing.assert_array_equal(averaged_params(state)["w"], params["w"])  # before a step
    _, state = tx.update(g, state, params)
    np.testing.assert_allclose(averaged_params(state)["w"], 0.95, rtol=1e-7)

  both = oc.chain(oc.sgd(0.1), ema_params(0.5), swa())
  state = both.init(params)
  with pytest.raises(ValueError, match="2 averages"):
    averaged_params(state)
  assert isinstance(state[1], EmaParamsState)
  assert averaged_params(state, kind="swa") is state[2].average
  with pytest.raises(ValueError, match="no an? ema_params or swa"):
    averaged_params(oc.sgd(0.1).init(params))
  with pytest.raises(ValueError, match="`kind`"):
    averaged_params(state, kind="polyak")


def test_ema_params_in_flax_nnx_optimizer():
  from flax import nnx

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, oc.chain(oc.sgd(0.1), ema_params(0.9)), wrt=nnx.Param)
  x = jnp.ones((4, 3))
  loss = lambda m: jnp.mean(m(x) ** 2)
  kernels = []
  for _ in range(3):
    opt.update(model, nnx.grad(loss)(model))
    kernels.append({"k": model.kernel[...]})
  avg = averaged_params(pure(opt.opt_state))
  assert_close_paths([{"k": avg["kernel"]}], [numpy_debiased_ema(kernels, 0.9)[-1]])


# ---------------------------------------------------------------------------------------
# Errors, for all three modules.


@pytest.mark.parametrize(
  "build, argument",
  [
    (lambda: ema_params(1.0), "decay"),
    (lambda: ema_params(-0.1), "decay"),
    (lambda: ema_params(lambda c: 0.9), "decay"),
    (lambda: ema_params(0.9, every=0), "every"),
    (lambda: ema_params(0.9, every=2.0), "every"),
    (lambda: swa(start_step=-1), "start_step"),
    (lambda: swa(start_step=True), "start_step"),
    (lambda: lookahead(oc.sgd(0.1), 0, 0.5), "sync_period"),
    (lambda: lookahead(oc.sgd(0.1), 2.5, 0.5), "sync_period"),
    (lambda: lookahead(oc.sgd(0.1), 5, 1.5), "slow_step_size"),
    (lambda: lookahead(0.1, 5, 0.5), "fast_optimizer"),
    (lambda: sam(oc.sgd(0.1), normalize(), sync_period=0), "sync_period"),
    (lambda: sam(oc.sgd(0.1), None), "adv_optimizer"),
    (lambda: sharpness_aware(-0.05), "rho"),
    (lambda: sharpness_aware(0.05, adaptive=True, eta=-1.0), "eta"),
  ],
)
def test_bad_arguments_are_named(build, argument):
  with pytest.raises((ValueError, TypeError), match=f"`{argument}`"):
    build()


def test_missing_params_or_grad_fn_are_named():
  params = {"w": jnp.ones(3)}
  for tx in (ema_params(0.9), swa(), sam(oc.sgd(0.1), normalize())):
    with pytest.raises(ValueError, match="`params`"):
      tx.update(params, tx.init(params))
  tx = sharpness_aware()
  with pytest.raises(ValueError, match="`grad_fn=`"):
    tx.update(params, tx.init(params), params)
  tx = sam(oc.sgd(0.1), normalize(), opaque_mode=True)
  with pytest.raises(ValueError, match="`grad_fn=`"):
    tx.update(params, tx.init(params), params)
  tx = lookahead(oc.sgd(0.1), 2, 0.5)
  with pytest.raises(ValueError, match="LookaheadParams"):
    tx.update(params, tx.init(params), params)


# ---------------------------------------------------------------------------------------
# Lookahead.


def lookahead_path(tx, pair_type, prob, steps, jit, apply):
  params = pair_type.init_synced(prob.params)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  path = []
  for t in range(steps):
    u, state = update(prob.grad(params.fast, t), state, params)
    params = apply(params, u)
    path.append(params)
  return path, state


LOOKAHEAD_RUNS = {  # name: (problem, our inner, Optax's inner, reset_state, jit)
  "jit": ("mlp", lambda: oc.adam(1e-2), lambda: optax.adam(1e-2), False, True),
  "jit-reset": ("quadratic", lambda: oc.adam(1e-2), lambda: optax.adam(1e-2), True, True),
  "eager-reset": (
    "quadratic",
    lambda: oc.sgd(1e-2, 0.9),
    lambda: optax.sgd(1e-2, 0.9),
    True,
    False,
  ),
}


@pytest.mark.parametrize("run", list(LOOKAHEAD_RUNS))
@pytest.mark.float64
def test_lookahead_matches_optax(run):
  name, ours_inner, optax_inner, reset_state, jit = LOOKAHEAD_RUNS[run]
  with x64():
    prob = f64_problem(name)
    ours, state = lookahead_path(
      lookahead(ours_inner(), 5, 0.5, reset_state),
      LookaheadParams,
      prob,
      STEPS,
      jit,
      oc.apply_updates,
    )
    ref, _ = lookahead_path(
      standard_promotion(optax.lookahead(optax_inner(), 5, 0.5, reset_state)),
      optax.LookaheadParams,
      prob,
      STEPS,
      jit,
      optax.apply_updates,
    )
    assert_close_paths(ours, ref, rtol=F64_RTOL)
    assert type(ours[-1]) is LookaheadParams and isinstance(state, LookaheadState)
    assert float(prob.loss(ours[-1].slow)) < 0.5 * float(prob.loss(prob.params))
    if run == "jit-reset":  # our wrapper around Optax's inner optimizer: Optax's wrapper
      same_inner, _ = lookahead_path(
        lookahead(standard_promotion(optax_inner()), 5, 0.5, reset_state),
        LookaheadParams,
        prob,
        STEPS,
        True,
        oc.apply_updates,
      )
      assert_close_paths(same_inner, ref, rtol=F64_RTOL)


def test_lookahead_state_and_params_have_optax_names_and_leaves():
  assert LookaheadState._fields == optax.LookaheadState._fields
  assert LookaheadParams._fields == optax.LookaheadParams._fields
  params = LookaheadParams.init_synced(problem("mlp").params)
  ours = lookahead(oc.adam(1e-2), 5, 0.5).init(params)
  ref = optax.lookahead(optax.adam(1e-2), 5, 0.5).init(params)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(ours)] == [
    (x.shape, x.dtype) for x in jax.tree.leaves(ref)
  ]


def test_lookahead_accepts_optax_params_and_plain_params_at_init():
  prob = problem("quadratic")
  tx = lookahead(oc.sgd(0.1), 3, 0.5)
  state = tx.init(prob.params)  # the fast params alone
  params = optax.LookaheadParams.init_synced(prob.params)
  u, _ = tx.update(prob.grad(params.fast, 0), state, params)
  assert type(u) is optax.LookaheadParams  # so optax.apply_updates matches the structures
  optax.apply_updates(params, u)


@pytest.mark.float64
def test_lookahead_is_the_papers_nested_loops():
  """Algorithm 1 of Zhang et al. with SGD inside, in float64 NumPy: after every k fast
  steps, phi <- phi + alpha (theta - phi) and theta <- phi."""
  k, alpha, lr = 4, 0.6, 0.02
  with x64():
    prob = f64_problem("quadratic")
    ours, _ = lookahead_path(
      lookahead(oc.sgd(lr), k, alpha), LookaheadParams, prob, 100, True, oc.apply_updates
    )
  grad, theta, phi = quadratic_grad_np, f64(prob.params), f64(prob.params)
  for outer in range(100 // k):
    for _ in range(k):
      theta = jax.tree.map(lambda w, g: w - lr * g, theta, grad(theta))
    phi = jax.tree.map(lambda s, f: s + alpha * (f - s), phi, theta)
    theta = phi
    got = ours[(outer + 1) * k - 1]
    assert_close_paths([got.slow, got.fast], [phi, phi], rtol=F64_RTOL)


@pytest.mark.float64
def test_lookahead_with_one_step_and_alpha_one_is_the_fast_optimizer():
  with x64():
    prob = f64_problem("quadratic")
    ours, _ = lookahead_path(
      lookahead(oc.adam(1e-2), 1, 1.0), LookaheadParams, prob, 50, True, oc.apply_updates
    )
    plain, _, _ = train(oc.adam(1e-2), prob, 50)
  assert_close_paths([p.fast for p in ours], plain, rtol=F64_RTOL)


@pytest.mark.float64
def test_lookahead_in_state_trains_the_fast_weights_of_optax_lookahead():
  """One params tree (the fast weights), the slow ones in the state: Optax's lookahead run
  by the same adapter gives the same trajectory (float64, to rounding)."""
  k = 5
  with x64():
    prob = f64_problem("quadratic")
    ours, state = run(
      lookahead_in_state(oc.sgd(1e-2, 0.9), k, 0.5, True), prob, 100, True, oc.apply_updates
    )
    ref, ref_state = run(
      slow_weights_in_state(
        standard_promotion(optax.lookahead(optax.sgd(1e-2, 0.9), k, 0.5, True))
      ),
      prob,
      100,
      True,
      optax.apply_updates,
    )
    assert_close_paths(ours, ref, rtol=F64_RTOL)
    assert_close_paths([slow_params(state)], [ref_state.slow], rtol=F64_RTOL)
    assert isinstance(state, LookaheadSlowState) and isinstance(state.lookahead, LookaheadState)
    # Right after a sync (step 100) the model's weights are the slow weights (reached as
    # fast + (slow - fast): equal to rounding).
    assert_close_paths([ours[99]], [slow_params(state)], rtol=F64_RTOL)
    assert float(prob.loss(ours[-1])) < 0.5 * float(prob.loss(prob.params))


def test_lookahead_in_state_in_flax_nnx_optimizer():
  from flax import nnx

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, lookahead_in_state(oc.sgd(0.1), 2, 0.5), wrt=nnx.Param)
  x = jnp.ones((4, 3))
  loss = lambda m: jnp.mean(m(x) ** 2)
  first = float(loss(model))
  for _ in range(4):
    opt.update(model, nnx.grad(loss)(model))
  slow = slow_params(pure(opt.opt_state))
  np.testing.assert_allclose(slow["kernel"], model.kernel[...], rtol=1e-6)  # synced at step 4
  assert float(loss(model)) < first
  with pytest.raises(ValueError, match="0 lookahead_in_state"):
    slow_params(oc.sgd(0.1).init({"w": jnp.ones(2)}))


# ---------------------------------------------------------------------------------------
# SAM.

RHO, LR = 0.05, 0.05
SAM_LR = {"mlp": LR, "quadratic": 0.02}  # lr * max curvature < 2 on the quadratic


def sam_calls(tx, prob, calls, jit, apply, step_of=lambda i: i // 2):
  """Transparent mode: one update per gradient, the gradient at the current params."""
  params, state = prob.params, tx.init(prob.params)
  update = jax.jit(tx.update) if jit else tx.update
  path = []
  for i in range(calls):
    u, state = update(prob.grad(params, step_of(i)), state, params)
    params = apply(params, u)
    path.append(params)
  return path, state


def sam_steps(tx, prob, steps, opaque=False):
  """One update per SAM step, the second gradient evaluation passed as grad_fn."""
  params, state = prob.params, tx.init(prob.params)

  @jax.jit
  def step(params, state, t):
    grad_fn = (lambda p, i: prob.grad(p, t)) if opaque else (lambda p: prob.grad(p, t))
    u, state = tx.update(prob.grad(params, t), state, params, grad_fn=grad_fn)
    return oc.apply_updates(params, u), state

  path = []
  for t in range(steps):
    params, state = step(params, state, t)
    path.append(params)
  return path, state


def optax_plain_sam(outer=None, sync_period=2, reset_state=True, opaque_mode=False, lr=LR):
  return standard_promotion(
    optax.contrib.sam(
      outer or optax.sgd(lr),
      optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
      sync_period,
      reset_state,
      opaque_mode,
    )
  )


def our_plain_sam(outer=None, sync_period=2, reset_state=True, opaque_mode=False, lr=LR):
  return sam(
    outer or oc.sgd(lr), oc.chain(normalize(), oc.sgd(RHO)), sync_period, reset_state, opaque_mode
  )


@functools.cache
def optax_sam_path(name, jit):
  """Optax's transparent SAM in float64."""
  with x64():
    return sam_calls(
      optax_plain_sam(lr=SAM_LR[name]), f64_problem(name), STEPS, jit, optax.apply_updates
    )[0]


@pytest.mark.parametrize("name, jit", [("mlp", True), ("quadratic", False)], ids=["jit", "eager"])
@pytest.mark.float64
def test_sam_transparent_matches_optax(name, jit):
  with x64():
    prob = f64_problem(name)
    ours, state = sam_calls(our_plain_sam(lr=SAM_LR[name]), prob, STEPS, jit, oc.apply_updates)
    # The float64 problem's loss, evaluated in float64 (outside x64 its float64 constants
    # would meet float32 arithmetic).
    first, last = float(prob.loss(prob.params)), float(prob.loss(ours[-1]))
  assert_close_paths(ours, optax_sam_path(name, jit), rtol=F64_RTOL)
  assert isinstance(state, SAMState) and SAMState._fields == optax.contrib.SAMState._fields
  assert last < 0.5 * first


@pytest.mark.float64
def test_sam_transparent_adam_three_calls_no_reset_matches_optax():
  prob = problem("quadratic")
  kw = dict(sync_period=3, reset_state=False)
  adv = lambda lib: lib.chain(
    lib.scale_by_adam() if lib is oc else optax.scale_by_adam(), lib.scale_by_learning_rate(RHO)
  )
  ours = sam(oc.adam(1e-2), adv(oc), **kw)
  ref = standard_promotion(optax.contrib.sam(optax.adam(1e-2), adv(optax), **kw))
  step_of = lambda i: i // 3
  with x64():
    prob = f64_problem("quadratic")
    a, _ = sam_calls(ours, prob, 150, True, oc.apply_updates, step_of)
    b, _ = sam_calls(ref, prob, 150, True, optax.apply_updates, step_of)
  assert_close_paths(a, b, rtol=F64_RTOL)


@pytest.mark.float64
def test_sam_opaque_matches_optax():
  with x64():
    prob = f64_problem("quadratic")
    a, _ = sam_steps(our_plain_sam(oc.adam(1e-2), opaque_mode=True), prob, 100, opaque=True)
    b, _ = sam_steps(optax_plain_sam(optax.adam(1e-2), opaque_mode=True), prob, 100, opaque=True)
  assert_close_paths(a, b, rtol=F64_RTOL)


@pytest.mark.float64
def test_sharpness_aware_is_optax_sam_in_one_call():
  """chain(sharpness_aware(rho), sgd(lr)): one update per step equals every second call of
  Optax's transparent SAM (the params after each outer update)."""
  with x64():
    ours, _ = sam_steps(oc.chain(sharpness_aware(RHO), oc.sgd(LR)), f64_problem("mlp"), STEPS // 2)
  assert_close_paths(ours, optax_sam_path("mlp", True)[1::2], rtol=F64_RTOL)


def numpy_sam(prob, steps, rho, lr, adaptive=False, eta=0.01):
  """w_adv = w + rho g/|g| (ASAM: w + rho T^2 g/|T g|, T = |w| + eta); w <- w - lr grad(w_adv),
  in float64 on the quadratic."""
  w, path = f64(prob.params), []
  for _ in range(steps):
    g = quadratic_grad_np(w)
    t = {k: np.abs(w[k]) + eta if adaptive else np.ones_like(w[k]) for k in w}
    norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in w))
    w_adv = {k: w[k] + rho * t[k] ** 2 * g[k] / norm for k in w}
    w = {k: w[k] - lr * v for k, v in quadratic_grad_np(w_adv).items()}
    path.append(w)
  return path


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.1)], ids=["sam", "asam"])
@pytest.mark.float64
def test_sharpness_aware_matches_numpy_sam(adaptive, rho):
  lr = SAM_LR["quadratic"]
  with x64():
    prob = f64_problem("quadratic")
    ours, _ = sam_steps(oc.chain(sharpness_aware(rho, adaptive=adaptive), oc.sgd(lr)), prob, 100)
    ref = numpy_sam(prob, 100, rho, lr, adaptive)
    assert_close_paths(ours, ref, rtol=F64_RTOL)
    assert float(prob.loss(ours[-1])) < 0.1 * float(prob.loss(prob.params))


def test_sam_numpy_reference_is_not_plain_sgd():
  """The references differ from plain gradient descent: the tests above can fail."""
  prob = problem("quadratic")
  plain = numpy_sam(prob, 20, 0.0, SAM_LR["quadratic"])
  with pytest.raises(AssertionError):
    assert_close_paths(numpy_sam(prob, 20, RHO, SAM_LR["quadratic"]), plain, rtol=1e-3)


@pytest.mark.float64
def test_sam_with_sync_period_one_is_the_outer_optimizer():
  # (Optax's transparent mode applies this update to the previous call's weights.)
  with x64():
    prob = f64_problem("quadratic")
    ours, _ = sam_calls(
      our_plain_sam(oc.adam(1e-2), sync_period=1),
      prob,
      50,
      True,
      oc.apply_updates,
      step_of=lambda i: i,
    )
    plain, _, _ = train(oc.adam(1e-2), prob, 50)
  assert_close_paths(ours, plain, rtol=F64_RTOL)


@pytest.mark.parametrize(
  "ours, theirs",
  [(sam, optax.contrib.sam), (lookahead, optax.lookahead), (normalize, optax.contrib.normalize)],
  ids=["sam", "lookahead", "normalize"],
)
def test_optax_arguments_and_defaults(ours, theirs):
  a, b = (inspect.signature(f).parameters for f in (ours, theirs))
  assert [(n, p.default, p.kind) for n, p in a.items()] == [
    (n, p.default, p.kind) for n, p in b.items()
  ]


def test_zero_gradient_gives_no_perturbation():
  params = {"w": jnp.array([1.0, -2.0])}
  zeros = {"w": jnp.zeros(2)}
  seen = []
  tx = sharpness_aware(0.05)
  out, _ = tx.update(zeros, tx.init(params), params, grad_fn=lambda p: seen.append(p) or zeros)
  np.testing.assert_array_equal(seen[0]["w"], params["w"])
  np.testing.assert_array_equal(normalize().update(zeros, None)[0]["w"], zeros["w"])


def test_example_runs_and_the_losses_fall(capsys):
  with jax.numpy_rank_promotion("allow"):  # the example is user code: JAX's default applies
    runpy.run_path(str(ROOT / "examples" / "sam_lookahead_step.py"), run_name="__main__")
  out = capsys.readouterr().out
  for name in ("SAM", "Lookahead"):
    losses = [float(l.rsplit(" ", 1)[1]) for l in out.splitlines() if l.startswith(name)]
    assert len(losses) >= 3 and losses[-1] < 0.1 * losses[0], (name, losses)
