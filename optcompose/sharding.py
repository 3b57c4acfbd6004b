"""Placing optimizer state with the parameters' shardings.

Under JAX's explicit sharding mode (``jax.make_mesh`` with ``AxisType.Explicit``, the default of
recent JAX) every transformation's ``init`` but ``flatten``'s (which refuses a split leaf)
already returns moments sharded like their parameters: ``zeros_like`` carries the sharding in
its type. Under the older *auto* mode, ``jax.jit(tx.init)`` has nothing to propagate from (a
zero moment depends on no data), so the whole state lands on one device (as Optax's does),
not sharded like the parameters. :func:`state_shardings` gives the shardings to pass as
``out_shardings`` so that the state is created where it belongs, without ever being
materialised elsewhere::

    abstract = jax.eval_shape(lambda: params)          # or ShapeDtypeStructs with shardings
    state = jax.jit(tx.init, out_shardings=oc.sharding.state_shardings(tx, abstract))(params)

:func:`init_sharded` does exactly that. How a state leaf is matched to its parameter: every
subtree of the state whose structure is the parameters' structure (a masked-out leaf,
optcompose's or Optax's ``MaskedNode``, may stand in for a parameter) mirrors the parameters;
each of its leaves with the parameter's shape takes the parameter's sharding, and each whose
shape is the parameter's behind leading axes (copies of the parameter stacked along them, as
L-BFGS's history is) takes it on those trailing dimensions, the leading ones whole. Every other
leaf (counts, norms, injected hyperparameters) is replicated over the parameters' mesh.

:func:`zero1_state_shardings` splits the parameter-shaped state over the data-parallel axis
instead (ZeRO stage 1: the optimizer state divided among the data-parallel devices, the
parameters as they are); :func:`zero1_flat_shardings` does it for a replicated
:class:`~optcompose.FlatParams`, each bucket split evenly (as :func:`zero1_state_shardings` does
for the buckets of a :func:`~optcompose.flat_optimizer`'s state). :func:`placement_onto` lays any of
these onto another container of the same state, matched by path (Flax NNX's
``nnx.state(optimizer.opt_state)``, whose leaves are in another order).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from optcompose import tree as otree
from optcompose.core import GradientTransformation
from optcompose.flat import GivenFlatParams, is_flat
from optcompose.wrappers.masking import MaskedNode

__all__ = [
  "state_shardings",
  "init_sharded",
  "zero1_state_shardings",
  "zero1_flat_shardings",
  "placement_onto",
]


def _sharding_of(leaf: Any, path: str) -> Sharding:
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    raise ValueError(
      f"`params{path}` has no sharding: pass committed arrays or "
      "jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves."
    )
  return sharding


def _replicated_on(shardings: list) -> Sharding:
  """Full replication over the devices the parameters use."""
  for s in shardings:
    if isinstance(s, NamedSharding):
      return NamedSharding(s.mesh, PartitionSpec())
  if shardings:
    return shardings[0]  # one device (SingleDeviceSharding): nothing to replicate over
  return SingleDeviceSharding(jax.devices()[0])


# A masked-out subtree in a state, as optcompose's masked/partition leave it, or Optax's.
_MASKED_NODES = (MaskedNode, optax.MaskedNode)


def _stacked(sharding: Sharding, leading: int, replicated: Sharding) -> Sharding:
  """A parameter's ``sharding`` for a state leaf holding copies of it stacked along
  ``leading`` new axes in front (each copy placed as the parameter, the new axes whole)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(*(None,) * leading, *sharding.spec))
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  return replicated


def state_shardings(tx: GradientTransformation, params: Any) -> Any:
  """A tree of shardings with the structure of ``tx.init(params)``.

  ``params`` are arrays or ``jax.ShapeDtypeStruct`` leaves that carry a ``sharding``; the
  state itself is never computed (``jax.eval_shape``).
  """
  return _placement(jax.eval_shape(tx.init, params), params)


