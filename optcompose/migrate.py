"""Migrating optimizer states between Optax and optcompose, both ways.

::

    state = from_optax_state(optax_state, tx, params)      # Optax's state -> ours, for tx
    optax_state = to_optax_state(state, optax_tx, params)  # ours -> Optax's, for optax_tx

``tx`` and ``optax_tx`` are built alike (the same optimizer and chain, hyperparameters and
schedules). The target is initialised from ``params`` and filled from the source field by
field: moments, traces and counts are copied, not recomputed, so training continues as if it
had never switched library. The source may be live, restored into its library's template, or
a plain restored pytree (Flax's ``msgpack_restore``, Orbax without a target: tuples come back
as ``{'0': ...}`` dicts or lists, empty states as ``{}`` or ``None``), or Flax NNX's: an
``nnx.Optimizer``'s live ``opt_state``, or its ``nnx.to_pure_dict`` form (``{1: ...}``, the
states holding no array left out). NNX parameters (``nnx.state(model, nnx.Param)``) are read
as their pure dict too, and so is the result laid out; load it into an ``nnx.Optimizer``
built with ``tx``::

    state = from_optax_state(old_opt.opt_state, tx, nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    held = nnx.state(opt.opt_state)
    nnx.replace_by_pure_dict(held, nnx.to_pure_dict(nnx.state(state)))
    nnx.update(opt.opt_state, held)

Where the libraries keep one optimizer in different states:

* a schedule: Optax keeps its count (``ScaleByScheduleState``, ``WeightDecaySchedule`` in a
  ``MaskedState``), optcompose also the value the latest update used, for logging. The count
  is copied; the value is recomputed by one jitted update of ``tx`` on zero gradients (only
  the values are computed), so ``current_hyperparams`` reads the value in force. Where that
  update does not reach the node (``multi_steps`` between real steps) it reads NaN until the
  node's next update; no step reads it (it is recomputed from the count);
* ``inject_hyperparams``: Optax keeps a count per schedule, optcompose one: they must agree;
* ``clip_by_global_norm``: optcompose's logged norm reads 0 (as after ``init``) until the
  next update; ``apply_if_finite``: ``gave_up`` is False if no step was ever skipped, else
  unknown (an error).

Anything else that differs raises :class:`MigrationError` naming the path in the source
(``state[1][0].mu['w']``) and what each side holds there: another optimizer's state, a
schedule on one side only, another shape, a cast that would change a value. Hyperparameter
values are rounded to the target's dtype (Optax stores a float32 schedule's value as float32).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NoReturn, Optional, cast

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import InjectHyperparamsState
from optcompose.transforms.clipping import ClipByGlobalNormState
from optcompose.wrappers.finite import ApplyIfFiniteState
from optcompose._migrate_match import (
  _pairs,
  _counterparts,
  _is_namedtuple,
  _is_masked,
  _leafless,
  _fields,
  _items,
  _is_value,
  _dtype,
  _kind,
  _concrete,
  _describe,
  _plain_source,
)

__all__ = ["MigrationError", "from_optax_state", "to_optax_state"]

_INJECT = {"count", "hyperparams", "inner_state"}  # + "hyperparams_states" (Optax's)
_REBUILD = (
  "the source is another optimizer's state, or was built with other hyperparameters "
  "(build the target as the source was: the same chain, the same schedules)."
)


class MigrationError(ValueError):
  """A state cannot be migrated; ``path`` locates the node in the source state."""

  def __init__(self, fn: str, path: str, message: str):
    self.fn, self.path = fn, path
    super().__init__(f"{fn}: state{path} {message}")


class _Walk:
  """The target's initial state ``t``, filled from the source ``s``; ``at``: the source path."""

  def __init__(self, fn: str, to_ours: bool):
    self.fn, self.to_ours = fn, to_ours
    self.scheduled = []  # our InjectHyperparamsStates filled from a bare count

  def fail(self, at, message) -> NoReturn:
    raise MigrationError(self.fn, at, message)

  def node(self, t, s, at):
    if _leafless(t) and _leafless(s):
      return t
    if _is_namedtuple(t):
      return self.named(t, s, at)
    if isinstance(t, (tuple, list)):
      items = _items(s, len(t))
      if items is None or len(items) != len(t):
        self.fail(
          at,
          f"is {_describe(s)}, where the target holds {_describe(t)}: the "
          "source is another optimizer's state.",
        )
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
    fill = functools.partial(self.leaf, hyper=True) if hyper else self.node
    return type(t)((k, fill(v, s[by_str[str(k)]], f"{at}[{k!r}]")) for k, v in t.items())

  def named(self, t, s, at):
    fields = _fields(s)
    masked = _is_masked(s) or (isinstance(s, dict) and set(s) == {"inner_state"})
    if masked and not _is_masked(t):  # Optax masks what optcompose masks inside (a decay)
      return self.node(t, cast(dict, fields)["inner_state"], f"{at}.inner_state")
    if _is_masked(t) and not masked:
      return type(t)(self.node(t.inner_state, s, at))
    pair = (type(s), type(t)) if self.to_ours else (type(t), type(s))
    if _is_namedtuple(s) and not _counterparts(*pair):
      self.fail(
        at,
        f"is {_describe(s)}, where the target holds {_describe(t)}: the source "
        "is another optimizer's state.",
      )
    if set(t._fields) >= _INJECT:
      return self.injected(t, s, at)
    if fields is None:
      self.fail(at, f"is {_describe(s)}, where the target holds {_describe(t)}.")
    if isinstance(s, dict):  # Flax NNX's pure dict leaves out the fields holding no array
      fields.update({f: None for f in t._fields if f not in fields and _leafless(getattr(t, f))})
      if {"count", "hyperparams"} <= set(fields):  # an injected state's empty inner state
        fields.setdefault("inner_state", None)
    if set(fields) >= _INJECT and t._fields == ("count",):  # ours -> a schedule's count
      if not _leafless(fields["inner_state"]):
        self.fail(
          f"{at}.inner_state",
          f"holds {_describe(fields['inner_state'])}, where the target keeps only a count.",
        )
      return type(t)(self.leaf(t.count, fields["count"], f"{at}.count"))
    if set(fields) != set(t._fields):  # a field optcompose keeps and Optax does not?
      ours = [type(t)] if self.to_ours else [b for a, b in _pairs() if a is type(t)]
      for extra in (_OURS_ONLY[c] for c in ours if c in _OURS_ONLY):
        if (
          set(fields) ^ set(t._fields) == set(extra)
          and (set(fields) < set(t._fields)) == self.to_ours
        ):
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
    if isinstance(s, dict) and "hyperparams" in s:  # NNX's pure dict: an empty inner state
      fields = {"inner_state": None, **s}  # left out
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
      where, own = f"{at}.hyperparams_states[{name!r}]", _fields(schedule) or {}
      if set(own) != {"count"}:
        self.fail(
          where,
          f"is {_describe(schedule)}: optcompose's schedules read the step "
          "count only (no stateful schedules).",
        )
      if _concrete(own["count"], count) and np.asarray(own["count"]) != np.asarray(count):
        self.fail(
          f"{where}.count",
          f"is {np.asarray(own['count'])}, the state's count "
          f"{np.asarray(count)}: optcompose keeps one count for all schedules.",
        )
    new = dict(
      count=count,
      hyperparams=self.mapping(
        t.hyperparams, fields["hyperparams"], f"{at}.hyperparams", hyper=True
      ),
      inner_state=self.node(t.inner_state, fields["inner_state"], f"{at}.inner_state"),
    )
    if "hyperparams_states" in t._fields:  # Optax's: each schedule's count is the count
      for name, schedule in t.hyperparams_states.items():
        if getattr(schedule, "_fields", None) != ("count",):
          self.fail(
            f"{at}.hyperparams_states[{name!r}]",
            f"cannot fill {_describe(schedule)}"
            ": only schedules of the step count have an optcompose counterpart.",
          )
      new["hyperparams_states"] = {
        name: schedule._replace(count=self.leaf(schedule.count, count, f"{at}.count"))
        for name, schedule in t.hyperparams_states.items()
      }
    return t._replace(**new)

  def leaf(self, t, s, at, hyper=False):
    if not _is_value(s):
      self.fail(at, f"is {_describe(s)}, expected {_describe(t)}.")
    key = jax.dtypes.issubdtype(_dtype(t), jax.dtypes.prng_key)
    if key != jax.dtypes.issubdtype(_dtype(s), jax.dtypes.prng_key):  # typed key <-> its data
      s = (
        jax.random.wrap_key_data(jnp.asarray(s), impl=jax.random.key_impl(t))
        if key
        else jax.random.key_data(s)
      )
    if np.shape(s) != np.shape(t):
      self.fail(at, f"has shape {np.shape(s)}, expected {np.shape(t)}.")
    if _dtype(s) != _dtype(t):
      kept = (
        _concrete(s)
        and _kind(_dtype(s)) == _kind(_dtype(t))
        and np.array_equal(
          np.asarray(s).astype(_dtype(t)).astype(_dtype(s)), np.asarray(s), equal_nan=True
        )
      )
      if not (kept or (hyper and _kind(_dtype(t)) == "f" and _kind(_dtype(s)) in "fi")):
        self.fail(
          at,
          f"has dtype {_dtype(s)}, expected {_dtype(t)}: casting would change "
          "its values (build the target with the source's dtypes).",
        )
      s = jnp.asarray(s).astype(_dtype(t))
    if isinstance(t, jax.Array):  # placed as t, uncommitted where it can be (as init's are)
      s = jax.device_put(s)
      return s if not _concrete(t) or s.sharding == t.sharding else jax.device_put(s, t.sharding)
    if isinstance(t, numbers.Number):
      return cast(Callable[[Any], Any], type(t))(np.asarray(s)[()])
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
    return jax.tree.unflatten(
      jax.tree.structure(t),
      [
        self.leaf(a, b, at + jax.tree_util.keystr(p))
        for (p, a), b in zip(paths, jax.tree.leaves(s))
      ],
    )


