"""Tree math with ``optax.tree``'s names, the checks every transformation makes, and walking
optimizer states. The ground floor: it imports nothing else from optcompose.

Paths are written as ``jax.tree_util.keystr`` writes them, e.g. ``['layer']['w']``, so an
error names the leaf the user would index.

Every function of ``optax.tree`` (0.2.8) is here with Optax's arguments and defaults: ours
where our transformations share the formula (``norm``, ``bias_correction``, the moment
updates, the ``*_like`` and casts), Optax's own for the rest (see the bottom of the module).
Where two dtypes meet (a float32 leaf summed with a float64 one) the result is standard
promotion's, whatever ``jax_numpy_dtype_promotion`` says (strict mode runs them too).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from optax import tree_utils as _optax_tree_utils

from optcompose._tree_diff import first_difference as first_difference
from optcompose._tree_diff import key_name as key_name
from optcompose._tree_diff import path_str as path_str


def check_same_structure(tree: Any, reference: Any, name: str, reference_name: str) -> None:
  """Raise a ValueError naming the first differing path if structures or leaf shapes differ.

  Shapes are compared too, so that nothing is silently broadcast (a ``(3,)`` gradient
  against a ``(3, 1)`` moment would otherwise broadcast to ``(3, 3)``).
  """
  if jax.tree.structure(tree) != jax.tree.structure(reference):
    raise ValueError(
      f"`{name}` does not have the structure of `{reference_name}`: "
      f"{first_difference(tree, reference)}."
    )
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(reference)
  ):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
        f"`{name}{jax.tree_util.keystr(tuple(path))}` has shape {jnp.shape(a)} but "
        f"`{reference_name}{jax.tree_util.keystr(tuple(path))}` has shape {jnp.shape(b)}."
      )


def check_same_dtypes(
  tree: Any, reference: Any, name: str, reference_name: str, kept: bool = False
) -> None:
  """Raise a TypeError naming the first path where ``tree``'s dtype is not ``reference``'s
  (the trees have the same structure), so that a kept copy is never silently rounded
  (``kept``: the message calls the reference "the kept" copy).

  Raises:
    TypeError: a leaf's dtype differs; the message names the path and both dtypes.
  """
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(reference)
  ):
    if jnp.result_type(a) != jnp.result_type(b):
      where = jax.tree_util.keystr(tuple(path))
      raise TypeError(
        f"`{name}{where}` has dtype {jnp.result_type(a)} but {'the kept ' * kept}"
        f"`{reference_name}{where}` has dtype {jnp.result_type(b)} (it would be "
        "silently rounded; keep the dtype seen at init)."
      )


def leaf_dtype(leaf: Any):
  """A leaf's dtype, or None for a leaf that is not a number or an array (a string)."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None:
    return dtype
  if isinstance(leaf, (bool, int, float, complex)):
    return jnp.result_type(leaf)
  return None


_NEED = "optimizers need floating-point leaves (cast integer or boolean leaves, or mask them out)"


def check_floating(tree: Any, name: str, need: str = _NEED) -> None:
  """Raise a TypeError naming the first leaf that is not a floating-point or complex array.

  Args:
    tree: the tree to check (parameters, gradients).
    name: how the tree is named in the message (``params``, ``updates``).
    need: the rest of the message: what needs floating-point leaves, and the remedy.
  """
  leaves = jax.tree.leaves(tree)
  if all(is_inexact(leaf_dtype(leaf)) for leaf in leaves):  # the fast path: no paths built
    return
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = leaf_dtype(leaf)
    where = f"`{name}{jax.tree_util.keystr(tuple(path))}`"
    if dtype is None:
      raise TypeError(f"{where} is a {type(leaf).__name__} ({leaf!r:.40}), not an array; {need}.")
    if not is_inexact(dtype):
      raise TypeError(f"{where} has dtype {dtype}; {need}.")


def check_not_complex_for_real(updates: Any, params: Any, who: str, why: str) -> None:
  """Raise a TypeError naming the first path where ``updates`` is complex and ``params`` real
  (the trees have the same structure); ``why`` ends the message (what would go wrong)."""
  for (path, u), p in zip(
    jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params)
  ):
    if jnp.iscomplexobj(u) and not jnp.iscomplexobj(p):
      where = path_str(path)
      raise TypeError(f"{who}: `updates{where}` is complex but `params{where}` is real: {why}.")