def _placement(abstract: Any, params: Any, on_buckets: Any = None) -> Any:
  """:func:`state_shardings` of the abstract state ``abstract``; ``on_buckets`` (if given)
  places each FlatParams of the state that does not mirror ``params`` (a ``flat_optimizer``'s
  buckets), which is otherwise replicated."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  p_shardings = [_sharding_of(x, jax.tree_util.keystr(tuple(p))) for p, x in flat]
  p_shapes = [tuple(x.shape) for _, x in flat]
  replicated = _replicated_on(p_shardings)

  index = treedef.unflatten(range(len(flat)))  # each parameter's position
  masked = lambda x: isinstance(x, _MASKED_NODES)

  def mirrors_params(node):
    """Whether ``node`` has the parameters' structure, a MaskedNode standing for any
    subtree (as ``masked`` and ``partition`` leave them) and an array for each parameter."""
    if node is None or masked(node):
      return False
    try:
      fits = jax.tree.map(
        lambda x, i: masked(x) or (hasattr(x, "shape") and isinstance(i, int)),
        node,
        index,
        is_leaf=masked,
      )
    except (ValueError, TypeError):
      return False
    return all(jax.tree.leaves(fits))

  def buckets(node):
    return on_buckets is not None and is_flat(node) and not mirrors_params(node)

  def leaf(x, i):
    """The placement of ``x``, a leaf at parameter ``i``'s position in a mirroring subtree."""
    shape, own = tuple(x.shape), p_shapes[i]
    if shape == own:
      return p_shardings[i]
    leading = len(shape) - len(own)
    if leading > 0 and shape[leading:] == own:  # copies of the parameter, stacked
      return _stacked(p_shardings[i], leading, replicated)
    return replicated

  def place(node):
    if buckets(node):
      return on_buckets(node)
    if not mirrors_params(node):  # a leaf outside any params-shaped subtree
      return replicated
    return jax.tree.map(lambda x, i: x if masked(x) else leaf(x, i), node, index, is_leaf=masked)

  return jax.tree.map(place, abstract, is_leaf=lambda n: buckets(n) or mirrors_params(n))


def init_sharded(tx: GradientTransformation, params: Any) -> Any:
  """``tx.init(params)`` compiled with the state's shardings as ``out_shardings``."""
  return jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)


def _split_over(sharding: NamedSharding, shape: tuple, axis: str) -> NamedSharding:
  """``sharding`` with ``axis`` added to the first dimension that no mesh axis splits yet and
  that ``axis``'s size divides (unchanged if there is none, or if ``axis`` is used)."""
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  used = {
    a
    for entry in spec
    if entry is not None
    for a in (entry if isinstance(entry, tuple) else (entry,))
  }
  size = sharding.mesh.shape[axis]
  if axis in used:
    return sharding
  for dim, (entry, n) in enumerate(zip(spec, shape)):
    if entry is None and n % size == 0 and n >= size:
      return NamedSharding(sharding.mesh, PartitionSpec(*spec[:dim], axis, *spec[dim + 1 :]))
  return sharding


def zero1_state_shardings(tx: GradientTransformation, params: Any, axis: str = "data") -> Any:
  """The state's shardings for ZeRO stage 1: each state leaf that mirrors a parameter is
  split over the mesh axis ``axis`` (the data-parallel one), whatever the parameter's own
  placement (replicated, or tensor-parallel over other axes); counts and scalars are
  replicated. Each device then keeps and updates 1/size of the optimizer state.

  Use the result as the state's ``in_shardings``/``out_shardings`` (and with
  :func:`init_sharded`'s pattern for ``init``) while the parameters keep theirs: XLA computes
  each slice of the update where its state lives and gathers the parameters after the step.
  Each leaf is split along its first dimension that no mesh axis splits yet and that
  ``axis``'s size divides; a leaf with none (or already split over ``axis``) keeps its
  parameter's placement (replicated, on every device): to split every element, keep the
  parameters as a :class:`~optcompose.FlatParams` or use :func:`~optcompose.flat_optimizer`,
  with ``pad_to`` the size of ``axis``.

  A state kept in buckets -- ``tx`` built by :func:`~optcompose.flat_optimizer`, wrapped or
  not, or ``params`` a :class:`~optcompose.FlatParams` -- has every bucket split evenly over
  ``axis``, as :func:`zero1_flat_shardings` does: each bucket's length must divide by the
  size of ``axis`` (``pad_to``), another length is a ValueError naming the bucket.

  Args:
    tx: the transformation.
    params: arrays or ``jax.ShapeDtypeStruct`` leaves with a ``NamedSharding`` on a mesh that
      has ``axis``.
    axis: the mesh axis to split the state over.
  """
  return _zero1(tx, params, axis, "zero1_state_shardings")


