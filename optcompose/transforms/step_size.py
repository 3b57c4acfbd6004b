"""Step sizes set by the gradients' signs (Rprop) or by the objective's value (Polyak).

Formulas (g: incoming update; per element for Rprop)::

    Rprop:   p = g d_{t-1}                       (d: the step stored at the last call)
             s_t = s_{t-1}                               where p = 0
                 = clip(s_{t-1} eta_plus, lo, hi)       where p > 0
                 = clip(s_{t-1} eta_minus, lo, hi)      where p < 0
             d_t = 0 where p < 0, else s_t sign(g)
             u   = 0 where p < 0, else d_{t-1}         (Optax's one-step lag: u_1 = 0)
    Polyak:  q = ||g||^2 (all leaves);  gap = f - f_min  (sps+: max(gap, 0))
             u = step g,  step = 0 if q + eps <= 2^-52, else min(gap / (q + eps), max_lr)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import (
  EmptyState,
  GradientTransformation,
  choice,
  default_float,
  expect_state,
  public,
  real,
)
from optcompose.core.validation import check_real_value
from optcompose.transforms.statistics import moments_init, reject_complex, same_structure


def _op(fn, *xs):
  return fn(*otree.promote(*xs))


# ----------------------------------------------------------------------------------------
# Rprop.


class ScaleByRpropState(NamedTuple):
  step_sizes: Any  # s, one step size per element
  prev_updates: Any  # d, the step stored at the last call (output at the next one)


def rprop_leaf(g, d_prev, s_prev, eta_minus, eta_plus, min_step_size, max_step_size):
  """One Rprop step on a leaf: ``(u, d_t, s_t)`` (see the module docstring), ``u`` in g's
  dtype, ``d_t`` and ``s_t`` in the state's."""
  p = _op(jnp.multiply, g, d_prev)
  factor = jnp.where(p > 0, eta_plus, eta_minus)
  grown = jnp.clip(
    _op(jnp.multiply, s_prev, factor), *otree.promote(min_step_size, max_step_size, s_prev)[:2]
  )
  s_prev_as, grown_as = otree.promote(s_prev, grown)
  s = jnp.where(p == 0, s_prev_as, grown_as).astype(jnp.result_type(s_prev))
  flipped = p < 0
  d = jnp.where(flipped, 0, _op(jnp.multiply, s, jnp.sign(g))).astype(jnp.result_type(d_prev))
  u = jnp.where(flipped, 0, d_prev).astype(jnp.result_type(g))
  return u, d, s


