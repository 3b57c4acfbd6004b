"""Argument checks shared by the schedules: each raises naming the schedule and argument."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from optcompose.core import Schedule, default_float  # noqa: F401 -- Schedule: for the others


def _number(fn: str, name: str, value, *, low=None, high=None, low_open=False,
            high_open=False, integer=False):
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.generic, np.ndarray, jax.Array)):
    raise TypeError(f"{fn}: `{name}` must be a number, got {type(value).__name__}.")
  if isinstance(value, jax.core.Tracer):
    return value
  x = np.asarray(value)
  if x.shape != ():
    raise ValueError(f"{fn}: `{name}` must be a scalar, got shape {x.shape}.")
  x = x.item()
  if x != x:
    raise ValueError(f"{fn}: `{name}` is NaN.")
  if integer and float(x) != int(x):
    raise ValueError(f"{fn}: `{name}` must be a whole number of steps, got {x!r}.")
  if low is not None and (x <= low if low_open else x < low):
    raise ValueError(f"{fn}: `{name}` must be {'>' if low_open else '>='} {low}, got {x!r}.")
  if high is not None and (x >= high if high_open else x > high):
    raise ValueError(f"{fn}: `{name}` must be {'<' if high_open else '<='} {high}, got {x!r}.")
  return int(x) if integer else value


def _steps(fn, name, value, *, positive=True):
  return _number(fn, name, value, low=0, low_open=positive, integer=True)


def _float(count):
  return jnp.asarray(count).astype(default_float())
