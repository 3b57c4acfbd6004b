"""``step_train_state`` and ``step_nnx``: Flax's ``TrainState.apply_gradients`` and
``nnx.Optimizer.update`` through ``optcompose.step``, so that a transformation's step-level
form (``apply_if_finite``, ``multi_steps``, ``lookahead_in_state``) serves Flax users too
(issue 16). Run at the minimum versions as well (Flax moved ``Optimizer.update``'s calls)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc
from numerics import bits

TXS = {
  "adamw": lambda: oc.adamw(1e-2, weight_decay=1e-2),
  "apply_if_finite": lambda: oc.apply_if_finite(oc.adamw(1e-2), 3),
  "multi_steps": lambda: oc.multi_steps(oc.adam(1e-2), 2),
  "lookahead_in_state": lambda: oc.lookahead_in_state(oc.adam(1e-2), 2, 0.5),
}


def batches(n=6, seed=0):
  rng = np.random.default_rng(seed)
  xs = [jnp.asarray(rng.normal(size=(8, 3)), jnp.float32) for _ in range(n)]
  xs[3] = xs[3].at[0, 0].set(jnp.nan)  # a non-finite batch: skipped by apply_if_finite
  return xs


def assert_same(a, b, exact):
  """Bit for bit where ``step`` runs the same operations as ``update`` + ``apply_updates``
  (eagerly, but Lookahead's step form, which rounds a synchronisation differently);
  otherwise (two programs, or that rounding) one step from the same state to float32
  rounding: values are at most 1, updates about 1e-2, so 1e-6 relative and 1e-9 absolute
  are a few ulps at the update's size."""
  if exact:
    for x, y in zip(bits(a), bits(b), strict=True):
      np.testing.assert_array_equal(x, y)
  else:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(TXS))
def test_step_train_state_is_apply_gradients(name, jitted):
  from flax.training import train_state

  params = {"w": jnp.full((3, 2), 0.5), "b": jnp.zeros((1, 2))}
  loss = lambda p, x: jnp.mean((x @ p["w"] + p["b"]) ** 2)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=TXS[name]())
  ours = lambda s, x: oc.step_train_state(s, jax.grad(loss)(s.params, x))
  flax_ = lambda s, x: s.apply_gradients(grads=jax.grad(loss)(s.params, x))
  if jitted:
    ours, flax_ = jax.jit(ours), jax.jit(flax_)
  b = state
  for x in batches():  # each step from the same state (two programs' roundings compound)
    a, b = ours(b, x), flax_(b, x)
    assert int(a.step) == int(b.step)
    exact = not jitted and name != "lookahead_in_state"
    assert_same((a.params, a.opt_state), (b.params, b.opt_state), exact)
  assert not np.array_equal(np.asarray(a.params["w"]), np.asarray(params["w"]))


def test_step_train_state_overwrites_with_gradient_as_flax_does():
  from flax.training import train_state

  params = {"params": {"w": jnp.ones(3)}, "_overwrite_with_gradient": {"scale": jnp.ones(())}}
  tx = oc.sgd(0.1)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  grads = {"params": {"w": jnp.full(3, 2.0)}, "_overwrite_with_gradient": {"scale": 7.0}}
  a = oc.step_train_state(state, grads)
  b = state.apply_gradients(grads=grads)
  assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_allclose(np.asarray(a.params["params"]["w"]), 0.8, rtol=1e-6)


def test_step_train_state_passes_extra_arguments():
  """``value=`` reaches the transformation (reduce_on_plateau reads it)."""
  from flax.training import train_state

  params = {"w": jnp.ones(3)}
  tx = oc.chain(oc.sgd(0.1), oc.reduce_on_plateau(patience=1, factor=0.5))
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  g = {"w": jnp.ones(3)}
  for _ in range(4):
    state = oc.step_train_state(state, g, value=jnp.float32(1.0))
  assert float(state.opt_state[1].scale) < 1.0  # no improvement: the scale was reduced
  with pytest.raises(TypeError, match="step_train_state"):
    oc.step_train_state({"w": 1}, g)


def test_step_train_state_replaces_the_fields_it_is_given():
  """A keyword naming a field of the state (``batch_stats``, as BatchNorm's loops pass it to
  ``apply_gradients``) replaces it; the fields the step sets cannot be passed."""
  from flax.training import train_state

  class State(train_state.TrainState):
    batch_stats: dict

  params = {"w": jnp.ones(3)}
  state = State.create(apply_fn=None, params=params, tx=oc.sgd(0.1), batch_stats={"m": 0.0})
  g = {"w": jnp.ones(3)}
  a = oc.step_train_state(state, g, batch_stats={"m": 2.0})
  b = state.apply_gradients(grads=g, batch_stats={"m": 2.0})
  assert a.batch_stats == b.batch_stats == {"m": 2.0}
  np.testing.assert_array_equal(np.asarray(a.params["w"]), np.asarray(b.params["w"]))
  with pytest.raises(TypeError, match="`params` is set by the step"):
    oc.step_train_state(state, g, params=params)


def model_and_optimizer(tx):
  from flax import nnx

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def nnx_state(model, optimizer):
  from flax import nnx

  return jax.tree.map(jnp.asarray, (nnx.state(model, nnx.Param), nnx.state(optimizer.opt_state)))


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(TXS))
def test_step_nnx_is_optimizer_update(name, jitted):
  from flax import nnx

  loss = lambda m, x: jnp.mean(m(x) ** 2)

  def ours(model, optimizer, x):
    oc.step_nnx(optimizer, model, nnx.grad(loss)(model, x))

  def flax_(model, optimizer, x):
    optimizer.update(model, nnx.grad(loss)(model, x))

  if jitted:
    ours, flax_ = nnx.jit(ours), nnx.jit(flax_)
  (ma, oa), (mb, ob) = model_and_optimizer(TXS[name]()), model_and_optimizer(TXS[name]())
  start = np.asarray(ma.kernel[...])
  for x in batches():
    ours(ma, oa, x)
    flax_(mb, ob, x)
    assert int(oa.step[...]) == int(ob.step[...])
    exact = not jitted and name != "lookahead_in_state"
    assert_same(nnx_state(ma, oa), nnx_state(mb, ob), exact)
  assert not np.array_equal(np.asarray(ma.kernel[...]), start)


def test_step_nnx_names_bad_input():
  model, optimizer = model_and_optimizer(oc.sgd(0.1))
  with pytest.raises(TypeError, match="step_nnx"):
    oc.step_nnx(object(), model, {})
