"""Argument checks shared by the schedules: each raises naming the schedule and argument."""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Callable, Mapping, Optional, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from optcompose.core import TAKEN, UNUSABLE, Schedule, default_float  # noqa: F401 -- Schedule: for the others
from optcompose.core.backend import backend_started, taken_values


def _number(
  fn: str, name: str, value, *, low=None, high=None, low_open=False, high_open=False, integer=False
):
  if isinstance(value, bool) or not isinstance(
    value, (numbers.Real, np.generic, np.ndarray, jax.Array)
  ):
    raise TypeError(f"{fn}: `{name}` must be a number, got {type(value).__name__}.")
  if isinstance(value, jax.core.Tracer):
    return value
  x = np.asarray(value)
  if x.shape != ():
    raise ValueError(f"{fn}: `{name}` must be a scalar, got shape {x.shape}.")
  if x.dtype.kind not in "iu" and not jnp.issubdtype(x.dtype, jnp.floating):  # bfloat16 is one
    raise TypeError(f"{fn}: `{name}` must be a real number, got dtype {x.dtype}.")
  x = x.item() if x.dtype.kind in "iu" else float(x)
  if x != x:
    raise ValueError(f"{fn}: `{name}` is NaN.")
  if integer and (x in (float("inf"), float("-inf")) or float(x) != int(x)):
    raise ValueError(f"{fn}: `{name}` must be a whole number of steps, got {x!r}.")
  if low is not None and (x <= low if low_open else x < low):
    raise ValueError(f"{fn}: `{name}` must be {'>' if low_open else '>='} {low}, got {x!r}.")
  if high is not None and (x >= high if high_open else x > high):
    raise ValueError(f"{fn}: `{name}` must be {'<' if high_open else '<='} {high}, got {x!r}.")
  return int(x) if integer else value


def _taking(schedule: Schedule, *values) -> Schedule:
  """``schedule``, recording values that bound all it takes (its start, peak, floor and end,
  or the limit it decays toward: every value lies between the least and the greatest of
  them), so that a builder checks those too, not only the value at step 0 (a negative peak
  would otherwise train by gradient ascent once reached; see optcompose.core.TAKEN). Traced
  values are left out (nothing to check)."""
  setattr(schedule, TAKEN, _known(values))
  return schedule


def _taking_later(schedule: Schedule, record: Callable[[], Optional[tuple]]) -> Schedule:
  """``schedule``, recording what ``record()`` returns (values as :func:`_taking` records
  them, or None), which evaluates schedules: now if JAX's backends are up, else the first
  time a builder asks (:func:`optcompose.core.backend.taken_values`), so that building
  starts nothing (``jax.distributed.initialize`` may follow)."""
  later = lambda: _known(record())  # noqa: E731
  setattr(schedule, TAKEN, later() if backend_started() else later)
  return schedule


def _known(values: Optional[tuple]) -> Optional[tuple]:
  return None if values is None else tuple(v for v in values if not isinstance(v, jax.core.Tracer))


def _at_last_step(schedule: Schedule) -> tuple:
  """``(schedule(2**31 - 1),)``, the value at the last step the int32 count reaches (where a
  decay toward 0 or a floor is lowest, or a growth highest): as a float, or ``()`` when it is
  traced or NaN. A growth that overflows records the largest finite value of its dtype and
  sign: it passes every bound (a learning rate's range test grows without one), and a
  hyperparameter bounded above (``b2 < 1``) is refused. An overflow here is expected, not
  the user's: jax_debug_infs and jax_debug_nans are off while it is computed (only in a
  record :func:`_taking_later` evaluates once JAX's backends are up)."""
  with jax.debug_infs(False), jax.debug_nans(False):
    value = schedule(jnp.asarray(MAX_STEPS, jnp.int32))
  if isinstance(value, jax.core.Tracer):
    return ()
  value = np.asarray(value)
  last = value.astype(np.float64).item()
  if np.isinf(last) and np.issubdtype(value.dtype, np.floating):
    return (float(np.copysign(np.finfo(value.dtype).max, last)),)
  return (last,) if np.isfinite(last) else ()


def _unusable_from(schedule: Schedule, *inputs) -> Schedule:
  """``schedule``, refused by builders as the first of ``inputs`` (the schedules it uses) that
  is (see ``optcompose.core.UNUSABLE``)."""
  why = next((getattr(s, UNUSABLE) for s in inputs if getattr(s, UNUSABLE, None)), None)
  if why:
    setattr(schedule, UNUSABLE, why)
  return schedule


# A piece of a join used for at most this many steps is evaluated at each of them.
_SAMPLED_SPAN = 1 << 16


