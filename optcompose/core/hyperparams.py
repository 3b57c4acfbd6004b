"""Hyperparameters: their declared ranges, their validation, and the one mechanism that keeps
the values that change while training in the state.

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

import contextlib
import contextvars
import functools
import inspect
import numbers
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core.base import (
    GradientTransformation, OptState, as_transformation, expect_state, safe_increment,
    zero_count,
)

# ----------------------------------------------------------------------------------------
# Validation.

_SKIP_CHECKS = contextvars.ContextVar("optcompose_skip_checks", default=False)


@contextlib.contextmanager
def checks_done():
  """Within this block, hyperparameter checks are skipped: values rebuilt at every step
  (schedules, live hyperparameters) were checked once, at ``init``."""
  token = _SKIP_CHECKS.set(True)
  try:
    yield
  finally:
    _SKIP_CHECKS.reset(token)


def _concrete_scalar(value: Any) -> Optional[tuple]:
  """``(value as a Python float, the same rounded to the dtype it is used in)`` when it is a
  known number; None for tracers and schedules. A Python number is used in JAX's default
  float dtype (float32, float64 under x64), an array in its own floating dtype."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (bool, np.bool_)):
    raise TypeError("expected a number, got a bool")
  if isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array)):
    if jnp.shape(value) != ():
      raise ValueError(f"expected a scalar, got an array of shape {jnp.shape(value)}")
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"expected a real number, got dtype {dtype}")
    if not jnp.issubdtype(dtype, jnp.floating):
      use = np.float64  # an integer: compared exactly
    else:
      use = dtype if hasattr(value, "dtype") else default_float()
    x = float(value)
    with np.errstate(over="ignore"):
      return x, float(np.asarray(x, dtype=use)), np.dtype(use)
  raise TypeError(f"expected a number or a schedule, got {type(value).__name__}")


def check_hyperparameter(fn_name: str, name: str, value: Any, *, low: Optional[float] = None,
                         high: Optional[float] = None, low_open: bool = False,
                         high_open: bool = False) -> None:
  """Raise a ValueError naming ``fn_name(name=...)`` if a known ``value`` is out of range.

  The range is checked on the value rounded to the dtype it is used in (JAX's default
  float, float32 unless x64 is on, for a Python number; an array's own dtype): ``b1 = 1 -
  1e-9`` is 1.0 in float32, and ``1e39`` is inf.

  Schedules and traced values are checked when they become numbers: a scheduled value is
  checked at step 0 by ``init``; later values of a schedule are not checked (that would
  cost a device-to-host copy per step, and cannot be done inside ``jax.jit``).
  """
  if _SKIP_CHECKS.get():
    return
  try:
    known = _concrete_scalar(value)
  except (TypeError, ValueError) as e:
    raise type(e)(f"{fn_name}: `{name}` {e}") from None
  if known is None:
    return
  _check_range(fn_name, name, *known, low, high, low_open, high_open)


def _check_range(fn_name, name, given, x, dtype, low, high, low_open, high_open) -> None:
  """The range check of :func:`check_hyperparameter` on ``x``, ``given`` rounded to
  ``dtype``; messages quote ``given``."""
  def outside(v):
    return ((low is not None and (v <= low if low_open else v < low))
            or (high is not None and (v >= high if high_open else v > high)))

  rounded = "" if x == given or not np.isfinite(given) or outside(given) else (
      f" ({x!r} in {dtype}, the dtype it is used in)")
  if not np.isfinite(x):
    why = "" if not np.isfinite(given) else f" (it is {x} in {dtype}, the dtype it is used in)"
    raise ValueError(f"{fn_name}: `{name}` must be finite, got {given!r}{why}.")
  if outside(x):
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = (f"{'(' if low_open or low is None else '['}{lo}, "
                f"{hi}{')' if high_open or high is None else ']'}")
    raise ValueError(f"{fn_name}: `{name}` must lie in {interval}, got {given!r}{rounded}.")


def check_not_both_zero(fn_name: str, eps: Any, eps_root: Any) -> None:
  """Raise a ValueError when ``eps`` and ``eps_root`` are both known to be 0: the
  denominator ``sqrt(v + eps_root) + eps`` is then 0 for a gradient that has been exactly
  0 since the start (a frozen or unused parameter), and the update 0 / 0 = NaN."""
  if _SKIP_CHECKS.get() or callable(eps) or callable(eps_root):
    return
  if any(isinstance(v, jax.core.Tracer) for v in (eps, eps_root)):
    return
  if float(eps) == 0 and float(eps_root) == 0:
    raise ValueError(
        f"{fn_name}: `eps` and `eps_root` are both 0: a gradient that has been exactly 0 "
        "since the start would give 0 / 0 = NaN. Make one of them positive (e.g. eps=1e-8).")


