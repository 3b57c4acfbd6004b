"""Early stopping: jitted and scanned decisions against a plain-Python reference.

Curves are multiples of 1/64 (exact in float32 and float64), so the reference can compare
in Python floats while ours compares in float32, and ties at ``min_delta`` are exact.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from hypothesis import given, settings, strategies as st

import optcompose.recipe.early_stopping as es_module
from optcompose.recipe.early_stopping import EarlyStopping, EarlyStoppingState, early_stopping

# A validation loss that falls, bottoms out at epoch 8, then rises.
LOSS = np.array([64, 48, 40, 34, 30, 28, 27, 26.5, 26, 26.25, 27, 28, 30, 33, 37, 42]) / 32
BEST = 8
# An accuracy that rises to epoch 8, then falls.
ACCURACY = np.array([8, 20, 30, 38, 44, 48, 50, 51, 52, 51.5, 50, 47, 43, 38, 32, 25]) / 64


def reference(
  curve, mode="min", patience=5, min_delta=0.0, relative=False, baseline=None, warmup=0
):
  """Early stopping as a plain loop over Python floats, written from the specification.

  Returns (improved flag per epoch, best value, best epoch, first epoch at which training
  should stop or None).
  """
  best, best_epoch, wait, stop_at, flags = baseline, -1, 0, None, []
  for epoch, value in enumerate(float(v) for v in curve):
    if stop_at is not None or epoch < warmup:
      flags.append(False)
      continue
    better = False
    if math.isfinite(value):
      if best is None:
        better = True
      else:
        margin = min_delta * abs(best) if relative else min_delta
        better = value < best - margin if mode == "min" else value > best + margin
    if better:
      best, best_epoch, wait = value, epoch, 0
    else:
      wait += 1
      if wait > patience:
        stop_at = epoch
    flags.append(better)
  return flags, best, best_epoch, stop_at


def params_at(epoch):
  """The pytree handed to the monitor at ``epoch`` (a float tree and an int leaf)."""
  e = jnp.asarray(epoch, jnp.float32)
  return {
    "w": jnp.stack([e, 2 * e, -e]),
    "b": (e + 0.5).astype(jnp.bfloat16),
    "n": jnp.asarray(epoch, jnp.int32),
  }


INITIAL = params_at(-100)

# One compilation per configuration (the configuration is static and hashable).
jitted_update = jax.jit(EarlyStopping.update, static_argnums=0)


def run_jit(es, curve):
  """Feed the curve epoch by epoch through the jitted update; record each state."""
  state, states = es.init(INITIAL), []
  for epoch, value in enumerate(curve):
    state = jitted_update(es, state, jnp.float32(value), params_at(epoch))
    states.append(state)
  return states


def run_scan(es, curve):
  """The whole curve in one lax.scan; returns the final state and per-epoch flags."""

  @jax.jit
  def scan(curve):
    def body(state, x):
      epoch, value = x
      state = es.update(state, value, params_at(epoch))
      return state, (state.improved, state.should_stop)

    xs = (jnp.arange(len(curve), dtype=jnp.int32), curve)
    return jax.lax.scan(body, es.init(INITIAL), xs)

  return scan(jnp.asarray(curve, jnp.float32))


def assert_same_as_reference(es, curve, states=None):
  flags, best, best_epoch, stop_at = reference(curve, **config_of(es))
  states = run_jit(es, curve) if states is None else states
  assert [bool(s.improved) for s in states] == flags
  stops = [bool(s.should_stop) for s in states]
  assert stops == [stop_at is not None and e >= stop_at for e in range(len(curve))]
  final = states[-1]
  assert int(final.best_epoch) == best_epoch
  if best is None:
    assert float(final.best_metric) == (math.inf if es.mode == "min" else -math.inf)
  else:
    assert float(final.best_metric) == best
  expected = INITIAL if best_epoch < 0 else params_at(best_epoch)
  for a, b in zip(jax.tree.leaves(final.best_params), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return flags, stop_at


def config_of(es):
  return dataclasses.asdict(es)


@pytest.mark.parametrize("mode,curve", [("min", LOSS), ("max", ACCURACY), ("max", -LOSS)])
@pytest.mark.parametrize("patience", [0, 3])
def test_recorded_curve_under_jit_matches_the_reference(mode, curve, patience):
  es = early_stopping(mode=mode, patience=patience)
  flags, stop_at = assert_same_as_reference(es, curve)
  if patience == 3:
    assert flags == [True] * (BEST + 1) + [False] * (len(curve) - BEST - 1)
    assert stop_at == BEST + 4  # epochs 9..12 do not improve; the 4th exceeds patience 3
    state = run_jit(es, curve)[-1]
    assert int(state.best_epoch) == BEST and int(state.wait) == 4
  else:
    assert stop_at == BEST + 1


@pytest.mark.parametrize("mode,curve", [("min", LOSS), ("max", ACCURACY)])
def test_recorded_curve_in_lax_scan_matches_jit_and_the_reference(mode, curve):
  es = early_stopping(mode=mode, patience=3, min_delta=1 / 64)
  final, (improved, stops) = run_scan(es, curve)
  flags, best, best_epoch, stop_at = reference(curve, **config_of(es))
  assert list(np.asarray(improved)) == flags
  assert list(np.asarray(stops)) == [
    stop_at is not None and e >= stop_at for e in range(len(curve))
  ]
  by_jit = run_jit(es, curve)[-1]
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(by_jit)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(final.best_epoch) == best_epoch and float(final.best_metric) == best
  assert int(final.epoch) == len(curve)


def test_min_delta_absolute_is_a_strict_threshold():
  curve = [1.0, 0.75, 0.625, 0.5625, 0.5, 0.4375, 0.375]
  es = early_stopping(min_delta=0.125, patience=10)
  flags, _ = assert_same_as_reference(es, curve)
  # 0.75 -> 0.625 is exactly min_delta: not an improvement; 0.75 -> 0.5625 is. From 0.5625,
  # 0.4375 ties again and 0.375 improves.
  assert flags == [True, True, False, True, False, False, True]
  # With min_delta=0 every fall counts.
  assert assert_same_as_reference(early_stopping(patience=10), curve)[0] == [True] * 7


@pytest.mark.parametrize("mode,sign", [("min", 1.0), ("max", -1.0)])
def test_min_delta_relative_is_a_fraction_of_the_best(mode, sign):
  curve = [sign * v for v in [1.0, 0.8, 0.75, 0.7, 0.55, 0.5, 0.25, 0.1875]]
  es = early_stopping(mode=mode, min_delta=0.25, relative=True, patience=10)
  flags, _ = assert_same_as_reference(es, curve)
  # best 1 -> needs < 0.75 (0.75 itself ties); best 0.7 -> needs < 0.525; best 0.5 -> < 0.375;
  # best 0.25 -> needs < 0.1875.
  assert flags == [True, False, False, True, False, True, True, False]
  absolute = assert_same_as_reference(
    early_stopping(mode=mode, min_delta=0.25, patience=10), curve
  )[0]
  assert absolute != flags  # the relative threshold is not the absolute one


@pytest.mark.parametrize("mode,sign", [("min", 1.0), ("max", -1.0)])
def test_baseline_must_be_beaten_before_anything_counts(mode, sign):
  es = early_stopping(mode=mode, patience=2, baseline=sign * 0.5)
  curve = [sign * v for v in [0.8, 0.6, 0.55, 0.45, 0.4]]
  flags, stop_at = assert_same_as_reference(es, curve)
  assert flags == [False] * 5 and stop_at == 2
  state = run_jit(es, curve)[-1]
  assert int(state.best_epoch) == -1 and float(state.best_metric) == sign * 0.5
  for a, b in zip(jax.tree.leaves(state.best_params), jax.tree.leaves(INITIAL)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # still the initial pytree
  # Beaten by more than min_delta at epoch 1, then tracked as usual.
  es = early_stopping(mode=mode, patience=2, baseline=sign * 0.5, min_delta=0.125)
  curve = [sign * v for v in [0.4375, 0.25, 0.1875, 0.0, 0.5]]
  flags, _ = assert_same_as_reference(es, curve)
  assert flags == [False, True, False, True, False]


def test_warmup_epochs_are_ignored_entirely():
  es = early_stopping(patience=0, warmup=3)
  curve = [0.125, 5.0, 9.0, 3.0, 2.0, 2.5, 1.0]
  states = run_jit(es, curve)
  flags, stop_at = assert_same_as_reference(es, curve, states)
  assert flags == [False, False, False, True, True, False, False] and stop_at == 5
  for s in states[:3]:  # nothing tracked, counted or decided, though the curve rises
    assert int(s.best_epoch) == -1 and float(s.best_metric) == math.inf
    assert int(s.wait) == 0 and not bool(s.should_stop) and not bool(s.improved)
  assert [int(s.epoch) for s in states] == list(range(1, 8))
  assert int(states[-1].best_epoch) == 4  # the 0.125 of warm-up epoch 0 never counted


def test_patience_zero_stops_at_the_first_epoch_without_improvement():
  es = early_stopping(patience=0)
  flags, stop_at = assert_same_as_reference(es, LOSS)
  assert stop_at == BEST + 1
  states = run_jit(es, LOSS)
  assert [bool(s.should_stop) for s in states[: BEST + 1]] == [False] * (BEST + 1)


def test_after_the_decision_the_state_is_frozen():
  es = early_stopping(patience=1)
  curve = [1.0, 2.0, 3.0, 0.125, 0.0625]  # would improve after the stop
  states = run_jit(es, curve)
  assert [bool(s.should_stop) for s in states] == [False, False, True, True, True]
  assert [bool(s.improved) for s in states] == [True, False, False, False, False]
  last = states[-1]
  assert int(last.best_epoch) == 0 and float(last.best_metric) == 1.0
  assert int(last.wait) == 2 and int(last.epoch) == 5


@pytest.mark.parametrize("mode", ["min", "max"])
def test_nan_and_inf_never_improve_and_count_as_non_improving(mode):
  sign = 1.0 if mode == "min" else -1.0
  curve = [math.nan, sign * 1.0, math.nan, -sign * math.inf, sign * 0.5, math.nan]
  es = early_stopping(mode=mode, patience=1)
  states = run_jit(es, curve)
  flags, stop_at = assert_same_as_reference(es, curve, states)
  assert flags == [False, True, False, False, False, False] and stop_at == 3
  assert int(states[0].wait) == 1 and int(states[0].best_epoch) == -1
  assert not np.isnan(float(states[-1].best_metric))
  # patience=0: a NaN right after an improvement stops training.
  flags, stop_at = assert_same_as_reference(
    early_stopping(mode=mode, patience=0), [sign * 1.0, math.nan, sign * 0.5]
  )
  assert stop_at == 1


def test_plain_python_loop():
  es = early_stopping(patience=2)
  state, seen = es.init(INITIAL), 0
  for epoch, value in enumerate(LOSS):
    state = es.update(state, value, params_at(epoch))  # eager
    seen += 1
    if state.should_stop:
      break
  assert seen == BEST + 4 and int(state.best_epoch) == BEST
  state, seen = es.init(INITIAL), 0
  for epoch, value in enumerate(LOSS):
    state, stop = es.step(state, value, params_at(epoch))  # the jitted helper
    assert isinstance(stop, bool)
    seen += 1
    if stop:
      break
  assert seen == BEST + 4 and int(state.best_epoch) == BEST
  np.testing.assert_array_equal(state.best_params["w"], params_at(BEST)["w"])


def test_no_pytree_and_init_copies_the_pytree():
  es = early_stopping(patience=1)
  state = es.init()
  for value in [1.0, 0.5, 0.75]:
    state = jitted_update(es, state, value, None)
  assert state.best_params is None and int(state.best_epoch) == 1
  host = {"w": np.zeros(3, np.float32)}
  state = es.init(host)
  host["w"][:] = 7.0  # mutating the caller's buffer does not touch the kept copy
  np.testing.assert_array_equal(state.best_params["w"], np.zeros(3, np.float32))


def test_state_serializes_and_restores():
  es = early_stopping(mode="max", patience=3)
  states = run_jit(es, ACCURACY[:10])
  state = states[-1]
  restored = serialization.from_bytes(es.init(INITIAL), serialization.to_bytes(state))
  assert isinstance(restored, EarlyStoppingState)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Resuming from the restored state continues exactly.
  a = jitted_update(es, jax.tree.map(jnp.asarray, restored), ACCURACY[10], params_at(10))
  b = jitted_update(es, state, ACCURACY[10], params_at(10))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_state_saves_and_restores_with_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  es = early_stopping(patience=3)
  state = run_jit(es, LOSS[:10])[-1]
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "early_stopping", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "early_stopping", es.init(INITIAL))
  assert isinstance(restored, EarlyStoppingState) and int(restored.best_epoch) == BEST
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_configuration_is_static_and_hashable():
  es = early_stopping(patience=np.int64(2), min_delta=np.float32(0.5), baseline=1)
  assert hash(es) == hash(early_stopping(patience=2, min_delta=0.5, baseline=1.0))
  values = dataclasses.astuple(es)
  assert all(isinstance(v, (str, int, float, bool)) for v in values)
  assert not any(isinstance(v, jax.Array) for v in values)
  assert es_module.__all__ == ["EarlyStopping", "EarlyStoppingState", "early_stopping"]


@pytest.mark.parametrize(
  "kwargs,error,name",
  [
    ({"mode": "mean"}, ValueError, "mode"),
    ({"mode": None}, ValueError, "mode"),
    ({"patience": -1}, ValueError, "patience"),
    ({"patience": 1.5}, TypeError, "patience"),
    ({"patience": True}, TypeError, "patience"),
    ({"min_delta": -0.1}, ValueError, "min_delta"),
    ({"min_delta": math.nan}, ValueError, "min_delta"),
    ({"min_delta": lambda count: 0.1}, TypeError, "min_delta"),
    ({"warmup": -2}, ValueError, "warmup"),
    ({"baseline": math.inf}, ValueError, "baseline"),
    ({"relative": "yes"}, TypeError, "relative"),
  ],
)
def test_bad_configuration_names_the_argument(kwargs, error, name):
  with pytest.raises(error, match=f"`{name}`"):
    early_stopping(**kwargs)


def test_bad_update_arguments():
  es = early_stopping()
  state = es.init(INITIAL)
  with pytest.raises(ValueError, match="`metric`"):
    es.update(state, jnp.ones(2), params_at(0))
  with pytest.raises(ValueError, match="best_params"):
    es.update(state, 1.0, {"w": jnp.ones(3)})
  with pytest.raises(TypeError, match="EarlyStoppingState"):
    es.update((), 1.0, params_at(0))


# --- property: random curves and configurations, jitted monitor against the reference ---

VALUES = st.one_of(
  st.integers(-24, 24).map(lambda k: k / 8), st.sampled_from([math.nan, math.inf, -math.inf])
)


@settings(max_examples=50, deadline=None)
@given(
  curve=st.lists(VALUES, min_size=1, max_size=12),
  mode=st.sampled_from(["min", "max"]),
  patience=st.integers(0, 3),
  min_delta=st.sampled_from([0.0, 0.125, 0.25, 0.5]),
  relative=st.booleans(),
  baseline=st.one_of(st.none(), st.integers(-8, 8).map(lambda k: k / 4)),
  warmup=st.integers(0, 3),
)
def test_property_jit_matches_the_reference(
  curve, mode, patience, min_delta, relative, baseline, warmup
):
  es = early_stopping(
    mode=mode,
    patience=patience,
    min_delta=min_delta,
    relative=relative,
    baseline=baseline,
    warmup=warmup,
  )
  assert_same_as_reference(es, curve)
