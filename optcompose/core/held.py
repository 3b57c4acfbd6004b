"""Reading and replacing the hyperparameters in force, in any state: the holders (injected
and scheduled states, ours and Optax's, and ``reduce_on_plateau``'s scale), also as the
mappings of their fields that Flax NNX makes; and the check of a value set at run time as
the construction of the transformation holding it would check it."""

from __future__ import annotations

import collections
import numbers
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core.validation import _SKIP_CHECKS, DECLARED, Hyper, _check_range, is_real_like

# What builds the states holding a set of names, by that set and the kinds of state (the
# NamedTuple types) the holder's inner state holds: ``validate(values)`` of the transformations
# built so (see record_validator). The latest per key is held strongly, so that a state
# outlives its transformation's object (``tx.init(params)`` on a temporary); up to 15 older
# ones weakly (each lives as long as its transformation, which holds it: a sweep's finished
# trials are not kept alive, nor what their schedules close over). At most _KEYS keys, the
# least recently recorded dropped first (a notebook cell re-run defines a new state class,
# so a new key, each time). A key dropped leaves its states unchecked, not refused.
_VALIDATING: collections.OrderedDict = collections.OrderedDict()
_KEYS = 64
_LOCK = threading.Lock()  # threads build optimizers and set hyperparameters at once


def state_kinds(tree: Any) -> frozenset:
  """The NamedTuple types in ``tree`` (a state): what tells two transformations apart whose
  states hold the same hyperparameter names (``trace`` and ``ema``: ``decay``)."""
  return frozenset(type(n) for _, n in otree.find_nodes(tree, lambda n: hasattr(n, "_fields")))


def record_validator(names, inner_state: Any, validate: Callable[[dict], Any]) -> None:
  """Record that a state holding exactly ``names`` beside ``inner_state`` comes from a
  transformation that ``validate({name: 0-d array})`` builds from those values (raising what
  its construction would): :func:`set_hyperparams` then checks a value as that builder does,
  not by the ranges other builders declare for the same name (a user's ``factor`` is not
  ``reduce_on_plateau``'s)."""
  if _SKIP_CHECKS.get():  # a rebuild inside a step, or a check's own build
    return
  key = (frozenset(names), state_kinds(inner_state))
  with _LOCK:
    latest, older = _VALIDATING.pop(key, (None, collections.deque(maxlen=15)))
    if latest is not None and latest is not validate:
      older = collections.deque((r for r in older if r() not in (None, validate)), maxlen=15)
      older.append(_weak(latest))
    _VALIDATING[key] = (validate, older)  # now the most recent key
    while len(_VALIDATING) > _KEYS:
      _VALIDATING.popitem(last=False)


def _weak(validate: Callable) -> Callable[[], Any]:
  """A weak reference to ``validate``, or a strong one where it takes none (a builtin)."""
  try:
    return weakref.ref(validate)
  except TypeError:
    return lambda: validate


def _alive(entry: tuple) -> list:
  """An entry's validators, the latest first, without those collected."""
  latest, older = entry
  return [latest] + [v for v in (r() for r in reversed(older)) if v is not None]


def validators(node: Any) -> tuple:
  """``(validate functions, all_must_accept)`` for the holder ``node``: those recorded for
  its names and kinds of inner state, one of which must accept a value; else (a state as a
  mapping of its fields, or one built elsewhere) every one recorded for its names, all of
  which must accept it (the holder's builder is among them, or none is)."""
  names = frozenset(_held(node))
  kinds = state_kinds(getattr(node, "inner_state", None)) if hasattr(node, "_fields") else None
  with _LOCK:
    exact = _VALIDATING.get((names, kinds))
    entries = list(_VALIDATING.items()) if exact is None else []
  if exact is not None:
    return _alive(exact), False
  return [v for (n, _), e in entries if n == names for v in _alive(e)], True


