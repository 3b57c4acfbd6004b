"""Checkpoints at scale: a URL (gs://, s3://) reaches Orbax as the etils.epath path it names,
without the local lock and swap; local etils.epath paths work as local ones; a save that
finishes in the background lets training go on (the saved arrays may be donated at once) and
never loses the previous checkpoint; Orbax's CheckpointManager keeps the last N and the best
by the early-stopping metric, and restores behind optcompose's template check."""

from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc
from optcompose import checkpoint as ck
from optcompose.checkpoint import CheckpointMismatchError
from optcompose.recipe.early_stopping import early_stopping

ocp = pytest.importorskip("orbax.checkpoint")
epath = pytest.importorskip("etils.epath")


def run_tree(version: int) -> dict:
  """A small training state whose every value depends on ``version``."""
  params = {
    "w": jnp.arange(12.0).reshape(3, 4) + version,
    "b": jnp.full(4, -version, jnp.float32),
    "h": (jnp.arange(6.0) * version).astype(jnp.bfloat16),
  }
  tx = oc.adamw(1e-2, weight_decay=1e-3)
  return {"params": params, "opt_state": tx.init(params), "step": jnp.asarray(version, jnp.int32)}


def on_host(tree):
  """Copies in host memory (they outlive the device arrays)."""
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_same(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected)
  ):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)


# ----------------------------------------------------------------------------------------
# URLs and etils.epath paths.


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """gs:// and s3:// on the local disk: a URL "gs://bucket/run" is the directory
  tmp_path/remote/gs/bucket/run for etils.epath (its test backend, with every URL mapped so)
  and for Orbax's checkpointer (given that directory). Yields the list of (method, path) that
  Orbax's checkpointer was called with, and the URL -> local directory map."""
  from etils.epath import testing as epath_testing

  calls = []

  def local(url):
    scheme, rest = os.fspath(url).split("://", 1)
    return tmp_path / "remote" / scheme / rest

  def mapped(original, path, *args, **kwargs):
    if isinstance(kwargs.get("dst"), str) and "://" in kwargs["dst"]:
      kwargs["dst"] = os.fspath(local(kwargs["dst"]))
    args = [os.fspath(local(a)) if isinstance(a, str) and "://" in a else a for a in args]
    return original(os.fspath(local(path)) if "://" in os.fspath(path) else path, *args, **kwargs)

  def recording(name, original):
    def method(self, directory, *args, **kwargs):
      calls.append((name, directory))
      return original(self, local(directory), *args, **kwargs)

    return method

  for name in ("save", "restore", "metadata"):
    monkeypatch.setattr(
      ocp.StandardCheckpointer, name, recording(name, getattr(ocp.StandardCheckpointer, name))
    )
  for name in ("_locked", "_install", "_recover", "_remove_leftovers", "_finish"):
    monkeypatch.setattr(
      ck,
      name,
      lambda *a, _name=name, **k: pytest.fail(f"the local file handling ({_name}) ran for a URL"),
    )
  functions = (
    "copy",
    "exists",
    "glob",
    "isdir",
    "listdir",
    "makedirs",
    "mkdir",
    "open",
    "remove",
    "rename",
    "replace",
    "rmtree",
    "stat",
    "walk",
  )
  with epath_testing.mock_epath(**{f: mapped for f in functions}):
    yield calls, local


