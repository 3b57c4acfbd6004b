"""Reduce the step size when a monitored value stops improving (reduce-on-plateau).

Fed the value through the update's keyword arguments (``update(..., value=loss)``); it
multiplies the updates by ``scale``. Every ``accumulation_size`` calls it compares the mean
of the values received with the best mean so far::

    improved  = mean < (1 - rtol) * best - atol        (mode="min", Optax's; "max" negates the
                                                         values and compares with best -
                                                         rtol * |best| - atol)
    plateau   = 0 if improved else plateau + 1
    if plateau == patience (and not cooling down):
        scale = max(scale * factor, min_scale);  plateau = 0;  cooldown_count = cooldown
    during cooldown: plateau stays 0 and cooldown_count counts down

Optax's names, defaults and semantics (``optax.contrib.reduce_on_plateau``); ``mode`` is an
extension. Unlike Optax, ``scale`` is kept in float32 (float64 under x64) whatever the
parameters' dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  GradientTransformation,
  as_hyperparam,
  choice,
  default_float,
  expect_state,
  integer,
  public,
  real,
  safe_increment,
  zero_count,
)
from optcompose.core.validation import check_real_value, declare


class ReduceLROnPlateauState(NamedTuple):
  scale: jax.Array
  best_value: jax.Array
  plateau_count: jax.Array
  cooldown_count: jax.Array
  count: jax.Array
  avg_value: jax.Array

  @property
  def hyperparams(self) -> dict:
    """The multiplier in force, as :func:`optcompose.current_hyperparams` reports it."""
    return {"plateau_scale": self.scale}

  def with_hyperparams(self, values: dict) -> "ReduceLROnPlateauState":
    """The state with ``plateau_scale`` replaced (:func:`optcompose.set_hyperparams`)."""
    return self._replace(scale=values["plateau_scale"])


# set_hyperparams(state, plateau_scale=...) range-checks it: a negative one would ascend.
declare("plateau_scale", real(0.0, draw=(0.0, 1.0), schedule=False))


def _unit_open(draw):
  return real(0.0, 1.0, low_open=True, high_open=True, draw=draw, schedule=False)


@public(
  "transformation",
  optax="contrib.reduce_on_plateau",
  factor=_unit_open((0.01, 0.99)),
  patience=integer(1, draw=(1, 5)),
  rtol=real(0.0, 1.0, draw=(1e-4, 0.1), schedule=False),
  atol=real(0.0, schedule=False, draw=(0.0, 0.0)),
  cooldown=integer(0, draw=(0, 3)),
  accumulation_size=integer(1, draw=(1, 1)),
  min_scale=real(0.0, 1.0, schedule=False, draw=(0.0, 0.0)),
  mode=choice("min", "max"),
)
def reduce_on_plateau(
  factor: float = 0.1,
  patience: int = 10,
  rtol: float = 1e-4,
  atol: float = 0.0,
  cooldown: int = 0,
  accumulation_size: int = 1,
  min_scale: float = 0.0,
  *,
  mode: str = "min",
) -> GradientTransformation:
  """Scale updates down by ``factor`` after ``patience`` evaluations without improvement.

  Update: ``u <- scale * u``; every ``accumulation_size`` calls, with ``mean`` the mean of
  the values received (negated for ``mode="max"``)::

      improved = mean < (1 - rtol) * best - atol;   plateau = 0 if improved else plateau + 1
      if plateau == patience and not cooling down:
          scale = max(scale * factor, min_scale);  plateau = 0;  cooldown_count = cooldown

  (``mode="max"``: ``improved = mean < best - rtol * |best| - atol`` on the negated values,
  so that an accuracy that stays flat counts as a plateau: PyTorch's rule for a positive
  best; for a negative one PyTorch's counts a flat metric as improving. So "max" on ``x`` is
  not "min" on ``-x``, which keeps Optax's formula and that trait.)

  Args:
    factor: multiplier in (0, 1) applied to the scale at each plateau.
    patience: evaluations without improvement before the scale is reduced, at the
      ``patience``-th (Optax's rule; PyTorch's ``ReduceLROnPlateau`` reduces after
      ``patience`` bad epochs, at the next one: its ``patience=p`` is ``patience=p + 1`` here).
    rtol: relative improvement threshold in [0, 1] (at least one of ``rtol`` and ``atol``
      positive).
    atol: absolute improvement threshold (>= 0).
    cooldown: evaluations to wait after a reduction before counting again.
    accumulation_size: update calls whose values are averaged into one evaluation.
    min_scale: the scale never goes below this, in [0, 1] (the scale starts at 1).
    mode: "min" (the value should fall, e.g. a loss) or "max" (e.g. an accuracy); ours,
      keyword-only.

  Returns:
    A transformation with state :class:`ReduceLROnPlateauState`; ``update`` needs
    ``value=`` (the monitored loss or metric, a real scalar: a bool, str, complex or None
    is a TypeError naming ``value``, raised while tracing). The scale in force is reported by
    :func:`optcompose.current_hyperparams` as ``plateau_scale``.

  References:
    PyTorch's ``torch.optim.lr_scheduler.ReduceLROnPlateau``; Optax's
    ``optax.contrib.reduce_on_plateau`` (same names, defaults and state fields).
  """
  fn = "reduce_on_plateau"
  if rtol == 0 and atol == 0:
    raise ValueError(f"{fn}: at least one of `rtol` and `atol` must be positive.")
  if mode not in ("min", "max"):
    raise ValueError(f"{fn}: `mode` must be 'min' or 'max', got {mode!r}.")
  sign = 1.0 if mode == "min" else -1.0

  def init(params):
    del params
    f32 = default_float()
    return ReduceLROnPlateauState(
      scale=as_hyperparam(1.0),
      best_value=jnp.asarray(jnp.inf, f32),
      plateau_count=zero_count(),
      cooldown_count=zero_count(),
      count=zero_count(),
      avg_value=jnp.asarray(0.0, f32),
    )

  def evaluate(s: ReduceLROnPlateauState) -> ReduceLROnPlateauState:
    # "max" compares the negated values by their magnitude: (1 - rtol) * best is above a
    # negative best, so a flat accuracy would count as improving and never reduce. "min"
    # keeps Optax's formula exactly (as PyTorch's, it has the same trait for negative values).
    best = s.best_value  # inf at the start: never inf - inf, which jax_debug_nans reports
    magnitude = jnp.abs(jnp.where(jnp.isinf(best), 0, best))
    threshold = (1 - rtol) * best if mode == "min" else best - rtol * magnitude
    improved = s.avg_value < threshold - atol
    best = jnp.where(improved, s.avg_value, s.best_value)
    plateau = jnp.where(improved, 0, safe_increment(s.plateau_count))
    cooling = s.cooldown_count > 0
    hit = jnp.logical_and(~cooling, plateau == patience)
    scale = jnp.where(hit, jnp.maximum(s.scale * factor, min_scale), s.scale)
    plateau = jnp.where(jnp.logical_or(cooling, hit), 0, plateau)
    cooldown_count = jnp.where(cooling, s.cooldown_count - 1, jnp.where(hit, cooldown, 0))
    return ReduceLROnPlateauState(
      scale,
      best,
      plateau.astype(jnp.int32),
      cooldown_count.astype(jnp.int32),
      zero_count(),
      jnp.zeros_like(s.avg_value),
    )

  def update(updates, state, params=None, **extra):
    del params
    expect_state(state, ReduceLROnPlateauState, fn)
    if "value" not in extra:
      raise TypeError(f"{fn} needs the monitored value: call update(..., value=loss).")
    check_real_value(fn, "value", extra["value"], "the monitored loss or metric")
    value = sign * jnp.asarray(extra["value"], default_float())
    if value.shape != ():
      raise ValueError(f"{fn}: `value` must be a scalar, got shape {value.shape}.")
    count = safe_increment(state.count)
    # The running mean, in the wider of the mean's and the value's dtypes (the int32
    # counts cast to it).
    n_old, avg_old = otree.promote(state.count, state.avg_value)
    total = jnp.add(*otree.promote(n_old * avg_old, value))
    avg = jnp.divide(*otree.promote(total, count))
    s = state._replace(count=count, avg_value=avg)
    s = jax.tree.map(lambda a, b: jnp.where(count == accumulation_size, a, b), evaluate(s), s)
    updates = jax.tree.map(
      lambda u: jnp.multiply(*otree.promote(s.scale, u)).astype(jnp.result_type(u)), updates
    )
    return updates, s

  return GradientTransformation(init, update)


__all__ = ["ReduceLROnPlateauState", "reduce_on_plateau"]