def _check_as_built(node: Any, new: dict, keys: dict) -> None:
  """Check the holder ``node``'s values with ``new`` ({name: value as given}) put in,
  member by member (a sweep's holders hold one each), each as a 0-d array in its holder's
  dtype (as the step gives it to the builder): see :func:`validators`. Traced values: not
  checked."""
  checks, all_must = validators(node)
  held = {n: jax.tree.leaves(v)[0] for n, v in _held(node).items()}
  values = {**held, **new}
  if not checks or any(isinstance(v, jax.core.Tracer) for v in values.values()):
    return
  names = list(values)
  columns = [np.ravel(a) for a in np.broadcast_arrays(*[np.asarray(values[n]) for n in names])]
  for member in sorted(set(zip(*columns))):  # each distinct member once
    arrays = {n: jnp.asarray(v, jnp.result_type(held[n])) for n, v in zip(names, member)}
    errors = []
    for validate in checks:
      try:
        validate(arrays)
      except (TypeError, ValueError) as e:
        errors.append(e)
    if errors and (all_must or len(errors) == len(checks)):
      shown = ", ".join(f"`{keys[n]}` = {float(v)!r}" for n, v in zip(names, member) if n in keys)
      raise ValueError(f"set_hyperparams: {shown} is refused: {errors[0]}") from errors[0]


# The fields of an injected state (ours and Optax's, and Optax's stateful one) and of
# reduce_on_plateau's (its scale read as `plateau_scale`).
_INJECTED = (
  ("count", "hyperparams", "inner_state"),
  ("count", "hyperparams", "hyperparams_states", "inner_state"),
)
_PLATEAU = ("scale", "best_value", "plateau_count", "cooldown_count", "count", "avg_value")


def holds_hyperparams(node: Any) -> bool:
  """Whether a state node holds hyperparameters: a NamedTuple with a ``hyperparams`` dict
  (ours, Optax's ``inject_hyperparams`` states, ``reduce_on_plateau``'s scale), or one of
  these as a mapping of its fields (``nnx.state(optimizer.opt_state)``, a pure dict)."""
  if hasattr(node, "_fields"):
    return isinstance(getattr(node, "hyperparams", None), dict)
  mapped = any(otree.is_state_mapping(node, fields) for fields in _INJECTED)
  held = mapped and isinstance(node["hyperparams"], Mapping)
  return held or otree.is_state_mapping(node, _PLATEAU)


def _held(node: Any) -> Mapping:
  """A holder's ``{name: value}`` (see :func:`holds_hyperparams`)."""
  if hasattr(node, "_fields"):
    return node.hyperparams
  return node["hyperparams"] if "hyperparams" in node else {"plateau_scale": node["scale"]}


def _with_values(node: Any, values: dict) -> Any:
  if not hasattr(node, "_fields"):  # a mapping: rebuilt of its own types
    if "hyperparams" not in node:  # reduce_on_plateau's
      return type(node)({**node, "scale": values["plateau_scale"]})
    return type(node)({**node, "hyperparams": type(node["hyperparams"])(values)})
  replace = getattr(node, "with_hyperparams", None)
  return replace(values) if replace is not None else node._replace(hyperparams=values)


def current_hyperparams(state: Any) -> dict:
  """The hyperparameters in force, read from any optimizer state.

  Args:
    state: any state: optcompose's or Optax's, nested in any wrapper or container, also
      with its states turned into mappings of their fields (``nnx.state(opt.opt_state)``,
      ``nnx.to_pure_dict``, a checkpoint restored without a template).

  Returns:
    ``{name: scalar}``: the values used by the latest update (before the first update,
    step 0's) of every live or scheduled hyperparameter, and ``reduce_on_plateau``'s
    multiplier (``plateau_scale``). A name held by several nodes (one injected optimizer
    per group of ``partition``) is returned under its name with the first one's value, and
    for each node under ``"<path>/<name>"``, the key :func:`set_hyperparams` takes.
    Constants are not stored in a state: give a schedule or
    use :func:`optcompose.inject_hyperparams` to see them here. Of Optax's states, only
    ``optax.inject_hyperparams``' hold values to read: Optax's schedules keep only a count,
    and ``optax.contrib.reduce_on_plateau`` its ``scale`` (read it from that state).

  References:
    Optax's ``optax.tree_utils.tree_get`` (reading a named value from a state).
  """
  found = []
  for path, node in otree.find_nodes(state, holds_hyperparams):
    for name, value in _held(node).items():
      wrapped = jax.tree.leaves(value)  # an nnx.Optimizer's state: a Variable (a pytree)
      if len(wrapped) == 1 and not isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = wrapped[0]
      found.append((path, name, value))
  names = [name for _, name, _ in found]
  out = {}
  for path, name, value in found:
    out.setdefault(name, value)
    if names.count(name) > 1:  # every holder of a shared name by its path too, the first one
      out["/".join(path + (name,))] = value  # included: the key set_hyperparams takes
  return out


