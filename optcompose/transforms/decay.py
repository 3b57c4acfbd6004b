"""Weight decay: decoupled (AdamW) and coupled (an L2 penalty's gradient).

One formula, two places in a chain::

    u <- u + lambda * w

Placed *after* the preconditioner (before the learning-rate step) it is decoupled weight
decay (Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019): the pull
toward zero is ``lr * lambda * w`` whatever the gradient's scale. Placed *before* the
preconditioner it is the gradient of the penalty ``lambda/2 * ||w||^2`` (classic L2, the
"Adam + L2" that AdamW fixes): an adaptive preconditioner then rescales the penalty with
the gradient statistics, so large gradients weaken it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose._core import (
    GradientTransformation, ScalarOrSchedule, check_hyperparameter, init_empty_state,
    with_schedules,
)

Mask = Optional[Union[Any, Callable[[Any], Any]]]


def decay_leaf(coef, u, w):
  """``u + coef * w`` in u's dtype."""
  return (u + coef * w).astype(jnp.result_type(u))


def _add_scaled_params(fn: str, arg: str, coef, mask: Mask) -> GradientTransformation:
  check_hyperparameter(fn, arg, coef, low=0.0)

  def update(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError(f"{fn} needs `params`: call update(updates, state, params).")
    otree.check_same_structure(updates, params, "updates", "params")
    where = otree.resolve_mask(mask, params) if mask is not None else None
    if isinstance(coef, (int, float)) and coef == 0:
      return updates, state
    if where is None:
      return jax.tree.map(lambda u, w: decay_leaf(coef, u, w), updates, params), state
    return jax.tree.map(lambda u, w, on: decay_leaf(coef, u, w) if on else u,
                        updates, params, where), state

  return GradientTransformation(init_empty_state, update)


@with_schedules("weight_decay")
def add_decayed_weights(weight_decay: ScalarOrSchedule = 0.0,
                        mask: Mask = None) -> GradientTransformation:
  """Add ``weight_decay * w`` to the updates (decoupled weight decay when placed after the
  preconditioner).

  Args:
    weight_decay: lambda >= 0, a number or a schedule.
    mask: a tree of Python bools with the parameters' structure (or a prefix of it), or a
      callable returning one from the parameters; ``True`` leaves are decayed.
  """
  return _add_scaled_params("add_decayed_weights", "weight_decay", weight_decay, mask)


@with_schedules("l2")
def add_l2_penalty(l2: ScalarOrSchedule, mask: Mask = None) -> GradientTransformation:
  """Add the gradient of ``l2/2 * ||w||^2``, i.e. ``l2 * w``, to the raw gradient.

  Same formula as :func:`add_decayed_weights`; put it first in a chain (before momentum
  or a preconditioner) for classic coupled L2 regularisation.
  """
  return _add_scaled_params("add_l2_penalty", "l2", l2, mask)


