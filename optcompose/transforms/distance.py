"""Distance over gradients (DoG), layer-wise: a step size per leaf from how far the leaf has
moved from its initial value and how large its gradients have been.

Formula, per leaf l (g: incoming updates, w: parameters, w0: the parameters at ``init``,
kept in ``param_dtype``; ||.||: the leaf's L2 norm)::

    d_0   = reps_rel * (1 + ||w0||)                    (at init)
    d_t   = max(d_{t-1}, ||w - w0||)
    G_t   = G_{t-1} + ||g||^2                          (G_0 = 0)
    eta_t = global_scale * d_t / sqrt(G_t + eps)
    u_l   = eta_t * g

This is Optax's ``scale_by_distance_over_gradients`` ("LDoG" in the paper: one step size per
parameter array). It is learning-rate free: chain it with ``scale_by_learning_rate(1.0)``
(or ``scale(-1.0)``), or use ``global_scale=-1.0``, to descend.

Optax's ``optax.contrib.dog`` / ``dowg`` are other algorithms (one global step size over the
whole tree, DoWG's distance-weighted sums, an ``init_step`` choice), not aliases of this one.

Dtypes: the norms are computed in float32 or wider (squares of float16 overflow past 256);
``d`` is kept in the wider of the parameters' and ``param_dtype`` (the dtype Optax's ``d``
takes after its first update: Optax's ``init`` gives it the parameters' dtype, so a
bfloat16 model's state changed dtype at the first step), ``G`` as Optax keeps it, shape
``(1,)`` in JAX's default float. Updates keep the gradients' dtype and shape (Optax's
``eta`` of shape ``(1,)`` turns a scalar leaf's update into shape ``(1,)``, and a bfloat16
one into float32). Each is one value per model leaf, so FlatParams are refused.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  DTYPE,
  EPS_POSITIVE,
  GradientTransformation,
  ScalarOrSchedule,
  default_float,
  expect_state,
  needs_params,
  public,
  real,
)
from optcompose.masks import reject_layouts
from optcompose.transforms.statistics import like_params

__all__ = ["ScaleByDistanceOverGradientsState"]

_WHO = "scale_by_distance_over_gradients"


class ScaleByDistanceOverGradientsState(NamedTuple):
  """Per leaf: the largest distance ``d`` from the initial value so far, the sum ``G`` of
  the squared gradient norms (shape ``(1,)``), and the initial parameters (Optax's fields)."""

  max_dist: Any
  grad_sum_of_squares: Any
  init_params: Any


def _wide(x):
  """``x`` as an array of float32 or wider (float16 and bfloat16 are promoted)."""
  x = jnp.asarray(x)
  return x.astype(otree.promote_types(x.dtype, jnp.float32))


def distance_leaf(w, w0=None):
  """``||w - w0||`` (``||w||`` without ``w0``), the squares summed in float32 or wider."""
  diff = _wide(w) if w0 is None else jnp.subtract(*otree.promote(_wide(w), _wide(w0)))
  return jnp.sqrt(jnp.sum(otree.abs_sq(diff)))


def dog_leaf(g, d, g_sos, eps, global_scale):
  """``global_scale * d / sqrt(G + eps) * g``, in g's dtype and shape (``G`` of shape (1,))."""
  eta = jnp.divide(*otree.promote(d, jnp.sqrt(jnp.add(*otree.promote(g_sos, eps)))))
  eta = jnp.multiply(*otree.promote(global_scale, eta)).reshape(())
  return jnp.multiply(*otree.promote(eta, _wide(g))).astype(jnp.result_type(g))


@public(
  "transformation",
  optax="scale_by_distance_over_gradients",
  reps_rel=real(0.0, low_open=True, draw=(1e-8, 1e-2), schedule=False),
  eps=EPS_POSITIVE,
  param_dtype=DTYPE,
  global_scale=real(draw=(-1.0, 2.0)),
)
def scale_by_distance_over_gradients(
  reps_rel: float = 1e-6,
  eps: ScalarOrSchedule = 1e-8,
  param_dtype=jnp.float32,
  global_scale: ScalarOrSchedule = 1.0,
) -> GradientTransformation:
  """Distance-over-gradients step sizes, one per leaf (layer-wise DoG; learning-rate free).

  Update, per leaf l (see the module docstring)::

      d_t   = max(d_{t-1}, ||w - w0||),   d_0 = reps_rel * (1 + ||w0||)
      G_t   = G_{t-1} + ||g||^2
      u_l   = global_scale * d_t / sqrt(G_t + eps) * g

  Args:
    reps_rel: the initial distance relative to ``1 + ||w0||`` (> 0: with 0 no leaf would ever
      move); the paper recommends 1e-4 with batch normalisation, 1e-6 otherwise. Used at
      ``init`` only, so a number (no schedule).
    eps: added to the sum of squared gradient norms (> 0, stricter than Optax: a leaf
      whose gradient is exactly 0 would otherwise get 0 * inf = NaN); a number or a schedule.
    param_dtype: the dtype the initial parameters are kept in (a floating dtype; ``None``
      keeps the parameters').
    global_scale: a factor of every step size, typically 1.0 or -1.0 (any finite number); a
      number or a schedule.

  Returns:
    A transformation with state :class:`ScaleByDistanceOverGradientsState` that needs
    ``params`` and refuses FlatParams (one step size per model leaf).

  References:
    Ivgi, Hinder and Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
    Schedule", ICML 2023; Optax's ``optax.scale_by_distance_over_gradients``.
  """

  def init(params):
    otree.check_floating(params, "params")
    reject_layouts(params, _WHO)
    # A copy (in param_dtype): the state must not share the parameters' buffers.
    init_params = like_params(params, param_dtype, f"{_WHO}: `param_dtype`", copy=True)
    max_dist = jax.tree.map(
      lambda w, w0: jnp.multiply(reps_rel, jnp.add(1, distance_leaf(w))).astype(
        otree.promote_types(jnp.result_type(w), jnp.result_type(w0))
      ),
      params,
      init_params,
    )
    g_sos = jax.tree.map(lambda _: jnp.zeros((1,), default_float()), params)
    return ScaleByDistanceOverGradientsState(max_dist, g_sos, init_params)

  def update(updates, state, params=None, **extra):
    del extra
    expect_state(state, ScaleByDistanceOverGradientsState, _WHO)
    needs_params(params, _WHO)
    reject_layouts(updates, _WHO)
    otree.check_same_structure(updates, params, "updates", "params")
    otree.check_same_structure(updates, state.init_params, "updates", "state.init_params")
    max_dist = jax.tree.map(
      lambda d, w, w0: jnp.maximum(*otree.promote(d, distance_leaf(w, w0))).astype(
        jnp.result_type(d)
      ),
      state.max_dist,
      params,
      state.init_params,
    )
    g_sos = jax.tree.map(
      lambda s, g: jnp.add(*otree.promote(s, jnp.sum(otree.abs_sq(_wide(g))))).astype(
        jnp.result_type(s)
      ),
      state.grad_sum_of_squares,
      updates,
    )
    updates = jax.tree.map(
      lambda g, d, s: dog_leaf(g, d, s, eps, global_scale), updates, max_dist, g_sos
    )
    return updates, ScaleByDistanceOverGradientsState(max_dist, g_sos, state.init_params)

  return GradientTransformation(init, update)
