"""Flat parameters: a whole model's parameters kept in a few contiguous buffers.

An optimizer step is elementwise work over every parameter, so its cost should be that of
streaming the bytes once. With parameters as a pytree of many leaves it is not: every leaf
is its own set of kernels (about 3 per leaf for Adam on XLA CPU, a few microseconds of
dispatch each) and its own argument at the ``jax.jit`` boundary, so a 4096-leaf model pays
for 12k kernels and 4096 transfers per step, and compile time grows with the leaf count.

:class:`FlatParams` keeps the parameters in one 1-D buffer per dtype (and per label, see
below) *across* steps. It is a pytree whose leaves are those buffers, so every optcompose
transformation -- and ``jax.grad``, ``jax.jit`` and ``apply_updates`` -- sees a handful of
leaves whatever the model looks like, and a chain's elementwise math runs as a fixed number
of fused kernels per bucket. The model reads its usual tree through :meth:`unflatten`::

    flat = optcompose.flat_params(params)            # once, before training
    tx = optcompose.adamw(1e-3)
    state = tx.init(flat)

    @jax.jit
    def step(flat, state, batch):
      grads = jax.grad(lambda f: loss(model.apply({"params": f.unflatten()}, batch)))(flat)
      updates, state = tx.update(grads, state, flat)   # grads are FlatParams too
      return optcompose.apply_updates(flat, updates), state

Inside ``jax.jit`` :meth:`unflatten` is one split of each buffer (whose gradient is one
concatenation), so the model code does not change.

Numerics: elementwise transformations compute exactly what they compute per leaf, and the
results are bitwise equal for every elementwise case in the test registry but one, with
two XLA CPU exceptions: its fusion emitters may round the last bit differently for the
same element in a leaf and in a longer buffer -- always possible for a one-element leaf,
which is compiled as scalar code, and seen in centered RMSProp with momentum. With
``XLA_FLAGS=--xla_cpu_use_fusion_emitters=false`` those are bitwise equal too. Global norms
(``clip_by_global_norm``, SAM's ``normalize``) sum the same squares in another order, so they
agree to float32 rounding, not bitwise. Transformations that need one value *per model
leaf* (``clip_by_leaf_norm``, ``clip_by_block_rms``, ``adaptive_grad_clip``, ``unit_norms``)
raise a TypeError on FlatParams rather than treating a bucket as a leaf.

Masks and labels: a mask or labels callable (``adamw(mask=...)``, ``masked``, ``partition``,
:func:`~optcompose.mask_from_paths`, ...) is called with the model's tree from
:meth:`unflatten`, and its per-leaf values are mapped onto the buckets. Every bucket must
then be uniform: build the FlatParams with ``labels=`` set to the same mask or labels (e.g.
``flat_params(params, labels=decay_mask)``) so that decayed and undecayed leaves live in
different buckets. A bucket that mixes values is an error naming two of its leaves.

Sharding: buckets are new arrays; use FlatParams for single-device or replicated (data
parallel) parameters. Parameters sharded across devices keep the ordinary per-leaf path,
which keeps every leaf's sharding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optcompose.masks import broadcast_prefix, register_layout


class _Leaf(NamedTuple):
  path: str  # keystr of the leaf in the model's tree
  shape: tuple
  bucket: int  # index into FlatLayout.buckets
  offset: int  # start in its bucket's buffer


class FlatLayout(NamedTuple):
  """Where each leaf of the model's tree lives in the buffers (static, hashable)."""
  treedef: Any
  leaves: tuple  # of _Leaf, in the tree's flatten order
  buckets: tuple  # of bucket names, e.g. "float32" or "decay/float32"
  dtypes: tuple  # numpy dtype of each bucket
  sizes: tuple  # element count of each bucket


