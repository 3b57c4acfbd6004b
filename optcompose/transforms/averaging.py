"""Averages of the parameters kept in the optimizer state: EMA and stochastic weight averaging.

Both transformations pass the updates through unchanged. They read ``params`` and average
the parameters *after* the step, ``p_t = params + updates`` (rounded to each parameter's
dtype, as :func:`optcompose.apply_updates` does), so the average tracks exactly the weights
training produces. Place them **last** in the chain, after the learning-rate step: the
updates they see must be the ones that are applied.

An average is taken at the steps ``t = 1, 2, ...`` (the number of updates so far) with
``t >= start_step`` and ``(t - start_step) % every == 0``. With n the number of snapshots
averaged so far (``state.n_averaged``) and ``a`` the stored average (one formula, three
weights)::

    a_n = (1 - w_n) a_{n-1} + w_n p_t
    ema_params, debias=True:    w_n = (1 - decay) / (1 - decay^n)
    ema_params, debias=False:   w_n = 1 - decay
    swa:                        w_n = 1 / n

``a_0`` is a copy of the initial parameters, so the average reads the initial weights
until the first snapshot. With ``debias=True`` the stored ``a_n`` *is* the debiased
average: it equals ``m_n / (1 - decay^n)`` for the zero-initialised EMA
``m_n = decay m_{n-1} + (1 - decay) p_t`` (Optax's ``ema(decay, debias=True)`` applied to the
parameters), since ``1 - w_n = decay (1 - decay^{n-1}) / (1 - decay^n)``. With
``debias=False`` it is the EMA started at the initial weights (the convention of
``optax.incremental_update`` and timm's ``ModelEma``). PyTorch's
``AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay))`` follows neither: its first
update copies the weights after the first step, then it decays (neither setting reproduces
it; the gap is one step's update, shrinking as ``decay^n``). For ``swa`` it is the
equal-weight mean of the snapshots (Izmailov et al., 2018), as PyTorch's default
``AveragedModel``.

Reading the average for evaluation::

    tx = chain(adamw(1e-3), ema_params(0.999))
    ...
    eval_params = averaged_params(state)      # finds the node anywhere in the state tree
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.transforms.statistics import like_params
from optcompose.core import (
  DTYPE,
  FLAG,
  GradientTransformation,
  cond,
  default_float,
  expect_state,
  integer,
  needs_params,
  public,
  real,
  safe_increment,
  zero_count,
)


class EmaParamsState(NamedTuple):
  """State of :func:`ema_params`.

  Attributes:
    count: int32, updates seen (steps taken).
    n_averaged: int32, snapshots in the average.
    average: the (already debiased) exponential moving average of the parameters.
  """

  count: jax.Array
  n_averaged: jax.Array
  average: Any


class SwaState(NamedTuple):
  """State of :func:`swa`: the same fields as :class:`EmaParamsState`, ``average`` being
  the equal-weight mean of the ``n_averaged`` snapshots."""

  count: jax.Array
  n_averaged: jax.Array
  average: Any


_AVERAGE_STATES = {"ema": EmaParamsState, "swa": SwaState}


# ---------------------------------------------------------------------------------------
# Formulas.


def average_leaf(a, p, w):
  """``(1 - w) a + w p`` in the wider of the two dtypes, cast back to ``a``'s dtype.

  At ``w = 1`` (the first snapshot) the result is ``p`` exactly."""
  wide = otree.promote_types(jnp.result_type(a), jnp.result_type(p))
  a_w, p_w = a.astype(wide), jnp.asarray(p).astype(wide)
  w = w.astype(wide)
  return ((1 - w) * a_w + w * p_w).astype(a.dtype)


def ema_weight(decay, n, debias: bool) -> jax.Array:
  """``w_n = (1 - decay) / (1 - decay^n)`` (``debias``) or ``1 - decay``, in float32
  (float64 under x64)."""
  decay = jnp.asarray(decay, default_float())
  if not debias:
    return 1 - decay
  return (1 - decay) / (1 - decay ** jnp.asarray(n, default_float()))


def swa_weight(n) -> jax.Array:
  """``w_n = 1 / n``, in float32 (float64 under x64)."""
  return 1 / jnp.asarray(n, default_float())


def rounded_to(x, dtype):
  """``x`` rounded to ``dtype``, in a way XLA keeps: inside a compiled function XLA drops a
  float32 -> bfloat16 -> float32 round trip, so the rounding is made explicit."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    info = jnp.finfo(dtype)
    x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return jnp.asarray(x).astype(dtype)


