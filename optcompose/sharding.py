"""Placing optimizer state with the parameters' shardings.

Under JAX's explicit sharding mode (``jax.make_mesh`` with ``AxisType.Explicit``, the default of
recent JAX) every transformation's ``init`` already returns moments sharded like their
parameters: ``zeros_like`` carries the sharding in its type. Under the older *auto* mode,
``jax.jit(tx.init)`` has nothing to propagate from (a zero moment depends on no data), so XLA
replicates the state on every device. :func:`state_shardings` gives the shardings to pass as
``out_shardings`` so that the state is created where it belongs, without ever being
materialised elsewhere::

    abstract = jax.eval_shape(lambda: params)          # or ShapeDtypeStructs with shardings
    state = jax.jit(tx.init, out_shardings=oc.sharding.state_shardings(tx, abstract))(params)

:func:`init_sharded` does exactly that. How a state leaf is matched to its parameter: every
subtree of the state whose structure is the parameters' structure (a masked-out leaf,
``MaskedNode``, may stand in for a parameter) mirrors the parameters, and each of its leaves with
the parameter's shape takes the parameter's sharding. Every other leaf (counts, norms, injected
hyperparameters) is replicated over the parameters' mesh.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from optcompose.core import GradientTransformation
from optcompose.wrappers.masking import MaskedNode

__all__ = ["state_shardings", "init_sharded"]


def _sharding_of(leaf: Any, path: str) -> Sharding:
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    raise ValueError(
        f"`params{path}` has no sharding: pass committed arrays or "
        "jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves.")
  return sharding


def _replicated_on(shardings: list) -> Sharding:
  """Full replication over the devices the parameters use."""
  for s in shardings:
    if isinstance(s, NamedSharding):
      return NamedSharding(s.mesh, PartitionSpec())
  if shardings:
    return shardings[0]  # one device (SingleDeviceSharding): nothing to replicate over
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def state_shardings(tx: GradientTransformation, params: Any) -> Any:
  """A tree of shardings with the structure of ``tx.init(params)``.

  ``params`` are arrays or ``jax.ShapeDtypeStruct`` leaves that carry a ``sharding``; the
  state itself is never computed (``jax.eval_shape``).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  p_shardings = [_sharding_of(x, jax.tree_util.keystr(tuple(p))) for p, x in flat]
  p_shapes = [tuple(x.shape) for _, x in flat]
  replicated = _replicated_on(p_shardings)
  abstract = jax.eval_shape(tx.init, params)

  index = treedef.unflatten(range(len(flat)))  # each parameter's position
  masked = lambda x: isinstance(x, MaskedNode)

  def mirrors_params(node):
    """Whether ``node`` has the parameters' structure, a MaskedNode standing for any
    subtree (as ``masked`` and ``partition`` leave them) and an array for each parameter."""
    if node is None or masked(node):
      return False
    try:
      fits = jax.tree.map(lambda x, i: masked(x) or (hasattr(x, "shape") and isinstance(i, int)),
                          node, index, is_leaf=masked)
    except (ValueError, TypeError):
      return False
    return all(jax.tree.leaves(fits))

  def place(node):
    if not mirrors_params(node):  # a leaf outside any params-shaped subtree
      return replicated
    return jax.tree.map(
        lambda x, i: x if masked(x) else (p_shardings[i] if tuple(x.shape) == p_shapes[i]
                                          else replicated), node, index, is_leaf=masked)

  return jax.tree.map(place, abstract, is_leaf=mirrors_params)


def init_sharded(tx: GradientTransformation, params: Any) -> Any:
  """``tx.init(params)`` compiled with the state's shardings as ``out_shardings``."""
  return jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)