def is_inexact(dtype) -> bool:
  """Whether ``dtype`` is a floating-point or complex dtype (False for None)."""
  try:
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
  except TypeError:  # not a dtype JAX knows
    return False


def zeros_like(tree: Any, dtype=None) -> Any:
  """A tree of zeros of ``tree``'s structure and shapes (``dtype``: else each leaf's)."""
  return jax.tree.map(lambda x: jnp.zeros_like(x, dtype=dtype), tree)


def ones_like(tree: Any, dtype=None) -> Any:
  """A tree of ones of ``tree``'s structure and shapes (``dtype``: else each leaf's)."""
  return jax.tree.map(lambda x: jnp.ones_like(x, dtype=dtype), tree)


def full_like(tree: Any, fill_value, dtype=None) -> Any:
  """A tree of ``fill_value`` of ``tree``'s structure and shapes (``dtype``: else each leaf's)."""
  return jax.tree.map(lambda x: jnp.full_like(x, fill_value, dtype=dtype), tree)


def cast(tree: Any, dtype) -> Any:
  """Cast every leaf to ``dtype``; ``None`` leaves the tree as it is."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), tree)


def cast_like(tree: Any, other_tree: Any) -> Any:
  """Cast each leaf to the dtype of ``other_tree``'s leaf (left as it is where that has none)."""
  return jax.tree.map(
    lambda x, o: jnp.asarray(x).astype(o.dtype) if hasattr(o, "dtype") else x, tree, other_tree
  )


def promote_types(*dtypes) -> jnp.dtype:
  """The dtype JAX's standard promotion gives ``dtypes`` together (the wider of two floats;
  float32 for bfloat16 with float16), whatever ``jax_numpy_dtype_promotion`` says: the
  dtype a computation names, and then casts its operands to explicitly."""
  with jax.numpy_dtype_promotion("standard"):
    return functools.reduce(jnp.promote_types, dtypes)


def promote(*values) -> tuple:
  """``values`` cast to the one dtype JAX's standard promotion gives them together (the
  widest of the arrays'; a weakly typed value, such as a Python scalar, takes the others'),
  so that arithmetic on them runs under ``jax_numpy_dtype_promotion="strict"`` too. Python
  scalars, and arrays already of that dtype, are returned as they are."""
  arrays = [v for v in values if type(v) not in (int, float)]  # one float dtype: fast
  if arrays and all(isinstance(v, jax.Array) and v.dtype == arrays[0].dtype for v in arrays):
    if jnp.issubdtype(arrays[0].dtype, jnp.floating):  # (eager calls: no result_type)
      return values
  with jax.numpy_dtype_promotion("standard"):
    dtype = jnp.result_type(*values)
  return tuple(
    v
    if isinstance(v, (int, float, complex)) or jnp.result_type(v) == dtype
    else jnp.asarray(v).astype(dtype)
    for v in values
  )


