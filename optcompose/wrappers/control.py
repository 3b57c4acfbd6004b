"""Training control wrappers: gradient accumulation (and the conditional step it shares).

``multi_steps(inner, k)``: accumulate the mean of ``k`` micro-batch gradients and let
``inner`` take one real step with it::

    acc_{j+1} = acc_j + (g_j - acc_j) / (j + 1)          (running mean, Welford)
    on micro-step k:  u, inner_state = inner.update(acc_k, inner_state, params); acc = 0
    otherwise:        u = 0, inner_state unchanged

The inner optimizer (its count, schedules, decay, clipping, moments) advances only on real
steps, and its update runs only on real steps (``lax.cond``), so the extra cost is one
gradient buffer. ``k`` may be a schedule of the number of real steps taken.
``should_skip_update_fn(g, gradient_step, params) -> (skip, skip_state)`` (Optax's
protocol; :func:`skip_not_finite`, :func:`skip_large_updates`) rejects a micro-step: as in
Optax, a rejected micro-step changes nothing (no accumulation, no count, zero updates) but
``state.skip_state``, which records what the function returned.

``apply_if_finite`` (skipping non-finite steps) is in :mod:`optcompose.wrappers.finite`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.transforms.statistics import like_params
from optcompose.wrappers.branching import update_if
from optcompose.core.base import is_float0
from optcompose.core import (
  DTYPE,
  FLAG,
  INNER,
  INT32_MAX,
  GradientTransformation,
  Hyper,
  apply_updates,
  as_transformation,
  cond,
  expect_state,
  ordered_after,
  public,
  safe_increment,
  step,
  with_step,
  zero_count,
)
from optcompose.wrappers.skips import ShouldSkipUpdateFunction, _skip_decision, skip_not_finite


class MultiStepsState(NamedTuple):
  """Optax's field names."""

  mini_step: jax.Array  # micro-steps accumulated since the last real step
  gradient_step: jax.Array  # real steps taken
  inner_opt_state: Any
  acc_grads: Any
  skip_state: Any = ()


def check_whole(who: str, name: str, value: Any) -> None:
  """Raise a ValueError naming ``who``'s ``name`` when a known number of steps is not a
  whole number (a live value under inject_hyperparams is a float array: whole?)."""
  if not callable(value) and not isinstance(value, jax.core.Tracer) and float(value) != int(value):
    raise ValueError(f"{who}: `{name}` must be a whole number of steps, got {value!r}.")


@public(
  "wrapper",
  inner=INNER,
  every_k_schedule=Hyper(("int", 1, 3), 1, INT32_MAX, numeric=True, schedule=True, whole=True),
  use_grad_mean=FLAG,
  accumulator_dtype=DTYPE,
  should_skip_update_fn=Hyper(("choice", (None, skip_not_finite)), optional=True),
)
def multi_steps(
  inner,
  every_k_schedule: Union[int, Callable],
  use_grad_mean: bool = True,
  accumulator_dtype=jnp.float32,
  should_skip_update_fn: Optional[ShouldSkipUpdateFunction] = None,
) -> GradientTransformation:
  """Gradient accumulation over ``every_k_schedule`` micro-steps (see the module docstring).

  Update, at micro-step j = 0, 1, ... of a real step (``acc_0 = 0``)::

      acc_{j+1} = acc_j + (g_j - acc_j) / (j + 1)     (use_grad_mean; else acc_j + g_j)
      j + 1 = k:  u, inner_state = inner.update(acc_k, inner_state, params); acc = 0
      otherwise:  u = 0, inner_state unchanged (inner's update does not run)
      skip, skip_state = should_skip_update_fn(g_j, gradient_step, params)
      skip:       u = 0, and nothing but skip_state changes (j, acc, counts, inner_state)

  Args:
    inner: the optimizer that takes the real steps (optcompose's or Optax's).
    every_k_schedule: k >= 1, or a schedule of the number of real steps taken, returning
      an integer (a Python int or an integer array: a floating k would be truncated).
    use_grad_mean: apply the mean of the micro-gradients (else their sum).
    accumulator_dtype: dtype of the accumulation buffer (float32 by default, whatever the
      gradients' dtype; ``None``: the parameters'); ``inner`` receives the accumulated
      value in the gradients' dtype.
    should_skip_update_fn: ``None``, or a :class:`ShouldSkipUpdateFunction` (e.g.
      :func:`skip_not_finite`) deciding whether to reject each micro-step; what it returns
      besides is stored in ``state.skip_state`` (at ``init``: what it returns for zero
      updates at step 0).

  Returns:
    A transformation with state :class:`MultiStepsState` (Optax's fields).

  Raises:
    ValueError: a constant ``every_k_schedule`` that is not a whole number >= 1, or a
      schedule whose step-0 value (known at ``init``) is below 1 or not a scalar.
    TypeError: a schedule returning a non-integer dtype (float, bool), found at ``init``
      or while tracing ``update``; ``accumulator_dtype`` not a floating-point dtype;
      ``should_skip_update_fn`` not callable.

  References:
    Optax's ``optax.MultiSteps``; gradient accumulation as in Goyal et al., "Accurate,
    Large Minibatch SGD: Training ImageNet in 1 Hour", arXiv:1706.02677, 2017.
  """
  init, update, step = _parts(
    inner, every_k_schedule, use_grad_mean, accumulator_dtype, should_skip_update_fn
  )
  return GradientTransformation(init, with_step(update, step))  # optcompose.step uses it


