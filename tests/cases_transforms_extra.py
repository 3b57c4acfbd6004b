"""Registry cases (tests/registry.py) for centralize, normalize_by_update_norm, zero_nans,
keep_params_nonnegative and scale_by_distance_over_gradients, each against Optax's
transformation of the same name.

Optax's ``scale_by_distance_over_gradients`` multiplies each leaf by a step size of shape
``(1,)``, a rank promotion the suite raises on (tests/conftest.py): its reference runs with
rank promotion allowed. The problems have no scalar leaf, where Optax's update would also
take shape ``(1,)`` (ours keeps the leaf's shape: tests/test_transforms_extra.py).
"""

from __future__ import annotations

import jax
import optax

import optcompose as oc
from registry import LR, Case


def rank_promotion_allowed(tx):
  """``tx`` (an Optax transformation) with its ``init`` and ``update`` traced under
  ``jax_numpy_rank_promotion="allow"``."""

  def allowed(fn):
    def run(*args, **kwargs):
      with jax.numpy_rank_promotion("allow"):
        return fn(*args, **kwargs)

    return run

  return tx._replace(init=allowed(tx.init), update=allowed(tx.update))


# DoG's first step is reps_rel * (1 + ||w0||) long, times the learning rate: with the default
# reps_rel = 1e-6 it underflows float16 (the defaults are compared in float64 and float32 in
# tests/test_transforms_extra.py).
def _dog_options():
  return dict(reps_rel=0.1, eps=1e-6, param_dtype=None, global_scale=2.0)


CASES = [
  Case(
    "centralize",
    lambda: oc.chain(oc.centralize(), oc.scale_by_learning_rate(LR)),
    ("centralize",),
    optax=lambda: optax.chain(optax.centralize(), optax.scale_by_learning_rate(LR)),
  ),
  # Normalized gradient descent: steps of length 1e-3 (200 of them do not reach the MLP's
  # minimum, where the direction of a vanishing gradient would amplify rounding).
  Case(
    "normalize_by_update_norm",
    lambda: oc.normalize_by_update_norm(-1e-3),
    ("normalize_by_update_norm",),
    optax=lambda: optax.normalize_by_update_norm(-1e-3),
  ),
  Case(
    "zero_nans",
    lambda: oc.chain(oc.zero_nans(), oc.scale_by_learning_rate(LR)),
    ("zero_nans",),
    optax=lambda: optax.chain(optax.zero_nans(), optax.scale_by_learning_rate(LR)),
  ),
  # Last in its chain, as Optax's docstring asks: parameters that would turn negative (the
  # quadratic's targets below 0, the MLP's negative weights) land on 0.
  Case(
    "keep_params_nonnegative",
    lambda: oc.chain(oc.scale_by_learning_rate(LR), oc.keep_params_nonnegative()),
    ("keep_params_nonnegative",),
    optax=lambda: optax.chain(optax.scale_by_learning_rate(LR), optax.keep_params_nonnegative()),
  ),
  Case(
    "scale_by_distance_over_gradients",
    lambda: oc.chain(oc.scale_by_distance_over_gradients(1e-2), oc.scale_by_learning_rate(LR)),
    ("scale_by_distance_over_gradients",),
    optax=lambda: rank_promotion_allowed(
      optax.chain(optax.scale_by_distance_over_gradients(1e-2), optax.scale_by_learning_rate(LR))
    ),
  ),
  # The initial parameters kept in their own dtype, a larger initial distance, a scale.
  Case(
    "scale_by_distance_over_gradients_options",
    lambda: oc.chain(
      oc.scale_by_distance_over_gradients(**_dog_options()), oc.scale_by_learning_rate(LR)
    ),
    ("scale_by_distance_over_gradients",),
    optax=lambda: rank_promotion_allowed(
      optax.chain(
        optax.scale_by_distance_over_gradients(**_dog_options()), optax.scale_by_learning_rate(LR)
      )
    ),
  ),
]