def _taken_in_spans(spans) -> Optional[tuple]:
  """The values the pieces of a join take, each over the steps it is used: ``spans`` holds
  ``(schedule, first step, end)``. A piece used for at most 2^16 steps is evaluated at each
  of them (its least and greatest values), not bounded by all it would take later (a growth
  cut off by the next piece never reaches the largest float); a longer or final piece, or
  one that cannot be evaluated so, gives the values it records."""
  taken = []
  for s, start, end in spans:
    values = None
    if end - start <= _SAMPLED_SPAN:
      try:
        at = np.asarray(jax.vmap(s)(jnp.arange(end - start, dtype=jnp.int32)), np.float64)
        values = (at.min(), at.max()) if at.size and np.isfinite(at).all() else None
      except Exception:  # a schedule that takes no batch of counts: its records  # noqa: BLE001
        values = None
    if values is None:
      values = _taken(s)
      if values is None:
        return None
    taken.extend(float(v) for v in values)
  return tuple(sorted(taken, key=abs, reverse=True))  # a refusal names the farthest value


def _taken(*schedules) -> Optional[tuple]:
  """The values the ``schedules`` record together, or None if one records none."""
  found = [taken_values(s, now=True) for s in schedules]
  if any(f is None for f in found):
    return None
  return tuple(value for values in found for value in (values or ()))


def _flag(fn: str, name: str, value) -> bool:
  """``value``, a bool (``staircase="yes"`` would be taken by its truthiness)."""
  is_bool_array = isinstance(value, (np.ndarray, jax.Array)) and not isinstance(
    value, jax.core.Tracer
  )
  if is_bool_array and (value.shape != () or value.dtype != np.bool_):
    is_bool_array = False
  if not (isinstance(value, (bool, np.bool_)) or is_bool_array):
    raise TypeError(f"{fn}: `{name}` must be a bool, got {value!r}.")
  return bool(value)


# The step count is an int32 array: a step count beyond it is never reached, and a schedule
# computing with one (count - begin, count < boundary) fails at its first use.
MAX_STEPS = 2**31 - 1


def _steps(fn, name, value, *, positive=True):
  """``value`` as a Python int: a whole number of steps, > 0 (``>= 0`` unless
  ``positive``), at most :data:`MAX_STEPS`.

  Raises:
    TypeError: not a real number. ValueError: NaN, not whole, out of range (naming ``fn``
      and ``name``).
  """
  steps = _number(fn, name, value, low=0, low_open=positive, integer=True)
  if not isinstance(steps, jax.core.Tracer) and steps > MAX_STEPS:
    raise ValueError(
      f"{fn}: `{name}` must be <= 2**31 - 1 = {MAX_STEPS} (the step count is int32), got {steps}."
    )
  return steps


def _float(count):
  return jnp.asarray(count).astype(default_float())


def _boundaries_and_scales(fn: str, boundaries_and_scales) -> list:
  """The ``(boundary, scale)`` pairs sorted by boundary, each boundary a Python int checked
  as a step count (<= 2**31 - 1) and each scale a number >= 0.

  Raises:
    TypeError: not a mapping, or a key or scale that is not a number. ValueError: a key
      that is not a whole number of steps in range, or a negative scale (naming the key).
  """
  if boundaries_and_scales is None:
    return []
  if not isinstance(boundaries_and_scales, Mapping):
    raise TypeError(
      f"{fn}: `boundaries_and_scales` must be a dict {{step: scale}}, got "
      f"{type(boundaries_and_scales).__name__}."
    )
  items = []
  for b, s in boundaries_and_scales.items():
    step = _steps(fn, f"boundaries_and_scales key {b!r}", b, positive=False)
    _number(fn, f"boundaries_and_scales[{b!r}]", s, low=0.0)
    items.append((step, s))
  return sorted(items, key=lambda item: item[0])


F = TypeVar("F", bound=Callable)
_NEEDS_CONCRETE = (
  jax.errors.ConcretizationTypeError,  # TracerBoolConversionError among them
  jax.errors.TracerIntegerConversionError,
  jax.errors.TracerArrayConversionError,
)


class TracedArgumentError(TypeError):
  """A schedule's argument traced where building the schedule needs its value."""


def names_traced(builder: F) -> F:
  """``builder``, raising a :class:`TracedArgumentError` that names its traced arguments
  (a value inside ``jax.jit``, ``jax.vmap`` or ``jax.grad``) where building the schedule
  needs a concrete one (a step count that places a boundary, a rate compared with 1), in
  place of JAX's error about a tracer, which names none. Costs nothing unless it fails."""

  @functools.wraps(builder)
  def build(*args, **kwargs):
    try:
      return builder(*args, **kwargs)
    except (*_NEEDS_CONCRETE, TracedArgumentError):
      given = inspect.signature(builder).bind_partial(*args, **kwargs).arguments
      is_traced = lambda x: isinstance(x, jax.core.Tracer)  # noqa: E731
      traced = [n for n, v in given.items() if any(map(is_traced, jax.tree.leaves(v)))]
      if not traced:
        raise
      names = ", ".join(f"`{n}`" for n in traced)
      raise TracedArgumentError(
        f"{builder.__name__}: {names} {'is' if len(traced) == 1 else 'are'} traced (a value "
        "inside jax.jit, jax.vmap or jax.grad), but building this schedule needs "
        f"{'its value' if len(traced) == 1 else 'the value of one or more of them'}. Build the "
        "schedule outside the traced function, or sweep a factor of the whole schedule: "
        "multiply_schedules(constant_schedule(peak), <the schedule with a peak of 1.0>)."
      ) from None

  return cast(F, build)
