"""Line searches: a step size along the incoming update, from evaluations of the objective.

Symbols: f the objective (``value_fn``), w the parameters, u the incoming update, eta the
step size, f0 = f(w), s(eta) = <grad f(w + eta u), u> the slope along u (<a, b>: the real
part of conj(a) . b over all leaves), s0 = s(0). Each condition is written once, as a
violation ``max(lhs - rhs, 0)`` (NaN as +inf; 0 where it holds)::

    Armijo (sufficient decrease):        f(w + eta u) <= (1 + rtol) f0 + c1 eta s0
    approximate decrease (Hager-Zhang):  s(eta) <= (2 c1 - 1) s0 where f(w + eta u) <= f0 + c3 |f0|
    curvature (strong):                  |s(eta)| <= c2 |s0|
    strong Wolfe:                        (approximate) decrease and curvature

``update`` needs ``value=f0``, ``grad=grad f(w)``, ``value_fn=f`` (keywords); other keywords
that name parameters of ``value_fn`` are passed to it (data), the rest are ignored
(optcompose's contract; Optax raises a TypeError). The state keeps the value and gradient at
the accepted point: ``value_and_grad_from_state`` (:mod:`.lbfgs`) reuses them next step.
"""

from __future__ import annotations

import collections
import functools
import inspect
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
    FLAG, GradientTransformation, Hyper, choice, cond, expect_state, integer, needs_params,
    public, real, safe_increment, zero_count,
)
from optcompose.core.validation import check_real_value
from optcompose.transforms.lbfgs import tree_add_scale, tree_scale, tree_vdot

__all__ = ["ScaleByBacktrackingLinesearchState", "ScaleByZoomLinesearchState",
           "ZoomLinesearchInfo"]  # Optax's names, and the builders it registers


# --- The conditions, each once.
def violation(error):
  """``max(error, 0)``, NaN as +inf: 0 where the condition holds."""
  error = jnp.maximum(error, 0.0)
  return jnp.where(jnp.isnan(error), jnp.inf, error)


def armijo_error(value, value_init, stepsize, slope_init, c1, rtol=0.0):
  """Sufficient decrease: ``f(w + eta u) - (1 + rtol) f0 - c1 eta s0``."""
  return value - (1.0 + rtol) * value_init - c1 * stepsize * slope_init


def approx_decrease_error(value, slope, value_init, slope_init, c1, c3):
  """Approximate decrease, only near f0: ``max(s - (2 c1 - 1) s0, f - f0 - c3 |f0|)``."""
  return jnp.maximum(slope - (2 * c1 - 1.0) * slope_init,
                     value - value_init - c3 * jnp.abs(value_init))


def curvature_error(slope, slope_init, c2):
  """Strong curvature: ``|s(eta)| - c2 |s0|``."""
  return jnp.abs(slope) - c2 * jnp.abs(slope_init)


# --- Shared pieces.
def _scalar_dtype(params):
  """Step sizes' and values' dtype: the first leaf's real dtype, float32 at least."""
  first = jnp.result_type(jax.tree.leaves(params)[0])
  return otree.promote_types(jnp.finfo(first).dtype, jnp.float32)


def _hyper(x, dtype):
  """A Python number as it is (weakly typed, as in Optax); others (arrays, NumPy scalars) in
  ``dtype``."""
  return x if type(x) in (int, float) else jnp.asarray(x).astype(dtype)


def _where(c, a, b):
  return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def _print_if(pred, message, **values):
  cond(pred, lambda _: jax.debug.print(message, **values, ordered=True), lambda _: None, None)


def _inputs(who, state, state_type, updates, params, value, grad, value_fn, extra):
  """``(params, value in the scalars' dtype, grad like params, f with its data bound)``."""
  expect_state(state, state_type, who)
  params = needs_params(params, who)
  missing = [n for n, v in (("value", value), ("grad", grad), ("value_fn", value_fn)) if v is None]
  if missing:
    raise TypeError(f"{who}: update needs {', '.join(f'`{n}`' for n in missing)}: call "
                    "update(updates, state, params, value=f(params), grad=grad f(params), "
                    "value_fn=f) (see value_and_grad_from_state).")
  if not callable(value_fn):
    raise TypeError(f"{who}: `value_fn` must be the objective, got {type(value_fn).__name__}.")
  otree.check_same_structure(updates, params, "updates", "params")
  otree.check_same_structure(grad, params, "grad", "params")
  check_real_value(who, "value", value, "the objective at params")
  if jnp.shape(value) != ():
    raise ValueError(f"{who}: `value` must be a scalar, got shape {jnp.shape(value)}.")
  try:
    names = inspect.signature(value_fn).parameters
  except (TypeError, ValueError):  # no signature: no data passed
    names = {}
  fn = functools.partial(value_fn, **{k: v for k, v in extra.items() if k in names})
  return (params, jnp.asarray(value).astype(_scalar_dtype(params)),
          otree.cast_like(grad, params), fn)