def squared_norm(tree: Any, *, only_square: bool = False) -> jax.Array:
  """Sum of squared absolute values over all leaves, squared and accumulated in float32 or
  wider (a float16 300 squared is inf in float16; integers: in the default float dtype).

  ``only_square=True`` says that the step squares no other use of these same arrays (a
  clip: what follows squares the clipped copy). The square is then written ``x * x``, whose
  sum XLA CPU's library reduction recognises and reads at about 1.4x the speed of
  ``|x| * |x|`` (the default, see :func:`_square_for_a_sum`). Both are the same values."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  square = abs_sq if only_square else _square_for_a_sum
  dtypes = [jnp.result_type(x) for x in leaves]
  default = jnp.result_type(float)  # float64 under x64: integers are squared in it
  wide = [promote_types(d, jnp.float32 if is_inexact(d) else default) for d in dtypes]
  total = [jnp.sum(square(jnp.asarray(x).astype(w))) for x, w in zip(leaves, wide)]
  # Summed left to right, each addition in the wider of its two operands.
  return functools.reduce(lambda a, b: jnp.add(*promote(a, b)), total)


def global_norm(tree: Any, *, only_square: bool = False) -> jax.Array:
  """The L2 norm of all leaves taken together (``only_square``: see :func:`squared_norm`)."""
  return jnp.sqrt(squared_norm(tree, only_square=only_square))


def _square_for_a_sum(x: jax.Array) -> jax.Array:
  """``|x|^2`` for a reduction: ``|x| * |x|`` for real x, bitwise ``x * x`` but not the
  optimizers' own ``x * x`` (a second moment's ``g^2``), which XLA would share with the norm
  and write out: a norm of the gradients beside AdamW took 2.1x the step; this way 1.2x."""
  return abs_sq(x) if jnp.iscomplexobj(x) else jnp.abs(x) * jnp.abs(x)


def abs_sq(x: jax.Array) -> jax.Array:
  """|x|^2 elementwise; ``x * x`` for real x (the same HLO as ``x ** 2``)."""
  x = jnp.asarray(x)
  if jnp.iscomplexobj(x):
    return (x.conj() * x).real
  return x * x


# ---------------------------------------------------------------------------------------
# Walking states: find and replace nodes anywhere in a pytree (ours, Optax's, nested in any
# wrapper, inside Flax containers), by what they are, never by their class name.


def _children(node: Any):
  """``(keys, children, rebuild)`` one level below ``node``, or None for a leaf."""
  keyed, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  if jax.tree_util.treedef_is_leaf(treedef):
    return None
  return [p[0] for p, _ in keyed], [c for _, c in keyed], treedef.unflatten


def find_nodes(tree: Any, predicate) -> list:
  """Every node of ``tree`` (the root and nested ones included) for which ``predicate``
  holds, as ``(path, node)`` in tree order; ``path`` is a tuple of plain strings (dict keys,
  indices, attribute names, as :func:`key_name` writes them). Matches nested inside a
  match are found too."""
  found = []

  def visit(path, node):
    if predicate(node):
      found.append((path, node))
    below = _children(node)
    if below is not None:
      for key, child in zip(below[0], below[1]):
        visit(path + (key_name(key),), child)

  visit((), tree)
  return found


def is_state_mapping(node: Any, fields) -> bool:
  """Whether ``node`` is a state of ``fields`` turned into a mapping of them (Flax NNX's
  ``nnx.state``, ``nnx.to_pure_dict``, a checkpoint restored without a template), where an
  empty ``inner_state`` leaves no key."""
  if hasattr(node, "_fields") or not isinstance(node, Mapping):
    return False
  keys = {str(k) for k in node}
  return keys == {*fields} or keys == {*fields} - {"inner_state"}


def replace_nodes(tree: Any, predicate, replace) -> Any:
  """``tree`` with every node for which ``predicate`` holds replaced by ``replace(node)``;
  the replacement's own children are walked too (so nested matches are replaced)."""

  def visit(node):
    if predicate(node):
      node = replace(node)
    below = _children(node)
    if below is None:
      return node
    return below[2]([visit(child) for child in below[1]])

  return visit(tree)


# ---------------------------------------------------------------------------------------
# The rest of ``optax.tree`` (zeros_like, ones_like, full_like, cast, cast_like are above).


def norm(tree: Any, ord=None, squared: bool = False) -> jax.Array:  # Optax's `ord`
  """The norm of order ``ord`` (None or 2, 1, inf) of all leaves (``squared``: squared).

  The L2 norm is :func:`global_norm`'s (squares summed in float32 or wider: Optax's float16
  300 squared is inf), returned in Optax's dtype (the leaves' real dtypes, promoted).
  """
  if ord is None or ord == 2:
    out = squared_norm(tree) if squared else global_norm(tree)
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(tree)]
    floats = [jnp.finfo(d).dtype for d in dtypes if is_inexact(d)]  # integers promote to them
    if floats:
      return out.astype(promote_types(*floats))
    return out.astype(jnp.result_type(float))  # integers only, or nothing: the default float
  if ord == 1:
    out = sum(jax.tree.map(jnp.abs, tree))
  elif ord == jnp.inf or ord in ("inf", "infinity"):
    out = max(jax.tree.map(jnp.abs, tree))
  else:
    raise ValueError(f"Unsupported ord: {ord}")
  return jnp.array(abs_sq(out) if squared else out)


