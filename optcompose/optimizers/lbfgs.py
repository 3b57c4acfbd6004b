"""L-BFGS: the quasi-Newton direction, a negative step and a line search.

Symbols: g gradient, w parameters, f the objective, P_k L-BFGS's inverse-Hessian
approximation (:mod:`optcompose.transforms.lbfgs`), eta the step size the line search finds
(:mod:`optcompose.transforms.linesearch`). The official loop::

    value_and_grad = optcompose.value_and_grad_from_state(f)
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=f)
    params = optcompose.apply_updates(params, updates)
"""

from __future__ import annotations

from typing import Any, Optional

from optcompose.core import (
  FLAG,
  GradientTransformation,
  Hyper,
  ScalarOrSchedule,
  as_transformation,
  chain,
  identity,
  integer,
  public,
  real,
)
from optcompose.transforms.lbfgs import scale_by_lbfgs
from optcompose.transforms.zoom_linesearch import scale_by_zoom_linesearch
from optcompose.transforms.scaling import scale, scale_by_learning_rate

# Optax's default line search, built once (a transformation holds functions only).
_ZOOM = scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy="one")


@public(
  "optimizer",
  optax="lbfgs",
  learning_rate=real(0.0, draw=(1e-3, 1.0), optional=True),
  memory_size=integer(1, draw=(1, 10)),
  scale_init_precond=FLAG,
  linesearch=Hyper(("choice", (None,)), optional=True),
)
def lbfgs(
  learning_rate: Optional[ScalarOrSchedule] = None,
  memory_size: int = 10,
  scale_init_precond: bool = True,
  linesearch: Optional[Any] = _ZOOM,
) -> GradientTransformation:
  """L-BFGS: ``w <- w - eta lr P_k g``, eta from a line search (default: zoom, strong Wolfe).

  Update: ``d = P_k g`` (:func:`scale_by_lbfgs`: two-loop recursion over the last
  ``memory_size`` differences of w and g); ``d <- -lr d`` (``-d`` when ``learning_rate`` is
  None); ``u = eta d`` with eta from ``linesearch``. Call ``update`` once per step with
  ``value=f(w)``, ``grad=g``, ``value_fn=f`` (see the module docstring); the line search's
  last evaluation is where the next step starts (:func:`value_and_grad_from_state`).

  Chain: ``scale_by_lbfgs(memory_size, scale_init_precond)``, ``scale(-1)`` or
  ``scale_by_learning_rate(learning_rate)``, ``linesearch`` (or ``identity()``).

  Args:
    learning_rate: lr >= 0, a number or a schedule; ``None`` (the default): the line search
      sets the step alone.
    memory_size: m >= 1, the number of past differences kept (a Python int).
    scale_init_precond: start the recursion from ``gamma_k I`` (else ``I``).
    linesearch: a transformation that scales the direction (e.g.
      :func:`scale_by_zoom_linesearch`, :func:`scale_by_backtracking_linesearch`), or
      ``None`` for none (then no ``value_fn`` is needed). Default:
      ``scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy="one")``,
      Optax's (built by optcompose, so it is not Optax's object).

  Returns:
    A :func:`chain` whose state is ``(ScaleByLBFGSState, EmptyState,
    ScaleByZoomLinesearchState)`` by default (a scheduled learning rate's member has an
    :class:`~optcompose.InjectHyperparamsState`).

  References:
    Nocedal and Wright, "Numerical Optimization", 1999, Algorithms 7.4, 7.5 and 3.5, 3.6;
    Liu and Nocedal, "On the limited memory BFGS method for large scale optimization", 1989;
    Optax's ``optax.lbfgs``.
  """
  return chain(
    scale_by_lbfgs(memory_size=memory_size, scale_init_precond=scale_init_precond),
    scale(-1.0) if learning_rate is None else scale_by_learning_rate(learning_rate),
    identity() if linesearch is None else as_transformation(linesearch, "lbfgs", "linesearch"),
  )