def _parts(inner, every_k_schedule, use_grad_mean, accumulator_dtype, should_skip_update_fn):
  """``multi_steps``' init and update, and the whole training step (``MultiSteps.step``):
  one decision and one accumulation formula for both."""
  inner = as_transformation(inner, "multi_steps")
  check_whole("multi_steps", "every_k_schedule", every_k_schedule)
  if should_skip_update_fn is not None and not callable(should_skip_update_fn):
    raise TypeError(
      f"multi_steps: `should_skip_update_fn` must be a function (updates, "
      f"gradient_step, params) -> (skip, skip_state), got "
      f"{type(should_skip_update_fn).__name__}."
    )
  skips = should_skip_update_fn is not None

  def k_of(step):
    """k at real step ``step``: a schedule's value is checked while tracing (its dtype and
    shape are known then), so a floating k is never silently truncated."""
    if not callable(every_k_schedule):
      return every_k_schedule  # checked above (or a live value, whole by construction)
    k = every_k_schedule(step)
    dtype = jnp.result_type(k)
    if not jnp.issubdtype(dtype, jnp.integer):
      raise TypeError(
        f"multi_steps: `every_k_schedule` must return an integer number of "
        f"micro-steps (a Python int or an integer array), got dtype {dtype}: "
        "it would be truncated. Round it yourself, e.g. "
        "jnp.round(k).astype(jnp.int32)."
      )
    if jnp.shape(k) != ():
      raise ValueError(
        f"multi_steps: `every_k_schedule` must return a scalar, got shape {jnp.shape(k)}."
      )
    return k

  def init(params):  # integer and boolean leaves: as inner takes them (masked out, say)
    k0 = k_of(zero_count())
    if callable(every_k_schedule) and not isinstance(k0, jax.core.Tracer) and int(k0) < 1:
      raise ValueError(f"multi_steps: `every_k_schedule` must be >= 1, got {int(k0)} at step 0.")
    skip_state = (
      _skip_decision(
        should_skip_update_fn, "multi_steps", otree.zeros_like(params), zero_count(), params
      )[1]
      if skips
      else ()
    )
    return MultiStepsState(
      zero_count(),
      zero_count(),
      inner.init(params),
      like_params(params, accumulator_dtype, "multi_steps: `accumulator_dtype`"),
      skip_state,
    )

  def decide(updates, state, params):
    """(skip_state, accumulate, emit, skip) for this call; ``skip`` None without a
    ``should_skip_update_fn``."""
    expect_state(state, MultiStepsState, "multi_steps")
    otree.check_same_structure(updates, state.acc_grads, "updates", "state.acc_grads")
    n = state.mini_step
    skip, skip_state = None, state.skip_state  # skip: an array when skips
    if skips:
      skip, skip_state = _skip_decision(
        should_skip_update_fn, "multi_steps", updates, state.gradient_step, params
      )
      otree.check_same_structure(
        skip_state,
        state.skip_state,
        "the skip_state should_skip_update_fn returned",
        "state.skip_state",
      )
    # Each operation in the wider of its operands' dtypes (the accumulator's and the
    # gradients'; the int32 j + 1 cast to it).
    accumulate = lambda g, a: a if is_float0(g) else _accumulated(use_grad_mean, g, a, n)
    k = jnp.asarray(k_of(state.gradient_step), jnp.int32)
    # At or past the k-th micro-step: a state saved with a larger k (a resumed run, or k
    # lowered live) steps at its next call instead of never.
    emit = n >= k - 1
    if skip is not None:
      emit = jnp.logical_and(emit, jnp.logical_not(skip))
    return skip_state, accumulate, emit, skip

  def next_state(state, inner_state, acc, emit, skip, skip_state):
    """The counters after this call; a rejected micro-step changes nothing but
    skip_state."""
    n = state.mini_step
    mini_step = jnp.where(emit, 0, safe_increment(n))
    if skip is not None:
      mini_step = jnp.where(skip, n, mini_step)
    return MultiStepsState(
      mini_step=mini_step,
      gradient_step=jnp.where(emit, safe_increment(state.gradient_step), state.gradient_step),
      inner_opt_state=inner_state,
      acc_grads=acc,
      skip_state=skip_state,
    )

  def update(updates, state, params=None, **extra):
    skip_state, accumulate, emit, skip = decide(updates, state, params)
    # The real step accumulates inside its branch; the accumulator is written after it.
    new_updates, inner_state, done = update_if(
      emit,
      inner,
      updates,
      state.inner_opt_state,
      params,
      extra,
      prepare=lambda g: _given(accumulate, g, state.acc_grads),
      token=True,
    )
    acc = next_acc(updates, state.acc_grads, accumulate, done, emit, skip)
    return new_updates, next_state(state, inner_state, acc, emit, skip, skip_state)

  def next_acc(updates, acc, accumulate, done, emit, skip):
    """The accumulator after this call, written in place after the conditional that read
    it (``done``, its token): as a conditional's operand or output XLA CPU copied it at every
    call (multi_steps(adamw, 4): 2.9x AdamW per call, 2.0x so)."""
    new = jax.tree.map(accumulate, *ordered_after((updates, acc), done))
    new = jax.tree.map(
      lambda a, old: jnp.where(emit, jnp.zeros_like(a), a).astype(old.dtype), new, acc
    )  # the dtype chosen at init
    if skip is not None:  # a rejected micro-step changes nothing but skip_state
      new = jax.tree.map(lambda a, old: jnp.where(skip, old, a), new, acc)
    return new

  def step(grads, state, params, **extra):
    if params is None:
      raise ValueError("MultiSteps.step: `params` is required (the step updates them).")
    otree.check_same_structure(grads, params, "grads", "params")
    skip_state, accumulate, emit, skip = decide(grads, state, params)

    def real(operands):  # the inner step on the accumulated gradients, applied
      g, inner_state, p, acc = operands
      given = _given(accumulate, g, acc)
      u, inner_state = inner.update(given, inner_state, p, **extra)
      return apply_updates(p, u), inner_state, jnp.float32(1)

    def hold(operands):  # the parameters and the inner state as they are
      if not isinstance(emit, jax.core.Tracer):  # eagerly: the inner step's errors at once
        jax.eval_shape(real, operands)  # (under jit, lax.cond traces real anyway)
      return operands[2], operands[1], jnp.float32(0)

    params, inner_state, done = cond(
      emit, real, hold, (grads, state.inner_opt_state, params, state.acc_grads)
    )  # (emit is False on a rejected micro-step)
    acc = next_acc(grads, state.acc_grads, accumulate, done, emit, skip)
    return params, next_state(state, inner_state, acc, emit, skip, skip_state)

  return init, update, step


