"""A transformation's ``update`` and keyword arguments (Optax's ExtraArgs protocol): whether
it takes them, and an ``update`` that takes none as one that does."""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import jax


def _takes_extra(fn: Callable, unknown: bool = False) -> bool:
  """Whether ``fn`` accepts arbitrary keyword arguments (Optax's ExtraArgs protocol);
  ``unknown`` where its signature cannot be read. (A user may build our
  ``GradientTransformation(init, update)`` with a plain ``update(updates, state,
  params=None)``, as Optax's base class allows: ours is one class, so the signature tells.)"""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return unknown
  return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _DroppingExtra:
  """An ``update`` that takes no ``**kwargs``, as one that takes them: those it names are
  passed on, the others dropped, and ``params`` only if it takes a third argument. Its
  attributes (a step form's mark) are kept; it pickles and compares as the function does."""

  def __init__(self, update: Callable):
    self.wrapped = update
    try:
      given = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):  # unreadable: called as Optax's base class specifies
      given = None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    self.named = frozenset(
      p.name for p in given or () if p.kind is not inspect.Parameter.VAR_POSITIONAL
    )
    positional = [p for p in given or () if p.kind in kinds]
    self.takes_params = (
      given is None
      or len(positional) >= 3
      or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in given)
    )
    self.__dict__.update(getattr(update, "__dict__", {}))

  def __call__(self, updates, state, params=None, **extra):
    kept = {k: v for k, v in extra.items() if k in self.named}
    if self.takes_params:
      return self.wrapped(updates, state, params, **kept)
    return self.wrapped(updates, state, **kept)

  def __eq__(self, other):
    return isinstance(other, _DroppingExtra) and other.wrapped == self.wrapped

  def __hash__(self):
    return hash(self.wrapped)

  def __repr__(self):  # the function's, as logged in a GradientTransformation's repr
    return repr(self.wrapped)


class _Foreign:
  """Another library's ``init`` or ``update`` (an Optax transformation's), refusing a
  layout node such as FlatParams among its arguments other than the state: it does not know
  that a bucket holds many of the model's leaves, so a norm, trust ratio or factored moment
  per leaf, or a mask callable, would be computed per bucket, silently. It keeps the
  function's signature (``jax.jit``'s ``donate_argnames``, keyword calls) and attributes,
  and pickles and compares as the function does."""

  def __init__(self, fn: Callable, who: str, what: str, state_at: Optional[int]):
    functools.update_wrapper(self, fn)  # __wrapped__: inspect.signature reads fn's
    self.foreign, self.who, self.what, self.state_at = fn, who, what, state_at

  def __call__(self, *args, **kwargs):
    from optcompose.masks import _has_layout, _hooks, _is_layout  # masks imports no core

    given = [x for i, x in enumerate(args) if i != self.state_at]
    given += [x for k, x in kwargs.items() if k != "state"]
    for x in given:
      if _has_layout(x):
        kind = next(_hooks(y).name for y in jax.tree.leaves(x, is_leaf=_is_layout) if _is_layout(y))
        raise TypeError(
          f"{self.who}: {self.what} is not optcompose's, and it was given {kind} (buckets "
          "that each hold many of the model's leaves): a value it computes per leaf (a "
          "norm, a trust ratio, a factored moment) or a mask callable would be taken per "
          "bucket, silently. Use optcompose's transformation of the same name (optcompose's "
          "own refuse FlatParams where they need the model's leaves, and map masks onto the "
          "buckets), or, for an elementwise transformation of your own, declare it as one: "
          "optcompose.GradientTransformation(tx.init, tx.update)."
        )
    return self.foreign(*args, **kwargs)

  def __eq__(self, other):
    return isinstance(other, _Foreign) and other.foreign == self.foreign

  def __hash__(self):
    return hash(self.foreign)

  def __repr__(self):
    return repr(self.foreign)
