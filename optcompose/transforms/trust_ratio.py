"""Layer-wise scales read from the parameters: the trust ratio (LARS, LAMB, Fromage) and the
parameter block's norm or RMS (Adafactor's relative step).

Formulas, per leaf l (u: incoming updates, w: parameters, ||.||: the leaf's L2 norm,
rms(x) = sqrt(mean(|x|^2)))::

    trust ratio:  p = max(||w_l||, min_norm),  n = max(||u_l||, min_norm)
                  r = trust_coefficient * p / (n + eps),  r = 1 where p = 0 or n = 0
                  u_l <- r * u_l
    block norm:   u_l <- u_l * max(||w_l||, min_scale)
    block RMS:    u_l <- u_l * max(rms(w_l), min_scale)
    Fromage's step sizes (mu = 1 / sqrt(1 + lr^2)):  lr * mu  and  mu - 1

Each is one scalar per model leaf, so FlatParams are refused (a bucket is not a leaf).

float16 and bfloat16: the norms and the scale are computed in float32 (squares overflow
float16 past 256) and the scaled update is rounded once to the updates' dtype; Optax
computes them in the parameters' dtype. float32 and float64 run in their own dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import (
  EPS,
  EmptyState,
  GradientTransformation,
  ScalarOrSchedule,
  needs_params,
  public,
  real,
  stateless,
)
from optcompose.masks import reject_layouts

# Numbers, as in Optax (no schedules: ``jax.typing.ArrayLike`` there).
_NONNEGATIVE = real(0.0, draw=(0.0, 1e-2), schedule=False)

ScaleByTrustRatioState = EmptyState  # Optax's name for the (empty) state


def _wide(x):
  """``x`` as an array of float32 or wider: float16 and bfloat16 are promoted to float32."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  return x


def _root(square):
  """``sqrt(square)`` whose derivative at 0 is 0, not NaN: a leaf of zeros (a zero-initialised
  layer, an exactly zero gradient) must not make ``jax.grad`` through a step NaN, as it does
  not in Optax (whose norms here are its ``safe_norm``). The value is the plain square root's,
  bit for bit, and no pass over the leaf is added (the guard is on the scalar)."""
  zero = square == 0  # NaN and inf are kept, as the plain root keeps them
  return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, square)))


def leaf_norm(x, floor):
  """``max(||x||, floor)``: the leaf's L2 norm, squares summed in float32 or wider."""
  return jnp.maximum(*otree.promote(_root(jnp.sum(otree.abs_sq(_wide(x)))), floor))


def leaf_rms(x, floor):
  """``max(sqrt(mean(|x|^2)), floor)``, in float32 or wider."""
  return jnp.maximum(*otree.promote(_root(jnp.mean(otree.abs_sq(_wide(x)))), floor))


def scale_leaf_by(u, s):
  """``u * s`` for a per-leaf scalar ``s``, rounded once to u's dtype (a float16 or
  bfloat16 u is multiplied in float32)."""
  return jnp.multiply(*otree.promote(_wide(u), s)).astype(jnp.result_type(u))


def trust_ratio_leaf(u, w, min_norm, trust_coefficient, eps):
  """``r * u`` with ``r = trust_coefficient * p / (n + eps)``, ``p = max(||w||, min_norm)``,
  ``n = max(||u||, min_norm)``; ``r = 1`` where ``p = 0`` or ``n = 0`` (a leaf that would
  never move, or a zero update). The select is on the scalar r, not on the leaf."""
  p, n = leaf_norm(w, min_norm), leaf_norm(u, min_norm)
  ratio = jnp.divide(
    *otree.promote(
      jnp.multiply(*otree.promote(trust_coefficient, p)), jnp.add(*otree.promote(n, eps))
    )
  )
  ratio = jnp.where(jnp.logical_or(p == 0, n == 0), jnp.ones_like(ratio), ratio)
  return scale_leaf_by(u, ratio)


def _per_leaf(who, leaf):
  """A stateless transformation ``u_l <- leaf(u_l, w_l)`` that needs params and refuses
  layouts (FlatParams)."""

  def f(updates, params):
    needs_params(params, who)
    reject_layouts(updates, who)
    reject_layouts(params, who)
    otree.check_same_structure(updates, params, "updates", "params")
    return jax.tree.map(leaf, updates, params)

  return stateless(f)


