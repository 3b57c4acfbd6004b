"""Stochastic gradient descent, with (Nesterov) momentum and the elastic net.

Symbols: g gradient, w parameters, lr learning rate (a number or a schedule), t step count
from 1. Extensions beyond Optax are keyword-only and off by default (``None``), so the
default state is Optax's: ``sgd(..., l1=, l2=)`` appends a proximal elastic-net step after
the learning-rate step (see :mod:`optcompose.transforms.proximal`). Under
``inject_hyperparams`` a strength given as a number (even 0) becomes live, so the step is
kept; leave it ``None`` to have no proximal step.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from optcompose.core import (
  FLAG,
  LEARNING_RATE,
  GradientTransformation,
  ScalarOrSchedule,
  chain,
  identity,
  public,
  real,
  value_at,
)
from optcompose.core.backend import taken_values
from optcompose.optimizers._shared import _proximal
from optcompose.schedules import constant_schedule
from optcompose.transforms.decay import Mask
from optcompose.transforms.momentum import trace
from optcompose.transforms.scaling import scale_by_learning_rate


@public(
  "optimizer",
  optax="sgd",
  learning_rate=LEARNING_RATE,
  momentum=real(0.0, 1.0, draw=(0.0, 0.999), optional=True),
  nesterov=FLAG,
)
def sgd(
  learning_rate: ScalarOrSchedule,
  momentum: Optional[ScalarOrSchedule] = None,
  nesterov: bool = False,
  accumulator_dtype: Optional[Any] = None,
  *,
  l1: Optional[ScalarOrSchedule] = None,
  l2: Optional[ScalarOrSchedule] = None,
  reg_mask: Mask = None,
) -> GradientTransformation:
  """Stochastic gradient descent, with optional (Nesterov) momentum and elastic net.

  Without momentum ``w <- w - lr g``. With momentum rho::

      v_t = rho v_{t-1} + g_t
      w  <- w - lr v_t                (heavy ball)
      w  <- w - lr (g_t + rho v_t)    (nesterov=True)

  With ``l1``/``l2`` the step is followed by the proximal map of ``l1 |w|_1 + l2/2 |w|^2``
  (ISTA; exact zeros) with step ``eta = lr / (1 - rho)`` (``eta = lr`` without momentum),
  applied to the leaves selected by ``reg_mask`` (all by default)::

      w <- sign(w - lr v) max(|w - lr v| - eta l1, 0) / (1 + eta l2)

  ``eta`` is the step the momentum takes once it has settled (``v = g / (1 - rho)``, and
  Nesterov's ``g + rho v`` too), so a fixed point solves the problem as given:
  ``0 in g + l1 sign(w) + l2 w`` (the lasso / elastic net with these ``l1``, ``l2``; a
  proximal step of ``lr`` would weaken both penalties by ``1 - rho``). A scheduled or
  injected ``rho`` gives ``eta = lr_t / (1 - rho_t)`` at each step; ``momentum=1`` (a
  buffer that never forgets) with ``l1``/``l2`` is refused (a 1 written into the state by
  hand inside ``jit``, where it cannot be checked, makes ``1 - rho`` float32's ``epsneg``: the
  regularized weights are then all but zeroed).

  Chain: ``trace(momentum, nesterov)`` (or identity), ``scale_by_learning_rate(lr)``,
  [``prox_elastic_net(l1, l2, eta)``].

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    momentum: rho in [0, 1] (below 1 with ``l1``/``l2``); ``None`` (the default) keeps no
      momentum buffer.
    nesterov: use Nesterov's look-ahead ``g_t + rho v_t``; ignored without ``momentum``.
    accumulator_dtype: dtype of the stored momentum buffer ``v`` (e.g. ``jnp.bfloat16``);
      ``None`` keeps the parameters'.
    l1: L1 strength of the proximal step (>= 0, a number or a schedule; ours,
      keyword-only). ``None``: no L1 term.
    l2: L2 strength of the proximal step (>= 0; the step divides by ``1 + lr l2``, with
      momentum rho by ``1 + lr l2 / (1 - rho)``; ours, keyword-only). ``None``: no L2
      term. With ``l1`` and ``l2`` both ``None`` there is no proximal step; a number, even
      0, keeps it (live under ``inject_hyperparams``).
    reg_mask: the leaves the proximal step applies to (a mask as ``add_decayed_weights``
      takes; ``None``: all).

  Returns:
    A :func:`chain` whose state is ``(TraceState or EmptyState, EmptyState[, EmptyState])``;
    a member given a schedule has an :class:`~optcompose.InjectHyperparamsState` instead
    (the proximal member's holds ``learning_rate = eta``, scheduled when ``lr`` or ``rho``
    is).

  References:
    Robbins and Monro, "A Stochastic Approximation Method", Annals of Mathematical
    Statistics, 1951; Polyak, "Some methods of speeding up the convergence of iteration
    methods", USSR Computational Mathematics and Mathematical Physics, 1964; Sutskever,
    Martens, Dahl and Hinton, "On the importance of initialization and momentum in deep
    learning", ICML 2013; Beck and Teboulle, "A Fast Iterative Shrinkage-Thresholding
    Algorithm for Linear Inverse Problems", SIAM J. Imaging Sciences, 2009.
  """
  first = (
    trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
    if momentum is not None
    else identity()
  )
  eta = learning_rate
  if momentum is not None and (l1 is not None or l2 is not None):
    eta = _settled_step(learning_rate, momentum)
    if callable(eta) and not callable(learning_rate):
      # eta is held as the proximal member's `learning_rate`: a constant lr is held too, in
      # front of it, so that the learning rate read from the state (current_hyperparams,
      # with_diagnostics) is lr, not lr / (1 - rho).
      learning_rate = constant_schedule(learning_rate)
  proximal = _proximal(eta, l1, l2, reg_mask, who="sgd", mask_name="reg_mask")
  return chain(first, scale_by_learning_rate(learning_rate), *proximal)


def _settled_step(learning_rate, momentum):
  """``lr / (1 - rho)``, the proximal step that matches the momentum's settled step (a
  schedule when either is one). Refuses ``rho = 1`` where it is known; a traced or scheduled
  ``1 - rho`` is kept at least the float's ``epsneg`` (the smallest ``1 - rho`` above 0)."""
  known = (taken_values(momentum) or ()) if callable(momentum) else (momentum,)
  if any(not isinstance(r, jax.core.Tracer) and float(r) >= 1 for r in known):
    raise ValueError(
      "sgd: `momentum` must be below 1 with `l1`/`l2`: the proximal step is lr / (1 - "
      "momentum), the step a momentum buffer takes once settled, and a buffer with "
      "momentum 1 never settles."
    )

  def one_minus(rho):
    if isinstance(rho, (int, float)):
      return 1 - rho
    rho = jnp.asarray(rho)
    return jnp.maximum(1 - rho, jnp.finfo(rho.dtype).epsneg)

  if not callable(learning_rate) and not callable(momentum):
    return learning_rate / one_minus(momentum)
  return lambda count: value_at(learning_rate, count) / one_minus(value_at(momentum, count))


__all__ = []  # and the builders it registers
