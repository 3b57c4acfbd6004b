"""Names outside the optimizer domain come from Optax (a dependency), not rewritten; a name
of the optimizer domain not rebuilt yet raises an AttributeError that says what to use."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose
from optcompose._from_optax import NAMESPACES


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_namespaces_are_optax_s(namespace):
  assert getattr(optcompose, namespace) is getattr(optax, namespace)


def test_top_level_losses_are_optax_s_and_run():
  """The Flax MNIST example's first step needs this name at the top level."""
  loss = optcompose.softmax_cross_entropy_with_integer_labels
  assert loss is optax.softmax_cross_entropy_with_integer_labels
  logits, labels = jnp.array([[2.0, 0.5, -1.0]]), jnp.array([0])
  np.testing.assert_allclose(loss(logits, labels), optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels))
  assert optcompose.l2_loss is optax.l2_loss
  assert optcompose.power_iteration is optax.power_iteration


def test_optimizer_domain_names_not_rebuilt_say_so():
  name = next(n for n in ("adafactor", "lbfgs", "sm3", "global_norm") if n not in dir(optcompose)
              and n not in optcompose.__dict__)
  with pytest.raises(AttributeError, match=rf"no attribute '{name}' yet: Optax's `optax.{name}` "
                     "is in the optimizer domain"):
    getattr(optcompose, name)
  with pytest.raises(AttributeError, match="nor has Optax"):
    optcompose.not_a_name_anywhere
  assert not hasattr(optcompose, "__wrapped__")  # dunder probes do not import anything
