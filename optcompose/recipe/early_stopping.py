"""Early stopping: watch a validation metric, keep the best parameters, decide when to stop.

``early_stopping(...)`` returns a static configuration (it holds Python numbers only, is
hashable, and can be a static argument of ``jax.jit``) with two pure functions::

    es = early_stopping(mode="min", patience=5, min_delta=1e-3)
    state = es.init(params)                       # EarlyStoppingState, a NamedTuple of arrays
    state = es.update(state, val_loss, params)    # jittable, also inside lax.scan
    if state.should_stop:                         # a 0-d bool array: works in a Python `if`
      break
    params = state.best_params                    # restore the best checkpoint, not the last

Each ``update`` is one *epoch* (one evaluation of the metric). Epochs are numbered from 0
in the order of the updates, so ``state.best_epoch`` indexes the recorded curve:
``curve[state.best_epoch] == state.best_metric``. Writing ``s = +1`` for ``mode="min"`` and
``s = -1`` for ``"max"``, ``v = s * metric`` and ``b = s * best_metric``, an epoch *improves*
when::

    v is finite  and  v < b - delta,     delta = min_delta            (relative=False)
                                         delta = min_delta * |b|      (relative=True)

and then ``best_metric``, ``best_epoch`` and ``best_params`` take this epoch's values. The
comparison is strict, so a change of exactly ``min_delta`` is not an improvement. Before the
first improvement ``b`` is ``s * baseline`` when a baseline is given (the metric has to beat
it, by ``delta``, before anything counts), and ``+inf`` otherwise (the first finite metric
improves). A NaN or infinite metric never improves: it counts as an epoch without
improvement. Then::

    wait        = 0 if improved else wait + 1
    should_stop = wait > patience

so ``patience`` is the number of non-improving epochs in a row that are tolerated, and
``patience=0`` stops at the first epoch that does not improve. (Flax's ``early_stopping``
counts the same way; core PyTorch has none. Keras, and Goodfellow et al.'s Algorithm 7.1,
stop at ``wait >= patience``, one epoch sooner: their ``patience=p`` is ours ``p - 1`` for
``p >= 1``.)

``warmup=N``: the first ``N`` epochs (0 to N - 1) are ignored entirely: they are never
improvements, are not counted in ``wait``, do not touch the best metric or parameters, and
cannot stop training; only ``epoch`` advances. Epoch ``N`` is the first one compared.

Once ``should_stop`` is set it stays set, and later updates change nothing but ``epoch``
(the best values are frozen at the decision). A ``lax.scan`` over a whole recorded curve
therefore ends in the same state as a Python loop that breaks at the decision.

The metric is compared, and stored, in JAX's default float dtype: float32, or float64 when
x64 is enabled (``jax.config.update("jax_enable_x64", True)``). Any real metric (an int, a
float16 or float64 array) is first converted to it, so without x64 a change below float32's
resolution (1.0, then 1.0 - 1e-9) is no improvement; with x64 it is. ``best_params`` may be any
pytree (or ``None`` to keep nothing); ``init`` copies its leaves, so donating the
parameters to a jitted step does not invalidate the kept copy. The state is a NamedTuple of
arrays, so ``flax.serialization`` and Orbax save and restore it like any optimizer state.

Flax's ``EarlyStopping`` only minimizes, keeps no best parameters and is a Python object
updated outside ``jit``; Keras's callback runs on the host. This one does all of it in a
pure function.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import check_hyperparameter, default_float, safe_increment, zero_count


class EarlyStoppingState(NamedTuple):
  """State of :func:`early_stopping` (all arrays; see the module docstring).

  Attributes:
    epoch: int32, updates seen so far (warm-up epochs included).
    best_metric: JAX's default float (float32; float64 under x64), the best metric so far;
      the baseline (or +inf for "min", -inf for "max") before the first improvement.
    best_epoch: int32, the epoch of ``best_metric``; -1 before the first improvement.
    wait: int32, epochs in a row without improvement (warm-up epochs not counted).
    should_stop: bool, training should stop (stays True once set).
    improved: bool, the latest update was an improvement.
    best_params: the pytree given to ``update`` at ``best_epoch`` (the one given to ``init``
      before the first improvement).
  """

  epoch: jax.Array
  best_metric: jax.Array
  best_epoch: jax.Array
  wait: jax.Array
  should_stop: jax.Array
  improved: jax.Array
  best_params: Any


_FN = "early_stopping"


def _static_number(name: str, value: Any, *, integer: bool, low: Optional[float]) -> Any:
  """``value`` as a Python int/float after checking it; the configuration holds no arrays."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{_FN}: `{name}` must be a number known when the configuration is built "
      f"(not a schedule or a traced value), got {type(value).__name__}."
    )
  if integer and (isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer))):
    raise TypeError(f"{_FN}: `{name}` must be a Python int, got {value!r}.")
  check_hyperparameter(_FN, name, value, low=low)
  return int(value) if integer else float(value)


