"""AdaGrad and RMSProp: a per-coordinate step from a second-moment statistic.

Symbols: g gradient, w parameters, lr learning rate (a number or a schedule).
"""

from __future__ import annotations

from typing import Optional

from optcompose.core import (
  DECAY,
  EPS,
  EPS_POSITIVE,
  FLAG,
  LEARNING_RATE,
  GradientTransformation,
  ScalarOrSchedule,
  chain,
  identity,
  public,
  real,
)
from optcompose.transforms.momentum import trace
from optcompose.transforms.scaling import scale_by_learning_rate
from optcompose.transforms.second_moment import (
  _RMS_HYPERS,
  scale_by_rms,
  scale_by_rss,
  scale_by_stddev,
)


@public(
  "optimizer",
  optax="adagrad",
  learning_rate=LEARNING_RATE,
  initial_accumulator_value=real(0.0, draw=(0.0, 1.0), schedule=False),
  eps=EPS,
)
def adagrad(
  learning_rate: ScalarOrSchedule,
  initial_accumulator_value: float = 0.1,
  eps: ScalarOrSchedule = 1e-7,
) -> GradientTransformation:
  """AdaGrad: ``G_t = G_{t-1} + g_t^2``, ``w <- w - lr g_t / sqrt(G_t + eps)``.

  Update: ``G_t = G_{t-1} + g_t^2``; ``w <- w - lr g_t / sqrt(G_t + eps)`` (no step
  where ``G_t = 0``).

  ``G_0 = initial_accumulator_value`` (Optax's default 0.1). The effective step shrinks as
  ``1/sqrt(t)`` under a constant gradient.

  Chain: ``scale_by_rss``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    initial_accumulator_value: ``G_0`` (>= 0), a number.
    eps: added under the square root (>= 0).

  Returns:
    A :func:`chain` whose state is ``(ScaleByRssState, EmptyState)`` (the second an
    :class:`~optcompose.InjectHyperparamsState` when ``learning_rate`` is a schedule).

  References:
    Duchi, Hazan and Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011; Optax's ``optax.adagrad``.
  """
  return chain(
    scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps),
    scale_by_learning_rate(learning_rate),
  )


@public(
  "optimizer",
  optax="rmsprop",
  learning_rate=LEARNING_RATE,
  decay=DECAY,
  eps=EPS_POSITIVE,
  initial_scale=_RMS_HYPERS["initial_scale"],
  centered=FLAG,
  momentum=real(0.0, 1.0, draw=(0.0, 0.999), optional=True),
  nesterov=FLAG,
)
def rmsprop(
  learning_rate: ScalarOrSchedule,
  decay: ScalarOrSchedule = 0.9,
  eps: ScalarOrSchedule = 1e-8,
  initial_scale: float = 0.0,
  eps_in_sqrt: bool = True,
  centered: bool = False,
  momentum: Optional[ScalarOrSchedule] = None,
  nesterov: bool = False,
  bias_correction: bool = False,
) -> GradientTransformation:
  """RMSProp: ``v_t = decay v_{t-1} + (1 - decay) g_t^2``, ``w <- w - lr g_t / sqrt(v_t + eps)``.

  Update (t from 1, ``v_0 = initial_scale``)::

      v_t = decay v_{t-1} + (1 - decay) g_t^2     (bias_correction: v_t / (1 - decay^t))
      w  <- w - lr g_t / sqrt(v_t + eps)          (eps_in_sqrt=False: sqrt(v_t) + eps)

  ``centered`` divides by ``sqrt(v_t - m_t^2 + eps)`` with m the EMA of g (Graves 2013).
  ``momentum`` applies a trace to the *scaled* update, as Optax does:
  ``b_t = momentum b_{t-1} + lr g_t / sqrt(...)``, ``w <- w - b_t``.

  Chain: ``scale_by_rms`` (or ``scale_by_stddev``), ``scale_by_learning_rate``,
  ``trace(momentum)`` (or identity).

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    decay: the decay of v (and of m when centered), in [0, 1).
    eps: the regularising constant (>= 0).
    initial_scale: ``v_0`` (>= 0), a number.
    eps_in_sqrt: True (the default, Optax's): ``eps`` under the square root; False: added
      after it, as in PyTorch.
    centered: divide by the estimated standard deviation ``sqrt(v_t - m_t^2 + eps)``.
    momentum: the trace's coefficient in [0, 1]; ``None`` (the default): no trace.
    nesterov: Nesterov's look-ahead in the trace; ignored without ``momentum``.
    bias_correction: divide the moments by ``1 - decay^t`` before use (the state keeps a
      count).

  Returns:
    A :func:`chain` whose state is ``(ScaleByRmsState, EmptyState, EmptyState)``; the
    first is a ``ScaleByRStdDevState`` when ``centered`` (each the ``...WithCountState``
    variant with ``bias_correction``), the last a ``TraceState`` with ``momentum``.

  References:
    Tieleman and Hinton, Lecture 6.5 of "Neural Networks for Machine Learning", Coursera,
    2012; Graves, "Generating Sequences With Recurrent Neural Networks", arXiv:1308.0850,
    2013; Optax's ``optax.rmsprop``.
  """
  stat = scale_by_stddev if centered else scale_by_rms
  return chain(
    stat(
      decay=decay,
      eps=eps,
      initial_scale=initial_scale,
      eps_in_sqrt=eps_in_sqrt,
      bias_correction=bias_correction,
    ),
    scale_by_learning_rate(learning_rate),
    trace(decay=momentum, nesterov=nesterov) if momentum is not None else identity(),
  )


__all__ = []  # and the builders it registers
