"""Masks and labels: which leaves a transformation touches, and which group each leaf is in.

A *mask* is a tree of Python bools with the parameters' structure (or a prefix of it), or a
callable returning one from the parameters. *Labels* are the same with any hashable value per
leaf (see :func:`optcompose.partition`). Masks are static: they select code, not values.

Parameter *layouts* other than the model's own tree (such as :class:`optcompose.FlatParams`,
one buffer per dtype) plug in from above with :func:`register_layout`: a mask or labels
written for the model's tree is then evaluated on the model's view and mapped onto the
layout's leaves. This module imports only :mod:`optcompose.tree`."""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from optcompose._tree_diff import (
  _PRINTED,
  _PRINTED_KEY,
  _by_path,
  _found,
  _path_string,
  _paths,
  prefix_difference,
)
from optcompose.tree import first_difference

# What ``import optcompose`` re-exports (the helpers below serve the transformations).
__all__ = ["labels_from_fn", "labels_from_paths", "mask_from_paths"]


class _LayoutHooks(NamedTuple):
  view: Callable[[Any], Any]  # the layout node -> the model's tree
  spread: Callable[[Any, Any, str], Any]  # (node, values for the model's tree, name) -> values
  name: str
  elements: Callable[[Any], list]  # the layout node -> its leaves, without padding


_LAYOUTS: dict[type, _LayoutHooks] = {}


def register_layout(
  cls: type, view: Callable, spread: Callable, name: str, elements: Callable = jax.tree.leaves
) -> None:
  """Declare a pytree node type that holds a model's leaves in another arrangement.

  ``view(node)`` returns the model's tree; ``spread(node, values, name)`` maps per-leaf
  ``values`` (a tree with the model's structure) onto the node's own leaves, raising a
  ValueError naming the argument ``name`` where that is impossible; ``elements(node)``
  returns the node's leaves, each cut to the part that holds the model's elements (without
  padding), for a count over them."""
  _LAYOUTS[cls] = _LayoutHooks(view, spread, name, elements)


def model_elements(tree: Any) -> list:
  """``jax.tree.leaves(tree)``, a layout node's leaves cut to the model's elements (a
  FlatParams bucket without the zeros that pad it): one entry per leaf, in order."""
  out = []
  for x in jax.tree.leaves(tree, is_leaf=_is_layout):
    out += _hooks(x).elements(x) if _is_layout(x) else [x]
  return out


def _hooks(x) -> _LayoutHooks:
  """The hooks of ``x``, a layout node (see :func:`_is_layout`)."""
  return _LAYOUTS[type(x)]


def _is_layout(x) -> bool:
  return type(x) in _LAYOUTS


def _view(tree: Any) -> Any:
  if not _LAYOUTS:
    return tree
  return jax.tree.map(lambda x: _hooks(x).view(x) if _is_layout(x) else x, tree, is_leaf=_is_layout)


def _has_layout(tree: Any) -> bool:
  return bool(_LAYOUTS) and any(_is_layout(x) for x in jax.tree.leaves(tree, is_leaf=_is_layout))


def reject_layouts(tree: Any, transformation: str) -> None:
  """Raise a TypeError for a transformation that computes one value per model leaf when
  ``tree`` holds a layout (e.g. FlatParams) whose leaves are not the model's."""
  for x in jax.tree.leaves(tree, is_leaf=_is_layout):
    if _is_layout(x):
      kind = _hooks(x).name
      raise TypeError(
        f"{transformation} computes one value per leaf of the model, and {kind} buckets "
        "are not the model's leaves. Use it on ordinary pytree parameters (or use a global "
        "transformation such as clip_by_global_norm)."
      )


def broadcast_prefix(prefix: Any, tree: Any, name: str, tree_name: str) -> Any:
  """Broadcast ``prefix`` (a tree with ``tree``'s structure or a prefix of it) to ``tree``."""
  try:
    return jax.tree.broadcast(prefix, tree)
  except (ValueError, TypeError):
    raise ValueError(
      f"`{name}` is neither {tree_name}'s structure nor a prefix of it: "
      f"{prefix_difference(prefix, tree, name) or first_difference(prefix, tree)}."
    ) from None


