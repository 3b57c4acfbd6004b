"""Schedules built from others: join, multiply, warmup, interpolation, one-cycle (warm restarts:
:mod:`._restarts`)."""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.schedules._checks import (
  names_traced,
  MAX_STEPS,
  Schedule,
  _boundaries_and_scales,
  _float,
  _number,
  _steps,
  _taken,
  _taken_in_spans,
  _taking,
  _taking_later,
  _unusable_from,
)
from optcompose.schedules._decay import (
  _polynomial,
  _products,
  constant_schedule,
  cosine_decay_schedule,
  exponential_decay,
  linear_schedule,
)

__all__ = [
  "join_schedules",
  "multiply_schedules",
  "schedule_from_function",
  "linear_warmup",
  "warmup_constant_schedule",
  "warmup_cosine_decay_schedule",
  "warmup_exponential_decay_schedule",
  "piecewise_interpolate_schedule",
  "cosine_onecycle_schedule",
  "linear_onecycle_schedule",
]


@names_traced
def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
  """``s_0`` until ``b_1``, then ``s_k(t - b_k)`` from each boundary ``b_k`` on.

  ``n`` schedules take ``n - 1`` boundaries, or ``n``: a last boundary, where the last
  schedule ends (MaxText passes one), is checked but changes nothing: the last schedule
  goes on past it, as in Optax, which ignores it."""
  fn = "join_schedules"
  schedules = list(schedules)
  if not schedules:
    raise ValueError(f"{fn}: `schedules` is empty; give at least one schedule.")
  boundaries = [_steps(fn, f"boundaries[{i}]", b, positive=False) for i, b in enumerate(boundaries)]
  if len(boundaries) not in (len(schedules) - 1, len(schedules)):
    raise ValueError(
      f"{fn}: {len(schedules)} schedules need {len(schedules) - 1} boundaries (or "
      f"{len(schedules)}, the last where the last schedule ends), got {len(boundaries)}."
    )
  if any(b2 < b1 for b1, b2 in zip(boundaries, boundaries[1:])):  # the last one's too
    raise ValueError(f"{fn}: `boundaries` must be non-decreasing, got {boundaries}.")
  boundaries = boundaries[: len(schedules) - 1]  # (a last one, where the last ends: unused)
  for i, s in enumerate(schedules):
    if not callable(s):
      raise TypeError(f"{fn}: `schedules[{i}]` is not callable.")

  def schedule(count):
    out = schedules[0](count)
    for boundary, s in zip(boundaries, schedules[1:]):
      out = jnp.where(count < boundary, out, s(count - boundary))
    return out

  # Only the schedules in use: one between two equal boundaries never is.
  spans = [x for x in zip(schedules, [0, *boundaries], [*boundaries, MAX_STEPS + 1]) if x[1] < x[2]]
  joined = _taking_later(schedule, lambda: _taken_in_spans(spans))
  return _unusable_from(joined, *(s for s, _, _ in spans))


@names_traced
def multiply_schedules(*schedules: Schedule) -> Schedule:
  """The pointwise product ``s_1(t) * s_2(t) * ...`` (e.g. a base schedule times a decay)."""
  if not schedules:
    raise ValueError("multiply_schedules: give at least one schedule.")
  for i, s in enumerate(schedules):
    if not callable(s):
      raise TypeError(f"multiply_schedules: argument {i} is not callable.")

  def schedule(count):
    out = schedules[0](count)
    for s in schedules[1:]:
      out = out * s(count)
    return out

  return _unusable_from(schedule, *schedules)


@names_traced
def schedule_from_function(fn: Callable, *, dtype=jnp.float32) -> Schedule:
  """Turn a user function of the step count into a checked schedule.

  The function receives the count as a float (``dtype``) and must return a scalar; it is
  called once at step 0 here so that a wrong shape or a non-numeric result fails now.

  Raises:
    TypeError: ``fn`` not callable; ``dtype`` not a floating-point dtype (the values would
      be truncated); ``fn`` returning a complex value. ValueError: ``fn`` returning a
      non-scalar.
  """
  fn_name = "schedule_from_function"
  if not callable(fn):
    raise TypeError(f"{fn_name}: `fn` must be callable.")
  try:
    floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:  # an integer dtype would truncate the values (0.1 -> 0)
    raise TypeError(f"{fn_name}: `dtype` must be a floating-point dtype, got {dtype!r}.")

  raw = lambda count: jnp.asarray(fn(jnp.asarray(count).astype(dtype)))
  schedule = lambda count: raw(count).astype(dtype)

  probe = jax.eval_shape(raw, jax.ShapeDtypeStruct((), jnp.int32))
  if probe.shape != ():
    raise ValueError(f"{fn_name}: `fn` returned shape {probe.shape}, not a scalar.")
  if jnp.issubdtype(probe.dtype, jnp.complexfloating):  # casting would drop the imaginary part
    raise TypeError(f"{fn_name}: `fn` must return a real number, got dtype {probe.dtype}.")
  return schedule