@pytest.mark.parametrize("url", ["gs://bucket/runs/ckpt", "s3://bucket/ckpt"])
@pytest.mark.parametrize("as_epath", [False, True])
def test_a_url_reaches_orbax_as_the_epath_it_names(fake_bucket, url, as_epath):
  calls, local = fake_bucket
  given = epath.Path(url) if as_epath else url
  written = ck.save_orbax_checkpoint(given, run_tree(1))
  assert isinstance(written, epath.Path) and os.fspath(written) == url
  assert [name for name, _ in calls] == ["save"]
  for _, directory in calls:  # not made absolute (/cwd/gs:/bucket/...)
    assert isinstance(directory, epath.Path) and os.fspath(directory) == url, directory
  assert (local(url) / "optcompose_checkpoint.json").exists()  # the checksums, via epath
  assert_same(ck.restore_orbax_checkpoint(given, run_tree(0)), run_tree(1))
  assert {name for name, _ in calls} == {"save", "metadata", "restore"}
  assert all(os.fspath(d) == url and isinstance(d, epath.Path) for _, d in calls)

  with pytest.raises(ValueError, match="already exists: pass overwrite=True"):
    ck.save_orbax_checkpoint(given, run_tree(2))
  ck.save_orbax_checkpoint(given, run_tree(2), overwrite=True)  # Orbax's force=True
  assert_same(ck.restore_orbax_checkpoint(given, run_tree(0)), run_tree(2))
  with pytest.raises(
    CheckpointMismatchError, match=rf"checkpoint {url} does not match.*has `\['step'\]`, which"
  ):
    ck.restore_orbax_checkpoint(given, {k: v for k, v in run_tree(0).items() if k != "step"})


def test_a_local_epath_path_is_a_local_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for given, where in (
    (epath.Path(tmp_path) / "a", tmp_path / "a"),
    (epath.Path("b"), tmp_path / "b"),
  ):  # relative: made absolute
    assert ck.save_orbax_checkpoint(given, run_tree(3)) == where
    assert_same(ck.restore_orbax_checkpoint(given, run_tree(0)), run_tree(3))
  assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_bad_directories_and_flags_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"`directory` 'hdfs://host/ckpt'.*scheme"):
    ck.save_orbax_checkpoint("hdfs://host/ckpt", run_tree(1))
  with pytest.raises(ValueError, match=r"`directory` 'ftp://host/ckpt'.*scheme"):
    ck.restore_orbax_checkpoint("ftp://host/ckpt", run_tree(1))
  with pytest.raises(TypeError, match="`directory` must be a path"):
    ck.save_orbax_checkpoint(3, run_tree(1))
  with pytest.raises(TypeError, match="`block` must be a bool"):
    ck.save_orbax_checkpoint(tmp_path / "c", run_tree(1), block="no")
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------
# Saves that finish in the background.


def test_training_goes_on_while_an_async_save_finishes(tmp_path):
  tree = run_tree(1)
  at_save = on_host(tree)
  tx = oc.adamw(1e-2, weight_decay=1e-3)

  def update(params, state):  # donates the saved arrays: their buffers are reused
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    updates, state = tx.update(grads, state, params)
    return oc.apply_updates(params, updates), state

  update = jax.jit(update, donate_argnums=(0, 1))
  save = ck.save_orbax_checkpoint(tmp_path / "ckpt", tree, block=False)
  assert isinstance(save, ck.AsyncSave)
  params, state = update(tree["params"], tree["opt_state"])
  for _ in range(3):
    params, state = update(params, state)
  for leaf in jax.tree.leaves(tree):
    if not leaf.is_deleted():
      leaf.delete()  # nothing of the saved tree is left on the device
  assert save.wait() == tmp_path / "ckpt" and save.done()
  assert save.wait_until_finished() == tmp_path / "ckpt"  # Orbax's name; waiting again is free
  assert_same(ck.restore_orbax_checkpoint(tmp_path / "ckpt", run_tree(0)), at_save)
  assert not np.array_equal(np.asarray(params["w"]), at_save["params"]["w"])  # it trained on


