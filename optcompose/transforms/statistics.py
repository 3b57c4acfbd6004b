"""The formulas of moment statistics, each written once as a per-leaf function.

Symbols as in the tests (g: gradient, m: first moment, v: second moment, t: step count
starting at 1, beta: EMA decay)::

    ema:              m_t = (1 - beta) * g_t + beta * m_{t-1}
    bias correction:  m_hat_t = m_t / (1 - beta^t)       (beta^t in float32 or wider)
    Nadam's moment:   b1 * m_t / (1 - b1^(t+1)) + (1 - b1) * g_t / (1 - b1^t)
    variance:         max(v - m^2, 0)
    inverse RMS:      1 / sqrt(v + eps)   or   1 / (sqrt(v) + eps)
    Adam's direction: m_hat / (sqrt(v_hat + eps_root) + eps)

The transformations in :mod:`.momentum`, :mod:`.second_moment` and :mod:`.adaptive` are
built from these and from nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core.validation import default_float


def ema_leaf(beta, m, x):
  """One EMA step: ``(1 - beta) * x + beta * m`` (``optcompose.tree.moment_leaf``'s formula:
  each product in the wider of its operands' dtypes, as implicit promotion would)."""
  return otree.moment_leaf(x, m, beta)


def rounds_precision_only(x, stored):
  """Whether ``stored`` is ``x`` rounded to a narrower dtype of the same exponent range
  (bfloat16 for float32; not float16, whose range the statistics are widened for)."""
  if jnp.iscomplexobj(stored) != jnp.iscomplexobj(x):  # complex64 and float32 share finfo
    return False
  narrow, wide = jnp.finfo(stored.dtype), jnp.finfo(x.dtype)
  return stored.dtype != x.dtype and (narrow.minexp, narrow.maxexp) == (wide.minexp, wide.maxexp)


def second_moment_ema_leaf(beta, v, sq):
  """:func:`ema_leaf` of a second moment: ``(1 - beta) sq + beta v``. A v stored narrower in
  precision only than the square (bfloat16 for float32) is widened first: ``beta v`` in
  bfloat16 would round beta (0.999 to 1.0, so that v never decays). A float16 v keeps
  Optax's arithmetic (``beta v`` in float16, where 0.999 is 0.99902)."""
  return ema_leaf(beta, v.astype(sq.dtype) if rounds_precision_only(sq, v) else v, sq)


def debias_factor(beta, count):
  """``1 / (1 - beta^count)``, computed in float32 or wider (beta^t rounds to 1 in bfloat16),
  float64 under x64 (a float32 beta's reciprocal, rounded in float32, put Adam's float64
  first step 4e-8 past the learning rate)."""
  return 1 / otree.bias_correction_denominator(beta, count, default_float())


def debias_leaf(m, factor):
  """Bias correction ``m / (1 - beta^t)``, as ``m * factor`` with
  ``factor = debias_factor(beta, t)``.

  The scalar factor is computed once per step, outside the per-leaf map, and multiplies
  each leaf: a division by a broadcast scalar is rewritten by XLA into a multiplication by
  its reciprocal, or merged with the next division, depending on the rest of the graph, so
  its rounding would depend on the tree's shape (FlatParams against a pytree, a
  one-element leaf against a matrix). The product runs in m's precision (float32 for a
  float16 m: 1 / (1 - b2^t) reaches 1e5 for b2 = 0.99999, past float16's range).
  """
  m = _wide_enough(m)
  return m * factor.astype(jnp.result_type(m))


def nesterov_moment_leaf(b1, m_hat_next, g_hat):
  """Nadam's look-ahead moment ``b1 * m_t / (1 - b1^(t+1)) + (1 - b1) * g_t / (1 - b1^t)``,
  given the two debiased terms (this operand order matches Optax's rounding under jit)."""
  # Each operation in the wider of its operands' dtypes (the casts written out).
  ahead = jnp.multiply(*otree.promote(b1, m_hat_next))
  now = jnp.multiply(*otree.promote(1 - b1, g_hat))
  return jnp.add(*otree.promote(ahead, now))


def _wide_enough(x):
  """float16 statistics are divided in float32: float16 cannot hold eps = 1e-8 (it rounds to
  0, and a zero gradient then gives 0 / 0 = NaN). bfloat16 has float32's range and is kept,
  as in Optax. (float16 parameters' second moments are stored in float32: see
  :func:`squares_init`.)"""
  x = x if isinstance(x, jax.Array) else jnp.asarray(x)
  return x.astype(jnp.float32) if x.dtype == jnp.float16 else x


def variance_leaf(m, v):
  """``v - m^2``, clamped at 0: rounding can make it slightly negative (e.g. at step 1 with
  bias correction, where it is exactly 0 in real arithmetic), and its square root NaN."""
  m, v = _wide_enough(m), _wide_enough(v)
  return jnp.maximum(v - otree.abs_sq(m), 0)


def square_leaf(g, v):
  """``|g|^2`` for a second moment ``v``, squared in the wider of the two dtypes, and in
  float32 for float16: g^2 underflows there below |g| = 2.4e-4 (the step's statistic is then
  float32; it is rounded to the state's dtype only when stored)."""
  g = jnp.asarray(g)
  return otree.abs_sq(_wide_enough(g.astype(otree.promote_types(g.dtype, jnp.result_type(v)))))


def inverse_rms_leaf(v, eps, eps_in_sqrt):
  """``1 / sqrt(v + eps)`` (``eps_in_sqrt``) or ``1 / (sqrt(v) + eps)``."""
  # The sum in the wider of v's and eps's dtypes (a scheduled float32 eps with bfloat16 v).
  v = _wide_enough(v)
  if eps_in_sqrt:
    return jax.lax.rsqrt(jnp.add(*otree.promote(v, eps)))
  return 1 / jnp.add(*otree.promote(jnp.sqrt(v), eps))


def adam_direction_leaf(m_hat, v_hat, eps, eps_root):
  """``m_hat / (sqrt(v_hat + eps_root) + eps)``."""
  # Each operation in the wider of its operands' dtypes (e.g. a float32 first moment over a
  # bfloat16 second one: float32).
  m_hat, v_hat = _wide_enough(m_hat), _wide_enough(v_hat)
  root = jnp.sqrt(jnp.add(*otree.promote(v_hat, eps_root)))
  return jnp.divide(*otree.promote(m_hat, jnp.add(*otree.promote(root, eps))))


def moments_init(params, dtype=None, value=0.0):
  """A moment buffer like ``params`` (floating leaves only), filled with ``value``."""
  otree.check_floating(params, "params")
  return otree.full_like(params, value, dtype=dtype)


def squares_init(params, dtype=None, value=0.0):
  """A buffer for statistics of squared gradients (a second moment), like ``params``, filled
  with ``value``: in ``dtype`` if given, else each leaf's own, float32 for a float16 leaf.
  float16 cannot keep them: ``(1 - b2) g^2`` is below its smallest step (6e-8) for
  ``|g| < 5e-3`` at ``b2 = 0.999``, so a float16 second moment stayed 0 while the step,
  computed in float32, divided by the unrounded one: Adam's steps up to ``1/sqrt(1 - b2)``
  (32) times too large (Optax's, computed in float16, are infinite)."""
  state = moments_init(params, dtype, value)
  if dtype is not None:
    return state
  return jax.tree.map(lambda x: x.astype(squares_dtype(x.dtype)), state)


def squares_dtype(dtype):
  """The dtype statistics of squared gradients are kept in for a leaf of ``dtype``: its own,
  float32 for float16 (see :func:`squares_init`)."""
  return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


def reject_complex(tree, what: str, who: str, why: str) -> None:
  """A TypeError naming ``who`` and the first complex leaf of ``tree`` (``what``: its name,
  e.g. "updates"), saying ``why`` the transformation has no meaning there."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.iscomplexobj(x):
      raise TypeError(f"{who}: `{what}{otree.path_str(path)}` is complex: {why}.")


def like_params(params, dtype, who: str, copy: bool = False):
  """Zeros like each leaf (``copy``: the leaf itself, copied) for a state that holds
  values of the parameters' kind (a first moment, a trace, the initial parameters), in
  ``dtype`` (None: the leaf's). For a complex leaf a real ``dtype`` means its complex
  counterpart of that precision (float32: complex64), which keeps the imaginary part that
  Optax's drops; a 16-bit one has none: a TypeError naming ``who`` and the leaf."""

  def leaf(path, p):
    d = dtype
    if d is not None and jnp.iscomplexobj(p) and not jnp.issubdtype(d, jnp.complexfloating):
      if jnp.finfo(d).bits < 32:
        raise TypeError(
          f"{who} is {jnp.dtype(d)} for the complex parameter params{otree.path_str(path)}: "
          "there is no complex dtype of 16 bits, and a real state would drop the imaginary "
          "part; give None or jnp.complex64."
        )
      d = complex_of(d)
    return jnp.array(p, dtype=d) if copy else jnp.zeros_like(p, dtype=d)

  return jax.tree_util.tree_map_with_path(leaf, params)


def same_structure(updates, state_tree, field):
  otree.check_same_structure(updates, state_tree, "updates", f"state.{field}")


def in_grad_dtype(u, g):
  """``u`` in the gradient ``g``'s dtype. A real gradient of a complex parameter meets moments
  of the parameter's complex dtype whose imaginary parts stay 0 (they start at 0 and only
  real gradients enter): its update is their real part, taken exactly (a cast from complex
  to real is deprecated in JAX)."""
  real = not jnp.issubdtype(jnp.result_type(g), jnp.complexfloating)
  return (jnp.real(u) if real and jnp.iscomplexobj(u) else u).astype(jnp.result_type(g))


def in_grad_dtypes(updates, new):
  """``new``, each leaf in the dtype of the gradient leaf it updates (:func:`in_grad_dtype`)."""
  return jax.tree.map(lambda g, u: in_grad_dtype(u, g), updates, new)


def complex_of(dtype) -> type:
  """The complex dtype of a real float ``dtype``'s precision (float64: complex128; float32
  and narrower: complex64, the narrowest there is)."""
  return jnp.complex128 if jnp.finfo(dtype).bits > 32 else jnp.complex64
