"""Hypothesis strategies for optimizer tests: pytrees, gradients, hyperparameters.

Needs ``hypothesis`` (``pip install hypothesis``); the rest of optcompose does not.

- :func:`pytrees`: nested dicts, tuples and NamedTuples of arrays, with scalars and zero-size
  leaves, in float32 / bfloat16 / float16 (and float64 when ``jax_enable_x64`` is on).
- :func:`gradients_like`: a tree like a given one, with values from ``1e-30`` to ``1e30``,
  zeros and signed zeros (clamped to what the leaf's dtype can hold, so they stay finite).
- :func:`hyperparameters`: valid keyword arguments of any public transformation, and
  :func:`transformations`, which builds one from them.

Strategies draw NumPy values and convert them at the end, so a test that keeps shapes fixed
and draws only values compiles its jitted step once.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

try:
  from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError("optcompose.testing.strategies needs hypothesis: pip install hypothesis") from e

import jax
import jax.numpy as jnp
import numpy as np

import optcompose as oc
from optcompose.core.registry import REGISTRY

__all__ = [
  "Pair",
  "float_dtypes",
  "shapes",
  "arrays",
  "pytrees",
  "gradients_like",
  "magnitudes",
  "HYPERPARAMETERS",
  "hyperparameters",
  "transformations",
  "build",
]


class Pair(NamedTuple):
  """A NamedTuple node for drawn trees (optimizer states are NamedTuples too)."""

  first: Any
  second: Any


def float_dtypes(include_x64: Optional[bool] = None) -> st.SearchStrategy:
  """float32, bfloat16, float16, and float64 if x64 is enabled (or ``include_x64=True``)."""
  names = ["float32", "bfloat16", "float16"]
  # jax adds its flags to jax.config as properties at run time, unseen by type checkers.
  if include_x64 if include_x64 is not None else getattr(jax.config, "jax_enable_x64"):
    names.append("float64")
  return st.sampled_from(names).map(jnp.dtype)


def shapes(
  max_rank: int = 3, max_side: int = 4, scalars: bool = True, empty: bool = True
) -> st.SearchStrategy:
  """Array shapes: rank 0 (if ``scalars``) to ``max_rank``; sides from 0 (if ``empty``)."""
  side = st.integers(0 if empty else 1, max_side)
  return st.integers(0 if scalars else 1, max_rank).flatmap(lambda rank: st.tuples(*[side] * rank))


def magnitudes(extreme: bool = True) -> st.SearchStrategy:
  """Finite float values: 10**e for e in [-30, 30] (or [-2, 2]), either sign, zeros and -0.0.

  The moderate range keeps g^2 within float16's range (6e-8 to 65504), so that a float16
  second moment is not expected to saturate."""
  lo, hi = (-30.0, 30.0) if extreme else (-2.0, 2.0)
  power = st.floats(lo, hi).map(lambda e: 10.0**e)
  signed = st.tuples(st.sampled_from([1.0, -1.0]), power).map(lambda t: t[0] * t[1])
  return st.one_of(signed, st.sampled_from([0.0, -0.0]))


def _finite_in(dtype, values: np.ndarray) -> np.ndarray:
  """Clamp to the dtype's finite range (so e.g. 1e30 becomes float16's 65504, not inf)."""
  big = float(jnp.finfo(dtype).max)
  return np.clip(values, -big, big)


def arrays(dtype, shape, elements: Optional[st.SearchStrategy] = None) -> st.SearchStrategy:
  """A ``jax.Array`` of ``shape`` and ``dtype``; ``elements`` defaults to values in [-2, 2]."""
  if elements is None:
    elements = st.floats(-2.0, 2.0, width=32)
  size = int(np.prod(shape))
  return st.lists(elements, min_size=size, max_size=size).map(
    lambda xs: jnp.asarray(_finite_in(dtype, np.asarray(xs, np.float64)).reshape(shape), dtype)
  )


_KEYS = ("w", "b", "kernel", "bias", "scale", "embed")


def pytrees(
  dtype: Any = None,
  max_leaves: int = 5,
  leaf_shapes: Optional[st.SearchStrategy] = None,
  elements: Optional[st.SearchStrategy] = None,
) -> st.SearchStrategy:
  """Trees of arrays: dicts, tuples and :class:`Pair` NamedTuples nested up to three levels.

  ``dtype`` fixes every leaf's dtype; ``None`` draws one per leaf from :func:`float_dtypes`.
  """
  leaf_dtype = st.just(jnp.dtype(dtype)) if dtype is not None else float_dtypes()
  leaf_shapes = leaf_shapes or shapes()
  leaf = st.tuples(leaf_dtype, leaf_shapes).flatmap(lambda ds: arrays(ds[0], ds[1], elements))

  def nodes(children):
    return st.one_of(
      st.dictionaries(st.sampled_from(_KEYS), children, min_size=1, max_size=3),
      st.tuples(children, children),
      st.builds(Pair, children, children),
    )

  return st.recursive(leaf, nodes, max_leaves=max_leaves)


def gradients_like(tree: Any, extreme: bool = True) -> st.SearchStrategy:
  """A tree of the structure, shapes and dtypes of ``tree``, values from :func:`magnitudes`."""
  leaves, treedef = jax.tree.flatten(tree)
  parts = [arrays(jnp.result_type(x), jnp.shape(x), magnitudes(extreme)) for x in leaves]
  return st.tuples(*parts).map(lambda xs: treedef.unflatten(list(xs)))


# --- hyperparameters -----------------------------------------------------------------------
# Read from the registry, where each public builder declares its hyperparameters once
# (optcompose.core.registry). Each argument's ``draw``: ("float", lo, hi) drawn log-uniformly
# when lo > 0, ("int", lo, hi), ("bool",), ("choice", values), ("optional", spec),
# ("schedule",), ("inner",) for a wrapped transformation, ("inner_pair",), ("mask",),
# ("labels",).


def _declared() -> dict:
  spec = {
    name: {arg: h.draw for arg, h in entry.hypers.items()} for name, entry in REGISTRY.items()
  }
  # inject_hyperparams returns a factory: the drawn learning rate is the factory's.
  spec["inject_hyperparams"] = {**spec["inject_hyperparams"], "learning_rate": ("float", 1e-5, 1.0)}
  return spec


HYPERPARAMETERS = _declared()

_INNER = ("sgd", "adam", "rmsprop")  # what the wrappers wrap


def _first_leaf_only(params):
  """A mask: True on the first leaf only (a callable, so it fits any tree)."""
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([i == 0 for i in range(len(leaves))])


def _alternate_labels(params):
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten(["a" if i % 2 == 0 else "b" for i in range(len(leaves))])


def _argument(spec) -> st.SearchStrategy:
  kind = spec[0]
  if kind == "float":
    lo, hi = spec[1], spec[2]
    if lo > 0:  # log-uniform: learning rates and epsilons span decades
      return st.floats(np.log10(lo), np.log10(hi)).map(lambda e: float(10.0**e))
    # Values that float32 cannot hold as normal numbers are drawn as 0 (the builders refuse
    # a nonzero value that rounds to 0 in its dtype).
    tiny = float(np.finfo(np.float32).tiny)
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(
      lambda x: 0.0 if abs(x) < tiny else x
    )
  if kind == "int":
    return st.integers(spec[1], spec[2])
  if kind == "bool":
    return st.booleans()
  if kind == "choice":
    return st.sampled_from(spec[1])
  if kind == "optional":
    return st.one_of(st.none(), _argument(spec[1]))
  if kind == "schedule":
    return st.floats(1e-4, 1.0).map(lambda lr: oc.warmup_cosine_decay_schedule(0.0, lr, 3, 20))
  if kind == "inner":
    return st.sampled_from(_INNER).flatmap(
      lambda name: hyperparameters(name).map(lambda kw: build(name, kw))
    )
  if kind == "inner_pair":
    inner = _argument(("inner",))
    return st.tuples(inner, inner).map(lambda ab: {"a": ab[0], "b": ab[1]})
  if kind == "mask":
    return st.just(_first_leaf_only)
  if kind == "labels":
    return st.just(_alternate_labels)
  raise ValueError(f"unknown hyperparameter kind {kind!r}")


def hyperparameters(name: str) -> st.SearchStrategy:
  """A dict of valid keyword arguments for the builder ``name``: a public one, or one of
  yours added to ``HYPERPARAMETERS`` as ``{argument: draw}``, each draw one of
  ``("float", lo, hi)`` (log-uniform when ``lo > 0``), ``("int", lo, hi)``, ``("bool",)``,
  ``("choice", values)``, ``("optional", draw)`` or ``("schedule",)``; draw your own
  transformations with ``hyperparameters(name).map(lambda kw: your_builder(**kw))``."""
  if name not in HYPERPARAMETERS:
    raise KeyError(f"no hyperparameter strategy for {name!r}; known: {sorted(HYPERPARAMETERS)}")
  spec = HYPERPARAMETERS[name]
  return st.fixed_dictionaries({arg: _argument(s) for arg, s in spec.items()})


def build(name: str, kwargs: dict):
  """The transformation ``name`` built from drawn ``kwargs``."""
  if name == "inject_hyperparams":
    kwargs = dict(kwargs)
    factory = getattr(oc, kwargs.pop("inner_factory"))
    return oc.inject_hyperparams(factory, hyperparam_dtype=kwargs.pop("hyperparam_dtype", None))(
      **kwargs
    )
  builder = getattr(oc, name, None)
  if builder is None:
    raise KeyError(
      f"build makes optcompose's public builders, and {name!r} is not one: draw yours with "
      f"hyperparameters({name!r}).map(lambda kw: your_builder(**kw))."
    )
  return builder(**kwargs)


def transformations(names: Optional[Sequence[str]] = None) -> st.SearchStrategy:
  """``(name, transformation)`` for a public builder drawn from ``names`` (default: all)."""
  names = sorted(HYPERPARAMETERS) if names is None else list(names)
  return st.sampled_from(names).flatmap(
    lambda n: hyperparameters(n).map(lambda kw, n=n: (n, build(n, kw)))
  )
