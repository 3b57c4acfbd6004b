"""``inject_hyperparams``: build any optimizer so that its numeric hyperparameters live in the
optimizer *state* as arrays::

    tx = inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=1e-4)
    state = tx.init(params)
    state = set_hyperparams(state, learning_rate=3e-4)   # no recompilation of the step
    current_hyperparams(state)  # {'learning_rate': Array(3e-4), 'b1': ..., ...}

It is the one mechanism of :mod:`optcompose.core.hyperparams` (the same state type as a
transformation built with a schedule) applied to a whole factory. The transformation object
holds no arrays, so it works as a static attribute of Flax's ``nnx.Optimizer``.
Hyperparameters are stored as float32 (float64 under x64; ``hyperparam_dtype``) whatever
the parameters' dtype: with bfloat16 parameters, ``b2 = 0.999`` is not rounded to 1.0. A
stored value wider than the parameters compute in (float64 under x64, for float32
parameters) is cast down to float32 where it is used, so x64 leaves the elementwise
arithmetic in float32, as Optax's injected values of the parameters' dtype do; a value
float32 cannot hold as valid (``b2 = 1 - 1e-8`` is 1.0 there) is then refused at ``init``
and by ``set_hyperparams``. A ``hyperparam_dtype`` given is kept for the arithmetic too,
and a tree with float64 leaves computes in float64.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optcompose.core.backend import backend_started, taken_values
from optcompose.core.registry import checking_at_init
from optcompose.core import (
  REAL_DTYPE,
  GradientTransformation,
  Hyper,
  default_float,
  public,
  rebuilt_each_step,
)
from optcompose.core.registry import REGISTRY, mark_reads_final
from optcompose.core.held import check_held
from optcompose.core.validation import check_usable, is_real_like, taken_by_schedule


def _is_static_by_name(name: str) -> bool:
  return name == "mask" or name.endswith("_mask")


def _is_randomness(name: str, value) -> bool:
  """A PRNG key or an integer seed: the source of an optimizer's noise (``noisy_sgd``'s
  ``key``), not a value to schedule or tune, so it is passed through unchanged (a key cannot
  be cast to a float; a seed cast to one would no longer be an integer)."""
  dtype = getattr(value, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return True
  return name in ("key", "seed", "rng") and isinstance(
    value, (numbers.Integral, np.ndarray, np.generic, jax.Array)
  )


@public(
  "wrapper",
  optax="inject_hyperparams",
  inner_factory=Hyper(("choice", ("sgd", "adam", "adamw", "rmsprop"))),
  hyperparam_dtype=REAL_DTYPE,
)
def inject_hyperparams(
  inner_factory: Callable[..., GradientTransformation],
  static_args: Union[str, Iterable[str]] = (),
  hyperparam_dtype: Optional[Any] = None,
) -> Callable[..., GradientTransformation]:
  """Wrap an optimizer factory so that its numeric hyperparameters live in the state.

  At each update: ``h = state.hyperparams`` (a scheduled one: ``schedule(count)``, count
  from 0), ``u, inner_state = inner_factory(**fixed, **h).update(g, inner_state, w)``,
  ``count <- count + 1``; the values used are stored back in ``state.hyperparams``.

  Args:
    inner_factory: e.g. ``optcompose.adamw`` or any function returning a transformation
      (Optax's included).
    static_args: names of arguments to keep out of the state (they are baked in). Arguments
      named ``mask`` or ``*_mask``, booleans, ``None``, dtypes, randomness (a PRNG key, or
      an integer ``key``/``seed``/``rng``) and the integer arguments of optcompose's builders
      given as Python ints (a period, a memory size) are always static. (Optax stores
      randomness in the state; its tests use it only to run.) Arrays of rank 1 or more and
      values that are not numbers (a string) are passed as they are, baked in: not held in
      the state, not seen by ``set_hyperparams``. An integer argument of a factory of your
      own is held as a float unless listed here.
    hyperparam_dtype: the stored dtype (by default float32, or float64 under x64, whatever
      the parameters' dtype).

  Returns:
    A factory with ``inner_factory``'s signature. Numbers become float arrays in
    ``state.hyperparams`` (an :class:`~optcompose.InjectHyperparamsState`); callables (other
    than masks) are schedules, evaluated at the state's count before each update.

  References:
    Optax's ``optax.inject_hyperparams`` (same name, arguments and state fields).
  """
  if isinstance(inner_factory, GradientTransformation) or not callable(inner_factory):
    raise TypeError(
      f"inject_hyperparams: `inner_factory` must be a function returning a "
      f"transformation (such as optcompose.adam), got {type(inner_factory).__name__}"
      " (pass the factory itself, not a transformation built from it)."
    )
  static = {static_args} if isinstance(static_args, str) else set(static_args)
  signature = inspect.signature(inner_factory)
  ours = (getattr(inner_factory, "__module__", None) or "").startswith("optcompose")
  declared = set(getattr(inner_factory, "static_args", ()))  # our builders' integer arguments
  # Optax's factory: its values are checked as our builder of the same name declares them.
  twin = _twin(inner_factory) if not ours and _optax_s(inner_factory) else None
  unknown = static - set(signature.parameters)
  if unknown:
    raise ValueError(
      f"inject_hyperparams: `static_args` {sorted(unknown)} are not parameters "
      f"of {getattr(inner_factory, '__name__', inner_factory)}."
    )
  who = f"inject_hyperparams({getattr(inner_factory, '__name__', 'factory')})"

  @functools.wraps(inner_factory)
  def factory(*args, **kwargs) -> GradientTransformation:
    try:
      bound = signature.bind(*args, **kwargs)
    except TypeError as e:
      takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
      unknown = [] if takes_any else sorted(set(kwargs) - set(signature.parameters))
      why = f"unknown arguments {unknown}" if unknown else str(e)
      raise TypeError(
        f"{who}: {why} (the arguments of {who[19:-1]} are {list(signature.parameters)})."
      ) from None
    bound.apply_defaults()
    var_keyword = [n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD]
    for name in var_keyword:  # a factory taking **kwargs: its keywords, one by one
      bound.arguments.update(bound.arguments.pop(name))
    numeric, schedules, fixed = {}, {}, {}
    for name, value in bound.arguments.items():
      if (
        name in static
        or _is_static_by_name(name)
        or isinstance(value, bool)
        or value is None
        or _is_randomness(name, value)
        or (name in declared and isinstance(value, int))
      ):
        fixed[name] = value
      elif callable(value) and not isinstance(value, type):
        if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
          raise TypeError(
            f"{who}: `{name}` is a stateful schedule ({type(value).__name__}: init, update "
            "and __call__ of a schedule state), which optcompose's inject_hyperparams does "
            "not keep; use the Optax package's own inject_stateful_hyperparams (import it "
            "under another name where `optax` names optcompose), which accepts "
            "optcompose's optimizers, or give a function of the step count."
          )
        schedules[name] = value
      elif is_real_like(value) and np.ndim(value) == 0:
        numeric[name] = value
      else:
        fixed[name] = value
    for name, schedule in schedules.items():
      check_usable(who, name, schedule)
    at_0 = None  # not evaluated before JAX's backends are up (optcompose.core.backend)
    try:
      if backend_started() or not schedules:
        at_0 = {n: s(jnp.zeros([], jnp.int32)) for n, s in schedules.items()}
    except Exception:  # a schedule's own error: init names it
      pass
    if not ours and _optax_s(inner_factory):  # Optax's: its values checked by name as ours
      _by_name(who, hyperparam_dtype, twin)(numeric)
    elif ours and at_0 is not None:
      _check_values_taken(inner_factory, fixed, numeric, schedules, at_0)
    tx = rebuilt_each_step(
      lambda values: inner_factory(**fixed, **values),
      numeric,
      schedules,
      who=who,
      dtype=hyperparam_dtype,
      validate=_by_name(who, hyperparam_dtype, twin)
      if not ours and _optax_s(inner_factory)
      else None,
    )
    if ours and schedules and not backend_started():  # built cold: checked at the first init

      def check_later():
        zero = jnp.zeros([], jnp.int32)
        _check_values_taken(
          inner_factory, fixed, numeric, schedules, {n: s(zero) for n, s in schedules.items()}
        )

      tx = checking_at_init(tx, check_later, schedules.values())
    ints = [n for n, v in numeric.items() if isinstance(v, numbers.Integral)]
    if ints and not ours:  # a count (of the user's factory, or an Optax one of no twin)?
      tx = _hinting(tx, who, ints)
    return mark_reads_final(tx, _built(inner_factory, fixed, numeric, at_0))

  return factory


def _hinting(tx: GradientTransformation, who: str, ints: list) -> GradientTransformation:
  """``tx``, whose TypeErrors also say that ``ints`` (given as Python ints) reach the
  factory as float arrays: ``range(n)`` or a shape of one fails far from its cause."""
  names = ", ".join(f"`{n}`" for n in ints)

  def hinted(method):
    @functools.wraps(method)
    def call(*args, **kwargs):
      try:
        return method(*args, **kwargs)
      except TypeError as e:  # the same error, its message completed
        if e.args and isinstance(e.args[0], str):
          e.args = (
            f"{e.args[0]}\n({who}: {names} given as Python ints reach the factory as "
            "float arrays of the state, as every numeric argument does unless listed in "
            f"static_args: one used as a count (range, a shape) must be listed there, "
            f"static_args={tuple(ints)!r}.)",
            *e.args[1:],
          )
        raise

    return call

  return GradientTransformation(hinted(tx.init), hinted(tx.update))


def _by_name(who: str, dtype, twin: Any = None) -> Callable[[dict], None]:
  """The check of values for Optax's factory, which checks none: each as ``twin``, our
  builder of the same name, declares it; without one, inside some declaration of its name
  by our builders (a name means other things in other builders)."""

  def validate(values: dict) -> None:
    for name, value in values.items():
      hyper = twin.hypers.get(name) if twin is not None else None
      by_name = True if twin is None else (hyper,) if hyper is not None and hyper.numeric else ()
      stored = jnp.asarray(value, dtype=dtype or default_float())
      check_held(name, name, value, stored, fn=who, by_name=by_name)

  return validate


def _twin(factory: Callable) -> Any:
  """The declarations (``hypers``) of our builder whose Optax counterpart is ``factory``, or
  None."""
  for entry in REGISTRY.values():
    found: Any = optax if entry.optax else None
    for part in (entry.optax or "").split("."):
      found = getattr(found, part, None)
    if found is not None and found is factory:
      return _Twin(entry.hypers)
  return None


class _Twin(NamedTuple):
  hypers: dict


def _optax_s(factory: Callable) -> bool:
  """Whether ``factory`` is Optax's, whose arguments mean what ours of the same name do (a
  factory of the user's own may give ``beta`` or ``decay`` any meaning: it checks them)."""
  return (getattr(factory, "__module__", None) or "").partition(".")[0] == "optax"


def _built(factory: Callable, fixed: dict, numeric: dict, at_0: Optional[dict]) -> Any:
  """``factory`` built with the values of step 0 (what the wrapper runs), or None."""
  try:
    return None if at_0 is None else factory(**fixed, **numeric, **at_0)
  except Exception:  # the build's own errors are the first update's to raise
    return None


def _check_values_taken(
  factory: Callable, fixed: dict, numeric: dict, schedules: dict, at_0: dict
) -> None:
  """Build ``factory`` with each value a schedule records as taken (a peak, a floor: see
  ``optcompose.core.TAKEN``), the other schedules at step 0, so that its range checks see the
  values a schedule reaches later, as a builder given the schedule itself does (``at_0``:
  every schedule's value at step 0).

  A value refused there is accepted when some other schedule's recorded value makes the
  build pass: a check of two values together (``eps`` and ``eps_root`` both 0) must not
  pair one schedule's end with another's start, which it may never meet."""
  if not any(taken_values(s, now=True) for s in schedules.values()):
    return

  def builds(values: dict) -> bool:
    try:
      factory(**fixed, **numeric, **values)
    except (TypeError, ValueError):
      return False
    return True

  for name, schedule in schedules.items():
    for value in taken_values(schedule, now=True) or ():
      try:
        factory(**fixed, **numeric, **{**at_0, name: value})
      except (TypeError, ValueError) as e:
        others = [
          {**at_0, other: taken, name: value}
          for other, s in schedules.items()
          if other != name
          for taken in taken_values(s, now=True) or ()
        ]
        if not any(builds(values) for values in others):
          raise taken_by_schedule(e, name, value) from None


__all__ = []  # and the builders it registers
