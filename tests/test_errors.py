"""Bad input gets a clear error, raised early, naming the argument or the tree path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
GRADS = jax.tree.map(jnp.ones_like, PARAMS)


@pytest.mark.parametrize(
  "build, argument",
  [
    (lambda: oc.adam(1e-3, b1=1.0), "b1"),
    (lambda: oc.adam(1e-3, b1=-0.1), "b1"),
    (lambda: oc.adamw(1e-3, b2=1.5), "b2"),
    (lambda: oc.nadam(1e-3, b2=float("nan")), "b2"),
    (lambda: oc.rmsprop(1e-3, decay=1.0), "decay"),
    (lambda: oc.scale_by_stddev(decay=-0.5), "decay"),
    (lambda: oc.ema(1.2), "decay"),
    (lambda: oc.sgd(1e-3, momentum=1.5), "momentum"),
    (lambda: oc.sgd(-0.1), "learning_rate"),
    (lambda: oc.adam(-1e-3), "learning_rate"),
    (lambda: oc.adam(1e-3, eps=-1e-8), "eps"),
    (lambda: oc.adagrad(1e-3, eps=-1.0), "eps"),
    (lambda: oc.adagrad(1e-3, initial_accumulator_value=-0.1), "initial_accumulator_value"),
    (lambda: oc.adamw(1e-3, weight_decay=-1e-4), "weight_decay"),
    (lambda: oc.prox_l1(-0.1, 1e-3), "l1"),
    (lambda: oc.adam(jnp.ones(3)), "learning_rate"),
    (lambda: oc.adam(1e-3, b1="0.9"), "b1"),
    (lambda: oc.sgd(float("inf")), "learning_rate"),
    (lambda: oc.adam(1e-3, eps=float("inf")), "eps"),
    (lambda: oc.rmsprop(1e-3, initial_scale=-1.0), "initial_scale"),
    (lambda: oc.adam(1e-3, b1=True), "b1"),
  ],
)
def test_bad_hyperparameter_is_named_at_construction(build, argument):
  with pytest.raises((ValueError, TypeError), match=f"`{argument}`"):
    build()


@pytest.mark.parametrize(
  "build, message",
  [
    # Python's own binding would report the missing learning_rate first.
    (
      lambda: oc.adam(lr=1e-3),
      "adam() got an unexpected keyword argument 'lr'; did you mean 'learning_rate'?",
    ),
    (
      lambda: oc.adamw(1e-3, weight_decy=0.1),
      "adamw() got an unexpected keyword argument 'weight_decy'; did you mean 'weight_decay'?",
    ),
    (lambda: oc.sgd(0.1, decay=0.9), "sgd() got an unexpected keyword argument 'decay'"),
    (lambda: oc.adam(), "adam(): missing a required argument: 'learning_rate'"),
  ],
)
def test_a_wrong_call_names_the_builder_and_the_argument(build, message):
  with pytest.raises(TypeError) as caught:
    build()
  assert str(caught.value) == message


def test_scheduled_hyperparameter_is_checked_at_step_zero_by_init():
  tx = oc.adam(1e-3, b1=lambda count: 1.0 + 0.0 * jnp.asarray(count, jnp.float32))
  with pytest.raises(ValueError, match="`b1`"):
    tx.init(PARAMS)


@pytest.mark.parametrize(
  "tx", [oc.adam(1e-3), oc.sgd(1e-3, 0.9), oc.rmsprop(1e-3), oc.adagrad(1e-3), oc.adamw(1e-3)]
)
def test_updates_with_a_missing_leaf_name_the_path(tx):
  state = tx.init(PARAMS)
  grads = {"dense": {"kernel": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\]|\['dense'\]\['kernel'\]"):
    tx.update(grads, state, PARAMS)


def test_updates_with_another_shape_are_not_broadcast():
  tx = oc.adam(1e-3)
  state = tx.init(PARAMS)
  grads = {"dense": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(2)}}
  with pytest.raises(ValueError, match=r"updates\['dense'\]\['kernel'\]` has shape \(3, 1\)"):
    jax.jit(tx.update)(grads, state, PARAMS)


def test_apply_updates_rejects_mismatched_trees():
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\]"):
    oc.apply_updates(PARAMS, {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(3)}})


@pytest.mark.parametrize("bad", [jnp.arange(3), jnp.array([True, False])])
@pytest.mark.parametrize("tx", [oc.sgd(0.1), oc.sgd(0.1, 0.9), oc.adam(0.1), oc.adagrad(0.1)])
def test_integer_or_boolean_params_are_rejected_at_init(tx, bad):
  """sgd without momentum too (a Flax TrainState's step, through Optax's apply_updates, would
  truncate it), though it takes leaves that are not arrays (an Equinox model's functions)."""
  params = {"w": jnp.ones(3), "counts": bad}
  with pytest.raises(TypeError, match=r"params\['counts'\]` has dtype"):
    tx.init(params)


def test_apply_updates_does_not_truncate_integer_params():
  with pytest.raises(TypeError, match=r"params\['n'\]"):
    oc.apply_updates({"n": jnp.arange(3)}, {"n": jnp.full(3, 0.4)})


def test_an_integer_leaf_masked_out_takes_its_own_dtype_s_update():
  """What the integer-parameter error suggests (mask it out) works to the end: the update of
  a leaf ``partition`` sends to ``set_to_zero`` keeps its int32 dtype, and ``apply_updates``
  and ``step`` add it exactly (as Optax's ``apply_updates`` does); a float update for it,
  or an int16 one, is still a TypeError naming the leaf."""
  params = {"w": jnp.ones(4), "n": jnp.arange(3, dtype=jnp.int32)}
  labels = {"w": "train", "n": "frozen"}
  tx = oc.partition({"train": oc.adamw(1e-2), "frozen": oc.set_to_zero()}, labels)
  grads = {"w": jnp.ones(4), "n": jnp.zeros(3, jnp.int32)}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert updates["n"].dtype == jnp.int32
  for new in (oc.apply_updates(params, updates), oc.step(tx, grads, tx.init(params), params)[0]):
    np.testing.assert_array_equal(np.asarray(new["n"]), np.arange(3))
    assert new["n"].dtype == jnp.int32
    assert float(new["w"][0]) < 1.0
  for bad in (jnp.full(3, 0.4), jnp.zeros(3, jnp.int16)):
    with pytest.raises(TypeError, match=r"params\['n'\]` has dtype int32.*own dtype"):
      oc.apply_updates(params, {**updates, "n": bad})
  # A NumPy int64 leaf (int32 as JAX holds it without x64) takes its int32 zeros, as in Optax.
  host = {**params, "n": np.arange(3)}
  np.testing.assert_array_equal(np.asarray(oc.apply_updates(host, updates)["n"]), np.arange(3))


def test_zero1_flat_shardings_name_a_mesh_that_is_not_one():
  flat = oc.flat_params({"w": jnp.ones(8)})
  with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh, got str 'data'"):
    oc.sharding.zero1_flat_shardings(oc.adam(1e-3), flat, "data")


def test_mask_that_does_not_match_names_the_difference_at_init():
  for tx in (
    oc.adamw(1e-3, mask={"dense": {"kernel": True, "scale": False}}),
    oc.masked(oc.sgd(0.1), {"dense": {"kernel": True, "scale": False}}),
    oc.prox_l1(0.1, 0.1, mask={"dense": {"kernel": True, "scale": False}}),
    oc.inject_hyperparams(oc.adamw)(1e-3, mask={"dense": {"kernel": True, "scale": False}}),
  ):
    with pytest.raises(ValueError, match=r"`mask`.*\['dense'\]\['bias'\] is missing"):
      tx.init(PARAMS)


@pytest.mark.parametrize(
  "ours, theirs, expected",
  [
    (
      lambda: oc.adam(1e-3),
      lambda: oc.sgd(1e-3, 0.9),
      r"state\[0\] is a TraceState, expected a ScaleByAdamState",
    ),
    (
      lambda: oc.sgd(1e-3, 0.9),
      lambda: oc.adam(1e-3),
      r"state\[0\] is a ScaleByAdamState, expected a TraceState",
    ),
    (lambda: oc.scale_by_rms(), lambda: oc.scale_by_rss(), r"expected a ScaleByRmsState"),
    (
      lambda: oc.apply_if_finite(oc.adam(1e-3), 3),
      lambda: oc.adam(1e-3),
      r"expected an ApplyIfFiniteState",
    ),
  ],
)
def test_a_state_of_another_optimizer_is_named_at_the_first_update(ours, theirs, expected):
  with pytest.raises(ValueError, match=expected):
    ours().update(GRADS, theirs().init(PARAMS), PARAMS)


def test_mask_with_non_boolean_leaves_is_rejected_at_init():
  tx = oc.adamw(1e-3, mask={"dense": {"kernel": 1, "bias": 0}})
  with pytest.raises(TypeError, match=r"mask\['dense'\]\['bias'\]"):
    tx.init(PARAMS)


def test_weight_decay_without_params_is_explained():
  tx = oc.adamw(1e-3)
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(GRADS, tx.init(PARAMS))


def test_chain_rejects_a_foreign_state_and_a_non_transformation():
  tx = oc.chain(oc.scale_by_adam(), oc.scale(-1.0))
  with pytest.raises(ValueError, match="chain of 2 transformations"):
    tx.update(GRADS, (tx.init(PARAMS)[0],), PARAMS)
  with pytest.raises(TypeError, match="argument 1"):
    oc.chain(oc.scale(1.0), lambda g: g)


def test_low_precision_hyperparameters_are_accepted():
  params = {"w": jnp.ones(3)}
  for tx in (
    oc.adam(jnp.asarray(1e-3, jnp.bfloat16)),
    oc.sgd(np.float16(0.1), 0.9),
    oc.inject_hyperparams(oc.sgd, hyperparam_dtype=jnp.bfloat16)(learning_rate=1e-3),
  ):
    u, _ = tx.update(params, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(u["w"], np.float32)))
  # ... but a value that bfloat16 rounds out of range is caught, by name, at init.
  tx = oc.inject_hyperparams(oc.adam, hyperparam_dtype=jnp.bfloat16)(learning_rate=1e-3)
  with pytest.raises(ValueError, match="`b2` must lie in \\[0, 1\\), got 1.0"):
    tx.init(params)


