"""Live hyperparameters, reading the values in force, and reduce-on-plateau."""

from __future__ import annotations

import math

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optcompose as oc
from numerics import F64_RTOL, assert_rel_close, standard_promotion, x64
from problems import assert_resumes_exactly, mlp, run


@pytest.mark.numerics
@pytest.mark.float64
def test_injected_adamw_follows_the_same_trajectory_as_optax_injected_adamw():
  """Two programs: compared in float64 (tests/numerics.py); the injected values are float64
  there, as Optax's are."""
  with x64():
    prob = mlp(jnp.float64)
    ours, s = run(
      oc.inject_hyperparams(oc.adamw)(learning_rate=1e-2, weight_decay=0.1),
      prob,
      100,
      True,
      oc.apply_updates,
    )
    ref, _ = run(
      standard_promotion(
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)
      ),
      prob,
      100,
      True,
      optax.apply_updates,
    )
  assert s.hyperparams["learning_rate"].dtype == jnp.float64
  for t, (a, b) in enumerate(zip(ours, ref)):
    assert_rel_close(a, b, F64_RTOL, what=f"step {t}:")


def test_changing_a_live_hyperparameter_does_not_recompile():
  tx = oc.inject_hyperparams(oc.sgd)(learning_rate=0.1, momentum=0.9)
  params = {"w": jnp.ones(4)}
  grads = {"w": jnp.ones(4)}

  @jax.jit
  def step(params, state):
    u, state = tx.update(grads, state, params)
    return oc.apply_updates(params, u), state, u

  state = tx.init(params)
  params, state, u1 = step(params, state)
  state = oc.set_hyperparams(state, learning_rate=0.01, momentum=0.0)
  params, state, u2 = step(params, state)
  state = oc.set_hyperparams(state, learning_rate=0.5)
  params, state, u3 = step(params, state)
  assert step._cache_size() == 1  # one compilation for three differently-valued steps
  # The values took effect: trace after step 2 is g + 0 * v = 1, so u2 = -0.01 * 1.
  np.testing.assert_allclose(u1["w"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(u2["w"], -0.01, rtol=1e-6)
  np.testing.assert_allclose(u3["w"], -0.5, rtol=1e-6)
  assert float(oc.current_hyperparams(state)["learning_rate"]) == 0.5


def test_set_hyperparams_rejects_unknown_names():
  tx = oc.inject_hyperparams(oc.adam)(learning_rate=0.1)
  with pytest.raises(KeyError, match="not hyperparameters held in this state"):
    oc.set_hyperparams(tx.init({"w": jnp.ones(2)}), learning_rat=0.2)


@pytest.mark.parametrize(
  "values, error, message",
  [
    (dict(b1=1.0), ValueError, r"`b1` must lie in \[0, 1\), got 1.0"),
    (dict(b1=1 - 1e-9), ValueError, r"`b1` = 0.999999999 is refused: .*`b1` must lie in \[0, 1\)"),
    (dict(b2=float("nan")), ValueError, "`b2` must be finite"),
    (dict(learning_rate=-0.1), ValueError, r"`learning_rate` = -0.1 is refused: .*\[0, inf\)"),
    (
      dict(learning_rate=1e39),
      ValueError,
      r"`learning_rate` must be finite, got 1e\+39 \(it is inf",
    ),
    (dict(learning_rate=True), TypeError, "`learning_rate` must be a real number, got bool"),
    (dict(learning_rate="0.1"), TypeError, "`learning_rate` must be a real number, got str"),
    (dict(eps=0.0), ValueError, r"`eps` = 0.0 is refused: .*`eps` and `eps_root` are both 0"),
  ],
)
def test_set_hyperparams_validates_like_construction_on_the_stored_value(values, error, message):
  """What construction rejects, set_hyperparams rejects too, judged on the value as it is
  stored (float32 here): the next update would otherwise be NaN or an ascent step."""
  state = oc.inject_hyperparams(oc.adam)(learning_rate=0.1).init({"w": jnp.ones(2)})
  with pytest.raises(error, match=message):
    oc.set_hyperparams(state, **values)


def test_set_hyperparams_checks_a_value_as_the_holder_s_builder_does():
  """A value set at run time is checked as the construction of the transformation holding
  it checks it, not by the ranges other builders declare for the same name: a user's
  ``factor`` is not reduce_on_plateau's (0, 1), trace's ``decay`` may be 1, Adam's ``eps``
  may be 0 beside a positive ``eps_root``; also when put in ``state.hyperparams`` by hand,
  and member by member in a sweep. What the builder refuses is still refused."""
  params = {"w": jnp.ones(3)}

  def grow(factor=2.0):
    return oc.stateless_with_tree_map(lambda g, w: g * factor)

  tx = oc.inject_hyperparams(grow)(factor=2.0)
  state = oc.set_hyperparams(tx.init(params), factor=3.0)
  np.testing.assert_array_equal(tx.update(params, state, params)[0]["w"], 3.0)
  state.hyperparams["factor"] = -2.0  # by hand: grow accepts any real
  np.testing.assert_array_equal(tx.update(params, state, params)[0]["w"], -2.0)
  traced = oc.inject_hyperparams(oc.trace)(decay=1.0).init(params)
  assert float(oc.current_hyperparams(oc.set_hyperparams(traced, decay=1.0))["decay"]) == 1.0
  with pytest.raises(ValueError, match=r"`decay` = 1.5 is refused: \w+: `decay` must lie"):
    oc.set_hyperparams(traced, decay=1.5)
  adam = oc.inject_hyperparams(oc.adam)(0.1, eps=1e-8, eps_root=1e-8).init(params)
  assert float(oc.current_hyperparams(oc.set_hyperparams(adam, eps=0.0))["eps"]) == 0.0
  sgd = oc.inject_hyperparams(oc.sgd)(0.1, momentum=0.9)
  by_hand = sgd.init(params)
  by_hand.hyperparams["momentum"] = 1.5
  with pytest.raises(ValueError, match=r"\['momentum'\]` = 1.5: sgd: `momentum` must lie"):
    sgd.update(params, by_hand, params)
  sweep = jax.vmap(lambda _: sgd.init(params))(jnp.arange(3))
  with pytest.raises(ValueError, match=r"`momentum` = 1.5 is refused"):
    oc.set_hyperparams(sweep, momentum=jnp.array([0.1, 1.5, 0.9]))


def test_set_hyperparams_tells_builders_of_the_same_names_apart():
  """``trace`` (decay in [0, 1]) and ``ema`` (decay in [0, 1)) hold the same name: each
  state is checked by its own builder whatever else was built (ema's debias would divide 0
  by 0 at decay = 1); a bfloat16 holder checks the value as stored (b2 = 0.999 is 1.0 in
  bfloat16); in a state as a mapping of its fields (``nnx.to_pure_dict``), which does not
  say its builder, every builder of those names must accept the value."""
  params = {"w": jnp.ones(3)}
  trace = oc.inject_hyperparams(oc.trace)(decay=0.9).init(params)
  ema = oc.inject_hyperparams(oc.ema)(decay=0.9).init(params)
  assert float(oc.current_hyperparams(oc.set_hyperparams(trace, decay=1.0))["decay"]) == 1.0
  with pytest.raises(ValueError, match=r"`decay` = 1.0 is refused: ema: `decay` must lie"):
    oc.set_hyperparams(ema, decay=1.0)
  half = oc.inject_hyperparams(oc.adam, hyperparam_dtype=jnp.bfloat16)(1e-3, b2=0.99)
  with pytest.raises(ValueError, match=r"`b2` = 0.999 is refused: adam: `b2` must lie"):
    oc.set_hyperparams(half.init(params), b2=0.999)
  as_mapping = {"count": trace.count, "hyperparams": dict(trace.hyperparams), "inner_state": {}}
  with pytest.raises(ValueError, match=r"`decay` = 1.0 is refused"):
    oc.set_hyperparams(as_mapping, decay=1.0)
  oc.set_hyperparams(as_mapping, decay=0.5)


def test_set_hyperparams_names_an_ambiguous_name_and_takes_its_path():
  """Two injected optimizers both hold learning_rate: the bare name is refused (it used to
  set only the first), a path from the error sets exactly one."""
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = oc.partition(
    {"x": oc.inject_hyperparams(oc.sgd)(0.1), "y": oc.inject_hyperparams(oc.adam)(0.2)},
    {"a": "x", "b": "y"},
  )
  state = tx.init(params)
  with pytest.raises(ValueError, match="held in 2 places") as e:
    oc.set_hyperparams(state, learning_rate=0.5)
  paths = [p for p in oc.current_hyperparams(state) if p.endswith("learning_rate") and "/" in p]
  assert paths and all(p in str(e.value) for p in paths)
  new = oc.set_hyperparams(state, **{"inner_states/x/inner_state/learning_rate": 0.5})
  # Every holder of the shared name under its path (the first one was under the bare name
  # only, so a logger keyed by path missed it: the fine-tuning trial), and the bare name.
  held = oc.current_hyperparams(new)
  assert float(held["inner_states/x/inner_state/learning_rate"]) == 0.5
  assert float(held["inner_states/y/inner_state/learning_rate"]) == np.float32(0.2)
  assert float(held["learning_rate"]) == 0.5
  new = oc.set_hyperparams(state, b1=0.5)  # held once: the bare name is fine
  assert float(oc.current_hyperparams(new)["b1"]) == 0.5


def test_integer_gradients_are_refused_where_computed_and_passed_where_not():
  """An int32 gradient to sgd used to give a zero step ([0, 0, 0]) and a boolean one an
  ascent step; now the update names the leaf. set_to_zero and identity compute nothing and
  pass integer leaves (a frozen step counter routed by partition)."""
  params = {"w": jnp.array([1.0, 2.0, 3.0]), "n": jnp.array([1, 2])}
  for g in (jnp.array([1, 2, 3]), jnp.array([True, False, True])):
    for tx in (oc.sgd(0.1), oc.sgd(0.1, 0.9), oc.adam(0.1), oc.rmsprop(0.1)):
      p = {"w": params["w"]}
      with pytest.raises(TypeError, match=r"`updates\['w'\]` has dtype (int32|bool)"):
        tx.update({"w": g}, tx.init(p), p)
  tx = oc.partition(
    {"train": oc.adam(0.1), "frozen": oc.set_to_zero()}, {"w": "train", "n": "frozen"}
  )
  grads = {"w": jnp.ones(3), "n": jnp.array([5, 6])}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert updates["n"].dtype == jnp.int32 and not np.any(np.asarray(updates["n"]))
  np.testing.assert_array_equal(oc.identity().update(grads, oc.EmptyState())[0]["n"], [5, 6])


def test_eps_zero_is_refused_only_where_nothing_else_guards_the_denominator():
  zero = {"w": jnp.zeros(3)}
  for make in (
    lambda: oc.adam(0.1, eps=0.0),
    lambda: oc.rmsprop(0.1, eps=0.0),
    lambda: oc.scale_by_rms(eps=0.0),
    lambda: oc.scale_by_stddev(eps=0.0),
    lambda: oc.nadamw(0.1, eps=0.0),
    lambda: oc.adam(0.1, eps=oc.cosine_decay_schedule(1e-8, 10)),  # 0 from step 10
    lambda: oc.adamw(0.1, eps=oc.linear_schedule(1e-8, 0.0, 10), eps_root=0.0),
  ):
    with pytest.raises(ValueError, match="`eps`"):
      make()
  for tx in (
    oc.adam(0.1, eps=0.0, eps_root=1e-16),
    oc.adagrad(0.1, eps=0.0),
    oc.scale_by_rss(eps=0.0),
  ):  # eps_root, or a guarded division, keeps 0 / 0 away
    state = tx.init(zero)
    for _ in range(2):
      u, state = tx.update(zero, state, zero)
      assert np.all(np.isfinite(np.asarray(u["w"]))), tx


def test_ranges_are_checked_in_the_dtype_of_use():
  with pytest.raises(ValueError, match=r"1.0 in float32"):
    oc.adam(1e-3, b2=1 - 1e-10)
  with pytest.raises(ValueError, match=r"inf in float32"):
    oc.sgd(1e39)
  with pytest.raises(ValueError, match=r"`b1` must lie in \[0, 1\)"):  # injected: the same
    oc.inject_hyperparams(oc.adam)(1e-3, b1=1 - 1e-9).init({"w": jnp.ones(2)})
  oc.adam(1e-3, b2=1 - 1e-7)  # representable in float32: accepted
  with x64():
    oc.adam(1e-3, b1=1 - 1e-9)  # float64 is the dtype of use there


def test_live_hyperparameters_with_nnx_optimizer():
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  tx = oc.inject_hyperparams(oc.sgd)(learning_rate=0.1)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(opt.tx))
  x = jnp.ones((2, 3))

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)
    opt.update(model, grads)

  before = np.asarray(model.bias[...])
  step(model, opt)
  after_one = np.asarray(model.bias[...])
  opt.opt_state.hyperparams["learning_rate"][...] = 0.0  # freeze training, live
  step(model, opt)
  np.testing.assert_allclose(after_one - before, -0.1 * 2.0, rtol=1e-6)  # d sum / d bias = 2
  np.testing.assert_array_equal(np.asarray(model.bias[...]), after_one)


