"""Classic optimizers: Adadelta, NovoGrad, SM3, Rprop, SGD with Polyak's step size, and SGD
with gradient noise.

Symbols: g gradient, w parameters, lr learning rate (a number or a schedule), t step count
from 1, f the objective's value (``update(..., value=f)``).
"""

from __future__ import annotations

from typing import Any, Optional

from optcompose.core import (
  DECAY,
  EPS,
  EPS_POSITIVE,
  EPS_ROOT,
  LEARNING_RATE,
  MASK,
  GradientTransformation,
  ScalarOrSchedule,
  chain,
  choice,
  public,
  real,
)
from optcompose.optimizers.sgd import sgd
from optcompose.transforms.classic import scale_by_adadelta, scale_by_novograd, scale_by_sm3
from optcompose.transforms.decay import Mask, add_decayed_weights
from optcompose.transforms.noise import add_noise
from optcompose.transforms.scaling import scale, scale_by_learning_rate
from optcompose.transforms.step_size import scale_by_polyak, scale_by_rprop

_FIXED = dict(schedule=False)


@public(
  "optimizer",
  optax="adadelta",
  learning_rate=real(0.0, draw=(0.1, 10.0), optional=True),
  rho=real(0.0, 1.0, draw=(0.0, 0.99), **_FIXED),
  eps=EPS_POSITIVE,
  weight_decay=real(0.0, draw=(0.0, 0.1)),
  weight_decay_mask=MASK,
)
def adadelta(
  learning_rate: Optional[ScalarOrSchedule] = None,
  rho: float = 0.9,
  eps: ScalarOrSchedule = 1e-6,
  weight_decay: ScalarOrSchedule = 0.0,
  weight_decay_mask: Mask = None,
) -> GradientTransformation:
  """Adadelta: steps scaled by the ratio of the running RMS of updates to that of gradients.

  Update (``E[.]_0 = 0``)::

      g'        = g + weight_decay w
      E[g^2]_t  = rho E[g^2]_{t-1} + (1 - rho) g'^2
      dx        = sqrt(E[dx^2]_{t-1} + eps) / sqrt(E[g^2]_t + eps) g'
      E[dx^2]_t = rho E[dx^2]_{t-1} + (1 - rho) dx^2
      w        <- w - lr dx

  ``learning_rate=None`` (the default) is the paper's Adadelta, ``w <- w - dx`` (lr = 1).
  Optax 0.2.8 turns ``None`` into no scaling at all, so its default ``adadelta()`` adds
  ``+dx`` and *ascends*; ours descends (a deliberate difference).

  Chain: ``add_decayed_weights(weight_decay, weight_decay_mask)``, ``scale_by_adadelta``,
  ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule; ``None`` means lr = 1.
    rho: the decay of both running means, in [0, 1].
    eps: > 0, added under both square roots.
    weight_decay: >= 0 (a number or a schedule), added to the gradient before the scaling.
    weight_decay_mask: the leaves that are decayed (a tree of bools or a callable of the
      parameters); ``None``: all.

  Returns:
    A :func:`chain` whose state is ``(EmptyState, ScaleByAdaDeltaState, EmptyState)`` (a
    member given a schedule has an :class:`~optcompose.InjectHyperparamsState` instead).

  References:
    Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012; Optax's
    ``optax.adadelta``.
  """
  return chain(
    add_decayed_weights(weight_decay, mask=weight_decay_mask),
    scale_by_adadelta(rho=rho, eps=eps),
    scale_by_learning_rate(1.0 if learning_rate is None else learning_rate),
  )


