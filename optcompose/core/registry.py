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
* ``optcompose``'s exports, the completeness tests and :mod:`optcompose.testing.strategies`
  read :data:`REGISTRY`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple, Optional

from optcompose.core.hyperparams import Hyper, rebuilt_each_step

KINDS = ("transformation", "wrapper", "optimizer")


class Entry(NamedTuple):
  name: str
  builder: Callable  # the public, validating builder
  kind: str
  optax: Optional[str]  # the name of Optax's counterpart, e.g. "contrib.sam"
  hypers: dict  # argument name -> Hyper
  module: str


REGISTRY: dict = {}


def names(*kinds: str) -> tuple:
  """The registered names of the given kinds (all kinds if none), sorted."""
  return tuple(sorted(n for n, e in REGISTRY.items() if not kinds or e.kind in kinds))


def public(kind: str, *, optax: Optional[str] = None, **hypers: Hyper):
  """Decorator declaring a public builder; see the module docstring.

  Args:
    kind: one of :data:`KINDS`.
    optax: the name of Optax's counterpart (dotted below ``optax``), or None.
    **hypers: one :class:`Hyper` per declared argument.

  Returns:
    A decorator returning the validating builder (registered under its ``__name__``).
  """
  if kind not in KINDS:
    raise ValueError(f"public: `kind` must be one of {KINDS}, got {kind!r}.")

  def decorate(builder):
    name = builder.__name__
    signature = inspect.signature(builder)
    missing = sorted(set(hypers) - set(signature.parameters))
    if missing:
      raise TypeError(f"public({name}): {missing} are not parameters of {name}.")
    schedulable = tuple(n for n, h in hypers.items() if h.schedule) if kind == "transformation" else ()

    def checked(arguments):
      for arg, hyper in hypers.items():
        hyper.check(name, arg, arguments[arg])
      return builder(**arguments)

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      arguments = dict(bound.arguments)
      scheduled = {n: arguments[n] for n in schedulable if callable(arguments[n])}
      if not scheduled:
        return checked(arguments)
      return rebuilt_each_step(lambda values: checked({**arguments, **values}), {}, scheduled,
                               who=name, cast_scheduled=False)

    wrapper.schedulable = schedulable
    if name in REGISTRY and REGISTRY[name].module != builder.__module__:
      raise ValueError(f"public: {name} is registered twice ({REGISTRY[name].module} and "
                       f"{builder.__module__}).")
    REGISTRY[name] = Entry(name, wrapper, kind, optax, dict(hypers), builder.__module__)
    return wrapper

  return decorate