@jax.tree_util.register_pytree_with_keys_class
class FlatParams:
  """Parameters (or gradients, updates, moments) as one 1-D buffer per bucket.

  ``buffers`` is a tuple with one entry per bucket of ``layout``; the pytree's leaves are
  these entries and its path keys are the bucket names (``['float32']``). Build one with
  :func:`flat_params`; transformations build the others (gradients, moments) with the same
  layout through ``jax.tree.map``.
  """

  __slots__ = ("buffers", "layout")

  def __init__(self, buffers, layout: FlatLayout):
    self.buffers = tuple(buffers)
    self.layout = layout

  def tree_flatten_with_keys(self):
    keys = [jax.tree_util.DictKey(name) for name in self.layout.buckets]
    return list(zip(keys, self.buffers)), self.layout

  def tree_flatten(self):
    return self.buffers, self.layout

  @classmethod
  def tree_unflatten(cls, layout, buffers):
    return cls(buffers, layout)

  def __getitem__(self, bucket: str):
    if bucket not in self.layout.buckets:
      raise KeyError(f"FlatParams has no bucket {bucket!r} (buckets: {self.layout.buckets}).")
    return self.buffers[self.layout.buckets.index(bucket)]

  def __contains__(self, bucket) -> bool:  # `key in params`, as Flax's TrainState asks
    return bucket in self.layout.buckets

  def __repr__(self):
    parts = ", ".join(f"{name}: {getattr(b, 'shape', b)}"
                      for name, b in zip(self.layout.buckets, self.buffers))
    return f"FlatParams({len(self.layout.leaves)} leaves in {{{parts}}})"

  def unflatten(self) -> Any:
    """The model's tree: each leaf a slice of its bucket, reshaped (one split per bucket)."""
    layout = self.layout
    pieces: list = [None] * len(layout.leaves)
    for b, buf in enumerate(self.buffers):
      members = [(i, leaf) for i, leaf in enumerate(layout.leaves) if leaf.bucket == b]
      sizes = [int(np.prod(leaf.shape, dtype=np.int64)) for _, leaf in members]
      parts = jax.lax.split(jnp.asarray(buf), sizes) if len(members) > 1 else [buf]
      for (i, leaf), part in zip(members, parts):
        pieces[i] = jnp.reshape(part, leaf.shape)
    return jax.tree.unflatten(layout.treedef, pieces)


def is_flat(x) -> bool:
  return isinstance(x, FlatParams)


def flat_params(params: Any, labels: Any = None) -> FlatParams:
  """Pack ``params`` into a :class:`FlatParams`: one 1-D buffer per dtype (and label).

  ``labels`` (optional) is a tree of hashable labels with the params' structure (or a
  prefix of it), or a callable of ``params`` returning one -- for instance the weight-decay
  mask of ``adamw``. Leaves with the same (label, dtype) share a bucket, in tree order.
  """
  if is_flat(params):
    raise TypeError("flat_params: `params` is already a FlatParams.")
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if not path_leaves:
    raise ValueError("flat_params: `params` has no leaves.")
  leaf_labels = [None] * len(path_leaves)
  if labels is not None:
    tree_labels = labels(params) if callable(labels) else labels
    leaf_labels = jax.tree.leaves(
        broadcast_prefix(tree_labels, params, "labels", "the parameter tree"))
  names, dtypes, sizes, leaves, columns = [], [], [], [], []
  for (path, x), label in zip(path_leaves, leaf_labels):
    x = jnp.asarray(x)
    dtype = np.dtype(x.dtype)
    name = dtype.name if label is None else f"{label}/{dtype.name}"
    if name not in names:
      names.append(name)
      dtypes.append(dtype)
      sizes.append(0)
      columns.append([])
    b = names.index(name)
    leaves.append(_Leaf(jax.tree_util.keystr(tuple(path)), tuple(x.shape), b, sizes[b]))
    sizes[b] += x.size
    columns[b].append(jnp.ravel(x))
  layout = FlatLayout(treedef, tuple(leaves), tuple(names), tuple(dtypes), tuple(sizes))
  return FlatParams([jnp.concatenate(c) if len(c) > 1 else c[0] for c in columns], layout)


def _per_bucket(layout: FlatLayout, part: Any, name: str) -> FlatParams:
  values = jax.tree.leaves(part)
  chosen: list = [None] * len(layout.buckets)
  first: list = [None] * len(layout.buckets)
  for leaf, value in zip(layout.leaves, values):
    b = leaf.bucket
    if first[b] is None:
      chosen[b], first[b] = value, leaf.path
    elif value != chosen[b]:
      raise ValueError(
          f"`{name}` gives {first[b]} the value {chosen[b]!r} but {leaf.path} the value "
          f"{value!r}, and both live in bucket {layout.buckets[b]!r} of the FlatParams. "
          f"Build the FlatParams with labels= set to this {name} so that each bucket is "
          "uniform.")
  return FlatParams(chosen, layout)


# Masks and labels written for the model's tree map onto the buckets (optcompose.masks).
register_layout(FlatParams, FlatParams.unflatten, lambda x, part, name: _per_bucket(x.layout, part, name),
                "FlatParams")

__all__ = ["FlatParams", "flat_params"]
