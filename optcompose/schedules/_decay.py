"""Schedules of one formula each: constant, step, exponential, inverse, polynomial, cosine."""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from optcompose.schedules._checks import (
  names_traced,
  UNUSABLE,
  Schedule,
  _boundaries_and_scales,
  _at_last_step,
  _taking_later,
  _flag,
  _float,
  _taking,
  _number,
  _steps,
)

__all__ = [
  "constant_schedule",
  "piecewise_constant_schedule",
  "exponential_decay",
  "inverse_time_decay",
  "inverse_sqrt_schedule",
  "polynomial_schedule",
  "linear_schedule",
  "cosine_decay_schedule",
]


@names_traced
def constant_schedule(value) -> Schedule:
  """``v`` at every step."""
  _number("constant_schedule", "value", value)
  return _taking(lambda count: value, value)


@names_traced
def piecewise_constant_schedule(
  init_value, boundaries_and_scales: Optional[Mapping[int, float]] = None
) -> Schedule:
  """Step decay: multiply by ``scale`` from each boundary step on (Optax's semantics).

  Examples:
    >>> import optcompose as oc
    >>> lr = oc.piecewise_constant_schedule(1.0, {100: 0.1, 200: 0.1})
    >>> [round(float(lr(t)), 4) for t in (0, 99, 100, 250)]
    [1.0, 1.0, 0.1, 0.01]
  """
  fn = "piecewise_constant_schedule"
  _number(fn, "init_value", init_value)
  items = _boundaries_and_scales(fn, boundaries_and_scales)

  def schedule(count):
    v = init_value
    for threshold, scale in items:
      # Optax's max(0, sign(threshold - count)), without an int32 sign meeting a float: 1
      # before the boundary, 0 from it on (weakly typed, as Optax's).
      indicator = jnp.where(count < threshold, 1.0, 0.0)
      v = v * indicator + (1 - indicator) * scale * v
    return v

  return _taking(schedule, *_products(init_value, [scale for _, scale in items]))


def _products(init_value, scales) -> list:
  """``init_value`` and its products with each prefix of ``scales``: the values a piecewise
  schedule holds (or passes through) between its boundaries."""
  values = [init_value]
  for scale in scales:
    values.append(values[-1] * scale)
  return values


@names_traced
def exponential_decay(
  init_value,
  transition_steps: int,
  decay_rate: float,
  transition_begin: int = 0,
  staircase: bool = False,
  end_value=None,
) -> Schedule:
  """``v * r^((t - begin) / T)`` after ``transition_begin``; floored exponent with
  ``staircase``; clipped at ``end_value`` (a floor when decaying, a ceiling when growing)."""
  fn = "exponential_decay"
  _number(fn, "init_value", init_value)
  transition_steps = _steps(fn, "transition_steps", transition_steps)
  _number(fn, "decay_rate", decay_rate, low=0.0, low_open=True)
  transition_begin = _steps(fn, "transition_begin", transition_begin, positive=False)
  staircase = _flag(fn, "staircase", staircase)
  if end_value is not None:
    _number(fn, "end_value", end_value)
  if isinstance(decay_rate, jax.core.Tracer):  # a sweep over the rate, under jax.vmap
    clip = lambda v, e: jnp.where(decay_rate < 1.0, jnp.maximum(v, e), jnp.minimum(v, e))  # noqa: E731
  else:
    clip = jnp.maximum if decay_rate < 1.0 else jnp.minimum

  def schedule(count):
    shifted = _float(count - transition_begin)  # subtracted exactly, in integers
    p = shifted / transition_steps
    if staircase:
      p = jnp.floor(p)
    value = jnp.where(shifted <= 0, init_value, init_value * jnp.power(decay_rate, p))
    return value if end_value is None else clip(value, end_value)

  def record():  # monotone: from init_value to its value at the last step; unbounded: none
    last = _at_last_step(schedule)
    return (init_value, *last) if last else None

  return _taking_later(schedule, record)


@names_traced
def inverse_time_decay(
  init_value, decay_steps: int, decay_rate: float, staircase: bool = False
) -> Schedule:
  """``v / (1 + r * t / T)`` (Keras's InverseTimeDecay); ``t / T`` floored with staircase."""
  fn = "inverse_time_decay"
  _number(fn, "init_value", init_value)
  decay_steps = _steps(fn, "decay_steps", decay_steps)
  _number(fn, "decay_rate", decay_rate, low=0.0)
  staircase = _flag(fn, "staircase", staircase)

  def schedule(count):
    p = _float(count) / decay_steps
    if staircase:
      p = jnp.floor(p)
    return init_value / (1 + decay_rate * p)

  return _taking_later(schedule, lambda: (init_value, *_at_last_step(schedule)))  # decreasing


