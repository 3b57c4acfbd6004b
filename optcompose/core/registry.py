"""The registry: every public builder declares itself once, next to its code.

::

    @public("transformation", optax="scale_by_adam", b1=DECAY, b2=DECAY, eps=EPS, ...)
    def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, ...): ...

The declaration gives the builder's *kind* (``"transformation"``, ``"wrapper"`` or
``"optimizer"``), its Optax counterpart (the name in ``optax``, or None), and each
hyperparameter's :class:`~optcompose.core.hyperparams.Hyper` (range, schedules, what the
property kit draws). From it:

* the builder validates its arguments when called (the error names the builder and the
  argument), so a recipe never writes a range check;
* a transformation's hyperparameters declared with ``schedule=True`` accept schedules: the
  transformation is then :func:`~optcompose.core.hyperparams.rebuilt_each_step`;
* a transformation's ``update`` rejects integer and boolean updates (a TypeError naming the
  leaf, raised while tracing) unless it is declared ``any_dtype=True`` (``identity``,
  ``set_to_zero``: they compute nothing). JAX's ``grad`` never makes an integer gradient
  (integer inputs get ``float0``), so one is a mistake upstream (labels or a step count
  passed as gradients); computing with it would truncate (``0.1 * 1`` -> 0 in int32) or, for
  booleans, step the wrong way. Optax promotes instead and ``apply_updates`` then casts the
  step back to the integer parameter's dtype.
* ``optcompose``'s exports, the completeness tests and :mod:`optcompose.testing.strategies`
  read :data:`REGISTRY`.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable, NamedTuple, Optional, Protocol, TypeVar, cast

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core.eps_pair import check_not_both_zero
from optcompose.core.backend import record_pending, taken_values
from optcompose.core.base import _READS_FINAL, GradientTransformation, mark_averager
from optcompose.core.hyperparams import SchedulableBuilder, rebuilt_each_step
from optcompose.core.validation import Hyper, check_count, declare

KINDS = ("transformation", "wrapper", "optimizer")


class Entry(NamedTuple):
  name: str
  builder: Callable  # the public, validating builder
  kind: str
  optax: Optional[str]  # the name of Optax's counterpart, e.g. "contrib.sam"
  hypers: dict  # argument name -> Hyper
  module: str
  averager: bool = False  # averages the parameters: only its kind may follow it in a chain


REGISTRY: dict = {}

# A builder's own type: ``public`` returns it, so checkers see each builder's signature.
_Builder = TypeVar("_Builder", bound=Callable[..., Any])


class PublicBuilder(SchedulableBuilder, Protocol):
  """A public builder: also ``static_args``, the names of its integer arguments."""

  static_args: tuple[str, ...]


def checking_at_init(tx: GradientTransformation, check: Callable, schedules) -> Any:
  """``tx``, whose ``init`` first evaluates the records of ``schedules`` built before JAX's
  backends were up (see :mod:`optcompose.core.backend`) and runs ``check``, the range
  checks a builder would have run on them; ``tx`` itself where there are none."""
  schedules = list(schedules)
  if not schedules:
    return tx

  def init(params):
    with jax.ensure_compile_time_eval():  # values, also when init is traced (jax.jit)
      for s in schedules:
        taken_values(s, now=True)
      check()
    return tx.init(params)

  return GradientTransformation(init, tx.update)


def names(*kinds: str) -> tuple:
  """The registered names of the given kinds (all kinds if none), sorted."""
  return tuple(sorted(n for n, e in REGISTRY.items() if not kinds or e.kind in kinds))


def _floating_updates_only(tx: GradientTransformation, name: str) -> GradientTransformation:
  """``tx`` whose update first checks that every update leaf is floating point."""

  def update(updates, state, params=None, **extra):
    try:
      otree.check_floating(
        updates,
        "updates",
        f"{name} needs floating-point updates (jax.grad "
        "never gives integer gradients: cast, or route the leaf to "
        "set_to_zero)",
      )
    except TypeError:
      if "count" in getattr(updates, "_fields", ()):  # an optimizer state where updates go
        raise TypeError(
          f"{name}: `updates` is a {type(updates).__name__}, an optimizer state: the "
          "arguments are update(updates, state, params), gradients first."
        ) from None
      raise
    _complex_for_real(name, updates, params, state)
    _same_shapes(name, updates, params)
    check_count(name, state)
    return tx.update(updates, state, params, **extra)

  return GradientTransformation(tx.init, update)


def _same_shapes(name: str, updates: Any, params: Any) -> None:
  """Raise a ValueError naming the first leaf whose update's shape is not its parameter's,
  where the two trees have one structure (a stateless member, plain SGD or a clip, would
  pass a (3, 1) gradient of a (3, 2) parameter on, and ``apply_updates`` of Optax or Flax
  broadcast it). Other structures are the members' own to check."""
  if params is None:
    return
  u_leaves, u_def = jax.tree.flatten(updates)
  p_leaves, p_def = jax.tree.flatten(params)
  if u_def != p_def or all(jnp.shape(u) == jnp.shape(p) for u, p in zip(u_leaves, p_leaves)):
    return
  try:
    otree.check_same_structure(updates, params, "updates", "params")  # names the leaf
  except ValueError as e:
    raise ValueError(f"{name}: {str(e).rstrip('.')} (it would be broadcast).") from None