def test_an_async_save_keeps_the_previous_checkpoint_until_the_new_one_is_complete(
  tmp_path, monkeypatch
):
  path = tmp_path / "ckpt"
  ck.save_orbax_checkpoint(path, run_tree(1))
  complete, go_on = threading.Event(), threading.Event()
  install = ck._install

  def held_install(new, directory):  # the new checkpoint is complete: hold the swap
    complete.set()
    assert go_on.wait(120)
    install(new, directory)

  monkeypatch.setattr(ck, "_install", held_install)
  save = ck.save_orbax_checkpoint(path, run_tree(2), overwrite=True, block=False)
  assert complete.wait(120)
  assert not save.done()
  with ocp.StandardCheckpointer() as plain:  # plain Orbax: ours waits for the save's lock
    assert_same(plain.restore(path, run_tree(0)), run_tree(1))
  go_on.set()
  assert save.wait() == path
  assert_same(ck.restore_orbax_checkpoint(path, run_tree(0)), run_tree(2))
  assert os.listdir(tmp_path) == ["ckpt"]


def test_an_async_save_that_fails_raises_in_wait_and_leaves_the_old_one(tmp_path, monkeypatch):
  path = tmp_path / "ckpt"
  ck.save_orbax_checkpoint(path, run_tree(1))

  def full_disk(new, directory):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ck, "_install", full_disk)
  save = ck.save_orbax_checkpoint(path, run_tree(2), overwrite=True, block=False)
  for _ in range(2):  # the error is the save's, every time it is asked
    with pytest.raises(OSError, match="No space left"):
      save.wait()
  assert os.listdir(tmp_path) == ["ckpt"]  # the unfinished new one is removed
  assert_same(ck.restore_orbax_checkpoint(path, run_tree(0)), run_tree(1))


# ----------------------------------------------------------------------------------------
# Orbax's CheckpointManager: the last N, the best by the early-stopping metric.

TARGET, VALIDATION = 1.0, 0.45  # training pulls w toward 1; validation prefers 0.45


def manager_run(directory, keep: int, epochs: int):
  """Train w from 0 toward TARGET with AdamW, one validation loss per epoch, saving every
  epoch to two managers: "latest" keeps the last ``keep``, "best" the best by validation
  loss, as early stopping ranks it (Orbax's ``best_mode`` is the configuration's ``mode``).
  Returns the managers' options, the validation losses, the saved steps and the last tree."""
  tx = oc.adamw(0.05, weight_decay=1e-4)
  es = early_stopping(mode="min", patience=epochs)  # records the best, never stops here
  train_loss = lambda p: jnp.sum((p["w"] - TARGET) ** 2)  # noqa: E731
  val_loss = jax.jit(lambda p: jnp.sum((p["w"] - VALIDATION) ** 2))

  @jax.jit
  def train_step(params, state):
    updates, state = tx.update(jax.grad(train_loss)(params), state, params)
    return oc.apply_updates(params, updates), state

  params = {"w": jnp.zeros(3)}
  tree = {"params": params, "opt_state": tx.init(params), "early_stopping": es.init(params)}
  options = {
    "latest": ocp.CheckpointManagerOptions(max_to_keep=keep),
    "best": ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: m["val_loss"], best_mode=es.mode
    ),
  }
  managers = {k: ocp.CheckpointManager(directory / k, options=o) for k, o in options.items()}
  losses, steps = [], []
  for epoch in range(epochs):
    params, state = tree["params"], tree["opt_state"]
    for _ in range(4):
      params, state = train_step(params, state)
    loss = val_loss(params)
    stopping, _ = es.step(tree["early_stopping"], loss, params)
    tree = {"params": params, "opt_state": state, "early_stopping": stopping}
    step = 4 * (epoch + 1)
    managers["latest"].save(step, args=ocp.args.StandardSave(tree))
    managers["best"].save(step, args=ocp.args.StandardSave(tree), metrics={"val_loss": float(loss)})
    losses.append(float(loss))
    steps.append(step)
  for manager in managers.values():
    manager.wait_until_finished()
    manager.close()
  return options, losses, steps, tree