def set_hyperparams(state: Any, **values) -> Any:
  """Return ``state`` with hyperparameters replaced where they are held.

  Each value runs the validation of construction, on the value as it will be stored (in the
  holder's dtype: ``b1 = 1 - 1e-9`` rounds to 1.0 in float32 and is rejected): a real,
  finite scalar that the builder of the transformation holding it accepts beside the other
  values held there, as 0-d arrays in the holder's dtype (``inject_hyperparams(f)``: ``f``
  built with them, so a factory of your own checks its own arguments). The builder is known
  by the names held and the kinds of state beside them (``trace`` and ``ema`` both hold
  ``decay``), which is all a state shows: where two builders made in this process leave
  states alike (``inject_hyperparams(sgd)`` and of your own factory wrapping ``sgd``), a
  value either of them accepts is accepted, so a factory's own stricter limit holds only
  while it is the one such builder. In a state as a mapping of its fields, every builder of
  those names made in this process must accept the value. A state whose builder this
  process has not made (Optax's ``inject_hyperparams``, ``reduce_on_plateau``'s scale) is
  checked by name, inside the range of some builder declaring that name (``eps=0`` is
  valid in ``lars``, not in ``lamb``; the state cannot tell which it holds). A value
  traced under ``jax.jit`` or ``jax.vmap`` has no value to check: it is stored as given.

  Called on the host, it reads the values the holder keeps (the check builds with them), so
  it waits for the step that produced ``state`` to finish, and it walks the whole state in
  Python (milliseconds on a state of hundreds of leaves). Between epochs that is nothing; to
  change a value at every step, pass it into the jitted step and call ``set_hyperparams``
  there (not range-checked, as above), or use a schedule.

  Args:
    state: any state holding hyperparameters (see :func:`current_hyperparams`), nested in
      any wrapper.
    **values: new values, stored in each holder's dtype and shape, so a jitted step does
      not recompile (a scalar, or one value each where ``jax.vmap(tx.init)`` made a sweep's
      holders). A scheduled value is recomputed from its schedule at the next update.
      A name held by several nodes (two injected optimizers in ``partition``) is ambiguous:
      give ``"<path>/<name>"`` instead, as :func:`current_hyperparams` and the error list
      them (in ``partition``, whose groups' states sit in a ``MaskedState``:
      ``set_hyperparams(state, **{"inner_states/a/inner_state/learning_rate": 0.1})``).

  Returns:
    The new state.

  Raises:
    KeyError: a name no node of ``state`` holds.
    ValueError: an ambiguous name; a value that is not a scalar, not finite or out of range.
    TypeError: a value that is not a real number (a bool, a string).

  References:
    Optax's ``optax.tree_utils.tree_set`` (replacing named values in a state).
  """
  holders = otree.find_nodes(state, holds_hyperparams)
  qualified = {"/".join(path + (n,)): (id(node), n) for path, node in holders for n in _held(node)}
  by_name: dict = {}
  for path, node in holders:
    for n in _held(node):
      by_name.setdefault(n, []).append("/".join(path + (n,)))
  unknown = sorted(set(values) - set(by_name) - set(qualified))
  if unknown:
    raise KeyError(
      f"set_hyperparams: {unknown} are not hyperparameters held in this state "
      f"(held: {sorted(by_name)}, or by path: {sorted(qualified)}; build the "
      "optimizer with inject_hyperparams)."
    )
  assignments: dict = {}  # id(holder node) -> {name: new value}
  for key, value in values.items():
    if key in by_name and len(by_name[key]) > 1:
      raise ValueError(
        f"set_hyperparams: `{key}` is held in {len(by_name[key])} places "
        f"({', '.join(repr(q) for q in by_name[key])}); name one by its path: "
        f"set_hyperparams(state, **{{{by_name[key][0]!r}: value}})."
      )
    where = qualified[by_name[key][0] if key in by_name else key]
    assignments.setdefault(where[0], {})[where[1]] = (key, value)
  nodes = {id(node): node for _, node in holders}
  for holder, new in assignments.items():
    keys, checked = {name: key for name, (key, _) in new.items()}, {}
    for name, (key, value) in new.items():
      if isinstance(value, (bool, np.bool_)) or not is_real_like(value):
        raise TypeError(
          f"set_hyperparams: `{key}` must be a real number, got "
          f"{type(value).__name__} {value!r:.40}."
        )
      held = _held(nodes[holder])[name]
      old = jnp.asarray(jax.tree.leaves(held)[0])  # an nnx Variable holds one array
      if np.ndim(value) != 0 and np.shape(value) != old.shape:  # a vmapped init: one each
        raise ValueError(f"set_hyperparams: `{key}` must be a scalar or of shape {old.shape}.")
      with np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an overflow is reported below
        stored = jnp.broadcast_to(jnp.asarray(value, dtype=old.dtype), old.shape)
      one = np.ndim(value) == 0 or isinstance(value, jax.core.Tracer)  # checked once
      no_builder = not validators(nodes[holder])[0]  # else as its builder checks, below
      for v, x in zip([value] if one else np.ravel(value), jnp.ravel(stored)):
        check_held(key, name, v, x, by_name=no_builder)
      checked[name] = value  # the builder checks it as given, rounded to the dtype it uses
      wrapped = not isinstance(held, (jax.Array, np.ndarray, np.generic, numbers.Number))
      new[name] = jax.tree.map(lambda _, v=stored: v, held) if wrapped else stored
    _check_as_built(nodes[holder], checked, keys)

  def replace(node):
    if id(node) not in assignments:
      return node
    return _with_values(node, {**_held(node), **assignments[id(node)]})

  return otree.replace_nodes(state, holds_hyperparams, replace)