def _real_metric(metric: Any) -> jax.Array:
  """``metric`` as a 0-d array of JAX's default float dtype, after checking (by type and
  dtype only, so while tracing) that it is a real scalar.

  Raises:
    TypeError: ``metric`` is not a real number (a str, None, bool, complex...).
    ValueError: ``metric`` is not a scalar, or an int too large for a float.
  """
  if metric is None or isinstance(metric, (str, bytes, bool, np.bool_)):
    raise TypeError(f"{_FN}: `metric` must be a real number, got {type(metric).__name__}.")
  if isinstance(metric, numbers.Real) and not hasattr(metric, "dtype"):  # a Python number
    try:
      return jnp.asarray(float(metric), default_float())  # 2**40: not through int32
    except OverflowError:
      raise ValueError(f"{_FN}: `metric` {metric} is too large for a float.") from None
  try:
    dtype = jnp.result_type(metric)
  except TypeError:
    raise TypeError(
      f"{_FN}: `metric` must be a real number, got {type(metric).__name__}."
    ) from None
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"{_FN}: `metric` must be a real number, got dtype {dtype}.")
  metric = jnp.asarray(metric)
  if metric.shape != ():
    raise ValueError(f"{_FN}: `metric` must be a scalar, got shape {metric.shape}.")
  return metric.astype(default_float())


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """The static configuration of early stopping; build it with :func:`early_stopping`.

  It holds Python values only and is hashable, so it can be closed over, passed as a static
  argument of ``jax.jit``, or kept as a static attribute of a Flax module.
  """

  mode: str = "min"
  patience: int = 5
  min_delta: float = 0.0
  relative: bool = False
  baseline: Optional[float] = None
  warmup: int = 0

  def __post_init__(self):
    if self.mode not in ("min", "max"):
      raise ValueError(f"{_FN}: `mode` must be 'min' or 'max', got {self.mode!r}.")
    if not isinstance(self.relative, (bool, np.bool_)):
      raise TypeError(f"{_FN}: `relative` must be a bool, got {self.relative!r}.")

    def fix(name, value):  # store the checked Python value (the dataclass is frozen)
      object.__setattr__(self, name, value)

    fix("relative", bool(self.relative))
    fix("patience", _static_number("patience", self.patience, integer=True, low=0))
    fix("warmup", _static_number("warmup", self.warmup, integer=True, low=0))
    fix("min_delta", _static_number("min_delta", self.min_delta, integer=False, low=0.0))
    if self.baseline is not None:
      fix("baseline", _static_number("baseline", self.baseline, integer=False, low=None))

  @property
  def sign(self) -> float:
    """+1 for "min", -1 for "max": ``sign * metric`` is to be minimized."""
    return 1.0 if self.mode == "min" else -1.0

  def init(self, best_params: Any = None) -> EarlyStoppingState:
    """A fresh state; ``best_params`` (any pytree, or None) is copied as the initial best."""
    unseen = self.sign * jnp.inf if self.baseline is None else self.baseline
    # One buffer per leaf, none the caller's: a jitted step donating the state (passing it
    # through between epochs) is refused a buffer given twice, and would delete the caller's.
    no = functools.partial(jnp.zeros, [], jnp.bool_)
    return EarlyStoppingState(
      epoch=zero_count(),
      best_metric=jnp.array(unseen, default_float(), copy=True),
      best_epoch=jnp.full([], -1, jnp.int32),
      wait=zero_count(),
      should_stop=no(),
      improved=no(),
      best_params=jax.tree.map(jnp.array, best_params),  # a copy (see the module docstring)
    )

  def is_improvement(self, metric: jax.Array, best_metric: jax.Array) -> jax.Array:
    """Whether ``metric`` improves on ``best_metric`` (the formula of the module docstring)."""
    v, b = self.sign * metric, self.sign * best_metric
    finite = jnp.where(jnp.isfinite(b), b, 0)  # b = +inf: nothing seen yet (never inf - inf)
    delta = self.min_delta * jnp.abs(finite) if self.relative else self.min_delta
    threshold = jnp.where(jnp.isfinite(b), b - delta, b)
    return jnp.logical_and(jnp.isfinite(v), v < threshold)

  def update(
    self, state: EarlyStoppingState, metric: Any, best_params: Any = None
  ) -> EarlyStoppingState:
    """Record one epoch's ``metric`` (a scalar) and the pytree to keep if it is the best.

    Pure and jittable: no Python branch depends on a traced value.

    Raises:
      TypeError: ``state`` is not an EarlyStoppingState; ``metric`` is not real; a leaf of
        ``best_params`` has another dtype than the copy kept since ``init``.
      ValueError: ``metric`` is not a scalar; ``best_params`` differs from the kept copy in
        structure or a leaf's shape (each message names the argument and path).
    """
    if not isinstance(state, EarlyStoppingState):
      raise TypeError(
        f"{_FN}: `state` must be an EarlyStoppingState (from init), got {type(state).__name__}."
      )
    metric = _real_metric(metric)
    if best_params is None and jax.tree.leaves(state.best_params):
      raise ValueError(
        f"{_FN}: `best_params` is missing: init kept a copy of the parameters, so each update "
        "takes this epoch's (es.step(state, metric, params)), or init takes none."
      )
    try:
      otree.check_same_structure(best_params, state.best_params, "best_params", "state.best_params")
      otree.check_same_dtypes(
        best_params, state.best_params, "best_params", "state.best_params", kept=True
      )
    except (TypeError, ValueError) as e:
      raise type(e)(f"{_FN}: {e}") from None
    active = jnp.logical_and(state.epoch >= self.warmup, jnp.logical_not(state.should_stop))
    improved = jnp.logical_and(active, self.is_improvement(metric, state.best_metric))
    wait = jnp.where(improved, 0, jnp.where(active, safe_increment(state.wait), state.wait))
    stop = jnp.logical_or(state.should_stop, jnp.logical_and(active, wait > self.patience))

    def keep(new, old):  # this epoch's value if it improved, else the kept one (old's dtype)
      return jnp.where(improved, jnp.asarray(new, jnp.result_type(old)), old)

    return EarlyStoppingState(
      epoch=safe_increment(state.epoch),
      best_metric=keep(metric, state.best_metric),
      best_epoch=keep(state.epoch, state.best_epoch),
      wait=wait,
      should_stop=stop,
      improved=improved,
      best_params=jax.tree.map(keep, best_params, state.best_params),
    )

  def step(
    self, state: EarlyStoppingState, metric: Any, best_params: Any = None
  ) -> tuple[EarlyStoppingState, bool]:
    """For plain Python loops: ``update`` compiled once per configuration and tree
    structure, and the stop decision as a Python bool::

        state, stop = es.step(state, val_loss, params)
        if stop:
          break
    """
    # Checked and converted first: jit would reject a str or 2**40 without naming `metric`.
    state = _jitted_update(self, state, _real_metric(metric), best_params)
    return state, bool(state.should_stop)


