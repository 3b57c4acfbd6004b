"""Adafactor's factored second moment: row and column averages of g^2 instead of a full one.

Formulas, per leaf (g: incoming update, t = count - step_offset + 1 the step from 1,
rho_t = decay_rate_fn(t - 1, decay_rate), by default ``1 - t^(-decay_rate)`` in float32;
G = |g|^2 + epsilon)::

    factored (the two largest axes d0 >= d1 both >= min_dim_size_to_factor):
        R_t = rho_t R + (1 - rho_t) mean_{d0}(G)          (the leaf without axis d0)
        C_t = rho_t C + (1 - rho_t) mean_{d1}(G)          (the leaf without axis d1)
        u = g * (R_t / mean_{d1}(R_t))^(-1/2) * C_t^(-1/2)   (R_t, C_t broadcast back)
          = g / sqrt(V_hat),  V_hat = R_t C_t / mean(R_t): Adafactor's rank-1 estimate
    otherwise (vectors, scalars, small matrices, ``factored=False``):
        v_t = rho_t v + (1 - rho_t) G ;   u = g * v_t^(-1/2)

``d0`` is the largest axis and ``d1`` the second largest (ties by ``np.argsort``, as in
Optax), so ``v_row`` holds one value per index of ``d1`` (a row of a tall matrix is a
column of a wide one): names and shapes as in Optax, whose state maps over unchanged.
A factored leaf keeps ``rows + cols`` values instead of ``rows * cols``; the state trees
``v_row``, ``v_col`` and ``v`` mirror the parameters and hold a ``(1,)`` placeholder where a
leaf does not use them.

dtypes: the statistics are kept in the parameters' dtype and computed as Optax computes
them (rho_t is float32; bfloat16 statistics are rounded to bfloat16 before the factors are
taken), except float16, whose statistics are computed and kept in float32 (g^2 overflows
float16 past |g| = 256, leaving a stored inf and zero steps for good, underflows below
|g| = 2.4e-4, making every step lr * sign(g), and epsilon = 1e-30 is 0 there, so a zero
gradient would give 0 * inf = NaN; Optax keeps float16). Updates keep the gradients' dtype.

Factoring needs each model leaf's matrix shape, which FlatParams' 1-D buckets do not have:
``factored=True`` refuses FlatParams; ``factored=False`` is elementwise and accepts them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optcompose import tree as otree
from optcompose.core import (
  FLAG,
  GradientTransformation,
  expect_state,
  integer,
  public,
  real,
  safe_increment,
  zero_count,
)
from optcompose.masks import reject_layouts
from optcompose.transforms.statistics import ema_leaf, squares_dtype

# Numbers, as in Optax (``jax.typing.ArrayLike``; no schedules).
DECAY_RATE = real(0.0, draw=(0.5, 1.0), schedule=False)  # the exponent c of 1 - t^(-c)
STEP_OFFSET = real(draw=(0.0, 0.0), schedule=False)  # any finite number, usually a step count
MIN_DIM = integer(1, draw=(1, 3))  # a static shape threshold (0 would factor empty leaves)
EPSILON = real(0.0, low_open=True, draw=(1e-30, 1e-10), schedule=False)._replace(
  normal=True  # the only 0/0 guard: refused below float32's smallest normal (flushed to 0)
)


class FactoredState(NamedTuple):
  """Optax's state: the step count and three trees shaped like the parameters."""

  count: jax.Array  # int32 number of updates
  v_row: Any  # per leaf: the row statistic R of a factored leaf, else a (1,) placeholder
  v_col: Any  # per leaf: the column statistic C of a factored leaf, else a (1,) placeholder
  v: Any  # per leaf: the full statistic of an unfactored leaf, else a (1,) placeholder


def decay_rate_pow(step, exponent=0.8):
  """Adafactor's decay ``rho = 1 - (step + 1)^(-exponent)``, in float32 (Optax's default
  ``decay_rate_fn``, so float64 runs match it); ``step`` counts from 0."""
  t = jnp.asarray(step).astype(jnp.float32) + 1  # cast first: int32 step + 1 wraps at 2**31 - 1
  return 1.0 - jnp.power(*otree.promote(t, -exponent))


def factored_dims(shape: tuple, factored: bool, min_dim_size_to_factor: int) -> Optional[tuple]:
  """``(d1, d0)``: the second largest and the largest axis of ``shape`` (ties broken by
  ``np.argsort``, as Optax does), or None when the leaf keeps a full second moment (not
  ``factored``, fewer than 2 axes, or the second largest below ``min_dim_size_to_factor``)."""
  if not factored or len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def _squares(g, dtype, epsilon):
  """``G = |g|^2 + epsilon``, in g's dtype (float32 for float16 gradients or statistics:
  g^2 underflows float16 below |g| = 2.4e-4, and epsilon is 0 there)."""
  g = jnp.asarray(g)
  if jnp.dtype(jnp.float16) in (g.dtype, jnp.dtype(dtype)):
    g = g.astype(otree.promote_types(g.dtype, jnp.float32))
  return jnp.add(*otree.promote(otree.abs_sq(g), epsilon))


