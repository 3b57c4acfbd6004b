"""Per-example and unit-wise clipping functions (Optax's ``optax.transforms`` helpers; not
gradient transformations: each maps arrays to arrays).

Formulas (g_i: example i's gradient tree, each leaf with the batch on axis 0; C the clip
norm; a *unit* of an array is the slice :func:`unitwise_norm` reduces)::

    per_example_global_norm_clip:  m_i = min(1, C / ||g_i||)   (1 where that is 0 / 0)
                                   returns (sum_i m_i g_i, #{i : m_i < 1})
    per_example_layer_norm_clip:   the same for each leaf l alone, with C_l = C / sqrt(L)
                                   (uniform; L leaves) or C * sqrt(D_l / D) (D_l: the
                                   leaf's parameters per example, D their total)
    unitwise_norm(x):              ||x_unit||, broadcast to x's shape
    unitwise_clip(n, m, g):        g where n < m, else g * (m / max(n, div_eps))

The norms are summed in float32 or wider (float16 squares overflow past 256). Each clipped
sum keeps its leaf's floating dtype (an integer leaf's is float32, or float64 under x64, as
in Optax); Optax computes the norms of a bfloat16 tree in bfloat16, and promotes a leaf to
the widest dtype of a mixed tree.

References: Abadi et al., "Deep Learning with Differential Privacy", 2016 (per-example
clipping); McMahan et al., "Learning Differentially Private Recurrent Language Models", 2017
(per-layer); Brock et al., "High-Performance Large-Scale Image Recognition Without
Normalization", 2021 (unit-wise).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core.validation import check_real_value
from optcompose.transforms.clipping import clip_ratio, unit_norms

__all__ = [
  "per_example_global_norm_clip",
  "per_example_layer_norm_clip",
  "unitwise_norm",
  "unitwise_clip",
]


def _check_batched(grads: Any, who: str) -> None:
  """Raise naming the leaf unless every leaf is an array of rank >= 1 whose size along axis
  0 (the batch) is the first leaf's."""
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  if not flat:
    raise ValueError(
      f"{who}: `grads` has no arrays; it takes per-example gradients with the batch on axis 0."
    )
  first_path, first = flat[0]
  batch = np.shape(first)[0] if np.ndim(first) else None
  for path, x in flat:
    if not (hasattr(x, "shape") or isinstance(x, numbers.Number)):
      raise TypeError(
        f"{who}: `grads{otree.path_str(path)}` is a {type(x).__name__}, not an array."
      )
    if np.ndim(x) < 1 or np.shape(x)[0] != batch:
      also = (
        f" and `grads{otree.path_str(first_path)}` {np.shape(first)}"
        if batch is not None and path != first_path
        else ""
      )
      raise ValueError(
        f"{who} expects every array of `grads` to have the batch on axis 0, "
        f"of one size; `grads{otree.path_str(path)}` has shape "
        f"{np.shape(x)}{also}."
      )


def _check_clip(who: str, name: str, value: Any) -> None:
  """A real scalar >= 0 (infinity allowed: no clipping); checked when it is known."""
  check_real_value(who, name, value, "the clipping norm")
  if np.ndim(value) != 0:
    raise ValueError(f"{who}: `{name}` must be a scalar, got shape {np.shape(value)}.")
  if isinstance(value, jax.core.Tracer):
    return
  v = float(value)
  if math.isnan(v) or v < 0:
    raise ValueError(f"{who}: `{name}` must be >= 0 (inf: no clipping), got {value!r}.")