# optcompose's fields that Optax's counterpart lacks, {class: {field: rule}}: from Optax the
# rule gives the value, to Optax it checks that nothing is lost.


def _gave_up(walk, t, source, at):
  """Optax keeps no such flag: it is known (False) only if no step was ever skipped."""
  known = source["total_notfinite"] if walk.to_ours else source["gave_up"]
  if _concrete(known) and not np.asarray(known).any():
    return t.gave_up if walk.to_ours else None
  walk.fail(
    at,
    "cannot be migrated: Optax's apply_if_finite "
    + (
      "does not record whether max_consecutive_errors was reached, and this run skipped "
      f"{np.asarray(known)} steps. Migrate its inner_state alone (with the inner "
      "optimizer) and build the state around it: ApplyIfFiniteState(notfinite_count, "
      "last_finite, total_notfinite, inner_state, gave_up) with the flag you know."
      if walk.to_ours
      else "has no such flag: clear it first (state._replace(gave_up=False)) if the "
      "run should go on."
    ),
  )


_OURS_ONLY = {  # the logged norm: 0, as after init, until the next update
  ClipByGlobalNormState: {"global_norm": lambda walk, t, *_: walk.to_ours and t.global_norm},
  ApplyIfFiniteState: {"gave_up": _gave_up},
}


