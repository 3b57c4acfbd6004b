"""Layer-wise trust-ratio optimizers: LARS, LAMB and Fromage.

Symbols: g gradient, w parameters, lr learning rate (a number or a schedule), t step count
from 1; per leaf l, ``r_l = trust_coefficient * max(||w_l||, min_norm) / (max(||u_l||,
min_norm) + eps)`` (1 where either norm is 0) is the trust ratio of the update u reaching
``scale_by_trust_ratio`` (see :mod:`optcompose.transforms.trust_ratio`). The trust ratio is
one value per model leaf: FlatParams are refused.
"""

from __future__ import annotations

from optcompose.core import (
  DECAY,
  EPS,
  EPS_ROOT,
  FLAG,
  LEARNING_RATE,
  MASK,
  MOMENTUM,
  GradientTransformation,
  ScalarOrSchedule,
  chain,
  public,
  real,
)
from optcompose.transforms.adaptive import scale_by_adam
from optcompose.transforms.decay import Mask, add_decayed_weights
from optcompose.transforms.momentum import trace
from optcompose.transforms.scaling import scale_by_learning_rate
from optcompose.transforms.trust_ratio import fromage_step_sizes, scale_by_trust_ratio
from optcompose.wrappers.masking import masked

_WEIGHT_DECAY = real(0.0, draw=(0.0, 0.5))


@public(
  "optimizer",
  optax="lamb",
  learning_rate=LEARNING_RATE,
  b1=DECAY,
  b2=DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
  weight_decay=_WEIGHT_DECAY,
  mask=MASK,
)
def lamb(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-6,
  eps_root: ScalarOrSchedule = 0.0,
  weight_decay: ScalarOrSchedule = 0.0,
  mask: Mask = None,
) -> GradientTransformation:
  """LAMB: AdamW's direction, rescaled per leaf by its trust ratio.

  Update (m_hat, v_hat as in :func:`optcompose.adam`; per leaf l)::

      a_l = m_hat / (sqrt(v_hat + eps_root) + eps) + weight_decay w_l
      r_l = ||w_l|| / ||a_l||          (1 where either norm is 0)
      w_l <- w_l - lr r_l a_l

  Chain: ``scale_by_adam``, ``add_decayed_weights(weight_decay, mask)``,
  ``scale_by_trust_ratio()``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the second moment v, in [0, 1).
    eps: added after the square root (numerical stability).
    eps_root: added under the square root (see :func:`optcompose.adam`); 0 by default.
    weight_decay: lambda >= 0 (a number or a schedule; Optax accepts any number).
    mask: the leaves that are decayed (a tree of bools with the parameters' structure or a
      prefix of it, or a callable returning one from the parameters); ``None``: all.

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdamState, EmptyState, EmptyState,
    EmptyState)``; a member given a schedule has an
    :class:`~optcompose.InjectHyperparamsState` instead.

  References:
    You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
    ICLR 2020; Optax's ``optax.lamb``.
  """
  return chain(
    scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
    add_decayed_weights(weight_decay=weight_decay, mask=mask),
    scale_by_trust_ratio(),
    scale_by_learning_rate(learning_rate),
  )