def test_hyperparams_are_read_and_set_in_nnx_state_and_pure_dicts():
  """``nnx.state(opt.opt_state)`` holds each state as a mapping of its fields (and the
  checkpoint guide saves ``nnx.to_pure_dict`` of it): both are read and set as the live
  state is, as Optax's ``tree_get`` reads them; ``nnx.update`` takes the set values back."""
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  tx = oc.chain(oc.clip_by_global_norm(1.0), oc.inject_hyperparams(oc.adamw)(1e-3))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state = nnx.state(opt.opt_state)
  pure = nnx.to_pure_dict(nnx.state(opt))["opt_state"]
  live = oc.current_hyperparams(opt.opt_state)
  assert live["learning_rate"] == np.float32(1e-3)
  for tree in (state, pure):
    assert oc.current_hyperparams(tree) == live
  nnx.update(opt.opt_state, oc.set_hyperparams(state, learning_rate=0.05))
  assert float(oc.current_hyperparams(opt.opt_state)["learning_rate"]) == np.float32(0.05)
  changed = oc.set_hyperparams(pure, weight_decay=0.2)
  assert float(oc.current_hyperparams(changed)["weight_decay"]) == np.float32(0.2)
  assert oc.current_hyperparams(pure)["weight_decay"] == np.float32(1e-4)  # not in place
  with pytest.raises(ValueError, match="weight_decay"):
    oc.set_hyperparams(state, weight_decay=-1.0)


