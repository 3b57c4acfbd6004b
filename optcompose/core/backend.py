"""Whether building may touch JAX's runtime, and the schedule records that wait for it.

Evaluating anything eagerly (a schedule at its last step, to record the values it takes)
starts JAX's backends, and ``jax.distributed.initialize`` must come before that: a config
module that builds the optimizer before ``main`` calls it would fail there, where Optax's
builders, which never evaluate, do not. Before the backends are up, a schedule therefore
records a thunk (:func:`taken_values` evaluates it later), and a builder given such a
schedule checks its range at the first ``init``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

# The attribute on which a schedule of optcompose.schedules records values that bound all
# it takes (its start, peak, floor, end, or the limit it decays toward): a builder checks them
# against the argument's range when it is built, not only the value at step 0 at ``init``
# (a negative peak would otherwise train by gradient ascent once reached). A tuple, None
# (nothing known), or a function returning one (recorded before the backends were up).
TAKEN = "_optcompose_values_taken"


def backend_started() -> bool:
  """Whether JAX has started its backends (True where this JAX does not tell: evaluate)."""
  try:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return True


def taken_values(schedule: Any, *, now: bool = False) -> Optional[tuple]:
  """The values ``schedule`` records as taken (see :data:`TAKEN`), or None. A record that
  must evaluate the schedule is evaluated once the backends are up (or ``now``: at
  ``init``, even inside a trace), and kept."""
  record = getattr(schedule, TAKEN, None)
  if callable(record):
    if not (now or backend_started()):
      return None
    with jax.ensure_compile_time_eval():
      record = record()
    setattr(schedule, TAKEN, record)
  return record


def record_pending(schedule: Any) -> bool:
  """Whether ``schedule``'s record still waits for the backends (see :func:`taken_values`)."""
  return callable(getattr(schedule, TAKEN, None))
