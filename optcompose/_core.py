"""The optcompose contract.

A *gradient transformation* is a pair of pure functions, held in a NamedTuple whose field
names are Optax's::

    init(params) -> state
    update(updates, state, params=None, **extra) -> (new_updates, new_state)

* ``state`` is a pytree of arrays (usually a NamedTuple). Everything that changes while
  training -- moments, step counts -- lives there, so a run resumed from a saved state
  continues exactly.
* ``update`` maps the incoming direction (the gradient, or what earlier transformations
  made of it) to an outgoing one. It may read ``params``; it never writes them.
* ``**extra`` carries keyword arguments such as a loss value. Every optcompose
  transformation accepts and ignores the ones it does not use.
* A transformation object holds functions only, never JAX arrays: Flax's ``nnx.Optimizer``
  keeps it as a static attribute.
* Nothing records the tree structure at ``init`` to compare it at ``update``: ``nnx.Optimizer``
  passes ``nnx.Param`` nodes to ``init`` and bare arrays to ``update``. Transformations
  compare ``updates`` with their *state* instead.

Composition::

    chain(t1, t2, ...)            # state is the tuple of the members' states, nothing else
    apply_updates(params, updates) -> params   # p + u, keeping each parameter's dtype

Hyperparameters are numbers or *schedules*: ``Schedule = Callable[[count], scalar]``, a pure
function of the int32 step count. ``with_schedules`` (below) gives every transformation that
support in one place: when any hyperparameter is a schedule, the state gains a step count
and the transformation is rebuilt at each step from the scheduled values.

Inside :func:`chain`, members that ask for it (their ``update`` carries the attribute
``wants_raw_grads``) also receive the chain's own input as ``raw_grads=...``. A
preconditioner placed after a momentum step can then build its statistic from the gradient
while scaling the momentum direction; see :func:`optcompose.scale_by_second_moment`. Each
chain hands down *its own* input, so a chain of such pieces nested after clipping sees the
clipped gradient. Other members, Optax's included, never see ``raw_grads``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree

PyTree = Any
Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[jax.Array], Any]
ScalarOrSchedule = Union[float, int, jax.Array, Schedule]

RAW_GRADS = "raw_grads"  # keyword under which chain hands opting-in members its input


def wants_raw_grads(update: Callable) -> Callable:
  """Mark an ``update`` function as one that reads ``raw_grads`` (see :func:`chain`)."""
  update.wants_raw_grads = True
  return update


def forward_extra(update: Callable, extra: dict) -> dict:
  """The keyword arguments to hand ``update``: ``raw_grads`` only if it asks for it."""
  if RAW_GRADS in extra and not getattr(update, "wants_raw_grads", False):
    return {k: v for k, v in extra.items() if k != RAW_GRADS}
  return extra


class GradientTransformation(NamedTuple):
  """A pair of pure functions ``(init, update)``; see the module docstring."""

  init: Callable[[Params], OptState]
  update: Callable[..., tuple[Updates, OptState]]


class EmptyState(NamedTuple):
  """The state of a stateless transformation."""


def init_empty_state(params: Params) -> EmptyState:
  del params
  return EmptyState()


def identity() -> GradientTransformation:
  """Pass the updates through unchanged."""

  def update(updates, state, params=None, **extra):
    del params, extra
    return updates, state

  return GradientTransformation(init_empty_state, update)


def _takes_extra(fn: Callable) -> bool:
  """Whether ``fn`` accepts arbitrary keyword arguments (Optax's ExtraArgs protocol)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _as_transformation(t: Any, position: int) -> GradientTransformation:
  if isinstance(t, GradientTransformation):
    return t
  init, update = getattr(t, "init", None), getattr(t, "update", None)
  if not (callable(init) and callable(update)):
    raise TypeError(
        f"chain: argument {position} is {type(t).__name__}, not a gradient "
        "transformation (an object with callable `init` and `update`)."
    )
  if _takes_extra(update):
    return GradientTransformation(init, update)

  def update_without_extra(updates, state, params=None, **extra):
    del extra  # a plain Optax transformation takes no keyword arguments
    return update(updates, state, params)

  return GradientTransformation(init, update_without_extra)


def chain(*transformations: Any) -> GradientTransformation:
  """Apply transformations one after the other; the state is the tuple of their states.

  Members may be optcompose or Optax transformations (anything with ``init``/``update``).
  Keyword arguments given to ``update`` reach every member that accepts them; members that
  ask for it (see :func:`wants_raw_grads`) also get ``raw_grads``, this chain's input.
  """
  members = tuple(_as_transformation(t, i) for i, t in enumerate(transformations))

  def init(params):
    return tuple(t.init(params) for t in members)

  def update(updates, state, params=None, **extra):
    if not isinstance(state, (tuple, list)) or len(state) != len(members):
      got = f"a {type(state).__name__} of length {len(state)}" if isinstance(
          state, (tuple, list)) else type(state).__name__
      raise ValueError(
          f"chain of {len(members)} transformations got state {got}; pass the state "
          "returned by this chain's init."
      )
    extra = {**extra, RAW_GRADS: updates}
    new_state = []
    for t, s in zip(members, state):
      updates, s = t.update(updates, s, params, **forward_extra(t.update, extra))
      new_state.append(s)
    return updates, tuple(new_state)

  return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
  """Return ``params + updates``, each result cast back to its parameter's dtype."""
  otree.check_same_structure(updates, params, "updates", "params")
  otree.check_floating(params, "params")
  return jax.tree.map(
      lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype), params, updates
  )


# ----------------------------------------------------------------------------------------
# Hyperparameters: validation and schedules.


_SKIP_CHECKS = contextvars.ContextVar("optcompose_skip_checks", default=False)


