"""Sharpness-aware gradients: SAM's one-call transformation and the global normalisation.

With g the gradient at w and ``|.|`` the global L2 norm over all leaves::

    sharpness_aware:  e = rho g / (|g| + eps)                  (adaptive: rho T^2 g / (|T g| + eps),
                                                                 T = |w| + eta)
                      u = grad_fn(w + e)                        (the second gradient evaluation)
    normalize:        u = g / |g|                               (0 for a zero g)

See :mod:`optcompose.wrappers.sam` for Optax's two-optimizer ``sam``.

References:
  Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for Efficiently
  Improving Generalization", ICLR 2021; Kwon, Kim, Park and Choi, "ASAM: Adaptive
  Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks",
  ICML 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optcompose import tree as otree
from optcompose.core import (
  FLAG,
  EmptyState,
  GradientTransformation,
  needs_params,
  public,
  real,
  stateless,
)

GRAD_FN = "grad_fn"  # the keyword that carries the second gradient evaluation


# ---------------------------------------------------------------------------------------
# Formulas.


def normalized_leaf(g, norm):
  """``g / |g|``; the caller passes ``norm`` with zeros replaced by 1 (so 0 stays 0)."""
  return g / norm.astype(jnp.result_type(g))


def adversarial_leaf(w, g, rho, denominator, eta, adaptive):
  """``w + rho g / denominator`` (SAM) or ``w + rho T^2 g / denominator`` with
  ``T = |w| + eta`` (ASAM), in w's dtype."""
  g = jnp.asarray(g)
  direction = g / denominator.astype(g.dtype)
  if adaptive:
    t = jnp.abs(w) + eta
    direction = t * t * direction
  return jnp.asarray(w + rho * direction).astype(jnp.asarray(w).dtype)


def _safe(norm):
  return jnp.where(norm > 0, norm, jnp.ones_like(norm))


# ---------------------------------------------------------------------------------------
# One call per step.


@public(
  "transformation",
  rho=real(0.0, draw=(1e-3, 0.5), schedule=False),
  adaptive=FLAG,
  eta=real(0.0, schedule=False, draw=(0.0, 0.1)),
  eps=real(0.0, schedule=False, draw=(1e-12, 1e-6)),
)
def sharpness_aware(
  rho: float = 0.05, *, adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12
) -> GradientTransformation:
  """Replace the gradient ``g`` at ``w`` by the SAM gradient ``grad L(w + e)``.

  ``update(g, state, params, grad_fn=f)`` evaluates ``f`` -- the caller's gradient
  function, ``params -> gradients``, closed over the *same batch* as ``g`` -- once, at::

      e     = rho g / (|g| + eps)                     (adaptive=False)
      e     = rho T^2 g / (|T g| + eps),  T = |w| + eta   (adaptive=True, ASAM)
      g_sam = f(w + e)

  and returns ``g_sam``. It is stateless; put it **first** in the chain, before clipping
  and the optimizer, which then see ``g_sam`` as their gradient::

      tx = chain(sharpness_aware(rho=0.05), sgd(0.1, momentum=0.9))

      @jax.jit
      def step(params, state, batch):
        grad_fn = lambda p: jax.grad(loss)(p, batch)
        g = grad_fn(params)                                    # 1st evaluation
        u, state = tx.update(g, state, params, grad_fn=grad_fn)  # 2nd, inside
        return apply_updates(params, u), state

  A function is not an array: jit the whole step as above (``grad_fn`` built inside it),
  not ``tx.update`` with ``grad_fn`` as an argument. The loss to log is the one at ``w``
  (the first evaluation). Side effects of the second
  evaluation (e.g. batch-norm statistics) are the caller's to discard. This API differs
  from Optax's :func:`sam` (which needs an adversarial optimizer, a sync period and, in
  its default mode, two ``update`` calls per step): SAM as Foret et al. describe it is a
  gradient transformation, and written as one it composes with every optimizer, schedule
  and wrapper, and keeps a single optimizer state. ``grad_fn`` is passed by
  :func:`optcompose.chain` and by Flax's ``nnx.Optimizer.update(..., grad_fn=...)``;
  ``optax.chain`` drops keyword arguments for non-Optax members, so use it at the top
  level or inside an optcompose chain.

  Args:
    rho: the neighbourhood radius (0.05 in the paper for SGD on CIFAR; ASAM uses larger
      values, e.g. 0.5 to 2).
    adaptive: ASAM's scale-invariant neighbourhood (``T`` applies to every leaf; the
      ASAM authors' code exempts biases, and the popular PyTorch implementation
      ``davda54/sam`` with ``adaptive=True`` uses ``eta = 0``).
    eta: ASAM's offset in ``T = |w| + eta`` (0.01 in the paper).
    eps: added to the norm, so a zero gradient gives ``e = 0`` (Keras' and the PyTorch
      implementations use 1e-12).

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`) whose ``update`` needs
    ``params`` and ``grad_fn=``, and returns ``g_sam``.

  References:
    Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for Efficiently
    Improving Generalization", ICLR 2021 (Algorithm 1); Kwon, Kim, Park and Choi, "ASAM:
    Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
    Networks", ICML 2021.
  """
  fn = "sharpness_aware"

  def update(updates, state, params=None, **extra):
    grad_fn = extra.get(GRAD_FN)
    if grad_fn is None or not callable(grad_fn):
      raise ValueError(
        f"{fn}: update needs `grad_fn=`, a function params -> gradients on the "
        "same batch (SAM's second gradient evaluation)."
      )
    needs_params(params, fn)
    otree.check_same_structure(updates, params, "updates", "params")
    if adaptive:
      scaled = jax.tree.map(lambda w, g: (jnp.abs(w) + eta) * g, params, updates)
      norm = otree.global_norm(scaled)
    else:
      norm = otree.global_norm(updates)
    denominator = norm + eps
    w_adv = jax.tree.map(
      lambda w, g: adversarial_leaf(w, g, rho, denominator, eta, adaptive), params, updates
    )
    g_sam = grad_fn(w_adv)
    otree.check_same_structure(g_sam, updates, "grad_fn(params)", "updates")
    return g_sam, state

  return GradientTransformation(lambda params: EmptyState(), update)


NormalizeState = EmptyState


@public("transformation", optax="contrib.normalize")
def normalize() -> GradientTransformation:
  """Divide the updates by their global L2 norm: ``u <- u / |u|`` (``optax.contrib.normalize``).

  Update: ``u <- u / |u|``, ``|u|`` the global L2 norm over all leaves; 0 for a zero u
  (unlike Optax's, a zero update stays zero instead of becoming NaN).

  Returns:
    A stateless transformation (:class:`~optcompose.EmptyState`).

  References:
    Optax's ``optax.contrib.normalize``; Foret, Kleiner, Mobahi and Neyshabur,
    "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021
    (the ascent direction of SAM).
  """

  def f(updates, params):
    norm = _safe(otree.global_norm(updates))
    return jax.tree.map(lambda g: normalized_leaf(g, norm), updates)

  return stateless(f)


__all__ = []  # and the builders it registers
