"""Red-team findings, each run as it was reported, with ``P = {"w": [1., 2., 3.]}``.

Every test here failed (a silent wrong result, or an error that named nothing) before the fix.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc
from numerics import x64

P = {"w": jnp.array([1.0, 2.0, 3.0])}
NO_F16C = "xla_cpu_max_isa=SSE" in os.environ.get("XLA_FLAGS", "")


# 1. partition names the value of `transforms` that is not a transformation.


def test_1_partition_names_the_bad_transform():
  with pytest.raises(
    TypeError,
    match=r"partition: `transforms\['a'\]` is float, not a gradient "
    r"transformation",
  ):
    oc.partition({"a": 0.1, "f": oc.set_to_zero()}, {"w": "a"})


# 2. An `include` regex that matches no path is an error, not an all-False mask.


def test_2_mask_from_paths_include_matching_nothing_is_an_error():
  tx = oc.masked(oc.sgd(0.1), oc.mask_from_paths(include="typo"))
  with pytest.raises(
    ValueError,
    match=r"mask_from_paths: `include` 'typo' matches no leaf path; "
    r"it was searched in: \['w'\]",
  ):
    tx.init(P)
  with pytest.raises(ValueError, match=r"`include` 'typo' matches no leaf path"):
    oc.mask_from_paths(include="typo")(P)
  # Valid masks still work.
  two = {"kernel": jnp.ones(2), "bias": jnp.ones(2)}
  assert oc.mask_from_paths(include="kernel")(two) == {"kernel": True, "bias": False}
  # An exclude that matches nothing excludes nothing (a generic exclude=r"bias|scale").
  assert oc.mask_from_paths(exclude="bias|scale")(P) == {"w": True}
  assert oc.mask_from_paths(include="kernel", exclude="kernel")(two) == {
    "kernel": False,
    "bias": False,
  }
  assert oc.mask_from_paths(include="typo")({}) == {}  # no leaves: nothing to match
  tx = oc.masked(oc.sgd(0.1), oc.mask_from_paths(include="kernel"))
  updates, _ = tx.update(two, tx.init(two), two)
  np.testing.assert_allclose(updates["kernel"], -0.1 * np.ones(2))
  np.testing.assert_array_equal(updates["bias"], np.ones(2))


def test_2_labels_from_paths_rule_matching_nothing_is_an_error():
  labels = oc.labels_from_paths([(r"w", "train"), (r"typo", "frozen")], default="train")
  with pytest.raises(
    ValueError,
    match=r"labels_from_paths: `rules\[1\]\[0\]` 'typo' matches no "
    r"leaf path; it was searched in: \['w'\]",
  ):
    labels(P)
  assert oc.labels_from_paths([(r"w", "x")], default="y")(P) == {"w": "x"}


# 3. reduce_on_plateau: min_scale in [0, 1]; `value` must be a real number.


def test_3_plateau_min_scale_above_one_is_refused():
  with pytest.raises(
    ValueError,
    match=r"reduce_on_plateau: `min_scale` must lie in \[0, 1\], "
    r"got 2",
  ):
    oc.reduce_on_plateau(min_scale=2.0)
  oc.reduce_on_plateau(min_scale=1.0)
  oc.reduce_on_plateau(min_scale=0.0)


@pytest.mark.parametrize("value", [True, "a", 1 + 2j, None], ids=["bool", "str", "complex", "None"])
def test_3_plateau_value_must_be_real(value):
  tx = oc.reduce_on_plateau()
  state = tx.init(P)
  with pytest.raises(TypeError, match=r"reduce_on_plateau: `value` .* must be a real number"):
    tx.update(P, state, value=value)


@pytest.mark.parametrize("value", [jnp.asarray(True), jnp.asarray(1 + 2j)], ids=["bool", "complex"])
def test_3_plateau_value_dtype_is_checked_while_tracing(value):
  tx = oc.reduce_on_plateau()
  state = tx.init(P)
  with pytest.raises(TypeError, match=r"`value` .* got dtype (bool|complex64)"):
    jax.jit(lambda v: tx.update(P, state, value=v))(value)
  # Real values still work, ints included.
  for good in (3, 2.5, jnp.asarray(1.0, jnp.bfloat16)):
    updates, _ = jax.jit(lambda v: tx.update(P, state, value=v))(good)
    np.testing.assert_array_equal(updates["w"], P["w"])


# 4. early_stopping: named errors for non-real metrics; the metric in JAX's default float.


@pytest.mark.parametrize("metric", ["a", None], ids=["str", "None"])
def test_4_early_stopping_metric_must_be_real(metric):
  es = oc.early_stopping()
  with pytest.raises(TypeError, match=r"early_stopping: `metric` must be a real number"):
    es.update(es.init(), metric)
  with pytest.raises(TypeError, match=r"early_stopping: `metric` must be a real number"):
    es.step(es.init(), metric)


def test_4_early_stopping_large_int_metric():
  es = oc.early_stopping()
  assert float(es.update(es.init(), 2**40).best_metric) == 2.0**40
  state, stop = es.step(es.init(), 2**40)
  assert float(state.best_metric) == 2.0**40 and not stop


def test_4_early_stopping_metric_is_float64_under_x64():
  es = oc.early_stopping()
  with x64():
    state = es.init()
    assert state.best_metric.dtype == jnp.float64
    state = es.update(state, 1.0)
    state = es.update(state, 1.0 - 1e-9)
    assert bool(state.improved) and float(state.best_metric) == 1.0 - 1e-9
    state, _ = es.step(es.init(), 1.0)
    state, _ = es.step(state, 1.0 - 1e-9)
    assert bool(state.improved)
  state = es.init()
  assert state.best_metric.dtype == jnp.float32  # without x64: float32, as documented


# 5. with_diagnostics: a negative learning rate is refused.


def test_5_diagnostics_learning_rate_must_be_non_negative():
  with pytest.raises(
    ValueError,
    match=r"with_diagnostics: `learning_rate` must lie in "
    r"\[0, inf\), got -1",
  ):
    oc.with_diagnostics(oc.sgd(0.1), learning_rate=-1.0)
  oc.with_diagnostics(oc.sgd(0.1))
  oc.with_diagnostics(oc.sgd(0.1), learning_rate=0.1)


# 6. Clipping in float16: the squares are summed in float32; `axis` is validated.


@pytest.mark.skipif(NO_F16C, reason="XLA CPU cannot compile float16 arithmetic without F16C")
def test_6_float16_clipping_does_not_overflow():
  g = {"w": jnp.full(3, 300.0, jnp.float16)}
  expected = np.full(3, 1 / np.sqrt(3))
  for tx in (oc.clip_by_global_norm(1.0), oc.clip_by_leaf_norm(1.0)):
    updates, state = jax.jit(tx.update)(g, tx.init(g), g)
    assert updates["w"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(updates["w"], np.float64), expected, rtol=1e-3)
  tx = oc.clip_by_global_norm(1.0)
  _, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(float(state.global_norm), 300 * np.sqrt(3), rtol=1e-3)
  tx = oc.chain(oc.clip_by_global_norm(1.0), oc.adam(0.1))
  updates, _ = jax.jit(tx.update)(g, tx.init(g), g)
  np.testing.assert_allclose(np.asarray(updates["w"], np.float64), -0.1, rtol=1e-2)
  tx = oc.clip_by_block_rms(1.0)
  updates, _ = jax.jit(tx.update)(g, tx.init(g), g)
  assert updates["w"].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(updates["w"], np.float64), 1.0, rtol=1e-3)
  w = {"w": jnp.full((3, 2), 300.0, jnp.float16)}
  tx = oc.adaptive_grad_clip(0.1)
  updates, _ = jax.jit(tx.update)(w, tx.init(w), w)
  assert updates["w"].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(updates["w"], np.float64), 30.0, rtol=1e-3)


def test_6_bfloat16_clipping_keeps_the_dtype():
  g = {"w": jnp.full(3, 300.0, jnp.bfloat16)}
  for tx in (
    oc.clip_by_global_norm(1.0),
    oc.clip_by_leaf_norm(1.0),
    oc.clip_by_block_rms(1.0),
    oc.clip_by_global_norm(lambda count: jnp.asarray(1.0, jnp.float32)),
  ):
    updates, _ = jax.jit(tx.update)(g, tx.init(g), g)
    assert updates["w"].dtype == jnp.bfloat16


def test_6_adaptive_grad_clip_axis_is_validated():
  with pytest.raises(
    TypeError,
    match=r"adaptive_grad_clip: `axis` must be an int, a sequence "
    r"of ints or None, got 'a'",
  ):
    oc.adaptive_grad_clip(0.1, axis="a")
  tx = oc.adaptive_grad_clip(0.1, axis=5)
  with pytest.raises(
    ValueError,
    match=r"adaptive_grad_clip: `axis` 5 is out of range for "
    r"`updates\['w'\]` of shape \(3,\)",
  ):
    tx.update(P, tx.init(P), P)
  with pytest.raises(ValueError, match=r"`axis` 5 is out of range for `updates\['w'\]`"):
    jax.jit(tx.update)(P, tx.init(P), P)
  tx = oc.adaptive_grad_clip(0.1, axis=-1)
  tx.update(P, tx.init(P), P)


# 7. A damaged layouts or checksum record of a checkpoint is reported as damage.


@pytest.mark.parametrize(
  "key, bad, record",
  [
    ("layouts", 5, "layouts"),
    ("layouts", [[["p"], 3]], "layouts"),
    ("leaves", 5, "checksum"),
    ("leaves", [[["p"], "x"]], "checksum"),
  ],
  ids=["layouts-int", "layout-int", "checksums-int", "checksum-str"],
)
def test_7_damaged_checkpoint_records(tmp_path, key, bad, record):
  serialization = pytest.importorskip("flax.serialization")
  tree = {"p": oc.flat_params({"a": jnp.ones(2), "b": jnp.ones(3)})}
  path = tmp_path / "c.msgpack"
  oc.checkpoint.save_checkpoint(path, tree)
  raw = serialization.msgpack_restore(path.read_bytes())
  raw[key] = bad
  path.write_bytes(serialization.msgpack_serialize(raw))
  with pytest.raises(
    oc.checkpoint.CheckpointCorruptError,
    match=rf"{re.escape(str(path))} is damaged: its {record} record is "
    r"unreadable",
  ):
    oc.checkpoint.restore_checkpoint(path, tree)


@pytest.mark.parametrize("drop", ["layouts", "leaves"])
def test_7_orbax_sidecar_missing_a_record(tmp_path, drop):
  pytest.importorskip("orbax.checkpoint")
  import json

  path = tmp_path / "c"
  oc.checkpoint.save_orbax_checkpoint(path, {"w": jnp.ones(3)})
  sidecar = path / "optcompose_checkpoint.json"
  record = json.loads(sidecar.read_text())
  del record[drop]
  sidecar.write_text(json.dumps(record))
  with pytest.raises(
    oc.checkpoint.CheckpointCorruptError, match=rf"damaged or of another format.*KeyError: '{drop}'"
  ):
    oc.checkpoint.restore_orbax_checkpoint(path, {"w": jnp.ones(3)})


# 8. sam's opaque mode names a grad_fn of the wrong signature.


def test_8_sam_grad_fn_signature():
  tx = oc.sam(oc.sgd(0.1), oc.chain(oc.normalize(), oc.sgd(0.05)), opaque_mode=True)
  state = tx.init(P)
  message = r"sam: `grad_fn` must take two positional arguments, \(params, i\)"
  with pytest.raises(TypeError, match=message):
    tx.update(P, state, P, grad_fn=lambda p: p)
  with pytest.raises(TypeError, match=message):
    jax.jit(lambda g: tx.update(g, state, P, grad_fn=lambda p: p))(P)
  updates, _ = tx.update(P, state, P, grad_fn=lambda p, i: p)
  assert updates["w"].shape == (3,)