@names_traced
def inverse_sqrt_schedule(peak_value, warmup_steps: int, init_value=0.0) -> Schedule:
  """The Transformer's schedule: linear warmup to ``peak_value`` over ``warmup_steps``, then
  ``peak * sqrt(W / t)``.

  With ``peak_value = d_model^-0.5 * W^-0.5`` and ``init_value = 0`` this is Vaswani et al.'s
  ``d_model^-0.5 * min(t^-0.5, t * W^-1.5)``. ``warmup_steps = 0`` decays as
  ``peak / sqrt(max(t, 1))`` from the first step.
  """
  fn = "inverse_sqrt_schedule"
  _number(fn, "peak_value", peak_value)
  _number(fn, "init_value", init_value)
  warmup_steps = _steps(fn, "warmup_steps", warmup_steps, positive=False)
  w = max(warmup_steps, 1)

  def schedule(count):
    t = _float(count)
    decay = peak_value * jnp.sqrt(w / jnp.maximum(t, w))
    if warmup_steps == 0:
      return decay
    warm = init_value + (peak_value - init_value) * t / warmup_steps
    return jnp.where(t < warmup_steps, warm, decay)

  return _taking_later(  # then decreasing
    schedule, lambda: (init_value, peak_value, *_at_last_step(schedule))
  )


@names_traced
def polynomial_schedule(
  init_value, end_value, power, transition_steps: int, transition_begin: int = 0
) -> Schedule:
  """``(v0 - v1) * (1 - clip((t - begin) / T))^power + v1``."""
  return _polynomial(
    "polynomial_schedule", init_value, end_value, power, transition_steps, transition_begin
  )


def _polynomial(
  fn,
  init_value,
  end_value,
  power,
  transition_steps,
  transition_begin,
  steps="transition_steps",
  end="end_value",
) -> Schedule:
  """:func:`polynomial_schedule`, its errors naming ``fn``, its length ``steps`` and its end
  value ``end``."""
  _number(fn, "init_value", init_value)
  _number(fn, end, end_value)
  _number(fn, "power", power, low=0.0, low_open=True)
  transition_steps = _steps(fn, steps, transition_steps, positive=False)
  transition_begin = _steps(fn, "transition_begin", transition_begin, positive=False)
  if isinstance(transition_steps, int) and transition_steps == 0:
    return _zero_steps(fn, steps, init_value, end_value, end)

  def schedule(count):
    count = _float(jnp.clip(count - transition_begin, 0, transition_steps))  # exact in ints
    # Clipped: XLA turns the division by a constant into a product that a fused multiply-add
    # leaves just above 1 at the end (linear_schedule(0.1, 0.0, 10): -1.5e-9 under jit).
    frac = jnp.clip(1 - count / transition_steps, 0, 1)
    return (init_value - end_value) * (frac**power) + end_value

  return _taking(schedule, init_value, end_value)


def _zero_steps(fn, steps, init_value, end_value, end) -> Schedule:
  """Optax's schedule of 0 steps: constant at ``init_value``, which a warmup of 0 steps
  joined at boundary 0 never uses (Hugging Face's Flax examples build one). Where it would
  be used, it never reaches ``end_value``: a builder given it refuses it, and so does one
  given a join that uses it."""
  schedule = _taking(lambda count: init_value, init_value)
  if init_value != end_value:
    setattr(
      schedule,
      UNUSABLE,
      f"{fn} with `{steps}` = 0 stays at `init_value` = {init_value!r} and never reaches "
      f"`{end}` = {end_value!r} (as in Optax). It may only be a segment of join_schedules "
      f"that is never used (a warmup of 0 steps before boundary 0); give `{steps}` > 0, or "
      "constant_schedule(...) for a constant.",
    )
  return schedule


@names_traced
def linear_schedule(
  init_value, end_value, transition_steps: int, transition_begin: int = 0
) -> Schedule:
  """Linear interpolation from ``init_value`` to ``end_value`` over ``transition_steps``."""
  return _polynomial(
    "linear_schedule", init_value, end_value, 1, transition_steps, transition_begin
  )


@names_traced
def cosine_decay_schedule(init_value, decay_steps: int, alpha=0.0, exponent=1.0) -> Schedule:
  """``v * ((1 - alpha) * (0.5 (1 + cos(pi min(t, T) / T)))^exponent + alpha)``.

  ``alpha`` is the floor as a fraction of ``init_value`` (PyTorch's ``eta_min = alpha * v``).
  """
  fn = "cosine_decay_schedule"
  _number(fn, "init_value", init_value)
  decay_steps = _steps(fn, "decay_steps", decay_steps)
  _number(fn, "alpha", alpha)
  _number(fn, "exponent", exponent, low=0.0, low_open=True)

  def schedule(count):
    steps = _float(decay_steps)  # a traced length too (a sweep under jax.vmap)
    count = jnp.minimum(_float(count), steps)
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * count / steps))
    return init_value * ((1 - alpha) * cosine**exponent + alpha)

  return _taking(schedule, init_value, init_value * alpha)