def test_a_scheduled_rate_and_diagnostics_are_read_from_nnx_state():
  """A learning-rate schedule given to ``adamw`` keeps its state with an empty inner state,
  which ``nnx.state`` drops: read all the same; and ``metrics`` reads ``with_diagnostics``'
  fields from ``nnx.state`` as from the live state."""
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  schedule = oc.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 50)
  opt = nnx.Optimizer(model, oc.with_diagnostics(oc.adamw(schedule)), wrt=nnx.Param)
  opt.update(model, nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 3))) ** 2))(model))
  live = oc.current_hyperparams(opt.opt_state)
  assert float(live["learning_rate"]) == pytest.approx(float(schedule(0)))
  for tree in (nnx.state(opt.opt_state), nnx.to_pure_dict(nnx.state(opt))["opt_state"]):
    assert oc.current_hyperparams(tree) == live
    got, want = oc.metrics.metrics(tree), oc.metrics.metrics(opt.opt_state)
    assert set(got) == set(want) and "grad_norm" in got and "learning_rate" in got
    for key in want:
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_plateau_scale_is_read_and_set_in_nnx_state_and_checked():
  """``reduce_on_plateau``'s multiplier (``plateau_scale``) is read and set in the mapping
  forms of its state too, and a negative one, which would ascend, is refused there as in
  the live state."""
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  tx = oc.chain(oc.adamw(1e-3), oc.reduce_on_plateau(patience=1))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state = nnx.state(opt.opt_state)
  pure = nnx.to_pure_dict(nnx.state(opt))["opt_state"]
  for tree in (opt.opt_state, state, pure):
    assert oc.current_hyperparams(tree) == {"plateau_scale": np.float32(1.0)}
    assert float(oc.metrics.metrics(tree)["plateau_scale"]) == 1.0
    with pytest.raises(ValueError, match=r"plateau_scale.*\[0, inf\)"):
      oc.set_hyperparams(tree, plateau_scale=-0.5)
  nnx.update(opt.opt_state, oc.set_hyperparams(state, plateau_scale=0.25))
  assert float(opt.opt_state[1].scale[...]) == 0.25
  changed = oc.set_hyperparams(pure, plateau_scale=0.5)
  assert float(oc.current_hyperparams(changed)["plateau_scale"]) == 0.5


