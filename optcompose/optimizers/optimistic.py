"""Optimistic methods: steps extrapolated from the last two directions, for min-max games
(GANs, saddle points) where plain gradient descent cycles or diverges.

Symbols: g gradient, w parameters, lr learning rate (a number or a schedule), t step count
from 1; r_t the direction before the optimistic step (g_t, or Adam's).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from optcompose.core import (
  DECAY,
  DTYPE,
  EPS,
  FLAG,
  LEARNING_RATE,
  GradientTransformation,
  ScalarOrSchedule,
  chain,
  public,
  real,
)
from optcompose.transforms.adaptive import scale_by_adam
from optcompose.transforms.optimistic import scale_by_optimistic_gradient
from optcompose.transforms.scaling import scale_by_learning_rate

_COEF = real(0.0, draw=(0.0, 2.0))


@public(
  "optimizer",
  optax="optimistic_gradient_descent",
  learning_rate=LEARNING_RATE,
  alpha=_COEF,
  beta=_COEF,
)
def optimistic_gradient_descent(
  learning_rate: ScalarOrSchedule, alpha: ScalarOrSchedule = 1.0, beta: ScalarOrSchedule = 1.0
) -> GradientTransformation:
  """Optimistic gradient descent: ``w <- w - lr ((alpha + beta) g_t - beta g_{t-1})``.

  Update (``g_0 = g_1``, so the first step is ``w <- w - lr alpha g_1``)::

      u_t = (alpha + beta) g_t - beta g_{t-1}
      w  <- w - lr u_t

  Chain: ``scale_by_optimistic_gradient(alpha, beta)``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    alpha: the gradient's coefficient, >= 0 (a number or a schedule).
    beta: the negative momentum's coefficient, >= 0 (a number or a schedule). Both ranges
      are stricter than Optax's, which checks none.

  Returns:
    A :func:`chain` whose state is ``(ScaleByOptimisticGradientState, EmptyState)`` (the
    second an :class:`~optcompose.InjectHyperparamsState` when ``learning_rate`` is a
    schedule).

  References:
    Mokhtari et al., "A Unified Analysis of Extra-gradient and Optimistic Gradient Methods
    for Saddle Point Problems: Proximal Point Approach", AISTATS 2020; Optax's
    ``optax.optimistic_gradient_descent``.
  """
  return chain(
    scale_by_optimistic_gradient(alpha=alpha, beta=beta), scale_by_learning_rate(learning_rate)
  )


@public(
  "optimizer",
  optax="optimistic_adam_v2",
  learning_rate=LEARNING_RATE,
  alpha=_COEF,
  beta=_COEF,
  b1=DECAY,
  b2=DECAY,
  eps=EPS,
  eps_root=real(0.0, draw=(0.0, 1e-6)),
  mu_dtype=DTYPE,
  nesterov=FLAG,
)
def optimistic_adam_v2(
  learning_rate: ScalarOrSchedule,
  *,
  alpha: ScalarOrSchedule = 1.0,
  beta: ScalarOrSchedule = 1.0,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-08,
  eps_root: ScalarOrSchedule = 0.0,
  mu_dtype: Optional[Any] = None,
  nesterov: bool = True,
) -> GradientTransformation:
  """Optimistic Adam: the optimistic step applied to Adam's (Nadam's by default) direction.

  Update (t from 1, ``m_0 = v_0 = 0``; with ``nesterov``, m_hat is Nadam's look-ahead
  ``b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)``)::

      m_t = b1 m_{t-1} + (1 - b1) g_t        m_hat = m_t / (1 - b1^t)
      v_t = b2 v_{t-1} + (1 - b2) g_t^2      v_hat = v_t / (1 - b2^t)
      r_t = m_hat / (sqrt(v_hat + eps_root) + eps)
      w  <- w - lr ((alpha + beta) r_t - beta r_{t-1})      (r_0 = r_1)

  Chain: ``scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)``,
  ``scale_by_optimistic_gradient(alpha, beta)``, ``scale_by_learning_rate``. (Optax's
  deprecated ``optimistic_adam`` is :func:`optimistic_adam`, a warning alias of this one.)

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    alpha: the coefficient of r_t, >= 0 (stricter than Optax, which checks none).
    beta: the negative momentum's coefficient, >= 0 (likewise).
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the second moment v, in [0, 1).
    eps: added after the square root (numerical stability).
    eps_root: added under the square root; 0 unless gradients are taken through the
      optimizer (meta-learning).
    mu_dtype: dtype of the stored m; ``None`` keeps the parameters'.
    nesterov: use Nadam's look-ahead first moment (True by default, as in Optax).

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdamState, ScaleByOptimisticGradientState,
    EmptyState)``; a member given a schedule has an
    :class:`~optcompose.InjectHyperparamsState` instead.

  References:
    Daskalakis et al., "Training GANs with Optimism", ICLR 2018; Optax's
    ``optax.optimistic_adam_v2``.
  """
  return chain(
    scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
    scale_by_optimistic_gradient(alpha=alpha, beta=beta),
    scale_by_learning_rate(learning_rate),
  )


def optimistic_adam(
  learning_rate: Any,
  optimism: Optional[Any] = None,
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-08,
  eps_root: Any = 0.0,
  mu_dtype: Optional[Any] = None,
  *,
  nesterov: bool = True,
) -> GradientTransformation:
  """Deprecated (as in Optax): use :func:`optimistic_adam_v2`.

  Optax's first Optimistic Adam folds the learning rate into the optimistic step:
  ``w <- w - ((lr + o) r_t - o r_{t-1})`` with ``o = optimism`` (``lr`` if None). That is
  ``optimistic_adam_v2(1.0, alpha=lr, beta=o, ...)``, which this returns. As in Optax,
  ``learning_rate`` cannot be a schedule here (``optimistic_adam_v2`` takes one).
  """
  warnings.warn(
    "optimistic_adam is deprecated (as in Optax): use `optimistic_adam_v2` "
    "instead, which takes the learning rate as a number or a schedule",
    DeprecationWarning,
    stacklevel=2,
  )
  if callable(learning_rate):
    raise ValueError(
      "optimistic_adam: learning_rate must be a number, not a schedule; "
      "optimistic_adam_v2(learning_rate, ...) takes a schedule"
    )
  return optimistic_adam_v2(
    1.0,
    alpha=learning_rate,
    beta=learning_rate if optimism is None else optimism,
    b1=b1,
    b2=b2,
    eps=eps,
    eps_root=eps_root,
    mu_dtype=mu_dtype,
    nesterov=nesterov,
  )


# The deprecated alias is not a registered builder (no case, no strategy): a function.
__all__ = ["optimistic_adam"]  # and the builders it registers