@contextlib.contextmanager
def checks_done():
  """Within this block, hyperparameter checks are skipped: values rebuilt at every step
  (schedules, live hyperparameters) were checked once, at ``init``."""
  token = _SKIP_CHECKS.set(True)
  try:
    yield
  finally:
    _SKIP_CHECKS.reset(token)


def _concrete_scalar(value: Any) -> Optional[float]:
  """The value as a float when it is a known number; None for tracers and schedules."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    raise TypeError("expected a number, got a bool")
  if isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array)):
    if jnp.shape(value) != ():
      raise ValueError(f"expected a scalar, got an array of shape {jnp.shape(value)}")
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"expected a real number, got dtype {dtype}")
    return float(value)
  raise TypeError(f"expected a number or a schedule, got {type(value).__name__}")


def check_hyperparameter(
    fn_name: str,
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
  """Raise a ValueError naming ``fn_name(name=...)`` if a known ``value`` is out of range.

  Schedules and traced values are checked when they become numbers: a scheduled value is
  checked at step 0 by ``init``; later values of a schedule are not checked (that would
  cost a device-to-host copy per step, and cannot be done inside ``jax.jit``).
  """
  if _SKIP_CHECKS.get():
    return
  try:
    x = _concrete_scalar(value)
  except (TypeError, ValueError) as e:
    raise type(e)(f"{fn_name}: `{name}` {e}") from None
  if x is None:
    return
  if not np.isfinite(x):
    raise ValueError(f"{fn_name}: `{name}` must be finite, got {x!r}.")
  too_low = low is not None and (x <= low if low_open else x < low)
  too_high = high is not None and (x >= high if high_open else x > high)
  if too_low or too_high:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    raise ValueError(f"{fn_name}: `{name}` must lie in {interval}, got {x!r}.")


def value_at(hyperparameter: ScalarOrSchedule, count: jax.Array) -> Any:
  """A hyperparameter's value at step ``count``: calls it if it is a schedule."""
  return hyperparameter(count) if callable(hyperparameter) else hyperparameter


def safe_increment(count: jax.Array) -> jax.Array:
  """``count + 1``, saturating at the largest value of the count's dtype (no wrap-around)."""
  count = jnp.asarray(count)
  top = jnp.iinfo(count.dtype).max if jnp.issubdtype(count.dtype, jnp.integer) else jnp.finfo(count.dtype).max
  top = jnp.asarray(top, count.dtype)
  return jnp.where(count < top, count + jnp.asarray(1, count.dtype), top)


def cond(pred, if_true: Callable, if_false: Callable, operand):
  """``lax.cond``, or a plain Python branch when ``pred`` is a known value: eagerly, a
  ``lax.cond`` of fresh closures would compile both branches at every call."""
  if not isinstance(pred, jax.core.Tracer):
    return (if_true if bool(pred) else if_false)(operand)
  return jax.lax.cond(pred, if_true, if_false, operand)


def zero_count() -> jax.Array:
  return jnp.zeros([], jnp.int32)


class ScheduledState(NamedTuple):
  """State of a transformation built from scheduled hyperparameters."""

  count: jax.Array  # int32 step count, read by the schedules
  hyperparams: dict  # the scheduled values used by the latest update (at init: step 0's)
  inner: OptState  # the state of the transformation built from those values


def default_float():
  """JAX's default float dtype: float32, or float64 when x64 is enabled. Hyperparameters,
  schedule values and step-derived factors are computed and stored in it, whatever the
  parameters' dtype (bfloat16 params keep float32 hyperparameters; a float64 run is float64
  throughout)."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def as_hyperparam(value, dtype=None) -> jax.Array:
  """A hyperparameter value as a scalar array of a floating dtype (``default_float()``:
  float32, float64 under x64)."""
  return jnp.asarray(value, dtype=dtype or default_float())


def with_schedules(*names: str):
  """Decorator: let the hyperparameters ``names`` of a transformation builder be schedules.

  The decorated builder is written for plain numbers. When every named argument is a
  number, it is called as is (its state is exactly its own). When any is a schedule, the
  result keeps ``ScheduledState(count, inner)``: ``init`` builds the transformation from the
  values at step 0 (so they are validated like numbers), and each ``update`` builds it from
  the values at the current count, then advances the count. One mechanism serves every
  hyperparameter of every transformation.
  """

  def decorate(builder):
    signature = inspect.signature(builder)
    missing = [n for n in names if n not in signature.parameters]
    if missing:
      raise TypeError(f"{builder.__name__} has no parameters {missing}")

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      scheduled = [n for n in names if callable(bound.arguments[n])]
      if not scheduled:
        return builder(*bound.args, **bound.kwargs)

      def build(count):
        values = {n: bound.arguments[n](count) for n in scheduled}
        b = signature.bind(**{**bound.arguments, **values})
        return builder(*b.args, **b.kwargs), {n: as_hyperparam(v) for n, v in values.items()}

      def init(params):
        count = zero_count()
        tx, values = build(count)
        return ScheduledState(count, values, tx.init(params))

      @wants_raw_grads  # forwarded only if the built transformation asks for it
      def update(updates, state, params=None, **extra):
        if not isinstance(state, ScheduledState):
          raise TypeError(
              f"{builder.__name__} with scheduled {scheduled} expects a ScheduledState, "
              f"got {type(state).__name__}."
          )
        with checks_done():
          tx, values = build(state.count)
        updates, inner = tx.update(updates, state.inner, params, **forward_extra(tx.update, extra))
        return updates, ScheduledState(safe_increment(state.count), values, inner)

      return GradientTransformation(init, update)

    wrapper.schedulable = names
    return wrapper

  return decorate