def test_checkpoint_manager_keeps_the_last_n_and_the_best_and_restores_checked(tmp_path):
  options, losses, steps, last = manager_run(tmp_path, keep=3, epochs=8)
  best_epoch = int(np.argmin(losses))
  assert 0 < best_epoch < len(steps) - 3  # validation got worse: the best is not kept as last
  assert int(last["early_stopping"].best_epoch) == best_epoch

  # A new process: new managers over the same directories, a template that costs no memory.
  template = jax.eval_shape(lambda: last)
  latest = ocp.CheckpointManager(
    tmp_path / "latest", options=options["latest"], item_handlers=ocp.StandardCheckpointHandler()
  )
  best = ocp.CheckpointManager(
    tmp_path / "best", options=options["best"], item_handlers=ocp.StandardCheckpointHandler()
  )
  assert list(latest.all_steps()) == steps[-3:]
  assert list(best.all_steps()) == [steps[best_epoch]] and best.best_step() == steps[best_epoch]

  for manager, step in ((latest, latest.latest_step()), (best, best.best_step())):
    ck.check_against_template(manager.item_metadata(step), template)
  restored = best.restore(best.best_step(), args=ocp.args.StandardRestore(template))
  ck.check_against_template(restored, template)  # a restored tree as well
  assert_same(restored["params"], last["early_stopping"].best_params)  # early stopping's copy
  assert_same(latest.restore(latest.latest_step(), args=ocp.args.StandardRestore(template)), last)

  # Another dtype or shape, a missing leaf: named, where Orbax alone would cast or fail late.
  step = best.best_step()
  as_bf16 = {**template, "params": {"w": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}}
  with pytest.raises(
    CheckpointMismatchError,
    match=r"check_against_template: the checkpoint best does not match `target`:"
    r" `\['params'\]\['w'\]` has dtype float32 in the checkpoint but "
    r"bfloat16",
  ):
    ck.check_against_template(best.item_metadata(step), as_bf16, where="best")
  cast = best.restore(step, args=ocp.args.StandardRestore(as_bf16))
  assert cast["params"]["w"].dtype == jnp.bfloat16  # what the check is for: Orbax casts
  wider = {**template, "params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  with pytest.raises(CheckpointMismatchError, match=r"`\['params'\]\['w'\]` has shape \(3,\)"):
    ck.check_against_template(best.item_metadata(step), wider)
  fewer = {k: v for k, v in template.items() if k != "early_stopping"}
  with pytest.raises(CheckpointMismatchError, match=r"has `\['early_stopping'\]"):
    ck.check_against_template(best.item_metadata(step), fewer)
  with pytest.raises(ValueError, match="`checkpoint` is None.*item_handlers"):
    ck.check_against_template(None, template)
  latest.close()
  best.close()


def test_a_checkpoint_manager_restores_flat_params_only_with_their_layouts(tmp_path):
  """docs/guides/checkpoints-at-scale.md's FlatParams recipe: Orbax's metadata holds a
  FlatParams' buffers only, so a model whose leaf ``enc`` was renamed ``a_enc`` (now first,
  same sizes) restored ``dec``'s moments into ``a_enc``'s slots after a check that passed.
  Without a layouts record the check is a ValueError naming the FlatParams; with the record
  saved beside the state (a JSON item) a renamed leaf is a mismatch and the same model
  restores its own values."""
  tx = oc.flat_optimizer(oc.adam(1e-2))
  params = {"enc": jnp.ones((4, 4)), "dec": jnp.ones((4, 4))}
  grads = {"enc": jnp.full((4, 4), 10.0), "dec": jnp.full((4, 4), 20.0)}
  state = tx.update(grads, tx.init(params), params)[1]
  renamed = jax.eval_shape(tx.init, {"a_enc": params["enc"], "dec": params["dec"]})
  template = jax.eval_shape(tx.init, params)

  plain = ocp.CheckpointManager(tmp_path / "plain")  # as the user trial saved it
  plain.save(1, args=ocp.args.StandardSave(state))
  plain.wait_until_finished()
  plain.close()
  plain = ocp.CheckpointManager(tmp_path / "plain", item_handlers=ocp.StandardCheckpointHandler())
  for wanted in (renamed, template):
    with pytest.raises(
      ValueError,
      match=r"check_against_template: the checkpoint plain/1 records no layout for the "
      r"FlatParams at `\[0\]\.mu` of `target`.*pass layouts=flat_layouts\(target\)",
    ):
      ck.check_against_template(plain.item_metadata(1), wanted, where="plain/1")
  wrong = plain.restore(1, args=ocp.args.StandardRestore(renamed))  # what the check prevents
  assert float(wrong[0].mu.unflatten()["a_enc"][0, 0]) == pytest.approx(2.0)  # dec's moment
  ck.check_against_template(plain.item_metadata(1), template, layouts=ck.flat_layouts(template))
  plain.close()

  manager = ocp.CheckpointManager(tmp_path / "run")
  saved = ocp.args.Composite(
    state=ocp.args.StandardSave(state), layouts=ocp.args.JsonSave(ck.flat_layouts(state))
  )
  manager.save(1, args=saved)
  manager.wait_until_finished()
  manager.close()
  handlers = {"state": ocp.StandardCheckpointHandler(), "layouts": ocp.JsonCheckpointHandler()}
  manager = ocp.CheckpointManager(tmp_path / "run", item_handlers=handlers)
  layouts = manager.restore(1, args=ocp.args.Composite(layouts=ocp.args.JsonRestore()))["layouts"]
  assert layouts == ck.flat_layouts(state)  # JSON: read back as written
  metadata = manager.item_metadata(1)["state"]
  ck.check_against_template(metadata, template, layouts=layouts)
  restored = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(template)))
  assert_same(restored["state"], state)
  assert float(restored["state"][0].mu.unflatten()["enc"][0, 0]) == pytest.approx(1.0)
  with pytest.raises(
    CheckpointMismatchError,
    match=r"the FlatParams at `\[0\]\.mu` has another layout: its leaf 0 is `\['dec'\]` of "
    r"shape \(4, 4\) at offset 0 of bucket 'float32' in `layouts` but `\['a_enc'\]`",
  ):
    ck.check_against_template(metadata, renamed, layouts=layouts)
  manager.close()