def _times(g, factor):
  """``g * factor``, in the wider of the two dtypes (the casts written out)."""
  return jnp.multiply(*otree.promote(g, factor))


def factored_rms_leaf(g, v_row, v_col, rho, epsilon, dims):
  """One factored step of a leaf whose two largest axes are ``dims = (d1, d0)``.

  ``R_t = rho R + (1 - rho) mean_{d0}(G)``, ``C_t = rho C + (1 - rho) mean_{d1}(G)``,
  ``u = g (R_t / mean_{d1}(R_t))^(-1/2) C_t^(-1/2)``; returns ``(u, R_t, C_t)``, u in g's
  dtype and the statistics in the state's.
  """
  d1, d0 = dims
  dtype = jnp.result_type(v_row)
  work = squares_dtype(dtype)
  squares = _squares(g, dtype, epsilon)
  new_row = ema_leaf(rho, v_row, jnp.mean(squares, axis=d0)).astype(work)
  new_col = ema_leaf(rho, v_col, jnp.mean(squares, axis=d1)).astype(work)
  row_axis = d1 - 1 if d1 > d0 else d1  # d1 in the row statistic, which lacks d0
  row_factor = (new_row / jnp.mean(new_row, axis=row_axis, keepdims=True)) ** -0.5
  col_factor = new_col**-0.5
  u = _times(_times(g, jnp.expand_dims(row_factor, d0)), jnp.expand_dims(col_factor, d1))
  return u.astype(jnp.result_type(g)), new_row.astype(dtype), new_col.astype(dtype)


def full_rms_leaf(g, v, rho, epsilon):
  """One unfactored step: ``v_t = rho v + (1 - rho) G``, ``u = g v_t^(-1/2)``; returns
  ``(u, v_t)``, u in g's dtype and v_t in the state's."""
  dtype = jnp.result_type(v)
  new = ema_leaf(rho, v, _squares(g, dtype, epsilon)).astype(squares_dtype(dtype))
  return _times(g, new**-0.5).astype(jnp.result_type(g)), new.astype(dtype)


def _placeholder(dtype):
  return jnp.zeros((1,), dtype=dtype)


def _zeros_without_axis(x, axis):
  """Zeros shaped like ``x`` without ``axis``, with the sharding such a reduction of ``x``
  has (``jax.eval_shape`` carries it under JAX's explicit sharding mode)."""
  return jnp.zeros_like(jax.eval_shape(lambda a: jnp.sum(a, axis=axis), x))


_WHO = "scale_by_factored_rms"
_FLAT = (
  f"{_WHO} with factored=True (row and column statistics of each model matrix; "
  "factored=False is elementwise and accepts FlatParams)"
)