def is_function_of_params(values: Any) -> bool:
  """Whether a mask or labels argument is a function of the parameters rather than a tree:
  callable, and no leaf of it is anything but callable. (A callable pytree of bools, e.g. an
  Equinox module used as a mask, is a tree, as in Optax.)"""
  leaves = jax.tree.leaves(values)
  return callable(values) and bool(leaves) and all(callable(x) for x in leaves)


def per_leaf_values(values: Any, tree: Any, name: str, broadcast: Callable[[Any, Any], Any]) -> Any:
  """Map per-leaf ``values`` (a mask or labels, written for the model's tree) onto ``tree``.

  ``values`` is a callable of the model's tree or a tree matching it (or matching ``tree``
  itself). ``broadcast(values, target)`` expands a prefix and raises on a mismatch. Each
  layout node in ``tree`` gets its values through its registered ``spread``.
  """
  if not jax.tree.leaves(tree):  # nothing to select: Optax's tree_map_params' stand-in
    return tree
  view = _view(tree)
  if is_function_of_params(values):
    values = values(view)
  if not _has_layout(tree):
    return broadcast(values, tree)
  try:
    full = broadcast(values, view)
  except (ValueError, TypeError) as error:
    try:
      return broadcast(values, tree)  # already one value per layout leaf
    except (ValueError, TypeError):
      raise error from None
  outer, outer_def = jax.tree.flatten(tree, is_leaf=_is_layout)
  parts = outer_def.flatten_up_to(full)
  return outer_def.unflatten(
    [_hooks(x).spread(x, part, name) if _is_layout(x) else part for x, part in zip(outer, parts)]
  )


def _check_bool_leaves(mask: Any, name: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask, is_leaf=_is_layout)[0]:
    if _is_layout(leaf):
      continue
    if not isinstance(leaf, (bool, jnp.bool_)) and not (
      hasattr(leaf, "dtype")
      and getattr(leaf, "shape", None) == ()
      and leaf.dtype == bool
      and not isinstance(leaf, jax.core.Tracer)
    ):
      raise TypeError(
        f"`{name}{jax.tree_util.keystr(tuple(path))}` is {type(leaf).__name__}; mask "
        "leaves must be Python booleans."
      )


def resolve_mask(mask: Any, tree: Any, name: str = "mask") -> Any:
  """Expand a boolean mask (a tree, a prefix of ``tree``, or a callable of ``tree``).

  Returns a tree with ``tree``'s structure and a Python bool per leaf. A mask whose
  structure is neither ``tree``'s nor a prefix of it is a ValueError naming the first
  differing path; a leaf that is not a Python or NumPy bool is a TypeError (masks are
  static). For a registered layout (FlatParams) the mask is written for the model's tree.
  """

  def broadcast(mask, target):
    _check_bool_leaves(mask, name)
    return broadcast_prefix(mask, target, name, "the parameter tree")

  return jax.tree.map(bool, per_leaf_values(mask, tree, name, broadcast))


def labels_from_fn(fn: Callable[[str, Any], Any]) -> Callable[[Any], Any]:
  """A labels (or mask) callable from ``fn(path, leaf)``.

  Args:
    fn: called with each leaf's path, e.g. ``"['dense']['bias']"`` (a Flax ``Variable``'s
      ``.value`` is left out, so the same labels serve ``nnx.State``), and the leaf.

  Returns:
    A callable of a parameter tree returning the tree of ``fn``'s results.

  Raises:
    TypeError: ``fn`` is not callable.
  """
  if not callable(fn):
    raise TypeError(f"labels_from_fn: `fn` must be callable, got {type(fn).__name__}.")

  def labels(tree):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(_path_string(p), x), tree)

  return labels


