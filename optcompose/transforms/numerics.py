"""Numerics helpers at Optax's top level: norms with a floor whose gradient is finite at 0,
and the saturating step-count increment under its older name.

Formulas (``|x|^2`` the squared absolute value, so complex ``x`` works)::

    safe_norm(x, min_norm)            = max(||x||, min_norm)
    safe_root_mean_squares(x, min_rms) = max(sqrt(mean(|x|^2)), min_rms)

``jnp.maximum(jnp.linalg.norm(x), min_norm)`` has a NaN gradient at ``x = 0`` (JAX
differentiates both branches, and the norm's derivative at 0 is 0 / 0). These evaluate the
norm of ``x`` only where it is above the floor, and of ones elsewhere, so the gradient is 0
below the floor and the norm's own above it -- Optax's formulation, operation for operation.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import safe_increment
from optcompose.core.validation import check_real_value

__all__ = ["safe_norm", "safe_root_mean_squares", "safe_int32_increment"]

# Optax's older name of the same function (``optax.safe_int32_increment is
# optax.safe_increment``; not marked deprecated in Optax 0.2.8).
safe_int32_increment = safe_increment


def _floored(value, floor, masked) -> jax.Array:
  """``floor`` where ``value <= floor``, else ``masked``, in the dtype standard promotion
  gives them (written out, so it also runs under strict promotion)."""
  below = jnp.less_equal(*otree.promote(value, floor))
  floor_as, masked_as = otree.promote(floor, masked)
  return jnp.where(below, floor_as, masked_as)


def safe_norm(
  x: jax.typing.ArrayLike,
  min_norm: jax.typing.ArrayLike,
  ord: Optional[Union[int, float, str]] = None,  # Optax's name (shadows the builtin)
  axis: Union[None, tuple[int, ...], int] = None,
  keepdims: bool = False,
) -> jax.Array:
  """``max(||x||, min_norm)`` with a gradient of 0, not NaN, below the floor.

  Formula: ``n = jnp.linalg.norm(x, ord, axis)``; the result is ``min_norm`` where
  ``n <= min_norm``, else ``n`` (computed from ``x`` with the floored entries replaced by ones,
  so no branch differentiates the norm at 0).

  Args:
    x: an array (real or complex).
    min_norm: the floor (a real number).
    ord: the norm's order, as ``jnp.linalg.norm`` takes it (``None``: 2-norm of a vector,
      Frobenius of a matrix).
    axis: the axis (an int) or two axes (matrix norms) to reduce; ``None``: all of ``x``.
    keepdims: keep the reduced axes with size one.

  Returns:
    The floored norm, in the dtype standard promotion gives the norm and ``min_norm``.

  Raises:
    TypeError: ``min_norm`` is not a real number (a bool, a complex number, a string).

  References:
    Optax's ``optax.safe_norm`` (same name, arguments and defaults).
  """
  check_real_value("safe_norm", "min_norm", min_norm, "the floor")
  x = jnp.asarray(x)
  norm = jnp.linalg.norm(x, ord=ord, axis=axis, keepdims=True)
  x = jnp.where(jnp.less_equal(*otree.promote(norm, min_norm)), jnp.ones_like(x), x)
  norm = jnp.squeeze(norm, axis=axis) if not keepdims else norm
  return _floored(norm, min_norm, jnp.linalg.norm(x, ord=ord, axis=axis, keepdims=keepdims))


def safe_root_mean_squares(x: jax.typing.ArrayLike, min_rms: jax.typing.ArrayLike) -> jax.Array:
  """``max(sqrt(mean(|x|^2)), min_rms)`` with a gradient of 0, not NaN, below the floor.

  Formula: ``r = sqrt(mean(|x|^2))`` over all of ``x``; the result is ``min_rms`` where
  ``r <= min_rms``, else ``r`` (computed from ones where floored, as :func:`safe_norm`).

  Args:
    x: an array (real or complex).
    min_rms: the floor (a real number).

  Returns:
    The floored RMS, a scalar in the dtype standard promotion gives the RMS and ``min_rms``.

  Raises:
    TypeError: ``min_rms`` is not a real number.

  References:
    Optax's ``optax.safe_root_mean_squares`` (same name and arguments).
  """
  check_real_value("safe_root_mean_squares", "min_rms", min_rms, "the floor")
  x = jnp.asarray(x)
  rms = jnp.sqrt(jnp.mean(otree.abs_sq(x)))
  x = jnp.where(jnp.less_equal(*otree.promote(rms, min_rms)), jnp.ones_like(x), x)
  return _floored(rms, min_rms, jnp.sqrt(jnp.mean(otree.abs_sq(x))))