def _post_step(params, updates):
  """The parameters training will hold after this step (``apply_updates``' rounding)."""
  return jax.tree.map(
    lambda p, u: rounded_to(jnp.add(*otree.promote(p, u)), jnp.asarray(p).dtype), params, updates
  )


# ---------------------------------------------------------------------------------------
# Transformations.


def _averaging(
  fn: str, state_type, weight, start_step: int, every: int, accumulator_dtype
) -> GradientTransformation:
  """The transformation shared by :func:`ema_params` and :func:`swa`; ``weight(n)``."""
  always = every == 1 and start_step <= 1

  def init(params):
    otree.check_floating(params, "params")
    average = like_params(params, accumulator_dtype, "`accumulator_dtype`", copy=True)
    return state_type(zero_count(), zero_count(), average)

  def update(updates, state, params=None, **extra):
    del extra
    needs_params(params, fn)
    expect_state(state, state_type, fn)
    otree.check_same_structure(updates, params, "updates", "params")
    otree.check_same_structure(updates, state.average, "updates", "state.average")
    count = safe_increment(state.count)
    new_params = _post_step(params, updates)

    def take(_):
      n = safe_increment(state.n_averaged)
      w = weight(n)
      return n, jax.tree.map(lambda a, p: average_leaf(a, p, w), state.average, new_params)

    if always:
      n, average = take(None)
    else:
      due = jnp.logical_and(count >= start_step, (count - start_step) % every == 0)
      n, average = cond(due, take, lambda _: (state.n_averaged, state.average), None)
    return updates, state_type(count, n, average)

  return GradientTransformation(init, update)


_STEPS = dict(start_step=integer(0, draw=(0, 3)), every=integer(1, draw=(1, 3)))


@public(
  "transformation",
  averager=True,
  decay=real(0.0, 1.0, high_open=True, draw=(0.0, 0.999), schedule=False),
  debias=FLAG,
  accumulator_dtype=DTYPE,
  **_STEPS,
)
def ema_params(
  decay: float,
  debias: bool = True,
  start_step: int = 0,
  every: int = 1,
  accumulator_dtype: Optional[Any] = None,
) -> GradientTransformation:
  """Exponential moving average of the parameters after each step, kept in the state.

  Passes the updates through unchanged; place it last in the chain. At each averaged step
  t (see ``start_step`` and ``every``), with n the number of snapshots so far and
  ``p_t = params + updates``::

      m_n = decay * m_{n-1} + (1 - decay) * p_t,    m_0 = 0
      average = m_n / (1 - decay^n)                 (debias=True)

  stored directly in its debiased form (``a_n = (1 - w_n) a_{n-1} + w_n p_t`` with
  ``w_n = (1 - decay) / (1 - decay^n)``; see the module docstring). Debiasing makes a
  warm-up of the decay unnecessary: the first snapshot has weight 1. With
  ``debias=False`` the average starts at the initial parameters:
  ``a_n = decay * a_{n-1} + (1 - decay) * p_t``, ``a_0 = params`` (Polyak averaging of a
  target network, ``optax.incremental_update(p_t, a, 1 - decay)``).

  Read it with :func:`averaged_params`. Not to be confused with :func:`optcompose.ema`
  (Optax's ``ema``), which averages the *updates*.

  Args:
    decay: the EMA decay in [0, 1), a number (e.g. 0.999).
    debias: divide by ``1 - decay^n`` (the default), or start from the initial weights.
    start_step: the first step t (counting updates from 1) whose parameters are averaged.
    every: average every ``every`` steps from ``start_step`` on.
    accumulator_dtype: dtype of the stored average (e.g. ``jnp.float32`` for bfloat16
      parameters, whose 8 significant bits cannot resolve ``(1 - decay) * p``); ``None``
      keeps the parameters' dtype. The blend runs in the wider dtype.

  Returns:
    A transformation that passes the updates through and needs ``params``; its state is
    :class:`EmaParamsState` (``count``, ``n_averaged``, ``average``).

  References:
    Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
    Control and Optimization, 1992; Kingma and Ba, "Adam: A Method for Stochastic
    Optimization", ICLR 2015 (section 7.2, temporal averaging with bias correction).
  """
  fn = "ema_params"
  return _averaging(
    fn, EmaParamsState, lambda n: ema_weight(decay, n, debias), start_step, every, accumulator_dtype
  )


