"""Ordering a step's reads before its in-place writes, without changing a value.

XLA writes a donated buffer (the parameters, the optimizer state) in place only when it can
prove that every other read of that buffer runs first; where it cannot, it copies the whole
buffer at every step. A read inside a ``lax.cond`` is such a read: ``with_diagnostics``
measures the parameters and reruns the inner step there, and ``multi_steps`` reads its
accumulator there. On XLA CPU the copies made ``with_diagnostics(adamw, every_k=10)`` cost
3.7x the bare AdamW step (8M float32 parameters), against 1.1x with :func:`ordered_after`;
``lax.optimization_barrier`` did not remove them.

Order *everything* the consumer reads. Ordering only the gradients made LLVM contract
AdamW's ``b1 * m + (1 - b1) * g`` into a fused multiply-add the other way round (a last-bit
difference in about a third of the moments); with the gradients, the state and the
parameters all ordered, eleven optimizers (AdamW, Adafactor, clipping's reduction, ...)
computed bit for bit what they compute unordered with XLA CPU's default emitters, though not
with its older ones (``--xla_cpu_use_fusion_emitters=false``, which this project's tests use
to compile faster): there about a third of AdamW's moments still differed in the last bit.
So ``with_diagnostics`` orders only leaves of 2^14 elements or more, whose copies cost; a
smaller leaf's copy costs microseconds, and its arithmetic stays that of the inner step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ordered_after(tree: Any, token: jax.Array, min_size: int = 0) -> Any:
  """``tree``, unchanged bit for bit, but computed from ``token``: whatever reads the
  result runs after whatever computed ``token`` (a scalar; no gradient flows to it).

  Each floating-point leaf's bits are OR-ed with a zero that depends on ``token``
  (``where(isnan(t), 0, min(0, |t|))``, converted to an integer: 0 for every ``t``), and
  ``x`` itself is selected where that zero is 0 (always; XLA cannot know it): every value
  comes back as it was, subnormals and NaN payloads included (a floating-point ``x - 0``
  would not do: XLA CPU flushes subnormals to zero), and the body differentiates as the
  identity at every order, also where ``lax.scan`` differentiates it rather than the rule.
  It fuses into the loops that read ``x``: no pass over memory is added. Complex, integer
  and boolean leaves, and leaves of fewer than ``min_size`` elements, are returned as they
  are, and so are not ordered; so is the whole tree when called eagerly (a concrete token).
  """
  if not isinstance(token, jax.core.Tracer):  # run eagerly: no compiled program to order
    return tree
  t = jax.lax.stop_gradient(jnp.asarray(token)).astype(jnp.float32)

  def order(x):
    if not isinstance(x, jax.Array) or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if x.size < min_size:
      return x
    return _ordered_leaf(x, t)

  return jax.tree.map(order, tree)


@jax.custom_jvp
def _ordered_leaf(x: jax.Array, t: jax.Array) -> jax.Array:
  zero = jnp.where(jnp.isnan(t), 0.0, jnp.minimum(0.0, jnp.abs(t))).astype(jnp.int8)
  bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
  word = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(x), bits) | zero.astype(bits)
  # x itself where zero == 0 (always), so that the body differentiates as the identity too:
  # inside lax.scan, a second derivative (jax.hessian) differentiates this body rather than
  # the rule below, and the integer bits alone gave it a zero derivative (half the Hessian).
  return jnp.where(zero == 0, x, jax.lax.bitcast_convert_type(word, x.dtype))


@_ordered_leaf.defjvp
def _ordered_leaf_jvp(primals, tangents):
  """The identity's derivative (through the integer bits JAX would give none)."""
  return _ordered_leaf(*primals), tangents[0]
