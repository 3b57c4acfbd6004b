"""Constraints on the updates: centre each leaf's rows, replace NaNs by zeros, keep the
parameters non-negative; and the backward-pass gradient scale of Optax's ``utils``.

Formulas (u: incoming updates, w: parameters)::

    centralize:               u_l <- u_l - mean of u_l over every axis but the first
                              (leaves of rank 2 or more; others pass unchanged)
    zero_nans:                u <- 0 where u is NaN;  state.found_nan_l = any(isnan(u_l))
    keep_params_nonnegative:  u <- -w where w + u < 0, else u
    scale_gradient(x, s):     x forward; the cotangent s * g backward

``centralize`` computes a mean per leaf row, so FlatParams are refused (a bucket is not a
leaf); the other two are elementwise.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import (
  EmptyState,
  GradientTransformation,
  expect_state,
  needs_params,
  public,
  stateless,
)
from optcompose.core.validation import check_real_value
from optcompose.masks import reject_layouts

__all__ = ["ZeroNansState", "NonNegativeParamsState", "scale_gradient"]

NonNegativeParamsState = EmptyState  # Optax's name for keep_params_nonnegative's state


def centralize_leaf(u):
  """``u - mean(u, axes 1..)`` for a leaf of rank >= 2; ``u`` itself otherwise."""
  if jnp.ndim(u) > 1:
    return u - jnp.mean(u, axis=tuple(range(1, jnp.ndim(u))), keepdims=True)
  return u


@public("transformation", optax="centralize")
def centralize() -> GradientTransformation:
  """Gradient centralization: subtract from each leaf its mean over all axes but the first.

  Update, per leaf l of rank 2 or more: ``u_l <- u_l - mean(u_l, axis=(1, ..., ndim - 1))``
  (one mean per index of the first axis); leaves of rank 0 or 1 pass unchanged.

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`; FlatParams are refused:
    a bucket is not a leaf).

  References:
    Yong et al., "Gradient Centralization: A New Optimization Technique for Deep Neural
    Networks", ECCV 2020; Optax's ``optax.centralize``.
  """

  def f(updates, params):
    reject_layouts(updates, "centralize")
    return jax.tree.map(centralize_leaf, updates)

  return stateless(f)


class ZeroNansState(NamedTuple):
  """Per leaf of the updates, whether the latest update had a NaN there (a bool scalar)."""

  found_nan: Any


def zero_nans_leaf(u):
  """``u`` with its NaNs replaced by zeros (a complex NaN, in either part, by 0 + 0j)."""
  return jnp.where(jnp.isnan(u), jnp.zeros_like(u), u)


@public("transformation", optax="zero_nans", any_dtype=True)
def zero_nans() -> GradientTransformation:
  """Replace every NaN in the updates by 0 and record, per leaf, whether one was found.

  Update: ``u <- where(isnan(u), 0, u)``; ``found_nan_l = any(isnan(u_l))`` for each leaf l
  of the latest update (not accumulated over steps; Optax's state). Infinities pass
  unchanged. Integer and boolean updates pass unchanged too (they hold no NaN), as in Optax:
  this transformation computes nothing with them.

  Returns:
    A transformation with state :class:`ZeroNansState` (``found_nan``: a bool scalar per
    leaf, all False after ``init``).

  References:
    Optax's ``optax.zero_nans`` (``optax.transforms.zero_nans``).
  """

  def init(params):
    return ZeroNansState(jax.tree.map(lambda _: jnp.asarray(False), params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ZeroNansState, "zero_nans")
    if jax.tree.structure(updates) != jax.tree.structure(state.found_nan):
      raise ValueError(
        "zero_nans: `updates` does not have the structure of "
        f"`state.found_nan`: {otree.first_difference(updates, state.found_nan)}."
      )
    found = jax.tree.map(lambda u: jnp.any(jnp.isnan(u)), updates)
    return jax.tree.map(zero_nans_leaf, updates), ZeroNansState(found)

  return GradientTransformation(init, update)


def nonnegative_leaf(u, w):
  """``-w`` where ``w + u < 0``, else ``u``, in ``u``'s dtype; the sum is compared in the
  wider of the two dtypes. Where ``-w`` rounds to ``u``'s (narrower) dtype with a larger
  magnitude, it is moved one step toward ``+inf`` so that ``w + u`` stays >= 0."""
  uw, ww = otree.promote(u, w)
  out = jnp.where(jnp.less(uw + ww, 0), -ww, uw)
  if out.dtype == jnp.result_type(u):
    return out
  out = out.astype(jnp.result_type(u))
  overshoot = jnp.less(*otree.promote(ww + out.astype(ww.dtype), 0))
  return jnp.where(overshoot, jnp.nextafter(out, jnp.full_like(out, jnp.inf)), out)


@public("transformation", optax="keep_params_nonnegative")
def keep_params_nonnegative() -> GradientTransformation:
  """Change the updates so that the parameters after them are >= 0.

  Update, elementwise: ``u <- -w if w + u < 0 else u`` (a parameter that would become
  negative lands on 0). Place it last in a chain: a later member would change the update
  again. It expects non-negative parameters: a negative one is moved to 0.

  Returns:
    A stateless transformation (:class:`NonNegativeParamsState`, Optax's name for
    :class:`~optcompose.EmptyState`) that needs ``params``.

  References:
    Optax's ``optax.keep_params_nonnegative`` (``optax.transforms.keep_params_nonnegative``).
  """

  def f(updates, params):
    needs_params(params, "keep_params_nonnegative")
    otree.check_same_structure(updates, params, "updates", "params")
    return jax.tree.map(nonnegative_leaf, updates, params)

  return stateless(f)


@jax.custom_vjp
def _scaled_backward(inputs, scale):
  del scale  # read by the backward pass only
  return inputs


def _scaled_backward_fwd(inputs, scale):
  # The primal output is scaled again, so that a derivative of the backward pass (which
  # reads it: meta-gradients, Hessians) is scaled too, at every order, as in Optax.
  return _scaled_backward(inputs, scale), scale


def _scaled_backward_bwd(scale, cotangents):
  def leaf(c):  # in the cotangent's own dtype (float0 cotangents of integer inputs: as they are)
    if jnp.result_type(c) == jax.dtypes.float0:
      return c
    return c * jnp.asarray(scale).astype(jnp.result_type(c))

  return jax.tree.map(leaf, cotangents), None


_scaled_backward.defvjp(_scaled_backward_fwd, _scaled_backward_bwd)


def scale_gradient(inputs: Any, scale: jax.typing.ArrayLike) -> Any:
  """Return ``inputs`` unchanged, with their gradient multiplied by ``scale`` when
  differentiated (a custom VJP; not a gradient transformation).

  Forward: ``y = x``. Backward: ``dL/dx = scale * dL/dy``, in each cotangent's dtype, at every
  order (differentiated twice, a Hessian is ``scale**2`` times the plain one, as in Optax). A known
  ``scale`` of 1 returns ``inputs`` itself, and of 0 ``jax.lax.stop_gradient(inputs)`` (as in
  Optax); a traced ``scale`` (under ``jit``) goes through the custom VJP.

  Args:
    inputs: a pytree of arrays.
    scale: the factor of the backward pass, a real scalar (an array under ``jit``).

  Returns:
    ``inputs``, with the scaled backward pass.

  Raises:
    TypeError: ``scale`` is not a real number (a bool, complex, a string, None).
    ValueError: ``scale`` is not a scalar.

  References:
    Optax's ``optax.scale_gradient`` (``optax/_src/utils.py``; same name and arguments).
  """
  check_real_value("scale_gradient", "scale", scale, "the backward-pass factor")
  if np.ndim(scale) != 0:
    raise ValueError(f"scale_gradient: `scale` must be a scalar, got shape {np.shape(scale)}.")
  if isinstance(scale, (numbers.Real, np.ndarray, np.generic)) or (
    isinstance(scale, jax.Array) and not isinstance(scale, jax.core.Tracer)
  ):
    if scale == 1:
      return inputs
    if scale == 0:
      return jax.lax.stop_gradient(inputs)
  return _scaled_backward(inputs, scale)
