"""Clipping: bound the updates by value, by global norm, by per-leaf norm, or relative to the
parameters (adaptive gradient clipping).

Formulas (u: incoming updates, w: parameters)::

    by value:        u <- clip(u, -c, c)
    by global norm:  n = sqrt(sum over leaves of |u|^2);  u <- u if n < c else (u / n) * c
    by leaf norm:    per leaf, n_l = ||u_l||;             u_l <- u_l if n_l < c else (u_l / n_l) * c
    by block RMS:    per leaf, u_l <- u_l / max(1, rms(u_l) / c)
    adaptive (AGC):  per unit (row/filter), m = lambda * max(||w_unit||, eps);
                     u_unit <- u_unit if ||u_unit|| < m else u_unit * m / max(||u_unit||, 1e-6)

``clip_by_global_norm`` keeps the norm it computed (before clipping) in its state, so it can
be logged without a second pass over the gradients.

References: Pascanu et al., "On the difficulty of training recurrent neural networks", 2013;
Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization", 2021.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.flat import reject_flat
from optcompose._core import (
    GradientTransformation, ScalarOrSchedule, check_hyperparameter,
    init_empty_state, with_schedules,
)


def rescale_leaf(u, norm, max_norm):
  """``u`` if ``norm < max_norm`` else ``(u / norm) * max_norm`` (norm a scalar or broadcastable)."""
  return jnp.where(norm < max_norm, u, (u / jnp.asarray(norm).astype(jnp.result_type(u))) * max_norm)


@with_schedules("max_delta")
def clip(max_delta: ScalarOrSchedule) -> GradientTransformation:
  """Clip every element of the updates to ``[-max_delta, max_delta]``."""
  check_hyperparameter("clip", "max_delta", max_delta, low=0.0)

  def update(updates, state, params=None, **extra):
    del params, extra
    return jax.tree.map(lambda u: jnp.clip(u, -max_delta, max_delta), updates), state

  return GradientTransformation(init_empty_state, update)


class ClipByGlobalNormState(NamedTuple):
  """The global norm of the latest incoming updates (before clipping), for logging."""

  global_norm: jax.Array


@with_schedules("max_norm")
def clip_by_global_norm(max_norm: ScalarOrSchedule) -> GradientTransformation:
  """Rescale all updates together so their global L2 norm is at most ``max_norm``.

  The state keeps the norm it measured (Optax keeps no state here).
  """
  check_hyperparameter("clip_by_global_norm", "max_norm", max_norm, low=0.0, low_open=True)

  def init(params):
    del params
    return ClipByGlobalNormState(jnp.zeros([], jnp.float32))

  def update(updates, state, params=None, **extra):
    del params, extra
    norm = otree.global_norm(updates)
    clipped = jax.tree.map(lambda u: rescale_leaf(u, norm, max_norm), updates)
    return clipped, ClipByGlobalNormState(norm.astype(jnp.float32))

  return GradientTransformation(init, update)


@with_schedules("max_norm")
def clip_by_leaf_norm(max_norm: ScalarOrSchedule) -> GradientTransformation:
  """Rescale each leaf separately so its L2 norm is at most ``max_norm``."""
  check_hyperparameter("clip_by_leaf_norm", "max_norm", max_norm, low=0.0, low_open=True)

  def update(updates, state, params=None, **extra):
    del params, extra
    reject_flat(updates, "clip_by_leaf_norm")
    return jax.tree.map(
        lambda u: rescale_leaf(u, otree.global_norm(u), max_norm), updates), state

  return GradientTransformation(init_empty_state, update)


@with_schedules("threshold")
def clip_by_block_rms(threshold: ScalarOrSchedule) -> GradientTransformation:
  """Divide each leaf by ``max(1, rms(leaf) / threshold)`` (Optax's semantics)."""
  check_hyperparameter("clip_by_block_rms", "threshold", threshold, low=0.0, low_open=True)

  def update(updates, state, params=None, **extra):
    del params, extra
    reject_flat(updates, "clip_by_block_rms")
    return jax.tree.map(
        lambda u: u / jnp.maximum(1.0, jnp.sqrt(jnp.mean(otree.abs_sq(u))) / threshold),
        updates), state

  return GradientTransformation(init_empty_state, update)


def unit_norms(x, axis: Optional[Union[int, Sequence[int]]] = None):
  """L2 norm of each unit of ``x``, broadcast to ``x``'s shape.

  A unit is the slice reduced over ``axis``; by default the whole array for scalars and
  vectors, the input axis 0 for (in, out) and (in, heads, out) kernels, and the spatial and
  input axes for convolution kernels (HWIO, DHWIO) -- Optax's convention.
  """
  x = jnp.asarray(x)
  if axis is None:
    squeezed = jnp.squeeze(x).ndim
    if squeezed <= 1:
      axis = tuple(range(x.ndim))
    elif x.ndim in (2, 3):
      axis = (0,)
    elif x.ndim in (4, 5):
      axis = tuple(range(x.ndim - 1))
    else:
      raise ValueError(f"adaptive_grad_clip: no default unit for a rank-{x.ndim} leaf of shape "
                       f"{x.shape}; pass `axis`.")
  squared = jnp.sum(otree.abs_sq(x), axis=axis, keepdims=True)
  return jnp.broadcast_to(jnp.sqrt(squared), x.shape)


@with_schedules("clipping", "eps")
def adaptive_grad_clip(clipping: ScalarOrSchedule, eps: ScalarOrSchedule = 1e-3,
                       axis: Optional[Union[int, Sequence[int]]] = None) -> GradientTransformation:
  """Adaptive gradient clipping: bound each unit's update norm by ``clipping`` times the
  norm of the matching unit of the parameters (at least ``eps``); see :func:`unit_norms`."""
  check_hyperparameter("adaptive_grad_clip", "clipping", clipping, low=0.0, low_open=True)
  check_hyperparameter("adaptive_grad_clip", "eps", eps, low=0.0)

  def update(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError("adaptive_grad_clip needs `params`: call update(updates, state, params).")
    reject_flat(updates, "adaptive_grad_clip")
    otree.check_same_structure(updates, params, "updates", "params")

    def leaf(u, w):
      g_norm, p_norm = unit_norms(u, axis), unit_norms(w, axis)
      max_norm = clipping * jnp.maximum(p_norm, eps)
      clipped = u * (max_norm / jnp.maximum(g_norm, 1e-6))
      return jnp.where(g_norm < max_norm, u, clipped)

    return jax.tree.map(leaf, updates, params), state

  return GradientTransformation(init_empty_state, update)
