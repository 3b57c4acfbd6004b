"""Hyperparameters: the one mechanism that keeps the values that change while training in
the state (their ranges and validation are in :mod:`.validation`).

A hyperparameter is a number or a *schedule* (``Schedule = Callable[[count], scalar]``, a
pure function of the int32 step count). Values that change while training -- scheduled ones,
and those :func:`optcompose.inject_hyperparams` makes live -- are kept by one mechanism,
:func:`rebuilt_each_step`, in one state type, :class:`InjectHyperparamsState` (Optax's name
and fields)::

    InjectHyperparamsState(count, hyperparams, inner_state)

At each update the values are read (live ones from ``hyperparams``, scheduled ones evaluated
at ``count``), the transformation is rebuilt from them (a Python closure, free under
``jit``), its update runs, and the values it used are stored. One walker,
:func:`optcompose.tree.find_nodes`, finds these states anywhere: :func:`current_hyperparams`
and :func:`set_hyperparams` read and replace them in any state, ours or Optax's, nested in
any wrapper.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable, NamedTuple, Optional, Protocol, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core.base import (
  GradientTransformation,
  OptState,
  as_transformation,
  expect_state,
  update_pair,
)
from optcompose.core.counting import safe_increment, zero_count
from optcompose.core.eps_pair import check_not_both_zero  # noqa: F401  (re-exported)
from optcompose.core.held import (  # noqa: F401  (re-exported)
  check_held,
  current_hyperparams,
  holds_hyperparams,
  record_validator,
  set_hyperparams,
)
from optcompose.core.validation import (  # noqa: F401  (re-exported: the one place to look)
  DECAY,
  DECLARED,
  DTYPE,
  REAL_DTYPE,
  INT32_MAX,
  EPS,
  EPS_POSITIVE,
  EPS_ROOT,
  FLAG,
  INNER,
  INNER_PAIR,
  LABELS,
  LEARNING_RATE,
  MASK,
  MOMENTUM,
  NONNEGATIVE,
  SCHEDULE,
  TAKEN,
  UNUSABLE,
  Hyper,
  check_count,
  check_hyperparameter,
  check_state_dtype,
  checks_done,
  choice,
  declare,
  default_float,
  integer,
  is_real_like,
  real,
)

# ----------------------------------------------------------------------------------------
# Values in the state.


def as_hyperparam(value, dtype=None) -> jax.Array:
  """A hyperparameter value as a scalar array of a floating dtype (``default_float()``)."""
  return jnp.asarray(value, dtype=dtype or default_float())


def _arithmetic_float(tree: Any):
  """The float dtype a tree's leaves compute in: float32, or the widest real dtype among
  its inexact leaves where that is wider (float64 leaves under x64). Python floats, weakly
  typed, count only in a tree of no typed inexact leaf: JAX's default float (a gradient
  given as a Python float under x64 computed with a float32-rounded learning rate)."""
  leaves = jax.tree.leaves(tree)
  typed = [x.dtype for x in leaves if hasattr(x, "dtype")]
  weak = [jnp.result_type(x) for x in leaves if isinstance(x, (float, complex))]
  inexact = [d for d in typed if jnp.issubdtype(d, jnp.inexact)] or weak
  return otree.promote_types(jnp.float32, *(jnp.finfo(d).dtype for d in inexact))


def narrowed(values: dict, width) -> dict:
  """``values`` for arithmetic in the float ``width`` (see :func:`_arithmetic_float`): a
  float array wider than it (float64 under x64, for float32 parameters) is cast down, so
  that a stored or scheduled value does not promote every elementwise operation on
  parameter-sized arrays to float64 (an injected AdamW ran 3.2x slower under x64 that way);
  everything else is passed as it is (a Python number is weakly typed already)."""

  def fitted(v):
    dtype = getattr(v, "dtype", None)
    if dtype is None or getattr(v, "weak_type", False) or not jnp.issubdtype(dtype, jnp.floating):
      return v
    return v.astype(width) if jnp.finfo(dtype).bits > jnp.finfo(width).bits else v

  return {name: fitted(v) for name, v in values.items()}


def value_at(hyperparameter: Any, count: jax.Array) -> Any:
  """A hyperparameter's value at step ``count``: calls it if it is a schedule."""
  return hyperparameter(count) if callable(hyperparameter) else hyperparameter


class InjectHyperparamsState(NamedTuple):
  """The one state of values that change while training (Optax's name and fields)."""

  count: jax.Array  # int32 step count, read by the schedules
  hyperparams: dict  # the values used by the latest update (at init: step 0's)
  inner_state: OptState  # the state of the transformation built from those values


