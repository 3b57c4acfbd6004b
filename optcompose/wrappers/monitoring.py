"""Measurements of the updates kept in the state, for debugging and logging a chain.

Each passes the updates through untouched and stores what it measures of them:

* ``snapshot(name, measure)``: ``{name: measure(u)}`` in :class:`SnapshotState`;
* ``monitor({name: measure, ...})``: several measurements, each a function of the updates
  or a transformation (whose *updates* are the measurement, and whose state is kept:
  ``measure_with_ema`` keeps a moving average), in :class:`MonitorState`;
* ``measure_with_ema(measure, decay)``: the transformation whose updates are the
  (debiased) exponential moving average of ``measure(u)``; meant for ``monitor``.

Read a measurement back by name with ``optax.tree.get(state, name)`` (Optax's tree walker
reads these states as it reads its own). The measures see the updates at their place in
the chain (``u``), and, at ``init``, the parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  DTYPE,
  FLAG,
  EmptyState,
  GradientTransformation,
  as_transformation,
  choice,
  default_float,
  expect_state,
  public,
  real,
  stateless,
)
from optcompose.transforms.momentum import ema


def _updates(updates):
  """A measure the property kit draws: the updates themselves."""
  return updates


def _check_measure(who: str, name: str, measure: Any) -> None:
  if not callable(measure):
    raise TypeError(
      f"{who}: `{name}` must be a function of the updates, got {type(measure).__name__}."
    )


class SnapshotState(NamedTuple):
  """Optax's field: ``{measure_name: measurement}``."""

  measurement: dict


@public(
  "transformation",
  optax="snapshot",
  any_dtype=True,
  measure_name=choice("snapshot"),
  measure=choice(otree.global_norm, _updates),
)
def snapshot(measure_name: str, measure: Callable) -> GradientTransformation:
  """Pass the updates through and store ``measure(u)`` under ``measure_name``.

  Update: ``u`` unchanged; ``state.measurement = {measure_name: measure(u)}`` (at
  ``init``: ``measure(params)``, which fixes the state's layout).

  Args:
    measure_name: the key of the measurement (``optax.tree.get(state, measure_name)``).
    measure: a function of the updates tree returning a tree of arrays.

  Returns:
    A transformation with state :class:`SnapshotState` (Optax's field).

  References:
    Optax's ``optax.snapshot``.
  """
  if not isinstance(measure_name, str):
    raise TypeError(f"snapshot: `measure_name` must be a str, got {type(measure_name).__name__}.")
  _check_measure("snapshot", "measure", measure)

  def init(params):
    # Arrays copied: a measure that returns its input would share the parameters' buffers.
    copied = lambda x: jnp.array(x) if isinstance(x, jax.Array) else x  # noqa: E731
    return SnapshotState({measure_name: jax.tree.map(copied, measure(params))})

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, SnapshotState, "snapshot")
    return updates, SnapshotState({measure_name: measure(updates)})

  return GradientTransformation(init, update)


class MonitorState(NamedTuple):
  """Optax's fields: the latest measurements by name, and each measure's own state."""

  measurements: dict
  measure_states: tuple