def test_bfloat16_params_keep_float32_hyperparameters_and_finite_updates():
  """b2 = 0.999 rounds to 1.0 in bfloat16; stored as float32 the first update is finite."""
  params = {"w": jnp.ones(8, jnp.bfloat16)}
  grads = {"w": jnp.linspace(-1, 1, 8).astype(jnp.bfloat16)}
  tx = oc.inject_hyperparams(oc.adam)(learning_rate=1e-3, b2=0.999)
  state = tx.init(params)
  assert state.hyperparams["b2"].dtype == jnp.float32
  u, state = jax.jit(tx.update)(grads, state, params)
  assert u["w"].dtype == jnp.bfloat16
  u32 = np.asarray(u["w"], np.float32)
  assert np.all(np.isfinite(u32))
  g = np.asarray(grads["w"], np.float32)
  np.testing.assert_allclose(u32, -1e-3 * g / (np.abs(g) + 1e-8), rtol=1e-2, atol=1e-6)


_WARMUP = lambda m: m.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 1000)  # noqa: E731
_FLOAT32_UNDER_X64 = {
  "inject(adamw)": lambda m: m.inject_hyperparams(m.adamw)(learning_rate=1e-3, weight_decay=0.1),
  "inject(adamw), scheduled": lambda m: m.inject_hyperparams(m.adamw)(learning_rate=_WARMUP(m)),
  "adamw, scheduled decay": lambda m: m.adamw(
    _WARMUP(m), weight_decay=m.linear_schedule(1e-2, 0.0, 100)
  ),
  "inject(sgd), momentum": lambda m: m.inject_hyperparams(m.sgd)(learning_rate=0.1, momentum=0.9),
  "inject(lion)": lambda m: m.inject_hyperparams(m.lion)(learning_rate=1e-4),
  "inject(rmsprop)": lambda m: m.inject_hyperparams(m.rmsprop)(learning_rate=1e-3),
}


@pytest.mark.parametrize("name", sorted(_FLOAT32_UNDER_X64))
def test_float32_parameters_are_updated_in_float32_under_x64(name):
  """Values stored (or scheduled) in float64 under x64 are cast to float32 for float32
  parameters' arithmetic, as Optax stores them: no parameter-sized float64 operation in the
  compiled step (an injected AdamW had 43 and ran 3.2x slower), and the updates are Optax's
  to float32 rounding."""
  n = 4099
  with x64():
    params = {"w": jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)}
    grads = {"w": jnp.cos(jnp.arange(n, dtype=jnp.float32))}
    outputs = []
    for lib in (oc, optax):
      tx = _FLOAT32_UNDER_X64[name](lib)
      tx = tx if lib is oc else standard_promotion(tx)
      state = tx.init(params)
      step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
      if lib is oc:
        text = step.lower(grads, state, params).compile().as_text()
      for _ in range(3):
        u, state = step(grads, state, params)
      outputs.append(u["w"])
  assert f"f64[{n}]" not in text
  assert outputs[0].dtype == jnp.float32
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-9)


def _adam_of_b2(learning_rate, b2):
  return oc.adam(learning_rate, b2=b2)


