"""Sign methods: steps of a fixed size in the direction of each coordinate's sign.

Symbols: g gradient, w parameters, lr learning rate (a number or a schedule).
"""

from __future__ import annotations

from optcompose.core import LEARNING_RATE, GradientTransformation, ScalarOrSchedule, chain, public
from optcompose.transforms.scaling import scale_by_learning_rate
from optcompose.transforms.sign import scale_by_sign


@public("optimizer", optax="sign_sgd", learning_rate=LEARNING_RATE)
def sign_sgd(learning_rate: ScalarOrSchedule) -> GradientTransformation:
  """signSGD: ``w <- w - lr sign(g)``.

  Chain: ``scale_by_sign``, ``scale_by_learning_rate``.

  Args:
    learning_rate: lr >= 0, a number or a schedule.

  Returns:
    A transformation whose state is that of the chain (stateless, or the count of a
    scheduled learning rate).

  References:
    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
  """
  return chain(scale_by_sign(), scale_by_learning_rate(learning_rate))
