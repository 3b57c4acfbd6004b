"""Checkpoint migration between Optax and optcompose (optcompose.migrate).

An Optax run is checkpointed mid-run with a real checkpointer (Flax's msgpack file, Orbax),
read back as a user would (a plain restored pytree, or into Optax's template), migrated into
optcompose's state and continued: it must end where the uninterrupted Optax run ends (float64,
to rounding), and the migrated state must be the one optcompose's own run holds at that step
(moments, counts, the scheduled values in force). And back: an optcompose checkpoint continues
in Optax. A state that cannot be migrated raises MigrationError naming its path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
import problems
from numerics import F64_RTOL, assert_rel_close, jit_once, standard_promotion, x64
from optcompose.checkpoint import restore_checkpoint, save_checkpoint
from optcompose.migrate import MigrationError, from_optax_state, to_optax_state

serialization = pytest.importorskip("flax.serialization")

K, N = 6, 6  # the checkpoint is taken after K steps; the run goes on for N more


def lr_schedule(count):
  """Warm-up from 0 (a restored step-0 value would read 0.0), then a cosine decay; the same
  function for both libraries (Optax's schedules compute in float32 even under x64)."""
  return oc.warmup_cosine_decay_schedule(0.0, 3e-2, 8, 40, 1e-3)(count)


def wd_schedule(count):
  return 1e-2 * 0.9 ** jnp.asarray(count, jnp.float32)


def matrices(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


# Each built the same way from either library (`lib` is optax or optcompose).
OPTIMIZERS = {
  "adam": lambda lib: lib.adam(1e-2),
  "adamw_masked_scheduled": lambda lib: lib.adamw(
    lr_schedule, weight_decay=wd_schedule, mask=matrices
  ),
  "sgd_momentum": lambda lib: lib.sgd(1e-2, momentum=0.9),
  "clip_adamw": lambda lib: lib.chain(
    lib.clip_by_global_norm(0.5), lib.adamw(lr_schedule, weight_decay=1e-2)
  ),
  "inject_adamw": lambda lib: lib.inject_hyperparams(lib.adamw)(
    learning_rate=lr_schedule, weight_decay=1e-2
  ),
  "lion": lambda lib: lib.lion(1e-3, weight_decay=1e-2),
  "lamb": lambda lib: lib.lamb(1e-2),
  # Saved mid-accumulation: after K = 6 micro-steps, 2 of the second real step's 4.
  "multi_steps_adamw": lambda lib: lib.MultiSteps(
    lib.adamw(lr_schedule), 4
  ).gradient_transformation(),
}
NAMES = [n for n in OPTIMIZERS if n not in ("lion", "lamb") or hasattr(oc, n)]


@functools.cache
def mlp64():
  """The MLP in float64 (call under x64), its gradient compiled once for the module."""
  return problems.mlp(jnp.float64)


APPLY = jit_once(oc.apply_updates)


def build(name):
  """(optcompose's transformation, Optax's under its own dtype promotion)."""
  return OPTIMIZERS[name](oc), standard_promotion(OPTIMIZERS[name](optax))


def run(update, prob, params, state, start, stop, save_at=None):
  """Train with a jitted ``update`` from step ``start`` to ``stop``; return the final params
  and state and, if ``save_at`` is given, the (params, state) at that step."""
  saved = None
  for t in range(start, stop):
    if t == save_at:
      saved = params, state
    u, state = update(prob.grad(params, t), state, params)
    params = APPLY(params, u)
  return params, state, saved


def without_logged_norm(state):
  """A state with optcompose's logged global norm (which Optax does not keep) set aside."""
  return jax.tree.map(
    lambda s: oc.EmptyState() if isinstance(s, oc.ClipByGlobalNormState) else s,
    state,
    is_leaf=lambda s: isinstance(s, oc.ClipByGlobalNormState),
  )


def assert_states_equal(actual, desired, what):
  """The same structure and dtypes, and the same values to float64 rounding."""
  assert jax.tree.structure(actual) == jax.tree.structure(desired), what
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
    assert jnp.result_type(a) == jnp.result_type(d), what
  assert_rel_close(actual, desired, F64_RTOL, what)


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_migrates_both_ways_and_training_continues(name, tmp_path):
  with x64():
    tx, otx = build(name)
    prob = mlp64()
    update, optax_update = jax.jit(tx.update), jax.jit(otx.update)
    # Each library's uninterrupted run, checkpointed mid-run.
    optax_end, _, (optax_params, optax_k) = run(
      optax_update, prob, prob.params, otx.init(prob.params), 0, K + N, save_at=K
    )
    ours_end, _, (ours_params, ours_k) = run(
      update, prob, prob.params, tx.init(prob.params), 0, K + N, save_at=K
    )

    # Optax -> optcompose: Optax's checkpoint (a Flax msgpack file) read back plainly.
    path = tmp_path / "optax.msgpack"
    path.write_bytes(serialization.to_bytes({"params": optax_params, "opt_state": optax_k}))
    restored = serialization.msgpack_restore(path.read_bytes())  # nested dicts of NumPy arrays
    params = jax.tree.map(jnp.asarray, restored["params"])
    state = from_optax_state(restored["opt_state"], tx, params)
    migrated, expected = without_logged_norm(state), without_logged_norm(ours_k)
    if name == "multi_steps_adamw":  # mid-accumulation the schedule's value is not reached
      assert np.isnan(oc.current_hyperparams(state)["learning_rate"])
      migrated, expected = (oc.set_hyperparams(s, learning_rate=1.0) for s in (migrated, expected))
    elif oc.current_hyperparams(state):  # the value in force, not step 0's 0.0
      lr = oc.current_hyperparams(state)["learning_rate"]
      assert float(lr) == pytest.approx(float(lr_schedule(K - 1)), rel=1e-12) and lr > 0
    assert_states_equal(migrated, expected, f"{name}: migrated from Optax vs optcompose's own")
    end, _, _ = run(update, prob, params, state, K, K + N)
    assert_rel_close(end, optax_end, F64_RTOL, f"{name}: resumed in optcompose vs Optax's run")

    # optcompose -> Optax: optcompose's checkpoint, restored into its template.
    path = save_checkpoint(tmp_path / "ours.msgpack", {"params": ours_params, "opt_state": ours_k})
    restored = restore_checkpoint(path, {"params": prob.params, "opt_state": tx.init(prob.params)})
    optax_state = to_optax_state(restored["opt_state"], otx, restored["params"])
    assert_states_equal(optax_state, optax_k, f"{name}: migrated to Optax vs Optax's own")
    end, _, _ = run(optax_update, prob, restored["params"], optax_state, K, K + N)
    assert_rel_close(end, ours_end, F64_RTOL, f"{name}: resumed in Optax vs optcompose's run")


@pytest.mark.numerics
@pytest.mark.float64
def test_every_way_of_reading_the_checkpoint_migrates_alike(tmp_path):
  """Flax's msgpack read plainly or into Optax's template, Orbax read with or without a
  target, the live state: one migrated state, bit for bit (clipping, a masked scheduled
  decay, a scheduled learning rate)."""
  ocp = pytest.importorskip("orbax.checkpoint")
  make = lambda lib: lib.chain(
    lib.clip_by_global_norm(0.5),
    lib.adamw(  # noqa: E731
      lr_schedule, weight_decay=wd_schedule, mask=matrices
    ),
  )
  tx, otx = make(oc), standard_promotion(make(optax))
  with x64():
    prob = mlp64()
    params, live = run(jax.jit(otx.update), prob, prob.params, otx.init(prob.params), 0, K)[:2]
    data = serialization.to_bytes(live)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp_path / "orbax", live)
      checkpointer.wait_until_finished()
      sources = {
        "orbax_plain": checkpointer.restore(tmp_path / "orbax"),
        "orbax_target": checkpointer.restore(tmp_path / "orbax", otx.init(params)),
      }
    sources.update(
      msgpack_plain=serialization.msgpack_restore(data),
      msgpack_template=serialization.from_bytes(otx.init(params), data),
    )
    reference = from_optax_state(live, tx, params)
    assert float(oc.current_hyperparams(reference)["learning_rate"]) > 0
    for how, source in sources.items():
      migrated = from_optax_state(source, tx, params)
      assert jax.tree.structure(migrated) == jax.tree.structure(reference), how
      for a, b in zip(jax.tree.leaves(migrated), jax.tree.leaves(reference)):
        assert isinstance(a, jax.Array) and a.dtype == b.dtype, how
        np.testing.assert_array_equal(a, b, err_msg=how)


# ----------------------------------------------------------------------------------------
# What cannot be migrated is refused, naming the path.


def params32():
  return {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}


def stepped(otx, params):
  """An Optax state after one update (counts and moments not at their initial values)."""
  otx = standard_promotion(otx)
  return otx.update(jax.tree.map(jnp.ones_like, params), otx.init(params), params)[1]


@pytest.mark.parametrize(
  "source, target, match, plain_refused",
  [
    (
      lambda: optax.lion(1e-3),
      lambda: oc.adamw(1e-3),
      r"state\[0\] is Optax's ScaleByLionState\(count, mu\), where the target holds "
      r"optcompose's ScaleByAdamState",
      True,
    ),
    # The same fields, another optimizer: told apart by the state's class only, so a plain
    # restored pytree (no classes) of AdaBelief's state passes for Adam's.
    (
      lambda: optax.adabelief(1e-3),
      lambda: oc.adam(1e-3),
      r"state\[0\] is Optax's ScaleByBeliefState.*another optimizer's state",
      False,
    ),
    (
      lambda: optax.sgd(1e-3, momentum=0.9),
      lambda: oc.sgd(1e-3),
      r"state\[0\] is Optax's TraceState\(trace\), where the target holds optcompose's "
      r"EmptyState",
      True,
    ),
    (
      lambda: optax.chain(optax.clip(1.0), optax.adam(1e-3)),
      lambda: oc.adam(1e-3),
      r"state\[0\] is Optax's EmptyState\(\), where the target holds optcompose's "
      r"ScaleByAdamState",
      True,
    ),
    # A schedule on one side only: Optax's count would be lost, or ours invented.
    (
      lambda: optax.adamw(lr_schedule),
      lambda: oc.adamw(1e-3),
      r"state\[2\] is Optax's ScaleByScheduleState\(count\), where the target holds "
      r"optcompose's EmptyState",
      True,
    ),
    (
      lambda: optax.adamw(1e-3),
      lambda: oc.adamw(lr_schedule),
      r"state\[2\] is Optax's EmptyState\(\), where the target holds optcompose's "
      r"InjectHyperparamsState",
      True,
    ),
    (
      lambda: optax.inject_hyperparams(optax.adamw)(1e-3, b1=0.8),
      lambda: oc.inject_hyperparams(oc.adamw, static_args="b1")(1e-3, b1=0.8),
      r"state.hyperparams has keys \['b1', 'b2', .*\], expected \['b2', ",
      True,
    ),
  ],
)
def test_another_optimizers_state_is_refused_with_its_path(source, target, match, plain_refused):
  params = params32()
  optax_state = stepped(source(), params)
  with pytest.raises(MigrationError, match=match) as raised:
    from_optax_state(optax_state, target(), params)
  assert isinstance(raised.value, ValueError) and f"state{raised.value.path} " in str(raised.value)
  plain = serialization.msgpack_restore(serialization.to_bytes(optax_state))
  if plain_refused:
    with pytest.raises(MigrationError):
      from_optax_state(plain, target(), params)
  else:
    from_optax_state(plain, target(), params)


def test_optcompose_state_of_another_optimizer_is_refused():
  params = params32()
  with pytest.raises(MigrationError, match=r"state\[0\] is optcompose's ScaleByLionState"):
    to_optax_state(oc.lion(1e-3).init(params), optax.adamw(1e-3), params)
  with pytest.raises(
    MigrationError,
    match=r"state is a tuple of 2 \(ScaleByAdamState, EmptyState\), "
    r"where the target holds a tuple of 3 ",
  ):
    to_optax_state(oc.adam(1e-3).init(params), optax.adamw(1e-3), params)


def test_other_shapes_and_value_changing_casts_are_refused():
  params = params32()
  state = stepped(optax.adam(1e-3), params)
  other = {"w": jnp.ones((3, 2)), "b": jnp.zeros(3)}
  with pytest.raises(
    MigrationError,
    match=r"state\[0\].mu\['w'\] has shape \(2, 3\), "
    r"expected \(3, 2\)",
  ):
    from_optax_state(state, oc.adam(1e-3), other)
  with x64():
    wide = jax.tree.map(lambda p: p.astype(jnp.float64) / 3, params)
    state64 = stepped(optax.adam(1e-3), wide)
  with pytest.raises(
    MigrationError,
    match=r"state\[0\].mu\['b'\] has dtype float64, expected "
    r"float32: casting would change its values",
  ):
    from_optax_state(state64, oc.adam(1e-3), params)


def test_inject_hyperparams_counts_must_agree():
  """optcompose keeps one count for all schedules: Optax's per-schedule counts, edited apart,
  are refused rather than one of them dropped."""
  params = params32()
  otx = optax.inject_hyperparams(optax.adamw)(learning_rate=lr_schedule, weight_decay=wd_schedule)
  state = stepped(otx, params)
  bad = state._replace(
    hyperparams_states={
      **state.hyperparams_states,
      "weight_decay": state.hyperparams_states["weight_decay"]._replace(count=jnp.int32(5)),
    }
  )
  tx = oc.inject_hyperparams(oc.adamw)(learning_rate=lr_schedule, weight_decay=wd_schedule)
  migrated = from_optax_state(state, tx, params)
  assert int(migrated.count) == 1
  with pytest.raises(
    MigrationError,
    match=r"hyperparams_states\['weight_decay'\].count is 5, "
    r"the state's count 1",
  ):
    from_optax_state(bad, tx, params)


def test_apply_if_finite_flag_is_filled_only_when_known():
  params = params32()
  otx, tx = optax.apply_if_finite(optax.adam(1e-3), 2), oc.apply_if_finite(oc.adam(1e-3), 2)
  state = stepped(otx, params)
  assert not bool(from_optax_state(state, tx, params).gave_up)  # no step was ever skipped
  skipped = state._replace(total_notfinite=jnp.int32(1))
  with pytest.raises(MigrationError, match=r"state.gave_up cannot be migrated"):
    from_optax_state(skipped, tx, params)
  ours = tx.init(params)
  with pytest.raises(MigrationError, match=r"state.gave_up cannot be migrated"):
    to_optax_state(ours._replace(gave_up=jnp.asarray(True)), otx, params)


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("name", ["clip_adamw", "inject_adamw", "sgd_momentum"])
def test_a_flax_nnx_optimizers_state_migrates_live_and_as_a_pure_dict(name):
  # nnx.to_pure_dict writes tuples as {1: ...} with int keys and leaves out the states that
  # hold no array; the live state holds Variables and nnx.State. Both were refused as
  # "another optimizer's state".
  nnx = pytest.importorskip("flax.nnx")
  with x64():
    x = jnp.arange(12.0).reshape(4, 3) / 10

    def loss(model):
      return jnp.mean((model(x) - 1.0) ** 2)

    def trained(lib, steps, start=None):
      model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
      opt = nnx.Optimizer(model, standard_promotion(OPTIMIZERS[name](lib)), wrt=nnx.Param)
      if start is not None:
        nnx.update(opt.opt_state, nnx.state(start))
      for _ in range(steps):
        opt.update(model, nnx.grad(loss)(model))
      return model, opt

    _, optax_opt = trained(optax, 3)
    ours_model, ours_opt = trained(oc, 3)
    params = nnx.to_pure_dict(nnx.state(ours_model, nnx.Param))
    tx = OPTIMIZERS[name](oc)
    for source in (nnx.to_pure_dict(nnx.state(optax_opt))["opt_state"], optax_opt.opt_state):
      state = from_optax_state(source, tx, params)
      expected = nnx.to_pure_dict(nnx.state(ours_opt.opt_state))
      got = nnx.to_pure_dict(nnx.state(without_logged_norm(state)))
      assert_rel_close(got, without_logged_norm_dict(expected), F64_RTOL, name)
    # NNX parameters as nnx.Optimizer holds them (nnx.State) are read as their pure dict
    as_state = from_optax_state(optax_opt.opt_state, tx, nnx.state(ours_model, nnx.Param))
    assert_states_equal(as_state, state, f"{name}: nnx.State parameters")
    back = to_optax_state(
      nnx.to_pure_dict(nnx.state(ours_opt))["opt_state"], OPTIMIZERS[name](optax), params
    )
    again = from_optax_state(back, tx, params)
    assert_states_equal(without_logged_norm(again), without_logged_norm(state), name)


def without_logged_norm_dict(state):
  """A pure-dict state without optcompose's logged global norm (``{'global_norm': ...}``)."""
  if isinstance(state, dict):
    return {
      k: without_logged_norm_dict(v)
      for k, v in state.items()
      if set(v if isinstance(v, dict) else ()) != {"global_norm"}
    }
  return state


def test_a_sequence_where_a_dict_of_arrays_belongs_is_refused_with_its_path():
  # Describing a list of arrays asked for the truth value of an array (a bare ValueError).
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  state = optax.adam(1e-2).init(params)
  with pytest.raises(MigrationError, match=r"state\[0\]\.mu is a dict with keys \['b', 'w'\]"):
    from_optax_state(state, oc.adam(1e-2), [params["b"], params["w"]])


def test_restoring_an_optax_checkpoint_into_our_template_points_to_migration(tmp_path):
  from optcompose.checkpoint import CheckpointMismatchError

  params = {"w": jnp.ones((3, 2))}
  path = tmp_path / "optax.msgpack"
  optax_state = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)).init(params)
  path.write_bytes(serialization.to_bytes({"params": params, "opt_state": optax_state}))
  tx = oc.chain(oc.clip_by_global_norm(1.0), oc.adam(1e-2))
  with pytest.raises(CheckpointMismatchError, match=r"global_norm.*migrate\.from_optax_state"):
    restore_checkpoint(path, {"params": params, "opt_state": tx.init(params)})


def test_first_use_from_many_threads_sees_every_counterpart(monkeypatch):
  # The table of Optax/optcompose state pairs is read on first use. Threads that found it
  # half filled raised "Set changed size during iteration", or took a pair missing from it
  # as having no counterpart (the fields alone then decide). Filling is slowed down here so
  # that the other threads arrive while it runs; each must see the whole table.
  import threading
  import time

  from optcompose import _migrate_match as mm

  whole = mm._pairs()
  assert len(whole) > 20
  monkeypatch.setattr(mm, "_PAIRS", type(mm._PAIRS)())
  slow = mm._is_namedtuple

  def slowly(x, is_class=False):
    time.sleep(1e-5)
    return slow(x, is_class)

  monkeypatch.setattr(mm, "_is_namedtuple", slowly)
  seen, errors = [], []

  def read():
    try:
      seen.append(set(mm._pairs()))
    except Exception as e:  # noqa: BLE001 -- the failure this test is about
      errors.append(e)

  threads = [threading.Thread(target=read) for _ in range(6)]
  for t in threads:
    t.start()
    time.sleep(0.002)
  for t in threads:
    t.join()
  assert not errors
  assert all(s == set(whole) for s in seen)