@public(
  "transformation",
  optax="scale_by_factored_rms",
  factored=FLAG,
  decay_rate=DECAY_RATE,
  step_offset=STEP_OFFSET,
  min_dim_size_to_factor=MIN_DIM,
  epsilon=EPSILON,
)
def scale_by_factored_rms(
  factored: bool = True,
  decay_rate: float = 0.8,
  step_offset: int = 0,
  min_dim_size_to_factor: int = 128,
  epsilon: float = 1e-30,
  decay_rate_fn: Callable[[Any, Any], Any] = decay_rate_pow,
) -> GradientTransformation:
  """Divide each leaf by a factored (Adafactor) estimate of the RMS of its gradients.

  Update, per leaf (t = count - step_offset + 1, ``rho_t = decay_rate_fn(t - 1,
  decay_rate)``, ``G = |g|^2 + epsilon``; d0, d1 the largest and second largest axes)::

      factored:  R_t = rho_t R + (1 - rho_t) mean_{d0}(G)
                 C_t = rho_t C + (1 - rho_t) mean_{d1}(G)
                 u = g (R_t / mean_{d1}(R_t))^(-1/2) C_t^(-1/2)
      else:      v_t = rho_t v + (1 - rho_t) G ;   u = g v_t^(-1/2)

  A leaf is factored when ``factored`` is True, it has 2 or more axes, and its two largest
  are both at least ``min_dim_size_to_factor``: its state is then ``rows + cols`` numbers
  instead of ``rows * cols``.

  Args:
    factored: factor the second moment of the leaves large enough (True, the default);
      False keeps a full one for every leaf.
    decay_rate: the exponent c of the default decay ``rho_t = 1 - t^(-c)`` (>= 0; Optax's
      0.8), a number; passed as the second argument of ``decay_rate_fn``.
    step_offset: subtracted from the count before the decay is computed (for fine-tuning:
      the first step of the new phase, when the count continues from pre-training). Until
      the count reaches it, t < 1 and the default decay is NaN or -inf, as in Optax.
    min_dim_size_to_factor: a leaf is factored only if its two largest axes are at least
      this long (a Python int >= 1).
    epsilon: added to every |g|^2 (> 0; Optax's 1e-30): the guard against 0 / 0 for a
      gradient that has been exactly zero (Optax accepts 0).
    decay_rate_fn: ``(step, decay_rate) -> rho``, step counting from 0: the decay of the
      statistics at each step. The default,
      :func:`optcompose.transforms.factored.decay_rate_pow`, is Adafactor's (and Optax's)
      ``1 - (step + 1)^(-decay_rate)`` computed in float32, which tends to 1 and so freezes
      the statistics; Zhai et al. cap it (``lambda s, c: jnp.minimum(decay_rate_pow(s, c),
      0.999)``). It is called once per step, outside the per-leaf map.

  Returns:
    A transformation with state :class:`FactoredState` (``count``, ``v_row``, ``v_col``,
    ``v``: Optax's fields, shapes and dtypes, except float32 for float16 parameters). It
    does not read ``params`` (Optax's requires them and reads only their shapes and dtypes;
    ours reads the state's). With
    ``factored=True`` it refuses FlatParams (a TypeError at ``init`` and ``update``).

  References:
    Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    ICML 2018; Zhai et al., "Scaling Vision Transformers", CVPR 2022; Optax's
    ``optax.scale_by_factored_rms``.
  """
  if not callable(decay_rate_fn):
    raise TypeError(
      f"{_WHO}: `decay_rate_fn` must be a function (step, decay_rate) -> "
      f"decay, got {type(decay_rate_fn).__name__}."
    )

  def dims_of(x):
    return factored_dims(jnp.shape(x), factored, min_dim_size_to_factor)

  def init_leaf(param):
    dtype, dims = squares_dtype(jnp.result_type(param)), dims_of(param)
    if dims is None:
      return _placeholder(dtype), _placeholder(dtype), jnp.zeros_like(param, dtype)
    d1, d0 = dims
    rows, cols = _zeros_without_axis(param, d0), _zeros_without_axis(param, d1)
    return rows.astype(dtype), cols.astype(dtype), _placeholder(dtype)

  def split(triples, like):
    """Three trees (rows, cols, full) from a tree of triples shaped like ``like``."""
    treedef = jax.tree.structure(like)
    leaves = treedef.flatten_up_to(triples)
    return tuple(treedef.unflatten([t[i] for t in leaves]) for i in range(3))

  def init(params):
    if factored:
      reject_layouts(params, _FLAT)
    otree.check_floating(params, "params")
    return FactoredState(zero_count(), *split(jax.tree.map(init_leaf, params), params))

  def update(updates, state, params=None, **extra):
    del params, extra
    expect_state(state, FactoredState, _WHO)
    if factored:
      reject_layouts(updates, _FLAT)
    _check_state(updates, state, dims_of)
    rho = decay_rate_fn(jnp.subtract(*otree.promote(state.count, step_offset)), decay_rate)

    def leaf(g, r, c, v):
      dims = dims_of(g)
      if dims is None:
        u, new = full_rms_leaf(g, v, rho, epsilon)
        return u, r, c, new
      u, new_r, new_c = factored_rms_leaf(g, r, c, rho, epsilon, dims)
      return u, new_r, new_c, v

    treedef = jax.tree.structure(updates)
    out = [
      leaf(*xs)
      for xs in zip(
        jax.tree.leaves(updates),
        *(treedef.flatten_up_to(t) for t in (state.v_row, state.v_col, state.v)),
      )
    ]
    u, rows, cols, full = (treedef.unflatten([o[i] for o in out]) for i in range(4))
    return u, FactoredState(safe_increment(state.count), rows, cols, full)

  return GradientTransformation(init, update)


def _state_shapes(shape: tuple, dims: Optional[tuple]) -> tuple:
  """The shapes of a leaf's ``(v_row, v_col, v)`` (``dims`` from :func:`factored_dims`)."""
  if dims is None:
    return (1,), (1,), tuple(shape)
  d1, d0 = dims
  without = lambda axis: tuple(n for i, n in enumerate(shape) if i != axis)  # noqa: E731
  return without(d0), without(d1), (1,)


def _check_state(updates, state, dims_of) -> None:
  """The updates have the parameters' structure, and each leaf's statistics the shapes its
  init would give it (so nothing is silently broadcast)."""
  for field in ("v_row", "v_col", "v"):
    if jax.tree.structure(updates) != jax.tree.structure(getattr(state, field)):
      raise ValueError(
        f"`updates` does not have the structure of `state.{field}`: "
        f"{otree.first_difference(updates, getattr(state, field))}."
      )
  treedef = jax.tree.structure(updates)
  stored = zip(*(treedef.flatten_up_to(t) for t in (state.v_row, state.v_col, state.v)))
  for (path, g), have in zip(jax.tree_util.tree_flatten_with_path(updates)[0], stored):
    want = _state_shapes(jnp.shape(g), dims_of(g))
    got = tuple(tuple(jnp.shape(x)) for x in have)
    if got != want:
      where = jax.tree_util.keystr(tuple(path))
      raise ValueError(
        f"`updates{where}` has shape {jnp.shape(g)}, whose statistics (v_row, v_col, v) "
        f"have shapes {want}, but the state's are {got}: pass the state made by init "
        "from parameters of these shapes."
      )


__all__ = ["FactoredState"]  # and the builders it registers
