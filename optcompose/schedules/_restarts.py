"""Warm restarts: SGDR's cosine cycles (growing by ``period_mult``), Optax's ``sgdr_schedule``."""

from __future__ import annotations

import decimal
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from optcompose.schedules._checks import (
  names_traced,
  MAX_STEPS,
  Schedule,
  _float,
  _number,
  _steps,
  _taking,
  default_float,
)
from optcompose.schedules._combine import join_schedules, warmup_cosine_decay_schedule

__all__ = ["cosine_warm_restarts_schedule", "sgdr_schedule"]

# Cycles whose first steps are tabulated (as whole steps, computed exactly when the schedule
# is built); later ones (period_mult within about 1e-3 of 1) are found by a float estimate,
# whose float32 starts are right only where they are far from whole steps.
_TABULATED = 1 << 14


def _first_steps(t0: int, m: float, last: int) -> tuple:
  """``(first step, its offset ceil(S_i) - S_i, period T_i)`` of the cycles starting at or
  before ``last`` (at most ``_TABULATED`` of them), and the first step of the next cycle if
  it starts at or before ``last`` too (else None), from ``S_i = T_0 + T_0 m + ... + T_0
  m^(i-1)`` computed in 60-digit decimal arithmetic on ``m`` as written (``repr``: 1.1 is
  11/10, whose starts 10 and 21 the binary 1.1 puts above the whole steps)."""
  ctx = decimal.Context(prec=60)
  mult, start, period = decimal.Decimal(repr(m)), decimal.Decimal(0), decimal.Decimal(t0)
  rows = []
  while start <= last and len(rows) < _TABULATED:
    first = int(start.to_integral_value(decimal.ROUND_CEILING))
    rows.append((first, float(ctx.subtract(first, start)), float(period)))
    start, period = ctx.add(start, period), ctx.multiply(period, mult)
  whole, offset, periods = (np.array(c) for c in zip(*rows))
  beyond = int(start.to_integral_value(decimal.ROUND_CEILING)) if start <= last else None
  return (whole.astype(np.int32), offset, periods), beyond