def check_state_dtype(fn_name: str, name: str, dtype: Any) -> None:
  """Raise a TypeError naming ``fn_name(name=...)`` unless ``dtype`` is a floating-point or
  complex dtype: a moment or accumulator stored as integers would be truncated (to 0 for
  most) at every step."""
  try:
    resolved = np.dtype(dtype)
  except TypeError:
    raise TypeError(f"{fn_name}: `{name}` must be a floating-point dtype (such as "
                    f"jnp.float32 or jnp.bfloat16) or None, got {dtype!r}.") from None
  if not jnp.issubdtype(resolved, jnp.inexact):
    raise TypeError(f"{fn_name}: `{name}` must be a floating-point dtype (such as jnp.float32 "
                    f"or jnp.bfloat16) or None, got {resolved}: an integer or boolean state "
                    "would be truncated at every step.")


class Hyper(NamedTuple):
  """A hyperparameter's declaration, written once next to its builder (see
  :func:`optcompose.core.registry.public`): the range it is validated against, whether it
  accepts a schedule, and what the property kit draws for it (``draw``, read by
  :mod:`optcompose.testing.strategies`)."""

  draw: tuple
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  schedule: bool = False  # accepts a schedule of the step count
  numeric: bool = False  # validated as a number
  integer: bool = False  # must be a Python int (a static count or period)
  optional: bool = False  # None is allowed
  dtype: bool = False  # a floating-point dtype for stored state (a moment, an accumulator)

  def check(self, fn: str, name: str, value: Any) -> None:
    if value is None and self.optional:
      return
    if self.dtype:
      check_state_dtype(fn, name, value)
      return
    if self.draw == ("bool",) and not isinstance(value, (bool, np.bool_)):
      # A flag given as "no" or 0 would be taken by its truthiness.
      raise TypeError(f"{fn}: `{name}` must be a bool, got {value!r}.")
    if self.integer and not callable(value) and (
        isinstance(value, bool) or not isinstance(value, numbers.Integral)):
      raise TypeError(f"{fn}: `{name}` must be a Python int, got {type(value).__name__} "
                      "(it is static: under inject_hyperparams, list it in static_args).")
    if callable(value) and self.numeric and not self.schedule:
      raise TypeError(f"{fn}: `{name}` does not accept a schedule; give a number.")
    if self.numeric:
      check_hyperparameter(fn, name, value, low=self.low, high=self.high,
                           low_open=self.low_open, high_open=self.high_open)


def real(low=None, high=None, *, low_open=False, high_open=False, draw=None,
         schedule=True, optional=False) -> Hyper:
  """A real hyperparameter in ``[low, high]`` (ends open as asked); ``draw`` is the
  ``(lo, hi)`` the property kit samples (log-uniformly when lo > 0)."""
  lo, hi = draw if draw is not None else (low if low is not None else -1.0,
                                          high if high is not None else 1.0)
  spec = ("float", lo, hi)
  return Hyper(("optional", spec) if optional else spec, low, high, low_open, high_open,
               schedule, True, False, optional)


def integer(low=None, high=None, *, draw=None) -> Hyper:
  """A static Python int in ``[low, high]``."""
  lo, hi = draw if draw is not None else (low, high)
  return Hyper(("int", lo, hi), low, high, numeric=True, integer=True)


def choice(*values) -> Hyper:
  return Hyper(("choice", tuple(values)))


FLAG = Hyper(("bool",))
INNER = Hyper(("inner",))
INNER_PAIR = Hyper(("inner_pair",))
MASK = Hyper(("mask",))
LABELS = Hyper(("labels",))
SCHEDULE = Hyper(("schedule",))
DTYPE = Hyper(("choice", (None,)), optional=True, dtype=True)  # a stored state's dtype

# The ranges most builders share.
LEARNING_RATE = real(0.0, draw=(1e-5, 1.0))
DECAY = real(0.0, 1.0, high_open=True, draw=(0.0, 0.999))  # an EMA's decay: beta^t -> 0
MOMENTUM = real(0.0, 1.0, draw=(0.0, 0.999))
EPS = real(0.0, draw=(1e-10, 1e-3))  # 0 only where another term keeps 0 / 0 away
EPS_POSITIVE = real(0.0, low_open=True, draw=(1e-10, 1e-3))  # the only guard against 0 / 0
EPS_ROOT = real(0.0, draw=(0.0, 1e-6))
NONNEGATIVE = real(0.0, draw=(0.0, 1.0))


