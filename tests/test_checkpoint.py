"""Checkpoints: a run saved part-way and resumed from scratch ends bitwise equal to one that
was never interrupted, with msgpack files and with Orbax; a template that does not match is
refused with the path that differs; nothing is cast; pickle is never used."""

from __future__ import annotations

import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc
from optcompose.checkpoint import (
  CheckpointMismatchError,
  restore_checkpoint,
  restore_orbax_checkpoint,
  save_checkpoint,
  save_orbax_checkpoint,
)
from optcompose.recipe.early_stopping import early_stopping

N, K = 30, 12  # steps of the whole run; the checkpoint is taken after K of them
EVAL_EVERY = 5  # steps between validation losses fed to early stopping


# ----------------------------------------------------------------------------------------
# A small training run. Everything is built by functions, so that a "new process" can build
# it again from code: nothing but the checkpoint carries over.


def init_params():
  """A 8-32-1 tanh MLP; the output kernel is bfloat16 (mixed precision), so the state holds
  moments of both dtypes."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {
    "dense1": {"kernel": jax.random.normal(k1, (8, 32)) / jnp.sqrt(8.0), "bias": jnp.zeros(32)},
    "dense2": {
      "kernel": (jax.random.normal(k2, (32, 1)) / jnp.sqrt(32.0)).astype(jnp.bfloat16),
      "bias": jnp.zeros(1),
    },
  }


def loss_fn(params, x, y):
  p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"][None, :])
  return jnp.mean((h @ p["dense2"]["kernel"] + p["dense2"]["bias"][None, :] - y) ** 2)


def batch(step: int, size: int = 16):
  """The minibatch of a given step: the same in every process."""
  rng = np.random.default_rng(1000 + step)
  x = rng.normal(size=(size, 8)).astype(np.float32)
  return x, np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)


def make_optimizer(name: str):
  schedule = oc.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40)
  recipe = lambda: oc.chain(
    oc.clip_by_global_norm(1.0),  # noqa: E731
    oc.adamw(schedule, weight_decay=1e-2),
  )
  if name == "chain":
    return recipe()
  if name == "inject_hyperparams":
    return oc.inject_hyperparams(oc.adamw)(learning_rate=schedule, weight_decay=1e-2)
  if name == "multi_steps":  # K = 12 is not a multiple of 5: saved mid-accumulation
    return oc.multi_steps(recipe(), every_k_schedule=5)
  raise ValueError(name)


def build(name: str):
  """What a fresh process builds from code: the optimizer, early stopping, jitted steps."""
  tx = make_optimizer(name)
  es = early_stopping(mode="min", patience=3)
  x_val, y_val = batch(-1, size=64)

  @jax.jit
  def train_step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return oc.apply_updates(params, updates), opt_state

  val_loss = jax.jit(lambda params: loss_fn(params, x_val, y_val))
  return tx, es, train_step, val_loss


def fresh_tree(tx, es):
  """The state at step 0; also the template to restore into."""
  params = init_params()
  return {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros([], jnp.int32),
    "early_stopping": es.init(params),
  }


def train(tree, until: int, es, train_step, val_loss):
  """Continue from ``tree["step"]`` to ``until``; early stopping sees a validation loss every
  EVAL_EVERY steps (its decision is recorded, not acted on: the run has a fixed length)."""
  tree = dict(tree)
  while int(tree["step"]) < until:
    params, opt_state = train_step(tree["params"], tree["opt_state"], *batch(int(tree["step"])))
    tree.update(params=params, opt_state=opt_state, step=tree["step"] + 1)
    if int(tree["step"]) % EVAL_EVERY == 0:
      tree["early_stopping"], _ = es.step(tree["early_stopping"], val_loss(params), params)
  return tree


@functools.lru_cache(maxsize=None)
def uninterrupted(name: str):
  """The run that is never interrupted: its state after K steps (which a real run would
  save as it goes) and after N."""
  tx, es, train_step, val_loss = build(name)
  at_k = train(fresh_tree(tx, es), K, es, train_step, val_loss)
  return at_k, train(at_k, N, es, train_step, val_loss)


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    assert type(x) is type(y), name
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert np.array_equal(x, y) and x.tobytes() == y.tobytes(), name


# ----------------------------------------------------------------------------------------
# Backends: optcompose's msgpack files, optcompose's Orbax wrappers, and Orbax used directly.


def _orbax_plain_save(path, tree):
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), tree)


def _orbax_plain_restore(path, template):
  import orbax.checkpoint as ocp

  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path), abstract)


BACKENDS = {  # save, restore, and the name of the file or directory
  "msgpack": (save_checkpoint, restore_checkpoint, "ckpt.msgpack"),
  "orbax": (save_orbax_checkpoint, restore_orbax_checkpoint, "ckpt_orbax"),
  "orbax_plain": (_orbax_plain_save, _orbax_plain_restore, "ckpt_orbax_plain"),
}


def backend_functions(backend: str):
  if backend.startswith("orbax"):
    pytest.importorskip("orbax.checkpoint")  # a test extra, not a dependency
  return BACKENDS[backend]


@pytest.mark.parametrize(
  "name,backend",
  [
    ("chain", "msgpack"),
    ("chain", "orbax"),
    ("chain", "orbax_plain"),
    ("inject_hyperparams", "msgpack"),
    ("inject_hyperparams", "orbax"),
    ("multi_steps", "msgpack"),
    ("multi_steps", "orbax"),
  ],
)
def test_resumed_run_is_bitwise_equal_to_uninterrupted(tmp_path, name, backend):
  save, restore, filename = backend_functions(backend)
  path = tmp_path / filename
  at_k, reference = uninterrupted(name)  # process 1, which saves after K steps
  save(path, at_k)

  # Process 2: rebuild from code, restore into a fresh template, continue to N.
  tx, es, train_step, val_loss = build(name)
  template = fresh_tree(tx, es)
  tree = restore(path, template)
  assert int(tree["step"]) == K
  assert int(tree["early_stopping"].epoch) == K // EVAL_EVERY
  resumed = train(tree, N, es, train_step, val_loss)

  assert_bitwise_equal(resumed, reference)
  # Non-trivial: training moved the weights and early stopping kept a best copy.
  assert not np.array_equal(
    reference["params"]["dense1"]["kernel"], template["params"]["dense1"]["kernel"]
  )
  assert int(reference["early_stopping"].best_epoch) >= 0


def test_resuming_with_a_fresh_optimizer_state_is_not_equal(tmp_path):
  """The comparison above can fail: the restored optimizer state matters."""
  tx, es, train_step, val_loss = build("chain")
  at_k, reference = uninterrupted("chain")
  restarted = train({**at_k, "opt_state": tx.init(at_k["params"])}, N, es, train_step, val_loss)
  assert not np.array_equal(
    restarted["params"]["dense1"]["kernel"], reference["params"]["dense1"]["kernel"]
  )


# ----------------------------------------------------------------------------------------
# Mismatched templates.


def _chain_tree(hidden=32, out_dtype=jnp.bfloat16, clip=True):
  params = {
    "dense1": {"kernel": jnp.zeros((8, hidden)), "bias": jnp.zeros(hidden)},
    "dense2": {"kernel": jnp.zeros((hidden, 1), out_dtype), "bias": jnp.zeros(1)},
  }
  adamw = oc.adamw(oc.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40), weight_decay=1e-2)
  tx = oc.chain(oc.clip_by_global_norm(1.0), adamw) if clip else adamw
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros([], jnp.int32)}


MISMATCHES = {
  # A wider hidden layer: the first leaf of `target` that differs is a moment.
  "shape": (
    lambda: _chain_tree(hidden=33),
    "`['opt_state'][1][0].mu['dense1']['bias']` has shape (32,) in the checkpoint "
    "but (33,) in `target`",
  ),
  # The bfloat16 moment is not cast to float32.
  "dtype": (
    lambda: _chain_tree(out_dtype=jnp.float32),
    "`['opt_state'][1][0].mu['dense2']['kernel']` has dtype bfloat16 in the "
    "checkpoint but float32 in `target`",
  ),
  # An int32 count is not cast to int64 either.
  "count dtype": (
    lambda: {**_chain_tree(), "step": np.zeros((), np.int64)},
    "`['step']` has dtype int32 in the checkpoint but int64 in `target`",
  ),
  # The optimizer was rebuilt without its clipping step.
  "missing": (
    lambda: _chain_tree(clip=False),
    "`['opt_state'][0].count` is missing from the checkpoint",
  ),
  "unexpected": (
    lambda: {k: v for k, v in _chain_tree().items() if k != "step"},
    "the checkpoint has `['step']`, which `target` lacks",
  ),
  "leaf against subtree": (
    lambda: {**_chain_tree(), "step": {"epoch": jnp.zeros([], jnp.int32)}},
    "`['step']['epoch']` is inside a leaf of the checkpoint",
  ),
}


@pytest.mark.parametrize("backend", ["msgpack", "orbax"])
def test_mismatched_template_is_refused_naming_the_path(tmp_path, backend):
  save, restore, filename = backend_functions(backend)
  path = tmp_path / filename
  save(path, _chain_tree())
  restore(path, _chain_tree())  # the matching template is accepted
  for case, (make_target, message) in MISMATCHES.items():
    with pytest.raises(CheckpointMismatchError) as info:
      restore(path, make_target())
    assert message in str(info.value), case
    assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------------------
# Exact dtypes, no pickle, atomic files.


def _exact_tree():
  """bfloat16 over a spread of bit patterns (NaNs, infinities, subnormals, -0), int32 at
  its extremes, and a few more dtypes."""
  bf16_bits = np.arange(0, 1 << 16, 251, dtype=np.uint16)
  bf16_bits[:4] = [0x7FC1, 0xFF80, 0x8000, 0x0001]  # a NaN payload, -inf, -0, a subnormal
  return {
    "bf16": jnp.asarray(bf16_bits.view(jnp.bfloat16)),
    "int32": jnp.asarray([-(2**31), -1, 0, 1, 2**31 - 1], jnp.int32),
    "count": jnp.asarray(2**31 - 1, jnp.int32),
    "f16": jnp.asarray([65504.0, -6e-8, 1.0], jnp.float16),
    "flag": jnp.asarray(True),
    "numpy": np.arange(6, dtype=np.uint8).reshape(2, 3),
    "epoch": 7,
  }


@pytest.mark.parametrize("backend", ["msgpack", "orbax"])
def test_bfloat16_and_int32_round_trip_exactly(tmp_path, backend):
  save, restore, filename = backend_functions(backend)
  tree = _exact_tree()
  save(tmp_path / filename, tree)
  template = {
    key: jnp.zeros_like(value)
    for key, value in tree.items()
    if key in ("bf16", "int32", "count", "f16", "flag")
  }
  template.update(numpy=np.zeros((2, 3), np.uint8), epoch=0)
  restored = restore(tmp_path / filename, template)
  for key, value in tree.items():
    got = restored[key]
    assert type(got) is type(value), key
    assert np.asarray(got).dtype == np.asarray(value).dtype, key
    assert np.asarray(got).tobytes() == np.asarray(value).tobytes(), key


@pytest.mark.parametrize("backend", ["msgpack", "orbax"])
def test_no_pickle_is_used(tmp_path, backend, monkeypatch):
  save, restore, filename = backend_functions(backend)
  tree = _chain_tree()

  def refuse(*args, **kwargs):
    raise AssertionError("pickle was used")

  for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  save(tmp_path / filename, tree)
  restored = restore(tmp_path / filename, _chain_tree())
  monkeypatch.undo()
  assert_bitwise_equal(restored, tree)


def test_save_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "ckpt.msgpack"
  first = {"w": jnp.arange(3.0)}
  save_checkpoint(path, first)

  # A failure while writing leaves the previous checkpoint whole, and no temporary file.
  def fail(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    save_checkpoint(path, {"w": jnp.arange(3.0) + 1})
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["ckpt.msgpack"]
  assert_bitwise_equal(restore_checkpoint(path, first), first)

  # A tree that cannot be stored is refused before anything is written.
  with pytest.raises(TypeError, match=r"`\['opt'\]\['fn'\]` is a function"):
    save_checkpoint(path, {"w": jnp.arange(3.0), "opt": {"fn": lambda: 0}})
  assert os.listdir(tmp_path) == ["ckpt.msgpack"]

  # Saving again replaces the file.
  second = {"w": jnp.arange(3.0) * 2}
  save_checkpoint(path, second)
  assert_bitwise_equal(restore_checkpoint(path, first), second)
  # Without a template: the raw state dict, for looking inside a file.
  raw = restore_checkpoint(path, None)
  assert list(raw) == ["w"] and isinstance(raw["w"], np.ndarray)


def test_not_a_checkpoint_file(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_bytes(b"\xc1 this is not msgpack")
  with pytest.raises(ValueError, match="is not a msgpack checkpoint"):
    restore_checkpoint(path, {"w": jnp.zeros(3)})


# ----------------------------------------------------------------------------------------
# Templates: abstract, sharded, Flax TrainState, FlatParams.


@pytest.mark.parametrize("backend", ["msgpack", "orbax"])
def test_abstract_template_costs_no_memory(tmp_path, backend):
  save, restore, filename = backend_functions(backend)
  tree = _chain_tree()
  tree["params"] = jax.tree.map(lambda x: x + 1, tree["params"])
  save(tmp_path / filename, tree)
  restored = restore(tmp_path / filename, jax.eval_shape(_chain_tree))
  assert_bitwise_equal(restored, tree)


@pytest.mark.parametrize("backend", ["msgpack", "orbax"])
def test_restored_arrays_take_the_template_sharding(tmp_path, backend):
  if len(jax.devices()) < 2:
    pytest.skip("needs two devices")
  save, restore, filename = backend_functions(backend)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  tree = {"w": jax.device_put(jnp.arange(8.0), split), "count": jnp.asarray(3, jnp.int32)}
  save(tmp_path / filename, tree)
  template = {
    "w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=split),
    "count": jax.ShapeDtypeStruct((), jnp.int32),
  }
  restored = restore(tmp_path / filename, template)
  assert restored["w"].sharding == split
  assert_bitwise_equal(restored, tree)


@pytest.mark.parametrize("backend", ["msgpack", "orbax"])
def test_flax_train_state(tmp_path, backend):
  from flax.training import train_state

  save, restore, filename = backend_functions(backend)

  def create():
    tx = oc.chain(oc.clip_by_global_norm(1.0), oc.adamw(1e-2, weight_decay=1e-2))
    return train_state.TrainState.create(apply_fn=None, params=init_params(), tx=tx)

  state = create()
  step = jax.jit(
    lambda s, x, y: s.apply_gradients(
      grads=jax.tree.map(
        lambda g, p: g.astype(p.dtype), jax.grad(loss_fn)(s.params, x, y), s.params
      )
    )
  )
  for t in range(3):
    state = step(state, *batch(t))
  save(tmp_path / filename, state)
  restored = restore(tmp_path / filename, create())
  assert int(restored.step) == 3
  assert_bitwise_equal((restored.params, restored.opt_state), (state.params, state.opt_state))


@pytest.mark.parametrize("backend", ["msgpack", "orbax"])
def test_flat_params(tmp_path, backend):
  save, restore, filename = backend_functions(backend)
  tx = oc.adam(1e-2)
  flat = oc.flat_params(init_params())
  tree = {"params": flat, "opt_state": tx.init(flat)}
  tree = jax.tree.map(lambda x: x + jnp.ones_like(x), tree)
  save(tmp_path / filename, tree)
  template = {"params": oc.flat_params(init_params()), "opt_state": tx.init(flat)}
  restored = restore(tmp_path / filename, template)
  assert isinstance(restored["params"], oc.FlatParams)
  assert_bitwise_equal(restored, tree)


def test_flax_nnx_optimizer(tmp_path):
  """nnx.State is saved as its pure dict and written back into a rebuilt optimizer."""
  from flax import nnx

  def build_nnx():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = oc.chain(
      oc.clip_by_global_norm(1.0), oc.adamw(oc.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40))
    )
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, optimizer = build_nnx()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  for _ in range(3):
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))
  with pytest.raises(TypeError, match=r"nnx.to_pure_dict"):
    save_checkpoint(tmp_path / "raw.msgpack", nnx.state(optimizer))
  save_checkpoint(tmp_path / "ckpt.msgpack", nnx.to_pure_dict(nnx.state((model, optimizer))))

  model2, optimizer2 = build_nnx()
  state = nnx.state((model2, optimizer2))
  nnx.replace_by_pure_dict(
    state, restore_checkpoint(tmp_path / "ckpt.msgpack", nnx.to_pure_dict(state))
  )
  nnx.update((model2, optimizer2), state)
  assert int(optimizer2.step[...]) == 3
  assert_bitwise_equal(
    jax.tree.leaves(nnx.state((model2, optimizer2))), jax.tree.leaves(nnx.state((model, optimizer)))
  )


@pytest.mark.parametrize("saved, restored", [("adamw", "adam"), ("adam", "adamw")])
def test_another_optimizer_s_state_differing_only_by_an_empty_state_is_named(
  tmp_path, saved, restored
):
  """AdamW's state is Adam's plus an ``EmptyState`` (no leaf): no leaf differs, and the
  message names the container entry on one side only, as the leaf mismatches are named (not
  in Flax's words: "The size of the list and the state dict do not match")."""
  params = {"w": jnp.ones(3)}
  make = {"adam": oc.adam(1e-3), "adamw": oc.adamw(1e-3)}
  save_checkpoint(tmp_path / "c.msgpack", {"opt_state": make[saved].init(params)})
  side = "the checkpoint" if saved == "adamw" else "`target`"
  with pytest.raises(
    CheckpointMismatchError,
    match=rf"does not match `target`: `\['opt_state'\]\[2\]` is only in {side}",
  ):
    restore_checkpoint(tmp_path / "c.msgpack", {"opt_state": make[restored].init(params)})


def test_a_save_interrupted_by_a_handler_saving_to_the_same_place_raises_instead_of_hanging(
  tmp_path,
):
  """A SIGTERM handler that saves once more, arriving while a periodic save to the same
  directory holds its lock in the same thread, waited for itself forever (flock is per open
  file); it now raises at once, and the interrupted save's lock is released by its own
  cleanup. Another thread holding the lock is still waited for."""
  import signal
  import threading

  from optcompose._checkpoint_guard import _locked

  tree = {"w": jnp.arange(3.0)}
  save_checkpoint(tmp_path / "c.msgpack", tree)
  fired = []

  def on_term(signum, frame):
    fired.append(signum)
    save_checkpoint(tmp_path / "final.msgpack", tree)

  previous = signal.signal(signal.SIGTERM, on_term)
  try:
    with pytest.raises(RuntimeError, match="would wait for it forever"):
      with _locked(tmp_path):  # a save under way in this thread
        os.kill(os.getpid(), signal.SIGTERM)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert fired and not (tmp_path / "final.msgpack").exists()
  save_checkpoint(tmp_path / "final.msgpack", tree)  # the lock is free again
  assert np.array_equal(restore_checkpoint(tmp_path / "c.msgpack", tree)["w"], tree["w"])

  held, done = threading.Event(), []

  def other():
    with _locked(tmp_path):
      held.set()
      threading.Event().wait(0.2)

  worker = threading.Thread(target=other)
  worker.start()
  held.wait()
  save_checkpoint(tmp_path / "c.msgpack", tree)  # waits for the other thread, then saves
  done.append(True)
  worker.join()
  assert done


def test_a_python_step_saved_at_step_0_restores_into_an_array_template(tmp_path):
  """Flax's ``TrainState.create`` leaves ``step`` a Python int, so a checkpoint saved at step
  0 holds ``0``; the template of a resume (``jax.eval_shape`` or a trained state) holds an
  int32 array. Refused as a mismatch before, and the Orbax path called the checkpoint
  damaged (its checksum was compared after the conversion); a number of another kind is
  still refused."""
  tree = {"step": 0, "lr": 0.5, "w": jnp.arange(3.0)}
  template = {"step": jnp.zeros([], jnp.int32), "lr": jnp.zeros([], jnp.float32), "w": jnp.zeros(3)}
  abstract = jax.eval_shape(lambda: template)
  save_checkpoint(tmp_path / "c.msgpack", tree)
  save_orbax_checkpoint(tmp_path / "orbax", tree)
  for restored in (
    restore_checkpoint(tmp_path / "c.msgpack", template),
    restore_orbax_checkpoint(tmp_path / "orbax", template),
    restore_orbax_checkpoint(tmp_path / "orbax", abstract),
  ):
    assert restored["step"].dtype == jnp.int32 and int(restored["step"]) == 0
    assert restored["lr"].dtype == jnp.float32 and float(restored["lr"]) == 0.5
    np.testing.assert_array_equal(restored["w"], tree["w"])
  wrong = {**template, "step": jnp.zeros([], jnp.float32)}
  for restore, where in ((restore_checkpoint, "c.msgpack"), (restore_orbax_checkpoint, "orbax")):
    with pytest.raises(CheckpointMismatchError, match=r"`\['step'\]` is a Python int"):
      restore(tmp_path / where, wrong)


def test_wide_numpy_scalars_come_back_exactly(tmp_path):
  """A 0-d int64 or float64 (a token count from ``np.sum``, a loss from ``np.mean``) saved
  for a Python-number template came back through a jax.Array, narrowed to int32 / float32
  without x64 (5e9 as 705032704): it comes back as the exact Python number. A template of
  NumPy's own scalar (``np.float64(0.0)``, a subclass of Python's float) was refused as
  "a Python float64": it takes the saved scalar. Through msgpack and Orbax alike."""
  # 0-d arrays: the oldest supported Orbax stores no NumPy scalar (np.int64) itself.
  loss = np.asarray(np.mean(np.array([0.1234567890123] * 2)))
  tree = {"tokens": np.asarray(5_000_000_000, np.int64), "loss": loss}
  save_checkpoint(tmp_path / "c.msgpack", tree)
  save_orbax_checkpoint(tmp_path / "orbax", tree)
  for restore, where in ((restore_checkpoint, "c.msgpack"), (restore_orbax_checkpoint, "orbax")):
    restored = restore(tmp_path / where, {"tokens": 0, "loss": 0.0})
    assert restored["tokens"] == 5_000_000_000 and type(restored["tokens"]) is int
    assert restored["loss"] == tree["loss"] and type(restored["loss"]) is float
    restored = restore(tmp_path / where, {"tokens": np.int64(0), "loss": np.float64(0.0)})
    assert restored["tokens"] == tree["tokens"] and restored["tokens"].dtype == np.int64
    assert restored["loss"] == tree["loss"] and restored["loss"].dtype == np.float64


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_a_python_float_is_rounded_to_a_narrow_float_template(tmp_path, dtype):
  if dtype == jnp.float16 and "xla_cpu_max_isa=SSE" in os.environ.get("XLA_FLAGS", ""):
    pytest.skip("XLA CPU cannot compile float16 arithmetic without F16C")
  # bfloat16 is of NumPy kind "V": a saved Python float was refused for it ("a Python float
  # in the checkpoint but an array of shape () and dtype bfloat16"), not for float16.
  save_checkpoint(tmp_path / "c.msgpack", {"lr": 0.1})
  save_orbax_checkpoint(tmp_path / "orbax", {"lr": 0.1})
  for restore, where in ((restore_checkpoint, "c.msgpack"), (restore_orbax_checkpoint, "orbax")):
    restored = restore(tmp_path / where, {"lr": jnp.zeros([], dtype)})["lr"]
    assert restored.dtype == dtype and restored == jnp.asarray(0.1, dtype), where
  big = {jnp.float16: 1e5, jnp.bfloat16: 1e39, jnp.float32: 1e39}[dtype]  # overflows it
  save_checkpoint(tmp_path / "big.msgpack", {"lr": big})
  save_orbax_checkpoint(tmp_path / "big", {"lr": big})
  for restore, where in ((restore_checkpoint, "big.msgpack"), (restore_orbax_checkpoint, "big")):
    with pytest.raises(CheckpointMismatchError, match="would become inf"):
      restore(tmp_path / where, {"lr": jnp.zeros([], dtype)})


# ----------------------------------------------------------------------------------------
# FlatParams restored from a checkpoint that records no layout.


def flat_state(names=("enc", "dec")):
  """Adam's state over FlatParams after one step: ``enc``'s first moment is 1, ``dec``'s 2."""
  tx = oc.flat_optimizer(oc.adam(1e-2))
  params = {name: jnp.ones((4, 4)) for name in names}
  grads = {name: jnp.full((4, 4), 10.0 * (i + 1)) for i, name in enumerate(names)}
  return tx, tx.update(grads, tx.init(params), params)[1]


NO_LAYOUT = r"records no layout for the FlatParams at `\[0\]\.mu` of `target`.*flat_layouts"


def test_a_flat_state_without_a_recorded_layout_is_refused_unless_layouts_is_given(tmp_path):
  """Plain Orbax (and the previous msgpack format) saves a FlatParams as its buffers only:
  restored into a model whose leaf ``enc`` was renamed ``a_enc`` (it now sorts first, same
  sizes), ``dec``'s moments landed in ``a_enc``'s slots. Without a layout the restore is a
  ValueError naming the FlatParams; ``layouts=`` (the saved tree's flat_layouts) is compared
  as optcompose's own record is."""
  ocp = pytest.importorskip("orbax.checkpoint")
  from flax import serialization
  from optcompose.checkpoint import flat_layouts

  tx, state = flat_state()
  renamed = tx.init({"a_enc": jnp.ones((4, 4)), "dec": jnp.ones((4, 4))})
  same = tx.init({"enc": jnp.zeros((4, 4)), "dec": jnp.zeros((4, 4))})
  with ocp.StandardCheckpointer() as plain:  # no optcompose_checkpoint.json
    plain.save(tmp_path / "plain", state)
    plain.wait_until_finished()
  bare = tmp_path / "bare.msgpack"  # the previous msgpack format: the bare state dict
  save_checkpoint(tmp_path / "new.msgpack", state)
  bare.write_bytes(
    serialization.msgpack_serialize(restore_checkpoint(tmp_path / "new.msgpack", None))
  )
  for restore, where in ((restore_orbax_checkpoint, "plain"), (restore_checkpoint, "bare.msgpack")):
    for template in (renamed, same):
      with pytest.raises(ValueError, match=NO_LAYOUT) as info:
        restore(tmp_path / where, template)
      assert not isinstance(info.value, CheckpointMismatchError)  # unknown, not a mismatch
    with pytest.raises(
      CheckpointMismatchError,
      match=r"`\[0\]\.mu` has another layout: its leaf 0 is `\['dec'\]` of shape \(4, 4\) at "
      r"offset 0 of bucket 'float32' in `layouts` but `\['a_enc'\]`",
    ):
      restore(tmp_path / where, renamed, layouts=flat_layouts(state))
    restored = restore(tmp_path / where, same, layouts=flat_layouts(state))
    assert float(restored[0].mu.unflatten()["enc"][0, 0]) == pytest.approx(1.0)  # (1 - b1) * 10
    assert float(restored[0].mu.unflatten()["dec"][0, 0]) == pytest.approx(2.0)
    # The user's word that nothing changed: the layout of the template itself.
    assert_bitwise_equal(restore(tmp_path / where, same, layouts=flat_layouts(same)), state)


def test_a_recorded_layout_missing_at_the_flat_params_path_or_a_bad_layouts_is_named(tmp_path):
  """A checkpoint of ours that holds plain buckets where ``target`` has a FlatParams records
  no layout there; a ``layouts`` that is not flat_layouts' record, or lacks the FlatParams'
  path, is a ValueError naming the argument."""
  from optcompose.checkpoint import check_against_template, flat_layouts

  tx, state = flat_state()
  buckets = (state[0]._replace(mu={"float32": state[0].mu.buffers[0]}),) + state[1:]
  save_checkpoint(tmp_path / "c.msgpack", buckets)  # the same leaf paths, no FlatParams
  with pytest.raises(ValueError, match=r"the checkpoint .*c\.msgpack " + NO_LAYOUT):
    restore_checkpoint(tmp_path / "c.msgpack", state)
  restored = restore_checkpoint(tmp_path / "c.msgpack", state, layouts=flat_layouts(state))
  assert_bitwise_equal(restored, state)
  with pytest.raises(
    ValueError,
    match=r"`layouts` records no layout for the FlatParams at `\[0\]\.mu` of `target` "
    r"\(it records `\[0\]\.nu`\), nor does the checkpoint",
  ):  # the file records nu's layout, `layouts` only nu's: mu's is in neither
    restore_checkpoint(tmp_path / "c.msgpack", state, layouts=flat_layouts(state)[1:])
  for bad, why in (
    ({"mu": 1}, "expected a list"),
    ([[["0", "mu"], [["['enc']", [4, 4], "float32"]]]], r"the layout of `\[0\]\['mu'\]` is"),
  ):
    with pytest.raises(
      ValueError, match=rf"check_against_template: `layouts` is not a layouts record .*{why}"
    ):
      check_against_template(state, state, layouts=bad)
  check_against_template(state, state, layouts=flat_layouts(state))
  with pytest.raises(ValueError, match=r"check_against_template: the checkpoint records no"):
    check_against_template(state, state)


@pytest.mark.parametrize("backend", ["msgpack", "orbax"])
def test_a_path_is_written_one_way_whichever_side_it_is_on(tmp_path, backend):
  """A path of the checkpoint that `target` lacks was written as a state dict's keys
  (``['opt'][0]['mu']['b']``) beside `target`'s own (``['opt'][0].mu['w']``): it is written
  as `target`'s paths are, as far as `target` has it; so is a leaf a save cannot store."""
  save, restore, filename = backend_functions(backend)
  adam = oc.adam(1e-3)
  save(tmp_path / filename, {"opt": adam.init({"b": jnp.ones(2), "w": jnp.ones(2)})})
  with pytest.raises(
    CheckpointMismatchError, match=r"the checkpoint has `\['opt'\]\[0\]\.mu\['b'\]`, which"
  ):
    restore(tmp_path / filename, {"opt": adam.init({"w": jnp.ones(2)})})
  state = adam.init({"w": jnp.ones(2)})
  unstorable = (state[0]._replace(mu={"w": {1, 2}}),) + state[1:]
  with pytest.raises(TypeError, match=r"save_checkpoint: `\['opt'\]\[0\]\.mu\['w'\]` is a set"):
    save_checkpoint(tmp_path / "other.msgpack", {"opt": unstorable})


def test_a_checkpoint_saved_under_x64_names_the_setting_when_restored_without(tmp_path):
  from numerics import x64

  path = tmp_path / "c.msgpack"
  with x64():
    es = early_stopping(patience=2)  # its best metric follows x64: float64 here
    save_checkpoint(path, {"es": es.init(), "w": jnp.zeros(2, jnp.float64)})
  with pytest.raises(CheckpointMismatchError, match=r"float64 in the checkpoint.*jax_enable_x64"):
    restore_checkpoint(path, {"es": early_stopping(patience=2).init(), "w": jnp.zeros(2)})


def test_reading_part_of_a_checkpoint_as_the_guide_shows(tmp_path):
  # Fine-tuning: a template of the weights alone, for a run that saved its optimizer state
  # too, was told to convert an Optax state. It is now pointed to the guide's recipe, which
  # reads the backbone into a model with a new head and refuses a part of another shape.
  import flax.serialization

  from optcompose.checkpoint import check_against_template

  params = {"backbone": {"w": jnp.arange(9.0).reshape(3, 3)}, "head": {"w": jnp.ones((3, 4))}}
  path = tmp_path / "run.msgpack"
  save_checkpoint(path, {"params": params, "opt_state": oc.adamw(1e-3).init(params)})
  with pytest.raises(CheckpointMismatchError, match="Reading part of a checkpoint") as e:
    restore_checkpoint(path, {"params": params})
  assert "from_optax_state" not in str(e.value)
  new = {"backbone": {"w": jnp.zeros((3, 3))}, "head": {"w": jnp.zeros((3, 7))}}
  raw = restore_checkpoint(path, None)
  check_against_template(raw["params"]["backbone"], new["backbone"])
  backbone = flax.serialization.from_state_dict(new["backbone"], raw["params"]["backbone"])
  np.testing.assert_array_equal(backbone["w"], params["backbone"]["w"])
  with pytest.raises(CheckpointMismatchError, match=r"\(3, 4\) in the checkpoint but \(3, 7\)"):
    check_against_template(raw["params"]["head"], new["head"])
  # A template with more than the checkpoint holds still gets the Optax hint.
  with pytest.raises(CheckpointMismatchError, match="from_optax_state"):
    restore_checkpoint(path, {"params": params, "opt_state": oc.adamw(1e-3).init(params), "x": 1})


def test_a_flat_state_saved_with_another_pad_to_is_named_as_such(tmp_path):
  # A resume on another device count (pad_to=8 -> 3) said only that the shapes differ.
  params = {"w": jnp.ones((7, 9)), "b": jnp.zeros(10)}
  state = oc.flat_optimizer(oc.adamw(1e-3), pad_to=8).init(params)
  template = oc.flat_optimizer(oc.adamw(1e-3), pad_to=3).init(params)
  save_checkpoint(tmp_path / "c.msgpack", state)
  save_orbax_checkpoint(tmp_path / "orbax", state)
  for restore, where in ((restore_checkpoint, "c.msgpack"), (restore_orbax_checkpoint, "orbax")):
    with pytest.raises(CheckpointMismatchError, match=r"\(80,\).*\(75,\).*pad it to `pad_to`"):
      restore(tmp_path / where, template)