def test_values_float32_cannot_hold_are_refused_alike_at_init_and_by_set_hyperparams():
  """Under x64 float32 parameters use the values in float32: 1 - 1e-8 is 1.0 there, which
  adam refuses for b2, at init and in set_hyperparams alike (not used as 1.0 silently);
  a float64 hyperparam_dtype asked for, or float64 parameters, keep it."""
  b2 = 1 - 1e-8
  with x64():
    f32 = {"w": jnp.ones(3, jnp.float32)}
    with pytest.raises(ValueError, match="in float32.*`b2`"):
      oc.inject_hyperparams(oc.adam)(learning_rate=1e-3, b2=b2).init(f32)
    # A factory of its own: set_hyperparams checks with the builders recorded for the
    # names held, and another test's adam (float64 parameters) would accept the value.
    state = oc.inject_hyperparams(_adam_of_b2)(learning_rate=1e-3, b2=0.999).init(f32)
    with pytest.raises(ValueError, match="in float32.*`b2`"):
      oc.set_hyperparams(state, b2=b2)
    asked = oc.inject_hyperparams(oc.adam, hyperparam_dtype=jnp.float64)
    state = asked(learning_rate=1e-3, b2=b2).init(f32)
    assert float(oc.current_hyperparams(oc.set_hyperparams(state, b2=b2))["b2"]) == b2
    oc.inject_hyperparams(oc.adam)(learning_rate=1e-3, b2=b2).init({"w": jnp.ones(3)})


def test_a_float64_hyperparam_dtype_asked_for_keeps_float64_arithmetic():
  """As Optax: hyperparam_dtype=float64 computes float32 parameters' updates in float64."""
  n = 4099
  with x64():
    params = {"w": jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)}
    tx = oc.inject_hyperparams(oc.adamw, hyperparam_dtype=jnp.float64)(learning_rate=1e-3)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    text = step.lower(params, tx.init(params), params).compile().as_text()
  assert f"f64[{n}]" in text


def test_current_hyperparams_reads_scheduled_values_without_reevaluating():
  lr = oc.warmup_cosine_decay_schedule(0.0, 0.1, 5, 50)
  wd = lambda count: 1e-3 * (jnp.asarray(count, jnp.float32) + 1)
  tx = oc.chain(oc.adamw(lr, weight_decay=wd), oc.reduce_on_plateau(patience=2))
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(12):
    _, state = update({"w": jnp.ones(3)}, state, params, value=jnp.float32(1.0))
    hp = oc.current_hyperparams(state)
    np.testing.assert_allclose(hp["learning_rate"], lr(t), rtol=1e-6)
    np.testing.assert_allclose(hp["weight_decay"], wd(t), rtol=1e-6)
  # A constant loss: no improvement after the first evaluation; reduced every 2 evaluations.
  np.testing.assert_allclose(hp["plateau_scale"], 0.1**5, rtol=1e-5)


def test_injected_state_resumes_exactly():
  tx = oc.inject_hyperparams(oc.adamw)(learning_rate=oc.linear_schedule(0.02, 0.0, 30))
  assert_resumes_exactly(tx, mlp(), steps=20, save_at=8, apply_updates=oc.apply_updates)


# --- reduce on plateau ----------------------------------------------------------------

LOSSES = [
  1.0,
  0.8,
  0.7,
  0.69995,
  0.7,
  0.71,
  0.72,
  0.6,
  0.6,
  0.61,
  0.62,
  0.63,
  0.64,
  0.65,
  0.5,
  0.5,
  0.5,
  0.5,
  0.5,
  0.5,
  0.49,
  0.3,
  0.31,
  0.32,
  0.33,
  0.34,
  0.35,
  0.36,
]


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(patience=2),
    dict(factor=0.5, patience=3, cooldown=2),
    dict(factor=0.5, patience=1, rtol=0.0, atol=0.05, min_scale=0.2),
    dict(factor=0.5, patience=1, accumulation_size=2),
  ],
)
def test_reduce_on_plateau_matches_optax(kwargs):
  params = {"w": jnp.ones(2)}
  ours = oc.reduce_on_plateau(**kwargs)
  ref = standard_promotion(optax.contrib.reduce_on_plateau(**kwargs))
  so, sr = ours.init(params), ref.init(params)
  uo_f, ur_f = jax.jit(ours.update), jax.jit(ref.update)
  scales = []
  for v in LOSSES:
    uo, so = uo_f(params, so, value=jnp.float32(v))
    ur, sr = ur_f(params, sr, value=jnp.float32(v))
    # Exact by construction on any CPU: the params are ones, so the update is the scale,
    # built by the same correctly rounded multiplies and max in both libraries.
    np.testing.assert_array_equal(uo["w"], ur["w"])
    assert int(so.plateau_count) == int(sr.plateau_count)
    assert int(so.cooldown_count) == int(sr.cooldown_count)
    scales.append(float(so.scale))
  assert min(scales) < 1.0  # the sequence does trigger reductions


def test_reduce_on_plateau_mode_max_watches_a_rising_metric():
  params = {"w": jnp.ones(2)}
  up, down = oc.reduce_on_plateau(patience=2, mode="max"), oc.reduce_on_plateau(patience=2)
  su, sd = up.init(params), down.init(params)
  for v in LOSSES:
    _, su = up.update(params, su, value=-v)
    _, sd = down.update(params, sd, value=v)
    assert float(su.scale) == float(sd.scale)


def _pytorch_plateau_scales(values, patience, factor=0.5, rtol=1e-4):
  """PyTorch's ReduceLROnPlateau (mode "max", relative threshold, no cooldown), written out:
  better if a > best * (1 + rtol); reduced when the bad epochs in a row exceed patience."""
  best, bad, scale, out = -math.inf, 0, 1.0, []
  for a in values:
    if a > best * (1 + rtol):
      best, bad = a, 0
    else:
      bad += 1
    if bad > patience:
      scale, bad = scale * factor, 0
    out.append(scale)
  return out