def _zero1(tx: GradientTransformation, params: Any, axis: str, who: str) -> Any:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves, meshes = [], []
  for path, x in flat:
    sharding = _sharding_of(x, jax.tree_util.keystr(tuple(path)))
    if not isinstance(sharding, NamedSharding) or axis not in sharding.mesh.shape:
      raise ValueError(
        f"{who}: `params{jax.tree_util.keystr(tuple(path))}` "
        f"is not placed on a mesh with the axis {axis!r} ({sharding})."
      )
    meshes.append(sharding.mesh)
    leaves.append(
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_split_over(sharding, tuple(x.shape), axis))
    )
  split = treedef.unflatten(leaves)
  # The state's shapes, from the parameters as placed (GivenFlatParams: see
  # zero1_flat_shardings). Not from ``split``: on explicit axes its shardings are in the
  # arrays' types, and a flat_optimizer could not join leaves split and unsplit in a bucket.
  abstract = jax.eval_shape(tx.init, params)
  if not meshes:  # no parameters: no state to split
    return _placement(abstract, split)
  mesh, size = meshes[0], meshes[0].shape[axis]
  if is_flat(params):
    _check_buckets(params, size, axis, who, "the FlatParams with flat_params(params, ")

  def on_buckets(node):  # a flat_optimizer's buckets
    _check_buckets(node, size, axis, who, "the flat_optimizer with flat_optimizer(tx, ")
    place = lambda x: NamedSharding(mesh, PartitionSpec(axis if x.ndim == 1 else None))
    return jax.tree.map(place, node)

  return _placement(abstract, split, on_buckets)


def _check_buckets(flat: Any, size: int, axis: str, who: str, build: str) -> None:
  """Every bucket of ``flat`` (the parameters, or a state's FlatParams) divides by ``size``."""
  for name, x in zip(flat.layout.buckets, flat.buffers):
    n = x.shape[0] if getattr(x, "ndim", 0) == 1 else 0
    if n % size:
      raise ValueError(
        f"{who}: bucket {name!r} has {n} elements, not a multiple of the {size} devices of "
        f"mesh axis {axis!r}: build {build}pad_to={size})."
      )


def zero1_flat_shardings(
  tx: GradientTransformation, flat: Any, mesh: jax.sharding.Mesh, axis: str = "data"
) -> Any:
  """:func:`zero1_state_shardings` for parameters kept as a replicated
  :class:`~optcompose.FlatParams`: every bucket of the state (``tx.init(flat)``'s moments) is
  split evenly along its one dimension over the mesh axis ``axis``; counts and scalars are
  replicated. Each device keeps and updates 1/size of every bucket.

  Place the parameters replicated, ``NamedSharding(mesh, PartitionSpec())``, and pass that
  and the result as ``in_shardings``/``out_shardings`` of the jitted step (and the result as
  ``out_shardings`` of ``jax.jit(tx.init)``): XLA updates each slice where its state lives
  and gathers the parameters after the step. Every bucket's length must divide by the size
  of ``axis``: build the FlatParams with ``flat_params(params, pad_to=size)`` (the padding is
  zeros that the model never reads); another length is a ValueError naming the bucket.

  ``tx`` built by :func:`~optcompose.flat_optimizer` (wrapped or not) takes the model's tree,
  not FlatParams: the result is then the placement of ``tx.init(flat.unflatten())``'s
  state, as :func:`zero1_state_shardings` gives it (the buckets are the flat_optimizer's,
  built with its own ``labels`` and ``pad_to``).

  Args:
    tx: the transformation.
    flat: the FlatParams (arrays or ``jax.ShapeDtypeStruct`` buffers; only shapes are read).
    mesh: the mesh, with the axis ``axis``.
    axis: the mesh axis to split the state over.
  """
  if not is_flat(flat):
    raise TypeError(
      f"zero1_flat_shardings: `flat` is a {type(flat).__name__}, not a FlatParams "
      "(use zero1_state_shardings for a tree of parameters)."
    )
  if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
    raise TypeError(
      f"zero1_flat_shardings: `mesh` must be a jax.sharding.Mesh, got "
      f"{type(mesh).__name__} {mesh!r:.40} (the mesh axis is the argument after it, `axis=`)."
    )
  if axis not in mesh.shape:
    raise ValueError(f"zero1_flat_shardings: the mesh has no axis {axis!r} ({dict(mesh.shape)}).")
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  try:
    return _zero1(
      tx, jax.tree.map(lambda x: abstract(x.shape, x.dtype), flat), axis, "zero1_flat_shardings"
    )
  except GivenFlatParams:  # a flat_optimizer: it packs the model's tree itself
    layout = flat.layout
    tree = [abstract(leaf.shape, layout.dtypes[leaf.bucket]) for leaf in layout.leaves]
    return _zero1(tx, layout.treedef.unflatten(tree), axis, "zero1_flat_shardings")


