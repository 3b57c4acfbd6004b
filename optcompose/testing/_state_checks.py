"""State checks of the property kit that look at buffers and types rather than values:
a state that can be donated, a state that keeps its types (weak types included) so that a
jitted step is traced once, inputs that update leaves as they were, the state leaves init
marks as unknown, and parameters made strongly typed before a run."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optcompose import tree as otree


def _strong(params):
  """``params`` with weak types made strong, as ``apply_updates`` returns them: a weakly typed
  leaf (``jnp.array(1.0)``) would retrace a jitted step once, which is not the
  transformation's doing."""
  return jax.tree.map(
    lambda x: jnp.asarray(x, jnp.result_type(x)) if getattr(x, "weak_type", False) else x, params
  )


def _py(x) -> bool:
  """Whether ``x`` is a Python number (a state leaf that should be an array)."""
  return isinstance(x, (bool, int, float, complex))


def check_state_can_be_donated(tx, params) -> None:
  """No two leaves of ``init``'s state share a buffer, and none is a buffer of ``params``, so
  a jitted step can donate the state and the parameters (``jax.jit(step, donate_argnums=...)``:
  XLA refuses to donate one buffer twice, and donating the state alone would delete the
  parameters that share it); and no leaf is one buffer in two calls of ``init`` (an array
  made once, at module level or when the transformation was built: the first donating step
  deletes it, and every later ``init`` returns a deleted array)."""
  first = tx.init(params)
  _assert_donatable(params, first, "init")
  again = {_buffer(x): otree.path_str(p) for p, x in _arrays(tx.init(params))}
  for path, x in _arrays(first):
    assert _buffer(x) not in again, (
      f"init returned one buffer at state{otree.path_str(path)} in two calls: an array made "
      "once, when the transformation was built or at module level, is deleted by the first "
      "step that donates the state, and every later init returns it deleted. Make it inside "
      "init (jnp.zeros(...)) or copy it there (jnp.array(x))."
    )


def _arrays(tree) -> list:
  """The ``(path, array)`` leaves of ``tree`` that hold buffers (no tracers, no numbers)."""
  return [
    (path, x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
  ]


def _buffer(x) -> tuple:
  """What identifies the memory of ``x``: the buffers of its shards on this process's devices
  (an empty array has no memory: on GPU every one reports the same address, but two of them
  are two buffers, so it is known by the object; one array object twice is still one buffer)."""
  if not x.size:
    return ("empty", id(x))
  return tuple(sorted((s.device.id, s.data.unsafe_buffer_pointer()) for s in x.addressable_shards))


def _assert_donatable(params, state, made_by: str) -> None:
  """No two leaves of ``state`` share a buffer, and none is a buffer of ``params`` (unless
  ``params`` is None: an update's state may keep the parameters it was given, which the
  caller replaces with ``apply_updates``' new ones)."""
  seen = {}
  for name, tree in (("params", params if params is not None else ()), ("state", state)):
    for path, x in _arrays(tree):
      here = f"{name}{otree.path_str(path)}"
      key = _buffer(x)
      if name == "state":
        assert key not in seen, (
          f"{here} and {seen.get(key)} are one buffer: the state from {made_by} cannot be "
          "donated"
          + (
            f" ({made_by} must copy the parameters it keeps)"
            if seen[key].startswith("params")
            else ""
          )
        )
      seen.setdefault(key, here)


def _retraced(traces, steps: int, state0, records) -> str:
  """Why the jitted update was traced again: the first state leaf whose type changed (a
  weak type included, which ``jnp.result_type`` does not show)."""
  kind = lambda x: (jnp.shape(x), jnp.result_type(x), bool(getattr(x, "weak_type", False)))
  name = lambda k: f"{'weakly typed ' if k[2] else ''}{k[1]}{list(k[0])}"
  cause = ""
  for t, (_, _, state) in enumerate(records):
    for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(state0)
    ):
      if kind(a) != kind(b):
        cause = (
          f": state{otree.path_str(path)} is {name(kind(b))} from init and {name(kind(a))} "
          f"after step {t} ({_remedy(kind(b), kind(a))})"
        )
        break
    if cause:
      break
  return f"the jitted update was traced {len(traces)} times in {steps} steps{cause}"


def _remedy(made, returned) -> str:
  """What to change where init's ``(shape, dtype, weak)`` differs from update's."""
  if returned[2] and not made[2]:
    return (
      "update returns a weakly typed value, e.g. from a Python number through jnp.where: "
      f"give it init's dtype there, jnp.asarray(value, jnp.{made[1]})"
    )
  if made[2]:
    return f"give init's value a dtype, e.g. jnp.zeros({list(made[0])}, jnp.{returned[1]})"
  return "init and update must give each state leaf the same shape and dtype"


_INPUTS = ("state", "updates", "params")  # what update is given, in record_steps' order


def _assert_inputs_kept(given: list, now: list, when: str) -> None:
  """``update`` left the ``(state, updates, params)`` it was given as they were: the same
  leaf objects at the same paths (``given`` and ``now``: each tree flattened with its paths,
  before and after the call). A dict rewritten in place would show as a difference between
  the jitted and the eager run, far from its cause."""
  for which, before, after in zip(_INPUTS, given, now):
    changed = [p for (p, a), (q, b) in zip(before, after) if p != q or a is not b]
    if len(before) != len(after) and not changed:  # a leaf added or removed at the end
      changed = [(before if len(before) > len(after) else after)[-1][0]]
    if changed:
      raise AssertionError(
        f"{when}: update changed the {which} it was given, in place ({which}"
        f"{otree.path_str(changed[0])}): return new trees and leave the ones given as they were"
      )


def _unknown(state0) -> set:
  """The paths, as :func:`_assert_finite` sees them in ``(params, updates, state)``, of the
  scalar state leaves that ``init`` made NaN: a value documented as not known, such as
  ``with_diagnostics``' learning rate where none is recorded or given (an array of
  statistics initialised NaN is still a fault the kit reports)."""
  return {
    (jax.tree_util.SequenceKey(2), *path)
    for path, x in jax.tree_util.tree_flatten_with_path(state0)[0]
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and jnp.ndim(x) == 0 and bool(jnp.isnan(x))
  }