@pytest.mark.parametrize(
  "values",
  [
    [0.9] * 8,  # an accuracy that stays flat
    [0.9, 0.89995, 0.8999, 0.89985, 0.8998, 0.89975, 0.8997],  # falling slowly
    [0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.8, 0.8, 0.8, 0.8],
  ],
)
def test_reduce_on_plateau_mode_max_reduces_on_a_flat_positive_metric(values):
  """A positive accuracy that stops rising is a plateau (the negated values' relative
  threshold is taken by magnitude: (1 - rtol) * best lies above a negative best, and a flat
  accuracy counted as improving forever). PyTorch's patience p is our patience p + 1."""
  tx = oc.reduce_on_plateau(factor=0.5, patience=3, mode="max")
  params = {"w": jnp.zeros(1)}
  state, scales = tx.init(params), []
  for v in values:
    _, state = tx.update(params, state, params, value=v)
    scales.append(float(state.scale))
  assert scales == _pytorch_plateau_scales(values, patience=2)
  assert min(scales) < 1.0


def test_reduce_on_plateau_composes_after_a_warmup_schedule_and_needs_a_value():
  lr = oc.warmup_cosine_decay_schedule(0.0, 0.1, 4, 40)
  tx = oc.chain(oc.sgd(lr), oc.reduce_on_plateau(patience=1, factor=0.5))
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  for t, v in enumerate([1.0, 1.0, 1.0, 1.0, 1.0]):
    u, state = tx.update({"w": jnp.ones(2)}, state, params, value=v)
  # plateau after evaluations 2, 3, 4, 5 with patience 1 -> scale 0.5^4; lr at step 4.
  np.testing.assert_allclose(u["w"], -float(lr(4)) * 0.5**4, rtol=1e-6)
  with pytest.raises(TypeError, match="value=loss"):
    tx.update({"w": jnp.ones(2)}, state, params)


def test_current_hyperparams_reads_optax_injection_states_too():
  params = {"w": jnp.ones(3)}
  state = optax.inject_hyperparams(optax.adam)(learning_rate=0.125).init(params)
  assert float(oc.current_hyperparams(state)["learning_rate"]) == 0.125
  nested = oc.chain(oc.clip(1.0), optax.inject_hyperparams(optax.sgd)(learning_rate=0.5))
  assert float(oc.current_hyperparams(nested.init(params))["learning_rate"]) == 0.5


@pytest.mark.parametrize("key", [0, "typed"])
def test_randomness_passes_through_inject_hyperparams_unchanged(key):
  """noisy_sgd's seed or PRNG key is not a hyperparameter: it reaches the inner factory as
  given (a float cast would break it), so the injected run draws the plain one's noise (to
  rounding: the injected values are traced, the plain ones folded; another key would differ
  by the noise's scale, ~0.1)."""
  key = jax.random.key(17) if key == "typed" else key
  params = {"w": jnp.linspace(-1.0, 1.0, 4)}
  injected = oc.inject_hyperparams(oc.noisy_sgd)(learning_rate=0.1, key=key)
  plain = oc.noisy_sgd(0.1, key=key)
  state, ref_state = injected.init(params), plain.init(params)
  assert set(state.hyperparams) == {"learning_rate", "eta", "gamma"}
  update = jax.jit(injected.update)
  for _ in range(3):
    u, state = update(params, state)
    ref, ref_state = plain.update(params, ref_state)
    np.testing.assert_allclose(u["w"], ref["w"], rtol=1e-6)


def test_a_stateful_schedule_is_refused_with_the_way_out():
  """Optax's stateful schedules (init/update/__call__ on a schedule state) have no place in
  our state: a TypeError names the argument and points to Optax's wrapper, which takes our
  optimizers (checked here)."""
  schedule = optax.WrappedSchedule(lambda count: 0.1)
  with pytest.raises(TypeError, match=r"`learning_rate` is a stateful schedule.*optax"):
    oc.inject_hyperparams(oc.sgd)(learning_rate=schedule)
  with warnings.catch_warnings():  # Optax 0.2.8 marks its own wrapper deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    tx = optax.inject_stateful_hyperparams(oc.sgd)(learning_rate=schedule)
  params = {"w": jnp.ones(2)}
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_value_put_in_the_state_by_hand_is_stored_back_as_init_stores_it(jit, tmp_path):
  """Optax's idiom ``state.hyperparams["learning_rate"] = 0.05``: the update uses 0.05 and
  stores it back as a float32 array, strongly typed, as init stores it and as Optax's update
  returns it: not the Python float (which a checkpoint then keeps, and which init's template
  refuses to restore into) nor a weakly typed array."""
  from optcompose.checkpoint import restore_checkpoint, save_checkpoint

  params, grads = {"w": jnp.array([1.0, -2.0, 3.0])}, {"w": jnp.array([0.1, 0.2, -0.3])}
  tx = oc.inject_hyperparams(oc.adam)(learning_rate=1e-2)
  state = tx.init(params)
  state.hyperparams["learning_rate"] = 0.05
  update = jax.jit(tx.update) if jit else tx.update
  updates, state = update(grads, state, params)
  lr = state.hyperparams["learning_rate"]
  assert isinstance(lr, jax.Array) and lr.dtype == jnp.float32 and not lr.weak_type
  np.testing.assert_allclose(float(lr), 0.05, rtol=1e-7)
  same = oc.inject_hyperparams(oc.adam)(learning_rate=0.05)  # 0.05 from the start
  expected, _ = same.update(grads, same.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(expected["w"]), rtol=1e-6)
  save_checkpoint(tmp_path / "c.msgpack", {"opt_state": state})
  restored = restore_checkpoint(tmp_path / "c.msgpack", {"opt_state": tx.init(params)})
  np.testing.assert_allclose(float(restored["opt_state"].hyperparams["learning_rate"]), 0.05)


