"""Arrays whose sharding is part of their type: JAX's explicit sharding mode.

On a mesh whose axes are ``AxisType.Explicit`` (what ``jax.make_mesh`` builds by default in
recent JAX), an array's type carries its sharding, ``float32[16@data]``, and operations are
checked against it: the two branches of a ``lax.cond`` must return the same shardings, and
an explicitly sharded dimension cannot be split into pieces the mesh does not divide. In
the older *auto* mode XLA reconciles shardings itself (gathering where it must). These
helpers do the same reconciliation by hand where the library's own code needs it, and
nothing where no array is explicitly sharded.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def reshard(x: Any, sharding: Any) -> Any:
  """``jax.sharding.reshard`` (``jax.experimental.shard.reshard`` before JAX 0.7)."""
  move = getattr(jax.sharding, "reshard", None)
  if move is None:
    import importlib

    move = importlib.import_module("jax.experimental.shard").reshard
  return move(x, sharding)


def type_sharding(x: Any) -> Any:
  """The ``NamedSharding`` in ``x``'s type when its mesh has an explicit axis, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    return sharding
  return None


def split_count(x: Any) -> int:
  """Over how many devices ``x``'s type splits it (1: unsplit, or not on explicit axes)."""
  sharding = type_sharding(x)
  if sharding is None:
    return 1
  axes = [a for e in sharding.spec if e for a in (e if isinstance(e, tuple) else (e,))]
  return int(np.prod([sharding.mesh.shape[a] for a in axes], dtype=np.int64))


def sharded_axes(spec: Any) -> int:
  """How many mesh axes a ``PartitionSpec`` splits an array over."""
  return sum(len(e) if isinstance(e, tuple) else int(e is not None) for e in spec)


def sharded_like(x: Any, like: Any) -> Any:
  """``x`` with the sharding in ``like``'s type where that is explicit and differs (a loop's
  carry must keep its type), else ``x`` itself."""
  sharding = type_sharding(like)
  if sharding is None or type_sharding(x) == sharding:
    return x
  return reshard(x, sharding)


def gathered(x: Any) -> Any:
  """``x`` replicated over its mesh where its type shards it explicitly (the gather that
  auto mode would insert), else ``x`` itself."""
  sharding = type_sharding(x)
  if sharding is None or not sharded_axes(sharding.spec):
    return x
  return reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))


__all__ = ["gathered", "reshard", "sharded_axes", "sharded_like", "type_sharding"]
