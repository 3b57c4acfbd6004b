"""``set_hyperparams`` and ``current_hyperparams`` through every wrapper: one state type and one
walker serve injected and scheduled hyperparameters, ours and Optax's, at any depth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import standard_promotion

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.full((3,), 0.25)}
GRADS = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, PARAMS)


def _schedule(count):
  return 0.1 / (1.0 + jnp.asarray(count, jnp.float32))


INNERS = {
  "injected": lambda: oc.inject_hyperparams(oc.adam)(learning_rate=0.1),
  "scheduled": lambda: oc.adam(_schedule),
  # Optax's code relies on implicit dtype promotion (the suite's is strict).
  "optax_injected": lambda: standard_promotion(
    optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
  ),
}


def _labels(params):
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten(["a" if i == 0 else "b" for i in range(len(leaves))])


# Every public wrapper (oc.WRAPPERS), plus chain and Optax's wrappers around ours. Each entry:
# (build(inner) -> transformation, params the update takes).
WRAPPERS = {
  "masked": lambda t: oc.masked(t, lambda p: jax.tree.map(lambda _: True, p)),
  "partition": lambda t: oc.partition({"a": t, "b": oc.set_to_zero()}, _labels),
  "inject_hyperparams": lambda t: oc.inject_hyperparams(oc.with_diagnostics)(t),
  "multi_steps": lambda t: oc.multi_steps(t, 2),
  "MultiSteps": lambda t: oc.MultiSteps(t, 2),
  "apply_if_finite": lambda t: oc.apply_if_finite(t, 3),
  "lookahead": lambda t: oc.lookahead(t, 2, 0.5),
  "lookahead_in_state": lambda t: oc.lookahead_in_state(t, 2, 0.5),
  "sam": lambda t: oc.sam(t, oc.chain(oc.normalize(), oc.sgd(0.05)), sync_period=2),
  "with_diagnostics": lambda t: oc.with_diagnostics(t),
  "conditionally_transform": lambda t: oc.conditionally_transform(t, lambda step: step % 2 == 0),
  "conditionally_mask": lambda t: oc.conditionally_mask(t, lambda step: step % 2 == 0),
  "flatten": lambda t: oc.flatten(t),
  "named_chain": lambda t: oc.named_chain(("clip", oc.clip(1.0)), ("inner", t)),
  "selective_transform": lambda t: oc.selective_transform(
    t, freeze_mask=jax.tree.map(lambda _: False, PARAMS)
  ),
  "chain": lambda t: oc.chain(oc.clip_by_global_norm(1.0), t),
  "optax.apply_if_finite": lambda t: optax.apply_if_finite(t, 3),
  "optax.chain": lambda t: optax.chain(optax.clip_by_global_norm(1.0), t),
  "nested": lambda t: oc.with_diagnostics(oc.apply_if_finite(oc.multi_steps(t, 2), 3)),
}


def test_every_public_wrapper_is_crossed():
  assert set(oc.WRAPPERS) <= set(WRAPPERS)


def _params_for(name):
  return oc.LookaheadParams.init_synced(PARAMS) if name == "lookahead" else PARAMS


def _grads_for(name):
  return GRADS  # lookahead takes the gradients at the fast weights, a plain tree


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_set_and_read_hyperparameters_through_the_wrapper(wrapper, inner):
  tx = WRAPPERS[wrapper](INNERS[inner]())
  params = _params_for(wrapper)
  state = tx.init(params)
  first = float(_schedule(0)) if inner == "scheduled" else 0.1
  np.testing.assert_allclose(
    float(oc.current_hyperparams(state)["learning_rate"]), first, rtol=1e-6
  )

  new_state = oc.set_hyperparams(state, learning_rate=0.05)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and a.shape == b.shape  # a jitted step does not recompile
  assert float(oc.current_hyperparams(new_state)["learning_rate"]) == pytest.approx(0.05)

  step = jax.jit(tx.update)
  _, after = step(_grads_for(wrapper), new_state, params)
  _, after = step(_grads_for(wrapper), after, params)
  value = float(oc.current_hyperparams(after)["learning_rate"])
  if inner == "scheduled":
    # A scheduled value follows its schedule again at the next update that runs the inner
    # optimizer (accumulating and SAM's adversarial calls do not run it, so after two calls
    # it has run zero, one or two times).
    allowed = (0.05, float(_schedule(0)), float(_schedule(1)))
    assert any(value == pytest.approx(v) for v in allowed), value
  else:
    assert value == pytest.approx(0.05)  # a live value stays until set again


@pytest.mark.parametrize(
  "wrapper",
  ["masked", "apply_if_finite", "with_diagnostics", "chain", "lookahead_in_state", "optax.chain"],
)
def test_a_live_learning_rate_set_through_the_wrapper_drives_the_step(wrapper):
  """Adam's first step is lr * sign(g) (up to eps): halving the live learning rate through
  the wrapper halves the step."""
  tx = WRAPPERS[wrapper](INNERS["injected"]())
  state = tx.init(PARAMS)
  u_full, _ = tx.update(GRADS, state, PARAMS)
  u_half, _ = tx.update(GRADS, oc.set_hyperparams(state, learning_rate=0.05), PARAMS)
  for a, b in zip(jax.tree.leaves(u_full), jax.tree.leaves(u_half)):
    np.testing.assert_allclose(b, 0.5 * a, rtol=1e-5)


def test_a_name_held_nowhere_is_a_key_error_naming_what_is_held():
  state = oc.apply_if_finite(INNERS["injected"](), 3).init(PARAMS)
  with pytest.raises(KeyError, match=r"\['learning_rat'\].*held: \[.*'learning_rate'"):
    oc.set_hyperparams(state, learning_rat=1e-4)


def test_a_value_that_is_not_a_scalar_is_rejected():
  state = INNERS["injected"]().init(PARAMS)
  with pytest.raises(ValueError, match="`learning_rate` must be a scalar"):
    oc.set_hyperparams(state, learning_rate=jnp.ones(3))


def test_one_state_type_for_scheduled_and_injected_values():
  scheduled = oc.scale_by_learning_rate(_schedule).init(PARAMS)
  injected = oc.inject_hyperparams(oc.scale_by_learning_rate)(0.1).init(PARAMS)
  assert type(scheduled) is type(injected) is oc.InjectHyperparamsState
  assert oc.InjectHyperparamsState._fields == optax.InjectHyperparamsState._fields
