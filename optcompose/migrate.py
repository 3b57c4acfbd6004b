"""Migrating optimizer states between Optax and optcompose, both ways.

::

    state = from_optax_state(optax_state, tx, params)      # Optax's state -> ours, for tx
    optax_state = to_optax_state(state, optax_tx, params)  # ours -> Optax's, for optax_tx

``tx`` and ``optax_tx`` are built the same way (the same optimizer and chain, the same
hyperparameters and schedules). The target is initialised from ``params`` and each of its
leaves is filled from the source, matched field by field: moments, traces and step counts
are copied, not recomputed, so training continues as if it had never switched library. The
source may be a live state, one restored into its library's template, or a plain restored
pytree (Flax's ``msgpack_restore``, Orbax without a target: tuples come back as
``{'0': ...}`` dicts or lists, empty states as ``{}`` or ``None``).

Where the two libraries keep the same optimizer in different states:

* a scheduled hyperparameter: Optax keeps a count (``ScaleByScheduleState``,
  ``WeightDecaySchedule``, the latter inside a ``MaskedState`` when the decay is masked);
  optcompose keeps the count and the value the latest update used, for logging (an
  ``InjectHyperparamsState``). The count is copied; the value, which Optax does not store, is
  recomputed from the schedule by one update of ``tx`` on zero gradients (its result
  discarded), so ``current_hyperparams`` reads the value in force, not step 0's. Where that
  update does not reach the node (inside ``multi_steps`` between real steps) the value reads
  NaN until the node's next update; the steps themselves never read it (a scheduled value is
  always recomputed from the count);
* ``inject_hyperparams``: Optax keeps one count per schedule (``hyperparams_states``),
  optcompose one for all; they must agree (they do unless edited by hand) and are all filled
  from that one count going back. Stateful schedules have no counterpart;
* ``clip_by_global_norm``: optcompose keeps the norm it last measured, for logging, Optax
  nothing: coming from Optax it reads 0 (as after ``init``) until the next update;
* ``apply_if_finite``: optcompose's ``gave_up`` flag is False if no step was ever skipped;
  otherwise Optax's state cannot tell and the migration raises.

Anything else that differs raises :class:`MigrationError` naming the path in the source
(``state[1][0].mu['w']``) and what both sides hold there: another optimizer's state, a
hyperparameter scheduled on one side only, another shape, a dtype that would change a value.
Hyperparameter values are rounded to the target's stored dtype (Optax stores a float32
schedule's value as float32, optcompose as float64 under x64).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import InjectHyperparamsState
from optcompose.transforms.clipping import ClipByGlobalNormState
from optcompose.wrappers.control import ApplyIfFiniteState
from optcompose.wrappers.masking import MaskedState

__all__ = ["MigrationError", "from_optax_state", "to_optax_state"]

_INJECT = {"count", "hyperparams", "inner_state"}  # + "hyperparams_states" (Optax's)
_REBUILD = ("the source is another optimizer's state, or was built with other hyperparameters "
            "(build the target as the source was: the same chain, the same schedules).")


class MigrationError(ValueError):
  """A state cannot be migrated; ``path`` locates the node in the source state."""

  def __init__(self, fn: str, path: str, message: str):
    self.fn, self.path = fn, path
    super().__init__(f"{fn}: state{path} {message}")


# ----------------------------------------------------------------------------------------
# Counterparts: the state classes both libraries export under one name (optcompose keeps
# Optax's names), and Optax's names of states optcompose keeps in another class.

_OPTAX_ALIASES = {"MultiTransformState": "PartitionState",
                  "InjectStatefulHyperparamsState": "InjectHyperparamsState",
                  "ScaleByScheduleState": "InjectHyperparamsState"}
_PAIRS: list = []


def _pairs() -> set:
  """``{(optax_class, optcompose_class)}``, read once from both namespaces."""
  if not _PAIRS:
    import warnings
    import optax
    import optcompose
    pairs = set()
    with warnings.catch_warnings():  # Optax's deprecated names warn when read
      warnings.simplefilter("ignore")
      for space in (optax, optax.transforms, optax.schedules):
        for name in dir(space):
          theirs = getattr(space, name, None)
          ours = vars(optcompose).get(_OPTAX_ALIASES.get(name, name))  # ours, not Optax's
          if _is_namedtuple_class(theirs) and _is_namedtuple_class(ours):
            pairs.add((theirs, ours))
    _PAIRS.append(pairs)
  return _PAIRS[0]


def _counterparts(theirs: type, ours: type) -> bool:
  """A known pair, or a class with no declared counterpart (then the fields decide)."""
  pairs = _pairs()
  return ((theirs, ours) in pairs or theirs not in {a for a, _ in pairs}
          or ours not in {b for _, b in pairs})


def _is_namedtuple_class(c) -> bool:
  return isinstance(c, type) and issubclass(c, tuple) and hasattr(c, "_fields")


def _is_namedtuple(x) -> bool:
  return _is_namedtuple_class(type(x))


def _is_masked(x) -> bool:
  import optax
  return isinstance(x, (MaskedState, optax.MaskedState))


# ----------------------------------------------------------------------------------------
# Reading a source node, live or restored as plain containers.


def _leafless(x) -> bool:
  return not jax.tree.leaves(x)


def _fields(x) -> Optional[dict]:
  """A NamedTuple's fields, or a restored dict (Flax and Orbax store NamedTuples so; Orbax
  an empty one as None)."""
  if _is_namedtuple(x):
    return dict(zip(x._fields, x))
  return dict(x) if isinstance(x, dict) else {} if x is None else None


def _items(x) -> Optional[list]:
  """A sequence's items, or those of a restored dict ``{'0': ..., '1': ...}`` (Flax's)."""
  if isinstance(x, (tuple, list)) and not _is_namedtuple(x):
    return list(x)
  if isinstance(x, dict) and set(x) == {str(i) for i in range(len(x))}:
    return [x[str(i)] for i in range(len(x))]
  return None


def _is_value(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number))


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _kind(dtype) -> str:
  return ("f" if jnp.issubdtype(dtype, jnp.floating) else "i" if jnp.issubdtype(
      dtype, jnp.integer) else str(dtype))


def _concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _short(x) -> str:
  return type(x).__name__ if _is_namedtuple(x) else "..." if x else "None"


def _describe(x) -> str:
  if _is_namedtuple(x):
    owner = type(x).__module__.split(".")[0]
    owner = "optcompose's" if owner == "optcompose" else f"{owner.capitalize()}'s"
    return f"{owner} {type(x).__name__}({', '.join(x._fields)})"
  if isinstance(x, dict):
    return f"a dict with keys {sorted(map(str, x))}"
  if isinstance(x, (tuple, list)):
    return f"a {type(x).__name__} of {len(x)} ({', '.join(_short(v) for v in x)})"
  if _is_value(x):
    return f"an array of shape {np.shape(x)} and dtype {_dtype(x)}"
  return "nothing" if x is None else f"a {type(x).__name__}"


# ----------------------------------------------------------------------------------------
# The walk: the target's initial state ``t``, filled from the source ``s``; ``at`` is the
# path in the source.


class _Walk:

  def __init__(self, fn: str, to_ours: bool):
    self.fn, self.to_ours = fn, to_ours
    self.scheduled = []  # our InjectHyperparamsStates filled from a bare count

  def fail(self, at, message):
    raise MigrationError(self.fn, at, message)

  def node(self, t, s, at):
    if _leafless(t) and _leafless(s):
      return t
    if _is_namedtuple(t):
      return self.named(t, s, at)
    if isinstance(t, (tuple, list)):
      items = _items(s)
      if items is None or len(items) != len(t):
        self.fail(at, f"is {_describe(s)}, where the target holds {_describe(t)}: the "
                  "source is another optimizer's state.")
      return type(t)(self.node(a, b, f"{at}[{i}]") for i, (a, b) in enumerate(zip(t, items)))
    if isinstance(t, dict):
      return self.mapping(t, s, at)
    if _leafless(t):
      self.fail(at, f"holds {_describe(s)}, where the target keeps nothing: {_REBUILD}")
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(t)):
      return self.leaf(t, s, at)
    return self.custom(t, s, at)

  def mapping(self, t, s, at, hyper=False):
    if not isinstance(s, dict):
      self.fail(at, f"is {_describe(s)}, expected a dict with keys {sorted(map(str, t))}.")
    by_str = {str(k): k for k in s}  # a restored dict has string keys
    if set(by_str) != {str(k) for k in t} or len(by_str) != len(s):
      self.fail(at, f"has keys {sorted(by_str)}, expected {sorted(map(str, t))}.")
    fill = lambda v, k: (self.leaf(v, s[by_str[str(k)]], f"{at}[{k!r}]", hyper) if hyper  # noqa: E731
                         else self.node(v, s[by_str[str(k)]], f"{at}[{k!r}]"))
    return type(t)((k, fill(v, k)) for k, v in t.items())

  def named(self, t, s, at):
    fields = _fields(s)
    masked = _is_masked(s) or (isinstance(s, dict) and set(s) == {"inner_state"})
    if masked and not _is_masked(t):  # Optax masks what optcompose masks inside (a decay)
      return self.node(t, fields["inner_state"], f"{at}.inner_state")
    if _is_masked(t) and not masked:
      return type(t)(self.node(t.inner_state, s, at))
    if _is_namedtuple(s) and not _counterparts(
        *((type(s), type(t)) if self.to_ours else (type(t), type(s)))):
      self.fail(at, f"is {_describe(s)}, where the target holds {_describe(t)}: the source "
                "is another optimizer's state.")
    if set(t._fields) >= _INJECT:
      return self.injected(t, s, at)
    if fields is None:
      self.fail(at, f"is {_describe(s)}, where the target holds {_describe(t)}.")
    if set(fields) >= _INJECT and t._fields == ("count",):  # ours -> a schedule's count
      if not _leafless(fields["inner_state"]):
        self.fail(f"{at}.inner_state", f"holds {_describe(fields['inner_state'])}, where the "
                  "target keeps only a count.")
      return type(t)(self.leaf(t.count, fields["count"], f"{at}.count"))
    if set(fields) != set(t._fields):  # a field optcompose keeps and Optax does not?
      ours = [type(t)] if self.to_ours else [b for a, b in _pairs() if a is type(t)]
      for extra in (_OURS_ONLY[c] for c in ours if c in _OURS_ONLY):
        if set(fields) ^ set(t._fields) == set(extra) and (
            set(fields) < set(t._fields)) == self.to_ours:
          values = {f: rule(self, t, fields, f"{at}.{f}") for f, rule in extra.items()}
          fields = {f: v for f, v in fields.items() if f in t._fields}
          fields.update(values if self.to_ours else {})
          break
    if set(fields) == set(t._fields):
      return type(t)(*(self.node(v, fields[f], f"{at}.{f}") for f, v in zip(t._fields, t)))
    self.fail(at, f"is {_describe(s)}, where the target holds {_describe(t)}: {_REBUILD}")

  def injected(self, t, s, at):
    """A state of values that change while training (ours, or Optax's inject_hyperparams)."""
    fields = _fields(s)
    if fields is None or "count" not in fields:
      self.fail(at, f"is {_describe(s)}, where the target holds {_describe(t)}: {_REBUILD}")
    count = self.leaf(t.count, fields["count"], f"{at}.count")
    if set(fields) == {"count"}:  # Optax's ScaleByScheduleState, WeightDecaySchedule
      if not (self.to_ours and _leafless(t.inner_state)) or set(t._fields) != _INJECT:
        self.fail(at, f"is a schedule's count, where the target holds {_describe(t)}.")
      self.scheduled.append(t._replace(count=count))
      return self.scheduled[-1]
    if not _INJECT <= set(fields) <= _INJECT | {"hyperparams_states"}:
      self.fail(at, f"is {_describe(s)}, where the target holds {_describe(t)}: {_REBUILD}")
    for name, schedule in (fields.get("hyperparams_states") or {}).items():  # Optax's
      own = (_fields(schedule) or {}).get("count")
      if set(_fields(schedule) or {"?"}) != {"count"}:
        self.fail(f"{at}.hyperparams_states[{name!r}]", f"is {_describe(schedule)}: optcompose "
                  "schedules read the step count only (no stateful schedules).")
      if _concrete(own, fields["count"]) and np.asarray(own) != np.asarray(fields["count"]):
        self.fail(f"{at}.hyperparams_states[{name!r}].count", f"is {np.asarray(own)}, the "
                  f"state's count {np.asarray(fields['count'])}: optcompose keeps one count "
                  "for all schedules.")
    new = dict(count=count, hyperparams=self.mapping(t.hyperparams, fields["hyperparams"],
                                                     f"{at}.hyperparams", hyper=True),
               inner_state=self.node(t.inner_state, fields["inner_state"], f"{at}.inner_state"))
    if "hyperparams_states" in t._fields:  # Optax's: each schedule's count is the count
      for name, schedule in t.hyperparams_states.items():
        if getattr(schedule, "_fields", None) != ("count",):
          self.fail(f"{at}.count", f"cannot fill Optax's {_describe(schedule)} for `{name}`: "
                    "only schedules of the step count have an optcompose counterpart.")
      new["hyperparams_states"] = {name: schedule._replace(count=self.leaf(
          schedule.count, fields["count"], f"{at}.count"))
          for name, schedule in t.hyperparams_states.items()}
    return t._replace(**new)

  def leaf(self, t, s, at, hyper=False):
    if not _is_value(s):
      self.fail(at, f"is {_describe(s)}, expected {_describe(t)}.")
    key = jax.dtypes.issubdtype(_dtype(t), jax.dtypes.prng_key)
    if key != jax.dtypes.issubdtype(_dtype(s), jax.dtypes.prng_key):  # typed key <-> its data
      s = (jax.random.wrap_key_data(jnp.asarray(s), impl=jax.random.key_impl(t)) if key
           else jax.random.key_data(s))
    if np.shape(s) != np.shape(t):
      self.fail(at, f"has shape {np.shape(s)}, expected {np.shape(t)}.")
    if _dtype(s) != _dtype(t):
      kept = _concrete(s) and _kind(_dtype(s)) == _kind(_dtype(t)) and np.array_equal(
          np.asarray(s).astype(_dtype(t)).astype(_dtype(s)), np.asarray(s), equal_nan=True)
      if not (kept or (hyper and _kind(_dtype(t)) == "f" and _kind(_dtype(s)) in "fi")):
        self.fail(at, f"has dtype {_dtype(s)}, expected {_dtype(t)}: casting would change "
                  "its values (build the target with the source's dtypes).")
      s = jnp.asarray(s).astype(_dtype(t))
    if isinstance(t, jax.Array):
      return jax.device_put(s, t.sharding) if _concrete(t) else jnp.asarray(s)
    if isinstance(t, numbers.Number):
      return type(t)(np.asarray(s)[()])
    return np.asarray(s, _dtype(t))

  def custom(self, t, s, at):
    """Another pytree node (a FlatParams, a FrozenDict): the same one, or the state dict
    Flax made of it."""
    if jax.tree.structure(s) != jax.tree.structure(t) and isinstance(s, dict):
      try:
        from flax import serialization
        s = serialization.from_state_dict(t, s)
      except Exception as e:  # Flax's errors vary: reported
        self.fail(at, f"cannot be read as a {type(t).__name__} ({type(e).__name__}: {e}).")
    if jax.tree.structure(s) != jax.tree.structure(t):
      self.fail(at, f"is {_describe(s)}, expected {jax.tree.structure(t)}.")
    paths = jax.tree_util.tree_flatten_with_path(t)[0]
    return jax.tree.unflatten(jax.tree.structure(t), [
        self.leaf(a, b, at + jax.tree_util.keystr(p)) for (p, a), b in zip(paths, jax.tree.leaves(s))])


# optcompose's fields that Optax's counterpart lacks, {class: {field: rule}}: from Optax the
# rule gives the value, to Optax it checks that nothing is lost.


def _norm(walk, t, source, at):
  """Optax keeps no norm: 0, as after ``init``, until the next update."""
  return t.global_norm if walk.to_ours else None


def _gave_up(walk, t, source, at):
  """Optax keeps no such flag: it is known (False) only if no step was ever skipped."""
  known = source["total_notfinite"] if walk.to_ours else source["gave_up"]
  if _concrete(known) and not np.asarray(known).any():
    return t.gave_up if walk.to_ours else None
  walk.fail(at, "cannot be migrated: " + (
      "Optax's apply_if_finite does not record whether its consecutive non-finite steps "
      "reached max_consecutive_errors" if walk.to_ours else "Optax's apply_if_finite has no "
      "such flag") + "; set it by hand after migrating, or clear it before.")


_OURS_ONLY = {ClipByGlobalNormState: {"global_norm": _norm},
              ApplyIfFiniteState: {"gave_up": _gave_up}}


# ----------------------------------------------------------------------------------------
# The scheduled values in force, which Optax's bare counts do not hold.


def _values_in_force(fn, state, tx, params, scheduled, extra_args):
  """Replace the step-0 values of our InjectHyperparamsStates filled from a bare count by
  those the latest update used: one update of ``tx`` from each count minus one."""
  marked = {id(n) for n in scheduled if not _concrete(n.count) or np.asarray(n.count) > 0}
  todo = otree.find_nodes(state, lambda n: id(n) in marked)
  if not todo:
    return state
  probe = otree.replace_nodes(state, lambda n: id(n) in marked,
                              lambda n: n._replace(count=n.count - 1))
  try:
    _, after = tx.update(jax.tree.map(jnp.zeros_like, params), probe, params,
                         **(extra_args or {}))
  except Exception as e:  # reported, with what to do
    raise MigrationError(fn, "".join(f"[{k}]" for k in todo[0][0]), "holds a schedule's count "
                         "only (Optax's state); recomputing the value in force runs one update "
                         f"of `tx` on zero gradients, which failed ({type(e).__name__}: {e}). "
                         "Pass the keyword arguments its update needs as `extra_args`.") from e
  found = dict(otree.find_nodes(after, lambda n: isinstance(n, InjectHyperparamsState)))

  def used(path, node):
    new = found[path]
    if _concrete(new.count) and np.asarray(new.count) != np.asarray(node.count):
      return {k: jnp.full_like(v, jnp.nan) for k, v in node.hyperparams.items()}  # not reached
    return new.hyperparams

  values = {id(node): used(path, node) for path, node in todo}
  return otree.replace_nodes(state, lambda n: id(n) in values,
                             lambda n: n._replace(hyperparams=values[id(n)]))


# ----------------------------------------------------------------------------------------
# The two directions.


def from_optax_state(optax_state: Any, tx: Any, params: Any, *,
                     extra_args: Optional[dict] = None) -> Any:
  """The optcompose state of ``tx`` equivalent to an Optax optimizer's state.

  Args:
    optax_state: the Optax state: live, restored into Optax's template, or a plain restored
      pytree (Flax's ``msgpack_restore``, Orbax without a target).
    tx: the optcompose transformation built as the Optax one was (the same optimizer and
      chain, the same hyperparameters and schedules).
    params: the parameters (or any tree of their structure, shapes and dtypes).
    extra_args: keyword arguments ``tx.update`` needs (e.g. ``value=`` for plateau control),
      used only to recompute a schedule's value in force (see the module docstring).

  Returns:
    ``tx``'s state holding Optax's moments, counts and hyperparameters, its arrays placed as
    ``tx.init(params)`` places them.

  Raises:
    MigrationError: the state cannot be migrated; the message names the path.
  """
  walk = _Walk("from_optax_state", to_ours=True)
  state = walk.node(tx.init(params), optax_state, "")
  return _values_in_force(walk.fn, state, tx, params, walk.scheduled, extra_args)


def to_optax_state(state: Any, optax_tx: Any, params: Any) -> Any:
  """The Optax state of ``optax_tx`` equivalent to an optcompose state.

  Args:
    state: the optcompose state: live, restored, or a plain restored pytree.
    optax_tx: the Optax transformation built as the optcompose one was.
    params: the parameters (or any tree of their structure, shapes and dtypes).

  Returns:
    ``optax_tx``'s state holding the moments, counts and hyperparameters of ``state``.

  Raises:
    MigrationError: the state cannot be migrated; the message names the path.
  """
  with jax.numpy_dtype_promotion("standard"):  # Optax's code promotes implicitly
    template = optax_tx.init(params)
  return _Walk("to_optax_state", to_ours=False).node(template, state, "")
