"""``MultiSteps.step``: gradient accumulation as a whole training call, the parameters' update
inside the conditional (issue 16). Its state is ``multi_steps``' state, and it computes what
``update`` followed by ``apply_updates`` computes."""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import assert_ulps_close, bits
from test_clipping import donated_update_hlo, gradient_sized_temporaries

SIZE = 1 << 16


def problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
    "b": jnp.zeros(4, jnp.bfloat16),  # accumulated in float32, handed to inner as bfloat16
  }
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params) for _ in range(9)
  ]
  grads[4] = {**grads[4], "w": grads[4]["w"].at[1, 2].set(jnp.nan)}  # a rejected micro-step
  return params, grads


def both_ways(ms, params, grads, jit, **extra):
  """The trajectories of ``update`` + ``apply_updates`` and of ``step``, call by call."""

  def by_update(params, state, g):
    updates, state = ms.update(g, state, params, **extra)
    return oc.apply_updates(params, updates), state

  by_step = lambda params, state, g: ms.step(g, state, params, **extra)
  if jit:
    by_update, by_step = jax.jit(by_update), jax.jit(by_step)
  a = b = (params, ms.init(params))
  out = []
  for g in grads:
    a, b = by_update(*a, g), by_step(b[0], b[1], g)
    out.append((a, b))
  return out