def check_held(
  key: str, name: str, value: Any, stored: jax.Array, fn: str = "set_hyperparams", by_name=True
) -> None:
  """Validate ``value``, given to set_hyperparams and ``stored`` in its holder's dtype: real,
  finite, not flushed to 0, and inside ``by_name``: True (the builder holding it unknown),
  some declaration of ``name`` (one name, other meanings: ``eps`` may be 0 in one builder,
  not in another); a tuple of Hypers (the builder's), all of them."""
  if isinstance(value, jax.core.Tracer) or isinstance(stored, jax.core.Tracer):
    return  # a value traced under jit is checked when it is a number (not here: no host copy)
  given, x, dtype = float(value), float(stored), stored.dtype
  top = np.inf if given == np.inf else None  # inf given: the builder's checks decide (a clip)
  hypers = (DECLARED.get(name, ()) if by_name is True else tuple(by_name or ())) or (
    Hyper(("float",), None, top),
  )
  errors = []
  for hyper in hypers:
    try:
      _check_range(fn, key, given, x, dtype, hyper.low, hyper.high, hyper.low_open, hyper.high_open)
      if (hyper.integer or hyper.whole) and x != int(x):
        raise ValueError(f"{fn}: `{key}` must be a whole number, got {given!r}.")
    except ValueError as e:
      errors.append(e)
  if errors and (by_name is not True or len(errors) == len(hypers)):
    raise errors[0]
