"""The optcompose contract.

A *gradient transformation* is a pair of pure functions, held in a NamedTuple whose field
names are Optax's (a subclass of Optax's ``GradientTransformationExtraArgs``, so every
optcompose transformation is an ``optax.GradientTransformation`` to Optax and Flax)::

    init(params) -> state
    update(updates, state, params=None, **extra) -> (new_updates, new_state)

* ``state`` is a pytree of arrays (usually a NamedTuple). Everything that changes while
  training -- moments, step counts, scheduled or injected hyperparameters -- lives there, so
  a run resumed from a saved state continues exactly.
* ``update`` maps the incoming direction (the gradient, or what earlier transformations
  made of it) to an outgoing one. It may read ``params``; it never writes them.
* ``**extra`` carries keyword arguments such as a loss value. Every optcompose
  transformation accepts and ignores the ones it does not use.
* A transformation object holds functions only, never JAX arrays: Flax's ``nnx.Optimizer``
  keeps it as a static attribute.
* Nothing records the tree structure at ``init`` to compare it at ``update``: ``nnx.Optimizer``
  passes ``nnx.Param`` nodes to ``init`` and bare arrays to ``update``. Transformations
  compare ``updates`` with their *state* instead.

Composition::

    chain(t1, t2, ...)            # state is the tuple of the members' states, nothing else
    apply_updates(params, updates) -> params   # p + u, keeping each parameter's dtype

``chain`` hands each member the previous member's output, ``params`` and ``**extra``, and
nothing hidden, so it is associative: ``chain(a, chain(b, c))`` and ``chain(chain(a, b), c)``
compute the same step. A piece that needs a second input takes it in its own arguments (see
``scale_by_second_moment(..., direction=...)``).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple, Optional, TypeAlias

import jax
import jax.numpy as jnp
import optax

from optcompose import tree as otree
from optcompose.core.errors import StateMismatchError, expect_state, needs_params  # noqa: F401
from optcompose.core.extra_args import _DroppingExtra, _Foreign, _takes_extra

PyTree: TypeAlias = Any
# Optax's types, for annotations (``optcompose.Params is optax.Params``), one explicit alias
# each: type checkers read a name as a type only from an alias (a tuple assignment makes
# variables). ``Schedule`` means Optax's, written with ``typing.Callable``: Optax's
# ``collections.abc.Callable[...]`` alias is callable but has no signature
# (``inspect.signature`` raises on it), which trips tools that walk a package's callables.
Params: TypeAlias = optax.Params
Updates: TypeAlias = optax.Updates
OptState: TypeAlias = optax.OptState
Schedule: TypeAlias = Callable[[jax.typing.ArrayLike], jax.typing.ArrayLike]
ScalarOrSchedule: TypeAlias = optax.ScalarOrSchedule
TransformInitFn: TypeAlias = optax.TransformInitFn
TransformUpdateFn: TypeAlias = optax.TransformUpdateFn
TransformUpdateExtraArgsFn: TypeAlias = optax.TransformUpdateExtraArgsFn


class GradientTransformation(optax.GradientTransformationExtraArgs):
  """A pair of pure functions ``(init, update)``; see the module docstring.

  Optax's NamedTuple ``(init, update)``, subclassed: an instance is an
  ``optax.GradientTransformationExtraArgs`` and an ``optax.GradientTransformation``
  (``isinstance`` checks in Optax and Flax hold; Optax's ``chain`` hands it keyword arguments),
  while ``isinstance(t, GradientTransformation)`` tells optcompose's own, whose ``update``
  accepts any keyword argument, from another library's (adapted by :func:`as_transformation`).
  An ``update`` written without ``**kwargs`` (by hand, as Optax allows) is wrapped to take
  and drop them, so that the claim holds where Optax's combinators pass them on.
  """

  def __new__(cls, init, update):
    if callable(update) and not _takes_extra(update, unknown=True):
      update = _DroppingExtra(update)
    return super().__new__(cls, init, update)


# Optax's name for a transformation whose update takes keyword arguments: every one of ours.
GradientTransformationExtraArgs: TypeAlias = GradientTransformation


class EmptyState(NamedTuple):
  """The state of a stateless transformation."""


def init_empty_state(params: Params) -> EmptyState:
  """The ``init`` of a stateless transformation: an :class:`EmptyState`."""
  del params
  return EmptyState()


# ----------------------------------------------------------------------------------------
# Building transformations.


def stateless(f: Callable[[Updates, Optional[Params]], Updates]) -> GradientTransformation:
  """A transformation without state from ``f(updates, params) -> updates`` (Optax's name).

  Update: ``u <- f(u, w)``, on the whole tree.

  Args:
    f: a pure function of the whole updates tree and the params (``None`` when not given).

  Returns:
    A transformation whose state is :class:`EmptyState` and whose update ignores ``**extra``.

  References:
    Optax's ``optax.stateless`` (same name and argument).
  """

  def update(updates, state, params=None, **extra):
    del extra
    if jax.tree.leaves(state):  # another optimizer's state (Optax's scale passes it back)
      raise StateMismatchError("a transformation without state", "EmptyState", state)
    return f(updates, params), state

  return GradientTransformation(init_empty_state, update)


def stateless_with_tree_map(
  f: Callable[[jax.Array, Optional[jax.Array]], jax.Array],
) -> GradientTransformation:
  """A transformation without state applying ``f(u, w)`` to each leaf (Optax's name).

  Update: ``u_l <- f(u_l, w_l)`` for every leaf l.

  Args:
    f: a pure function of one update leaf and its parameter leaf (``None`` when no params
      are given).

  Returns:
    A transformation mapping ``f`` over the leaves; its state is :class:`EmptyState`.

  References:
    Optax's ``optax.stateless_with_tree_map`` (same name and argument).
  """

  def whole(updates, params):
    if params is None:
      return jax.tree.map(lambda u: f(u, None), updates)
    return jax.tree.map(f, updates, params)

  return stateless(whole)


def identity() -> GradientTransformation:
  """Pass the updates through unchanged: ``u <- u``.

  Returns:
    A transformation with an :class:`EmptyState`.

  References:
    Optax's ``optax.identity``.
  """
  return stateless(lambda updates, params: updates)


def as_transformation(
  t: Any, who: str = "chain", position: Optional[Any] = None
) -> GradientTransformation:
  """The one adapter for members: any object with callable ``init`` and ``update`` (an
  Optax transformation included) as a :class:`GradientTransformation` whose ``update``
  accepts ``**extra``. An ``update`` without ``**kwargs`` is called without them.

  Args:
    t: the member.
    who: the combinator, for the error message.
    position: the member's position among the combinator's arguments (an int), or the
      argument's name (a str), if any.

  Returns:
    ``t`` itself if it is a GradientTransformation whose ``update`` takes ``**kwargs``, else
    an adapted one.
  """
  if isinstance(t, GradientTransformation) and _takes_extra(t.update, unknown=True):
    return t
  init, update = getattr(t, "init", None), getattr(t, "update", None)
  if not (callable(init) and callable(update)):
    raise TypeError(
      f"{who}: {_where(position)} is {type(t).__name__}, not a gradient transformation (an object "
      "with callable `init` and `update`)."
    )
  update = update if _takes_extra(update) else _DroppingExtra(update)
  if (type(t).__module__ or "").partition(".")[0] == "optcompose":  # ours (MultiSteps)
    return GradientTransformation(init, update)
  what = f"{_where(position)} ({type(t).__module__.partition('.')[0]}'s {type(t).__name__})"
  return GradientTransformation(
    _Foreign(init, who, what, None), _Foreign(update, who, what, state_at=1)
  )


def _where(position: Any) -> str:
  if position is None:
    return "the inner transformation"
  return f"`{position}`" if isinstance(position, str) else f"argument {position}"


def with_extra_args_support(tx: Any) -> GradientTransformation:
  """``tx`` as a transformation whose ``update`` accepts keyword arguments (Optax's name):
  one whose ``update`` takes none is called without them. Optax's and optcompose's
  combinators do this for their members already.

  References:
    Optax's ``optax.with_extra_args_support``.
  """
  return as_transformation(tx, "with_extra_args_support")


# Transformations that average the parameters (``ema_params``, ``swa``): they read the step
# as ``params + updates`` and pass the updates through unchanged, so in a chain only others
# of their kind may follow them. Marked by their update function (a NamedTuple has no room
# for a flag); ``chain`` propagates the mark. STEP: see optcompose.core.stepping.
STEP = "optcompose_step"
_AVERAGERS: "weakref.WeakSet" = weakref.WeakSet()  # pass updates through, read the final ones
_READS_FINAL: "weakref.WeakSet" = weakref.WeakSet()  # contains an averager


def mark_averager(tx: GradientTransformation) -> GradientTransformation:
  """Mark ``tx`` as averaging the parameters (see :func:`chain`)."""
  _AVERAGERS.add(tx.update)
  _READS_FINAL.add(tx.update)
  return tx


def _check_order(members: tuple) -> None:
  """An averager sees ``params + updates``: an update changed after it is not averaged."""
  for i, t in enumerate(members):
    later = [j for j in range(i + 1, len(members)) if members[j].update not in _AVERAGERS]
    if t.update in _READS_FINAL and later:
      raise ValueError(
        f"chain: argument {i} averages the parameters (ema_params, swa) from the updates "
        f"it sees, but argument {later[0]} changes the updates after it; place the "
        "averaging transformations last: chain(optimizer, ema_params(...))."
      )


def chain(*transformations: Any) -> GradientTransformation:
  """Apply transformations one after the other; the state is the tuple of their states.

  Update: ``u = t_n(... t_2(t_1(g)))``, each member also given ``w`` and the keyword
  arguments; state ``(s_1, ..., s_n)``.

  Args:
    *transformations: optcompose or Optax transformations (anything with ``init`` and
      ``update``). Keyword arguments given to ``update`` reach every member that accepts them.

  Returns:
    A transformation whose state is the tuple of the members' states (nothing else);
    ``chain`` is associative (no member sees anything but its input, ``params`` and the
    keyword arguments).

  References:
    Optax's ``optax.chain``.
  """
  members = tuple(as_transformation(t, "chain", i) for i, t in enumerate(transformations))
  _check_order(members)

  def init(params):
    return tuple(t.init(params) for t in members)

  def update(updates, state, params=None, **extra):
    return _run_chain(members, updates, _chain_state(state, len(members), updates), params, extra)

  last = getattr(members[-1].update, STEP, None) if members else None
  if last is not None:  # the last member's step-level form (optcompose.step), after the rest

    def step_form(grads, state, params, **extra):
      state = _chain_state(state, len(members))
      updates, head = _run_chain(members[:-1], grads, state[:-1], params, extra)
      try:
        params, tail = last(updates, state[-1], params, **extra)
      except StateMismatchError as e:
        raise e.at(f"[{len(members) - 1}]") from None
      return params, (*head, tail)

    setattr(update, STEP, step_form)
  if any(t.update in _READS_FINAL for t in members):
    _READS_FINAL.add(update)
    if all(t.update in _AVERAGERS for t in members):
      _AVERAGERS.add(update)
  return GradientTransformation(init, update)


def _chain_state(state: Any, n: int, updates: Any = None) -> tuple:
  if type(updates) is tuple and _is_a_state(updates) and not _is_a_state(state):  # swapped
    raise TypeError(
      f"chain: `updates` is a tuple of optimizer states ({type(updates[0]).__name__}, ...): "
      "the arguments are update(updates, state, params), gradients first."
    )
  if isinstance(state, (tuple, list)) and len(state) == n:
    return tuple(state)
  # A StateMismatchError, so that an enclosing partition or named chain names its path.
  noun = "transformation" if n == 1 else "transformations"
  raise StateMismatchError(f"chain of {n} {noun}", f"tuple of {n} states", state)


def _is_a_state(x: Any) -> bool:
  """Whether ``x`` is an optimizer state rather than a gradient tree: a NamedTuple of
  optcompose's or Optax's (their states; a gradient tree holds none of them), or a
  non-empty plain tuple of such states (a chain's)."""
  if hasattr(x, "_fields"):
    return type(x).__module__.split(".")[0] in ("optcompose", "optax")
  return type(x) is tuple and bool(x) and all(map(_is_a_state, x))


def _run_chain(members: tuple, updates: Any, state: tuple, params: Any, extra: dict) -> tuple:
  new_state = []
  for i, (t, s) in enumerate(zip(members, state)):
    try:
      updates, s = update_pair(t.update(updates, s, params, **extra), f"chain: member {i}")
    except StateMismatchError as e:
      raise e.at(f"[{i}]") from None
    new_state.append(s)
  return updates, tuple(new_state)


def update_pair(result: Any, who: str) -> tuple:
  """``result`` of an ``update``, if it is the pair ``(updates, new_state)``; else a TypeError
  naming ``who`` (a forgotten state: a dict of two parameters would unpack into its keys)."""
  if isinstance(result, (tuple, list)) and len(result) == 2:
    return tuple(result)
  got = f"a tuple of length {len(result)}" if isinstance(result, tuple) else type(result).__name__
  raise TypeError(f"{who}: `update` must return a pair (updates, new_state), got {got}.")


def is_float0(x: Any) -> bool:
  """Whether ``x`` is a ``float0`` array: the gradient of an integer input
  (``jax.grad(..., allow_int=True)``), which holds no value."""
  return otree.leaf_dtype(x) == jax.dtypes.float0


def apply_updates(params: Params, updates: Updates) -> Params:
  """Return ``params + updates``, each result cast back to its parameter's dtype.

  Update: ``w <- w + u``.

  Args:
    params: the parameters: floating-point or complex leaves, and integer or boolean ones
      whose update has their own dtype (a leaf masked out, its update ``set_to_zero``'s
      zeros, or passed through); a floating-point update for an integer or boolean leaf,
      which would be truncated, is a TypeError naming it, and so is a leaf that is not an
      array.
    updates: a tree of the parameters' structure and shapes. A ``float0`` update (what
      ``jax.grad(..., allow_int=True)`` gives an integer input, passed on by a mask) leaves
      its parameter as it is.

  Returns:
    The new parameters, each leaf in its parameter's dtype.

  References:
    Optax's ``optax.apply_updates``.
  """
  otree.check_same_structure(updates, params, "updates", "params")

  # An integer or boolean leaf takes an update of its own dtype only (exact, never truncated).
  def exact(p, u) -> bool:  # dtypes as JAX holds them (NumPy's int64 is int32 without x64)
    dtype, other = otree.leaf_dtype(p), otree.leaf_dtype(u)
    if dtype is None or other is None or otree.is_inexact(dtype):
      return False
    if is_float0(u):  # no update: the leaf stays as it is
      return True
    if isinstance(u, bool):
      return dtype == jnp.bool_
    if isinstance(u, int):  # a Python int fits any integer leaf
      return jnp.issubdtype(dtype, jnp.integer)
    return jax.dtypes.canonicalize_dtype(dtype) == jax.dtypes.canonicalize_dtype(other)

  otree.check_floating(
    jax.tree.map(lambda p, u: 0.0 if exact(p, u) else p, params, updates),
    "params",
    "optimizers need floating-point leaves (an integer or boolean one takes only an update "
    "of its own dtype: a floating-point one would be truncated); cast integer or boolean "
    "leaves, or mask them out",
  )

  otree.check_not_complex_for_real(
    updates, params, "apply_updates", "its imaginary part would be dropped"
  )

  def add(p, u):
    if is_float0(u):
      return p
    # The sum in the wider of the two dtypes (e.g. float32 updates on float16 params),
    # rounded to the parameter's.
    p_wide, u_wide = otree.promote(p, u)
    return jnp.asarray(p_wide + u_wide).astype(jnp.asarray(p).dtype)

  return jax.tree.map(add, params, updates)