def test_mask_is_checked_even_when_the_decay_is_zero():
  tx = oc.add_decayed_weights(0.0, mask={"dense": {"kernel": True}})
  with pytest.raises(ValueError, match="mask"):
    tx.init(PARAMS)


def test_chain_accepts_a_list_state_from_a_restored_checkpoint():
  tx = oc.adam(1e-3)
  state = list(tx.init(PARAMS))
  u, new_state = tx.update(GRADS, state, PARAMS)
  assert isinstance(new_state, tuple)


def test_scheduled_values_are_checked_once_at_init_not_at_every_step():
  """A schedule that leaves the valid range later is the user's responsibility: the same
  result eagerly and under jit (no per-step host copy, no error only in eager mode)."""
  tx = oc.sgd(lambda count: 0.1 - 0.05 * jnp.asarray(count, jnp.float32))  # < 0 from step 3 on
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  eager, jitted = [], []
  s1 = s2 = state
  for _ in range(4):
    u1, s1 = tx.update(params, s1, params)
    u2, s2 = jax.jit(tx.update)(params, s2, params)
    eager.append(float(u1["w"][0]))
    jitted.append(float(u2["w"][0]))
  np.testing.assert_allclose(eager, jitted, rtol=1e-6)


@pytest.mark.parametrize(
  "build, argument",
  [
    (lambda: oc.sgd(0.1, 0.9, nesterov="no"), "nesterov"),
    (lambda: oc.ema(0.9, debias=0), "debias"),
    (lambda: oc.scale_by_rms(eps_in_sqrt="False"), "eps_in_sqrt"),
  ],
)
def test_a_flag_must_be_a_bool_not_something_truthy(build, argument):
  with pytest.raises(TypeError, match=f"`{argument}` must be a bool"):
    build()