def _compile(fn: str, name: str, pattern: Any) -> re.Pattern:
  """``re.compile(pattern)``; a TypeError (not a str or compiled pattern) or ValueError (not
  a valid regex, with ``re``'s reason; or an escaped ``\\|``) naming ``fn``'s ``name``."""
  if not isinstance(pattern, (str, re.Pattern)):
    raise TypeError(f"{fn}: `{name}` must be a regex string, got {type(pattern).__name__}.")
  escaped = re.compile(r"(?<!\\)((?:\\\\)*)\\\|")  # an odd run of backslashes, then |
  if isinstance(pattern, str) and escaped.search(pattern):  # r"bias\|scale", from a table
    why = "a literal '|' (a Markdown table's escape, copied?); for either alternative write"
    fix, literal = escaped.sub(r"\1|", pattern), "to match a literal '|', write '[|]'"
    raise ValueError(f"{fn}: `{name}` {pattern!r} has '\\|', {why} {fix!r} ({literal}).")
  if isinstance(pattern, str) and "[" in pattern and _PRINTED.fullmatch(pattern):
    keys = "/".join(k for m in _PRINTED_KEY.findall(pattern) for k in m if k)
    raise ValueError(
      f"{fn}: `{name}` {pattern!r} is a path as printed, but a regex reads [...] as a set of "
      f"characters (it would match nearly every path): write the keys joined by '/' ({keys!r}), "
      "or re.escape(...)."
    )
  try:
    return re.compile(pattern)
  except re.error as error:
    raise ValueError(f"{fn}: `{name}` is not a valid regex: {pattern!r} ({error}).") from None


# The parameters of the outermost masked transformation running (see :func:`_check_paths`).
_MODEL: contextvars.ContextVar = contextvars.ContextVar("optcompose_masked_model", default=None)


@contextlib.contextmanager
def searched_model(tree: Any):
  """Within: masks and labels are evaluated on part of ``tree`` (a masked transformation's
  inner one sees the rest as MaskedNodes), so their path patterns are checked against all
  of ``tree``'s paths. Nested, the outermost tree counts (the whole model)."""
  token = _MODEL.set(tree if _MODEL.get() is None else _MODEL.get())
  try:
    yield
  finally:
    _MODEL.reset(token)


def _check_paths(fn: str, tree: Any, problem: Callable[[list], str]) -> None:
  """Raise a ValueError from ``fn`` with ``problem(paths)`` ("": none) for ``tree``'s leaf
  paths. Under :func:`searched_model` the whole model's paths decide: a pattern for another
  group's leaves is no typo there, one found in no leaf still is."""
  message, whole = problem(_paths(tree)), _MODEL.get()
  if message and whole is not None:  # not for a tree of other paths (a flatten inside)
    everything = _paths(jax.eval_shape(_view, whole) if _has_layout(whole) else whole)
    message = problem(everything) if set(_paths(tree)) <= set(everything) else message
  if message:
    raise ValueError(f"{fn}: {message}")


def _no_match(name: str, pattern: re.Pattern, paths: list, hint: str) -> str:
  """The problem (see :func:`_check_paths`) of ``pattern``, argument ``name``, found in none
  of ``paths`` (a typo would select nothing, silently), ending with ``hint``; "" if no paths."""
  if not paths or any(_found(pattern, p) for p in paths):
    return ""
  shown = ", ".join(paths[:5]) + (f", ... ({len(paths) - 5} more)" if len(paths) > 5 else "")
  return f"`{name}` {pattern.pattern!r} matches no leaf path; it was searched in: {shown}. {hint}"


# Ends those errors: for a mask or labels applied to part of a model with no masked around.
_PART = "given: where these are part of a model (an nnx.Optimizer's wrt=, a group of Optax's "
_PART += "partition), write"