def rebuilt_each_step(
  build: Callable[[dict], Any],
  live: dict,
  schedules: dict,
  *,
  who: str,
  dtype=None,
  cast_scheduled: bool = True,
  validate: Optional[Callable[[dict], Any]] = None,
) -> GradientTransformation:
  """The one mechanism for values that live in the state.

  Args:
    build: ``build(values) -> transformation``, called with every live and scheduled value.
    live: ``{name: number}``, stored in the state and read back at each update (so
      :func:`set_hyperparams` changes them without recompiling a jitted step).
    schedules: ``{name: schedule}``, evaluated at the state's count before each update.
    who: the builder's name, for errors.
    dtype: the stored dtype (default: :func:`default_float`).
    cast_scheduled: pass scheduled values to ``build`` as stored (else as the schedule
      returns them; they are stored as ``dtype`` either way).
    validate: ``validate({name: 0-d array})`` raises where those values are refused (default:
      ``build`` with them, whose construction checks them); :func:`set_hyperparams` and a
      Python number put in ``state.hyperparams`` by hand are checked with it.

  Returns:
    A transformation whose state is :class:`InjectHyperparamsState`.
  """
  narrow = dtype is None  # a dtype asked for is kept for the arithmetic too
  dtype = dtype or default_float()
  validate = validate or (lambda values: as_transformation(build(values), who))
  as_used: dict = {}  # {width: a check of the values as given and as narrowed to width}

  def check_for(width) -> Callable[[dict], Any]:
    """``validate``, or where the values are used narrowed (float32 parameters under x64),
    a check of both forms: init, set_hyperparams and the step then agree on what is
    refused (``b2 = 1 - 1e-8`` is 1.0 in float32)."""
    if not narrow or jnp.finfo(width).bits >= jnp.finfo(dtype).bits:
      return validate
    if width not in as_used:

      def both(values):
        validate(values)
        try:
          validate(narrowed(values, width))
        except (TypeError, ValueError) as e:
          kind = TypeError if isinstance(e, TypeError) else ValueError
          raise kind(
            f"{who}: the parameters' updates use these values in {jnp.dtype(width).name} "
            f"(stored in {jnp.dtype(dtype).name} under jax_enable_x64), where {e} Use a value "
            f"{jnp.dtype(width).name} holds, or float64 parameters"
            + (", or hyperparam_dtype=jnp.float64." if who.startswith("inject") else ".")
          ) from e

      as_used[width] = both
    return as_used[width]

  def values_at(count, stored):
    values, used = dict(stored), dict(stored)
    for name, schedule in schedules.items():
      try:
        raw = schedule(count)
        if not is_real_like(raw) or isinstance(raw, (bool, np.bool_)):
          raise TypeError(f"it returned {type(raw).__name__} {raw!r:.40}")
        if jnp.shape(raw) != ():
          raise ValueError(f"it returned shape {jnp.shape(raw)}, not a scalar")
        used[name] = as_hyperparam(raw, dtype)
      except (TypeError, ValueError) as e:  # the schedule's own error, with its name
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise kind(
          f"{who}: the schedule given as `{name}` must take the step count and "
          f"return a real scalar: {e}"
        ) from e
      values[name] = used[name] if cast_scheduled else raw
    return values, used

  def init(params):
    count = zero_count()
    values, used = values_at(count, {n: as_hyperparam(v, dtype) for n, v in live.items()})
    check = check_for(_arithmetic_float(params))
    if check is not validate:
      check(values)
    inner_state = as_transformation(build(values), who).init(params)
    record_validator(set(live) | set(schedules), inner_state, check)
    # A buffer each, none the caller's (an array given for two names, or for one: a step
    # donating the state is refused a buffer twice, or deletes the caller's array).
    used = {n: jnp.array(v, copy=True) for n, v in used.items()}
    return InjectHyperparamsState(count, used, inner_state)

  def update(updates, state, params=None, **extra):
    expect_state(state, InjectHyperparamsState, who)
    check_count(who, state)  # a count cast to bfloat16 would freeze the schedules at 256
    _check_stored(who, state.hyperparams, set(live) | set(schedules), dtype, validate)
    # A value put in by hand (``state.hyperparams["learning_rate"] = 0.05``, Optax's idiom)
    # is stored back in the state's dtype, as init stores it: not a Python float, which a
    # checkpoint of the state would keep, nor a weakly typed array.
    stored = {name: as_hyperparam(v, dtype) for name, v in state.hyperparams.items()}
    values, used = values_at(state.count, stored)
    with checks_done():  # checked at init; live changes go through set_hyperparams
      used_values = narrowed(values, _arithmetic_float(updates)) if narrow else values
      inner = as_transformation(build(used_values), who)
    result = inner.update(updates, state.inner_state, params, **extra)
    updates, inner_state = update_pair(result, f"{who}: the transformation built")
    return updates, InjectHyperparamsState(safe_increment(state.count), used, inner_state)

  return GradientTransformation(init, update)


