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

float16 and bfloat16 updates: the norms (sums of squares) are computed in float32, since the
squares overflow float16 (300^2 > 65504). The clipped updates keep the gradients' dtype: the
norm clips and ``clip_by_block_rms`` rescale in float32 and cast the result back;
``adaptive_grad_clip`` casts its per-unit scale back and applies it in the updates' dtype, as
Optax does. float32 and float64 updates are computed in their own dtype.

References: Pascanu et al., "On the difficulty of training recurrent neural networks", 2013;
Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization", 2021.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence, TypeAlias, Union, cast

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  EmptyState,
  GradientTransformation,
  ScalarOrSchedule,
  needs_params,
  public,
  real,
  stateless,
)
from optcompose.masks import reject_layouts
from optcompose.transforms.statistics import reject_complex

# A positive threshold; +inf clips nothing (Optax's "no clipping": clip_by_global_norm(jnp.inf))
_NORM = real(0.0, float("inf"), low_open=True, draw=(1e-3, 10.0))


def _wide(x):
  """``x`` as an array of float32 or wider: float16 and bfloat16 are promoted to float32."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  return x


def _in_wide(f, u, *others):
  """``f(u, *others)`` with ``u`` (and ``others``) of float32 or wider, in ``u``'s dtype (a
  float64 threshold injected under x64 would otherwise promote a float32 update)."""
  wide = _wide(u)
  if wide.dtype == jnp.result_type(u):
    return f(u, *others).astype(jnp.result_type(u))
  return f(wide, *map(_wide, others)).astype(jnp.result_type(u))


def rescale_leaf(u, norm, max_norm):
  """``u`` if ``norm < max_norm`` else ``(u / norm) * max_norm`` (norm a scalar or broadcastable).

  A float16 or bfloat16 ``u`` is rescaled in float32 and cast back."""
  return _in_wide(lambda u: _rescale(u, norm, max_norm), u)


def _rescale(u, norm, max_norm):
  # (u / n) * c with n = c = 1 where the norm is below the bound: the choice is made on the
  # norms (scalars, or one per unit), not between u and its rescaled copy, so the product
  # fuses into the loop that consumes u (XLA CPU does not fuse a whole-leaf select into it:
  # clip + AdamW ran at twice AdamW's time). u / 1 * 1 is u exactly but for subnormal values,
  # which XLA CPU flushes to 0 (docs/coming-from-optax.md); the rest is Optax's
  # arithmetic: the division in u's dtype, the product in the wider of u's and max_norm's
  # dtypes (a float64 scheduled max_norm with float32 u under x64: float64).
  n, c = otree.promote(jnp.asarray(norm), max_norm)
  below = jnp.less(n, c)
  n, c = jnp.where(below, 1, n), jnp.where(below, 1, c)
  return jnp.multiply(*otree.promote(u / n.astype(jnp.result_type(u)), c))


def clip_ratio(g_norm, max_norm, div_eps=1e-6):
  """The factor of a unit clip: 1 where ``g_norm < max_norm``, else ``max_norm /
  max(g_norm, div_eps)``, computed on the norms so that the product with the updates fuses
  into their consumer (see :func:`_rescale`). Each operation in the wider of its operands'
  dtypes."""
  ratio = jnp.divide(*otree.promote(max_norm, jnp.maximum(*otree.promote(g_norm, div_eps))))
  return jnp.where(jnp.less(*otree.promote(g_norm, max_norm)), 1, ratio)


@public("transformation", optax="clip", max_delta=real(0.0, float("inf"), draw=(1e-3, 10.0)))
def clip(max_delta: ScalarOrSchedule) -> GradientTransformation:
  """Clip every element of the updates to ``[-max_delta, max_delta]``.

  Update: ``u <- clip(u, -max_delta, max_delta)``, elementwise.

  Args:
    max_delta: the bound (>= 0; inf: none), a number or a schedule.

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`).

  References:
    Optax's ``optax.clip``.
  """
  # A number here: `public` rebuilds the transformation with each value of a schedule.
  max_delta = cast("float | jax.Array", max_delta)
  why = "complex numbers have no order to clip by; clip_by_global_norm scales them instead"

  def clipped(updates, params):
    reject_complex(updates, "updates", "clip", why)  # (JAX's own error names no leaf)
    # In the wider of u's and max_delta's dtypes.
    return jax.tree.map(lambda u: jnp.clip(*otree.promote(u, -max_delta, max_delta)), updates)

  return stateless(clipped)


class ClipByGlobalNormState(NamedTuple):
  """The global norm of the latest incoming updates (before clipping), for logging."""

  global_norm: jax.Array


@public("transformation", optax="clip_by_global_norm", max_norm=_NORM)
def clip_by_global_norm(max_norm: ScalarOrSchedule) -> GradientTransformation:
  """Rescale all updates together so their global L2 norm is at most ``max_norm``.

  Update: ``n = sqrt(sum over leaves of |u|^2)``; ``u <- u if n < max_norm else
  (u / n) * max_norm``.

  Args:
    max_norm: the bound (> 0; inf: none), a number or a schedule.

  Returns:
    A transformation whose state, :class:`ClipByGlobalNormState`, keeps the norm it
    measured before clipping (Optax keeps no state here).

  References:
    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013; Optax's ``optax.clip_by_global_norm``.
  """

  def init(params):
    del params
    return ClipByGlobalNormState(jnp.zeros([], jnp.float32))

  def update(updates, state, params=None, **extra):
    del params, extra
    norm = otree.global_norm(jax.tree.map(_wide, updates), only_square=True)  # in float32+
    clipped = jax.tree.map(lambda u: rescale_leaf(u, norm, max_norm), updates)
    return clipped, ClipByGlobalNormState(norm.astype(jnp.float32))

  return GradientTransformation(init, update)


@public(
  "transformation",
  optax="normalize_by_update_norm",
  scale_factor=real(draw=(-2.0, -0.01)),
  eps=real(0.0, low_open=True, draw=(1e-8, 1e-3)),
)
def normalize_by_update_norm(
  scale_factor: ScalarOrSchedule = 1.0, eps: ScalarOrSchedule = 1e-6
) -> GradientTransformation:
  """Rescale all updates together to the global norm ``scale_factor`` (about).

  Update: ``n = sqrt(sum over leaves of |u|^2)``; ``u <- u / ((n + eps) / scale_factor)``
  (a negative ``scale_factor`` steps against the updates: a normalized gradient descent).

  Args:
    scale_factor: the norm of the result (nonzero; a number or a schedule).
    eps: added to the norm (> 0), so zero updates stay zero; a number or a schedule.

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`).

  References:
    Optax's ``optax.normalize_by_update_norm`` (same arguments and order of operations).
  """
  if isinstance(scale_factor, numbers.Real) and scale_factor == 0:
    raise ValueError(
      "normalize_by_update_norm: `scale_factor` must be nonzero, got 0 (every "
      "update would be divided by inf)."
    )

  # Numbers here: `public` rebuilds the transformation with each value of a schedule.
  eps, scale_factor = cast("float | jax.Array", eps), cast("float | jax.Array", scale_factor)

  def normalize(updates, params):
    del params
    norm = otree.global_norm(jax.tree.map(_wide, updates))  # squares in float32 or wider
    divisor = (norm + eps) / scale_factor
    return jax.tree.map(lambda u: _in_wide(lambda u: u / divisor.astype(u.dtype), u), updates)

  return stateless(normalize)


@public("transformation", max_norm=_NORM)  # Optax 0.2.8 has no clip_by_leaf_norm
def clip_by_leaf_norm(max_norm: ScalarOrSchedule) -> GradientTransformation:
  """Rescale each leaf separately so its L2 norm is at most ``max_norm``.

  Update, per leaf l: ``n_l = ||u_l||``; ``u_l <- u_l if n_l < max_norm else
  (u_l / n_l) * max_norm``.

  Args:
    max_norm: the bound (> 0; inf: none), a number or a schedule.

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`; FlatParams are refused:
    a bucket is not a leaf).

  References:
    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013 (norm clipping, here per leaf); Optax's
    ``optax.clip_by_global_norm`` applied to each leaf.
  """

  def f(updates, params):
    reject_layouts(updates, "clip_by_leaf_norm")
    return jax.tree.map(lambda u: rescale_leaf(u, otree.global_norm(_wide(u)), max_norm), updates)

  return stateless(f)


@public("transformation", optax="clip_by_block_rms", threshold=_NORM)
def clip_by_block_rms(threshold: ScalarOrSchedule) -> GradientTransformation:
  """Divide each leaf by ``max(1, rms(leaf) / threshold)`` (Optax's semantics).

  Update, per leaf l: ``u_l <- u_l / max(1, sqrt(mean(|u_l|^2)) / threshold)``.

  Args:
    threshold: the largest RMS a leaf keeps (> 0; inf: any), a number or a schedule.

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`; FlatParams are refused:
    a bucket is not a leaf).

  References:
    Optax's ``optax.clip_by_block_rms``.
  """

  def f(updates, params):
    reject_layouts(updates, "clip_by_block_rms")

    def leaf(u):  # each operation in the wider of its operands' dtypes
      ratio = jnp.divide(*otree.promote(jnp.sqrt(jnp.mean(otree.abs_sq(u))), threshold))
      return jnp.divide(*otree.promote(u, jnp.maximum(1.0, ratio)))

    return jax.tree.map(lambda u: _in_wide(leaf, u), updates)

  return stateless(f)


def unit_norms(x, axis: Optional[Union[int, Sequence[int]]] = None):
  """L2 norm of each unit of ``x``, broadcast to ``x``'s shape.

  A unit is the slice reduced over ``axis``; by default the whole array for scalars and
  vectors, the input axis 0 for (in, out) and (in, heads, out) kernels, and the spatial and
  input axes for convolution kernels (HWIO, DHWIO) -- Optax's convention.
  """
  x = _wide(x)  # squares of float16 overflow: summed in float32
  if axis is None:
    squeezed = jnp.squeeze(x).ndim
    if squeezed <= 1:
      axis = tuple(range(x.ndim))
    elif x.ndim in (2, 3):
      axis = (0,)
    elif x.ndim in (4, 5):
      axis = tuple(range(x.ndim - 1))
    else:
      raise ValueError(
        f"adaptive_grad_clip: no default unit for a rank-{x.ndim} leaf of shape "
        f"{x.shape}; pass `axis`."
      )
  squared = jnp.sum(otree.abs_sq(x), axis=axis, keepdims=True)
  return jnp.broadcast_to(jnp.sqrt(squared), x.shape)


def _check_axis(axis, ndim=None, leaf="", shape=()) -> None:
  """Raise naming ``axis`` unless it is None, an int or a sequence of distinct ints, each in
  ``[-ndim, ndim)`` for the leaf named ``leaf`` (when ``ndim`` is given).

  Raises:
    TypeError: ``axis`` is not an int, a sequence of ints or None.
    ValueError: an axis outside the leaf's dimensions, or one given twice.
  """
  if axis is None:
    return
  axes = (axis,) if isinstance(axis, numbers.Integral) else axis
  if (
    isinstance(axes, (str, bytes))
    or not isinstance(axes, Sequence)
    or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in axes)
  ):
    raise TypeError(
      f"adaptive_grad_clip: `axis` must be an int, a sequence of ints or None, got {axis!r}."
    )
  if ndim is None:
    return
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(
      f"adaptive_grad_clip: `axis` {axis!r} is out of range for `{leaf}` of "
      f"shape {shape} (rank {ndim}: axes -{ndim} to {ndim - 1})."
    )
  if len({a % ndim for a in axes}) != len(axes):
    raise ValueError(
      f"adaptive_grad_clip: `axis` {axis!r} repeats an axis of `{leaf}` of shape {shape}."
    )


@public(
  "transformation",
  optax="adaptive_grad_clip",
  clipping=real(0.0, low_open=True, draw=(1e-3, 1.0)),
  eps=real(0.0, draw=(1e-6, 1e-2)),
)
def adaptive_grad_clip(
  clipping: ScalarOrSchedule,
  eps: ScalarOrSchedule = 1e-3,
  axis: Optional[Union[int, Sequence[int]]] = None,
) -> GradientTransformation:
  """Adaptive gradient clipping: bound each unit's update norm relative to its parameters'.

  Update, per unit (row, filter; see ``axis``), with ``m = clipping * max(||w_unit||, eps)``::

      u_unit <- u_unit                                 if ||u_unit|| < m
      u_unit <- u_unit * m / max(||u_unit||, 1e-6)     otherwise

  Args:
    clipping: lambda (> 0), a number or a schedule.
    eps: the smallest parameter norm used (>= 0), so units of zero-initialised
      parameters can still move; a number or a schedule.
    axis: the axes a unit reduces over (an int or a sequence of ints, each within every
      leaf's rank: a TypeError or ValueError naming ``axis`` and the leaf otherwise);
      ``None``: the whole array for scalars and vectors,
      axis 0 for (in, out) and (in, heads, out) kernels, the spatial and input axes for
      HWIO / DHWIO convolution kernels (Optax's convention; see :func:`unit_norms`).

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`) that needs ``params``
    (FlatParams are refused).

  References:
    Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization", ICML 2021; Optax's ``optax.adaptive_grad_clip``.
  """

  _check_axis(axis)

  def f(updates, params):
    needs_params(params, "adaptive_grad_clip")
    reject_layouts(updates, "adaptive_grad_clip")
    otree.check_same_structure(updates, params, "updates", "params")

    def leaf(u, w):
      # The norms in float32 or wider (unit_norms); each operation in the wider of its
      # operands' dtypes. For float16 / bfloat16 u the scale is cast back and applied in u's
      # dtype (Optax's arithmetic there), and the result keeps u's dtype.
      g_norm, p_norm = unit_norms(u, axis), unit_norms(w, axis)
      max_norm = jnp.multiply(*otree.promote(clipping, jnp.maximum(*otree.promote(p_norm, eps))))
      # The choice on the per-unit norms (ratio 1 where a unit is below its bound: u * 1 is
      # u exactly), then one product that fuses into u's consumer (see _rescale).
      ratio = clip_ratio(g_norm, max_norm)
      narrow = _wide(u).dtype != jnp.result_type(u)
      if narrow:
        ratio = ratio.astype(jnp.result_type(u))
      out = jnp.multiply(*otree.promote(u, ratio))
      return out.astype(jnp.result_type(u)) if narrow else out

    def checked(path, u, w):
      _check_axis(axis, jnp.ndim(u), f"updates{otree.path_str(path)}", jnp.shape(u))
      return leaf(u, w)

    return jax.tree_util.tree_map_with_path(checked, updates, params)

  return stateless(f)


# Optax's names for the (empty) states of clip and adaptive_grad_clip (one alias each: a
# checker reads a chained assignment as variables, not types).
ClipState: TypeAlias = EmptyState
AdaptiveGradClipState: TypeAlias = EmptyState

__all__ = ["AdaptiveGradClipState", "ClipByGlobalNormState", "ClipState"]  # and the builders
