"""Optimizers as short chains of primitives, with Optax's names, arguments and defaults.

No alias contains math of its own: each is a recipe of transformations from
``optcompose.transforms``. Symbols: g gradient, w parameters, lr learning rate (a number or a
schedule), t step count from 1.

Extensions beyond Optax are keyword-only and off by default (``None``), so the default state
is Optax's: ``sgd(..., l1=, l2=)`` and ``adamw(..., l1=)`` append a proximal elastic-net / L1
step after the learning-rate step (see :mod:`optcompose.transforms.proximal`). Under
``inject_hyperparams`` a strength given as a number (even 0) becomes live, so the step is
kept; leave it ``None`` to have no proximal step.
"""

from __future__ import annotations

from typing import Any, Optional

from optcompose._core import GradientTransformation, ScalarOrSchedule, chain, identity
from optcompose.transforms.decay import Mask, add_decayed_weights
from optcompose.transforms.momentum import trace
from optcompose.transforms.moments import scale_by_adam, scale_by_rms, scale_by_rss, scale_by_stddev
from optcompose.transforms.proximal import prox_elastic_net
from optcompose.transforms.scaling import scale_by_learning_rate


def _proximal(learning_rate, l1, l2, mask) -> tuple:
  """The optional proximal step; nothing when neither strength is given (``None``)."""
  if l1 is None and l2 is None:
    return ()
  return (prox_elastic_net(0.0 if l1 is None else l1, 0.0 if l2 is None else l2,
                           learning_rate, mask),)


def sgd(learning_rate: ScalarOrSchedule, momentum: Optional[float] = None,
        nesterov: bool = False, accumulator_dtype: Optional[Any] = None, *,
        l1: Optional[ScalarOrSchedule] = None, l2: Optional[ScalarOrSchedule] = None,
        reg_mask: Mask = None) -> GradientTransformation:
  """Stochastic gradient descent, with optional (Nesterov) momentum and elastic net.

  Without momentum ``w <- w - lr g``. With momentum rho::

      v_t = rho v_{t-1} + g_t
      w  <- w - lr v_t                (heavy ball)
      w  <- w - lr (g_t + rho v_t)    (nesterov=True)

  With ``l1``/``l2`` the step is followed by the proximal map of ``l1 |w|_1 + l2/2 |w|^2``
  (ISTA; exact zeros), applied to the leaves selected by ``reg_mask`` (all by default).

  Chain: ``trace(momentum, nesterov)`` (or identity), ``scale_by_learning_rate(lr)``,
  [``prox_elastic_net(l1, l2, lr)``].

  References: Robbins and Monro, 1951; Polyak, 1964; Sutskever et al., ICML 2013;
  Beck and Teboulle, "A Fast Iterative Shrinkage-Thresholding Algorithm", 2009.
  """
  first = (trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
           if momentum is not None else identity())
  return chain(first, scale_by_learning_rate(learning_rate),
               *_proximal(learning_rate, l1, l2, reg_mask))


def adagrad(learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.1,
            eps: float = 1e-7) -> GradientTransformation:
  """AdaGrad: ``G_t = G_{t-1} + g_t^2``, ``w <- w - lr g_t / sqrt(G_t + eps)``.

  ``G_0 = initial_accumulator_value`` (Optax's default 0.1). The effective step shrinks as
  ``1/sqrt(t)`` under a constant gradient.

  Chain: ``scale_by_rss``, ``scale_by_learning_rate``.

  References: Duchi, Hazan and Singer, JMLR 2011.
  """
  return chain(scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps),
               scale_by_learning_rate(learning_rate))


def rmsprop(learning_rate: ScalarOrSchedule, decay: float = 0.9, eps: float = 1e-8,
            initial_scale: float = 0.0, eps_in_sqrt: bool = True, centered: bool = False,
            momentum: Optional[float] = None, nesterov: bool = False,
            bias_correction: bool = False) -> GradientTransformation:
  """RMSProp: ``v_t = decay v_{t-1} + (1 - decay) g_t^2``, ``w <- w - lr g_t / sqrt(v_t + eps)``.

  ``centered`` divides by ``sqrt(v_t - m_t^2 + eps)`` with m the EMA of g (Graves 2013).
  ``momentum`` applies a trace to the *scaled* update, as Optax does:
  ``b_t = momentum b_{t-1} + lr g_t / sqrt(...)``, ``w <- w - b_t``.

  Chain: ``scale_by_rms`` (or ``scale_by_stddev``), ``scale_by_learning_rate``,
  ``trace(momentum)`` (or identity).

  References: Tieleman and Hinton, 2012; Graves, 2013.
  """
  stat = scale_by_stddev if centered else scale_by_rms
  return chain(
      stat(decay=decay, eps=eps, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt,
           bias_correction=bias_correction),
      scale_by_learning_rate(learning_rate),
      trace(decay=momentum, nesterov=nesterov) if momentum is not None else identity(),
  )