def _accumulated(use_grad_mean: bool, g, a, n):
  """The accumulator ``a`` after the ``n``-th micro-gradient ``g`` (from 0): the running mean
  (Welford), or the sum. Each operation in the wider of its operands' dtypes (the
  accumulator's and the gradients'; the int32 ``n + 1`` cast to it)."""
  if not use_grad_mean:
    return jnp.add(*otree.promote(g, a))
  step = jnp.divide(*otree.promote(jnp.subtract(*otree.promote(g, a)), n + 1))
  return jnp.add(*otree.promote(a, step))


def _given(accumulate, grads, acc):
  """The accumulated gradients in their dtypes (a float0 one as it came), for inner."""
  return jax.tree.map(
    lambda g, a: g if is_float0(g) else jnp.asarray(accumulate(g, a)).astype(g.dtype), grads, acc
  )


class MultiSteps:
  """Optax's ``MultiSteps`` interface over :func:`multi_steps`, with :meth:`step`, the
  whole training call.

  Args:
    opt: the optimizer that takes the real steps (optcompose's or Optax's).
    every_k_schedule: k >= 1 micro-steps per real step, or a schedule of the real steps
      taken returning an integer.
    use_grad_mean: apply the mean of the micro-gradients (else their sum).
    should_skip_update_fn: ``None``, or a function rejecting micro-steps (e.g.
      :func:`optcompose.skip_not_finite`). Optax's order: before ``accumulator_dtype``
      here, after it in :func:`multi_steps`.
    accumulator_dtype: dtype of the accumulation buffer (float32 by default).
  """

  def __init__(
    self,
    opt,
    every_k_schedule,
    use_grad_mean: bool = True,
    should_skip_update_fn: Optional[ShouldSkipUpdateFunction] = None,
    accumulator_dtype=jnp.float32,
  ):
    self._tx = multi_steps(
      opt, every_k_schedule, use_grad_mean, accumulator_dtype, should_skip_update_fn
    )
    self.inner_opt = opt
    # A subclass's init and update are its own (EasyLM accumulates in bfloat16 so); else
    # the transformation's, which carry the whole training call (optcompose.step).
    for name in ("init", "update"):
      if getattr(type(self), name) is getattr(MultiSteps, name):
        setattr(self, name, getattr(self._tx, name))
    # Optax's private attributes, which subclasses written for Optax's MultiSteps read.
    self._opt = as_transformation(opt, "MultiSteps")
    k = every_k_schedule
    self._every_k_schedule = k if callable(k) else (lambda step: k)
    self._use_grad_mean, self._accumulator_dtype = use_grad_mean, accumulator_dtype
    self._acc_update = lambda grad, acc, *, n_acc: _accumulated(use_grad_mean, grad, acc, n_acc)
    self._should_skip_update_fn = should_skip_update_fn or _never_skip

  def init(self, params) -> Any:
    """The state: :func:`multi_steps`' ``init``."""
    return self._tx.init(params)

  def update(self, updates, state: MultiStepsState, params=None, **extra) -> tuple:
    """``(updates, state)``: :func:`multi_steps`' ``update``."""
    return self._tx.update(updates, state, params, **extra)

  def step(self, grads, opt_state: MultiStepsState, params, **extra) -> tuple:
    """One whole training call: ``(params, opt_state)``, the parameters updated on a real
    step and returned as they are, bit for bit, on a micro-step. The same state and the
    same result as ``update`` followed by ``apply_updates`` (except that adding a micro-step's
    zero update turns -0.0 into 0.0, and on XLA CPU flushes subnormal parameters to zero;
    here nothing is added), at a lower cost: the parameters' update runs
    inside the conditional, so a micro-step reads the gradients and the accumulator and
    writes the accumulator (12 B per float32 parameter), and writes no zero update. A
    transformation must return its updates, zeros on a micro-step, and on XLA CPU a
    conditional that returns AdamW's updates costs about 1.4x AdamW.

    Args:
      grads: this micro-batch's gradients.
      opt_state: the state from ``init`` (or from ``update``: the two are interchangeable).
      params: the parameters (donate them under ``jax.jit``: a real step updates them in
        place).
      **extra: passed on to the inner ``update`` on a real step.

    Returns:
      ``(params, opt_state)``. ``has_updated(opt_state)`` is True after a real step (and, as
      in Optax, still True after a micro-step rejected by ``should_skip_update_fn`` right
      after one: ``opt_state.gradient_step`` counts the real steps).
    """
    return step(self.gradient_transformation(), grads, opt_state, params, **extra)

  def has_updated(self, state: MultiStepsState) -> jax.Array:
    """Whether the latest call took a real step."""
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)

  def gradient_transformation(self) -> GradientTransformation:
    """``init`` and ``update`` as a transformation (a subclass's own, where it has them)."""
    return GradientTransformation(self.init, self.update)


def _never_skip(updates, gradient_step, params):
  """Optax's ``MultiSteps._should_skip_update_fn`` when none is given."""
  del updates, gradient_step, params
  return jnp.array(False, dtype=jnp.bool_), ()


__all__ = ["MultiSteps", "MultiStepsState"]  # and the builders it registers
