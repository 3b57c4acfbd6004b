"""What optcompose.testing catches in a user's own transformation: each case a bug a user
trial planted in a transformation of its own that the kit passed, or reported with a wrong
cause, before (the custom-transformation trial of 2026-12-02)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from optcompose import testing as oct


def build(init, update):
  return oc.GradientTransformation(init, update)


def sgd_like(lr, factor=lambda kw: 1.0):
  """-lr g, times ``factor(keywords)``: a Python-side choice that jit and eager share."""

  def update(g, s, params=None, **kw):
    return jax.tree.map(lambda x: (-lr * factor(kw) * x).astype(x.dtype), g), s

  return build(lambda p: oc.EmptyState(), update)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_an_unknown_keyword_that_doubles_a_small_step_is_caught(dtype):
  """The comparison had an absolute floor (the tolerance times 1): 3.8e-6 in float32 and
  0.06 in bfloat16, so a doubled step of lr 1e-2 passed in bfloat16 and of lr 1e-6 in
  float32. It is now relative to each leaf's own largest value."""
  params = {"w": jnp.ones(4, dtype)}
  grads = {"w": jnp.full(4, 0.5, dtype)}
  lr = 1e-2 if dtype == jnp.bfloat16 else 1e-6
  doubles = sgd_like(lr, lambda kw: 2.0 if kw else 1.0)
  with pytest.raises(AssertionError, match="an_unknown_argument"):
    oct.check_ignores_unknown_kwargs(doubles, params, grads)
  oct.check_ignores_unknown_kwargs(sgd_like(lr), params, grads)
  oct.check_invariants(sgd_like(lr), params, grads)
  oct.check_invariants(oc.adam(lr), params, grads)  # a correct optimizer at that scale passes


def test_a_python_step_counter_is_caught_at_a_small_learning_rate():
  """A counter kept in Python is frozen when jit traces ``update``: eager's third update was
  -1.667e-6, jit's -1.25e-6, at lr 1e-5, and the kit passed it."""
  calls = [0]

  def update(g, s, params=None, **kw):
    calls[0] += 1
    return jax.tree.map(lambda x: -1e-5 * x / calls[0], g), s

  counter = build(lambda p: oc.EmptyState(), update)
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
  for check in (oct.check_invariants, oct.check_jit_matches_eager):
    calls[0] = 0
    with pytest.raises(AssertionError, match="jit against eager"):
      check(counter, params, grads)


def test_a_complex_leaf_is_compared_in_both_parts():
  """Complex leaves were cast to float64 before the comparison, which drops the imaginary
  part: a jit-only error there passed."""
  calls = [0]

  def update(g, s, params=None, **kw):
    calls[0] += 1
    return jax.tree.map(lambda x: -0.1 * jax.lax.complex(x.real, x.imag * calls[0]), g), s

  imag_only = build(lambda p: oc.EmptyState(), update)
  params = {"z": jnp.ones(3, jnp.complex64)}
  grads = {"z": jnp.full(3, 0.5 + 0.5j, jnp.complex64)}
  with pytest.raises(AssertionError, match="jit against eager"):
    oct.check_jit_matches_eager(imag_only, params, grads, steps=3)
  oct.check_invariants(oc.adam(1e-2), params, grads)


class NoiseState(NamedTuple):
  key: jax.Array


def test_a_typed_prng_key_in_the_state_is_compared_by_its_data():
  """NumPy cannot hold a ``jax.random.key``: the comparisons crashed on one."""

  def init(params):
    return NoiseState(jax.random.key(0))

  def update(g, s, params=None, **kw):
    key, sub = jax.random.split(s.key)
    noise = [
      jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(jax.random.split(sub, len(jax.tree.leaves(g))), jax.tree.leaves(g))
    ]
    noisy = jax.tree.unflatten(jax.tree.structure(g), noise)
    return jax.tree.map(lambda x, n: -0.1 * x + 0.01 * n, g, noisy), NoiseState(key)

  params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
  oct.check_invariants(build(init, update), params, grads)


_ZERO = jnp.zeros([], jnp.int32)


class CountState(NamedTuple):
  count: jax.Array
  mu: dict


