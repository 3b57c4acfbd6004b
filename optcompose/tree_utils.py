"""Optax's ``optax.tree_utils`` names: ``tree_<name>`` is :mod:`optcompose.tree`'s ``<name>``.

``optax.tree_utils`` is the older spelling of ``optax.tree`` (``tree_add`` for ``tree.add``);
code written against it runs unchanged on ``import optcompose as optax``. The names Optax has
deprecated (``tree_scalar_mul``, ``tree_add_scalar_mul``, ``tree_l1_norm``, ``tree_l2_norm``,
``tree_linf_norm``) still resolve, with the ``DeprecationWarning`` Optax emits when they are
looked up.
"""

from __future__ import annotations

import functools
import warnings

from optcompose import tree as _tree

NamedTupleKey = _tree.NamedTupleKey

tree_add = _tree.add
tree_add_scale = _tree.add_scale
tree_allclose = _tree.allclose
tree_batch_shape = _tree.batch_shape
tree_bias_correction = _tree.bias_correction
tree_cast = _tree.cast
tree_cast_like = _tree.cast_like
tree_clip = _tree.clip
tree_conj = _tree.conj
tree_div = _tree.div
tree_dtype = _tree.dtype
tree_full_like = _tree.full_like
tree_get = _tree.get
tree_get_all_with_path = _tree.get_all_with_path
tree_map_params = _tree.map_params
tree_max = _tree.max
tree_min = _tree.min
tree_mul = _tree.mul
tree_norm = _tree.norm
tree_ones_like = _tree.ones_like
tree_random_like = _tree.random_like
tree_real = _tree.real
tree_scale = _tree.scale
tree_set = _tree.set
tree_size = _tree.size
tree_split_key_like = _tree.split_key_like
tree_sub = _tree.sub
tree_sum = _tree.sum
tree_unwrap_random_key_data = _tree.unwrap_random_key_data
tree_update_infinity_moment = _tree.update_infinity_moment
tree_update_moment = _tree.update_moment
tree_update_moment_per_elem_norm = _tree.update_moment_per_elem_norm
tree_vdot = _tree.vdot
tree_where = _tree.where
tree_zeros_like = _tree.zeros_like

# Deprecated in Optax (0.2.5): the value, and the warning given when the name is looked up
# (Optax's messages; Optax's for tree_add_scalar_mul names tree_scalar_mul by mistake).
_DEPRECATED = {
  "tree_scalar_mul": (
    tree_scale,
    (
      "optax.tree_utils.tree_scalar_mul is deprecated: use optax.tree_utils.tree_scale (optax "
      "v0.2.5 or newer)."
    ),
  ),
  "tree_add_scalar_mul": (
    tree_add_scale,
    (
      "optax.tree_utils.tree_add_scalar_mul is deprecated: use optax.tree_utils.tree_add_scale "
      "(optax v0.2.5 or newer)."
    ),
  ),
  "tree_l1_norm": (
    functools.partial(tree_norm, ord=1),
    (
      "optax.tree_utils.tree_l1_norm is deprecated: use optax.tree_utils.tree_norm(..., ord=1) "
      "(optax v0.2.5 or newer)."
    ),
  ),
  "tree_l2_norm": (
    functools.partial(tree_norm, ord=2),
    (
      "optax.tree_utils.tree_l2_norm is deprecated: use optax.tree_utils.tree_norm (optax "
      "v0.2.5 or newer)."
    ),
  ),
  "tree_linf_norm": (
    functools.partial(tree_norm, ord="inf"),
    (
      "optax.tree_utils.tree_linf_norm is deprecated: use optax.tree_utils.tree_norm(..., "
      "ord=jnp.inf) (optax v0.2.5 or newer)."
    ),
  ),
}


def __getattr__(name):
  if name in _DEPRECATED:
    value, message = _DEPRECATED[name]
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    return value
  raise AttributeError(f"module 'optcompose.tree_utils' has no attribute {name!r}")