@public("transformation", averager=True, accumulator_dtype=DTYPE, **_STEPS)
def swa(
  start_step: int = 0, every: int = 1, accumulator_dtype: Optional[Any] = None
) -> GradientTransformation:
  """Stochastic weight averaging: the equal-weight mean of the parameters, kept in the state.

  The parameters after the step are averaged every ``every`` steps from step
  ``start_step`` on. Passes the updates through unchanged; place it last in the chain. At
  each averaged step t (steps count updates from 1: averaged when ``t >= start_step`` and
  ``(t - start_step) % every == 0``), with ``p_t = params + updates``::

      n <- n + 1
      a <- a + (p_t - a) / n          (computed as (1 - 1/n) a + (1/n) p_t)

  so ``a`` is the mean of the n snapshots (``state.n_averaged``). With a cyclical
  learning rate of period c, use ``every=c`` and a ``start_step`` at the end of a cycle, as
  in the paper; with a constant learning rate, ``every=1`` (every step) or the number of
  steps per epoch (PyTorch's ``swa_utils`` recipe). ``start_step=0, every=1`` is
  Polyak-Ruppert averaging of all iterates. Read it with :func:`averaged_params`. A model
  with batch normalisation needs its statistics recomputed for the averaged weights (as
  PyTorch's ``update_bn``); that is outside the optimizer.

  Args:
    start_step: the first step t (counting updates from 1) whose parameters are averaged.
    every: average every ``every`` steps from ``start_step`` on.
    accumulator_dtype: dtype of the stored mean (e.g. ``jnp.float32`` for bfloat16
      parameters); ``None``: the parameters' dtype.

  Returns:
    A transformation that passes the updates through and needs ``params``; its state is
    :class:`SwaState` (``count``, ``n_averaged``, ``average``).

  References:
    Izmailov, Podoprikhin, Garipov, Vetrov and Wilson, "Averaging Weights Leads to Wider
    Optima and Better Generalization", UAI 2018; Polyak and Juditsky, "Acceleration of
    stochastic approximation by averaging", SIAM J. Control and Optimization, 1992.
  """
  return _averaging("swa", SwaState, swa_weight, start_step, every, accumulator_dtype)


# ---------------------------------------------------------------------------------------
# Reading the average.


def _is_average_state(node) -> bool:
  return isinstance(node, (EmaParamsState, SwaState))


def average_states(state) -> list:
  """``(path, node)`` for every :func:`ema_params` / :func:`swa` state in a state tree."""
  return [
    ("/".join(path) or "<root>", node) for path, node in otree.find_nodes(state, _is_average_state)
  ]


def averaged_params(state, kind: Optional[str] = None) -> Any:
  """The averaged parameters held by an optimizer state, for evaluation.

  Finds the :func:`ema_params` or :func:`swa` state anywhere in ``state`` (a chain's tuple,
  inside :func:`optcompose.inject_hyperparams`, a scheduled state, a lookahead state, ...)
  and returns its average (already debiased), in the stored dtype. Before the first
  averaged step this is the initial parameters.

  With Flax's ``nnx.Optimizer`` pass ``nnx.as_pure(optimizer.opt_state)``; the result is an
  ``nnx.State`` to load with ``nnx.update(model, ...)``.

  Args:
    state: an optimizer state.
    kind: ``"ema"`` or ``"swa"`` to choose when the state holds both; ``None`` requires
      exactly one averaging node.

  Returns:
    The ``average`` of that :class:`EmaParamsState` or :class:`SwaState`: a tree with the
    parameters' structure.

  Raises:
    ValueError: there is no such node, or more than one and ``kind`` does not decide.

  References:
    Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
    Control and Optimization, 1992; Izmailov et al., "Averaging Weights Leads to Wider
    Optima and Better Generalization", UAI 2018.
  """
  if kind is not None and kind not in _AVERAGE_STATES:
    raise ValueError(f"averaged_params: `kind` must be 'ema', 'swa' or None, got {kind!r}.")
  found = [
    (p, s) for p, s in average_states(state) if kind is None or isinstance(s, _AVERAGE_STATES[kind])
  ]
  if not found:
    what = {None: "an ema_params or swa", "ema": "an ema_params", "swa": "a swa"}[kind]
    raise ValueError(
      f"averaged_params: the state holds no {what} state; add "
      "ema_params(...) or swa(...) last in the chain."
    )
  if len(found) > 1:
    where = ", ".join(f"{type(s).__name__} at {p}" for p, s in found)
    raise ValueError(
      f"averaged_params: the state holds {len(found)} averages ({where}); "
      "pass kind='ema' or kind='swa', or index the state."
    )
  return found[0][1].average


__all__ = ["EmaParamsState", "SwaState", "averaged_params"]  # and the builders it registers