def _values_in_force(fn, state, tx, params, scheduled, extra_args):
  """Replace the step-0 values of our InjectHyperparamsStates filled from a bare count by
  those the latest update used: one update of ``tx`` from each count minus one, jitted so
  that only the values are computed."""
  marked = {id(n) for n in scheduled if not _concrete(n.count) or np.asarray(n.count) > 0}
  todo = otree.find_nodes(state, lambda n: id(n) in marked)
  if not todo:
    return state
  probe = otree.replace_nodes(
    state, lambda n: id(n) in marked, lambda n: n._replace(count=n.count - 1)
  )

  def in_force(probe, params):
    _, after = tx.update(jax.tree.map(jnp.zeros_like, params), probe, params, **(extra_args or {}))
    return {
      path: (n.count, n.hyperparams)
      for path, n in otree.find_nodes(after, lambda n: isinstance(n, InjectHyperparamsState))
    }  # nothing else is computed

  try:
    found = jax.jit(in_force)(probe, params)
  except Exception as e:  # reported, with what to do
    raise MigrationError(
      fn,
      "".join(f"[{k}]" for k in todo[0][0]),
      "holds a schedule's count "
      "only (Optax's state); recomputing the value in force runs one update "
      f"of `tx` on zero gradients, which failed ({type(e).__name__}: {e}). "
      "Pass the keyword arguments its update needs as `extra_args`.",
    ) from e

  def used(path, node):
    count, hyperparams = found[path]
    if _concrete(count) and np.asarray(count) != np.asarray(node.count):
      return {k: jnp.full_like(v, jnp.nan) for k, v in node.hyperparams.items()}  # not reached
    return hyperparams

  values = {id(node): used(path, node) for path, node in todo}
  return otree.replace_nodes(
    state, lambda n: id(n) in values, lambda n: n._replace(hyperparams=values[id(n)])
  )


def from_optax_state(
  optax_state: Any, tx: Any, params: Any, *, extra_args: Optional[dict] = None
) -> Any:
  """The optcompose state of ``tx`` equivalent to an Optax optimizer's state.

  Args:
    optax_state: the Optax state: live, restored into Optax's template, or a plain restored
      pytree (Flax's ``msgpack_restore``, Orbax without a target).
    tx: the optcompose transformation built as the Optax one was (module docstring).
    params: the parameters (or any tree of their structure, shapes and dtypes).
    extra_args: keyword arguments ``tx.update`` needs (``value=`` for plateau control), to
      recompute a schedule's value in force (module docstring).

  Returns:
    ``tx``'s state holding Optax's moments, counts and hyperparameters, placed as
    ``tx.init(params)`` places its arrays.

  Raises:
    MigrationError: the state cannot be migrated; the message names the path.
  """
  walk = _Walk("from_optax_state", to_ours=True)
  params = _plain_source(params)
  state = walk.node(tx.init(params), _plain_source(optax_state), "")
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
  params = _plain_source(params)
  with jax.numpy_dtype_promotion("standard"):  # Optax's code promotes implicitly
    template = optax_tx.init(params)
  return _Walk("to_optax_state", to_ours=False).node(template, _plain_source(state), "")