def _check_above(who, name, value, low, low_name=None, strict=True):
  """``value > low`` (``>=`` unless strict), inf allowed; checked on Python numbers."""
  if isinstance(value, numbers.Real) and isinstance(low, numbers.Real) and not (
      value > low or (not strict and value == low)):
    than = f"`{low_name}` ({low!r})" if low_name else repr(low)
    raise ValueError(f"{who}: `{name}` must be {'>' if strict else '>='} {than} (infinity "
                     f"allowed), got {value!r}.")


# --- Backtracking (Armijo).
class BacktrackingLinesearchInfo(NamedTuple):
  """Function evaluations made, and the final Armijo violation (0: satisfied)."""
  num_linesearch_steps: jax.Array  # int32
  decrease_error: jax.Array


class ScaleByBacktrackingLinesearchState(NamedTuple):
  """Optax's fields: the step size taken, the value (and gradient) there, the info."""
  learning_rate: jax.Array
  value: jax.Array
  grad: Any  # None unless store_grad
  info: BacktrackingLinesearchInfo


_Backtrack = collections.namedtuple("_Backtrack", "stepsize value grad decrease_error count")


_FIXED = dict(schedule=False)


@public("transformation", optax="scale_by_backtracking_linesearch",
        max_backtracking_steps=integer(0, draw=(1, 20)),
        slope_rtol=real(0.0, 1.0, high_open=True, draw=(1e-5, 0.5), **_FIXED),
        decrease_factor=real(0.0, 1.0, low_open=True, high_open=True, draw=(0.1, 0.9), **_FIXED),
        increase_factor=Hyper(("float", 1.0, 2.0)),
        max_learning_rate=real(0.0, low_open=True, draw=(0.1, 10.0), **_FIXED),
        atol=real(0.0, draw=(0.0, 1e-6), **_FIXED), rtol=real(0.0, draw=(0.0, 1e-6), **_FIXED),
        store_grad=FLAG, verbose=FLAG)