@names_traced
def linear_warmup(schedule: Schedule, warmup_steps: int, init_value=0.0) -> Schedule:
  """Prefix any schedule with a linear warmup from ``init_value`` to ``schedule(0)``.

  ``t < W``: ``v0 + (s(0) - v0) t / W``; then ``s(t - W)``.
  """
  fn = "linear_warmup"
  if not callable(schedule):
    raise TypeError(f"{fn}: `schedule` must be callable.")
  warmup_steps = _steps(fn, "warmup_steps", warmup_steps, positive=False)
  _number(fn, "init_value", init_value)
  if warmup_steps == 0:
    return schedule

  def warm(count):
    peak = schedule(jnp.zeros_like(count))
    return init_value + (peak - init_value) * _float(count) / warmup_steps

  def record():  # the warmup ends at schedule(0), one of schedule's values
    taken = _taken(schedule)
    return None if taken is None else (init_value, *taken)

  warm = _taking_later(warm, record)
  return join_schedules([warm, schedule], [warmup_steps])


@names_traced
def warmup_constant_schedule(init_value, peak_value, warmup_steps: int) -> Schedule:
  """Linear warmup from ``init_value`` to ``peak_value``, then constant.

  ``warmup_steps = 0`` is a ValueError naming it: Optax's schedule is then ``init_value`` at
  every step (a linear schedule of no steps), never the peak; ``constant_schedule(peak_value)``
  is a schedule without warmup."""
  fn = "warmup_constant_schedule"
  steps = _number(fn, "warmup_steps", warmup_steps, integer=True)
  if not isinstance(steps, jax.core.Tracer) and steps == 0:
    raise ValueError(
      f"{fn}: `warmup_steps` must be > 0, got 0 (Optax's schedule would stay at "
      f"`init_value` = {init_value!r}, never reaching `peak_value`); without a warmup, use "
      "constant_schedule(peak_value)."
    )
  return _polynomial(
    fn, init_value, peak_value, 1, warmup_steps, 0, steps="warmup_steps", end="peak_value"
  )


@names_traced
def warmup_cosine_decay_schedule(
  init_value, peak_value, warmup_steps: int, decay_steps: int, end_value=0.0, exponent=1.0
) -> Schedule:
  """Linear warmup to ``peak_value`` over ``warmup_steps``, then cosine decay to ``end_value``
  at ``decay_steps`` (counted from step 0, warmup included, as in Optax).

  Examples:
    Halfway through the cosine (step 60 of 10 + 100) the value is halfway between the peak
    and the end:

    >>> import optcompose as oc
    >>> lr = oc.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110,
    ...                                      end_value=0.1)
    >>> [round(float(lr(t)), 4) for t in (0, 5, 10, 60, 110)]
    [0.0, 0.5, 1.0, 0.55, 0.1]
  """
  fn = "warmup_cosine_decay_schedule"
  for name, v in (("init_value", init_value), ("peak_value", peak_value), ("end_value", end_value)):
    _number(fn, name, v)
  warmup_steps = _steps(fn, "warmup_steps", warmup_steps, positive=False)
  decay_steps = _steps(fn, "decay_steps", decay_steps)
  if warmup_steps >= decay_steps:
    raise ValueError(
      f"{fn}: the warmup ({warmup_steps} steps) must be shorter than the run "
      f"(`decay_steps` = {decay_steps})."
    )
  if isinstance(peak_value, jax.core.Tracer):  # a sweep over the peak, under jax.vmap
    zero = peak_value == 0.0  # (a finite gradient at a zero peak too)
    alpha = jnp.where(zero, 0.0, end_value / jnp.where(zero, 1.0, peak_value))
  else:
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
  return join_schedules(
    [
      linear_schedule(init_value, peak_value, warmup_steps)
      if warmup_steps
      else constant_schedule(peak_value),
      cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent),
    ],
    [warmup_steps],
  )


@names_traced
def warmup_exponential_decay_schedule(
  init_value,
  peak_value,
  warmup_steps: int,
  transition_steps: int,
  decay_rate: float,
  transition_begin: int = 0,
  staircase: bool = False,
  end_value=None,
) -> Schedule:
  """Linear warmup to ``peak_value``, then :func:`exponential_decay` from the peak."""
  fn = "warmup_exponential_decay_schedule"
  _number(fn, "init_value", init_value)
  _number(fn, "peak_value", peak_value)
  warmup_steps = _steps(fn, "warmup_steps", warmup_steps, positive=False)
  return join_schedules(
    [
      linear_schedule(init_value, peak_value, warmup_steps)
      if warmup_steps
      else constant_schedule(peak_value),
      exponential_decay(
        peak_value, transition_steps, decay_rate, transition_begin, staircase, end_value
      ),
    ],
    [warmup_steps],
  )