_jitted_update = jax.jit(
  lambda config, state, metric, best_params: config.update(state, metric, best_params),
  static_argnums=0,
)


def early_stopping(
  mode: str = "min",
  patience: int = 5,
  min_delta: float = 0.0,
  relative: bool = False,
  baseline: Optional[float] = None,
  warmup: int = 0,
) -> EarlyStopping:
  """Early stopping on a validation metric, keeping the best parameters.

  Args:
    mode: "min" (the metric should fall, e.g. a loss) or "max" (e.g. an accuracy).
    patience: non-improving epochs in a row that are tolerated; training should stop at
      the ``patience + 1``-th (``patience=0``: at the first).
    min_delta: the smallest change that counts as an improvement (strictly exceeded).
    relative: measure ``min_delta`` as a fraction of ``|best_metric|`` instead of in the
      metric's units.
    baseline: a value the metric must beat (by ``min_delta``) before any epoch counts as an
      improvement; ``None`` for none.
    warmup: the number of first epochs ignored entirely (no tracking, no counting, no stop).

  Returns:
    An :class:`EarlyStopping` configuration with ``init(best_params=None)`` and
    ``update(state, metric, best_params=None)``; see the module docstring for the formulas.

  Raises:
    ValueError: ``mode`` not "min"/"max", or ``patience``, ``min_delta``, ``warmup`` negative
      (the message names the argument). TypeError: a non-integer ``patience`` or ``warmup``.
  """
  return EarlyStopping(
    mode=mode,
    patience=patience,
    min_delta=min_delta,
    relative=relative,
    baseline=baseline,
    warmup=warmup,
  )


__all__ = ["EarlyStopping", "EarlyStoppingState", "early_stopping"]