def test_current_hyperparams_of_an_nnx_optimizer_are_arrays():
  """``nnx.Optimizer`` keeps each state value in an ``nnx`` Variable: ``current_hyperparams``
  returns the arrays, as from any other state (not the Variables)."""
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, oc.inject_hyperparams(oc.adam)(learning_rate=1e-2), wrt=nnx.Param)
  values = oc.current_hyperparams(opt.opt_state)
  assert isinstance(values["learning_rate"], jax.Array)
  np.testing.assert_allclose(float(values["learning_rate"]), 1e-2, rtol=1e-7)


def test_set_hyperparams_on_a_sweep_state_made_by_vmap():
  """``jax.vmap(tx.init)`` over learning rates holds one value each: a scalar sets them all,
  an array of that shape one each (as Optax's ``tree_set``), each value range-checked; a
  value of another shape is refused, naming it."""
  tx = oc.inject_hyperparams(oc.sgd)(learning_rate=0.01)
  params = {"w": jnp.ones(2)}
  sweep = jax.vmap(lambda _: tx.init(params))(jnp.arange(3))
  assert oc.current_hyperparams(sweep)["learning_rate"].shape == (3,)
  np.testing.assert_array_equal(
    oc.current_hyperparams(oc.set_hyperparams(sweep, learning_rate=0.5))["learning_rate"],
    np.full(3, 0.5, np.float32),
  )
  each = oc.set_hyperparams(sweep, learning_rate=np.array([0.1, 0.2, 0.3]))
  np.testing.assert_array_equal(
    oc.current_hyperparams(each)["learning_rate"], np.array([0.1, 0.2, 0.3], np.float32)
  )
  with pytest.raises(ValueError, match="learning_rate"):
    oc.set_hyperparams(sweep, learning_rate=np.array([0.1, -0.2, 0.3]))
  with pytest.raises(ValueError, match=r"`learning_rate` must be a scalar or of shape \(3,\)"):
    oc.set_hyperparams(sweep, learning_rate=np.array([0.1, 0.2]))


def test_a_count_of_the_users_factory_not_listed_static_is_named():
  """A Python int given to a factory of the user's is a hyperparameter of the state, a float
  array (Optax keeps an int32 one: jitted, both fail); ``range(ns_steps)`` then failed with
  "Only integer scalar arrays can be converted to a scalar index", naming nothing (the
  custom-transformation trial)."""

  def repeated_scale(beta, ns_steps=3):
    def update(updates, state, params=None):
      for _ in range(ns_steps):
        updates = jax.tree.map(lambda u: u * beta, updates)
      return updates, state

    return oc.GradientTransformation(lambda params: oc.EmptyState(), update)

  params = {"w": jnp.ones(3)}
  tx = oc.inject_hyperparams(repeated_scale)(beta=0.5, ns_steps=3)
  with pytest.raises(
    TypeError, match=r"`ns_steps` given as Python ints .* static_args=\('ns_steps',\)"
  ):
    tx.update(params, tx.init(params), params)
  tx = oc.inject_hyperparams(repeated_scale, static_args="ns_steps")(beta=0.5, ns_steps=3)
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"], np.full(3, 0.125, np.float32))


class _Marker:
  """Stands for what a trial's schedule or factory closes over (its data, a table)."""


def test_a_sweep_keeps_no_finished_trial_alive():
  """set_hyperparams' registry of builders kept each key's last 16 validators strongly, and
  with them the schedules and factories of 16 finished trials and all they close over (16 MB
  each in the long-lived-process trial: +258 MB). Only the latest is held now; older ones
  live as long as their transformations."""
  import gc
  import weakref

  params = {"w": jnp.ones(3)}
  alive = []
  for trial in range(20):
    marker = _Marker()
    alive.append(weakref.ref(marker))
    schedule = lambda count, marker=marker: 0.1 / (1 + count.astype(jnp.float32))  # noqa: E731
    oc.adamw(schedule).init(params)  # the transformation is a temporary, as in a sweep
    del marker, schedule
  gc.collect()
  kept = sum(r() is not None for r in alive)
  assert kept <= 1, f"{kept} finished trials' schedules are still alive"

  # The latest transformation's state is still checked as its builder checks (a temporary
  # too): a refusal only the user's factory knows, so only its recorded validator gives it.
  def capped_sgd(learning_rate, cap=1.0):  # `cap`: names no other test's states hold
    if float(learning_rate) > float(cap):
      raise ValueError("capped_sgd: learning_rate above 1")
    return oc.sgd(learning_rate)

  state = oc.inject_hyperparams(capped_sgd)(learning_rate=0.1, cap=1.0).init(params)
  gc.collect()
  with pytest.raises(ValueError, match="capped_sgd: learning_rate above 1"):
    oc.set_hyperparams(state, learning_rate=5.0)


