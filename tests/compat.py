"""Spellings that moved between the oldest supported versions (requirements-min.txt) and the
newest: the suite runs on both (``make test``)."""

from __future__ import annotations

import jax
from flax import nnx


def pure(tree):
  """``nnx.as_pure`` (flax >= 0.12.7): a state's Variables replaced by their values."""
  if hasattr(nnx, "as_pure"):
    return nnx.as_pure(tree)
  is_var = lambda v: isinstance(v, nnx.Variable) or isinstance(v, getattr(nnx, "VariableState", ()))
  return jax.tree.map(lambda v: v.value if is_var(v) else v, tree, is_leaf=is_var)


def set_mesh(mesh):
  """``jax.set_mesh`` (jax >= 0.7.1); ``jax.sharding.use_mesh`` before."""
  return (getattr(jax, "set_mesh", None) or jax.sharding.use_mesh)(mesh)
