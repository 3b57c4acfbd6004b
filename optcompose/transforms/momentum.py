"""Momentum: the heavy-ball trace, with optional Nesterov look-ahead.

Formulas, in the symbols the tests use (g: incoming update, v: trace, rho: decay)::

    v_t = rho * v_{t-1} + g_t                       (heavy ball; Polyak, 1964)
    u_t = v_t                                       (nesterov=False)
    u_t = g_t + rho * v_t                           (nesterov=True; Sutskever et al., 2013)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax

from optcompose import tree as otree
from optcompose._core import (
    GradientTransformation, ScalarOrSchedule, check_hyperparameter, with_schedules,
)


class TraceState(NamedTuple):
  """The momentum buffer ``v``."""

  trace: Any


def trace_leaf(rho, v, g):
  """``g + rho * v``: both the trace update and Nesterov's look-ahead."""
  return g + rho * v


@with_schedules("decay")
def trace(
    decay: ScalarOrSchedule,
    nesterov: bool = False,
    accumulator_dtype: Optional[Any] = None,
) -> GradientTransformation:
  """Heavy-ball momentum ``v <- decay * v + g`` (Nesterov: output ``g + decay * v``).

  Args:
    decay: the momentum coefficient rho in [0, 1] (a number or a schedule).
    nesterov: use the look-ahead ``g + rho * v_t`` as the output.
    accumulator_dtype: dtype of the stored trace (e.g. ``jnp.bfloat16`` to halve its memory);
      ``None`` keeps the parameters' dtype. The arithmetic runs in the wider of the two.

  References:
    Polyak, 1964; Sutskever et al., "On the importance of initialization and momentum in
    deep learning", ICML 2013.
  """
  check_hyperparameter("trace", "decay", decay, low=0.0, high=1.0)

  def init(params):
    otree.check_floating(params, "params")
    return TraceState(trace=otree.zeros_like(params, dtype=accumulator_dtype))

  def update(updates, state, params=None, **extra):
    del params, extra
    otree.check_same_structure(updates, state.trace, "updates", "state.trace")
    new_trace = jax.tree.map(lambda g, v: trace_leaf(decay, v, g), updates, state.trace)
    if nesterov:
      out = jax.tree.map(lambda g, v: trace_leaf(decay, v, g), updates, new_trace)
    else:
      out = new_trace
    # Updates keep the gradients' dtype (float16 gradients with a bfloat16 trace would
    # otherwise come out float32).
    out = otree.cast_like(out, updates)
    return out, TraceState(trace=otree.cast(new_trace, accumulator_dtype))

  return GradientTransformation(init, update)