def labels_from_paths(rules, default=None) -> Callable[[Any], Any]:
  """Label each leaf by the first ``(regex, label)`` rule whose regex is found in its path.

  Example: ``labels_from_paths([(r"bias|scale", "no_decay")], default="decay")``.

  Args:
    rules: a sequence of ``(regex, label)`` pairs, tried in order; each regex is searched
      as :func:`mask_from_paths` searches its patterns (printed, and keys joined by "/").
    default: the label of a leaf that no rule matches; ``None`` makes that an error naming
      the path.

  Returns:
    A labels callable (see :func:`labels_from_fn`).

  Raises:
    TypeError: ``rules`` is not a sequence of pairs, or a regex is not a string (naming
      ``rules[i]``). ValueError: a regex that does not compile (naming ``rules[i][0]``, the
      pattern and ``re``'s reason); from the labels callable: a path no rule matches without
      a ``default``, a rule's regex found in no leaf path (naming ``rules[i][0]``: a typo
      would silently leave its leaves to the default), or a rule whose every path an earlier
      rule found in its regex ('block' in 'block_1') labels otherwise (naming both). Inside
      ``masked`` or ``partition`` the whole model's paths count.
  """
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
    raise TypeError(
      f"labels_from_paths: `rules` must be a sequence of (regex, label) pairs, "
      f"got {type(rules).__name__}."
    )
  compiled = []
  for i, rule in enumerate(rules):
    if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
      raise TypeError(
        f"labels_from_paths: `rules[{i}]` must be a (regex, label) pair, got {rule!r}."
      )
    compiled.append((_compile("labels_from_paths", f"rules[{i}][0]", rule[0]), rule[1]))

  def label(path):
    for pattern, lab in compiled:
      if _found(pattern, path):
        return lab
    if default is None:
      raise ValueError(f"labels_from_paths: no rule matches {path} and there is no default.")
    return default

  hint = f"Labels see only the parameters they are {_PART} the rules for that part."

  def problem(paths):  # a typo, then a rule that never assigns its label (see Raises)
    for i, (pattern, _) in enumerate(compiled):
      if message := _no_match(f"rules[{i}][0]", pattern, paths, hint):
        return message
    hit = lambda i, x: _found(compiled[i][0], x)  # noqa: E731
    first = [next((i for i in range(len(compiled)) if hit(i, x)), -1) for x in paths]
    rule = lambda k: f"`rules[{k}]` ({compiled[k][0].pattern!r}, {compiled[k][1]!r})"  # noqa: E731
    for i, (pattern, lab) in enumerate(compiled):
      found = [(x, j) for x, j in zip(paths, first) if hit(i, x)]
      # Not a fallback ('.*' last, on a model the rules before it cover): see Raises.
      wider = [(x, j) for x, j in found if compiled[j][0].search(pattern.pattern)]
      other = [(x, j) for x, j in wider if compiled[j][1] != lab]
      if other and i not in (j for _, j in found):
        return (
          f"{rule(i)} never assigns its label: every path it matches is taken by an earlier "
          f"rule, e.g. {other[0][0]} by {rule(other[0][1])}. The first rule found in a path "
          "wins: put the more specific rule first."
        )
    return ""

  def labels(tree):
    _check_paths("labels_from_paths", tree, problem)
    return _by_path(tree, label)

  return labels


def mask_from_paths(include=None, exclude=None) -> Callable[[Any], Any]:
  """A mask callable: True where the path matches ``include`` and not ``exclude``.

  Example: ``adamw(..., mask=mask_from_paths(exclude=r"bias|scale"))``.

  Args:
    include: a regex searched in each leaf's path as printed (``['params']['Dense_0']
      ['bias']``; a Flax ``Variable``'s ``.value`` left out) and in its keys joined by "/"
      (``params/Dense_0/bias``, where ``bias$`` anchors): found in either (a negative
      lookaround, ``(?!...)``, must hold in both); ``None`` includes every path. A key
      holding "/" is ambiguous in the second form.
    exclude: a regex, searched the same way; matching paths are excluded.

  Returns:
    A mask callable (see :func:`labels_from_fn`).

  Raises:
    TypeError: ``include`` or ``exclude`` is not a string. ValueError: it is not a valid
      regex (the message names the argument, the pattern and ``re``'s reason), or has an
      escaped pipe (``bias\\|scale``, copied from a Markdown table: a literal ``|``); from the
      mask callable: ``include`` is found in no leaf path of a tree that has leaves (a typo
      would select nothing; inside ``masked`` or ``partition``, e.g. as each group's decay
      mask, no leaf path of the whole model). An ``exclude`` that matches nothing excludes
      nothing (a generic ``exclude=r"bias|scale"`` serves models without biases), and one
      that excludes every leaf gives a mask False everywhere (a ``no_decay`` group's decay
      mask). The alternatives of a pattern are not checked one by one (``include=
      "kernel|embedding"`` serves models without embeddings: a typo in one is not caught).
  """
  inc = _compile("mask_from_paths", "include", include) if include is not None else None
  exc = _compile("mask_from_paths", "exclude", exclude) if exclude is not None else None

  def mask(tree):
    if inc is not None:
      hint = f'A mask sees only the parameters it is {_PART} it for that part (an `exclude` needs '
      hint += 'no match: e.g. mask_from_paths(exclude=r"bias|scale")).'
      _check_paths("mask_from_paths", tree, lambda ps: _no_match("include", inc, ps, hint))
    return _by_path(
      tree,
      lambda path: (
        (inc is None or _found(inc, path)) and not (exc is not None and _found(exc, path))
      ),
    )

  return mask
