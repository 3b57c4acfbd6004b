"""Where two pytrees differ in structure, in words: the first leaf path missing or unexpected,
else the first node whose type or data differs (a :class:`~optcompose.FlatParams` of another
layout, a dict against a FrozenDict), named by the first leaf it holds; and leaf paths as
strings, printed and with their keys joined by "/", which path patterns search
(:func:`optcompose.masks.mask_from_paths`). On the ground floor with :mod:`optcompose.tree`,
which re-exports :func:`first_difference` and :func:`key_name`."""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import jax


def path_str(path) -> str:
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def _count(items: list, noun: str) -> str:
  return f"{items[0]} is {noun}" + (f" (and {len(items) - 1} more)" if len(items) > 1 else "")


def _short(data: Any, limit: int = 160) -> str:
  text = repr(data)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _same(x: Any, y: Any) -> bool:
  try:
    return bool(x == y)
  except Exception:  # auxiliary data that compare elementwise (arrays)
    return x is y


def _data_difference(x: Any, y: Any, where: str = "") -> str:
  """The first part of two nodes' auxiliary data that differs, e.g. ``leaves[0].shape: (3,)
  against (2,)`` for two FlatParams layouts (tuples and NamedTuples are searched)."""
  if type(x) is type(y) and isinstance(x, (tuple, list)) and len(x) == len(y):
    names = getattr(x, "_fields", None) or [f"[{i}]" for i in range(len(x))]
    for name, u, v in zip(names, x, y):
      if not _same(u, v):
        here = f"{where}.{name}" if name[0] != "[" else where + name
        if isinstance(getattr(u, "path", None), str):  # a FlatParams leaf's record
          here += f" (the leaf {u.path})"
        return _data_difference(u, v, here)
  return f"{where.lstrip('.') or 'its data'}: {_short(x)} against {_short(y)}"


def _type_name(node_type: Any, qualified: bool) -> str:
  if node_type is None:
    return "leaf"
  name = getattr(node_type, "__qualname__", repr(node_type))
  return f"{node_type.__module__}.{name}" if qualified else getattr(node_type, "__name__", name)


def _first_node(a: Any, b: Any, offset: int = 0) -> Optional[tuple]:
  """``(leaf offset, empty, a's node data, b's)`` of the first node (in tree order) whose
  type or auxiliary data differ between the treedefs ``a`` and ``b``; None if none does."""
  if not _same(a.node_data(), b.node_data()) or len(a.children()) != len(b.children()):
    return offset, a.num_leaves == 0, a.node_data(), b.node_data()
  for child_a, child_b in zip(a.children(), b.children()):
    found = _first_node(child_a, child_b, offset)
    if found is not None:
      return found
    offset += child_a.num_leaves
  return None