@public(
  "optimizer",
  optax="novograd",
  learning_rate=LEARNING_RATE,
  b1=real(0.0, 1.0, draw=(0.0, 0.99)),
  b2=DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
  weight_decay=real(0.0, draw=(0.0, 0.1)),
)
def novograd(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.25,
  eps: ScalarOrSchedule = 1e-6,
  eps_root: ScalarOrSchedule = 0.0,
  weight_decay: ScalarOrSchedule = 0.0,
) -> GradientTransformation:
  """NovoGrad: momentum of gradients normalised by their layer's (leaf's) running norm.

  Update, per leaf (``n`` a scalar per leaf; first step: ``n_1 = ||g_1||^2``, ``m_1`` the
  added term alone)::

      n_t = b2 n_{t-1} + (1 - b2) ||g_t||^2
      m_t = b1 m_{t-1} + g_t / (sqrt(n_t + eps_root) + eps) + weight_decay w
      w  <- w - lr m_t

  Chain: ``scale_by_novograd``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule.
    b1: the momentum of m, in [0, 1].
    b2: the decay of n, in [0, 1).
    eps: added after the square root.
    eps_root: added under the square root; not both 0 with ``eps``.
    weight_decay: >= 0 (a number or a schedule), inside the momentum.

  Returns:
    A :func:`chain` whose state is ``(ScaleByNovogradState, EmptyState)``. FlatParams are
    refused (the norms are per model leaf).

  References:
    Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for
    Training of Deep Networks", arXiv:1905.11286, 2019; Optax's ``optax.novograd``.
  """
  return chain(
    scale_by_novograd(b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay),
    scale_by_learning_rate(learning_rate),
  )


@public(
  "optimizer",
  optax="sm3",
  learning_rate=LEARNING_RATE._replace(optional=False),  # Optax's refuses None
  momentum=real(0.0, 1.0, draw=(0.0, 0.99)),
)
def sm3(
  learning_rate: ScalarOrSchedule, momentum: ScalarOrSchedule = 0.9
) -> GradientTransformation:
  """SM3: an Adagrad-like accumulator kept as one cover vector per axis, with momentum.

  Update, per leaf (covers ``mu_i`` broadcast along axis i)::

      a    = g^2 + min_i mu_i;   mu_i = max of a over every axis but i
      nu   = momentum nu + (1 - momentum) g / sqrt(a + 1e-8)     (0 where a = 0)
      w   <- w - lr nu

  Chain: ``scale_by_sm3(momentum)``, ``scale_by_learning_rate`` (Optax's ``scale(-lr)``:
  the same product; ours also accepts a schedule).

  Args:
    learning_rate: lr >= 0, a number or a schedule.
    momentum: b1 in [0, 1].

  Returns:
    A :func:`chain` whose state is ``(ScaleBySM3State, EmptyState)``. FlatParams are refused.

  References:
    Anil, Gupta, Koren and Singer, "Memory-Efficient Adaptive Optimization", NeurIPS 2019;
    Optax's ``optax.sm3``.
  """
  return chain(scale_by_sm3(momentum), scale_by_learning_rate(learning_rate))


@public(
  "optimizer",
  optax="rprop",
  learning_rate=real(0.0, draw=(1e-4, 1.0), **_FIXED),
  eta_minus=real(0.0, 1.0, low_open=True, draw=(0.1, 0.9), **_FIXED),
  eta_plus=real(1.0, draw=(1.0, 2.0), **_FIXED),
  min_step_size=real(0.0, draw=(1e-8, 1e-4), **_FIXED),
  max_step_size=real(0.0, draw=(1.0, 100.0), **_FIXED),
)
def rprop(
  learning_rate: float,
  eta_minus: float = 0.5,
  eta_plus: float = 1.2,
  min_step_size: float = 1e-6,
  max_step_size: float = 50.0,
) -> GradientTransformation:
  """Rprop: per-element steps of adaptive size in the direction of ``-sign(g)``.

  Update, per element (``s_0 = learning_rate``, ``d_0 = 0``)::

      p   = g_t d_{t-1}
      s_t = s_{t-1} where p = 0, else clip(s_{t-1} (eta_plus if p > 0 else eta_minus),
                                            min_step_size, max_step_size)
      d_t = 0 where p < 0, else s_t sign(g_t)
      w  <- w - (0 where p < 0, else d_{t-1})

  The applied step is the one stored at the previous call (Optax's one-step lag; the first
  step is 0).

  Chain: ``scale_by_rprop``, ``scale(-1)``.

  Args:
    learning_rate: the initial step size (>= 0, a number).
    eta_minus: the shrink factor, in (0, 1].
    eta_plus: the growth factor, >= 1.
    min_step_size: the smallest step size (>= 0).
    max_step_size: the largest step size (>= ``min_step_size``).

  Returns:
    A :func:`chain` whose state is ``(ScaleByRpropState, EmptyState)``.

  References:
    Riedmiller and Braun, "A Direct Adaptive Method for Faster Backpropagation Learning:
    The RPROP Algorithm", IEEE ICNN 1993; Optax's ``optax.rprop``.
  """
  return chain(
    scale_by_rprop(
      learning_rate=learning_rate,
      eta_minus=eta_minus,
      eta_plus=eta_plus,
      min_step_size=min_step_size,
      max_step_size=max_step_size,
    ),
    scale(-1.0),
  )