def test_a_structure_difference_below_the_leaf_paths_names_the_node_and_what_differs():
  """Same leaf paths, other nodes: a FlatParams of another layout names the first model leaf
  whose record differs (not a dump of both layouts); a FrozenDict against a dict, and an
  empty node against another, name the node's type."""
  from flax.core import FrozenDict

  fp = oc.flat_params({"w": jnp.ones(3), "b": jnp.ones(2)})
  other = oc.flat_params({"w": jnp.ones(2), "b": jnp.ones(3)})
  tx = oc.adam(0.1)
  with pytest.raises(
    ValueError,
    match=r"the node holding \['float32'\] is a FlatParams of other data "
    r"\(leaves\[0\] \(the leaf \['b'\]\)\.shape\[0\]: 3 against 2\)",
  ):
    tx.update(other, tx.init(fp), fp)
  with pytest.raises(
    ValueError, match=r"the node holding \['a'\]\['x'\] is a FrozenDict against a dict"
  ):
    oc.apply_updates({"a": {"x": jnp.ones(2)}}, {"a": FrozenDict({"x": jnp.ones(2)})})
  with pytest.raises(
    ValueError, match="an empty node after the leaves is a tuple against a NoneType"
  ):
    oc.apply_updates({"a": jnp.ones(2), "b": None}, {"a": jnp.ones(2), "b": ()})