def scale_by_backtracking_linesearch(
    max_backtracking_steps: int, slope_rtol: float = 1e-4, decrease_factor: float = 0.8,
    increase_factor: float = 1.5, max_learning_rate: float = 1.0, atol: float = 0.0,
    rtol: float = 0.0, store_grad: bool = False, verbose: bool = False,
) -> GradientTransformation:
  """Backtracking line search: the first tried ``eta`` with sufficient decrease (Armijo).

  Update: ``eta`` starts at ``min(increase_factor eta_prev, max_learning_rate)`` (eta_prev
  = 1 at first) and is multiplied by ``decrease_factor`` until the Armijo violation (c1 =
  ``slope_rtol``) is at most ``atol``, at most ``max_backtracking_steps`` times; output
  ``eta u`` (``eta = 0`` if the last value is not finite). ``u`` must descend (s0 < 0).

  Args:
    max_backtracking_steps: the most reductions (>= 0, a Python int).
    slope_rtol: c1 in [0, 1).
    decrease_factor: in (0, 1), the reduction per trial.
    increase_factor: >= 1, growth of the last step size for the first trial (infinity:
      start at ``max_learning_rate``).
    max_learning_rate: > 0, the largest step size tried.
    atol: >= 0, the violation accepted.
    rtol: >= 0, the relative slack on f0.
    store_grad: also compute (and store) the gradient at the accepted point.
    verbose: print (``jax.debug.print``) when no step size satisfies the condition.

  Returns:
    A transformation with state :class:`ScaleByBacktrackingLinesearchState`; its update
    needs ``value=``, ``grad=``, ``value_fn=``. Stricter than Optax: the ranges above.

  References:
    Nocedal and Wright, "Numerical Optimization", 1999, Algorithm 3.1; Vaswani et al.,
    "Painless Stochastic Gradient", 2019; Optax's ``optax.scale_by_backtracking_linesearch``.
  """
  who = "scale_by_backtracking_linesearch"
  _check_above(who, "increase_factor", increase_factor, 1.0, strict=False)

  def init(params):
    inf = functools.partial(jnp.full, [], jnp.inf, _scalar_dtype(params))  # a buffer each
    return ScaleByBacktrackingLinesearchState(
        jnp.ones([], _scalar_dtype(params)), inf(),
        otree.zeros_like(params) if store_grad else None,
        BacktrackingLinesearchInfo(zero_count(), inf()))

  def update(updates, state, params=None, *, value=None, grad=None, value_fn=None, **extra):
    params, value, grad, fn = _inputs(who, state, ScaleByBacktrackingLinesearchState, updates,
                                      params, value, grad, value_fn, extra)
    h = functools.partial(_hyper, dtype=value.dtype)
    c1, slack, tol, steps = h(slope_rtol), h(rtol), h(atol), max_backtracking_steps
    slope = jnp.real(tree_vdot(updates, jax.tree.map(jnp.conj, grad))).astype(value.dtype)

    def body(c):
      eta = jnp.where(c.count > 0, h(decrease_factor) * c.stepsize, c.stepsize)
      trial = tree_add_scale(params, eta, updates)
      # With store_grad, the gradient at the accepted point only: transpose the linearization.
      raw, jvp = jax.linearize(fn, trial) if store_grad else (jnp.asarray(fn(trial)), None)
      f = raw.astype(value.dtype)
      error = violation(armijo_error(f, value, eta, slope, c1, slack))
      g = c.grad if jvp is None else jax.lax.cond(
          (error <= tol) | (c.count == steps), lambda: otree.cast_like(
              jax.linear_transpose(jvp, trial)(jnp.ones_like(raw))[0], params), lambda: c.grad)
      return _Backtrack(eta, f, g, error, c.count + 1)

    start = jnp.minimum(h(increase_factor) * state.learning_rate, h(max_learning_rate))
    c = jax.lax.while_loop(
        lambda c: ~(c.decrease_error <= tol) & (c.count <= steps), body,
        _Backtrack(start, value, otree.zeros_like(params), jnp.full_like(value, jnp.inf),
                   zero_count()))
    if verbose:
      _print_if(c.decrease_error > tol, f"{who}: no step size with sufficient decrease "
                "(value {f0}, slope {s0}, last step size {eta}, decrease error {e}).",
                f0=value, s0=slope, eta=c.stepsize, e=c.decrease_error)
    eta = jnp.where(jnp.isinf(c.decrease_error), jnp.zeros_like(c.stepsize), c.stepsize)
    info = BacktrackingLinesearchInfo(c.count, c.decrease_error)
    return tree_scale(eta, updates), ScaleByBacktrackingLinesearchState(
        eta, c.value, c.grad if store_grad else None, info)

  return GradientTransformation(init, update)


# --- Zoom (strong Wolfe).
class ZoomLinesearchInfo(NamedTuple):
  """Function evaluations made, and the final violations (0: satisfied)."""
  num_linesearch_steps: jax.Array  # int32
  decrease_error: jax.Array
  curvature_error: jax.Array


class ScaleByZoomLinesearchState(NamedTuple):
  """Optax's fields: the step size taken, the value and gradient there, the info."""
  learning_rate: jax.Array
  value: jax.Array
  grad: Any
  info: ZoomLinesearchInfo


# The last point tried (stepsize, value, grad, slope), its violations; the bracket (lo, f_lo, s_lo,
# hi, f_hi, s_hi, ref, f_ref), f(hi) >= f(lo); safe: (eta, f, grad), best with decrease.
_Zoom = collections.namedtuple("_Zoom", "count stepsize value grad slope decrease_error "
                               "curvature_error interval_found done failed bracket safe")


def _cubicmin(a, fa, fpa, b, fb, c, fc):
  """The critical point of the cubic through (a, fa), (b, fb), (c, fc) with slope fpa at a
  (NaN if none; then unused): SciPy's, as Optax writes it."""
  db, dc = b - a, c - a
  denom = (db * dc) ** 2 * (db - dc)
  d1 = jnp.array([[dc**2, -(db**2)], [-(dc**3), db**3]])
  A, B = jnp.dot(d1, jnp.array([fb - fa - fpa * db, fc - fa - fpa * dc]),
                 precision=jax.lax.Precision.HIGHEST) / denom
  return a + (-B + jnp.sqrt(B * B - 3.0 * A * fpa)) / (3.0 * A)


def _quadmin(a, fa, fpa, b, fb):
  """The critical point of the parabola through (a, fa), (b, fb) with slope fpa at a."""
  db = b - a
  return a - fpa / (2.0 * ((fb - fa - fpa * db) / (db**2)))


