"""Adam's variants: AdaBelief, RAdam, AMSGrad, Yogi, AdaMax (and AdaMaxW) and Adan.

Each is a chain of its scaling (:mod:`optcompose.transforms.adaptive_variants`,
:mod:`optcompose.transforms.adaptive_moments`), optionally ``add_decayed_weights``, and
``scale_by_learning_rate``. Symbols: g gradient, w parameters, lr learning rate (a number or
a schedule), t step count from 1; m_hat, v_hat the debiased moments of :func:`adam`.
"""

from __future__ import annotations

from typing import Any, Optional

from optcompose.core import (
  DECAY,
  DTYPE,
  EPS,
  EPS_POSITIVE,
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
from optcompose.transforms.adaptive_moments import scale_by_adamax, scale_by_adan, scale_by_yogi
from optcompose.transforms.adaptive_variants import (
  FIXED_DECAY,
  RADAM_THRESHOLD,
  scale_by_amsgrad,
  scale_by_belief,
  scale_by_radam,
)
from optcompose.transforms.decay import Mask, add_decayed_weights
from optcompose.transforms.scaling import scale_by_learning_rate

_MOMENTS = dict(learning_rate=LEARNING_RATE, b1=DECAY, b2=DECAY, eps=EPS, eps_root=EPS_ROOT)
_DECOUPLED = dict(weight_decay=real(0.0, draw=(0.0, 0.5)), mask=MASK)


@public("optimizer", optax="adabelief", nesterov=FLAG, **_MOMENTS)
def adabelief(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-16,
  eps_root: ScalarOrSchedule = 1e-16,
  *,
  nesterov: bool = False,
) -> GradientTransformation:
  """AdaBelief: Adam whose second moment is the EMA of the squared prediction error ``g - m``.

  Update (t from 1, ``m_0 = s_0 = 0``)::

      m_t = b1 m_{t-1} + (1 - b1) g_t                       m_hat = m_t / (1 - b1^t)
      s_t = b2 s_{t-1} + (1 - b2) (g_t - m_t)^2 + eps_root  s_hat = s_t / (1 - b2^t)
      w  <- w - lr m_hat / (sqrt(s_hat) + eps)

  Chain: ``scale_by_belief``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the statistic s, in [0, 1).
    eps: added after the square root.
    eps_root: added to s at every step (eps and eps_root may not both be 0).
    nesterov: use Nadam's look-ahead first moment (see :func:`nadam`).

  Returns:
    A :func:`chain` whose state is ``(ScaleByBeliefState, EmptyState)`` (the second an
    :class:`~optcompose.InjectHyperparamsState` when ``learning_rate`` is a schedule).

  References:
    Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
    Gradients", NeurIPS 2020; Optax's ``optax.adabelief``.
  """
  return chain(
    scale_by_belief(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov),
    scale_by_learning_rate(learning_rate),
  )


@public(
  "optimizer",
  optax="radam",
  nesterov=FLAG,
  **{**_MOMENTS, "b2": FIXED_DECAY, "threshold": RADAM_THRESHOLD},
)
def radam(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: float = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  threshold: float = 5.0,
  *,
  nesterov: bool = False,
) -> GradientTransformation:
  """Rectified Adam: Adam's step times the rectification ``r_t``, plain momentum at first.

  Update (t from 1)::

      rho_inf = 2 / (1 - b2) - 1          rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
      r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
      w  <- w - lr r_t m_hat / (sqrt(v_hat + eps_root) + eps)   if rho_t >= threshold
      w  <- w - lr m_hat                                        otherwise

  Chain: ``scale_by_radam``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the second moment v, in [0, 1) (a number).
    eps: added after the square root.
    eps_root: added under the square root; 0 by default.
    threshold: the rho_t from which the rectified step is taken, >= 4 (stricter than
      Optax: see :func:`scale_by_radam`).
    nesterov: use Nadam's look-ahead first moment (see :func:`nadam`).

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdamState, EmptyState)``.

  References:
    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020;
    Optax's ``optax.radam``.
  """
  return chain(
    scale_by_radam(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root, threshold=threshold, nesterov=nesterov
    ),
    scale_by_learning_rate(learning_rate),
  )


@public(
  "optimizer",
  optax="amsgrad",
  mu_dtype=DTYPE,
  bias_correction_mu=FLAG,
  bias_correction_nu=FLAG,
  **_MOMENTS,
)
def amsgrad(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  mu_dtype: Optional[Any] = None,
  bias_correction_mu: bool = True,
  bias_correction_nu: bool = True,
) -> GradientTransformation:
  """AMSGrad: Adam dividing by the running maximum of the second moment.

  Update (t from 1)::

      v_max_t = max(v_max_{t-1}, v_hat_t)
      w      <- w - lr m_hat / (sqrt(v_max_t + eps_root) + eps)

  Chain: ``scale_by_amsgrad``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the second moment v, in [0, 1).
    eps: added after the square root.
    eps_root: added under the square root; 0 by default.
    mu_dtype: dtype of the stored m; ``None`` keeps the parameters'.
    bias_correction_mu: debias m (False: the original paper's AMSGrad).
    bias_correction_nu: debias v before the maximum (False: the original paper's).

  Returns:
    A :func:`chain` whose state is ``(ScaleByAmsgradState, EmptyState)``.

  References:
    Reddi, Kale and Kumar, "On the Convergence of Adam and Beyond", ICLR 2018; Optax's
    ``optax.amsgrad``.
  """
  return chain(
    scale_by_amsgrad(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      bias_correction_mu=bias_correction_mu,
      bias_correction_nu=bias_correction_nu,
    ),
    scale_by_learning_rate(learning_rate),
  )


@public(
  "optimizer", optax="yogi", learning_rate=LEARNING_RATE, b1=DECAY, b2=DECAY, eps=EPS_POSITIVE
)
def yogi(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-3,
) -> GradientTransformation:
  """Yogi: Adam with an additive, sign-corrected second moment.

  Update (t from 1, ``m_0 = v_0 = 1e-6``)::

      v_t = v_{t-1} - (1 - b2) sign(v_{t-1} - g_t^2) g_t^2
      w  <- w - lr m_hat / (sqrt(v_hat) + eps)

  Chain: ``scale_by_yogi(b1, b2, eps)``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the rate of the second moment v, in [0, 1).
    eps: added after the square root (> 0 here: ``eps_root`` is 0).

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdamState, EmptyState)``.

  References:
    Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018; Optax's
    ``optax.yogi``.
  """
  return chain(scale_by_yogi(b1=b1, b2=b2, eps=eps), scale_by_learning_rate(learning_rate))


_ADAMAX = dict(learning_rate=LEARNING_RATE, b1=DECAY, b2=MOMENTUM, eps=EPS_POSITIVE)


@public("optimizer", optax="adamax", **_ADAMAX)
def adamax(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
) -> GradientTransformation:
  """AdaMax: the debiased first moment over an exponentially weighted infinity norm.

  Update (t from 1, ``m_0 = v_0 = 0``)::

      v_t = max(b2 v_{t-1}, |g_t| + eps)
      w  <- w - lr m_hat / v_t

  Chain: ``scale_by_adamax``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the infinity norm v, in [0, 1].
    eps: added to |g|, > 0 (stricter than Optax, see :func:`scale_by_adamax`).

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdamState, EmptyState)``.

  References:
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (section 7.1);
    Optax's ``optax.adamax``.
  """
  return chain(scale_by_adamax(b1=b1, b2=b2, eps=eps), scale_by_learning_rate(learning_rate))


@public("optimizer", optax="adamaxw", **_ADAMAX, **_DECOUPLED)
def adamaxw(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  weight_decay: ScalarOrSchedule = 1e-4,
  mask: Mask = None,
) -> GradientTransformation:
  """AdaMaxW: AdaMax with decoupled weight decay.

  Update (m_hat, v_t as in :func:`adamax`)::

      w <- w - lr (m_hat / v_t + weight_decay w)

  Chain: ``scale_by_adamax``, ``add_decayed_weights(weight_decay, mask)``,
  ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the first moment m, in [0, 1).
    b2: the decay of the infinity norm v, in [0, 1].
    eps: added to |g|, > 0.
    weight_decay: lambda >= 0 (a number or a schedule), multiplied by lr.
    mask: the leaves that are decayed (a tree of bools or a callable of the parameters, as
      in :func:`adamw`); ``None``: all.

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdamState, EmptyState, EmptyState)``.

  References:
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015; Loshchilov and
    Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; Optax's ``optax.adamaxw``.
  """
  return chain(
    scale_by_adamax(b1=b1, b2=b2, eps=eps),
    add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate),
  )


