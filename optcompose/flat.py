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
leaf* (the per-leaf clippings, trust ratios and scales, ``sm3``, factored ``adafactor``,
``centralize``, ``add_noise``: the list is in docs/performance.md) raise a TypeError on
FlatParams rather than treating a bucket as a leaf.

Masks and labels: a mask or labels callable (``adamw(mask=...)``, ``masked``, ``partition``,
:func:`~optcompose.mask_from_paths`, ...) is called with the model's tree from
:meth:`unflatten`, and its per-leaf values are mapped onto the buckets. Every bucket must
then be uniform: build the FlatParams with ``labels=`` set to the same mask or labels (e.g.
``flat_params(params, labels=decay_mask)``) so that decayed and undecayed leaves live in
different buckets. A bucket that mixes values is an error naming two of its leaves.

Models that keep their own tree (``nnx.Optimizer``, an Equinox loop): :func:`flat_optimizer`
wraps a transformation so that it takes and returns the model's tree while its state stays in
buckets; the gradients and parameters are packed inside the jitted step.

Sharding: buckets are new arrays, so FlatParams are for single-device or replicated (data
parallel) parameters; parameters sharded across devices keep the ordinary per-leaf path,
which keeps every leaf's sharding (on explicit mesh axes, a leaf split over devices given to
:func:`flat_params` or a :func:`flat_optimizer` is a ValueError naming it; on auto axes XLA
gathers it into its bucket). The optimizer state of replicated FlatParams can be
divided among the data-parallel devices (ZeRO stage 1):
:func:`optcompose.sharding.zero1_flat_shardings` splits each bucket of the state evenly over
a mesh axis (:func:`~optcompose.sharding.zero1_state_shardings` a :func:`flat_optimizer`'s),
``flat_params(params, pad_to=n)`` (or ``flat_optimizer(tx, pad_to=n)``) pads each bucket with
zeros to a multiple of the axis' n devices, and XLA gathers the updated (replicated)
parameters after the step.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import GradientTransformation, Params, Updates, as_transformation
from optcompose.core.explicit import gathered, split_count, type_sharding
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

  def used(self, bucket: int) -> int:
    """How many of bucket ``bucket``'s elements hold the leaves' values: the rest, up to
    ``sizes[bucket]``, is ``pad_to``'s zero padding at its end."""
    return sum(int(np.prod(x.shape, dtype=np.int64)) for x in self.leaves if x.bucket == bucket)


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
    parts = ", ".join(
      f"{name}: {getattr(b, 'shape', b)}" for name, b in zip(self.layout.buckets, self.buffers)
    )
    return f"FlatParams({len(self.layout.leaves)} leaves in {{{parts}}})"

  def unflatten(self) -> Any:
    """The model's tree: each leaf a slice of its bucket, reshaped (one split per bucket).
    A bucket that a masked transformation hid (its buffer a MaskedNode, a node without
    leaves) gives that node in place of each of its leaves."""
    layout = self.layout
    pieces: list = [None] * len(layout.leaves)
    for b, buf in enumerate(self.buffers):
      members = [(i, leaf) for i, leaf in enumerate(layout.leaves) if leaf.bucket == b]
      if _hidden(buf):
        for i, _ in members:
          pieces[i] = buf
        continue
      sizes = [int(np.prod(leaf.shape, dtype=np.int64)) for _, leaf in members]
      padding = layout.sizes[b] - layout.used(b)  # zeros at the end (flat_params' pad_to)
      sizes += [padding] if padding else []
      # Explicitly sharded (ZeRO-1 on an explicit mesh), the bucket is gathered to be split
      # and reshaped, as auto mode gathers it implicitly.
      buf = gathered(jnp.asarray(buf))
      parts = jax.lax.split(buf, sizes) if len(sizes) > 1 else [buf]
      for (i, leaf), part in zip(members, parts):
        pieces[i] = jnp.reshape(part, leaf.shape)
    return jax.tree.unflatten(layout.treedef, pieces)


def is_flat(x) -> bool:
  return isinstance(x, FlatParams)


def _hidden(buffer) -> bool:
  """Whether a bucket's entry is a node without leaves (a MaskedNode: ``masked`` or
  ``partition`` hid the bucket from the transformation inside) rather than a buffer."""
  return not jax.tree.leaves(buffer)


def flat_params(params: Any, labels: Any = None, pad_to: int = 1) -> FlatParams:
  """Pack ``params`` into a :class:`FlatParams`: one 1-D buffer per dtype (and label).

  ``labels`` (optional) is a tree of hashable labels with the params' structure (or a
  prefix of it), or a callable of ``params`` returning one -- for instance the weight-decay
  mask of ``adamw``. Leaves with the same (label, dtype) share a bucket, in tree order.
  ``pad_to`` rounds each bucket's length up to a multiple of it with zeros at its end (for
  :func:`optcompose.sharding.zero1_flat_shardings`: a bucket split evenly over devices);
  :meth:`~FlatParams.unflatten` never reads them, so their gradient is zero.
  """
  if is_flat(params):
    raise TypeError("flat_params: `params` is already a FlatParams.")
  _check_pad_to(pad_to, "flat_params")
  return _pack(params, _layout_of(params, labels, pad_to), "params")


def _check_pad_to(pad_to: Any, who: str) -> None:
  if not (isinstance(pad_to, int) and pad_to >= 1):
    raise ValueError(f"{who}: `pad_to` must be a positive int, got {pad_to!r}.")


def _layout_of(params: Any, labels: Any, pad_to: int) -> FlatLayout:
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if not path_leaves:
    raise ValueError("flat_params: `params` has no leaves.")
  leaf_labels = [None] * len(path_leaves)
  if labels is not None:
    tree_labels = labels(params) if callable(labels) else labels
    leaf_labels = jax.tree.leaves(
      broadcast_prefix(tree_labels, params, "labels", "the parameter tree")
    )
  names, dtypes, sizes, leaves = [], [], [], []
  for (path, x), label in zip(path_leaves, leaf_labels):
    x = x if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else jnp.asarray(x)
    dtype = np.dtype(x.dtype)
    name = dtype.name if label is None else f"{label}/{dtype.name}"
    if name not in names:
      names.append(name)
      dtypes.append(dtype)
      sizes.append(0)
    b = names.index(name)
    leaves.append(_Leaf(jax.tree_util.keystr(tuple(path)), tuple(x.shape), b, sizes[b]))
    sizes[b] += int(np.prod(x.shape, dtype=np.int64))
  sizes = [-(-n // pad_to) * pad_to for n in sizes]
  return FlatLayout(treedef, tuple(leaves), tuple(names), tuple(dtypes), tuple(sizes))


def _pack(
  tree: Any, layout: FlatLayout, name: str, who: str = "flat_params", what: str = "the layout"
) -> FlatParams:
  """``tree``'s leaves packed into ``layout``'s buffers (one concatenation per bucket), after
  checking that ``tree`` is the tree ``layout`` was made from: an error names the first leaf
  that differs."""
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(tuple(p)) for p, _ in path_leaves]
  if treedef != layout.treedef:
    known = [leaf.path for leaf in layout.leaves]
    new, gone = [p for p in paths if p not in known], [p for p in known if p not in paths]
    why = (
      f"`{name}{new[0]}` is not in it"
      if new
      else f"`{name}{gone[0]}` is missing"
      if gone
      else f"the structure is {treedef}, expected {layout.treedef}"
    )
    raise ValueError(f"{who}: `{name}` is not the tree of {what}: {why}.")
  columns: list = [[] for _ in layout.buckets]
  for path, (_, x), leaf in zip(paths, path_leaves, layout.leaves):
    x, dtype = jnp.asarray(x), layout.dtypes[leaf.bucket]
    if tuple(x.shape) != leaf.shape or x.dtype != dtype:
      raise ValueError(
        f"{who}: `{name}{path}` is a {x.dtype}{list(x.shape)} array, but "
        f"{what} holds it as {np.dtype(dtype).name}{list(leaf.shape)}."
      )
    columns[leaf.bucket].append(jnp.ravel(_unsplit(x, f"{who}: `{name}{path}`")))
  buffers = []
  for column, size, dtype in zip(columns, layout.sizes, layout.dtypes):
    padding = size - sum(c.size for c in column)
    column += [jnp.zeros(padding, dtype)] if padding else []
    buffers.append(jnp.concatenate(column) if len(column) > 1 else column[0])
  return FlatParams(buffers, layout)


def _unsplit(x: jax.Array, where: str) -> jax.Array:
  """``x`` with no mesh axis in its type: a bucket is a new 1-D array, which cannot keep a
  leaf's sharding, so a leaf explicitly split over devices is an error (an axis of one
  device splits nothing: dropped). Auto axes are not in the type: XLA gathers there."""
  if split_count(x) > 1:
    raise ValueError(
      f"{where} is split over the mesh ({type_sharding(x).spec}, on explicit axes), but FlatParams "
      "and flat_optimizer pack each leaf into a new 1-D buffer that cannot keep its "
      "sharding: they take single-device or replicated parameters only. Place it "
      "replicated (NamedSharding(mesh, PartitionSpec())), or leave out flat_params / "
      "flat_optimizer: the per-leaf state keeps every leaf's sharding."
    )
  return gathered(x)


def _plain(tree: Any) -> Any:
  """``tree`` with each node that holds an array (an ``nnx.Variable``: ``nnx.Optimizer``
  hands ``init`` ``nnx.Param`` nodes and ``update`` the bare arrays) replaced by the array."""
  holds = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  leaves, treedef = jax.tree.flatten(tree, is_leaf=holds)
  return treedef.unflatten(
    [x if isinstance(x, (jax.Array, np.ndarray, np.generic)) else jnp.asarray(x) for x in leaves]
  )


class GivenFlatParams(TypeError):
  """A :func:`flat_optimizer`'s ``init`` was given a FlatParams (it packs the model's tree
  itself); :mod:`optcompose.sharding` catches it to place such a transformation's state."""


def _per_bucket(flat: FlatParams, part: Any, name: str) -> FlatParams:
  """One value per bucket of ``flat`` from ``part``, one per leaf of the model's tree (a
  hidden bucket keeps its MaskedNode: ``part`` has one in place of each of its leaves)."""
  layout = flat.layout
  values = layout.treedef.flatten_up_to(part)
  chosen: list = [buf if _hidden(buf) else None for buf in flat.buffers]
  first: list = [None] * len(layout.buckets)
  for leaf, value in zip(layout.leaves, values):
    b = leaf.bucket
    if _hidden(flat.buffers[b]):
      continue
    if first[b] is None:
      chosen[b], first[b] = value, leaf.path
    elif value != chosen[b]:
      raise ValueError(
        f"`{name}` gives {first[b]} the value {chosen[b]!r} but {leaf.path} the value "
        f"{value!r}, and both live in bucket {layout.buckets[b]!r} of the FlatParams. "
        f"Build the FlatParams (or the flat_optimizer) with labels= set to this {name} so "
        "that each bucket is uniform."
      )
  return FlatParams(chosen, layout)


def flat_optimizer(tx: Any, labels: Any = None, pad_to: int = 1) -> GradientTransformation:
  """``tx`` run on :class:`FlatParams` for a caller that keeps the model's own tree.

  ``init(params)`` packs ``params`` (a dict, an ``nnx.State`` -- an ``nnx.Param`` node read
  as its array --, an Equinox module filtered with ``eqx.is_array``, ...) with
  ``flat_params(params, labels, pad_to)`` and returns ``tx.init`` of it. The state is thus
  ``tx``'s state on the buckets: the moments stay a few buffers across steps, and the
  optimizer's math is a fixed number of fused kernels whatever the leaf count (state kept per
  leaf would be concatenated at every step, another pass over it). ``update`` packs the
  gradients and parameters into the layout of the state's FlatParams, fixed at init (one
  concatenation per bucket, inside the jitted step), runs ``tx.update`` on the buckets and
  returns the updates as the caller's tree: one slice per leaf, which XLA fuses with the
  caller's ``apply_updates``. A tree that does not match the layout -- another leaf, shape
  or dtype -- is a ValueError naming the first leaf that differs. The packing is two more
  passes over memory and a concatenation and a slice per leaf to compile, so this is a
  layout for the state, not a speed-up: it is slower than the per-leaf optimizer except on
  thousands of small leaves (docs/performance.md; FlatParams kept by the caller are fast).

  So ``nnx.Optimizer(model, flat_optimizer(adamw(1e-3)), wrt=nnx.Param)`` and an Optax-style
  Equinox loop keep flat state, and the model code does not change. The numerics are those
  of FlatParams (module docstring). A mask or labels callable of ``tx`` gets the caller's
  tree; pass the same one as ``labels`` so that each bucket is uniform. An Optax
  transformation, which knows no FlatParams (its masks and per-leaf values would see the
  buckets), is a TypeError. For ZeRO stage 1,
  ``zero1_state_shardings(flat_optimizer(tx, labels, pad_to), params, axis)`` splits each
  bucket of the state over the mesh axis ``axis`` (``pad_to``: its size).

  Args:
    tx: the transformation to run on the buckets.
    labels: bucket labels, as for :func:`flat_params` (e.g. ``tx``'s weight-decay mask).
    pad_to: as for :func:`flat_params`.

  Returns:
    A transformation on the caller's tree whose state is ``tx``'s state on FlatParams.
  """
  inner = as_transformation(tx, "flat_optimizer")
  _check_pad_to(pad_to, "flat_optimizer")
  # Optax's Params and Updates types name arrays and containers only, not a pytree node
  # such as FlatParams: the casts below say what inner gets and gives.

  def init(params):
    if is_flat(params):
      raise GivenFlatParams(
        "flat_optimizer: `params` is a FlatParams, but a flat_optimizer takes the model's own "
        "tree and packs it itself: pass that tree (`params.unflatten()`), or pass the "
        "FlatParams to the transformation inside the flat_optimizer."
      )
    params = _plain(params)
    if not all(otree.is_inexact(otree.leaf_dtype(x)) for x in jax.tree.leaves(params)):
      # inner's own checks, on the caller's tree: an error names the caller's leaf
      # (`params.idx`), not the bucket it would be packed into (`params['int32']`).
      jax.eval_shape(inner.init, params)
    packed = _pack(params, _layout_of(params, labels, pad_to), "params", "flat_optimizer")
    return inner.init(cast(Params, packed))

  def update(updates, state, params=None, **extra):
    updates, params = _plain(updates), None if params is None else _plain(params)
    layout = next(
      (x.layout for x in jax.tree.leaves(state, is_leaf=is_flat) if is_flat(x)), None
    )  # None: a state with no buckets (stateless ``tx``)
    if layout is None:
      layout = _layout_of(updates if params is None else params, labels, pad_to)
    pack = lambda tree, name: _pack(tree, layout, name, "flat_optimizer", "the state")
    flat_updates, state = inner.update(
      cast(Updates, pack(updates, "updates")),
      state,
      None if params is None else cast(Params, pack(params, "params")),
      **extra,
    )
    return cast(FlatParams, flat_updates).unflatten(), state

  return GradientTransformation(init, update)


# Masks and labels written for the model's tree map onto the buckets (optcompose.masks).
def _unpadded(flat: FlatParams) -> list:
  """Each bucket without the zeros that pad it (a slice: a reduction reads it in place); a
  hidden bucket (a MaskedNode) has no leaves, so no entry."""
  used = [flat.layout.used(i) for i in range(len(flat.buffers))]
  return [
    gathered(jnp.asarray(b))[:n] if n < np.size(b) else b
    for b, n in zip(flat.buffers, used)
    if not _hidden(b)
  ]


register_layout(FlatParams, FlatParams.unflatten, _per_bucket, "FlatParams", _unpadded)

__all__ = ["FlatParams", "flat_params", "flat_optimizer"]
