"""The zoom line search (strong Wolfe conditions): a step size along the incoming update,
bracketed and then narrowed by cubic and quadratic interpolation. The conditions, the
symbols and the keywords ``update`` needs are those of :mod:`optcompose.transforms.linesearch`.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  FLAG,
  GradientTransformation,
  Hyper,
  choice,
  integer,
  public,
  real,
  safe_increment,
  zero_count,
)
from optcompose.transforms.lbfgs import tree_add_scale, tree_scale, tree_vdot

from optcompose.transforms.linesearch import (
  _FIXED,
  _check_above,
  _hyper,
  _inputs,
  _print_if,
  _scalar_dtype,
  _where,
  approx_decrease_error,
  armijo_error,
  curvature_error,
  violation,
)

__all__ = ["ScaleByZoomLinesearchState", "ZoomLinesearchInfo"]  # and the builders it registers


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
_Zoom = collections.namedtuple(
  "_Zoom",
  "count stepsize value grad slope decrease_error "
  "curvature_error interval_found done failed bracket safe",
)


def _cubicmin(a, fa, fpa, b, fb, c, fc):
  """The critical point of the cubic through (a, fa), (b, fb), (c, fc) with slope fpa at a
  (NaN if none; then unused): SciPy's, as Optax writes it."""
  db, dc = b - a, c - a
  denom = (db * dc) ** 2 * (db - dc)
  d1 = jnp.array([[dc**2, -(db**2)], [-(dc**3), db**3]])
  A, B = (
    jnp.dot(
      d1, jnp.array([fb - fa - fpa * db, fc - fa - fpa * dc]), precision=jax.lax.Precision.HIGHEST
    )
    / denom
  )
  return a + (-B + jnp.sqrt(B * B - 3.0 * A * fpa)) / (3.0 * A)


def _quadmin(a, fa, fpa, b, fb):
  """The critical point of the parabola through (a, fa), (b, fb) with slope fpa at a."""
  db = b - a
  return a - fpa / (2.0 * ((fb - fa - fpa * db) / (db**2)))


@public(
  "transformation",
  optax="scale_by_zoom_linesearch",
  max_linesearch_steps=integer(1, draw=(1, 20)),
  max_learning_rate=real(0.0, low_open=True, optional=True, draw=(0.1, 10.0), **_FIXED),
  tol=real(0.0, draw=(0.0, 1e-6), **_FIXED),
  increase_factor=real(1.0, low_open=True, draw=(1.5, 4.0), **_FIXED),
  slope_rtol=real(0.0, 1.0, low_open=True, high_open=True, draw=(1e-5, 1e-2), **_FIXED),
  curv_rtol=Hyper(("float", 0.5, 0.99)),
  approx_dec_rtol=real(0.0, optional=True, draw=(1e-8, 1e-4), **_FIXED),
  stepsize_precision=real(0.0, draw=(1e-8, 1e-3), **_FIXED),
  initial_guess_strategy=choice("one", "keep"),
  verbose=FLAG,
)
def scale_by_zoom_linesearch(
  max_linesearch_steps: int,
  max_learning_rate: Optional[float] = None,
  tol: float = 0.0,
  increase_factor: float = 2.0,
  slope_rtol: float = 1e-4,
  curv_rtol: float = 0.9,
  approx_dec_rtol: Optional[float] = 1e-6,
  stepsize_precision: float = 1e-5,
  initial_guess_strategy: str = "keep",
  verbose: bool = False,
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
    raise ValueError(
      f"{who}: `initial_guess_strategy` must be 'one' or 'keep', got {initial_guess_strategy!r}."
    )

  def init(params):
    inf = functools.partial(jnp.full, [], jnp.inf, _scalar_dtype(params))  # a buffer each
    return ScaleByZoomLinesearchState(
      jnp.ones([], _scalar_dtype(params)),
      inf(),
      otree.zeros_like(params),
      ZoomLinesearchInfo(zero_count(), inf(), inf()),
    )

  def update(updates, state, params=None, *, value=None, grad=None, value_fn=None, **extra):
    params, f0, g0, fn = _inputs(
      who, state, ScaleByZoomLinesearchState, updates, params, value, grad, value_fn, extra
    )
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
      failed = ~done & (
        (z.count + 1 >= max_linesearch_steps)
        | (found & (width <= h(stepsize_precision)) & (safe[0] > 0.0))
      )
      # On failure: the safe point if there is one (or if the last value is not finite).
      eta, f, g = _where(failed & ((safe[0] > 0.0) | jnp.isinf(dec)), safe, (eta, f, g))
      return _Zoom(
        safe_increment(z.count),
        eta,
        f,
        g,
        s,
        dec,
        curv,
        found | found_now,
        done,
        failed,
        bracket,
        safe,
      )

    zero, inf, no = jnp.zeros_like(f0), jnp.full_like(f0, jnp.inf), jnp.asarray(False)
    z = jax.lax.while_loop(
      lambda z: ~(z.done | z.failed),
      step,
      _Zoom(
        zero_count(),
        zero,
        f0,
        g0,
        s0,
        inf,
        inf,
        no,
        no,
        no,
        (zero, f0, s0, zero, f0, s0, zero, f0),
        (zero, f0, g0),
      ),
    )
    if verbose:
      _print_if(
        jnp.maximum(z.decrease_error, z.curvature_error) > tolerance,
        f"{who}: value {{f0}}, slope {{s0}} (< 0 for a descent direction), step size "
        "{eta}: decrease error {d}, curvature error {c}.",
        f0=f0,
        s0=s0,
        eta=z.stepsize,
        d=z.decrease_error,
        c=z.curvature_error,
      )
    info = ZoomLinesearchInfo(z.count, z.decrease_error, z.curvature_error)
    return tree_scale(z.stepsize, updates), ScaleByZoomLinesearchState(
      z.stepsize, z.value, z.grad, info
    )

  return GradientTransformation(init, update)
