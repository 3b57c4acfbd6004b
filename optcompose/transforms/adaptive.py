"""The Adam family's scaling, fused: both moments, their bias correction and the division in
one transformation (the same math as the pieces composed, in one pass over memory).

Formulas (g: gradient, t: step count from 1)::

    m_t = (1 - b1) g_t + b1 m_{t-1}          m_hat = m_t / (1 - b1^t)
    v_t = (1 - b2) g_t^2 + b2 v_{t-1}        v_hat = v_t / (1 - b2^t)
    u   = m_hat / (sqrt(v_hat + eps_root) + eps)
    nesterov (Nadam): m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax

from optcompose import tree as otree
from optcompose.core import (
  DECAY,
  DTYPE,
  EPS,
  EPS_ROOT,
  FLAG,
  GradientTransformation,
  ScalarOrSchedule,
  check_not_both_zero,
  expect_state,
  public,
  safe_increment,
  zero_count,
)
from optcompose.transforms.statistics import (
  in_grad_dtype,
  like_params,
  squares_init,
  adam_direction_leaf,
  debias_factor,
  debias_leaf,
  ema_leaf,
  nesterov_moment_leaf,
  rounds_precision_only,
  same_structure,
  second_moment_ema_leaf,
  square_leaf,
)


class ScaleByAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


@public(
  "transformation",
  optax="scale_by_adam",
  b1=DECAY,
  b2=DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
  nesterov=FLAG,
  mu_dtype=DTYPE,
  nu_dtype=DTYPE,
)
def scale_by_adam(
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.999,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  mu_dtype: Optional[Any] = None,
  *,
  nesterov: bool = False,
  nu_dtype: Optional[Any] = None,
) -> GradientTransformation:
  """Adam's scaling: ``u = m_hat / (sqrt(v_hat + eps_root) + eps)``.

  Update (g: incoming gradient, t: step count from 1, ``m_0 = v_0 = 0``)::

      m_t = (1 - b1) g_t + b1 m_{t-1}          m_hat = m_t / (1 - b1^t)
      v_t = (1 - b2) g_t^2 + b2 v_{t-1}        v_hat = v_t / (1 - b2^t)
      u   = m_hat / (sqrt(v_hat + eps_root) + eps)
      nesterov: m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)

  Equal to ``scale_by_second_moment(b2, eps, eps_root, direction=chain(ema(b1, debias=False),
  scale_by_bias_correction(b1)))`` in one transformation.

  Args:
    b1: the first moment's decay, in [0, 1) (a number or a schedule).
    b2: the second moment's decay, in [0, 1) (a number or a schedule).
    eps: added after the square root (numerical stability; a number or a schedule).
    eps_root: added under the square root (keeps the derivative finite when v_hat = 0,
      for meta-learning through the optimizer); 0 by default, as in the paper.
    mu_dtype: dtype of the stored first moment (e.g. ``jnp.bfloat16`` to halve its
      memory; ``b1 * m`` then runs in it, as in Optax: 0.9 is 0.8984 in bfloat16);
      ``None`` keeps the parameters'.
    nesterov: Nadam's look-ahead first moment (the ``nesterov`` line above).
    nu_dtype: dtype of the stored second moment (ours; Optax has ``mu_dtype`` only);
      ``None`` keeps the parameters', float32 for float16 ones (their squares underflow
      float16). The
      arithmetic runs in the wider of the stored and the gradients' dtypes. When it is
      narrower in precision only (``jnp.bfloat16`` for float32), the update is computed from
      the moments as stored (m_t and v_t rounded to their dtypes); with ``mu_dtype`` alone
      it uses the unrounded m_t, as Optax's.

  Returns:
    A transformation with state :class:`ScaleByAdamState` (``count``, ``mu``, ``nu``);
    updates keep the gradients' dtype.

  References:
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016; Optax's
    ``optax.scale_by_adam``.
  """

  check_not_both_zero("scale_by_adam", eps, eps_root)

  def init(params):
    otree.check_floating(params, "params")
    return ScaleByAdamState(
      zero_count(),
      like_params(params, mu_dtype, "scale_by_adam: `mu_dtype`"),
      squares_init(params, nu_dtype),  # real values: a real dtype loses nothing
    )

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByAdamState, "scale_by_adam")
    same_structure(updates, state.mu, "mu")
    mu = jax.tree.map(lambda g, m: ema_leaf(b1, m, g), updates, state.mu)
    nu = jax.tree.map(
      lambda g, v: second_moment_ema_leaf(b2, v, square_leaf(g, v)), updates, state.nu
    )
    stored_mu, stored_nu = otree.cast_like(mu, state.mu), otree.cast_like(nu, state.nu)
    # A second moment stored narrower in precision only (bfloat16 for float32): the update
    # divides the moments as stored. Otherwise XLA computes the update from the *old* stored
    # moments in the parameters' loop and copies the donated buffers first (bfloat16 m and v
    # on 16M float32 parameters: a step 2.4x to 3.2x AdamW's on CPU). mu_dtype alone
    # (Optax's) keeps Optax's update from the unrounded m_t.
    rounded = jax.tree.map(rounds_precision_only, nu, stored_nu)
    mu = jax.tree.map(
      lambda m, s, r: s.astype(m.dtype) if r and rounds_precision_only(m, s) else m,
      mu,
      stored_mu,
      rounded,
    )
    nu = jax.tree.map(lambda v, s, r: s.astype(v.dtype) if r else v, nu, stored_nu, rounded)
    count = safe_increment(state.count)
    c1, c2 = debias_factor(b1, count), debias_factor(b2, count)
    if nesterov:
      c1_next = debias_factor(b1, safe_increment(count))
      mu_hat = jax.tree.map(
        lambda m, g: nesterov_moment_leaf(b1, debias_leaf(m, c1_next), debias_leaf(g, c1)),
        mu,
        updates,
      )
    else:
      mu_hat = jax.tree.map(lambda m: debias_leaf(m, c1), mu)
    updates = jax.tree.map(
      lambda g, m, v: in_grad_dtype(adam_direction_leaf(m, debias_leaf(v, c2), eps, eps_root), g),
      updates,
      mu_hat,
      nu,
    )
    return updates, ScaleByAdamState(count, stored_mu, stored_nu)

  return GradientTransformation(init, update)


__all__ = ["ScaleByAdamState"]  # and the builders it registers
