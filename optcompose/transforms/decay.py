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
from optcompose.core import (
  MASK,
  GradientTransformation,
  ScalarOrSchedule,
  needs_params,
  public,
  real,
  stateless,
)
from optcompose.core.base import EmptyState
from optcompose.masks import resolve_mask
from optcompose.transforms.statistics import complex_of

Mask = Optional[Union[Any, Callable[[Any], Any]]]


def decay_leaf(coef, u, w):
  """``u + coef * w`` in u's dtype; complex of u's precision where ``w`` is complex and ``u``
  real (a real gradient of a complex parameter), since the decay's imaginary part would be
  dropped otherwise (it was, silently; Optax keeps it)."""
  # Each operation in the wider of its operands' dtypes, then the sum cast to u's.
  out = jnp.add(*otree.promote(u, jnp.multiply(*otree.promote(coef, w))))
  dtype = jnp.result_type(u)
  if jnp.iscomplexobj(out) and not jnp.issubdtype(dtype, jnp.complexfloating):
    dtype = complex_of(dtype)
  return out.astype(dtype)


def masked_leafwise(who: str, leaf: Callable, mask: Mask) -> GradientTransformation:
  """A stateless transformation applying ``leaf(u, w)`` to the leaves ``mask`` selects (all
  when ``mask`` is None). It needs ``params``; a mask that does not fit the parameters is an
  error at ``init``."""

  def init(params):
    if mask is not None:
      resolve_mask(mask, params)
    return EmptyState()

  def f(updates, params):
    needs_params(params, who)
    otree.check_same_structure(updates, params, "updates", "params")
    if mask is None:
      return jax.tree.map(leaf, updates, params)
    where = resolve_mask(mask, params)
    return jax.tree.map(lambda u, w, on: leaf(u, w) if on else u, updates, params, where)

  return GradientTransformation(init, stateless(f).update)


def _add_scaled_params(who: str, coef, mask: Mask) -> GradientTransformation:
  if isinstance(coef, (int, float)) and coef == 0:
    leaf = lambda u, w: u  # noqa: E731 - no decay: the updates pass unchanged
  else:
    leaf = lambda u, w: decay_leaf(coef, u, w)  # noqa: E731
  return masked_leafwise(who, leaf, mask)


# Any finite rate (Optax's range): Fromage adds mu - 1 < 0 times the weights.
@public(
  "transformation", optax="add_decayed_weights", weight_decay=real(draw=(0.0, 0.5)), mask=MASK
)
def add_decayed_weights(
  weight_decay: ScalarOrSchedule = 0.0, mask: Mask = None
) -> GradientTransformation:
  """Add ``weight_decay * w`` to the updates (decoupled weight decay after the preconditioner).

  Update: ``u <- u + weight_decay * w`` on the selected leaves; the others pass unchanged.
  Placed after the preconditioner and before ``scale_by_learning_rate`` the pull toward
  zero is ``lr * weight_decay * w`` (AdamW).

  Args:
    weight_decay: lambda, any finite number as in Optax (``fromage`` adds ``mu - 1 < 0``
      after its learning-rate step: ``w <- mu w``), or a schedule. The optimizers that take
      a ``weight_decay`` (``adamw``, ``lamb``, ...) ask for lambda >= 0.
    mask: a tree of Python bools with the parameters' structure (or a prefix of it), or a
      callable returning one from the parameters; ``True`` leaves are decayed. ``None``
      decays every leaf. A mask that does not fit the parameters is an error at ``init``.

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`) that needs ``params``.

  References:
    Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; Optax's
    ``optax.add_decayed_weights``.
  """
  return _add_scaled_params("add_decayed_weights", weight_decay, mask)


@public("transformation", l2=real(0.0, draw=(0.0, 0.5)), mask=MASK)
def add_l2_penalty(l2: ScalarOrSchedule, mask: Mask = None) -> GradientTransformation:
  """Add the gradient of ``l2/2 * ||w||^2``, i.e. ``l2 * w``, to the incoming gradient.

  Update: ``g <- g + l2 * w`` on the selected leaves. Same formula as
  :func:`add_decayed_weights`; put it first in a chain (before momentum or a
  preconditioner) for classic coupled L2 regularisation.

  Args:
    l2: the penalty's strength (>= 0), a number or a schedule.
    mask: which leaves are penalised (as in :func:`add_decayed_weights`; ``None``: all).

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`) that needs ``params``.

  References:
    Krogh and Hertz, "A Simple Weight Decay Can Improve Generalization", NIPS 1991.
  """
  return _add_scaled_params("add_l2_penalty", l2, mask)


AddDecayedWeightsState = EmptyState  # Optax's name for add_decayed_weights' (empty) state

__all__ = ["AddDecayedWeightsState"]  # and the builders it registers