def _complex_for_real(name: str, updates: Any, params: Any, state: Any) -> None:
  """Raise a TypeError naming the first leaf whose update is complex and parameter real: a
  real state would drop its imaginary part (Adam's moments), or become complex (momentum).
  Without ``params`` (Optax's ``update(grads, state)``): complex updates into a state whose
  moments are all real (one made from real parameters)."""
  leaves = jax.tree.leaves(updates)
  if not any(jnp.iscomplexobj(u) for u in leaves):
    return
  if params is None:
    leaves = [x for x in jax.tree.leaves(state) if jnp.ndim(x) > 0]
    moments = [x for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if moments and not any(jnp.iscomplexobj(x) for x in leaves):  # not keys, counts, masks
      raise TypeError(
        f"{name}: the updates are complex but the state was made from real parameters (its "
        "moments are real, and would lose the imaginary part): take the real part of a "
        "complex gradient of real parameters, or make the parameters complex."
      )
    return
  if jax.tree.structure(updates) != jax.tree.structure(params):
    return  # the transformation's own check names the difference
  why = "a complex gradient of a real parameter would lose its imaginary part; take the real "
  otree.check_not_complex_for_real(updates, params, name, why + "part, or make it complex")


def _resolve_annotations(fn) -> None:
  """Our modules write annotations as strings (``from __future__ import annotations``); code
  that introspects a builder (Optax's tests read ``learning_rate``'s annotation and expect
  ``optax.ScalarOrSchedule``) sees the objects."""
  try:
    fn.__annotations__ = inspect.get_annotations(fn, eval_str=True)
  except Exception:  # a name not importable at run time: the strings stay
    pass


# The usual other names of Optax's arguments (PyTorch's, papers'): matched before spelling.
_OTHER_NAMES = {
  "lr": ("learning_rate",),
  "eta": ("learning_rate",),
  "betas": ("b1", "b2"),
  "beta1": ("b1",),
  "beta2": ("b2",),
  "beta_1": ("b1",),
  "beta_2": ("b2",),
  "epsilon": ("eps",),
  "wd": ("weight_decay",),
}


def _call_error(name: str, signature: inspect.Signature, kwargs: dict, error: TypeError) -> str:
  """The builder's name with what Python's binding found, an unknown keyword first (Python
  reports a missing argument first: ``adam(lr=...)`` would say ``learning_rate`` is missing),
  and the closest argument name where there is one (``lr``: ``learning_rate``)."""
  params = signature.parameters
  unknown = [k for k in kwargs if k not in params]
  if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
    k = unknown[0]
    known = [n for n in _OTHER_NAMES.get(k, ()) if n in params]  # PyTorch's names, say
    close = known or difflib.get_close_matches(k, list(params), n=1, cutoff=0.5)
    hint = f"; did you mean {' and '.join(repr(c) for c in close)}?" if close else ""
    return f"{name}() got an unexpected keyword argument {k!r}{hint}"
  return f"{name}(): {error}"


def mark_reads_final(tx: Any, *inner: Any) -> Any:
  """``tx``, marked as holding an averager (``ema_params``, ``swa``) when one of ``inner``
  (transformations, or trees of them: a wrapper's arguments) does, so that ``chain`` refuses
  what would change the updates after it, as it does for the averager itself."""
  is_tx = lambda x: callable(getattr(x, "init", None)) and callable(getattr(x, "update", None))
  if any(getattr(t, "update", None) in _READS_FINAL for t in jax.tree.leaves(inner, is_leaf=is_tx)):
    _READS_FINAL.add(tx.update)
  return tx


def public(
  kind: str,
  *,
  optax: Optional[str] = None,
  any_dtype: bool = False,
  averager: bool = False,
  **hypers: Hyper,
) -> Callable[[_Builder], _Builder]:
  """Decorator declaring a public builder; see the module docstring.

  Args:
    kind: one of :data:`KINDS`.
    optax: the name of Optax's counterpart (dotted below ``optax``), or None.
    any_dtype: a transformation that accepts updates of any dtype (it computes nothing).
    averager: a transformation that averages the parameters from ``params + updates`` and
      passes the updates through (``chain`` lets only others of its kind follow it).
    **hypers: one :class:`Hyper` per declared argument.

  Returns:
    A decorator returning the validating builder (registered under its ``__name__``), typed
    as the builder it decorates (same signature, to a type checker).
  """
  if kind not in KINDS:
    raise ValueError(f"public: `kind` must be one of {KINDS}, got {kind!r}.")

  def decorate(builder: _Builder) -> _Builder:
    name = builder.__name__
    _resolve_annotations(builder)
    signature = inspect.signature(builder)
    missing = sorted(set(hypers) - set(signature.parameters))
    if missing:
      raise TypeError(f"public({name}): {missing} are not parameters of {name}.")
    for arg, hyper in hypers.items():
      declare(arg, hyper)
    schedulable = (
      tuple(n for n, h in hypers.items() if h.schedule) if kind == "transformation" else ()
    )

    guard = kind == "transformation" and not any_dtype

    def checked(arguments):
      for arg, hyper in hypers.items():
        hyper.check(name, arg, arguments[arg])
      tx = builder(**arguments)
      tx = _floating_updates_only(tx, name) if guard else tx
      return mark_averager(tx) if averager else mark_reads_final(tx, *arguments.values())

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
      try:
        bound = signature.bind(*args, **kwargs)
      except TypeError as e:
        raise TypeError(_call_error(name, signature, kwargs, e)) from None
      bound.apply_defaults()
      arguments = dict(bound.arguments)
      scheduled = {n: arguments[n] for n in schedulable if callable(arguments[n])}
      if not scheduled:
        return checked(arguments)
      for n, schedule in scheduled.items():  # the values it records as taken (Hyper.check)
        hypers[n].check(name, n, schedule)
      if {"eps", "eps_root"} <= arguments.keys():  # the builder sees step values only
        check_not_both_zero(name, arguments["eps"], arguments["eps_root"])
      tx = rebuilt_each_step(
        lambda values: checked({**arguments, **values}),
        {},
        scheduled,
        who=name,
        cast_scheduled=False,
      )
      pending = {n: s for n, s in scheduled.items() if record_pending(s)}
      return checking_at_init(
        tx, lambda: [hypers[n].check(name, n, s) for n, s in pending.items()], pending.values()
      )

    public_builder = cast(PublicBuilder, wrapper)
    public_builder.schedulable = schedulable
    # Integer arguments are static (a loop length, a period): inject_hyperparams bakes them in.
    public_builder.static_args = tuple(n for n, h in hypers.items() if h.integer)
    if name in REGISTRY and REGISTRY[name].module != builder.__module__:
      raise ValueError(
        f"public: {name} is registered twice ({REGISTRY[name].module} and {builder.__module__})."
      )
    REGISTRY[name] = Entry(
      name, public_builder, kind, optax, dict(hypers), builder.__module__, averager
    )
    return cast(_Builder, public_builder)

  return decorate