def test_an_array_made_once_and_returned_by_every_init_is_caught():
  """One module-level array in every init's state passed the donation check; after one
  donating step the next init returned a deleted array."""

  def update(g, s, params=None, **kw):
    mu = jax.tree.map(lambda m, x: 0.9 * m + x, s.mu, g)
    return jax.tree.map(lambda m: -0.1 * m, mu), CountState(s.count + 1, mu)

  shared = build(lambda p: CountState(_ZERO, jax.tree.map(jnp.zeros_like, p)), update)
  params = {"w": jnp.ones(3)}
  for check in (oct.check_state_can_be_donated, oct.check_invariants):
    with pytest.raises(AssertionError, match=r"one buffer at state\.count in two calls"):
      check(shared, params, *([{"w": jnp.ones(3)}] if check is oct.check_invariants else []))
  fresh = build(
    lambda p: CountState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, p)), update
  )
  oct.check_invariants(fresh, params, {"w": jnp.ones(3)})


def test_a_numpy_float64_state_is_named_where_jax_would_make_it_float32():
  """NumPy float64 moments from init became float32 at the first step; the layout check
  compared JAX's canonical dtypes and passed, and a checkpoint restored into a fresh init
  then failed with a hint about jax_enable_x64."""
  if jax.config.jax_enable_x64:
    pytest.skip("under x64 JAX keeps float64")

  def update(g, s, params=None, **kw):
    mu = jax.tree.map(lambda m, x: 0.9 * m + x, s.mu, g)
    return jax.tree.map(lambda m: -0.1 * m, mu), CountState(s.count + 1, mu)

  numpy_moments = build(
    lambda p: CountState(jnp.zeros([], jnp.int32), jax.tree.map(lambda x: np.zeros(x.shape), p)),
    update,
  )
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.ones(3)}
  for check in (oct.check_invariants, oct.check_state_keeps_its_layout):
    with pytest.raises(AssertionError, match=r"NumPy float64 array at state\.mu\['w'\]"):
      check(numpy_moments, params, grads)


def test_a_state_whose_tree_changes_is_named_before_the_next_step_crashes():
  """The kit ran every step before comparing layouts, so the next ``update`` failed in the
  user's own code (a tree_map structure error, 'tuple' has no attribute 'mu')."""

  def as_tuple(g, s, params=None, **kw):
    return g, (s.count + 1, s.mu)  # a plain tuple, not the NamedTuple

  def as_list(g, s, params=None, **kw):
    return g, CountState(s.count + 1, list(s.mu.values()))

  init = lambda p: CountState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, p))
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.ones(3)}
  for update in (as_tuple, as_list):
    for check in (oct.check_invariants, oct.check_state_keeps_its_layout):
      with pytest.raises(AssertionError, match=r"step 0: the state update returned does not"):
        check(
          build(init, lambda g, s, p=None, _u=update, **kw: _u(g, s, p) if s.mu else (g, s)),
          params,
          grads,
        )


def test_a_weak_type_from_update_is_blamed_on_update():
  """The message asked for init's value to get a dtype it already had."""
  flag = build(
    lambda p: {"flag": jnp.zeros([], jnp.float32)},
    lambda g, s, p=None, **kw: (g, {"flag": jnp.where(g["w"][0] < 0, 1.0, 0.0)}),
  )
  with pytest.raises(AssertionError, match=r"update returns a weakly typed value.*jnp\.float32"):
    oct.check_invariants(flag, {"w": jnp.ones(3)}, {"w": jnp.ones(3)})


def test_a_plain_optax_transformation_need_not_take_keywords():
  """Optax's GradientTransformation (not ...ExtraArgs) promises no keywords; chain adapts it,
  and the kit now checks it so. Optax's ExtraArgs class without them is still refused."""
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}
  plain = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda u, s, p=None: (u, s))
  oct.check_invariants(plain, params, grads)
  claims = optax.GradientTransformationExtraArgs(plain.init, plain.update)
  with pytest.raises(AssertionError, match=r"GradientTransformationExtraArgs, which says it takes"):
    oct.check_invariants(claims, params, grads)