def first_difference(tree: Any, reference: Any) -> str:
  """Describe where ``tree`` and ``reference`` differ in structure, naming paths."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  a = [path_str(p) for p, _ in flat]
  b = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]]
  missing = [p for p in b if p not in set(a)]
  extra = [p for p in a if p not in set(b)]
  parts = ([_count(missing, "missing")] if missing else []) + (
    [_count(extra, "unexpected")] if extra else []
  )
  # A function as a leaf of `reference` (an Equinox model's activation) where `tree` has
  # none: the parameters were given unfiltered (Optax's update happens to accept them).
  objects = [
    type(x).__name__
    for p, x in jax.tree_util.tree_flatten_with_path(reference)[0]
    if path_str(p) in missing[:1] and callable(x) and not hasattr(x, "dtype")
  ]
  if objects:
    parts[0] += (
      f" (where the other tree has a {objects[0]}, not an array: give only the arrays, e.g. "
      "an Equinox model as eqx.filter(model, eqx.is_array))"
    )
  if parts:
    return "; ".join(parts)
  found = _first_node(jax.tree.structure(tree), jax.tree.structure(reference))
  if found is None:  # not expected: the structures differ somewhere
    return f"{jax.tree.structure(tree)} against {jax.tree.structure(reference)}"
  offset, empty, mine, theirs = found
  if empty:
    where = "an empty node " + (f"before {a[offset]}" if offset < len(a) else "after the leaves")
  else:
    where = f"the node holding {a[offset]}"
  type_a, type_b = (mine or (None,))[0], (theirs or (None,))[0]
  if type_a is not type_b:  # two classes of one name (Optax's state and ours) are told apart
    full = getattr(type_a, "__name__", None) == getattr(type_b, "__name__", None)
    return f"{where} is a {_type_name(type_a, full)} against a {_type_name(type_b, full)}"
  kind = lambda data: getattr((data or (None,))[0], "__name__", "a leaf")  # noqa: E731
  return f"{where} is a {kind(mine)} of other data ({_data_difference(mine[1], theirs[1])})"


def prefix_difference(prefix: Any, tree: Any, name: str = "the prefix") -> str:
  """Where ``prefix`` fails to be a prefix of ``tree``, at the shallowest paths: the
  subtrees of ``tree`` it has no value for (``['head']``, not each leaf under it), and its
  values at paths ``tree`` lacks; or that ``tree`` holds Flax Variables where ``prefix``
  (named ``name``) has plain values; "" where none of that is found (nodes of other types)."""
  ours = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(prefix)[0]]
  theirs = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  starts = {p[:i] for p in ours for i in range(len(p) + 1)}
  missing, unexpected = [], []
  for leaf in theirs:
    if not any(leaf[: len(p)] == p for p in ours):
      shallowest = next(leaf[:i] for i in range(len(leaf) + 1) if leaf[:i] not in starts)
      missing += [shallowest] if shallowest not in missing else []
  covered = {p[:i] for p in theirs for i in range(len(p) + 1)}
  unexpected = [p for p in ours if p not in covered]
  describe = lambda paths, what: (
    f"{jax.tree_util.keystr(paths[0])} {what}"
    + (f" (and {len(paths) - 1} more)" if len(paths) > 1 else "")
  )
  found = "; ".join(
    ([describe(missing, "is missing")] if missing else [])
    + ([describe(unexpected, "is unexpected")] if unexpected else [])
  )
  # Plain values against Flax Variables (an nnx.State at init) at the same paths but for
  # the Variable's `.value`: a container of another type (Optax names the two types).
  value = (jax.tree_util.GetAttrKey("value"),)
  if not found and theirs and all(p[-1:] == value and p[:-1] in ours for p in theirs):
    found = (
      f"{jax.tree_util.keystr(theirs[0])} is a Flax Variable's value where `{name}` has a "
      "plain value (the tree holds Variables, as nnx.State does, and the prefix is of plain "
      "dicts): build it from that same tree, e.g. jax.tree.map over nnx.state(model, "
      "nnx.Param), or pass a function of the parameters"
    )
  return found


def key_name(key: Any) -> str:
  """One ``jax.tree_util`` path entry as a plain string: a dict key, a sequence index or an
  attribute name (each key type has exactly one of ``key``, ``idx``, ``name``)."""
  for attribute in ("key", "idx", "name"):  # DictKey/FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _without_value(path) -> tuple:
  """``path`` without Flax ``Variable``'s trailing ``.value``."""
  keys = list(path)
  while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return tuple(keys)


def _path_string(path) -> str:
  """``keystr`` of a path without Flax ``Variable``'s trailing ``.value``."""
  return jax.tree_util.keystr(_without_value(path))


# A whole pattern that is a path as printed (keystr): ['a'], ["a"], [0], .name, repeated.
_PRINTED_KEY = re.compile(r"\['([^']*)'\]|\[\"([^\"]*)\"\]|\[(\d+)\]|\.(\w+)")
_PRINTED = re.compile(rf"(?:{_PRINTED_KEY.pattern})+")


class _Path(str):
  """A leaf's path as printed (``['params']['Dense_0']['bias']``, what :func:`labels_from_fn`
  gives), with ``plain``, its keys joined by "/" (``params/Dense_0/bias``)."""

  plain: str


def _paths(tree) -> list:
  """The :class:`_Path` of each of ``tree``'s leaves (a Flax ``Variable``'s ``.value`` left
  out)."""
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    printed = _Path(_path_string(path))
    printed.plain = "/".join(key_name(k) for k in _without_value(path))
    out.append(printed)
  return out


_LOOKAROUND = re.compile(r"\(\?<?!")  # a negative lookahead or lookbehind


def _found(pattern: re.Pattern, path: "_Path") -> bool:
  """Whether ``pattern`` is found in ``path`` as printed or in its keys joined by "/" (every
  printed dict path ends in ``']``: ``bias$`` matched nothing, and ``exclude="bias$"``
  excluded nothing, silently), each leaf on its own: one pattern means the same in every
  part of a model (``bias$|scale``: either alternative, in either form). A negative
  lookaround must hold in both forms (a lookahead for ``['head']`` holds in every "/" form,
  one for ``params/head`` in every printed one)."""
  printed, plain = pattern.search(path), pattern.search(path.plain)
  both = _LOOKAROUND.search(pattern.pattern)
  return bool(printed and plain) if both else bool(printed or plain)


def _by_path(tree: Any, value: Callable[["_Path"], Any]) -> Any:
  """``tree`` with each leaf replaced by ``value(its path)``."""
  return jax.tree.unflatten(jax.tree.structure(tree), [value(p) for p in _paths(tree)])