@pytest.mark.numerics
@pytest.mark.parametrize(
  "make",
  [
    lambda: oc.MultiSteps(oc.adamw(1e-2, weight_decay=1e-2), 3),
    lambda: oc.MultiSteps(oc.adam(1e-2), 2, use_grad_mean=False),
    lambda: oc.MultiSteps(
      optax.sgd(0.1, momentum=0.9), 3, should_skip_update_fn=oc.skip_not_finite
    ),
    lambda: oc.MultiSteps(oc.adamw(1e-2), lambda step: jnp.where(step < 1, 1, 3)),
    lambda: oc.MultiSteps(oc.adam(1e-2), 3, accumulator_dtype=None),
    lambda: oc.MultiSteps(oc.adam(1e-2), 3, accumulator_dtype=jnp.bfloat16),
    lambda: oc.MultiSteps(
      oc.adam(1e-2), 3, should_skip_update_fn=partial(oc.skip_large_updates, max_squared_norm=40.0)
    ),
    # The NaN (call 4) lands on the micro-step that would take the real step (k=5).
    lambda: oc.MultiSteps(oc.adam(1e-2), 5, should_skip_update_fn=oc.skip_not_finite),
  ],
  ids=[
    "adamw_mean",
    "adam_sum",
    "optax_sgd_skip",
    "scheduled_k",
    "acc_in_params_dtype",
    "acc_bf16",
    "skip_large",
    "skip_on_the_real_step",
  ],
)
def test_step_computes_update_then_apply(make):
  """Bit for bit eagerly (the same operations); to 2 ulps jitted (two programs: 1 ulp at most
  measured on XLA CPU, the trajectories compared call by call over 9 calls). Parameters move
  only on real steps; a NaN micro-step is rejected (with a ``should_skip_update_fn``) or
  spoils the accumulation alike in both."""
  ms = make()
  params, grads = problem()
  real = 0
  for want, got in both_ways(ms, params, grads, False):
    for a, b in zip(bits(got), bits(want), strict=True):
      np.testing.assert_array_equal(a, b)
    real += bool(ms.has_updated(got[1]))
  assert real >= 1
  for want, got in both_ways(ms, params, grads, True):
    floats = lambda t: [x for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert_ulps_close(floats(got), floats(want), 2)
    ints = lambda t: [x for x in jax.tree.leaves(t) if not jnp.issubdtype(x.dtype, jnp.floating)]
    for a, b in zip(ints(got), ints(want), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_micro_steps_leave_the_parameters_and_inner_state_as_they_are():
  """Bit for bit, -0.0 and subnormals included (``update`` + ``apply_updates`` adds a zero
  update, which turns -0.0 into 0.0 and, on XLA CPU, flushes subnormals)."""
  ms = oc.MultiSteps(oc.adamw(1e-2, weight_decay=1e-2), 3)
  params, grads = problem(1)
  params = {**params, "w": params["w"].at[0, 0].set(-0.0).at[0, 1].set(1e-40)}
  state = ms.init(params)
  for t, g in enumerate(grads[:3]):
    new_params, new_state = ms.step(g, state, params)
    if t < 2:  # micro-steps
      for a, b in zip(
        bits((new_params, new_state.inner_opt_state)), bits((params, state.inner_opt_state))
      ):
        np.testing.assert_array_equal(a, b)
      assert int(new_state.gradient_step) == 0 and not bool(ms.has_updated(new_state))
    else:
      assert bool(ms.has_updated(new_state))
      assert float(jnp.max(jnp.abs(new_params["w"] - params["w"]))) > 1e-3
      assert not np.any(np.asarray(new_state.acc_grads["w"]))  # reset after the real step
    params, state = new_params, new_state


@pytest.mark.xla_cpu_program
def test_step_writes_the_parameters_and_the_accumulator_in_place():
  """The donated step: the parameters' and the moments' writes inside the conditional (a
  real step), the accumulator's in one loop after it, all in place: no copy, no
  parameter-sized temporary. (``update`` + ``apply_updates`` has one: the conditional's
  updates, zeros on a micro-step.)"""
  params = {"w": jnp.ones(SIZE, jnp.float32)}
  ms = oc.MultiSteps(oc.adamw(1e-3, weight_decay=1e-4), 4)
  lowered = jax.jit(lambda p, s, g: ms.step(g, s, p), donate_argnums=(0, 1))
  hlo = lowered.lower(params, ms.init(params), params).compile().as_text()
  entry = hlo[hlo.index("ENTRY") :]
  written = re.findall(
    rf"%\S+ = f32\[{SIZE}\]\S* (?!parameter\(|get-tuple-element\()[\w-]+\(", entry
  )
  assert len(written) == 1 and "fusion(" in written[0], written  # the accumulator's loop
  assert re.findall(rf"= f32\[{SIZE}\]\S* copy\(", hlo) == []
  assert gradient_sized_temporaries(hlo, SIZE) == []
  old = donated_update_hlo(ms.gradient_transformation(), params)
  assert len(gradient_sized_temporaries(old, SIZE)) == 1


def test_extra_arguments_reach_the_inner_step():
  """``value=`` for an inner step that needs it: the same results as ``update``; without
  it, the inner step's error at the first call (a micro-step), as ``update`` raises it."""
  ms = oc.MultiSteps(oc.chain(oc.adam(1e-1), oc.reduce_on_plateau(patience=1, factor=0.5)), 2)
  params, grads = problem(2)
  params = {"w": params["w"]}
  grads = [{"w": g["w"]} for g in grads if bool(jnp.all(jnp.isfinite(g["w"])))]
  for want, got in both_ways(ms, params, grads, False, value=jnp.float32(3.0)):
    for a, b in zip(bits(got), bits(want), strict=True):
      np.testing.assert_array_equal(a, b)
  assert float(got[1].inner_opt_state[1].scale) < 1.0  # the plateau was seen: value arrived
  for call in (ms.update, lambda g, s, p: ms.step(g, s, p)):
    with pytest.raises(TypeError, match="value"):
      call(grads[0], ms.init(params), params)


def test_step_names_bad_input():
  ms = oc.MultiSteps(oc.adamw(1e-3), 2)
  params = {"w": jnp.ones(3)}
  state = ms.init(params)
  with pytest.raises(ValueError, match="params"):
    ms.step({"w": jnp.ones(3)}, state, None)
  with pytest.raises(ValueError, match="grads"):
    ms.step({"v": jnp.ones(3)}, state, params)
  with pytest.raises(oc.StateMismatchError, match="multi_steps"):
    ms.step({"w": jnp.ones(3)}, (), params)