def _clipped_sum(grads: Any, l2_norm_clip) -> tuple:
  """``(sum_i m_i g_i, #{i : m_i < 1})`` with ``m_i = min(1, C / ||g_i||)`` (1 for 0 / 0)."""
  norms = jax.vmap(otree.global_norm)(grads)
  multipliers = jnp.nan_to_num(
    jnp.minimum(jnp.divide(*otree.promote(l2_norm_clip, norms)), 1.0), nan=1.0
  )
  num_clipped = jnp.sum(multipliers < 1.0)

  def weighted_sum(g):
    wide = otree.promote_types(jnp.result_type(g), multipliers.dtype)
    out = jnp.tensordot(
      multipliers.astype(wide),
      jnp.asarray(g).astype(wide),
      axes=1,
      precision=jax.lax.Precision.HIGHEST,
    )
    keep = jnp.issubdtype(jnp.result_type(g), jnp.inexact)
    return out.astype(jnp.result_type(g)) if keep else out

  return jax.tree.map(weighted_sum, grads), num_clipped


def per_example_global_norm_clip(
  grads: Any, l2_norm_clip: jax.typing.ArrayLike
) -> tuple[Any, jax.Array]:
  """Clip each example's gradient tree to global norm ``l2_norm_clip`` and sum the examples.

  Formula: ``m_i = min(1, C / ||g_i||)`` (``||g_i||`` over every leaf of example i; ``m_i = 1``
  where that is 0 / 0 or inf / inf); returns ``sum_i m_i g_i`` per leaf and the number of
  examples with ``m_i < 1``.

  Args:
    grads: a tree of per-example gradients, every leaf with the batch on axis 0.
    l2_norm_clip: the largest norm an example keeps (a real scalar >= 0; ``inf`` clips
      nothing, 0 zeroes every nonzero example).

  Returns:
    ``(clipped_sum, num_clipped)``: the tree of sums over the batch (each leaf without its
    batch axis), and an integer scalar.

  Raises:
    ValueError: a leaf without a batch axis or with another batch size (named), no leaves,
      or a negative, NaN or non-scalar ``l2_norm_clip``.
    TypeError: ``l2_norm_clip`` is not a real number.

  References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; Optax's
    ``optax.per_example_global_norm_clip`` (``optax.transforms``).
  """
  who = "per_example_global_norm_clip"
  _check_batched(grads, who)
  _check_clip(who, "l2_norm_clip", l2_norm_clip)
  return _clipped_sum(grads, l2_norm_clip)


def per_example_layer_norm_clip(
  grads: Any, global_l2_norm_clip: jax.typing.ArrayLike, uniform: bool = True
) -> tuple[Any, Any]:
  """Clip each example's gradient leaf by leaf (one norm per layer) and sum the examples.

  Formula: each leaf l is clipped alone as in :func:`per_example_global_norm_clip`, to
  ``C_l = C / sqrt(L)`` (``uniform``; L leaves) or ``C_l = C * sqrt(D_l / D)`` (D_l the
  leaf's size per example, D the sum over leaves), so that the clipped examples' global
  norm is at most C.

  Args:
    grads: a tree of per-example gradients, every leaf with the batch on axis 0.
    global_l2_norm_clip: C, the overall clip norm (a real scalar >= 0; ``inf`` clips
      nothing).
    uniform: split C equally between the leaves (True) or in proportion to their sizes.

  Returns:
    ``(clipped_sums, num_clipped)``: two trees of ``grads``' structure, the sums over the
    batch and, per leaf, the number of examples clipped (an integer scalar).

  Raises:
    ValueError: as :func:`per_example_global_norm_clip`.
    TypeError: ``global_l2_norm_clip`` is not a real number, or ``uniform`` not a bool.

  References:
    McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR
    2018; Optax's ``optax.per_example_layer_norm_clip`` (``optax.transforms``).
  """
  who = "per_example_layer_norm_clip"
  _check_batched(grads, who)
  _check_clip(who, "global_l2_norm_clip", global_l2_norm_clip)
  if not isinstance(uniform, (bool, np.bool_)):
    raise TypeError(f"{who}: `uniform` must be a bool, got {uniform!r}.")
  leaves, treedef = jax.tree.flatten(grads)
  if uniform:
    clips = [global_l2_norm_clip * (1.0 / len(leaves)) ** 0.5 for _ in leaves]
  else:
    sizes = [math.prod(jnp.shape(g)[1:]) for g in leaves]
    total = sum(sizes) or 1  # every example empty: each clip is 0, every sum empty
    clips = [global_l2_norm_clip * (size / total) ** 0.5 for size in sizes]
  pairs = [_clipped_sum(g, c) for g, c in zip(leaves, clips)]
  return (treedef.unflatten([s for s, _ in pairs]), treedef.unflatten([n for _, n in pairs]))