@public("optimizer", optax="adan", b3=FIXED_DECAY, **_MOMENTS, **_DECOUPLED)
def adan(
  learning_rate: ScalarOrSchedule,
  b1: ScalarOrSchedule = 0.98,
  b2: ScalarOrSchedule = 0.92,
  b3: float = 0.99,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 1e-8,
  weight_decay: ScalarOrSchedule = 0.0,
  mask: Mask = None,
) -> GradientTransformation:
  """Adan: Nesterov-type moments of the gradient and of its difference, with decoupled decay.

  Update (t from 1; d_t = g_t - g_{t-1}, 0 at t = 1)::

      m_t = EMA_b1(g),  v_t = EMA_b2(d),  n_t = EMA_b3((g_t + (1 - b2) d_t)^2)   (debiased)
      w  <- w - lr ((m_hat + (1 - b2) v_hat) / (sqrt(n_hat + eps_root) + eps)
                    + weight_decay w)

  Chain: ``scale_by_adan``, ``add_decayed_weights(weight_decay, mask)``,
  ``scale_by_learning_rate``. (The paper's decay divides the stepped weights by ``1 + lr
  weight_decay``; Optax, and this recipe, subtract ``lr weight_decay w`` instead.)

  Args:
    learning_rate: lr >= 0, a number or a schedule of the step count.
    b1: the decay of the gradients' EMA m, in [0, 1).
    b2: the decay of the differences' EMA v, in [0, 1).
    b3: the decay of the squared term's EMA n, in [0, 1) (a number).
    eps: added after the square root.
    eps_root: added under the square root.
    weight_decay: lambda >= 0 (a number or a schedule), multiplied by lr; 0 by default.
    mask: the leaves that are decayed (as in :func:`adamw`); ``None``: all.

  Returns:
    A :func:`chain` whose state is ``(ScaleByAdanState, EmptyState, EmptyState)``.

  References:
    Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
    Models", TPAMI 2024; Optax's ``optax.adan``.
  """
  return chain(
    scale_by_adan(b1=b1, b2=b2, b3=b3, eps=eps, eps_root=eps_root),
    add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate),
  )


__all__ = []  # and the builders it registers