@public(
  "optimizer",
  optax="lars",
  learning_rate=LEARNING_RATE,
  weight_decay=_WEIGHT_DECAY,
  weight_decay_mask=MASK,
  trust_coefficient=real(0.0, draw=(1e-4, 1.0), schedule=False),
  eps=EPS._replace(schedule=False),
  trust_ratio_mask=MASK,
  momentum=MOMENTUM,
  nesterov=FLAG,
)
def lars(
  learning_rate: ScalarOrSchedule,
  weight_decay: ScalarOrSchedule = 0.0,
  weight_decay_mask: Mask = True,
  trust_coefficient: float = 0.001,
  eps: float = 0.0,
  trust_ratio_mask: Mask = True,
  momentum: ScalarOrSchedule = 0.9,
  nesterov: bool = False,
) -> GradientTransformation:
  """LARS: SGD with momentum on the weight-decayed gradient rescaled by its trust ratio.

  Update (per leaf l; v the momentum, ``v_0 = 0``)::

      a_l = g_l + weight_decay w_l
      r_l = trust_coefficient ||w_l|| / (||a_l|| + eps)   (1 where either norm is 0)
      v_l <- momentum v_l - lr r_l a_l                     w_l <- w_l + v_l
      nesterov: w_l <- w_l + momentum v_l - lr r_l a_l

  ``weight_decay_mask`` and ``trust_ratio_mask`` select the leaves that are decayed and
  rescaled; ``True`` (the default, as in Optax) selects every leaf.

  Chain: ``add_decayed_weights(weight_decay, weight_decay_mask)``,
  ``masked(scale_by_trust_ratio(trust_coefficient=..., eps=...), trust_ratio_mask)``,
  ``scale_by_learning_rate``, ``trace(momentum, nesterov)``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    weight_decay: lambda >= 0 (a number or a schedule; Optax accepts any number).
    weight_decay_mask: the leaves that are decayed: ``True`` (all), a tree of bools with the
      parameters' structure or a prefix of it, or a callable returning one.
    trust_coefficient: the trust ratio's multiplier (>= 0; Optax accepts any number).
    eps: added to the update's norm in the trust ratio's denominator (>= 0).
    trust_ratio_mask: the leaves that are rescaled by their trust ratio (a mask as
      ``weight_decay_mask``; ``True``: all).
    momentum: the momentum's decay, in [0, 1].
    nesterov: use Nesterov's look-ahead momentum.

  Returns:
    A :func:`chain` whose state is ``(EmptyState, MaskedState(EmptyState), EmptyState,
    TraceState)`` (Optax's leaves; a member given a schedule has an
    :class:`~optcompose.InjectHyperparamsState` instead).

  References:
    You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks", 2017;
    Optax's ``optax.lars``.
  """
  return chain(
    add_decayed_weights(weight_decay, mask=weight_decay_mask),
    masked(scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps), trust_ratio_mask),
    scale_by_learning_rate(learning_rate),
    trace(decay=momentum, nesterov=nesterov),
  )


@public(
  "optimizer",
  optax="fromage",
  learning_rate=LEARNING_RATE._replace(optional=False),  # it scales the weight decay too
  min_norm=real(0.0, draw=(1e-8, 1e-3), schedule=False),
)
def fromage(learning_rate: ScalarOrSchedule, min_norm: float = 1e-6) -> GradientTransformation:
  """Fromage: a step of relative size lr along the gradient, then a shrink by mu.

  Update (per leaf l; ``mu = 1 / sqrt(1 + lr^2)``, from the schedule's value at each step
  when lr is a schedule)::

      r_l = max(||w_l||, min_norm) / max(||g_l||, min_norm)
      w_l <- mu (w_l - lr r_l g_l)

  Chain: ``scale_by_trust_ratio(min_norm)``, ``scale_by_learning_rate(lr mu)``,
  ``add_decayed_weights(mu - 1)`` (a negative rate added after the learning-rate step).

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    min_norm: the smallest norm used for the parameters and the gradient (>= 0), so a
      zero-initialised leaf still moves.

  Returns:
    A :func:`chain` whose state is ``(EmptyState, EmptyState, EmptyState)``; with a
    scheduled lr, the last two are :class:`~optcompose.InjectHyperparamsState`.

  References:
    Bernstein, Vahdat, Yue and Liu, "On the distance between two neural networks and the
    stability of learning", NeurIPS 2020; Optax's ``optax.fromage``.
  """
  step, shrink = fromage_step_sizes(learning_rate)
  return chain(
    scale_by_trust_ratio(min_norm), scale_by_learning_rate(step), add_decayed_weights(shrink)
  )


__all__ = []  # and the builders it registers
