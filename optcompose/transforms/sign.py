"""Sign: keep each coordinate's direction, drop its magnitude.

Formula (g: the incoming update)::

    u = sign(g)          (0 where g = 0)
"""

from __future__ import annotations

import jax.numpy as jnp

from optcompose.core import GradientTransformation, public, stateless_with_tree_map


def sign_leaf(g):
  """``sign(g)``, in g's dtype."""
  return jnp.sign(g)


@public("transformation", optax="scale_by_sign")
def scale_by_sign() -> GradientTransformation:
  """Replace each coordinate of the updates by its sign: ``u = sign(g)``.

  Returns:
    A stateless transformation.

  References:
    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
  """
  return stateless_with_tree_map(lambda g, w: sign_leaf(g))