@public(
  "transformation",
  optax="scale_by_trust_ratio",
  min_norm=_NONNEGATIVE,
  trust_coefficient=real(0.0, draw=(1e-3, 1.0), schedule=False),
  eps=EPS._replace(schedule=False),
)
def scale_by_trust_ratio(
  min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> GradientTransformation:
  """Scale each leaf by its trust ratio, the ratio of the parameters' norm to the update's.

  Update, per leaf l::

      p = max(||w_l||, min_norm)        n = max(||u_l||, min_norm)
      r = trust_coefficient * p / (n + eps)     (r = 1 where p = 0 or n = 0)
      u_l <- r * u_l

  Args:
    min_norm: the smallest norm used for either (>= 0; Optax accepts any number); 0 (the
      default) floors nothing.
    trust_coefficient: the ratio's multiplier (>= 0; Optax accepts any number).
    eps: added to the update's norm in the denominator (>= 0).

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`, Optax's
    ``ScaleByTrustRatioState``) that needs ``params`` and refuses FlatParams (one ratio per
    model leaf).

  References:
    You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks", 2017; You
    et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR
    2020; Optax's ``optax.scale_by_trust_ratio``.
  """
  return _per_leaf(
    "scale_by_trust_ratio", lambda u, w: trust_ratio_leaf(u, w, min_norm, trust_coefficient, eps)
  )


@public("transformation", optax="scale_by_param_block_norm", min_scale=_NONNEGATIVE)
def scale_by_param_block_norm(min_scale: float = 1e-3) -> GradientTransformation:
  """Scale each leaf's update by the norm of its parameters (a block: one leaf).

  Update, per leaf l: ``u_l <- u_l * max(||w_l||, min_scale)``.

  Args:
    min_scale: the smallest scale (>= 0; Optax accepts any number), so zero-initialised
      leaves still move.

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`) that needs ``params`` and
    refuses FlatParams.

  References:
    Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    ICML 2018 (the relative step size); Optax's ``optax.scale_by_param_block_norm``.
  """
  return _per_leaf(
    "scale_by_param_block_norm", lambda u, w: scale_leaf_by(u, leaf_norm(w, min_scale))
  )


@public("transformation", optax="scale_by_param_block_rms", min_scale=_NONNEGATIVE)
def scale_by_param_block_rms(min_scale: float = 1e-3) -> GradientTransformation:
  """Scale each leaf's update by the RMS of its parameters (a block: one leaf).

  Update, per leaf l: ``u_l <- u_l * max(sqrt(mean(|w_l|^2)), min_scale)``.

  Args:
    min_scale: the smallest scale (>= 0; Optax accepts any number), so zero-initialised
      leaves still move.

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`) that needs ``params`` and
    refuses FlatParams.

  References:
    Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    ICML 2018; Optax's ``optax.scale_by_param_block_rms``.
  """
  return _per_leaf(
    "scale_by_param_block_rms", lambda u, w: scale_leaf_by(u, leaf_rms(w, min_scale))
  )


def fromage_step_sizes(learning_rate: ScalarOrSchedule) -> tuple:
  """Fromage's ``(lr * mu, mu - 1)`` with ``mu = 1 / sqrt(1 + lr^2)``: two numbers for a
  number, two schedules of the step count for a schedule. With ``s = sqrt(1 + lr^2)`` (a
  hypot, which does not overflow), ``mu - 1`` is computed as ``-(lr / s) lr / (1 + s)``:
  Optax's ``mu - 1`` cancels, and in float32 (an injected or scheduled lr) is 1.4% off at
  lr = 3e-3, and differs as much between two compilations."""

  def sizes(lr):
    if isinstance(lr, np.generic):  # NumPy's, in lr's dtype (building starts no JAX backend)
      s = np.hypot(lr.dtype.type(1), lr)
    else:  # lr^2 may overflow: a hypot
      s = (math.hypot if isinstance(lr, (int, float)) else jnp.hypot)(1, lr)
    step = lr / s
    return step, -step * (lr / (1 + s))

  if not callable(learning_rate):
    return sizes(learning_rate)
  return (lambda count: sizes(learning_rate(count))[0]), (
    lambda count: sizes(learning_rate(count))[1]
  )


__all__ = ["ScaleByTrustRatioState"]  # and the builders it registers