@public(
  "optimizer",
  optax="polyak_sgd",
  max_learning_rate=real(0.0, draw=(1e-3, 10.0), **_FIXED),
  scaling=real(0.0, draw=(0.1, 1.0)),
  f_min=real(draw=(-1.0, 0.0), **_FIXED),
  eps=real(0.0, draw=(0.0, 1e-6), **_FIXED),
  variant=choice("sps", "sps+"),
)
def polyak_sgd(
  max_learning_rate: float = 1.0,
  scaling: ScalarOrSchedule = 1.0,
  f_min: float = 0.0,
  eps: float = 0.0,
  variant: str = "sps",
) -> GradientTransformation:
  """SGD with Polyak's step size: ``w <- w - step scaling g`` from the objective's gap.

  Update (``f`` given as ``update(..., value=f)``; ``d = scaling g``)::

      gap  = f - f_min                 (variant "sps+": max(gap, 0))
      step = 0 if ||d||^2 + eps <= 2^-52 else min(gap / (||d||^2 + eps), max_learning_rate)
      w   <- w - step d

  Chain: ``sgd(scaling)``, ``scale_by_polyak(f_min, max_learning_rate, eps, variant)``.

  Args:
    max_learning_rate: the largest step (>= 0, a number).
    scaling: >= 0, multiplies the gradient before the step is computed (a number or a
      schedule).
    f_min: a lower bound f* of the objective.
    eps: >= 0, added to the squared norm.
    variant: ``"sps"`` or ``"sps+"``.

  Returns:
    A :func:`chain` whose state is ``((EmptyState, EmptyState), EmptyState)``; its
    ``update`` needs ``value=``.

  References:
    Loizou, Vaswani, Laradji and Lacoste-Julien, "Stochastic Polyak Step-size for SGD",
    AISTATS 2021; Optax's ``optax.polyak_sgd``.
  """
  return chain(
    sgd(learning_rate=scaling),
    scale_by_polyak(max_learning_rate=max_learning_rate, f_min=f_min, eps=eps, variant=variant),
  )


@public(
  "optimizer",
  optax="noisy_sgd",
  learning_rate=LEARNING_RATE,
  eta=real(0.0, draw=(0.0, 0.1), **_FIXED),
  gamma=real(0.0, draw=(0.0, 1.0), **_FIXED),
)
def noisy_sgd(
  learning_rate: ScalarOrSchedule,
  eta: float = 0.01,
  gamma: float = 0.55,
  key: Optional[Any] = None,
  *,
  seed: Optional[int] = None,
) -> GradientTransformation:
  """SGD on gradients with annealed Gaussian noise: ``w <- w - lr (g + sigma_t z)``.

  Update (t from 1, z standard normal, Optax's random stream)::

      sigma_t = sqrt(eta / t^gamma)
      w      <- w - lr (g + sigma_t z)

  Chain: ``add_noise(eta, gamma, key)``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule.
    eta: the base variance (>= 0).
    gamma: the annealing exponent (>= 0).
    key: an int seed or a PRNG key (see :func:`add_noise`); ``None`` means seed 0.
    seed: deprecated spelling of an int ``key``, as in Optax.

  Returns:
    A :func:`chain` whose state is ``(AddNoiseState, EmptyState)`` (the key kept as raw
    uint32 data). FlatParams are refused.

  References:
    Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks",
    arXiv:1511.06807, 2015; Optax's ``optax.noisy_sgd``.
  """
  return chain(add_noise(eta, gamma, key, seed=seed), scale_by_learning_rate(learning_rate))


__all__ = []  # and the builders it registers
