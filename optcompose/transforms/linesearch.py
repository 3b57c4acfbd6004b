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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  FLAG,
  GradientTransformation,
  Hyper,
  cond,
  expect_state,
  integer,
  needs_params,
  public,
  real,
  zero_count,
)
from optcompose.core.explicit import sharded_like
from optcompose.core.validation import check_real_value
from optcompose.transforms.lbfgs import tree_add_scale, tree_scale, tree_vdot

__all__ = [
  "ScaleByBacktrackingLinesearchState"
]  # Optax's names, and the builders it registers (the zoom search: zoom_linesearch.py)


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
  return jnp.maximum(
    slope - (2 * c1 - 1.0) * slope_init, value - value_init - c3 * jnp.abs(value_init)
  )


def curvature_error(slope, slope_init, c2):
  """Strong curvature: ``|s(eta)| - c2 |s0|``."""
  return jnp.abs(slope) - c2 * jnp.abs(slope_init)


# --- Shared pieces.
def _scalar_dtype(params):
  """Step sizes' and values' dtype: the first leaf's real dtype, float32 at least (float32
  for a tree without leaves)."""
  leaves = jax.tree.leaves(params)
  first = jnp.result_type(leaves[0]) if leaves else jnp.float32
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
    raise TypeError(
      f"{who}: update needs {', '.join(f'`{n}`' for n in missing)}: call "
      "update(updates, state, params, value=f(params), grad=grad f(params), "
      "value_fn=f) (see value_and_grad_from_state)."
    )
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
  return (
    params,
    jnp.asarray(value).astype(_scalar_dtype(params)),
    otree.cast_like(grad, params),
    fn,
  )


def _check_above(who, name, value, low, low_name=None, strict=True):
  """``value > low`` (``>=`` unless strict), inf allowed; checked on Python numbers."""
  if (
    isinstance(value, numbers.Real)
    and isinstance(low, numbers.Real)
    and not (value > low or (not strict and value == low))
  ):
    than = f"`{low_name}` ({low!r})" if low_name else repr(low)
    raise ValueError(
      f"{who}: `{name}` must be {'>' if strict else '>='} {than} (infinity allowed), got {value!r}."
    )


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


@public(
  "transformation",
  optax="scale_by_backtracking_linesearch",
  max_backtracking_steps=integer(0, draw=(1, 20)),
  slope_rtol=real(0.0, 1.0, high_open=True, draw=(1e-5, 0.5), **_FIXED),
  decrease_factor=real(0.0, 1.0, low_open=True, high_open=True, draw=(0.1, 0.9), **_FIXED),
  increase_factor=Hyper(("float", 1.0, 2.0)),
  max_learning_rate=real(0.0, low_open=True, draw=(0.1, 10.0), **_FIXED),
  atol=real(0.0, draw=(0.0, 1e-6), **_FIXED),
  rtol=real(0.0, draw=(0.0, 1e-6), **_FIXED),
  store_grad=FLAG,
  verbose=FLAG,
)
def scale_by_backtracking_linesearch(
  max_backtracking_steps: int,
  slope_rtol: float = 1e-4,
  decrease_factor: float = 0.8,
  increase_factor: float = 1.5,
  max_learning_rate: float = 1.0,
  atol: float = 0.0,
  rtol: float = 0.0,
  store_grad: bool = False,
  verbose: bool = False,
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
      jnp.ones([], _scalar_dtype(params)),
      inf(),
      otree.zeros_like(params) if store_grad else None,
      BacktrackingLinesearchInfo(zero_count(), inf()),
    )

  def update(updates, state, params=None, *, value=None, grad=None, value_fn=None, **extra):
    params, value, grad, fn = _inputs(
      who, state, ScaleByBacktrackingLinesearchState, updates, params, value, grad, value_fn, extra
    )
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
      g = (
        c.grad
        if jvp is None
        else cond(
          (error <= tol) | (c.count == steps),
          lambda _: jax.tree.map(  # the carry's type (its sharding, on an explicit mesh)
            sharded_like,
            otree.cast_like(jax.linear_transpose(jvp, trial)(jnp.ones_like(raw))[0], params),
            c.grad,
          ),
          lambda _: c.grad,
          None,
        )
      )
      return _Backtrack(eta, f, g, error, c.count + 1)

    start = jnp.minimum(h(increase_factor) * state.learning_rate, h(max_learning_rate))
    c = jax.lax.while_loop(
      lambda c: ~(c.decrease_error <= tol) & (c.count <= steps),
      body,
      _Backtrack(
        start, value, otree.zeros_like(params), jnp.full_like(value, jnp.inf), zero_count()
      ),
    )
    if verbose:
      _print_if(
        c.decrease_error > tol,
        f"{who}: no step size with sufficient decrease "
        "(value {f0}, slope {s0}, last step size {eta}, decrease error {e}).",
        f0=value,
        s0=slope,
        eta=c.stepsize,
        e=c.decrease_error,
      )
    eta = jnp.where(jnp.isinf(c.decrease_error), jnp.zeros_like(c.stepsize), c.stepsize)
    info = BacktrackingLinesearchInfo(c.count, c.decrease_error)
    return tree_scale(eta, updates), ScaleByBacktrackingLinesearchState(
      eta, c.value, c.grad if store_grad else None, info
    )

  return GradientTransformation(init, update)
