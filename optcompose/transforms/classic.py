"""Classic preconditioners: Adadelta, NovoGrad (per-leaf gradient norms) and SM3 (per-axis
cover statistics).

Formulas (g: gradient, w: parameters, t: step count from 1; per leaf)::

    Adadelta:  E[g^2]_t = rho E[g^2]_{t-1} + (1 - rho) g^2
               u        = sqrt(E[dx^2]_{t-1} + eps) / sqrt(E[g^2]_t + eps) g
               E[dx^2]_t = rho E[dx^2]_{t-1} + (1 - rho) u^2
    NovoGrad:  n_t = b2 n_{t-1} + (1 - b2) ||g||^2           (n_1 = ||g||^2, a scalar per leaf)
               m_t = b1 m_{t-1} + g / (sqrt(n_t + eps_root) + eps) + wd w    (m_1 without b1 m_0)
               u   = m_t
    SM3:       a   = c2 g^2 + b2 min_i mu_i       (mu_i: one vector per axis i, broadcast;
                                                   c2 = 1 - b2, or 1 when b2 = 1)
               nu  = b1 nu + (1 - b1) g / sqrt(a + eps)        (0 where a = 0)
               mu_i = max of a over every axis but i;  u = nu

Statistics of float16 leaves are computed in float32 (as in :mod:`.statistics`) and stored
in the state's dtype. NovoGrad and SM3 compute per model leaf (a norm, per-axis covers):
they refuse FlatParams.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  DECAY,
  DTYPE,
  EPS,
  EPS_POSITIVE,
  EPS_ROOT,
  GradientTransformation,
  ScalarOrSchedule,
  check_not_both_zero,
  expect_state,
  needs_params,
  public,
  real,
  safe_increment,
  zero_count,
)
from optcompose.masks import reject_layouts
from optcompose.transforms.statistics import (
  like_params,
  _wide_enough,
  ema_leaf,
  moments_init,
  squares_dtype,
  squares_init,
  same_structure,
  square_leaf,
)


def _op(fn, *xs):
  """``fn`` of ``xs`` in the one dtype standard promotion gives them (the casts written out)."""
  return fn(*otree.promote(*xs))


# ----------------------------------------------------------------------------------------
# Adadelta.


class ScaleByAdaDeltaState(NamedTuple):
  e_g: Any  # E[g^2], the running mean of squared gradients
  e_x: Any  # E[dx^2], the running mean of squared updates


def adadelta_leaf(g, e_g, e_x_prev, eps):
  """``sqrt(e_x_prev + eps) / sqrt(e_g + eps) * g`` (Optax's operation order), in g's dtype."""
  e_g, e_x_prev = _wide_enough(e_g), _wide_enough(e_x_prev)
  ratio = _op(jnp.divide, jnp.sqrt(_op(jnp.add, e_x_prev, eps)), jnp.sqrt(_op(jnp.add, e_g, eps)))
  return _op(jnp.multiply, ratio, g).astype(jnp.result_type(g))


@public(
  "transformation",
  optax="scale_by_adadelta",
  rho=real(0.0, 1.0, draw=(0.0, 0.99), schedule=False),
  eps=EPS_POSITIVE,
)
def scale_by_adadelta(rho: float = 0.9, eps: ScalarOrSchedule = 1e-6) -> GradientTransformation:
  """Adadelta's scaling: ``u = sqrt(E[dx^2]_{t-1} + eps) / sqrt(E[g^2]_t + eps) g``.

  Update (``E[g^2]_0 = E[dx^2]_0 = 0``)::

      E[g^2]_t  = rho E[g^2]_{t-1} + (1 - rho) g_t^2
      u         = sqrt(E[dx^2]_{t-1} + eps) / sqrt(E[g^2]_t + eps) g_t
      E[dx^2]_t = rho E[dx^2]_{t-1} + (1 - rho) u^2

  The output is the step itself (positive along g); a learning-rate step after it negates it.

  Args:
    rho: the decay of both running means, in [0, 1] (a number).
    eps: > 0, added under both square roots (stricter than Optax: with ``eps = 0`` the
      numerator is 0 at the first step and Adadelta never moves; a number or a schedule).

  Returns:
    A transformation with state :class:`ScaleByAdaDeltaState` (``e_g``, ``e_x``, stored in
    the parameters' dtype); updates keep the gradients' dtype.

  References:
    Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012; Optax's
    ``optax.scale_by_adadelta``.
  """

  def init(params):
    return ScaleByAdaDeltaState(squares_init(params), squares_init(params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleByAdaDeltaState, "scale_by_adadelta")
    same_structure(updates, state.e_g, "e_g")
    e_g = jax.tree.map(lambda g, v: ema_leaf(rho, v, square_leaf(g, v)), updates, state.e_g)
    updates = jax.tree.map(lambda g, v, x: adadelta_leaf(g, v, x, eps), updates, e_g, state.e_x)
    e_x = jax.tree.map(lambda u, x: ema_leaf(rho, x, square_leaf(u, x)), updates, state.e_x)
    return updates, ScaleByAdaDeltaState(
      otree.cast_like(e_g, state.e_g), otree.cast_like(e_x, state.e_x)
    )

  return GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------
# NovoGrad.


class ScaleByNovogradState(NamedTuple):
  count: jax.Array
  mu: Any  # m, the momentum of the normalised gradients
  nu: Any  # n, one scalar per leaf: the running mean of the leaf's squared gradient norm


def leaf_squared_norm(g):
  """``||g||^2`` of one leaf, summed in float32 or wider (a 0-d array)."""
  return otree.squared_norm(g)


def novograd_direction_leaf(g, n, eps, eps_root, weight_decay=None, w=None):
  """``g / (sqrt(n + eps_root) + eps) [+ weight_decay w]``."""
  n = _wide_enough(n)
  direction = _op(jnp.divide, g, _op(jnp.add, jnp.sqrt(_op(jnp.add, n, eps_root)), eps))
  if weight_decay is None:
    return direction
  return _op(jnp.add, direction, _op(jnp.multiply, weight_decay, w))


def _first_step_zero(count, beta):
  """``0`` at the first step, else ``beta`` (a scalar select, no branch): NovoGrad's first
  step takes the statistic itself, ``beta x_0 + a`` with ``beta = 0``."""
  beta_arr = jnp.asarray(beta)
  return jnp.where(count == 1, jnp.zeros_like(beta_arr), beta_arr)


@public(
  "transformation",
  optax="scale_by_novograd",
  b1=real(0.0, 1.0, draw=(0.0, 0.99)),
  b2=DECAY,
  eps=EPS,
  eps_root=EPS_ROOT,
  weight_decay=real(0.0, draw=(0.0, 0.1)),
  mu_dtype=DTYPE,
)
def scale_by_novograd(
  b1: ScalarOrSchedule = 0.9,
  b2: ScalarOrSchedule = 0.25,
  eps: ScalarOrSchedule = 1e-8,
  eps_root: ScalarOrSchedule = 0.0,
  weight_decay: ScalarOrSchedule = 0.0,  # a schedule too (novograd passes its own on)
  mu_dtype: Optional[Any] = None,
) -> GradientTransformation:
  """NovoGrad's scaling: momentum of gradients normalised by their leaf's running norm.

  Update, per leaf (``n`` a scalar per leaf; t from 1)::

      n_t = b2 n_{t-1} + (1 - b2) ||g_t||^2        (n_1 = ||g_1||^2)
      m_t = b1 m_{t-1} + g_t / (sqrt(n_t + eps_root) + eps) + weight_decay w
                                                   (m_1 = the added term alone)
      u   = m_t

  The first step is a select on the scalar count, not a branch.

  Args:
    b1: the momentum of m, in [0, 1] (a number or a schedule; m has no ``1 - b1`` factor).
    b2: the decay of the squared-norm average n, in [0, 1) (a number or a schedule).
    eps: added after the square root (a number or a schedule).
    eps_root: added under the square root (a number or a schedule); not both 0.
    weight_decay: >= 0, adds ``weight_decay * w`` inside the momentum (needs ``params``
      unless it is the number 0; a number or a schedule).
    mu_dtype: dtype of the stored m; ``None`` keeps the parameters'.

  Returns:
    A transformation with state :class:`ScaleByNovogradState` (``count``, ``mu``, ``nu``:
    one 0-d ``nu`` per leaf, in the parameters' dtype). Updates are m rounded to
    ``mu_dtype`` and keep the gradients' dtype (Optax's have ``mu_dtype``). The squared
    norm is summed in float32 or wider (Optax squares ``jnp.linalg.norm``). FlatParams are
    refused (a bucket is not a leaf).

  References:
    Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for
    Training of Deep Networks", arXiv:1905.11286, 2019; Optax's ``optax.scale_by_novograd``.
  """
  check_not_both_zero("scale_by_novograd", eps, eps_root)
  decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

  def init(params):
    reject_layouts(params, "scale_by_novograd")
    otree.check_floating(params, "params")
    nu = jax.tree.map(lambda p: squares_init(jnp.zeros([], jnp.result_type(p))), params)
    mu = like_params(params, mu_dtype, "scale_by_novograd: `mu_dtype`")
    return ScaleByNovogradState(zero_count(), mu, nu)

  def update(updates, state, params=None, **extra):
    del extra
    expect_state(state, ScaleByNovogradState, "scale_by_novograd")
    reject_layouts(updates, "scale_by_novograd")
    same_structure(updates, state.mu, "mu")
    if decays:
      needs_params(params, "scale_by_novograd")
      otree.check_same_structure(updates, params, "updates", "params")
    count = safe_increment(state.count)
    b1_t, b2_t = _first_step_zero(count, b1), _first_step_zero(count, b2)
    nu = jax.tree.map(lambda g, n: ema_leaf(b2_t, n, leaf_squared_norm(g)), updates, state.nu)

    def momentum(g, n, m, w=None):
      direction = novograd_direction_leaf(g, n, eps, eps_root, weight_decay if decays else None, w)
      return _op(jnp.add, _op(jnp.multiply, b1_t, m), direction)

    trees = (updates, nu, state.mu) + ((params,) if decays else ())
    mu = jax.tree.map(momentum, *trees)
    mu = otree.cast_like(mu, state.mu)
    updates = otree.cast_like(mu, updates)
    return updates, ScaleByNovogradState(count, mu, otree.cast_like(nu, state.nu))

  return GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------
# SM3.


class ScaleBySM3State(NamedTuple):
  mu: Any  # per leaf, a list of one cover vector per axis (shape (n_i,))
  nu: Any  # the momentum of the scaled gradients (the output)


def _other_axes(i, ndim):
  return tuple(a for a in range(ndim) if a != i)


def sm3_accumulator_leaf(g, covers, c2, b2):
  """``c2 g^2 + b2 min_i cover_i`` (each cover broadcast along its own axis; a vector or
  scalar leaf keeps one accumulator per element, ``covers[0]``)."""
  g2 = square_leaf(g, covers[0])
  if g.ndim < 2:
    low = jnp.reshape(covers[0], g.shape)
  else:
    shaped = [
      jnp.reshape(v, [1] * i + [g.shape[i]] + [1] * (g.ndim - i - 1)) for i, v in enumerate(covers)
    ]
    low = functools.reduce(jnp.minimum, shaped)
  return _op(jnp.add, _op(jnp.multiply, c2, g2), _op(jnp.multiply, b2, _wide_enough(low)))


def sm3_scaled_leaf(g, a, eps):
  """``g / sqrt(a + eps)`` where ``a > 0``, else 0."""
  inv = jnp.where(a > 0, jax.lax.rsqrt(_op(jnp.add, a, eps)), jnp.zeros_like(a))
  return _op(jnp.multiply, g, inv)


def sm3_covers_leaf(a):
  """The new covers: for each axis i, the max of ``a`` over every other axis (the whole
  accumulator for a vector or a scalar)."""
  if a.ndim < 2:
    return [a]
  return [
    jnp.max(a, axis=_other_axes(i, a.ndim), initial=0 if a.size == 0 else None)
    for i in range(a.ndim)
  ]


def _covers_init(p):
  """Zero covers for ``p``: sums of squared gradients, so float32 for a float16 leaf (a
  float16 sum overflows past 65504 and stops growing at 2048 for |g| = 1)."""
  dtype = squares_dtype(jnp.result_type(p))
  if p.ndim == 0:
    return [jnp.zeros([], dtype)]
  return [jnp.zeros((p.shape[i],), dtype) for i in range(p.ndim)]


@public(
  "transformation",
  optax="scale_by_sm3",
  b1=real(0.0, 1.0, draw=(0.0, 0.99)),
  b2=real(0.0, 1.0, draw=(0.9, 1.0)),
  eps=EPS,
)
def scale_by_sm3(
  b1: ScalarOrSchedule = 0.9, b2: ScalarOrSchedule = 1.0, eps: ScalarOrSchedule = 1e-8
) -> GradientTransformation:
  """SM3's scaling: an Adagrad-like accumulator stored as one cover vector per axis.

  Update, per leaf (covers ``mu_i`` of shape ``(n_i,)``, broadcast along axis i)::

      a    = c2 g^2 + b2 min_i mu_i        (c2 = 1 - b2, or 1 when b2 = 1: Adagrad's sum)
      nu   = b1 nu + (1 - b1) g / sqrt(a + eps)      (0 where a = 0)
      mu_i = max of a over every axis but i;   u = nu

  A vector (or scalar) leaf keeps one accumulator per element.

  Args:
    b1: the momentum of the output, in [0, 1] (a number or a schedule).
    b2: the decay of the accumulator, in [0, 1]; 1 (the default) sums squared gradients
      (a number or a schedule).
    eps: >= 0, added under the square root (a number or a schedule).

  Returns:
    A transformation with state :class:`ScaleBySM3State` (``mu``: per leaf a list of one
    vector per axis, the sums of squares, float32 for float16 parameters; ``nu``, the
    momentum), stored in the parameters' dtype; updates keep the gradients' dtype. Complex
    parameters and FlatParams are refused. A scalar leaf keeps a 0-d accumulator (``[a]``;
    Optax's list is empty there, and its update fails).

  References:
    Anil, Gupta, Koren and Singer, "Memory-Efficient Adaptive Optimization", NeurIPS 2019;
    Optax's ``optax.scale_by_sm3``.
  """
  if isinstance(b2, (int, float)):
    c2 = 1.0 - b2 if b2 != 1.0 else 1.0  # Optax's coefficients, known when built
  else:
    live = jnp.asarray(b2)  # a number traced under inject_hyperparams
    c2 = jnp.where(live == 1, jnp.ones_like(live), 1 - live)

  def init(params):
    reject_layouts(params, "scale_by_sm3")
    otree.check_floating(params, "params")
    if any(jnp.iscomplexobj(p) for p in jax.tree.leaves(params)):
      raise TypeError("scale_by_sm3: complex parameters are not supported (as in Optax).")
    mu = jax.tree.map(_covers_init, params)
    return ScaleBySM3State(mu, moments_init(params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, ScaleBySM3State, "scale_by_sm3")
    reject_layouts(updates, "scale_by_sm3")
    same_structure(updates, state.nu, "nu")
    treedef = jax.tree.structure(updates)
    covers = treedef.flatten_up_to(state.mu)
    a = [sm3_accumulator_leaf(g, c, c2, b2) for g, c in zip(jax.tree.leaves(updates), covers)]
    scaled = [sm3_scaled_leaf(g, x, eps) for g, x in zip(jax.tree.leaves(updates), a)]
    nu = [ema_leaf(b1, v, s) for v, s in zip(treedef.flatten_up_to(state.nu), scaled)]
    new_covers = [
      [c.astype(old.dtype) for c, old in zip(sm3_covers_leaf(x), cs)] for x, cs in zip(a, covers)
    ]
    nu = otree.cast_like(treedef.unflatten(nu), state.nu)
    return (otree.cast_like(nu, updates), ScaleBySM3State(treedef.unflatten(new_covers), nu))

  return GradientTransformation(init, update)


__all__ = ["ScaleByAdaDeltaState", "ScaleByNovogradState", "ScaleBySM3State"]
