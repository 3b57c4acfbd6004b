"""The check of ``eps`` with ``eps_root``: the two terms that keep an adaptive denominator
``sqrt(v + eps_root) + eps`` from 0, given as numbers or as schedules."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optcompose.core.validation import _SKIP_CHECKS, TAKEN, _concrete_scalar


def _zero(value: Any) -> bool:
  """Whether ``value`` is known to be 0 where it may be used: a number that rounds to 0 in
  its dtype or lies below float32's smallest normal number (XLA flushes subnormals on CPU;
  under x64 a float64 value still meets float32 or bfloat16 parameters, whose arithmetic
  is float32); a schedule whose values reach 0 (the least value it records, see ``TAKEN``:
  a decay to 0)."""
  tiny = jnp.finfo(jnp.float32).tiny
  if callable(value):
    taken = getattr(value, TAKEN, None)
    return bool(taken and min(abs(float(v)) for v in taken) < tiny)
  known = _concrete_scalar(value)
  return bool(known is not None and abs(known[1]) < tiny)


def check_not_both_zero(fn_name: str, eps: Any, eps_root: Any) -> None:
  """Raise a ValueError when ``eps`` and ``eps_root`` are both known to be 0: the
  denominator ``sqrt(v + eps_root) + eps`` is then 0 for a gradient that has been exactly
  0 since the start (a frozen or unused parameter), and the update 0 / 0 = NaN.

  A schedule counts as 0 when it reaches 0 (``cosine_decay_schedule(1e-8, n)`` at step n)
  beside a 0 or a schedule that is 0 throughout; two schedules that each reach 0 may reach
  it at different steps (an ``eps`` decaying to 0 while ``eps_root`` rises from 0), and are
  accepted."""
  if _SKIP_CHECKS.get() or (callable(eps) and callable(eps_root)):
    return
  if any(isinstance(v, jax.core.Tracer) for v in (eps, eps_root)):
    return
  if _zero(eps) and _zero(eps_root):
    shown = lambda v: "a schedule reaching 0" if callable(v) else repr(v)  # noqa: E731
    raise ValueError(
      f"{fn_name}: `eps` and `eps_root` are both 0 (or round to 0, or lie below float32's "
      f"smallest normal number; got {shown(eps)} and "
      f"{shown(eps_root)}): a gradient that has been exactly 0 since the start would give "
      "0 / 0 = NaN. Make one of them positive (e.g. eps=1e-8)."
    )


# Not part of the public API: the core package re-exports it.
__all__: list = []