@names_traced
def cosine_warm_restarts_schedule(
  init_value, first_period: int, period_mult: float = 1.0, peak_decay: float = 1.0, end_value=0.0
) -> Schedule:
  """SGDR: cosine annealing restarted at the end of each cycle.

  Cycle ``i`` lasts ``T_i = T_0 * m^i`` steps and starts at ``peak_i = v * d^i``; inside it, at
  position ``tau``, the value is ``end + (peak_i - end) * 0.5 (1 + cos(pi tau / T_i))``. With
  ``peak_decay = 1`` and ``end_value = eta_min`` this is PyTorch's CosineAnnealingWarmRestarts.

  Cycle ``i`` starts at ``S_i = T_0 (m^i - 1) / (m - 1)`` (``T_0 i`` for ``m = 1``), not always
  a whole step: the integer count ``t`` is in cycle ``i`` when ``S_i <= t < S_{i+1}``, and
  ``tau = t - S_i``. The starts are computed when the schedule is built, in decimal arithmetic
  on ``m`` as written (``m = 1.1``: 10, 21, 33.1, ...; the binary 1.1 would put 10 and 21
  just above the whole steps), so every integer count is in the same cycle in float32 and
  float64 (cycles past the 16384th, for ``m`` within about 1e-3 of 1, are found in floating
  point). A float count that is a whole number is placed as that integer; a fractional one
  by the float estimate.
  """
  fn = "cosine_warm_restarts_schedule"
  _number(fn, "init_value", init_value)
  _number(fn, "end_value", end_value)
  first_period = _steps(fn, "first_period", first_period)
  _number(fn, "period_mult", period_mult, low=1.0)
  _number(fn, "peak_decay", peak_decay, low=0.0, low_open=True, high=1.0)
  t0, m = float(first_period), float(period_mult)
  if m == 1.0:
    last_cycle, tabulated, beyond = MAX_STEPS // first_period, None, None
  else:
    tabulated, beyond = _first_steps(first_period, m, MAX_STEPS)
    last_cycle = len(tabulated[0]) - 1
    if beyond is not None:  # cycles past the table, from the float estimate, up to this one
      last_cycle = int(np.floor(np.log1p(MAX_STEPS * (m - 1) / t0) / np.log(m)))

  def start_of(i):  # the float estimate, for cycles past the table and float counts
    return t0 * i if m == 1.0 else t0 * (m**i - 1) / (m - 1)

  def estimated(t):
    i = jnp.floor(t / t0) if m == 1.0 else jnp.floor(jnp.log1p(t * (m - 1) / t0) / jnp.log(m))
    # The logarithm may round across a boundary: settle i so start_i <= t < start_{i+1}.
    i = jnp.where(start_of(i + 1) <= t, i + 1, i)
    i = jnp.where(start_of(i) > t, i - 1, i)
    return i, t - start_of(i), t0 * m**i

  def cycle(count):  # (i, tau, T_i)
    if not jnp.issubdtype(count.dtype, jnp.integer):  # a whole float count: as its integer
      t = _float(count)
      whole = (t == jnp.floor(t)) & (t >= 0) & (t <= MAX_STEPS)
      exact = steps_cycle(jnp.where(whole, t, 0).astype(jnp.int32))
      return tuple(jnp.where(whole, x, e) for x, e in zip(exact, estimated(t)))
    return steps_cycle(count.astype(jnp.int32) if count.dtype.itemsize < 4 else count)

  def steps_cycle(count):
    if tabulated is None:  # m = 1: in whole steps
      i = count // first_period
      return _float(i), _float(count - i * first_period), t0
    whole = jnp.asarray(tabulated[0], count.dtype)
    offset, period = (jnp.asarray(a, default_float()) for a in tabulated[1:])
    j = jnp.maximum(jnp.searchsorted(whole, count, side="right") - 1, 0)
    i, tau, period = _float(j), _float(count - whole[j]) + offset[j], period[j]
    if beyond is None:
      return i, tau, period
    far = count >= beyond
    return tuple(jnp.where(far, e, x) for e, x in zip(estimated(_float(count)), (i, tau, period)))

  def schedule(count):
    i, tau, period = cycle(jnp.asarray(count))
    peak = init_value * peak_decay**i
    return end_value + (peak - end_value) * 0.5 * (1 + jnp.cos(jnp.pi * tau / period))

  if isinstance(peak_decay, jax.core.Tracer):
    return schedule  # nothing known to record
  # Each cycle between its peak and the end; the peaks decay to the last cycle's.
  return _taking(schedule, init_value, end_value, init_value * peak_decay**last_cycle)


@names_traced
def sgdr_schedule(cosine_kwargs: Iterable[Mapping]) -> Schedule:
  """Optax's SGDR: a sequence of warmup-cosine cycles, each given by its keyword arguments
  to :func:`warmup_cosine_decay_schedule`.

  Raises:
    TypeError: a cycle's keyword arguments are not a dict, or miss one (naming the cycle).
    ValueError: no cycle; a cycle's arguments are invalid (naming the cycle); a cycle would
      start beyond the int32 step count.
  """
  schedules, boundaries, step = [], [], 0
  for i, kwargs in enumerate(cosine_kwargs):
    if not isinstance(kwargs, Mapping):
      raise TypeError(
        f"sgdr_schedule: `cosine_kwargs[{i}]` must be a dict of keyword "
        f"arguments, got {type(kwargs).__name__}."
      )
    try:
      schedules.append(warmup_cosine_decay_schedule(**kwargs))
    except (TypeError, ValueError) as e:  # a missing `decay_steps`: Python's bare message
      raise type(e)(f"sgdr_schedule: cycle {i} (`cosine_kwargs[{i}]`): {e}") from e
    if boundaries and boundaries[-1] > MAX_STEPS:  # a cycle would start past the int32 count
      raise ValueError(
        f"sgdr_schedule: cycle {i} would start at step {boundaries[-1]} (the "
        f"sum of the earlier `decay_steps`), beyond 2**31 - 1 = {MAX_STEPS} "
        "(the step count is int32)."
      )
    step += int(kwargs["decay_steps"])  # a whole number: checked by the cycle's schedule
    boundaries.append(step)
  if not schedules:
    raise ValueError("sgdr_schedule: give at least one cycle.")
  return join_schedules(schedules, boundaries[:-1])