def unitwise_norm(
  x: jax.typing.ArrayLike, axis: Optional[Union[int, tuple[int, ...]]] = None
) -> jax.Array:
  """The L2 norm of each unit of ``x`` (a slice over ``axis``), broadcast to ``x``'s shape.

  Formula: ``sqrt(sum over axis of |x|^2)``. ``axis=None`` picks the unit by rank, as Optax:
  the whole array for scalars and vectors (after squeezing size-1 axes), axis 0 for rank 2
  and 3 (IO and multi-head kernels), axes (0, 1, 2) for rank 4 (HWIO), (0, 1, 2, 3) for
  rank 5 (DHWIO). (Optax's docstring says rank 3 reduces (0, 1, 2); its code, followed here,
  reduces axis 0.)

  Args:
    x: an array (real or complex).
    axis: the axes each unit reduces over; ``None``: by rank, as above.

  Returns:
    The norms, of ``x``'s shape, in ``x``'s real floating dtype (float32 for integers); a
    float16 or bfloat16 ``x`` is squared and summed in float32, then rounded.

  Raises:
    ValueError: ``axis=None`` for rank 6 or more (no default unit), or an ``axis`` that does
      not fit ``x``.

  References:
    Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization",
    ICML 2021; Optax's ``optax.transforms.unitwise_norm`` (not at Optax's top level).
  """
  x = jnp.asarray(x)
  try:
    norms = unit_norms(x, axis)
  except ValueError as e:
    if axis is None:
      raise ValueError(
        f"unitwise_norm: no default unit for an array of rank {x.ndim} "
        f"(shape {x.shape}): pass `axis`."
      ) from None
    raise ValueError(
      f"unitwise_norm: `axis` {axis!r} does not fit `x` of shape {x.shape}: {e}"
    ) from None
  narrow = jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32
  return norms.astype(x.dtype) if narrow else norms


def unitwise_clip(
  g_norm: jax.typing.ArrayLike,
  max_norm: jax.typing.ArrayLike,
  grad: jax.typing.ArrayLike,
  div_eps: jax.typing.ArrayLike = 1e-6,
) -> jax.Array:
  """Rescale each unit of ``grad`` whose norm reaches ``max_norm`` down to ``max_norm``.

  Formula, elementwise: ``grad if g_norm < max_norm else grad * (max_norm / max(g_norm,
  div_eps))``. Optax's :func:`optax.adaptive_grad_clip` step with ``g_norm =
  unitwise_norm(grad)`` and ``max_norm = clipping * max(unitwise_norm(w), eps)``.

  Args:
    g_norm: the units' norms, of ``grad``'s shape (:func:`unitwise_norm`).
    max_norm: the largest norm each unit keeps, of ``grad``'s shape.
    grad: the array to clip.
    div_eps: the smallest divisor (it only guards the division: a unit is rescaled only
      where its norm reaches ``max_norm``).

  Returns:
    The clipped array, in the dtype standard promotion gives the three arrays.

  Raises:
    ValueError: the three arrays do not have one shape (nothing is broadcast).

  References:
    Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization",
    ICML 2021; Optax's ``optax.transforms.unitwise_clip`` (not at Optax's top level).
  """
  shapes = [jnp.shape(g_norm), jnp.shape(max_norm), jnp.shape(grad)]
  if len(set(shapes)) != 1:
    raise ValueError(
      f"unitwise_clip: `g_norm`, `max_norm` and `grad` must have one shape, "
      f"got {shapes[0]}, {shapes[1]} and {shapes[2]}."
    )
  return jnp.multiply(*otree.promote(grad, clip_ratio(g_norm, max_norm, div_eps)))
