"""Hyperparameters' declared ranges and their validation (see :mod:`.hyperparams` for the
values that live in the state, and :mod:`.registry` for the declarations).

Every check is written here once: :func:`check_hyperparameter` (a range, on the value in the
dtype it is used in), :func:`check_state_dtype`, and :class:`Hyper`, what each builder
declares per argument. :func:`.held.check_held` runs the same checks on a value given to
``set_hyperparams``; :mod:`.eps_pair` checks ``eps`` with ``eps_root``.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import Any, NamedTuple, Optional, TypeGuard, Union

import jax
import jax.numpy as jnp
import numpy as np

from optcompose.core.backend import TAKEN, taken_values  # noqa: F401 -- TAKEN: re-exported

_SKIP_CHECKS = contextvars.ContextVar("optcompose_skip_checks", default=False)

# A real number or array as the checks take it, for type checkers (which do not take a
# ``numbers.Real`` for a number: ``float`` stands for it here).
RealLike = Union[float, np.ndarray, np.generic, jax.Array]


def is_real_like(value: Any) -> TypeGuard[RealLike]:
  """Whether ``value`` is a ``numbers.Real`` (a bool too), a NumPy scalar or array, or a JAX
  array; its dtype is not read."""
  return isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array))


@contextlib.contextmanager
def checks_done():
  """Within this block, hyperparameter checks are skipped: values rebuilt at every step
  (schedules, live hyperparameters) were checked once, at ``init``."""
  token = _SKIP_CHECKS.set(True)
  try:
    yield
  finally:
    _SKIP_CHECKS.reset(token)


def _concrete_scalar(value: Any) -> Optional[tuple[float, float, np.dtype]]:
  """``(value as a Python float, the same rounded to the dtype it is used in)`` when it is a
  known number; None for tracers and schedules. A Python number is used in JAX's default
  float dtype (float32, float64 under x64), an array in its own floating dtype."""
  if callable(value):
    return None
  if isinstance(value, jax.core.Tracer):  # its value is unknown, its shape and dtype known
    _check_kind(jnp.shape(value), jnp.result_type(value))
    return None
  if isinstance(value, (bool, np.bool_)):
    raise TypeError("expected a number, got a bool")
  if is_real_like(value):
    dtype = jnp.result_type(value)
    _check_kind(jnp.shape(value), dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      use = np.float64  # an integer: compared exactly (and quoted as one)
      return int(value), float(value), np.dtype(use)
    else:
      use = dtype if hasattr(value, "dtype") else default_float()
    x = float(value)
    with np.errstate(over="ignore"):
      return x, float(np.asarray(x, dtype=use)), np.dtype(use)
  raise TypeError(f"expected a number or a schedule, got {type(value).__name__}")


def _check_kind(shape: tuple, dtype: Any) -> None:
  """A hyperparameter is a real scalar: a known value, or a traced one (inside ``jax.jit``,
  where an array would otherwise broadcast over the parameters without a word)."""
  if shape != ():
    raise ValueError(f"expected a scalar, got an array of shape {shape}")
  if jnp.issubdtype(dtype, jnp.bool_):
    raise TypeError("expected a number, got a bool")
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"expected a real number, got dtype {dtype}")


def check_hyperparameter(
  fn_name: str,
  name: str,
  value: Any,
  *,
  low: Optional[float] = None,
  high: Optional[float] = None,
  low_open: bool = False,
  high_open: bool = False,
) -> None:
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


def _bound(v: float) -> str:
  return str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:g}"


def _check_range(fn_name, name, given, x, dtype, low, high, low_open, high_open) -> None:
  """The range check of :func:`check_hyperparameter` on ``x``, ``given`` rounded to
  ``dtype``; messages quote ``given``."""

  def outside(v):
    return (low is not None and (v <= low if low_open else v < low)) or (
      high is not None and (v >= high if high_open else v > high)
    )

  rounded = (
    ""
    if x == given or not np.isfinite(given) or outside(given)
    else (f" ({x!r} in {dtype}, the dtype it is used in)")
  )
  if not np.isfinite(x) and not (x == np.inf and high == np.inf and not high_open):
    why = "" if not np.isfinite(given) else f" (it is {x} in {dtype}, the dtype it is used in)"
    raise ValueError(f"{fn_name}: `{name}` must be finite, got {given!r}{why}.")
  if given != 0 and x == 0:
    raise ValueError(
      f"{fn_name}: `{name}` is {given!r}, which is 0 in {dtype}, the dtype it "
      "is used in; give 0 if 0 is meant."
    )
  if outside(x):
    lo = "-inf" if low is None else _bound(low)
    hi = "inf" if high is None else _bound(high)
    interval = (
      f"{'(' if low_open or low is None else '['}{lo}, "
      f"{hi}{')' if high_open or high is None else ']'}"
    )
    raise ValueError(f"{fn_name}: `{name}` must lie in {interval}, got {given!r}{rounded}.")


def check_real_value(fn_name: str, name: str, value: Any, what: str) -> None:
  """Raise a TypeError naming ``fn_name``'s ``name`` unless ``value`` is a real number (a
  float or int scalar or array). Its dtype only is read, so it runs while tracing; a bool,
  str, complex or None would be cast or misread.

  Args:
    fn_name: the transformation, for the message.
    name: the argument (``value``).
    what: what it means, for the message (``the monitored loss``).
  """
  try:
    dtype = None if value is None or isinstance(value, (str, bytes)) else jnp.result_type(value)
  except TypeError:
    dtype = None
  if dtype is None or not (
    jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
  ):
    got = f"dtype {dtype}" if dtype is not None else type(value).__name__
    raise TypeError(
      f"{fn_name}: `{name}` ({what}) must be a real number (a float or int scalar), got {got}."
    )


def check_count(name: str, state: Any) -> None:
  """Raise a TypeError unless the state's step count (where it has one) is an integer scalar:
  a count cast to bfloat16 with the rest of a state stops at 256 and freezes every schedule,
  and one of another shape broadcasts the bias corrections."""
  if "count" not in getattr(type(state), "_fields", ()):  # NamedTuple states (not tuple.count)
    return
  count = state.count
  if count is None or (isinstance(count, int) and not isinstance(count, bool)):
    return
  shape, dtype = jnp.shape(count), jnp.result_type(count)
  if shape != () or not jnp.issubdtype(dtype, jnp.integer) or isinstance(count, bool):
    raise TypeError(
      f"{name}: `state.count` must be an integer scalar (int32, as init makes it), got "
      f"{dtype}{list(shape)}; a state cast leaf by leaf (to bfloat16, say) casts its counts "
      "too: cast only the floating-point moments (or use the optimizer's mu_dtype / nu_dtype)."
    )


def check_state_dtype(fn_name: str, name: str, dtype: Any, complex_ok: bool = True) -> None:
  """Raise a TypeError naming ``fn_name(name=...)`` unless ``dtype`` is a floating-point or
  (``complex_ok``) complex dtype: a moment or accumulator stored as integers would be
  truncated (to 0 for most) at every step; a hyperparameter is a real number."""
  kinds = "; complex for complex parameters" if complex_ok else ""
  try:
    resolved = np.dtype(dtype)
  except TypeError:
    raise TypeError(
      f"{fn_name}: `{name}` must be a floating-point dtype (such as "
      f"jnp.float32 or jnp.bfloat16{kinds}) or None, got {dtype!r}."
    ) from None
  if not jnp.issubdtype(resolved, jnp.inexact):
    raise TypeError(
      f"{fn_name}: `{name}` must be a floating-point dtype (such as jnp.float32 or jnp.bfloat16"
      f"{kinds}) or None, got {resolved}: an integer or boolean state would be truncated at "
      "every step."
    )
  if not complex_ok and jnp.issubdtype(resolved, jnp.complexfloating):
    raise TypeError(
      f"{fn_name}: `{name}` must be a real floating-point dtype, got {resolved}: "
      "hyperparameters are real numbers (their ranges are checked), also for complex "
      "parameters (Optax accepts a complex one)."
    )


# TAKEN: the values a schedule records as taken (optcompose.core.backend).
# Why a schedule may only be joined where it is never used (a 0-step linear one): raised.
UNUSABLE = "_optcompose_unusable"


def taken_by_schedule(error: Exception, name: str, value: Any = None) -> Exception:
  """``error`` (a range check's) saying that the value is one the schedule ``name`` takes
  (``value``: the largest finite float, as a schedule growing without bound records)."""
  grows = value is not None and abs(float(value)) in (float(np.finfo(t).max) for t in "efd")
  why = "grows without bound (recorded as the largest float)" if grows else "takes that value"
  return type(error)(
    f"{error} The schedule given as `{name}` {why}{'' if grows else ' (or tends to it)'}."
  )


def check_usable(fn: str, name: str, value: Any) -> None:
  """Raise the ValueError a schedule marked :data:`UNUSABLE` carries, naming ``fn``'s ``name``."""
  if callable(value) and getattr(value, UNUSABLE, None):
    raise ValueError(f"{fn}: `{name}`: {getattr(value, UNUSABLE)}")


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
  dtype: Union[bool, str] = False  # a dtype for stored state (a moment); "real": not complex
  whole: bool = False  # a whole number, possibly live or scheduled (a count like multi_steps' k)
  normal: bool = False  # the only guard against 0 / 0: not below float32's smallest normal

  def check(self, fn: str, name: str, value: Any) -> None:
    if value is None and self.optional:
      return
    if self.dtype:
      check_state_dtype(fn, name, value, complex_ok=self.dtype != "real")
      return
    if self.draw == ("mask",) and isinstance(value, (str, bytes)):
      raise TypeError(
        f"{fn}: `{name}` is a str ({value!r}): a mask is a tree of bools (the parameters' "
        "tree, or a prefix of it) or a function of the parameters; for a path pattern use "
        f"mask_from_paths(include={value!r})."
      )
    if self.draw == ("bool",) and not isinstance(value, (bool, np.bool_)):
      # A flag given as "no" or 0 would be taken by its truthiness.
      raise TypeError(f"{fn}: `{name}` must be a bool, got {value!r}.")
    if (
      self.integer
      and not callable(value)
      and (isinstance(value, bool) or not isinstance(value, numbers.Integral))
    ):
      raise TypeError(
        f"{fn}: `{name}` must be a Python int, got {type(value).__name__} "
        "(it is static: under inject_hyperparams, list it in static_args)."
      )
    if callable(value) and self.numeric and not self.schedule:
      raise TypeError(f"{fn}: `{name}` does not accept a schedule; give a number.")
    if not self.numeric:
      return
    ranges = dict(low=self.low, high=self.high, low_open=self.low_open, high_open=self.high_open)
    check_hyperparameter(fn, name, value, **ranges)
    check_usable(fn, name, value)
    normal = check_normal if self.normal else lambda *args: None
    normal(fn, name, value)
    # Not inf as a schedule's value (linear_schedule(inf, 1.0, n) gives NaN at its end).
    ranges["high_open"] = self.high_open or self.high == np.inf
    for taken in (taken_values(value) or ()) if callable(value) else ():
      if float(np.asarray(taken, default_float())) == 0:
        taken = 0.0  # a product that underflows: 0 as the schedule computes it, not a typo
      try:
        check_hyperparameter(fn, name, taken, **ranges)
        normal(fn, name, taken)
      except (TypeError, ValueError) as e:
        raise taken_by_schedule(e, name, taken) from None


_TINY32 = float(np.finfo(np.float32).tiny)  # 1.18e-38: XLA CPU flushes smaller values to 0


def check_normal(fn: str, name: str, value: Any) -> None:
  """A known ``value`` in (0, float32's smallest normal) is a ValueError: 0 where it is used."""
  known = _concrete_scalar(value)
  if known is not None and 0 < abs(known[0]) < _TINY32:
    raise ValueError(
      f"{fn}: `{name}` = {value!r} is below float32's smallest normal number ({_TINY32:.3g}): "
      "XLA CPU flushes it to 0, and a gradient that is exactly 0 would give 0 / 0 = NaN."
    )


def real(
  low=None, high=None, *, low_open=False, high_open=False, draw=None, schedule=True, optional=False
) -> Hyper:
  """A real hyperparameter in ``[low, high]`` (ends open as asked); ``draw`` is the
  ``(lo, hi)`` the property kit samples (log-uniformly when lo > 0)."""
  lo, hi = (
    draw
    if draw is not None
    else (low if low is not None else -1.0, high if high is not None else 1.0)
  )
  spec = ("float", lo, hi)
  return Hyper(
    ("optional", spec) if optional else spec,
    low,
    high,
    low_open,
    high_open,
    schedule,
    True,
    False,
    optional,
  )


INT32_MAX = 2**31 - 1  # counts are int32 arrays in the state


def integer(low=None, high=INT32_MAX, *, draw=None) -> Hyper:
  """A static Python int in ``[low, high]`` (by default at most 2**31 - 1: the counts it is
  compared with are int32)."""
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
REAL_DTYPE = DTYPE._replace(dtype="real")  # a stored hyperparameter's dtype

# The ranges most builders share. A learning rate of None, as in Optax: none applied (the
# direction unscaled and not negated); the property kit draws numbers only.
LEARNING_RATE = real(0.0, draw=(1e-5, 1.0))._replace(optional=True)
DECAY = real(0.0, 1.0, high_open=True, draw=(0.0, 0.999))  # an EMA's decay: beta^t -> 0
MOMENTUM = real(0.0, 1.0, draw=(0.0, 0.999))
EPS = real(0.0, draw=(1e-10, 1e-3))  # 0 only where another term keeps 0 / 0 away
EPS_POSITIVE = real(0.0, low_open=True, draw=(1e-10, 1e-3))._replace(normal=True)  # 0/0 guard
EPS_ROOT = real(0.0, draw=(0.0, 1e-6))
NONNEGATIVE = real(0.0, draw=(0.0, 1.0))


def default_float():
  """JAX's default float dtype: float32, or float64 when x64 is enabled. Hyperparameters,
  schedule values and step-derived factors are computed and stored in it, whatever the
  parameters' dtype (bfloat16 params keep float32 hyperparameters; a float64 run is float64
  throughout)."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


# Each declared hyperparameter's Hyper, by argument name, filled in by
# optcompose.core.registry.public: what set_hyperparams validates a held value against.
DECLARED: dict = {}


def declare(name: str, hyper: Hyper) -> None:
  """Record that some builder declares the numeric argument ``name`` as ``hyper``."""
  if hyper.numeric and hyper not in DECLARED.setdefault(name, []):  # once (a re-run cell)
    DECLARED[name].append(hyper)