@public("transformation", optax="scale_by_zoom_linesearch",
        max_linesearch_steps=integer(1, draw=(1, 20)),
        max_learning_rate=real(0.0, low_open=True, optional=True, draw=(0.1, 10.0), **_FIXED),
        tol=real(0.0, draw=(0.0, 1e-6), **_FIXED),
        increase_factor=real(1.0, low_open=True, draw=(1.5, 4.0), **_FIXED),
        slope_rtol=real(0.0, 1.0, low_open=True, high_open=True, draw=(1e-5, 1e-2), **_FIXED),
        curv_rtol=Hyper(("float", 0.5, 0.99)),
        approx_dec_rtol=real(0.0, optional=True, draw=(1e-8, 1e-4), **_FIXED),
        stepsize_precision=real(0.0, draw=(1e-8, 1e-3), **_FIXED),
        initial_guess_strategy=choice("one", "keep"), verbose=FLAG)
def scale_by_zoom_linesearch(
    max_linesearch_steps: int, max_learning_rate: Optional[float] = None, tol: float = 0.0,
    increase_factor: float = 2.0, slope_rtol: float = 1e-4, curv_rtol: float = 0.9,
    approx_dec_rtol: Optional[float] = 1e-6, stepsize_precision: float = 1e-5,
    initial_guess_strategy: str = "keep", verbose: bool = False,
) -> GradientTransformation:
  """Zoom line search: a step size satisfying the strong Wolfe conditions.

  Update: phase 1 tries ``eta = guess, increase_factor guess, ...`` (at most
  ``max_learning_rate``) until a bracket [lo, hi] holding a strong Wolfe point is found;
  phase 2 tries in it the cubic interpolant's minimum, else the quadratic's, else the
  midpoint, and shrinks it. One value and gradient per trial. It stops when both violations
  (the decrease: the smaller of Armijo's and, with ``approx_dec_rtol``, the approximate one)
  are at most ``tol``; after ``max_linesearch_steps`` trials, or once the bracket is
  narrower than ``stepsize_precision``, it takes the best point with sufficient decrease if
  any. Output ``eta u``; ``u`` must descend (s0 < 0).

  Args:
    max_linesearch_steps: the most trials (>= 1, a Python int).
    max_learning_rate: > 0, the largest step size tried; ``None``: no bound.
    tol: >= 0, the violation accepted.
    increase_factor: > 1, the growth of the trials in phase 1.
    slope_rtol: c1 in (0, 1).
    curv_rtol: c2 > c1 (infinity: no curvature condition).
    approx_dec_rtol: c3 >= 0, or ``None`` for Armijo's condition alone.
    stepsize_precision: >= 0, the narrowest bracket searched.
    initial_guess_strategy: ``"one"`` (guess 1, for quasi-Newton directions) or ``"keep"``
      (the last step size taken).
    verbose: print (``jax.debug.print``) the violations when a condition is not met.

  Returns:
    A transformation with state :class:`ScaleByZoomLinesearchState`; its update needs
    ``value=``, ``grad=``, ``value_fn=``. Stricter than Optax: the ranges above.

  References:
    Nocedal and Wright, "Numerical Optimization", 1999, Algorithms 3.5 and 3.6; Hager and
    Zhang, "Algorithm 851: CG_DESCENT", 2006; Optax's ``optax.scale_by_zoom_linesearch``.
  """
  who = "scale_by_zoom_linesearch"
  _check_above(who, "curv_rtol", curv_rtol, slope_rtol, "slope_rtol")
  if initial_guess_strategy not in ("one", "keep"):
    raise ValueError(f"{who}: `initial_guess_strategy` must be 'one' or 'keep', got "
                     f"{initial_guess_strategy!r}.")

  def init(params):
    inf = functools.partial(jnp.full, [], jnp.inf, _scalar_dtype(params))  # a buffer each
    return ScaleByZoomLinesearchState(jnp.ones([], _scalar_dtype(params)), inf(),
                                      otree.zeros_like(params),
                                      ZoomLinesearchInfo(zero_count(), inf(), inf()))

  def update(updates, state, params=None, *, value=None, grad=None, value_fn=None, **extra):
    params, f0, g0, fn = _inputs(who, state, ScaleByZoomLinesearchState, updates, params,
                                 value, grad, value_fn, extra)
    h = functools.partial(_hyper, dtype=f0.dtype)
    c1, c2, grow, tolerance = h(slope_rtol), h(curv_rtol), h(increase_factor), h(tol)
    value_and_grad = jax.value_and_grad(fn)
    s0 = jnp.real(tree_vdot(updates, g0)).astype(f0.dtype)
    guess = jnp.ones_like(f0) if initial_guess_strategy == "one" else state.learning_rate

    def errors(eta, f, s):
      dec = armijo_error(f, f0, eta, s0, c1)
      if approx_dec_rtol is not None:
        dec = jnp.minimum(approx_decrease_error(f, s, f0, s0, c1, h(approx_dec_rtol)), dec)
      return violation(dec), violation(curvature_error(s, s0, c2))

    def step(z):  # one trial: phase 1 or 2 (selected by z.interval_found), one evaluation
      lo, f_lo, s_lo, hi, f_hi, s_hi, ref, f_ref = z.bracket
      found = z.interval_found
      grown, at_max = jnp.where(z.count == 0, guess, grow * z.stepsize), jnp.asarray(False)
      if max_learning_rate is not None:
        at_max = grown >= h(max_learning_rate)
        grown = jnp.minimum(grown, h(max_learning_rate))
      width, left, right = jnp.abs(hi - lo), jnp.minimum(hi, lo), jnp.maximum(hi, lo)
      cubic = _cubicmin(lo, f_lo, s_lo, hi, f_hi, ref, f_ref)
      quad = _quadmin(lo, f_lo, s_lo, hi, f_hi)
      use_cubic = (cubic > left + 0.2 * width) & (cubic < right - 0.2 * width)
      use_quad = ~use_cubic & (quad > left + 0.1 * width) & (quad < right - 0.1 * width)
      middle = jnp.where(use_cubic, cubic, jnp.where(use_quad, quad, (lo + hi) / 2.0))
      eta = jnp.where(found, middle, grown)
      f, g = value_and_grad(tree_add_scale(params, eta, updates))
      f, g = jnp.asarray(f).astype(f0.dtype), otree.cast_like(g, params)
      s = jnp.real(tree_vdot(jax.tree.map(jnp.conj, g), updates)).astype(f0.dtype)
      dec, curv = errors(eta, f, s)
      wolfe = jnp.maximum(dec, curv) <= tolerance
      safe = _where((dec <= tolerance) & (~found | (f < z.safe[1])), (eta, f, g), z.safe)
      new, last = (eta, f, s), (z.stepsize, z.value, z.slope)
      # Phase 1: bracket [last, new] if new rose or lacks decrease, [new, last] if its slope
      # turned up; else keep growing.
      high_new = (dec > 0.0) | ((f >= z.value) & (z.count > 0))
      low_new = (s >= 0.0) & ~high_new
      found_now = high_new | low_new | wolfe
      low1, high1 = _where(low_new, (new, last), (last, new))
      # Phase 2: new replaces hi if it lacks decrease or rose above f_lo, else it replaces lo
      # (and the old lo becomes hi if the slope points away); the old end is the reference.
      high_mid = (dec > 0.0) | (f >= f_lo)
      flip = (s * (hi - lo) >= 0.0) & ~high_mid
      high2 = _where(high_mid, new, _where(flip, (lo, f_lo, s_lo), (hi, f_hi, s_hi)))
      low2 = _where(high_mid, (lo, f_lo, s_lo), new)
      ref2 = _where(high_mid | flip, (hi, f_hi), (lo, f_lo))
      bracket = _where(found, (*low2, *high2, *ref2), (*low1, *high1, *low1[:2]))
      done = wolfe | (~found & at_max & ~found_now)
      failed = ~done & ((z.count + 1 >= max_linesearch_steps)
                        | (found & (width <= h(stepsize_precision)) & (safe[0] > 0.0)))
      # On failure: the safe point if there is one (or if the last value is not finite).
      eta, f, g = _where(failed & ((safe[0] > 0.0) | jnp.isinf(dec)), safe, (eta, f, g))
      return _Zoom(safe_increment(z.count), eta, f, g, s, dec, curv, found | found_now, done,
                   failed, bracket, safe)

    zero, inf, no = jnp.zeros_like(f0), jnp.full_like(f0, jnp.inf), jnp.asarray(False)
    z = jax.lax.while_loop(lambda z: ~(z.done | z.failed), step, _Zoom(
        zero_count(), zero, f0, g0, s0, inf, inf, no, no, no,
        (zero, f0, s0, zero, f0, s0, zero, f0), (zero, f0, g0)))
    if verbose:
      _print_if(jnp.maximum(z.decrease_error, z.curvature_error) > tolerance,
                f"{who}: value {{f0}}, slope {{s0}} (< 0 for a descent direction), step size "
                "{eta}: decrease error {d}, curvature error {c}.", f0=f0, s0=s0,
                eta=z.stepsize, d=z.decrease_error, c=z.curvature_error)
    info = ZoomLinesearchInfo(z.count, z.decrease_error, z.curvature_error)
    return tree_scale(z.stepsize, updates), ScaleByZoomLinesearchState(
        z.stepsize, z.value, z.grad, info)

  return GradientTransformation(init, update)