def test_skip_large_updates_refuses_a_bound_that_skips_everything():
  """No squared norm is below a bound <= 0: every micro-step would be skipped, silently. An
  infinite bound (never skip) stays valid."""
  params = {"w": jnp.ones(2)}
  for bound, skips in ((-1.0, None), (0.0, None), (float("inf"), False)):
    skip = functools.partial(oc.skip_large_updates, max_squared_norm=bound)
    tx = oc.multi_steps(oc.sgd(0.1), 2, should_skip_update_fn=skip)
    if skips is None:
      with pytest.raises(ValueError, match=r"`max_squared_norm` must be > 0, got"):
        tx.update(params, tx.init(params), params)
    else:
      assert bool(tx.update(params, tx.init(params), params)[1].skip_state["should_skip"]) is skips


@pytest.mark.parametrize(
  "build, message",
  [
    (
      lambda: oc.sgd(lr=0.1),
      r"sgd\(\) got an unexpected keyword argument 'lr'; did you mean 'learning_rate'\?",
    ),
    (lambda: oc.adam(1e-3, betas=(0.9, 0.999)), r"'betas'; did you mean 'b1' and 'b2'\?"),
    (lambda: oc.adam(1e-3, epsilon=1e-8), r"'epsilon'; did you mean 'eps'\?"),
    (lambda: oc.adamw(1e-3, wd=0.1), r"'wd'; did you mean 'weight_decay'\?"),
    (lambda: oc.sgd(1e-3, l2=-0.1), r"^sgd: `l2` must lie in \[0, inf\), got -0.1"),
    (
      lambda: oc.sgd(1e-3, l1=0.1, reg_mask="kernel"),
      r"^sgd: `reg_mask` is a str \('kernel'\).*mask_from_paths\(include='kernel'\)",
    ),
    (lambda: oc.adamw(1e-3, l1=0.1, l1_mask="kernel"), r"^adamw: `l1_mask` is a str"),
    (lambda: oc.adamw(1e-3, mask="bias"), r"^adamw: `mask` is a str"),
    (
      lambda: oc.exponential_decay(1.0, 10, 0.5, staircase="yes"),
      r"^exponential_decay: `staircase` must be a bool",
    ),
    (
      lambda: oc.inverse_time_decay(1.0, 10, 0.5, staircase=1),
      r"^inverse_time_decay: `staircase` must be a bool",
    ),
  ],
)
def test_errors_name_the_argument_the_user_wrote(build, message):
  """The recipe's own argument (sgd's `l2`, not its inner prox_elastic_net's), PyTorch's and
  papers' names mapped to Optax's (not the nearest spelling: `lr` is not `l2`), and a flag
  that would be taken by its truthiness."""
  with pytest.raises((TypeError, ValueError), match=message):
    build()