def _variables() -> tuple:
  """Flax NNX's Variable types (a Variable is a pytree node of one ``value``), if Flax is
  installed."""
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover -- Flax is a dependency of the tests
    return ()
  older = vars(nnx).get("VariableState")  # flax < 0.12 (later an alias that warns)
  return (nnx.Variable,) if older is None else (nnx.Variable, older)


def placement_onto(placement: Any, tree: Any) -> Any:
  """``placement`` laid onto ``tree``: a tree of ``tree``'s structure whose every leaf is the
  sharding that ``placement`` holds at the same path.

  ``placement`` has the structure of ``tx.init``'s state (from :func:`state_shardings`,
  :func:`zero1_state_shardings` or :func:`zero1_flat_shardings`); ``tree`` holds that state in
  another container. Paths are compared by their names (attribute names, dict keys and
  sequence indices alike: ``.mu`` is ``['mu']``, ``[0]`` is ``[0]``), a Flax ``Variable``
  on either side standing for the value it holds. Flax NNX's ``nnx.state(opt.opt_state)``
  is such a tree: every state's fields are in another order there (by name), so its leaves
  cannot be matched by position::

      placement = oc.sharding.zero1_state_shardings(tx, nnx.state(model, nnx.Param))
      state = nnx.state(optimizer.opt_state)
      nnx.update(optimizer.opt_state, jax.device_put(state, placement_onto(placement, state)))

  Args:
    placement: shardings with the structure of ``tx.init``'s state.
    tree: the same state in another container (arrays or abstract leaves; only the paths
      are read).

  Returns:
    A tree of shardings with ``tree``'s structure (``jax.device_put``'s or ``jax.jit``'s
    ``in_shardings``/``out_shardings`` for it).

  Raises:
    ValueError: a leaf of ``tree`` has no sharding in ``placement`` at its path, or two
      leaves of ``placement`` have the same names (the message names them).
  """
  variables = _variables()
  is_variable = lambda x: isinstance(x, variables)  # noqa: E731 -- a Variable is one leaf here
  by_path: dict = {}
  for key_path, sharding in jax.tree_util.tree_flatten_with_path(placement, is_variable)[0]:
    names = tuple(otree.key_name(k) for k in key_path)
    sharding = jax.tree.leaves(sharding)[0] if is_variable(sharding) else sharding
    if names in by_path:
      raise ValueError(
        f"placement_onto: `placement{jax.tree_util.keystr(tuple(key_path))}` has the same "
        f"names as another of its leaves ({'/'.join(names)}): it cannot be matched by path."
      )
    by_path[names] = sharding

  def find(key_path, leaf):
    names = tuple(otree.key_name(k) for k in key_path)
    if names not in by_path:
      raise ValueError(
        f"placement_onto: `tree{jax.tree_util.keystr(tuple(key_path))}` has no sharding in "
        f"`placement` (no leaf at {'/'.join(names) or 'the root'}): is `placement` for this "
        "optimizer's state?"
      )
    found = by_path[names]
    return jax.tree.map(lambda _: found, leaf) if is_variable(leaf) else found

  return jax.tree_util.tree_map_with_path(find, tree, is_leaf=is_variable)
