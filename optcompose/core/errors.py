"""The errors every transformation raises the same way: a state its ``init`` did not make,
and missing ``params``."""

from __future__ import annotations

from typing import Any


class StateMismatchError(ValueError):
  """An ``update`` got a state its ``init`` did not make (e.g. another optimizer's)."""

  def __init__(self, who: str, expected: str, got: Any, path: str = ""):
    self.who, self.expected, self.got, self.path = who, expected, got, path
    where = f"state{path}" if path else "the state"
    name = type(got).__name__
    if type(got).__module__ == "builtins":  # a plain container: its length says more
      name += f" of length {len(got)}" if isinstance(got, (tuple, list, dict)) else ""
    elif not type(got).__module__.startswith("optcompose"):  # another library's (Optax's)
      name = f"{type(got).__module__}.{name} (not optcompose's)"
    a = lambda word: f"an {word}" if word[:1] in "AEIOUaeiou" else f"a {word}"  # noqa: E731
    super().__init__(
      f"{who}: {where} is {a(name)}, expected {a(expected)}. Pass the state "
      "returned by this transformation's own init (not another optimizer's)."
    )

  def at(self, prefix: str) -> "StateMismatchError":
    return StateMismatchError(self.who, self.expected, self.got, prefix + self.path)


def expect_state(state: Any, state_type: type, who: str) -> Any:
  """Return ``state`` if it is a ``state_type``; else raise a :class:`StateMismatchError`."""
  if not isinstance(state, state_type):
    raise StateMismatchError(who, state_type.__name__, state)
  return state


def needs_params(params: Any, who: str) -> Any:
  """Return ``params``; raise the one "needs params" error if they are missing."""
  if params is None:
    raise ValueError(f"{who} needs `params`: call update(updates, state, params).")
  return params