def test_the_template_check_reads_orbax_metadata_of_every_kind(tmp_path):
  path = ck.save_orbax_checkpoint(tmp_path / "ckpt", run_tree(1))
  with ocp.StandardCheckpointer() as plain:
    metadata = plain.metadata(path)  # a StepMetadata (recent Orbax), or the tree (older)
  other = run_tree(0)
  other["params"]["b"] = jnp.zeros(5)
  for given in (
    metadata,
    getattr(metadata, "item_metadata", metadata),
    ck.restore_orbax_checkpoint(path, run_tree(0)),
  ):
    assert ck.check_against_template(given, run_tree(0)) is None
    with pytest.raises(
      CheckpointMismatchError,
      match=r"`\['params'\]\['b'\]` has shape "
      r"\(4,\) in the checkpoint but \(5,\)",
    ):
      ck.check_against_template(given, other)


def test_overwrite_replaces_a_checkpoint_never_a_directory_of_other_files(tmp_path):
  """``overwrite=True`` swaps a new checkpoint for an old one (and may fill an empty
  directory), but a directory holding the user's other files (Orbax's own ``force=True``
  deletes them) is a ValueError naming it, and every file is still there."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "notes.txt").write_text("keep me")
  (run / "step_10.msgpack").write_bytes(b"\x00" * 8)
  with pytest.raises(ValueError, match=r"run exists and is not a checkpoint.*notes.txt"):
    ck.save_orbax_checkpoint(run, run_tree(1), overwrite=True)
  assert (run / "notes.txt").read_text() == "keep me"
  assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "step_10.msgpack"]
  a_file = tmp_path / "data.csv"
  a_file.write_text("1,2\n")
  with pytest.raises(ValueError, match="is not a checkpoint"):
    ck.save_orbax_checkpoint(a_file, run_tree(1), overwrite=True)
  assert a_file.read_text() == "1,2\n"
  empty = tmp_path / "empty"
  empty.mkdir()
  ck.save_orbax_checkpoint(empty, run_tree(1), overwrite=True)
  ck.save_orbax_checkpoint(empty, run_tree(2), overwrite=True)  # a checkpoint: replaced
  assert_same(ck.restore_orbax_checkpoint(empty, run_tree(0)), run_tree(2))
  (empty / "val_metrics.json").write_text('{"best": 0.31}')  # the user's, inside it
  with pytest.raises(ValueError, match=r"also holds files outside the layout.*\(val_metrics"):
    ck.save_orbax_checkpoint(empty, run_tree(3), overwrite=True)
  assert (empty / "val_metrics.json").read_text() == '{"best": 0.31}'
  assert_same(ck.restore_orbax_checkpoint(empty, run_tree(0)), run_tree(2))
  (empty / "val_metrics.json").unlink()
  (empty / "d" / "train_log.csv").write_text("epoch,loss\n")  # the user's, in Orbax's folder
  with pytest.raises(ValueError, match=r"outside the layout.*\(d/train_log.csv"):
    ck.save_orbax_checkpoint(empty, run_tree(3), overwrite=True)
  assert (empty / "d" / "train_log.csv").exists()
  # A user's file merely named as Orbax's metadata (weights another tool saved as
  # "checkpoint"), beside a folder named "d": they were deleted (the filesystem-faults trial).
  theirs = tmp_path / "model_dir"
  (theirs / "d").mkdir(parents=True)
  (theirs / "checkpoint").write_bytes(b"PK\x03\x04 torch.save() weights")
  (theirs / "d" / "train_log.csv").write_text("epoch,loss\n")
  with pytest.raises(ValueError, match="is not a checkpoint"):
    ck.save_orbax_checkpoint(theirs, run_tree(1), overwrite=True)
  assert (theirs / "checkpoint").read_bytes().startswith(b"PK")
  assert (theirs / "d" / "train_log.csv").exists()


def test_a_msgpack_save_never_replaces_a_file_it_did_not_write(tmp_path):
  """save_checkpoint replaces its own checkpoint (saving every epoch to one path), an empty
  file, and a msgpack state dict of Flax's (an older checkpoint restore reads), but a mistyped
  path that names a script or another tool's file is a ValueError naming it, and the file is
  untouched; a directory, or a path under a file, is refused before anything is written, and
  restoring a directory (an Orbax checkpoint) says which function reads it."""
  from flax import serialization

  script = tmp_path / "train.py"
  script.write_text("print('my training script')\n")
  data = tmp_path / "data.bin"
  data.write_bytes(bytes(range(256)))
  for path in (script, data):
    with pytest.raises(ValueError, match=f"{path.name} exists and is not an optcompose checkpoint"):
      ck.save_checkpoint(path, run_tree(1))
  assert script.read_text() == "print('my training script')\n"
  assert data.read_bytes() == bytes(range(256))
  with pytest.raises(ValueError, match="is a directory; pass a file path"):
    ck.save_checkpoint(tmp_path, run_tree(1))
  with pytest.raises(ValueError, match=r"train.py is a file, so .*x.msgpack cannot be created"):
    ck.save_checkpoint(script / "sub" / "x.msgpack", run_tree(1))
  orbax_dir = ck.save_orbax_checkpoint(tmp_path / "orbax", run_tree(1))
  with pytest.raises(ValueError, match="is a directory, not a msgpack checkpoint file"):
    ck.restore_checkpoint(orbax_dir, run_tree(0))
  old = tmp_path / "old.msgpack"  # an older run's checkpoint: resumed, then saved over
  old.write_bytes(serialization.to_bytes(run_tree(3)))
  assert_same(ck.restore_checkpoint(old, run_tree(0)), run_tree(3))
  ck.save_checkpoint(old, run_tree(4))
  assert_same(ck.restore_checkpoint(old, run_tree(0)), run_tree(4))
  # Another tool's msgpack dict (a metrics file, downloaded weights: other top-level keys)
  # is the user's data, not an older checkpoint of this run.
  metrics = tmp_path / "metrics.msgpack"
  metrics.write_bytes(serialization.to_bytes({"loss": np.arange(3.0)}))
  with pytest.raises(ValueError, match="metrics.msgpack exists and is not an optcompose"):
    ck.save_checkpoint(metrics, run_tree(1))
  assert serialization.msgpack_restore(metrics.read_bytes())["loss"].tolist() == [0.0, 1.0, 2.0]
  metrics.unlink()
  ours = tmp_path / "ckpt.msgpack"
  ours.touch()  # empty: nothing to lose
  for version in (1, 2):
    ck.save_checkpoint(ours, run_tree(version))
  assert_same(ck.restore_checkpoint(ours, run_tree(0)), run_tree(2))
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
    ["train.py", "data.bin", "orbax", "old.msgpack", "ckpt.msgpack"]
  )


def test_a_weights_file_is_replaced_only_by_a_save_of_its_whole_tree(tmp_path):
  """A msgpack state dict counts as an older checkpoint of the run (replaced by a save, as
  resuming an old run expects) only if restore_checkpoint would read it into the new tree:
  every leaf path, shape and dtype. Downloaded weights, ``{"params": ...}`` like nearly every
  Flax file and like the new tree, were replaced on top-level keys alone."""
  from flax import serialization

  weights = tmp_path / "bert_base_pretrained.msgpack"
  kernel = np.full((3, 3), 7.0, np.float32)
  weights.write_bytes(serialization.to_bytes({"params": {"kernel": kernel}}))
  data = weights.read_bytes()
  for tree, difference in (
    ({"params": {"w": jnp.zeros(2)}}, r"`\['params'\]\['w'\]` is missing from the file"),
    ({"params": {"kernel": jnp.zeros((3, 4))}}, r"has shape \(3, 3\) in the file but \(3, 4\)"),
    (
      {"params": {"kernel": jnp.zeros((3, 3), jnp.bfloat16)}},
      r"`\['params'\]\['kernel'\]` has dtype float32 in the file but bfloat16 in `tree`\)",
    ),
    (
      {"params": {"kernel": jnp.zeros((3, 3))}, "step": 0},
      r"`\['step'\]` is missing from the file",
    ),
    ({"params": {}}, r"the file has `\['params'\]\['kernel'\]`, which `tree` lacks"),
  ):
    with pytest.raises(
      ValueError,
      match=r"bert_base_pretrained.msgpack exists and is not an optcompose checkpoint \(it is "
      r"a msgpack state dict of another tree.*" + difference,
    ):
      ck.save_checkpoint(weights, tree)
    assert weights.read_bytes() == data  # byte for byte
  same = {"params": {"kernel": jnp.ones((3, 3))}}  # its whole tree: an older checkpoint
  ck.save_checkpoint(weights, same)
  assert_same(ck.restore_checkpoint(weights, same), same)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bert_base_pretrained.msgpack"]


def test_an_orbax_save_checks_its_leaves_and_flags_before_writing(tmp_path, monkeypatch):
  """A leaf Orbax cannot store (a str, a complex Python number) is a TypeError naming its
  path before anything is written, ``overwrite`` must be a bool like ``block``, and a save
  that fails inside Orbax leaves no temporary directory behind."""
  for leaf, kind in (("adamw", "str"), (1j, "complex")):
    with pytest.raises(TypeError, match=rf"`\['meta'\]` is a {kind}, which Orbax does not"):
      ck.save_orbax_checkpoint(tmp_path / "c", {"meta": leaf, "w": jnp.ones(2)})
  with pytest.raises(TypeError, match="`overwrite` must be a bool, got 1"):
    ck.save_orbax_checkpoint(tmp_path / "c", run_tree(1), overwrite=1)
  assert list(tmp_path.iterdir()) == []

  def failing_save(self, directory, *args, **kwargs):
    os.makedirs(f"{directory}.orbax-checkpoint-tmp-123")  # as Orbax starts a save
    raise RuntimeError("disk full")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", failing_save)
  with pytest.raises(RuntimeError, match="disk full"):
    ck.save_orbax_checkpoint(tmp_path / "c", run_tree(1))
  assert list(tmp_path.iterdir()) == []


def test_a_save_that_fails_before_taking_the_lock_leaves_other_saves_alone(tmp_path, monkeypatch):
  """Interrupted while waiting for the directory's lock (Ctrl-C during the next save of an
  asynchronous one), a save removes only its own temporary directory: the one another save
  is writing under the lock survives (cleaning every leftover is done with the lock held)."""
  directory = tmp_path / "ckpt"
  in_flight = tmp_path / f".ckpt.{'a' * 32}.optcompose-new"  # another save's, being written
  in_flight.mkdir()
  (in_flight / "_METADATA").write_text("{}")

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(ck, "_locked", interrupted)
  with pytest.raises(KeyboardInterrupt):
    ck.save_orbax_checkpoint(directory, run_tree(1), overwrite=True)
  assert (in_flight / "_METADATA").exists()


def test_typed_prng_keys_round_trip_through_orbax_and_are_named_by_msgpack(tmp_path):
  """An NNX model with Dropout holds a typed PRNG key (its Rngs): Orbax stores its bits and
  restores the key (checked against its checksum); a msgpack file cannot hold one, and says
  so before writing, naming the leaf. Nothing is left in the directory either way."""
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.1, rngs=nnx.Rngs(1)))
  tree = {"model": nnx.to_pure_dict(nnx.state(model)), "key": jax.random.key(7)}
  with pytest.raises(TypeError, match=r"`\['key'\]` is a typed PRNG key .*save_orbax_checkpoint"):
    ck.save_checkpoint(tmp_path / "ck.msgpack", tree)
  path = ck.save_orbax_checkpoint(tmp_path / "ck", tree)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
  restored = ck.restore_orbax_checkpoint(path, tree)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_key_and_its_bits_are_not_taken_for_each_other(tmp_path):
  """A key is stored as its bits (uint32, in Orbax's metadata and a msgpack file alike), so
  the shape and dtype checks cannot tell a key from a uint32 array: the restored leaves are
  compared with the template's, and a key where the template holds numbers (or the other
  way), or a key of another implementation of the same size, is a CheckpointMismatchError."""
  key = jax.random.key(0)
  bits = ck.save_orbax_checkpoint(tmp_path / "bits", {"k": jax.random.key_data(key)})
  with pytest.raises(
    CheckpointMismatchError, match=r"an array of numbers in the checkpoint but a PRNG key"
  ):
    ck.restore_orbax_checkpoint(bits, {"k": key})
  keyed = ck.save_orbax_checkpoint(tmp_path / "key", {"k": key})
  with pytest.raises(
    CheckpointMismatchError, match=r"a PRNG key \(key<fry>\) in the checkpoint but an array"
  ):
    ck.restore_orbax_checkpoint(keyed, {"k": jax.random.key_data(key)})
  assert (
    ck.restore_orbax_checkpoint(keyed, {"k": jax.eval_shape(lambda: key)})["k"].dtype == key.dtype
  )
  msgpack = ck.save_checkpoint(tmp_path / "bits.msgpack", {"k": jax.random.key_data(key)})
  with pytest.raises(CheckpointMismatchError, match="but a PRNG key"):
    ck.restore_checkpoint(msgpack, {"k": key})
  rbg = ck.save_orbax_checkpoint(tmp_path / "rbg", {"k": jax.random.key(0, impl="rbg")})
  with pytest.raises(
    CheckpointMismatchError, match=r"key<rbg>\) in the checkpoint but a PRNG key \(key<urbg>"
  ):
    ck.restore_orbax_checkpoint(rbg, {"k": jax.random.key(0, impl="unsafe_rbg")})