def moment_leaf(g, moment, decay, order=1):
  """One EMA step of a power, ``(1 - decay) * g**order + decay * moment``, each operation in
  the wider of its operands' dtypes."""
  new = jnp.multiply(*promote(1 - decay, g if order == 1 else g**order))
  return jnp.add(*promote(new, jnp.multiply(*promote(decay, moment))))


def _map_updates(f, updates, moments):
  """``f(g, m)`` leaf by leaf, None where ``updates`` has None."""
  return jax.tree.map(
    lambda g, m: None if g is None else f(g, m), updates, moments, is_leaf=lambda x: x is None
  )


def update_moment(updates, moments, decay, order):
  """The EMA of the ``order``-th power of the updates (:func:`moment_leaf`)."""
  return _map_updates(lambda g, m: moment_leaf(g, m, decay, order), updates, moments)


def update_infinity_moment(updates, moments, decay, eps):
  """The decaying maximum ``max(|g| + eps, decay * m)``."""
  return _map_updates(
    lambda g, m: jnp.maximum(
      *promote(jnp.add(*promote(jnp.abs(g), eps)), jnp.multiply(*promote(decay, m)))
    ),
    updates,
    moments,
  )


def update_moment_per_elem_norm(updates, moments, decay, order):
  """The EMA of the ``order``-th power of each element's modulus."""

  def power(g):
    if jnp.isrealobj(g):
      return g**order
    half = order / 2
    return abs_sq(g) ** (int(half) if half.is_integer() else half)  # an int: integer_pow

  return _map_updates(lambda g, m: moment_leaf(power(g), m, decay), updates, moments)


def bias_correction_denominator(decay, count, at_least=jnp.float32) -> jax.Array:
  """``1 - decay**count`` in ``decay``'s dtype, and at least ``at_least`` (float32 by default:
  bfloat16 rounds it to 0; :func:`bias_correction` keeps Optax's rounding so)."""
  decay = jnp.asarray(decay)
  wide = promote_types(decay.dtype, at_least)
  return 1 - decay.astype(wide) ** jnp.asarray(count).astype(wide)


@functools.partial(jax.jit, inline=True)
def bias_correction(moment, decay, count):
  """``moment / (1 - decay**count)``, divided in each leaf's dtype (Optax's rounding)."""
  denominator = bias_correction_denominator(decay, count)
  return jax.tree.map(lambda t: t / denominator.astype(t.dtype), moment)


def _optax_s(name: str):
  """Optax's ``optax.tree.<name>`` (its signature and docstring), run under standard dtype
  promotion: where two dtypes meet, the result is standard promotion's in any mode."""
  fn = getattr(_optax_tree_utils, f"tree_{name}")

  @functools.wraps(fn)
  def run(*args, **kwargs):
    with jax.numpy_dtype_promotion("standard"):
      return fn(*args, **kwargs)

  run.__name__ = run.__qualname__ = name
  run.__module__ = __name__
  return run


# Optax's own. Arithmetic without a counterpart among our transformations' formulas (run
# under standard promotion), leaf maps, lookups by key or by NamedTuple class name (which our
# own code never does: :func:`find_nodes` finds nodes by what they are), PRNG keys (Optax's
# splits, so that a stream drawn here is Optax's).
add, sub, mul, div, scale, add_scale, vdot, where, allclose, clip, dtype = map(
  _optax_s,
  ("add", "sub", "mul", "div", "scale", "add_scale", "vdot", "where", "allclose", "clip", "dtype"),
)
sum, max, min = map(_optax_s, ("sum", "max", "min"))  # Optax's names, builtins' too
size, batch_shape = _optax_tree_utils.tree_size, _optax_tree_utils.tree_batch_shape
conj, real = _optax_tree_utils.tree_conj, _optax_tree_utils.tree_real
NamedTupleKey = _optax_tree_utils.NamedTupleKey
get, get_all_with_path = _optax_tree_utils.tree_get, _optax_tree_utils.tree_get_all_with_path
set = _optax_tree_utils.tree_set  # Optax's name (use builtins.set in this module)
map_params = _optax_tree_utils.tree_map_params
split_key_like = _optax_tree_utils.tree_split_key_like
random_like = _optax_tree_utils.tree_random_like
unwrap_random_key_data = _optax_tree_utils.tree_unwrap_random_key_data