def test_early_stopping_names_a_missing_or_mismatched_best_params():
  es = oc.early_stopping(patience=2)
  state = es.init({"w": jnp.ones(2)})
  with pytest.raises(
    ValueError, match=r"^early_stopping: `best_params` is missing: init kept a copy"
  ):
    es.step(state, 1.0)
  with pytest.raises(ValueError, match=r"^early_stopping: `best_params\['w'\]` has shape \(3,\)"):
    es.step(state, 1.0, {"w": jnp.ones(3)})
  assert es.step(es.init(), 1.0)[1] is False  # no copy kept: none needed


def test_a_scheduled_optimizers_own_count_is_checked_too():
  """The count that schedules read (inject_hyperparams' state, a schedule's state) cast to
  bfloat16 with the rest of a state would stop at 256 and freeze the learning rate."""
  params = {"w": jnp.ones(2)}
  schedule = oc.linear_schedule(1.0, 0.0, 1000)
  for tx in (
    oc.sgd(schedule),
    oc.scale_by_learning_rate(schedule),
    oc.inject_hyperparams(oc.sgd)(learning_rate=schedule),
  ):
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tx.init(params))
    with pytest.raises(TypeError, match=r"`state.count` must be an integer scalar .* got bfloat16"):
      jax.jit(tx.update)(params, state, params)


def test_complex_updates_into_a_real_state_are_refused_without_params():
  """Optax's loop calls update(grads, state): a complex gradient of real parameters must not
  drop into Adam's real moments, or turn momentum's state complex, before apply_updates
  refuses it. A state made from complex parameters takes them."""
  grads = {"w": jnp.array([0.1 + 0.5j, 0.2 - 0.3j], jnp.complex64)}
  for tx in (oc.sgd(0.1, momentum=0.9), oc.adam(0.1)):
    with pytest.raises(TypeError, match="the updates are complex but the state was made from real"):
      tx.update(grads, tx.init({"w": jnp.ones(2)}), None)
  tx = oc.adam(0.1)
  updates, _ = tx.update(grads, tx.init({"w": jnp.ones(2, jnp.complex64)}), None)
  assert updates["w"].dtype == jnp.complex64


def test_incremental_update_keeps_optax_none_rule_and_checks_the_rest():
  new = {"w": jnp.ones(2), "b": None}
  out = oc.incremental_update(new, {"w": jnp.zeros(2), "b": jnp.zeros(2)}, 0.5)
  assert out["b"] is None
  np.testing.assert_array_equal(out["w"], np.full(2, 0.5, np.float32))
  with pytest.raises(
    ValueError, match=r"incremental_update: `new_tensors\['w'\]` has shape \(3, 1\)"
  ):
    oc.incremental_update({"w": jnp.ones((3, 1))}, {"w": jnp.zeros(3)}, 0.5)


def test_two_state_classes_of_one_name_are_told_apart():
  import optax

  params = {"w": jnp.ones(2)}
  with pytest.raises(
    ValueError, match=r"is a optax\..*ScaleByAdamState against a optcompose\..*ScaleByAdamState"
  ):
    oc.tree.check_same_structure(
      optax.scale_by_adam().init(params), oc.scale_by_adam().init(params), "state", "reference"
    )


def test_complex_parameters_without_moments_keep_optax_update_call():
  """A state without floating moments (add_noise's key) made from complex parameters takes
  complex gradients in Optax's update(grads, state)."""
  params = {"w": jnp.array([1 + 2j, 3 - 1j], jnp.complex64)}
  grads = {"w": jnp.array([0.1 + 0.2j, -0.3j], jnp.complex64)}
  for tx in (oc.noisy_sgd(0.01), oc.chain(oc.add_noise(0.01, 0.55, 0), oc.adam(0.1))):
    updates, _ = tx.update(grads, tx.init(params))
    assert updates["w"].dtype == jnp.complex64