def _check_stored(who: str, stored: Any, names: set, dtype, validate: Callable) -> None:
  """Check, while tracing, values a user may have put in ``state.hyperparams`` by hand (as
  Optax's docs show) rather than with :func:`set_hyperparams`: the same names, each a real
  scalar (a per-element array would be broadcast), and -- for a Python number, which needs
  no device copy -- in range."""
  if not isinstance(stored, dict) or set(stored) != names:
    got = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
    raise ValueError(
      f"{who}: `state.hyperparams` holds {got}, expected {sorted(names)} "
      "(change values with set_hyperparams, which keeps every name)."
    )
  for name, value in stored.items():
    if (
      isinstance(value, (bool, np.bool_))
      or not is_real_like(value)
      or not (
        jnp.issubdtype(jnp.result_type(value), jnp.floating)
        or jnp.issubdtype(jnp.result_type(value), jnp.integer)
      )
    ):
      raise TypeError(
        f"{who}: `state.hyperparams['{name}']` must be a real number, got "
        f"{type(value).__name__} {value!r:.40} (use set_hyperparams)."
      )
    if jnp.shape(value) != ():
      raise ValueError(
        f"{who}: `state.hyperparams['{name}']` must be a scalar, got shape "
        f"{jnp.shape(value)} (it would be broadcast; use set_hyperparams)."
      )
    if isinstance(value, numbers.Real):  # a Python number put there by hand: as built
      x = jnp.asarray(value, dtype=dtype)
      check_held(f"state.hyperparams['{name}']", name, value, x, fn=who, by_name=False)
      try:
        validate({**stored, name: x})
      except (TypeError, ValueError) as e:
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise kind(f"{who}: `state.hyperparams['{name}']` = {value!r}: {e}") from e


class SchedulableBuilder(Protocol):
  """A builder with ``schedulable``, the names of its arguments that accept schedules (set
  by :func:`with_schedules` and :func:`optcompose.core.registry.public`)."""

  schedulable: tuple[str, ...]

  def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


_Builder = TypeVar("_Builder", bound=Callable[..., Any])


def with_schedules(*names: str) -> Callable[[_Builder], _Builder]:
  """Decorator: let the hyperparameters ``names`` of a transformation builder be schedules.

  The builder is written for numbers. When every named argument is a number it is
  called as is (its state is exactly its own); when any is a schedule the result is
  :func:`optcompose.core.rebuilt_each_step` from the scheduled values, which reach the
  builder as float32 scalar arrays (float64 under x64), not Python numbers: a bfloat16
  computation with one is promoted, so cast it to the leaf's dtype (the builder's own
  checks see step 0's values, at ``init``; the public builders are declared with
  :func:`optcompose.core.registry.public` instead, which validates and schedules): before
  each update, ``h = schedule(count)`` with ``count`` the int32 step count from 0.

  Args:
    *names: the builder's parameters that may be given as schedules (a TypeError names
      any that is not a parameter).

  Returns:
    A decorator returning the builder with the same signature (and ``schedulable`` set to
    ``names``); a transformation it builds with a schedule has state
    :class:`InjectHyperparamsState`.

  References:
    Optax's ``optax.inject_hyperparams`` (schedules evaluated at the state's count).
  """

  def decorate(builder: _Builder) -> _Builder:
    signature = inspect.signature(builder)
    missing = [n for n in names if n not in signature.parameters]
    if missing:
      raise TypeError(f"{builder.__name__} has no parameters {missing}")

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      scheduled = {n: bound.arguments[n] for n in names if callable(bound.arguments[n])}
      if not scheduled:
        return builder(*bound.args, **bound.kwargs)

      def build(values):
        b = signature.bind(**{**bound.arguments, **values})
        return builder(*b.args, **b.kwargs)

      return rebuilt_each_step(build, {}, scheduled, who=builder.__name__, cast_scheduled=False)

    decorated = cast(SchedulableBuilder, wrapper)
    decorated.schedulable = names
    return cast(_Builder, decorated)

  return decorate