def adam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: Optional[Any] = None, *,
         nesterov: bool = False, nu_dtype: Optional[Any] = None) -> GradientTransformation:
  """Adam::

      m_t = b1 m_{t-1} + (1 - b1) g_t        m_hat = m_t / (1 - b1^t)
      v_t = b2 v_{t-1} + (1 - b2) g_t^2      v_hat = v_t / (1 - b2^t)
      w  <- w - lr m_hat / (sqrt(v_hat + eps_root) + eps)

  ``nesterov=True`` is Nadam (see :func:`nadam`). ``mu_dtype`` / ``nu_dtype`` store the
  moments in a narrower dtype (``nu_dtype`` is ours: Optax has ``mu_dtype`` only).

  Chain: ``scale_by_adam``, ``scale_by_learning_rate``.

  References: Kingma and Ba, ICLR 2015.
  """
  return chain(scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                             nesterov=nesterov, nu_dtype=nu_dtype),
               scale_by_learning_rate(learning_rate))


def nadam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: Optional[Any] = None, *,
          nesterov: bool = True, nu_dtype: Optional[Any] = None) -> GradientTransformation:
  """Nadam: Adam with ``m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)``.

  Same as ``adam(..., nesterov=True)``; ``nesterov`` is kept, as in Optax, so that
  ``nadam(..., nesterov=False)`` is plain Adam.

  References: Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
  """
  return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov,
              nu_dtype=nu_dtype)


def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: Optional[Any] = None,
          weight_decay: ScalarOrSchedule = 1e-4, mask: Mask = None, *,
          nesterov: bool = False, l1: Optional[ScalarOrSchedule] = None,
          l1_mask: Mask = None, nu_dtype: Optional[Any] = None) -> GradientTransformation:
  """AdamW, Adam with decoupled weight decay::

      w <- w - lr (m_hat / (sqrt(v_hat + eps_root) + eps) + weight_decay w)

  The decay is multiplied by the learning rate, as in Optax and PyTorch. ``mask`` selects
  the decayed leaves. ``l1 > 0`` adds L1 soft-thresholding after the step
  (``w <- sign(w) max(|w| - lr l1, 0)``, leaves selected by ``l1_mask``): with
  ``weight_decay`` this is an elastic-net AdamW whose small weights become exact zeros.
  Note that the threshold ``lr l1`` competes with Adam's *normalised* step
  ``lr m_hat / sqrt(v_hat)``: a weight stays at zero where ``|m_hat| / sqrt(v_hat) < l1``.
  With minibatch noise that ratio is small for irrelevant weights and they reach exact
  zeros (tests/test_proximal.py recovers a lasso support this way); with noise-free
  full-batch gradients it is about 1 everywhere and no weight settles at zero -- use
  ``sgd(..., l1=...)`` (ISTA) there.

  Chain: ``scale_by_adam``, ``add_decayed_weights(weight_decay, mask)``,
  ``scale_by_learning_rate``, [``prox_elastic_net(l1, 0, lr)``].

  References: Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
  """
  return chain(
      scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                    nesterov=nesterov, nu_dtype=nu_dtype),
      add_decayed_weights(weight_decay, mask),
      scale_by_learning_rate(learning_rate),
      *_proximal(learning_rate, l1, None, l1_mask),
  )


def nadamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
           eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: Optional[Any] = None,
           weight_decay: ScalarOrSchedule = 1e-4, mask: Mask = None, *,
           nesterov: bool = True, l1: Optional[ScalarOrSchedule] = None,
           l1_mask: Mask = None, nu_dtype: Optional[Any] = None) -> GradientTransformation:
  """NadamW: :func:`adamw` with Nesterov's first moment (see :func:`nadam`)."""
  return adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
               nesterov=nesterov, l1=l1, l1_mask=l1_mask, nu_dtype=nu_dtype)
