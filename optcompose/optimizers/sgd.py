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

from optcompose.core import (
  FLAG,
  LEARNING_RATE,
  GradientTransformation,
  ScalarOrSchedule,
  chain,
  identity,
  public,
  real,
)
from optcompose.optimizers._shared import _proximal
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
  momentum: Optional[float] = None,
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
  (ISTA; exact zeros), applied to the leaves selected by ``reg_mask`` (all by default).

  Chain: ``trace(momentum, nesterov)`` (or identity), ``scale_by_learning_rate(lr)``,
  [``prox_elastic_net(l1, l2, lr)``].

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    momentum: rho in [0, 1]; ``None`` (the default) keeps no momentum buffer.
    nesterov: use Nesterov's look-ahead ``g_t + rho v_t``; ignored without ``momentum``.
    accumulator_dtype: dtype of the stored momentum buffer ``v`` (e.g. ``jnp.bfloat16``);
      ``None`` keeps the parameters'.
    l1: L1 strength of the proximal step (>= 0, a number or a schedule; ours,
      keyword-only). ``None``: no L1 term.
    l2: L2 strength of the proximal step (>= 0; the step divides by ``1 + lr l2``; ours,
      keyword-only). ``None``: no L2 term. With ``l1`` and ``l2`` both ``None`` there is no
      proximal step; a number, even 0, keeps it (live under ``inject_hyperparams``).
    reg_mask: the leaves the proximal step applies to (a mask as ``add_decayed_weights``
      takes; ``None``: all).

  Returns:
    A :func:`chain` whose state is ``(TraceState or EmptyState, EmptyState[, EmptyState])``;
    a member given a schedule has an :class:`~optcompose.InjectHyperparamsState` instead.

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
  proximal = _proximal(learning_rate, l1, l2, reg_mask, who="sgd", mask_name="reg_mask")
  return chain(first, scale_by_learning_rate(learning_rate), *proximal)


__all__ = []  # and the builders it registers
