"""How ``optcompose.migrate`` reads a state: the counterpart classes of both libraries and
the small predicates its walk uses (a NamedTuple, a masked node, a value, its kind)."""

from __future__ import annotations

import numbers
import sys
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optcompose._from_optax import STATES_ELSEWHERE as _OPTAX_ALIASES
from optcompose.wrappers.masking import MaskedState


# Counterparts: the state classes both libraries export under one name (optcompose keeps
# Optax's names), and Optax's names of states optcompose keeps in another class.

# (_OPTAX_ALIASES: optcompose._from_optax.STATES_ELSEWHERE, imported above.)
_PAIRS: frozenset = frozenset()
_PAIRS_LOCK = threading.Lock()


def _pairs() -> frozenset:
  """``{(optax_class, optcompose_class)}``, read once from both namespaces (under a lock,
  and published whole: a thread that finds it half filled would take an unknown pair's
  fields as enough)."""
  global _PAIRS
  if _PAIRS:
    return _PAIRS
  with _PAIRS_LOCK:
    if _PAIRS:
      return _PAIRS
    import warnings

    import optax

    import optcompose

    found = set()
    with warnings.catch_warnings():  # Optax's deprecated names warn when read
      warnings.simplefilter("ignore")
      for space, name in (
        (s, n) for s in (optax, optax.transforms, optax.schedules) for n in dir(s)
      ):
        theirs = getattr(space, name, None)
        ours = vars(optcompose).get(_OPTAX_ALIASES.get(name, name))  # ours, not Optax's
        if _is_namedtuple(theirs, True) and _is_namedtuple(ours, True):
          found.add((theirs, ours))
    _PAIRS = frozenset(found)
  return _PAIRS


def _counterparts(theirs: type, ours: type) -> bool:
  """A known pair, or a class with no declared counterpart (then the fields decide)."""
  pairs = _pairs()
  return (
    (theirs, ours) in pairs
    or theirs not in {a for a, _ in pairs}
    or ours not in {b for _, b in pairs}
  )


def _is_namedtuple(x, is_class=False) -> bool:
  c = x if is_class else type(x)
  return isinstance(c, type) and issubclass(c, tuple) and hasattr(c, "_fields")


def _is_masked(x) -> bool:
  import optax

  return isinstance(x, (MaskedState, optax.MaskedState))


# Reading a source node, live or restored as plain containers.


def _leafless(x) -> bool:
  return not jax.tree.leaves(x)


def _fields(x) -> Optional[dict]:
  """A NamedTuple's fields, or a restored dict (Flax and Orbax store NamedTuples so; Orbax
  an empty one as None)."""
  if _is_namedtuple(x):
    return dict(zip(x._fields, x))
  return dict(x) if isinstance(x, dict) else {} if x is None else None


def _items(x, n: int) -> Optional[list]:
  """A sequence's items, or those of a restored dict ``{'0': ..., '1': ...}`` (Flax's), or of
  Flax NNX's ``nnx.to_pure_dict`` form ``{1: ...}`` (integer keys, the positions of states
  holding no array left out: None there), for a target sequence of ``n`` items."""
  if isinstance(x, (tuple, list)) and not _is_namedtuple(x):
    return list(x)
  if isinstance(x, dict) and {str(k) for k in x} <= {str(i) for i in range(n)}:
    by_str = {str(k): v for k, v in x.items()}
    if len(by_str) == len(x):
      return [by_str.get(str(i)) for i in range(n)]
  return None


def _plain_source(x: Any) -> Any:
  """A Flax NNX state (``nnx.Optimizer``'s live ``opt_state``: Variables and ``nnx.State``)
  as ``nnx.to_pure_dict`` gives it; any other source as it is."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return x
  kinds = (nnx.Variable, nnx.State)
  if not any(
    isinstance(n, kinds) for n in jax.tree.leaves(x, is_leaf=lambda n: isinstance(n, kinds))
  ):
    return x
  return nnx.to_pure_dict(nnx.state(x))


def _is_value(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number))


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _kind(dtype) -> str:
  return (
    "f"
    if jnp.issubdtype(dtype, jnp.floating)
    else "i"
    if jnp.issubdtype(dtype, jnp.integer)
    else str(dtype)
  )


def _concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _describe(x) -> str:
  if _is_namedtuple(x):
    owner = type(x).__module__.split(".")[0]
    owner = "optcompose's" if owner == "optcompose" else f"{owner.capitalize()}'s"
    return f"{owner} {type(x).__name__}({', '.join(x._fields)})"
  if isinstance(x, dict):
    return f"a dict with keys {sorted(map(str, x))}"
  if isinstance(x, (tuple, list)):
    names = (type(v).__name__ if _is_namedtuple(v) else "None" if v is None else "..." for v in x)
    return f"a {type(x).__name__} of {len(x)} ({', '.join(names)})"
  if _is_value(x):
    return f"an array of shape {np.shape(x)} and dtype {_dtype(x)}"
  return "nothing" if x is None else f"a {type(x).__name__}"