@names_traced
def piecewise_interpolate_schedule(
  interpolate_type: str, init_value, boundaries_and_scales: Optional[Mapping[int, float]] = None
) -> Schedule:
  """Interpolate (linearly or by a half cosine) between values that change by ``scale`` at
  each boundary: value_k = init * prod(scales up to k)."""
  fn = "piecewise_interpolate_schedule"
  if interpolate_type not in ("linear", "cosine"):
    raise ValueError(
      f"{fn}: `interpolate_type` must be 'linear' or 'cosine', got {interpolate_type!r}."
    )
  _number(fn, "init_value", init_value)
  items = _boundaries_and_scales(fn, boundaries_and_scales)
  boundaries = tuple(b for b, _ in items)
  scales = tuple(s for _, s in items)

  def interpolate(start, end, pct):
    if interpolate_type == "linear":
      return (end - start) * pct + start
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1)

  def schedule(count):
    bounds = jnp.stack((0,) + boundaries)
    values = jnp.cumprod(jnp.stack((init_value,) + scales))
    sizes = jnp.maximum(bounds[1:] - bounds[:-1], 1)
    inside = jnp.logical_and(bounds[:-1] <= count, count < bounds[1:])
    pct = (_float(count) - bounds[:-1]) / sizes
    # The boolean masks are cast to the values' dtype (as implicit promotion did).
    inner = jnp.dot(*otree.promote(inside, interpolate(values[:-1], values[1:], pct)))
    return inner + jnp.multiply(*otree.promote(bounds[-1] <= count, values[-1]))

  return _taking(schedule, *_products(init_value, scales))


def _onecycle_checks(fn, transition_steps, peak_value, pct_start, div_factor, final_div_factor):
  transition_steps = _steps(fn, "transition_steps", transition_steps)
  _number(fn, "peak_value", peak_value)
  _number(fn, "pct_start", pct_start, low=0.0, high=1.0, low_open=True, high_open=True)
  _number(fn, "div_factor", div_factor, low=0.0, low_open=True)
  _number(fn, "final_div_factor", final_div_factor, low=0.0, low_open=True)
  return transition_steps


@names_traced
def cosine_onecycle_schedule(
  transition_steps: int,
  peak_value,
  pct_start: float = 0.3,
  div_factor: float = 25.0,
  final_div_factor: float = 1e4,
) -> Schedule:
  """One-cycle with cosine phases: ``peak/div`` up to ``peak`` over ``pct_start`` of the run,
  then down to ``peak/(div * final_div)`` at ``transition_steps`` (Optax's semantics)."""
  fn = "cosine_onecycle_schedule"
  transition_steps = _onecycle_checks(
    fn, transition_steps, peak_value, pct_start, div_factor, final_div_factor
  )
  return piecewise_interpolate_schedule(
    "cosine",
    peak_value / div_factor,
    {
      int(pct_start * transition_steps): div_factor,
      int(transition_steps): 1.0 / (div_factor * final_div_factor),
    },
  )


@names_traced
def linear_onecycle_schedule(
  transition_steps: int,
  peak_value,
  pct_start: float = 0.3,
  pct_final: float = 0.85,
  div_factor: float = 25.0,
  final_div_factor: float = 1e4,
) -> Schedule:
  """One-cycle with linear phases: up to ``peak`` by ``pct_start``, back to ``peak/div`` by
  ``pct_final``, then down to ``peak/(div * final_div)`` at ``transition_steps``."""
  fn = "linear_onecycle_schedule"
  transition_steps = _onecycle_checks(
    fn, transition_steps, peak_value, pct_start, div_factor, final_div_factor
  )
  _number(fn, "pct_final", pct_final, low=pct_start, high=1.0, low_open=True)
  up, down = int(pct_start * transition_steps), int(pct_final * transition_steps)
  if not up < down < transition_steps:  # as a dict's keys, one phase would replace another
    raise ValueError(
      f"{fn}: the phases end at steps int(pct_start * transition_steps) = {up}, "
      f"int(pct_final * transition_steps) = {down} and `transition_steps` = "
      f"{transition_steps}, which must increase strictly (`pct_start` = "
      f"{pct_start!r}, `pct_final` = {pct_final!r})."
    )
  return piecewise_interpolate_schedule(
    "linear",
    peak_value / div_factor,
    {up: div_factor, down: 1.0 / div_factor, transition_steps: 1.0 / final_div_factor},
  )
