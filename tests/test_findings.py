"""The red-team findings of issue 14, each run as it was reported, with ``P = {"w": [1., 2., 3.]}``.

Every test here failed (a silent wrong result, or an error that named nothing) before the fix.
The checkpoint findings (1, 3, 10, 11) are in ``tests/test_faults.py`` and
``tests/test_checkpoint.py``; the wrapper broadcasts (12) and several of finding 13's errors
are rows of ``tests/test_bad_input.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest

import optcompose as oc
from numerics import x64

P = {"w": jnp.array([1.0, 2.0, 3.0])}
G = {"w": jnp.array([0.5, -1.0, 2.0])}


def _state_at_mini_step(tx, k_done):
  state = tx.init(P)
  for _ in range(k_done):
    _, state = tx.update(G, state, P)
  return state


def test_2_multi_steps_resumed_or_lowered_keeps_learning():
  """A state saved at mini_step=3 with k=4, resumed into k=2, used to give zero updates
  forever; lowering k live did the same."""
  saved = _state_at_mini_step(oc.multi_steps(oc.sgd(0.1), 4), 3)
  assert int(saved.mini_step) == 3
  resumed = oc.multi_steps(oc.sgd(0.1), 2)
  updates, state = resumed.update(G, saved, P)
  assert np.any(np.asarray(updates["w"]) != 0), "the resumed run must step at the next call"
  for _ in range(4):  # and keep stepping every 2 calls
    u1, state = resumed.update(G, state, P)
    u2, state = resumed.update(G, state, P)
    assert not np.any(np.asarray(u1["w"])) and np.any(np.asarray(u2["w"]))


@pytest.mark.parametrize(
  "grad", [jnp.array([1, 2, 3]), jnp.array([True, False, True])], ids=["int32", "bool"]
)
def test_4_integer_and_boolean_gradients_are_refused(grad):
  """sgd(0.1) on int32 gradients gave [0, 0, 0]; on booleans an ascent step."""
  with pytest.raises(TypeError, match=r"`updates\['w'\]` has dtype (int32|bool)"):
    oc.sgd(0.1).update({"w": grad}, oc.sgd(0.1).init(P), P)


@pytest.mark.parametrize(
  "make, arg",
  [
    (lambda: oc.adam(0.1, mu_dtype=jnp.int32), "mu_dtype"),
    (lambda: oc.adam(0.1, nu_dtype=jnp.int8), "nu_dtype"),
    (lambda: oc.sgd(0.1, 0.9, accumulator_dtype=jnp.int32), "accumulator_dtype"),
    (lambda: oc.ema(0.9, accumulator_dtype=jnp.bool_), "accumulator_dtype"),
  ],
)
def test_4_integer_state_dtypes_are_refused(make, arg):
  with pytest.raises(TypeError, match=f"`{arg}` must be a floating-point dtype"):
    make()


def test_5_apply_if_finite_tests_what_it_applies():
  tx = oc.apply_if_finite(oc.sgd(1e30), 3, check_updates=True)
  updates, state = tx.update({"w": jnp.array([1e10, 1.0, 1.0])}, tx.init(P), P)
  np.testing.assert_array_equal(oc.apply_updates(P, updates)["w"], P["w"])
  assert int(state.notfinite_count) == 1


@pytest.mark.parametrize(
  "values",
  [
    dict(b1=1.0),
    dict(b1=float("nan")),
    dict(learning_rate=-1e-3),
    dict(learning_rate=True),
    dict(learning_rate="1e-3"),
  ],
)
def test_6_set_hyperparams_validates(values):
  state = oc.inject_hyperparams(oc.adam)(1e-3).init(P)
  with pytest.raises((ValueError, TypeError), match=f"`{next(iter(values))}`"):
    oc.set_hyperparams(state, **values)


def test_6_set_hyperparams_refuses_an_ambiguous_name():
  tx = oc.partition(
    {"a": oc.inject_hyperparams(oc.sgd)(0.1), "b": oc.inject_hyperparams(oc.sgd)(0.2)},
    {"w": "a", "v": "b"},
  )
  state = tx.init({"w": P["w"], "v": P["w"]})
  with pytest.raises(ValueError, match="held in 2 places"):
    oc.set_hyperparams(state, learning_rate=0.5)


def test_7_ranges_are_checked_in_float32_where_used_in_float32():
  with pytest.raises(ValueError, match=r"`b1`.*1.0 in float32"):
    oc.adam(1e-3, b1=1 - 1e-9)
  with pytest.raises(ValueError, match=r"`learning_rate`.*inf in float32"):
    oc.adam(3.5e38)
  with pytest.raises(ValueError, match="`b1`"):  # the injected path agrees
    oc.inject_hyperparams(oc.adam)(1e-3, b1=1 - 1e-9).init(P)


@pytest.mark.parametrize(
  "make, arg",
  [
    (lambda: oc.reduce_on_plateau(patience=2.5), "patience"),
    (lambda: oc.multi_steps(oc.sgd(0.1), 2.5), "every_k_schedule"),
    (lambda: oc.apply_if_finite(oc.sgd(0.1), max_consecutive_errors=2.5), "max_consecutive_errors"),
  ],
)
def test_8_counts_must_be_whole(make, arg):
  with pytest.raises((TypeError, ValueError), match=f"`{arg}`"):
    make()


def test_8_a_k_schedule_returning_a_fraction_is_refused():
  with pytest.raises(TypeError, match="`every_k_schedule`"):
    oc.multi_steps(oc.sgd(0.1), lambda step: 2.7).init(P)


def test_8_a_live_k_set_to_a_fraction_is_refused():
  tx = oc.inject_hyperparams(
    lambda every_k_schedule: oc.multi_steps(oc.sgd(0.1), every_k_schedule)
  )(4)
  state = tx.init(P)
  with pytest.raises(ValueError, match="`every_k_schedule` must be a whole number"):
    oc.set_hyperparams(state, every_k_schedule=2.7)
  assert (
    float(oc.current_hyperparams(oc.set_hyperparams(state, every_k_schedule=2))["every_k_schedule"])
    == 2
  )


def test_9_eps_zero_is_refused_or_safe():
  zero = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="`eps`"):
    oc.adam(1e-3, eps=0.0)
  with pytest.raises(ValueError, match="`eps`"):
    oc.rmsprop(1e-3, eps=0.0)
  tx = oc.adam(1e-3, eps=0.0, eps_root=1e-16)  # guarded by eps_root: accepted, finite
  u, _ = tx.update(zero, tx.init(zero), zero)
  assert np.all(np.isfinite(np.asarray(u["w"])))


def test_13_errors_name_what_was_wrong():
  with pytest.raises(TypeError, match=r"`params\['s'\]` is a str"):
    oc.sgd(0.1, momentum=0.9).init({"w": P["w"], "s": "abc"})
  state = oc.inject_hyperparams(oc.sgd)(0.1).init(P)
  with pytest.raises(ValueError, match="`learning_rate` must be a scalar"):
    oc.set_hyperparams(state, learning_rate=jnp.ones(3))
  with pytest.raises(ValueError, match="`include`"):
    oc.mask_from_paths(include="[")
  with pytest.raises(ValueError, match="`transition_steps`"):
    oc.exponential_decay(1.0, 2**40, 0.5)
  with pytest.raises(ValueError, match=r"state\[0\]"):  # a foreign state of the same length
    oc.adam(0.1).update(G, oc.sgd(0.1, 0.9).init(P), P)


def test_14_flags_are_bools_and_early_stopping_keeps_dtypes():
  with pytest.raises(TypeError, match="`nesterov` must be a bool"):
    oc.sgd(0.1, 0.9, nesterov="no")
  stop = oc.early_stopping()
  state = stop.init(P)
  with pytest.raises(TypeError, match="dtype"):
    stop.update(state, 0.5, jax.tree.map(lambda x: x.astype(jnp.float16), P))


# ----------------------------------------------------------------------------------------
# A second red-team pass, on the result (silent results and unnamed errors it found).


@pytest.mark.parametrize("eps", [1e-50, 1e-40])  # 0 in float32; a subnormal, flushed by XLA
def test_an_eps_that_rounds_to_zero_is_zero(eps):
  with pytest.raises(
    ValueError, match="`eps` and `eps_root` are both 0|`eps` is 1e-50, which is 0 in float32"
  ):
    oc.adam(1e-3, eps=eps)
  oc.adam(1e-3, eps=1e-30)  # a normal float32: accepted


def test_an_eps_below_float32_s_normals_is_zero_under_x64_too():
  """Under x64 the hyperparameters are float64, where 1e-60 is a number; but float32
  parameters compute in float32, where it is 0, and a gradient that has always been 0 then
  stepped by 0 / 0 = NaN (the scientific-computing trial). RMSProp's eps was refused there
  already (it takes float32's smallest normal as its bound in every dtype)."""
  with x64():
    with pytest.raises(ValueError, match="`eps` and `eps_root` are both 0"):
      oc.adam(1e-3, eps=1e-60)
    with pytest.raises(ValueError, match="float32's smallest normal"):
      oc.rmsprop(1e-3, eps=1e-60)
    tx = oc.adam(1e-3, eps=1e-30)  # a normal float32: accepted, and no NaN
    params = {"w": jnp.zeros(3, jnp.float32)}
    updates, _ = tx.update({"w": jnp.zeros(3, jnp.float32)}, tx.init(params), params)
    assert np.isfinite(np.asarray(updates["w"])).all()


@pytest.mark.parametrize(
  "edit, error, message",
  [
    (lambda h: h.__setitem__("learning_rate", jnp.ones(3)), ValueError, "must be a scalar"),
    (lambda h: h.pop("b1"), ValueError, r"holds \['b2', 'eps', 'eps_root', 'learning_rate'\]"),
    (lambda h: h.__setitem__("learning_rate", "x"), TypeError, "must be a real number"),
    (lambda h: h.__setitem__("learning_rate", -1.0), ValueError, r"must lie in \[0, inf\)"),
  ],
)
def test_hyperparameters_edited_in_place_are_checked_when_traced(edit, error, message):
  """Optax's docs edit ``state.hyperparams`` in place; what set_hyperparams would refuse is
  refused by the next update (a per-element array used to be broadcast, a dropped name to
  fall back to its construction value, -1 to step uphill)."""
  tx = oc.inject_hyperparams(oc.adam)(0.1)
  state = tx.init(P)
  edit(state.hyperparams)
  with pytest.raises(error, match=message):
    tx.update(G, state, P)
  if isinstance(state.hyperparams.get("learning_rate"), jax.Array):  # and under jit too
    with pytest.raises(error, match=message):
      jax.jit(tx.update)(G, state, P)


def test_complex_updates_for_real_params_are_refused():
  with pytest.raises(TypeError, match=r"`updates\['w'\]` is complex but `params\['w'\]` is real"):
    oc.apply_updates(P, {"w": jnp.full(3, 1j, jnp.complex64)})


def test_an_optax_state_is_named_as_optax_s():
  import optax

  with pytest.raises(
    ValueError,
    match=r"state\[0\] is an optax\..*ScaleByAdamState \(not "
    r"optcompose's\), expected a ScaleByAdamState",
  ):
    oc.adam(0.1).update(G, optax.adam(0.1).init(P), P)


def test_inject_hyperparams_names_its_misuse_and_checks_foreign_factories():
  import optax

  with pytest.raises(TypeError, match="pass the factory itself"):
    oc.inject_hyperparams(oc.sgd(0.1))
  with pytest.raises(TypeError, match=r"unknown arguments \['lr'\]"):
    oc.inject_hyperparams(oc.adam)(lr=1e-3)
  with pytest.raises(ValueError, match=r"`learning_rate` must lie in \[0, inf\)"):
    oc.inject_hyperparams(optax.adam)(-1.0)  # Optax's own factory accepts it
  with pytest.raises(ValueError, match=r"`b1` must lie in \[0, 1\)"):
    oc.inject_hyperparams(optax.adam)(1e-3, b1=1.0)
  tx = oc.inject_hyperparams(lambda **kw: oc.sgd(**kw))(learning_rate=0.1)  # **kwargs
  assert float(oc.current_hyperparams(tx.init(P))["learning_rate"]) == np.float32(0.1)


def test_named_arguments_in_two_more_errors():
  with pytest.raises(TypeError, match="scale_by_second_moment: `direction` is str"):
    oc.scale_by_second_moment(direction="x")
  for make, arg in (
    (lambda: oc.multi_steps(oc.sgd(0.1), 2**40), "every_k_schedule"),
    (lambda: oc.apply_if_finite(oc.sgd(0.1), 2**40), "max_consecutive_errors"),
    (lambda: oc.swa(every=2**31), "every"),
  ):
    with pytest.raises(ValueError, match=rf"`{arg}` must lie in \[1, 2147483647\]"):
      make()


def test_averaged_weights_come_last_in_a_chain():
  """chain(ema_params(0), sgd(0.1)) used to average params + raw gradient: averaged weights
  that moved uphill while the parameters went down. Only averagers may follow an averager;
  nested chains carry the rule."""
  for make in (
    lambda: oc.chain(oc.ema_params(0.0), oc.sgd(0.1)),
    lambda: oc.chain(oc.swa(), oc.adam(0.1)),
    lambda: oc.chain(oc.chain(oc.sgd(0.1), oc.ema_params(0.9)), oc.scale(2.0)),
  ):
    with pytest.raises(ValueError, match="place the averaging transformations last"):
      make()
  tx = oc.chain(oc.chain(oc.sgd(0.1), oc.ema_params(0.0)), oc.chain(oc.swa()))  # averagers only
  state = tx.init(P)
  updates, state = tx.update(G, state, P)
  new = oc.apply_updates(P, updates)
  np.testing.assert_allclose(oc.averaged_params(state, kind="ema")["w"], new["w"], rtol=1e-6)


def test_an_averager_inside_a_wrapper_still_comes_last():
  """Inside inject_hyperparams, partition or masked, an averager followed by ``scale(0.5)``
  was accepted, and its average tracked parameters the model never had (a user's trial);
  wrappers now carry the rule, and such a wrapper last in a chain is accepted."""
  every = lambda p: jax.tree.map(lambda _: "a", p)
  for make in (
    lambda: oc.chain(oc.inject_hyperparams(oc.ema_params)(decay=0.0), oc.scale(0.5)),
    lambda: oc.chain(
      oc.partition({"a": oc.chain(oc.sgd(0.1), oc.ema_params(0.0))}, every), oc.scale(0.5)
    ),
    lambda: oc.chain(
      oc.masked(oc.ema_params(0.0), lambda p: jax.tree.map(lambda _: True, p)), oc.sgd(0.1)
    ),
    lambda: oc.chain(oc.apply_if_finite(oc.chain(oc.sgd(0.1), oc.swa()), 3), oc.scale(2.0)),
  ):
    with pytest.raises(ValueError, match="place the averaging transformations last"):
      make()
  tx = oc.chain(oc.sgd(0.1), oc.inject_hyperparams(oc.ema_params)(decay=0.0))
  state = tx.init(P)
  updates, state = tx.update(G, state, P)
  np.testing.assert_allclose(
    oc.averaged_params(state, kind="ema")["w"], oc.apply_updates(P, updates)["w"], rtol=1e-6
  )


def test_inject_hyperparams_checks_a_users_own_factory_by_its_own_rules():
  """Optax's factories are checked by name as ours (``b1`` of ``optax.adam``); a factory of
  the user's own may give ``beta`` or ``decay`` any meaning, so only it checks them."""

  def smooth_sign(beta, decay):
    scale = lambda g: jnp.tanh(beta * g) * decay
    return oc.GradientTransformation(
      lambda p: oc.EmptyState(), lambda u, s, p=None, **e: (jax.tree.map(scale, u), s)
    )

  tx = oc.inject_hyperparams(smooth_sign)(beta=5.0, decay=2.0)
  updates, _ = tx.update(G, tx.init(P), P)
  np.testing.assert_allclose(updates["w"], 2.0 * np.tanh(5.0 * np.asarray(G["w"])), rtol=1e-6)
  with pytest.raises(ValueError, match=r"`b1` must lie in \[0, 1\)"):
    oc.inject_hyperparams(optax.adam)(learning_rate=0.1, b1=1.5)


@pytest.mark.parametrize(
  "schedule, error",
  [
    (lambda count: None, TypeError),
    (lambda count: "x", TypeError),
    (lambda: 0.1, TypeError),
    (lambda count: jnp.ones(3), ValueError),
  ],
)
def test_a_malformed_schedule_is_named(schedule, error):
  with pytest.raises(
    error,
    match="the schedule given as `learning_rate` must take the step count and return a real scalar",
  ):
    oc.adam(schedule).init(P)


def test_set_hyperparams_under_jit_takes_a_traced_value():
  """Inside jit the value is a tracer: its type and shape are checked, its range cannot be
  (that would need a host copy)."""
  tx = oc.inject_hyperparams(oc.sgd)(0.1)

  @jax.jit
  def run(learning_rate):
    state = oc.set_hyperparams(tx.init(P), learning_rate=learning_rate)
    return tx.update(G, state, P)[0]

  np.testing.assert_allclose(run(jnp.float32(0.5))["w"], -0.5 * G["w"], rtol=1e-6)


def test_a_nonzero_value_that_rounds_to_zero_is_refused():
  with pytest.raises(ValueError, match="`learning_rate` is 1e-50, which is 0 in float32"):
    oc.adam(1e-50)
  state = oc.inject_hyperparams(oc.sgd)(0.1).init(P)
  with pytest.raises(ValueError, match="`learning_rate` is 1e-50, which is 0 in float32"):
    oc.set_hyperparams(state, learning_rate=1e-50)
  oc.adam(0.0)  # an exact 0 is a value, not an accident


def test_float16_norms_do_not_overflow():
  """300 squared is inf in float16: normalize gave 0 (squares now in float32)."""
  g = {"w": jnp.array([300.0, -300.0, 300.0], jnp.float16)}
  u, _ = oc.normalize().update(g, oc.normalize().init(g))
  np.testing.assert_allclose(
    np.asarray(u["w"], np.float32), [0.57735, -0.57735, 0.57735], rtol=1e-3
  )