def test_state_classes_redefined_in_a_notebook_are_not_kept_forever():
  """A cell defining a state class and a transformation around it, re-run: each run was a
  new key of the registry, kept for the life of the process (17 KB per run, and all its
  closures held). The registry keeps its most recent keys only."""
  import gc
  import typing
  import weakref

  from optcompose.core import held

  params = {"w": jnp.ones(3)}
  classes = []
  for run_ in range(held._KEYS + 30):
    State = typing.NamedTuple("State", [("n", jax.Array)])  # noqa: N806

    def my_scale(factor, State=State):
      return oc.GradientTransformation(
        lambda p: State(jnp.zeros([], jnp.int32)),
        lambda u, s, p=None: (jax.tree.map(lambda g: factor * g, u), s),
      )

    classes.append(weakref.ref(State))
    oc.inject_hyperparams(my_scale)(factor=0.5).init(params)
    del State, my_scale
  gc.collect()
  kept = sum(r() is not None for r in classes)
  assert len(held._VALIDATING) <= held._KEYS
  assert kept <= held._KEYS, f"{kept} state classes of earlier runs are still alive"


def test_inject_hyperparams_takes_a_factory_whose_module_is_none():
  """A factory made by exec() without __name__ (code runners, some notebook tools) has
  __module__ None: inject_hyperparams raised AttributeError on None.startswith."""
  namespace: dict = {"oc": oc}
  exec("def factory(learning_rate):\n  return oc.sgd(learning_rate)\n", namespace)
  assert namespace["factory"].__module__ is None
  tx = oc.inject_hyperparams(namespace["factory"])(learning_rate=0.1)
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * np.ones(3), rtol=1e-6)


OPTAX_DEFAULTS = {  # Optax builders whose defaults some other builder's declaration refused
  "lars": lambda m: m.lars(0.1),  # eps = 0
  "polyak_sgd": lambda m: m.polyak_sgd(),  # eps = 0
  "optimistic_gradient_descent": lambda m: m.optimistic_gradient_descent(0.1),  # beta = 1
  "optimistic_adam_v2": lambda m: m.optimistic_adam_v2(0.1),  # beta = 1
  "scale_by_sm3": lambda m: m.scale_by_sm3(),  # b2 = 1
  "scale_by_trust_ratio": lambda m: m.scale_by_trust_ratio(),  # eps = 0
}


@pytest.mark.parametrize("name", sorted(OPTAX_DEFAULTS))
def test_inject_hyperparams_of_an_optax_builder_checks_it_as_ours_of_the_same_name(name):
  # Checked by every declaration of each name, the strictest won: `eps` 0 is valid in
  # lars, not in lamb.
  build = OPTAX_DEFAULTS[name]
  kwargs = {} if name.startswith(("scale_by", "polyak")) else {"learning_rate": 0.1}
  with x64(), jax.numpy_dtype_promotion("standard"):  # Optax mixes int32 counts and floats
    tx = oc.inject_hyperparams(getattr(optax, name))(**kwargs)  # was refused, or failed
    params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float64).reshape(4, 3)}
    grads = {"w": jnp.linspace(0.5, -0.2, 12, dtype=jnp.float64).reshape(4, 3)}
    extra = {"value": jnp.float64(1.0)} if name == "polyak_sgd" else {}
    updates, _ = tx.update(grads, tx.init(params), params, **extra)
    expected, _ = build(optax).update(grads, build(optax).init(params), params, **extra)
  np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-12)


def test_set_hyperparams_on_an_optax_state_accepts_what_some_builder_of_the_name_accepts():
  # In a fresh process (no builder of ours recorded for these names) beta = 1.0 was refused
  # by the strictest declaration of `beta`; accepted once an unrelated builder had run.
  import subprocess
  import sys

  code = (
    "import jax.numpy as jnp, optax, optcompose as oc\n"
    "s = optax.inject_hyperparams(optax.optimistic_gradient_descent)(0.1).init(jnp.ones(3))\n"
    "print(float(oc.current_hyperparams(oc.set_hyperparams(s, beta=1.0))['beta']))\n"
    "try:\n  oc.set_hyperparams(s, beta=-1.0)\nexcept ValueError as e:\n  print('refused')\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["1.0", "refused"], out.stderr[-2000:]


def test_an_integer_argument_of_an_optax_builder_reaching_a_shape_is_named_with_the_remedy():
  # Held as a float array as in Optax's inject_hyperparams, optax.lbfgs' memory_size made a
  # shape error naming no argument.
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError, match=r"`memory_size`.*static_args=\('memory_size',\)"):
    oc.inject_hyperparams(optax.lbfgs)(learning_rate=0.1).init(params)
  tx = oc.inject_hyperparams(optax.lbfgs, static_args="memory_size")(learning_rate=0.1)
  assert "memory_size" not in tx.init(params).hyperparams