@public(
  "transformation",
  optax="scale_by_rprop",
  learning_rate=real(0.0, draw=(1e-4, 1.0), schedule=False),
  eta_minus=real(0.0, 1.0, low_open=True, draw=(0.1, 0.9), schedule=False),
  eta_plus=real(1.0, draw=(1.0, 2.0), schedule=False),
  min_step_size=real(0.0, draw=(1e-8, 1e-4), schedule=False),
  max_step_size=real(0.0, draw=(1.0, 100.0), schedule=False),
)
def scale_by_rprop(
  learning_rate: float,
  eta_minus: float = 0.5,
  eta_plus: float = 1.2,
  min_step_size: float = 1e-6,
  max_step_size: float = 50.0,
) -> GradientTransformation:
  """Rprop's scaling: per-element step sizes grown or shrunk by the sign of ``g d_{t-1}``.

  Update, per element (``s_0 = learning_rate``, ``d_0 = 0``)::

      p   = g_t d_{t-1}
      s_t = s_{t-1} where p = 0, else clip(s_{t-1} (eta_plus if p > 0 else eta_minus),
                                            min_step_size, max_step_size)
      d_t = 0 where p < 0, else s_t sign(g_t)
      u   = 0 where p < 0, else d_{t-1}

  The output is the step stored at the *previous* call (0 at the first): Optax's one-step
  lag, reproduced exactly. A ``scale(-1)`` after it descends (:func:`optcompose.rprop`).

  Args:
    learning_rate: the initial step size s_0 (>= 0, a number).
    eta_minus: the factor in (0, 1] that shrinks a step whose gradient changed sign
      (stricter than Optax, which takes any number).
    eta_plus: the factor >= 1 that grows a step whose gradient kept its sign (stricter than
      Optax).
    min_step_size: the smallest step size (>= 0).
    max_step_size: the largest step size (>= ``min_step_size``: stricter than Optax, whose
      clip then returns ``max_step_size``).

  Returns:
    A transformation with state :class:`ScaleByRpropState` (``step_sizes``,
    ``prev_updates``, in the parameters' dtype); updates keep the gradients' dtype.

  References:
    Riedmiller and Braun, "A Direct Adaptive Method for Faster Backpropagation Learning:
    The RPROP Algorithm", IEEE ICNN 1993; Optax's ``optax.scale_by_rprop``.
  """
  # Concrete values only: under inject_hyperparams they are traced (Optax's tests build it
  # that way), and range checks of traced values are the injection's own.
  if not any(isinstance(v, jax.core.Tracer) for v in (min_step_size, max_step_size)) and (
    min_step_size > max_step_size
  ):
    raise ValueError(
      f"scale_by_rprop: `min_step_size` ({min_step_size!r}) must not exceed "
      f"`max_step_size` ({max_step_size!r})."
    )

  def init(params):
    why = "Rprop steps by the sign of g_t g_(t-1), which complex numbers do not have"
    reject_complex(params, "params", "scale_by_rprop", why)
    return ScaleByRpropState(moments_init(params, value=learning_rate), moments_init(params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByRpropState, "scale_by_rprop")
    same_structure(updates, state.step_sizes, "step_sizes")
    treedef = jax.tree.structure(updates)
    steps = [
      rprop_leaf(g, d, s, eta_minus, eta_plus, min_step_size, max_step_size)
      for g, d, s in zip(
        jax.tree.leaves(updates),
        treedef.flatten_up_to(state.prev_updates),
        treedef.flatten_up_to(state.step_sizes),
      )
    ]
    u, d, s = (
      [treedef.unflatten(list(x)) for x in zip(*steps)]
      if steps
      else (updates, state.prev_updates, state.step_sizes)
    )
    return u, ScaleByRpropState(s, d)

  return GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------
# Polyak.

_MACHINE_EPS = float(np.finfo(float).eps)  # 2^-52, as in Optax (Python float's epsilon)


def polyak_step(sq_norm, value, f_min, max_learning_rate, eps, plus: bool):
  """``0 if q + eps <= 2^-52 else min(gap / (q + eps), max_lr)``, ``gap = f - f_min`` (clamped
  at 0 for sps+), in the squared norm's dtype (float32 or wider)."""
  dtype = jnp.result_type(sq_norm)
  gap = jnp.asarray(_op(jnp.subtract, value, f_min)).astype(dtype)
  if plus:
    gap = jnp.maximum(gap, 0)
  denom = _op(jnp.add, sq_norm, eps)
  step = jnp.minimum(*otree.promote(_op(jnp.divide, gap, denom), max_learning_rate))
  return jnp.where(denom <= _MACHINE_EPS, jnp.zeros_like(step), step)


def _check_value(value) -> jax.Array:
  """The monitored value as an array; a TypeError unless it is a real scalar."""
  check_real_value("scale_by_polyak", "value", value, "the objective's value")
  value = jnp.asarray(value)
  if jnp.issubdtype(value.dtype, jnp.integer):
    value = value.astype(default_float())
  if value.shape != ():
    raise ValueError(f"scale_by_polyak: `value` must be a scalar, got shape {value.shape}.")
  return value


@public(
  "transformation",
  optax="scale_by_polyak",
  f_min=real(draw=(-1.0, 0.0), schedule=False),
  max_learning_rate=real(0.0, draw=(1e-3, 10.0), schedule=False),
  eps=real(0.0, draw=(0.0, 1e-6), schedule=False),
  variant=choice("sps", "sps+"),
)
def scale_by_polyak(
  f_min: float = 0.0, max_learning_rate: float = 1.0, eps: float = 0.0, variant: str = "sps"
) -> GradientTransformation:
  """Polyak's step size: ``u = min((f - f_min) / (||g||^2 + eps), max_learning_rate) g``.

  Update (``f`` is ``update(..., value=f)``, ``||g||^2`` over all leaves)::

      gap  = f - f_min                 (variant "sps+": max(gap, 0))
      step = 0 if ||g||^2 + eps <= 2^-52 else min(gap / (||g||^2 + eps), max_learning_rate)
      u    = step g

  The squared norm is summed in float32 or wider, and the step computed in its dtype.

  Args:
    f_min: a lower bound f* of the objective (a number).
    max_learning_rate: the largest step (>= 0, a number).
    eps: >= 0, added to the squared norm (a number).
    variant: ``"sps"`` or ``"sps+"`` (the gap clamped at 0).

  Returns:
    A stateless transformation (:class:`EmptyState`) whose ``update`` needs ``value=`` (the
    objective at the current parameters, a real scalar; a TypeError otherwise); updates
    keep the gradients' dtype.

  References:
    Polyak, "Introduction to Optimization", 1987; Loizou, Vaswani, Laradji and
    Lacoste-Julien, "Stochastic Polyak Step-size for SGD", AISTATS 2021; Optax's
    ``optax.scale_by_polyak``.
  """
  if variant not in ("sps", "sps+"):
    raise ValueError(f"scale_by_polyak: `variant` must be 'sps' or 'sps+', got {variant!r}.")

  def init(params):
    otree.check_floating(params, "params")
    return EmptyState()

  def update(updates, state, params=None, **extra):
    del params
    if "value" not in extra:
      raise TypeError("scale_by_polyak needs the objective's value: call update(..., value=loss).")
    value = _check_value(extra["value"])
    # Squared as x * x (only_square): nothing else in this step squares these updates, and
    # XLA CPU's library reduction reads that form faster (polyak_sgd 1.06-1.08x Optax's
    # time with |x| * |x|, 1.00 with x * x).
    sq = otree.squared_norm(updates, only_square=True)
    step = polyak_step(sq, value, f_min, max_learning_rate, eps, variant == "sps+")
    updates = jax.tree.map(lambda g: _op(jnp.multiply, step, g).astype(jnp.result_type(g)), updates)
    return updates, state

  return GradientTransformation(init, update)


__all__ = ["ScaleByRpropState"]  # and the builders it registers
