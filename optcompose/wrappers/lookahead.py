"""Lookahead: k fast steps forward, one step back toward the slow weights.

The paper's two nested loops (phi: slow weights, theta: fast weights, alpha: slow step
size, k: sync period)::

    repeat:
      theta <- phi
      k times: theta <- theta + fast_optimizer_update(grad(theta))
      phi <- phi + alpha (theta - phi)

are unrolled into one update per gradient, on parameters that hold both copies,
``LookaheadParams(fast=theta, slow=phi)``. With ``u`` the fast optimizer's update and
``d = theta + u - phi`` (where the fast weights would land)::

    ordinary step:        theta <- theta + u                     phi <- phi
    every k-th step:      theta <- theta + u - (1 - alpha) d     phi <- phi + alpha d
                          (so that both land on phi + alpha d: the sync)

Two forms, one arithmetic:

* :func:`lookahead` -- Optax's semantics and names (``optax.lookahead``, ``LookaheadState``,
  ``LookaheadParams``): the params are the pair, gradients are taken at ``params.fast``,
  evaluation uses ``params.slow``. With the update jitted, trajectories are bitwise Optax's.
* :func:`lookahead_in_state` -- the params are the fast weights alone and the slow weights
  live in the optimizer state (as in Keras and PyTorch), so it drops into anything that
  trains one params tree (``nnx.Optimizer``, ``TrainState``, ``optax.chain``). Read the slow
  weights with :func:`slow_params`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core.base import is_float0
from optcompose.core import (
  FLAG,
  INNER,
  GradientTransformation,
  apply_updates,
  as_transformation,
  cond,
  expect_state,
  integer,
  needs_params,
  public,
  real,
  with_step,
  zero_count,
)

_LOOKAHEAD = dict(
  fast_optimizer=INNER,
  sync_period=integer(1, draw=(1, 4)),
  slow_step_size=real(0.0, 1.0, draw=(0.05, 1.0), schedule=False),
  reset_state=FLAG,
)


class LookaheadState(NamedTuple):
  """State of :func:`lookahead`.

  Attributes:
    fast_state: the fast optimizer's state.
    steps_since_sync: int32, fast steps taken since the last synchronisation.
  """

  fast_state: Any
  steps_since_sync: jax.Array


class LookaheadParams(NamedTuple):
  """The fast and the slow weights, trained together.

  Compute gradients at ``fast``; evaluate (test, infer) with ``slow``. Any NamedTuple with
  fields ``fast`` and ``slow`` (e.g. ``optax.LookaheadParams``) is accepted; the updates
  come back in the same type as the params, so ``apply_updates`` matches them.
  """

  fast: Any
  slow: Any

  @classmethod
  def init_synced(cls, params) -> "LookaheadParams":
    """Both copies start at ``params``."""
    return cls(fast=params, slow=params)


def _is_pair(params) -> bool:
  fields = getattr(params, "_fields", ())
  return "fast" in fields and "slow" in fields


def fast_update_leaf(u, d, alpha, sync):
  """The fast weights' update: ``u``, or ``u - (1 - alpha) d`` at a sync. An integer or
  boolean leaf (masked out of the fast optimizer, say) cannot be interpolated without
  rounding: its update is ``u``, and the slow weights take the fast ones at a sync."""
  if not jnp.issubdtype(jnp.result_type(d), jnp.inexact):
    return u
  return u - jnp.where(sync, (1 - alpha) * d, jnp.zeros_like(d))


def slow_update_leaf(d, alpha, sync):
  """The slow weights' update: 0, or ``alpha d`` at a sync (``d`` for an integer or boolean
  leaf: see :func:`fast_update_leaf`)."""
  if not jnp.issubdtype(jnp.result_type(d), jnp.inexact):
    return jnp.where(sync, d, jnp.zeros_like(d))
  return jnp.where(sync, alpha * d, jnp.zeros_like(d))


@public("wrapper", optax="lookahead", **_LOOKAHEAD)
def lookahead(
  fast_optimizer: Any, sync_period: int, slow_step_size: float, reset_state: bool = False
) -> GradientTransformation:
  """Lookahead around any optimizer (optcompose or Optax).

  Update (theta = ``params.fast``, phi = ``params.slow``, alpha = ``slow_step_size``,
  k = ``sync_period``, u the fast optimizer's update, ``d = theta + u - phi``)::

      ordinary step:    theta <- theta + u                    phi <- phi
      every k-th step:  theta <- theta + u - (1 - alpha) d    phi <- phi + alpha d

  ``params`` must be a :class:`LookaheadParams` (``init`` also accepts the plain fast
  parameters, as Optax's does); ``updates`` are the gradients at ``params.fast``. The
  returned updates are a ``LookaheadParams`` of updates for both copies: apply them as they
  are, modifying them would desynchronise the copies. See the module docstring for the
  paper's loops this unrolls.

  Differences from ``optax.lookahead`` (with the update jitted, trajectories are bitwise
  Optax's for the same fast optimizer): the arguments are validated (Optax only checks
  ``sync_period >= 1``); a non-finite fast state or fast weights do not turn the slow
  weights or the reset state into NaN before the sync, and integer counts keep their
  dtype; ``init`` accepts plain parameters silently (Optax logs a warning); the fast
  optimizer receives the update's keyword arguments (e.g. ``value=``).

  Args:
    fast_optimizer: the inner optimizer, e.g. ``optcompose.adam(1e-3)``.
    sync_period: k >= 1, fast steps per synchronisation (k = 1 with alpha = 1 is the fast
      optimizer alone).
    slow_step_size: alpha in [0, 1], the slow weights' step toward the fast ones.
    reset_state: re-initialise the fast optimizer's state at each synchronisation.

  Returns:
    A transformation with state :class:`LookaheadState` (Optax's fields); its updates are
    a ``LookaheadParams`` (of the params' type).

  Raises:
    ValueError: (from ``update``) ``params`` is not a pair, or ``updates``, ``params.fast``,
      ``params.slow`` and the fast optimizer's updates differ in structure or a leaf's
      shape (the message names the path and both shapes; nothing is broadcast).

  References:
    Zhang, Lucas, Hinton and Ba, "Lookahead Optimizer: k steps forward, 1 step back",
    NeurIPS 2019.
  """
  fn = "lookahead"
  fast_optimizer = as_transformation(fast_optimizer, "lookahead: `fast_optimizer`")
  fast_update = fast_optimizer.update

  def init(params):
    fast = params.fast if _is_pair(params) else params
    return LookaheadState(fast_state=fast_optimizer.init(fast), steps_since_sync=zero_count())

  def update(updates, state, params: Any = None, **extra):
    expect_state(state, LookaheadState, fn)
    if not _is_pair(params):
      raise ValueError(
        f"{fn}: `params` must be a LookaheadParams(fast, slow), got "
        f"{type(params).__name__}; start with LookaheadParams.init_synced(params)."
      )
    # Nothing broadcast: d = fast + u - slow would take the union of mismatched shapes.
    otree.check_same_structure(updates, params.fast, "updates", "params.fast")
    otree.check_same_structure(params.slow, params.fast, "params.slow", "params.fast")
    u, fast_state = fast_update(updates, state.fast_state, params.fast, **extra)
    otree.check_same_structure(u, params.fast, "fast_optimizer's updates", "params.fast")
    sync = state.steps_since_sync == sync_period - 1
    d = jax.tree.map(  # a float0 update (an integer leaf's, passed on by a mask): d = 0
      lambda f, g, s: jnp.zeros_like(f) if is_float0(g) else f + g - s, params.fast, u, params.slow
    )
    # Selections use jnp.where, not Optax's product with the 0/1 sync flag: the same values,
    # but a non-finite d or fast state is never multiplied by 0 (NaN), and ints keep dtype.
    fast_u = jax.tree.map(lambda g, e: fast_update_leaf(g, e, slow_step_size, sync), u, d)
    slow_u = jax.tree.map(lambda e: slow_update_leaf(e, slow_step_size, sync), d)
    if reset_state:
      fresh = fast_optimizer.init(params.fast)
      fast_state = jax.tree.map(lambda c, i: jnp.where(sync, i, c), fast_state, fresh)
    steps = (state.steps_since_sync + 1) % sync_period
    return params._replace(fast=fast_u, slow=slow_u), LookaheadState(fast_state, steps)

  return GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------
# The slow weights in the optimizer state: one params tree, as in Keras and PyTorch.


class LookaheadSlowState(NamedTuple):
  """State of :func:`lookahead_in_state`.

  Attributes:
    lookahead: the state of the wrapped lookahead (a :class:`LookaheadState`).
    slow: the slow weights, with the parameters' structure.
  """

  lookahead: Any
  slow: Any


def _check_slow_state(updates, state, params) -> None:
  """What a call on the fast weights with the slow weights in the state needs (``update``
  and the step-level form alike)."""
  needs_params(params, "lookahead_in_state (the fast weights)")
  expect_state(state, LookaheadSlowState, "lookahead_in_state")
  otree.check_same_structure(updates, params, "updates", "params")
  otree.check_same_structure(params, state.slow, "params", "state.slow")
  otree.check_same_dtypes(params, state.slow, "params", "state.slow")


def slow_weights_in_state(pair_lookahead: Any) -> GradientTransformation:
  """Run a lookahead written for ``LookaheadParams`` (:func:`lookahead`, or
  ``optax.lookahead``) on plain parameters, keeping the slow weights in the state.

  ``params`` are the fast weights; the returned updates are the fast weights' updates; the
  slow weights' updates are applied to ``state.slow`` (rounded to each leaf's dtype, as
  ``apply_updates`` does). The trajectory of the fast weights is the wrapped lookahead's.

  Raises:
    ValueError: (from ``update``) ``updates``, ``params`` and ``state.slow`` differ in
      structure or a leaf's shape (naming the path and both shapes).
    TypeError: (from ``update``) a leaf of ``params`` has another dtype than the slow
      weights kept since ``init`` (they would be silently rounded).
  """
  pair_lookahead = as_transformation(pair_lookahead, "lookahead_in_state")

  def init(params):
    slow = jax.tree.map(lambda p: jnp.array(p), params)
    return LookaheadSlowState(pair_lookahead.init(LookaheadParams(params, params)), slow)

  def update(updates, state, params=None, **extra):
    _check_slow_state(updates, state, params)
    pair = LookaheadParams(fast=params, slow=state.slow)
    u, inner = pair_lookahead.update(updates, state.lookahead, pair, **extra)
    u = cast(LookaheadParams, u)  # the updates of a pair are a pair
    slow = jax.tree.map(lambda s, d: jnp.asarray(s + d).astype(s.dtype), state.slow, u.slow)
    return u.fast, LookaheadSlowState(inner, slow)

  return GradientTransformation(init, update)


@public("wrapper", **_LOOKAHEAD)
def lookahead_in_state(
  fast_optimizer: Any, sync_period: int, slow_step_size: float, reset_state: bool = False
) -> GradientTransformation:
  """:func:`lookahead` with the slow weights kept in the optimizer state.

  Update (theta = ``params``, phi = ``state.slow``, u the fast optimizer's update,
  ``d = theta + u - phi``)::

      ordinary step:    theta <- theta + u                    phi <- phi
      every k-th step:  theta <- theta + u - (1 - alpha) d    phi <- phi + alpha d

  The returned updates move theta; phi is updated in the state. The model holds only the
  fast weights (``params``), as with Keras' and PyTorch's Lookahead optimizers; so it
  works wherever one params tree is trained: Flax's ``TrainState`` and ``nnx.Optimizer``,
  ``optax.chain``, :func:`optcompose.chain`. At every ``sync_period``-th step the fast
  weights are pulled to the new slow weights ``phi + alpha (theta + u - phi)``; between
  syncs the slow weights wait in ``state.slow`` (read them with :func:`slow_params` to
  evaluate, or evaluate the fast weights right after a sync, when both agree: bit for bit
  through :func:`optcompose.step`; through ``update`` and ``apply_updates``, to the last
  bit, since the fast weights are ``theta + (u - (1 - alpha) d)`` rounded). Same
  arguments and fast-weight trajectory as :func:`lookahead` (and ``optax.lookahead``).

  Args:
    fast_optimizer: the inner optimizer (optcompose's or Optax's).
    sync_period: k >= 1, fast steps per synchronisation.
    slow_step_size: alpha in [0, 1], the slow weights' step toward the fast ones.
    reset_state: re-initialise the fast optimizer's state at each synchronisation.

  Returns:
    A transformation that needs ``params`` (the fast weights), with state
    :class:`LookaheadSlowState` (``lookahead``: a :class:`LookaheadState`; ``slow``).

  Raises:
    ValueError: (from ``update``) ``updates``, ``params`` and ``state.slow`` differ in
      structure or shape. TypeError: (from ``update``) ``params`` changed dtype since
      ``init`` (the slow weights would be silently rounded).

  References:
    Zhang, Lucas, Hinton and Ba, "Lookahead Optimizer: k steps forward, 1 step back",
    NeurIPS 2019.
  """
  tx = slow_weights_in_state(lookahead(fast_optimizer, sync_period, slow_step_size, reset_state))
  fast_optimizer = as_transformation(fast_optimizer, "lookahead_in_state")

  def step(grads, state, params, **extra):
    """The whole call (:func:`optcompose.step`): the fast step applied in place, then, at a
    synchronisation only, ``phi + alpha (theta' - phi)`` written to both copies inside a
    conditional that reads only them (as an update, the two copies' updates each read what
    the other writes, and XLA copies both at every step: 2.4x AdamW on XLA CPU at 16.8M
    parameters, against 1.1x this way). The fast weights at a synchronisation are the new
    slow weights exactly, where ``update`` reaches them as ``theta + u - (1 - alpha) d``
    (equal to rounding)."""
    _check_slow_state(grads, state, params)
    inner = expect_state(state.lookahead, LookaheadState, "lookahead_in_state")
    u, fast_state = fast_optimizer.update(grads, inner.fast_state, params, **extra)
    otree.check_same_structure(u, params, "fast_optimizer's updates", "params")

    # As update does: the fresh state from the fast weights before this step.
    fresh = fast_optimizer.init(params) if reset_state else None

    def pull(operands):
      theta, slow, fast_state, fresh = operands
      new = jax.tree.map(
        lambda s, f: jnp.asarray(s + slow_step_size * (f - s)).astype(s.dtype), slow, theta
      )
      return jax.tree.map(jnp.copy, new), new, fast_state if fresh is None else fresh

    theta, slow, fast_state = cond(
      inner.steps_since_sync == sync_period - 1,
      pull,
      lambda operands: operands[:3],
      (apply_updates(params, u), state.slow, fast_state, fresh),
    )
    steps = (inner.steps_since_sync + 1) % sync_period
    return theta, LookaheadSlowState(LookaheadState(fast_state, steps), slow)

  return GradientTransformation(tx.init, with_step(tx.update, step))


def slow_params(state) -> Any:
  """The slow weights held by a :func:`lookahead_in_state` state, for evaluation.

  Args:
    state: an optimizer state holding exactly one :class:`LookaheadSlowState` anywhere (a
      chain's tuple, a wrapper's state).

  Returns:
    Its ``slow`` weights (phi), a tree with the parameters' structure.

  Raises:
    ValueError: the state holds no :class:`LookaheadSlowState`, or more than one.

  References:
    Zhang, Lucas, Hinton and Ba, "Lookahead Optimizer: k steps forward, 1 step back",
    NeurIPS 2019.
  """
  found = [node for _, node in otree.find_nodes(state, lambda x: isinstance(x, LookaheadSlowState))]
  if len(found) != 1:
    raise ValueError(
      f"slow_params: the state holds {len(found)} lookahead_in_state states; expected exactly one."
    )
  return found[0].slow


__all__ = [
  "LookaheadParams",
  "LookaheadSlowState",
  "LookaheadState",
  "slow_params",
]  # and the builders it registers