def test_a_real_state_dtype_keeps_a_complex_parameter_s_imaginary_part():
  """``mu_dtype`` / ``accumulator_dtype`` / ``dtype_momentum`` / DoG's ``param_dtype`` of 32
  bits or more, given for complex parameters, keep them complex (float32: complex64), so
  the run equals the default's (Optax's drops the imaginary part and turns the step); a
  16-bit one has no complex counterpart: a TypeError naming the argument and the leaf. DoG's
  first step is ``reps_rel (1 + ||w||) g / sqrt(||g||^2)`` with the complex modulus."""
  params = {"c": jnp.array([-0.1 - 0.1j, 0.27 + 0.11j], jnp.complex64)}

  def run(tx, steps=5):
    p, state = params, tx.init(params)
    for _ in range(steps):
      updates, state = tx.update(jax.tree.map(lambda w: 0.3 * w + 0.1, p), state, p)
      p = oc.apply_updates(p, updates)
    return p["c"]

  pairs = [
    (oc.sgd(0.05, 0.9, accumulator_dtype=jnp.float32), oc.sgd(0.05, 0.9)),
    (oc.adam(0.05, mu_dtype=jnp.float32), oc.adam(0.05)),
    (oc.amsgrad(0.05, mu_dtype=jnp.float32), oc.amsgrad(0.05)),
    (oc.lion(0.05, mu_dtype=jnp.float32), oc.lion(0.05)),
    (oc.adafactor(0.05, momentum=0.9), oc.adafactor(0.05, momentum=0.9, dtype_momentum=None)),
  ]
  for chosen, default in pairs:
    np.testing.assert_array_equal(run(chosen), run(default))
    assert np.abs(np.imag(run(chosen) - params["c"])).max() > 1e-3  # it moved in imag too
  accumulated = oc.MultiSteps(oc.sgd(0.05), every_k_schedule=2)  # float32 accumulator
  averaged = oc.chain(oc.sgd(0.05), oc.ema_params(0.9, accumulator_dtype=jnp.float32))
  for tx in (accumulated.gradient_transformation(), averaged):
    state = tx.init(params)
    assert all(jnp.iscomplexobj(x) for x in jax.tree.leaves(state) if jnp.ndim(x))
  with pytest.raises(
    TypeError, match=r"`mu_dtype` is bfloat16 for the complex parameter params\['c'\]"
  ):
    oc.adam(0.05, mu_dtype=jnp.bfloat16).init(params)
  g = {"c": 0.3 * params["c"] + 0.1}
  dog = oc.scale_by_distance_over_gradients()
  u, _ = dog.update(g, dog.init(params), params)
  w, gc = np.asarray(params["c"], np.complex128), np.asarray(g["c"], np.complex128)
  want = 1e-6 * (1 + np.linalg.norm(w)) * gc / np.linalg.norm(gc)
  np.testing.assert_allclose(np.asarray(u["c"]), want, rtol=1e-5)


def test_clip_and_rprop_name_a_complex_leaf():
  """Elementwise clipping and Rprop's sign rule have no meaning on complex numbers (Optax
  raises JAX's own error, naming no leaf): a TypeError naming the transformation and the
  leaf; real leaves beside them are clipped as before."""
  params = {"c": jnp.array([1 + 1j, 2 - 1j], jnp.complex64), "r": jnp.array([3.0, -0.5])}
  with pytest.raises(TypeError, match=r"clip: `updates\['c'\]` is complex"):
    oc.clip(1.0).update(params, oc.clip(1.0).init(params), params)
  with pytest.raises(TypeError, match=r"scale_by_rprop: `params\['c'\]` is complex"):
    oc.rprop(0.1).init(params)
  real = {"r": params["r"]}
  np.testing.assert_array_equal(oc.clip(1.0).update(real, oc.EmptyState())[0]["r"], [1.0, -0.5])