@public(
  "transformation", optax="monitor", any_dtype=True, measures=choice({"norm": otree.global_norm})
)
def monitor(measures: Mapping[str, Any]) -> GradientTransformation:
  """Pass the updates through and store several measurements of them, stateful or not.

  Update: ``u`` unchanged; for each ``name, m`` of ``measures`` (in their order), a
  function gives ``measurements[name] = m(u)``, a transformation gives
  ``measurements[name], s_name = m.update(u, s_name, params, **extra)``.

  ``init`` stores zero measurements of the shapes and dtypes the measures give (found
  abstractly, from ``params`` as the updates and no keyword arguments), so the state keeps
  one layout from the start; Optax's starts with an empty dict, filled at the first
  update.

  Args:
    measures: ``{name: measure}``, each a function of the updates or a transformation
      (optcompose's or Optax's, e.g. :func:`measure_with_ema`).

  Returns:
    A transformation with state :class:`MonitorState` (Optax's fields).

  References:
    Optax's ``optax.monitor``.
  """
  if not isinstance(measures, Mapping):
    raise TypeError(
      f"monitor: `measures` must be a dict {{name: measure}}, got {type(measures).__name__}."
    )
  members = {}
  for name, measure in measures.items():
    if callable(measure):  # as in Optax, a callable is a plain measurement
      members[name] = stateless(lambda u, _, m=measure: m(u))
    else:
      members[name] = as_transformation(measure, "monitor", f"measures['{name}']")
  names = tuple(members)

  def measure_all(updates, states, params, extra):
    measured, new_states = {}, []
    for name, state in zip(names, states):
      measured[name], state = members[name].update(updates, state, params, **extra)
      new_states.append(state)
    return measured, tuple(new_states)

  def init(params):
    states = tuple(members[name].init(params) for name in names)
    shapes = jax.eval_shape(lambda p, s: measure_all(p, s, p, {})[0], params, states)
    return MonitorState(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), states)

  def update(updates, state, params=None, **extra):
    expect_state(state, MonitorState, "monitor")
    if len(state.measure_states) != len(names):
      raise ValueError(
        f"monitor: `state.measure_states` holds {len(state.measure_states)} "
        f"states for {len(names)} measures; pass the state of this monitor's "
        "init."
      )
    return updates, MonitorState(*measure_all(updates, state.measure_states, params, extra))

  return GradientTransformation(init, update)


def _floating(tree, dtype: Optional[Any]):
  """Non-floating leaves (a boolean ``norm > threshold``) as floats, to be averaged: in
  ``dtype``, else JAX's default float."""

  def leaf(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(dtype or default_float())

  return jax.tree.map(leaf, tree)


@public(
  "transformation",
  optax="measure_with_ema",
  measure=choice(_updates),
  decay=real(0.0, 1.0, high_open=True, draw=(0.0, 0.999), schedule=False),
  debias=FLAG,
  accumulator_dtype=DTYPE,
)
def measure_with_ema(
  measure: Callable, decay: Any, debias: bool = True, accumulator_dtype: Optional[Any] = None
) -> GradientTransformation:
  """The exponential moving average of ``measure(u)``, as updates (a measure for ``monitor``).

  Update (beta = ``decay``, t counting its steps from 1, ``m_0 = 0``)::

      x_t = measure(u_t)                       (non-floating leaves as floats)
      m_t = (1 - beta) x_t + beta m_{t-1}
      out = m_t / (1 - beta^t)  (debias)       out = m_t  (otherwise)

  It returns ``out`` *in place of the updates*: place it in :func:`monitor`, not directly
  in an optimizer's chain (unless ``measure`` returns a tree like the updates). A boolean
  or integer measurement is averaged as a float (``accumulator_dtype``, else JAX's default
  float), so the state keeps its dtype from ``init`` on (Optax's starts as the
  measurement's dtype and becomes a float at the first update).

  Args:
    measure: a function of the updates tree returning a tree of arrays.
    decay: beta in [0, 1) (a number).
    debias: output ``m_t / (1 - beta^t)``.
    accumulator_dtype: the stored average's dtype (``None``: the measurement's).

  Returns:
    A transformation with state ``(EmptyState(), EmaState(count, ema))``, Optax's layout.

  References:
    Optax's ``optax.measure_with_ema``.
  """
  _check_measure("measure_with_ema", "measure", measure)
  average = ema(decay, debias, accumulator_dtype)

  def measured(updates):
    return _floating(measure(updates), accumulator_dtype)

  def init(params):
    return EmptyState(), average.init(measured(params))

  def update(updates, state, params=None, **extra):
    del extra
    if not (isinstance(state, tuple) and len(state) == 2):
      raise ValueError(
        f"measure_with_ema: the state must be the pair (EmptyState(), "
        f"EmaState) of its init, got {type(state).__name__}."
      )
    out, ema_state = average.update(measured(updates), state[1])  # a measurement, not of params
    return out, (state[0], ema_state)

  return GradientTransformation(init, update)


__all__ = ["MonitorState", "SnapshotState"]  # and the builders it registers
