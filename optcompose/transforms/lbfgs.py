"""L-BFGS's scaling: the two-loop recursion over ring buffers of past differences.

Formulas (u_k: incoming update, the gradient; w_k: parameters; m: ``memory_size``)::

    dw_{k-1} = w_k - w_{k-1},  du_{k-1} = u_k - u_{k-1},  rho_{k-1} = 1 / <du_{k-1}, dw_{k-1}>
                                              (0 where the product is 0, and at k = 0)
    gamma_k  = <du_{k-1}, dw_{k-1}> / ||du_{k-1}||^2   (1 where ||du|| = 0; k = 0:
               min(1, 1 / ||u_0||); 1 without scale_init_precond)
    q = u_k;  for j = k-1 ... k-m:  alpha_j = rho_j <dw_j, q>;  q <- q - alpha_j du_j
    r = gamma_k q;  for j = k-m ... k-1:  beta_j = rho_j <du_j, r>;  r += (alpha_j - beta_j) dw_j
    output: r = P_k u_k

``<a, b>`` is :func:`tree_vdot`, conj(a) . b over all leaves (its real part is used).

Also here: :func:`value_and_grad_from_state`, L-BFGS's loop helper, which reuses the value
and gradient a line search (:mod:`.linesearch`) stored at the point it accepted.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from optcompose import tree as otree
from optcompose.core import (
  FLAG,
  GradientTransformation,
  cond,
  default_float,
  expect_state,
  integer,
  needs_params,
  public,
  safe_increment,
  zero_count,
)
from optcompose.core.explicit import sharded_axes, sharded_like, type_sharding
from optcompose.transforms.statistics import same_structure

# Optax's names (and the builder it registers); lbfgs_direction and the tree helpers are
# reached through this module.
__all__ = ["ScaleByLBFGSState", "value_and_grad_from_state"]


def _op(fn, *xs):
  return fn(*otree.promote(*xs))


def tree_vdot(a: Any, b: Any) -> jax.typing.ArrayLike:
  """``sum_leaves conj(a) . b`` (Optax's ``optax.tree.vdot``), each leaf's product in its
  dtype at the highest precision (bfloat16 and float16 in float32), summed left to right
  (the int 0 for trees without leaves)."""

  def leaf(x, y):
    x, y = jnp.asarray(x), jnp.asarray(y)
    dtype = otree.promote_types(x.dtype, y.dtype, jnp.float32)
    x, y = x.astype(dtype), y.astype(dtype)
    x = jnp.conj(x) if jnp.iscomplexobj(x) else x
    sharding = type_sharding(x) if type_sharding(x) is not None else type_sharding(y)
    if sharding is not None and sharded_axes(sharding.spec):
      # Split over explicit axes, the contraction must name where its (scalar) result goes:
      # replicated, each device's partial product summed over the mesh. The same product.
      dims = tuple(range(x.ndim))
      return jax.lax.dot_general(
        x,
        y,
        ((dims, dims), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        out_sharding=NamedSharding(sharding.mesh, PartitionSpec()),
      )
    return jnp.tensordot(x, y, x.ndim, precision=jax.lax.Precision.HIGHEST)

  return functools.reduce(
    lambda s, v: _op(jnp.add, s, v), jax.tree.leaves(jax.tree.map(leaf, a, b)), 0
  )


def tree_add_scale(x: Any, s: Any, y: Any) -> Any:
  """``x + s y`` on every leaf, rounded to ``x``'s dtype."""
  return jax.tree.map(
    lambda a, b: _op(jnp.add, a, _op(jnp.multiply, s, b)).astype(jnp.result_type(a)), x, y
  )


def tree_scale(s: Any, x: Any) -> Any:
  """``s x`` on every leaf, rounded to the leaf's dtype."""
  return jax.tree.map(lambda a: _op(jnp.multiply, s, a).astype(jnp.result_type(a)), x)


@jax.jit  # compiled once per layout: eager calls reuse it (under jit it is inlined)
def lbfgs_direction(
  updates: Any,
  diff_params_memory: Any,
  diff_updates_memory: Any,
  weights_memory: jax.Array,
  identity_scale: Any,
  memory_idx: jax.Array,
) -> Any:
  """``P_k u``: the two-loop recursion (see the module docstring) over the memory.

  Args:
    updates: u, the direction to precondition.
    diff_params_memory: dw_j, stacked along a leading axis of size m (a ring buffer).
    diff_updates_memory: du_j, likewise.
    weights_memory: rho_j, shape (m,).
    identity_scale: gamma_k.
    memory_idx: the slot the next difference goes to (the oldest one): k mod m.

  Returns:
    ``P_k u`` in ``updates``' structure and dtypes.

  References:
    Nocedal and Wright, "Numerical Optimization", 1999, Algorithm 7.4; Optax's
    ``_precondition_by_lbfgs``.
  """
  m = weights_memory.shape[0]
  indices = (memory_idx + jnp.arange(m, dtype=jnp.result_type(memory_idx))) % m

  def pair(i):
    return jax.tree.map(lambda x: x[i], (diff_params_memory, diff_updates_memory))

  def kept(new, carry):  # on explicit axes a loop's carry keeps its sharding (ZeRO-1's
    return jax.tree.map(sharded_like, new, carry)  # history split, the updates not)

  def newest_first(q, i):
    dw, du = pair(i)
    alpha = _op(jnp.multiply, weights_memory[i], jnp.real(tree_vdot(dw, q)))
    return kept(tree_add_scale(q, -alpha, du), q), alpha

  q, alphas = jax.lax.scan(newest_first, updates, indices, reverse=True)
  r = tree_scale(identity_scale, q)

  def oldest_first(r, i_alpha):
    i, alpha = i_alpha
    dw, du = pair(i)
    beta = _op(jnp.multiply, weights_memory[i], jnp.real(tree_vdot(du, r)))
    return kept(tree_add_scale(r, _op(jnp.subtract, alpha, beta), dw), r), beta

  return jax.lax.scan(oldest_first, r, (indices, alphas))[0]


class ScaleByLBFGSState(NamedTuple):
  """Optax's fields: the step count, the last params and updates, and the ring buffers."""

  count: jax.Array  # k, int32
  params: Any  # w_{k-1}
  updates: Any  # u_{k-1}
  diff_params_memory: Any  # dw_j, each leaf with a leading axis of size memory_size
  diff_updates_memory: Any  # du_j
  weights_memory: jax.Array  # rho_j, (memory_size,) in JAX's default float


@public(
  "transformation",
  optax="scale_by_lbfgs",
  memory_size=integer(1, draw=(1, 10)),
  scale_init_precond=FLAG,
)
def scale_by_lbfgs(
  memory_size: int = 10, scale_init_precond: bool = True
) -> GradientTransformation:
  """L-BFGS's direction: the update times an approximate inverse Hessian, ``r = P_k u_k``.

  Update: the memory takes the newest differences ``dw = w_k - w_{k-1}``,
  ``du = u_k - u_{k-1}``, ``rho = 1 / <du, dw>`` (nothing at the first step), then ``r`` is
  the two-loop recursion (module docstring) with ``gamma_k = <du, dw> / ||du||^2``, or
  ``min(1, 1 / ||u_0||)`` at the first step (a step of norm at most 1), or 1 without
  ``scale_init_precond``. The output is a descent direction's opposite: follow it with a
  negative step (``scale(-1)``, a learning rate) and a line search (:func:`lbfgs`).

  Reads ``params``: the memory is updated from the parameters of each call, so it must be
  called once per accepted step (after a line search, the next call sees where it went).

  Args:
    memory_size: m >= 1, the number of past differences kept (a Python int).
    scale_init_precond: use ``gamma_k`` (else the identity) to start the recursion.

  Returns:
    A transformation with state :class:`ScaleByLBFGSState` (Optax's fields, shapes and
    dtypes; the memory holds ``memory_size`` copies of the parameters twice over); updates
    keep the gradients' dtype.

  References:
    Nocedal and Wright, "Numerical Optimization", 1999, Algorithms 7.4 and 7.5; Liu and
    Nocedal, "On the limited memory BFGS method for large scale optimization", 1989;
    Optax's ``optax.scale_by_lbfgs``.
  """

  def init(params):
    otree.check_floating(params, "params")

    def stacked():  # one buffer per field: a state whose leaves share one cannot be donated
      # Broadcast from the parameter's zeros: on explicit axes each copy has its sharding.
      return jax.tree.map(
        lambda p: jnp.broadcast_to(
          jnp.zeros_like(p, jnp.result_type(p))[None], (memory_size,) + jnp.shape(p)
        ),
        params,
      )

    return ScaleByLBFGSState(
      zero_count(),
      otree.zeros_like(params),
      otree.zeros_like(params),
      stacked(),
      stacked(),
      jnp.zeros(memory_size, default_float()),
    )

  def update(updates, state, params=None, **extra):
    del extra
    expect_state(state, ScaleByLBFGSState, "scale_by_lbfgs")
    params = needs_params(params, "scale_by_lbfgs")
    same_structure(updates, state.updates, "updates")
    otree.check_same_structure(params, state.params, "params", "state.params")
    k = state.count
    idx, prev_idx = k % memory_size, (k - 1) % memory_size
    started = k > 0

    def diff(new, old):  # new - old in old's dtype, 0 at the first step
      return jax.tree.map(
        lambda a, b: jnp.where(started, _op(jnp.subtract, a, b).astype(b.dtype), jnp.zeros_like(b)),
        new,
        old,
      )

    dw, du = diff(params, state.params), diff(updates, state.updates)
    curvature = jnp.real(tree_vdot(du, dw))
    weight = jnp.where(curvature == 0.0, 0.0, 1.0 / curvature)
    weight = jnp.where(started, weight, jnp.zeros_like(weight))
    dw_mem, du_mem = (
      jax.tree.map(lambda m, d: m.at[prev_idx].set(d), mem, d)
      for mem, d in ((state.diff_params_memory, dw), (state.diff_updates_memory, du))
    )
    rhos = state.weights_memory.at[prev_idx].set(weight.astype(state.weights_memory.dtype))
    if scale_init_precond:
      sq = otree.squared_norm(du)
      gamma = jnp.where(sq > 0.0, _op(jnp.divide, curvature, sq), 1.0)
      first = jnp.minimum(1.0, 1.0 / otree.global_norm(jax.lax.stop_gradient(updates)))
      gamma = jnp.where(started, *otree.promote(gamma, first))
    else:
      gamma = 1.0
    direction = lbfgs_direction(updates, dw_mem, du_mem, rhos, gamma, idx)
    new_state = ScaleByLBFGSState(
      safe_increment(k),
      otree.cast_like(params, state.params),
      otree.cast_like(updates, state.updates),
      dw_mem,
      du_mem,
      rhos,
    )
    return direction, new_state

  return GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------
# Reusing the line search's last evaluation.


def _stored(state, key):
  """The one NamedTuple field named ``key`` anywhere in ``state`` (a state's field: unlike
  Optax's ``tree_get``, dict keys do not count, so a parameter named ``value`` inside the
  stored gradient is not taken for it)."""
  found = [
    getattr(n, key)
    for _, n in otree.find_nodes(
      state, lambda n: isinstance(n, tuple) and key in getattr(n, "_fields", ())
    )
  ]
  if len(found) > 1:
    raise KeyError(
      f"value_and_grad_from_state: the state holds {len(found)} entries named "
      f"{key!r}, not one (one line search)."
    )
  return found[0] if found else None


def value_and_grad_from_state(value_fn: Callable[..., Any]) -> Callable[..., tuple]:
  """``jax.value_and_grad(value_fn)`` that reuses the value and gradient a line search stored.

  ``fn(params, *args, state=state, **kwargs)`` returns the stored ``(value, grad)``,
  computed at the point the line search accepted (where ``params`` now are), when the stored
  value is finite; else ``jax.value_and_grad(value_fn)(params, *args, **kwargs)`` (at the
  first step the stored value is +inf), cast to the stored dtypes.

  Args:
    value_fn: the objective, a real scalar function of the parameters (first argument).

  Returns:
    The function above. It raises a ValueError when the state stores no value or gradient
    (a backtracking search without ``store_grad``), a KeyError when it stores several.

  References:
    Optax's ``optax.value_and_grad_from_state``.
  """

  def value_and_grad(params, *fn_args, state, **fn_kwargs):
    value, grad = _stored(state, "value"), _stored(state, "grad")
    if value is None or grad is None:
      raise ValueError(
        "value_and_grad_from_state: the state stores no "
        f"{'value' if value is None else 'gradient'}; use a line search that "
        "stores both (scale_by_zoom_linesearch, or "
        "scale_by_backtracking_linesearch(..., store_grad=True))."
      )

    def compute(_):
      v, g = jax.value_and_grad(value_fn)(params, *fn_args, **fn_kwargs)
      return jnp.asarray(v).astype(jnp.result_type(value)), otree.cast_like(g, grad)

    return cond(jnp.isfinite(value), lambda _: (value, grad), compute, None)

  return value_and_grad
