"""Proximal steps: L1 soft-thresholding and the elastic net, applied after the learning rate.

With ``u`` the already scaled update (``-lr * direction``) and ``w`` the parameters::

    L1:          w_new = sign(w + u) * max(|w + u| - lr * l1, 0)
    elastic net: w_new = sign(w + u) * max(|w + u| - lr * l1, 0) / (1 + lr * l2)

The transformation outputs ``w_new - w`` so that ``apply_updates`` lands on ``w_new``; where
``w_new`` is zero, ``w + (0 - w)`` is exactly zero, so weights reach exact zeros. This is the
proximal gradient (ISTA) step for ``f(w) + l1 * |w|_1 + l2/2 * |w|^2``: the exact proximal
operator of the penalty, not a subgradient of it. Its fixed points solve that problem when
``lr`` is the step the direction takes once settled: after a heavy-ball or Nesterov
momentum ``rho``, whose settled direction is ``g / (1 - rho)``, pass ``lr / (1 - rho)``
(``sgd`` does); with ``lr`` both penalties would act ``1 - rho`` times weaker.

References: Parikh and Boyd, "Proximal Algorithms", 2014, sections 6.1 and 6.5.1;
Zou and Hastie, "Regularization and variable selection via the elastic net", 2005.
"""

from __future__ import annotations

import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import MASK, GradientTransformation, ScalarOrSchedule, public, real
from optcompose.transforms.decay import Mask, masked_leafwise

_STRENGTH = real(0.0, draw=(0.0, 1.0))


def soft_threshold_leaf(x, threshold):
  """``sign(x) * max(|x| - threshold, 0)``."""
  # Each operation in the wider of its operands' dtypes (a float32 scheduled threshold with
  # bfloat16 x: float32).
  shrunk = jnp.maximum(jnp.subtract(*otree.promote(jnp.abs(x), threshold)), 0)
  return jnp.multiply(*otree.promote(jnp.sign(x), shrunk))


def elastic_net_prox_leaf(w, u, lr, l1, l2):
  """The scaled update that moves ``w`` to ``prox(w + u)``; see the module docstring."""
  target = soft_threshold_leaf(jnp.add(*otree.promote(w, u)), lr * l1)
  if not (isinstance(l2, (int, float)) and l2 == 0):
    target = jnp.divide(*otree.promote(target, 1 + lr * l2))
  return jnp.subtract(*otree.promote(target, w)).astype(jnp.result_type(u))


@public(
  "transformation", l1=_STRENGTH, l2=_STRENGTH, learning_rate=real(0.0, draw=(1e-5, 1.0)), mask=MASK
)
def prox_elastic_net(
  l1: ScalarOrSchedule, l2: ScalarOrSchedule, learning_rate: ScalarOrSchedule, mask: Mask = None
) -> GradientTransformation:
  """Proximal elastic-net step after the learning-rate step (see the module docstring).

  Update, with ``u`` the already scaled update (``-lr * direction``)::

      w_new = sign(w + u) * max(|w + u| - lr * l1, 0) / (1 + lr * l2)
      u    <- w_new - w                   (apply_updates then lands on w_new; exact zeros)

  Args:
    l1: L1 strength (>= 0), a number or a schedule.
    l2: L2 strength (>= 0), a number or a schedule.
    learning_rate: the same learning rate (number or schedule) the chain scales by.
    mask: which leaves get the proximal step (as in :func:`add_decayed_weights`; ``None``:
      all); the others pass unchanged.

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`) that needs ``params``.

  References:
    Parikh and Boyd, "Proximal Algorithms", Foundations and Trends in Optimization, 2014,
    sections 6.1 and 6.5.1; Zou and Hastie, "Regularization and variable selection via the
    elastic net", JRSS B, 2005.
  """
  return masked_leafwise(
    "prox_elastic_net", lambda u, w: elastic_net_prox_leaf(w, u, learning_rate, l1, l2), mask
  )


@public("transformation", l1=_STRENGTH, learning_rate=real(0.0, draw=(1e-5, 1.0)), mask=MASK)
def prox_l1(
  l1: ScalarOrSchedule, learning_rate: ScalarOrSchedule, mask: Mask = None
) -> GradientTransformation:
  """L1 soft-thresholding after the learning-rate step: ``prox_elastic_net`` with ``l2=0``.

  Update: ``w_new = sign(w + u) * max(|w + u| - lr * l1, 0)``; ``u <- w_new - w``.

  Args:
    l1: L1 strength (>= 0), a number or a schedule.
    learning_rate: the same learning rate (number or schedule) the chain scales by.
    mask: which leaves get the proximal step (as in :func:`add_decayed_weights`; ``None``:
      all).

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`) that needs ``params``.

  References:
    Tibshirani, "Regression Shrinkage and Selection via the Lasso", JRSS B, 1996; Beck and
    Teboulle, "A Fast Iterative Shrinkage-Thresholding Algorithm for Linear Inverse
    Problems", SIAM J. Imaging Sciences, 2009 (ISTA).
  """
  return prox_elastic_net(l1, 0.0, learning_rate, mask)


__all__ = []  # and the builders it registers