# ----------------------------------------------------------------------------------------
# Values in the state.


def default_float():
  """JAX's default float dtype: float32, or float64 when x64 is enabled. Hyperparameters,
  schedule values and step-derived factors are computed and stored in it, whatever the
  parameters' dtype (bfloat16 params keep float32 hyperparameters; a float64 run is float64
  throughout)."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def as_hyperparam(value, dtype=None) -> jax.Array:
  """A hyperparameter value as a scalar array of a floating dtype (``default_float()``)."""
  return jnp.asarray(value, dtype=dtype or default_float())


def value_at(hyperparameter: Any, count: jax.Array) -> Any:
  """A hyperparameter's value at step ``count``: calls it if it is a schedule."""
  return hyperparameter(count) if callable(hyperparameter) else hyperparameter


class InjectHyperparamsState(NamedTuple):
  """The one state of values that change while training (Optax's name and fields)."""

  count: jax.Array  # int32 step count, read by the schedules
  hyperparams: dict  # the values used by the latest update (at init: step 0's)
  inner_state: OptState  # the state of the transformation built from those values


def rebuilt_each_step(build: Callable[[dict], Any], live: dict, schedules: dict, *,
                      who: str, dtype=None, cast_scheduled: bool = True
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

  Returns:
    A transformation whose state is :class:`InjectHyperparamsState`.
  """
  dtype = dtype or default_float()

  def values_at(count, stored):
    values, used = dict(stored), dict(stored)
    for name, schedule in schedules.items():
      raw = schedule(count)
      used[name] = as_hyperparam(raw, dtype)
      values[name] = used[name] if cast_scheduled else raw
    return values, used

  def init(params):
    count = zero_count()
    values, used = values_at(count, {n: as_hyperparam(v, dtype) for n, v in live.items()})
    return InjectHyperparamsState(count, used, as_transformation(build(values), who).init(params))

  def update(updates, state, params=None, **extra):
    expect_state(state, InjectHyperparamsState, who)
    values, used = values_at(state.count, state.hyperparams)
    with checks_done():  # checked at init; live changes go through set_hyperparams
      inner = as_transformation(build(values), who)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
    return updates, InjectHyperparamsState(safe_increment(state.count), used, inner_state)

  return GradientTransformation(init, update)


def with_schedules(*names: str):
  """Decorator: let the hyperparameters ``names`` of a transformation builder be schedules.

  The builder is written for plain numbers. When every named argument is a number it is
  called as is (its state is exactly its own); when any is a schedule the result is
  :func:`rebuilt_each_step` from the scheduled values (the builder's own checks see step
  0's values, at ``init``; the public builders are declared with
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

  def decorate(builder):
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

    wrapper.schedulable = names
    return wrapper

  return decorate


# ----------------------------------------------------------------------------------------
# Reading and replacing the values in force, in any state.


def holds_hyperparams(node: Any) -> bool:
  """Whether a state node holds hyperparameters: a NamedTuple with a ``hyperparams`` dict
  (ours, Optax's ``inject_hyperparams`` states, ``reduce_on_plateau``'s scale)."""
  return hasattr(node, "_fields") and isinstance(getattr(node, "hyperparams", None), dict)


def _with_values(node: Any, values: dict) -> Any:
  replace = getattr(node, "with_hyperparams", None)
  return replace(values) if replace is not None else node._replace(hyperparams=values)


def current_hyperparams(state: Any) -> dict:
  """The hyperparameters in force, read from any optimizer state.

  Args:
    state: any state: optcompose's or Optax's, nested in any wrapper or container.

  Returns:
    ``{name: scalar}``: the values used by the latest update (before the first update,
    step 0's) of every live or scheduled hyperparameter, and ``reduce_on_plateau``'s
    multiplier (``plateau_scale``). A name met twice is returned once under its name and
    again under ``"<path>/<name>"``. Constants are not stored in a state: give a schedule or
    use :func:`optcompose.inject_hyperparams` to see them here.

  References:
    Optax's ``optax.tree_utils.tree_get`` (reading a named value from a state).
  """
  out = {}
  for path, node in otree.find_nodes(state, holds_hyperparams):
    for name, value in node.hyperparams.items():
      out[name if name not in out else "/".join(path + (name,))] = value
  return out


# Each declared hyperparameter's Hyper, by argument name, filled in by
# optcompose.core.registry.public: what set_hyperparams validates a held value against.
DECLARED: dict = {}


def declare(name: str, hyper: Hyper) -> None:
  """Record that some builder declares the numeric argument ``name`` as ``hyper``."""
  if hyper.numeric:
    DECLARED.setdefault(name, []).append(hyper)


def _check_held(key: str, name: str, value: Any, stored: jax.Array) -> None:
  """Validate ``value``, given to set_hyperparams and ``stored`` in its holder's dtype,
  against every declaration of ``name`` (the strictest wins: the state does not say which
  builder holds it)."""
  given, x, dtype = float(value), float(stored), stored.dtype
  hypers = DECLARED.get(name, ()) or (Hyper(("float",), numeric=True),)  # finite at least
  for hyper in hypers:
    if hyper.integer and x != int(x):
      raise ValueError(f"set_hyperparams: `{key}` must be a whole number, got {given!r}.")
    _check_range("set_hyperparams", key, given, x, dtype, hyper.low, hyper.high,
                 hyper.low_open, hyper.high_open)


def set_hyperparams(state: Any, **values) -> Any:
  """Return ``state`` with hyperparameters replaced where they are held.

  Each value runs the validation of construction, on the value as it will be stored (in the
  holder's dtype: ``b1 = 1 - 1e-9`` rounds to 1.0 in float32 and is rejected): a real,
  finite scalar, inside the range every builder declaring that name accepts.

  Args:
    state: any state holding hyperparameters (see :func:`current_hyperparams`), nested in
      any wrapper.
    **values: new values, stored in each holder's dtype and shape, so a jitted step does
      not recompile. A scheduled value is recomputed from its schedule at the next update.
      A name held by several nodes (two injected optimizers in ``partition``) is ambiguous:
      give ``"<path>/<name>"`` instead, as :func:`current_hyperparams` and the error list
      them (``set_hyperparams(state, **{"inner_states/a/learning_rate": 0.1})``).

  Returns:
    The new state.

  Raises:
    KeyError: a name no node of ``state`` holds.
    ValueError: an ambiguous name; a value that is not a scalar, not finite or out of range.
    TypeError: a value that is not a real number (a bool, a string).

  References:
    Optax's ``optax.tree_utils.tree_set`` (replacing named values in a state).
  """
  holders = otree.find_nodes(state, holds_hyperparams)
  qualified = {"/".join(path + (n,)): (id(node), n) for path, node in holders
               for n in node.hyperparams}
  by_name: dict = {}
  for path, node in holders:
    for n in node.hyperparams:
      by_name.setdefault(n, []).append("/".join(path + (n,)))
  unknown = sorted(set(values) - set(by_name) - set(qualified))
  if unknown:
    raise KeyError(f"set_hyperparams: {unknown} are not hyperparameters held in this state "
                   f"(held: {sorted(by_name)}, or by path: {sorted(qualified)}; build the "
                   "optimizer with inject_hyperparams).")
  assignments: dict = {}  # id(holder node) -> {name: new value}
  for key, value in values.items():
    if key in by_name and len(by_name[key]) > 1:
      raise ValueError(f"set_hyperparams: `{key}` is held in {len(by_name[key])} places "
                       f"({', '.join(repr(q) for q in by_name[key])}); name one by its path: "
                       f"set_hyperparams(state, **{{{by_name[key][0]!r}: value}}).")
    where = qualified[by_name[key][0] if key in by_name else key]
    assignments.setdefault(where[0], {})[where[1]] = (key, value)
  nodes = {id(node): node for _, node in holders}
  for holder, new in assignments.items():
    for name, (key, value) in new.items():
      if isinstance(value, (bool, np.bool_)) or not isinstance(
          value, (numbers.Real, np.ndarray, np.generic, jax.Array)):
        raise TypeError(f"set_hyperparams: `{key}` must be a real number, got "
                        f"{type(value).__name__} {value!r:.40}.")
      if np.ndim(value) != 0:
        raise ValueError(f"set_hyperparams: `{key}` must be a scalar, got shape "
                         f"{np.shape(value)}.")
      old = jnp.asarray(nodes[holder].hyperparams[name])
      with np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an overflow is reported below
        stored = jnp.asarray(value, dtype=old.dtype).reshape(old.shape)
      _check_held(key, name, value, stored)
      new[name] = stored

  def replace(node):
    if id(node) not in assignments:
      return node
    return _with_values(node, {**node.hyperparams, **assignments[id(node)]})

  return otree.replace_nodes(state, holds_hyperparams, replace)
