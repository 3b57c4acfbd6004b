"""optcompose.metrics: the values of an optimizer state worth logging, read inside jit and
lax.scan, against NumPy norms of the gradients, updates and parameters; one transfer to the
host; and the logging recipes of docs/guides/logging.md (a CLU-shaped writer, TensorBoard
files read back with TensorBoard's reader, W&B's call shape), each run as written."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optcompose as oc
import optcompose.metrics as om
from optcompose.metrics import KEYS, metrics, to_host, unstack
from numerics import standard_promotion
from test_docs import doc_problems

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "logging.md"
MEASURED = {
  "grad_norm",
  "update_norm",
  "param_norm",
  "update_ratio",
  "learning_rate",
  "zero_fraction",
  "nonfinite",
  "step",
}
TARGET = {
  "w": np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4),
  "b": np.array([0.0, 1.0, -2.0, 3.0], np.float32),
  "s": np.float32(2.0),
}


def initial_params():
  return {
    "w": jnp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4) / 7.0),
    "b": jnp.zeros(4),
    "s": jnp.float32(0.5),
  }


def gradient(params):
  """Of 0.5 * ||params - TARGET||^2; ``b[0]`` stays 0 (its target), so zeros persist."""
  return jax.tree.map(lambda p, t: p - t, params, TARGET)


def schedule(count):
  return 0.1 / (1.0 + jnp.asarray(count, jnp.float32))


def lr(t):
  """``schedule`` in Python, for the expected values."""
  return 0.1 / (1.0 + t)


def injected_adamw():
  """AdamW with every hyperparameter in the state: diagnostics_dict lists 18 keys."""
  return oc.with_diagnostics(
    oc.inject_hyperparams(oc.adamw)(learning_rate=schedule, weight_decay=0.01)
  )


def np_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def np_zero_fraction(tree):
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  return sum(int(np.sum(x == 0)) for x in leaves) / sum(x.size for x in leaves)


def make_step(tx):
  def step(params, state):
    grads = gradient(params)
    updates, state = tx.update(grads, state, params)
    return oc.apply_updates(params, updates), state, metrics(state), (grads, updates, params)

  return step


def scan(tx, steps):
  """One jitted ``lax.scan`` of ``steps`` updates: the metrics, stacked on the device, and
  the (gradients, updates, parameters) of each step, stacked."""
  step, params = make_step(tx), initial_params()

  def body(carry, _):
    params, state, logged, seen = step(*carry)
    return (params, state), (logged, seen)

  _, (stacked, seen) = jax.jit(lambda c: jax.lax.scan(body, c, length=steps))(
    (params, tx.init(params))
  )
  return stacked, seen


def at(seen, t):
  return jax.tree.map(lambda x: np.asarray(x[t]), seen)


def run(tx, steps, mode):
  """``steps`` updates, as a loop of a jitted step or as one jitted lax.scan; returns the
  metrics stacked on the host and the (gradients, updates, parameters) of each step."""
  if mode == "scan":
    stacked, seen = scan(tx, steps)
    return to_host(stacked), [at(seen, t) for t in range(steps)]
  params = initial_params()
  jitted, state, rows, seen = jax.jit(make_step(tx)), tx.init(params), [], []
  for _ in range(steps):
    params, state, logged, record = jitted(params, state)
    rows.append(to_host(logged))
    seen.append(record)
  return {k: np.array([row[k] for row in rows]) for k in rows[0]}, seen


# ---------------------------------------------------------------------------------------
# metrics(): values, keys, no host transfer.


@pytest.mark.parametrize("mode", ["jit", "scan"])
def test_values_equal_independent_numpy_measurements(mode):
  logged, seen = run(injected_adamw(), 5, mode)
  assert set(logged) == MEASURED
  for t, (g, u, p) in enumerate(seen):
    assert logged["grad_norm"][t] == pytest.approx(np_norm(g), rel=1e-6)
    assert logged["update_norm"][t] == pytest.approx(np_norm(u), rel=1e-6)
    assert logged["param_norm"][t] == pytest.approx(np_norm(p), rel=1e-6)
    assert logged["update_ratio"][t] == pytest.approx(np_norm(u) / np_norm(p), rel=2e-6)
    assert logged["learning_rate"][t] == pytest.approx(lr(t), rel=1e-6)
    assert logged["zero_fraction"][t] == pytest.approx(np_zero_fraction(p), rel=1e-6)
    assert logged["nonfinite"][t] == 0 and logged["step"][t] == t + 1
  assert logged["zero_fraction"][0] == pytest.approx(
    5 / 17
  )  # b and w[0, 0] and logged["zero_fraction"][1] > 0


def test_keys_are_the_short_set_where_diagnostics_dict_lists_every_scalar():
  tx = injected_adamw()
  params = initial_params()
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(gradient(params), state, params)
    params = oc.apply_updates(params, updates)
  short, every = to_host(metrics(state)), oc.diagnostics_dict(state)
  assert set(short) == MEASURED and list(short) == [k for k in KEYS if k in MEASURED]
  assert len(every) > len(short)  # 18 here: also b1, b2, eps, ..., the inner counts, ...
  for key, value in short.items():
    assert value == every["count" if key == "step" else key], key


def test_the_docstring_table_lists_exactly_the_keys():
  rows = re.findall(r"^  (\w+) +(?:float32|float\*|int32|bool) ", metrics.__doc__, re.M)
  assert tuple(rows) == KEYS


def test_traceable_without_host_transfer_or_callback():
  tx = injected_adamw()
  params = initial_params()
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(metrics)(state)
  assert len(jaxpr.jaxpr.outvars) == len(MEASURED)
  assert "callback" not in str(jaxpr)
  with jax.transfer_guard("disallow"):  # eagerly: the state's own arrays, nothing copied
    logged = metrics(state)
    assert logged["grad_norm"] is state.grad_norm and logged["step"] is state.count
    assert all(isinstance(v, jax.Array) for v in logged.values())
  step = jax.jit(make_step(tx))
  step(params, state)  # compiled
  with jax.transfer_guard_device_to_host("disallow"):
    _, _, logged, _ = step(params, state)
  assert isinstance(logged["update_norm"], jax.Array)
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(lambda s: to_host(metrics(s)))(state)


def test_every_k_rows_are_the_measured_updates():
  stacked, seen = scan(oc.with_diagnostics(oc.adam(0.05), 0.05, every_k=3), 7)
  rows = unstack(stacked, every_k=3)
  assert [row["step"] for row in rows] == [1, 4, 7]
  for row, t in zip(rows, (0, 3, 6)):
    grads, updates, params = at(seen, t)
    assert row["grad_norm"] == pytest.approx(np_norm(grads), rel=1e-6)
    assert row["update_norm"] == pytest.approx(np_norm(updates), rel=1e-6)
  every = unstack(stacked)
  assert len(every) == 7 and every[1]["grad_norm"] == every[0]["grad_norm"]  # held


def test_every_k_rows_of_a_later_epoch_are_its_measured_updates():
  # A second scan starts at count 5: its measured updates are its rows 2 and 5 (steps 7
  # and 10), not rows 0 and 3, whose values are held from steps 4 and 7.
  tx = oc.with_diagnostics(oc.adam(0.05), 0.05, every_k=3)
  step, params = make_step(tx), initial_params()

  def body(carry, _):
    params, state, logged, seen = step(*carry)
    return (params, state), (logged, seen)

  epoch = jax.jit(lambda c: jax.lax.scan(body, c, length=5))
  carry, (first, _) = epoch((params, tx.init(params)))
  _, (second, seen) = epoch(carry)
  assert [row["step"] for row in unstack(first, every_k=3)] == [1, 4]
  rows = unstack(second, every_k=3)
  assert [row["step"] for row in rows] == [7, 10]
  for row, t in zip(rows, (1, 4)):
    grads, _, _ = at(seen, t)
    assert row["grad_norm"] == pytest.approx(np_norm(grads), rel=1e-6)


def test_without_diagnostics_reads_clipping_injection_and_skipping():
  """NaN gradients at steps 1, 3 and 4: skipped, counted, and the inner state (clipping's
  norm, the injected schedule's value) holds the latest finite step's values."""
  ours = oc.apply_if_finite(
    oc.chain(oc.clip_by_global_norm(1.0), oc.inject_hyperparams(oc.adam)(learning_rate=schedule)), 2
  )
  theirs = standard_promotion(
    optax.apply_if_finite(
      optax.chain(
        optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
      ),
      2,
    )
  )
  params = initial_params()
  states = [ours.init(params), theirs.init(params)]
  assert set(metrics(states[0])) == {"grad_norm", "learning_rate", "skipped_steps", "gave_up"}
  assert set(metrics(states[1])) == {"learning_rate", "skipped_steps"}  # Optax keeps no norm
  finite_steps, last_norm, skipped, consecutive = 0, 0.0, 0, 0
  for t in range(5):
    g = gradient(params)
    if t in (1, 3, 4):
      g = {**g, "w": g["w"].at[1, 2].set(jnp.nan)}
      skipped, consecutive = skipped + 1, consecutive + 1
    else:
      finite_steps, last_norm, consecutive = finite_steps + 1, np_norm(g), 0
    states = [tx.update(g, s, params)[1] for tx, s in zip((ours, theirs), states)]
    a, b = to_host(metrics(states[0])), to_host(metrics(states[1]))
    assert a["grad_norm"] == pytest.approx(last_norm, rel=1e-6)
    assert a["learning_rate"] == pytest.approx(lr(finite_steps - 1), rel=1e-6)
    assert a["learning_rate"] == b["learning_rate"]
    assert a["skipped_steps"] == b["skipped_steps"] == skipped
    assert a["gave_up"] is (consecutive >= 2)


def test_plateau_scale_and_early_stopping():
  tx = oc.chain(oc.adam(0.1), oc.reduce_on_plateau(factor=0.5, patience=1))
  state = tx.init(initial_params())
  assert to_host(metrics(state)) == {"plateau_scale": 1.0}
  assert to_host(metrics(oc.set_hyperparams(state, plateau_scale=0.25))) == {"plateau_scale": 0.25}
  es = oc.early_stopping(mode="min", patience=1)
  es_state = es.init(None)
  for value in (3.0, 2.0, 2.5, 2.75):
    es_state = es.update(es_state, value)
  logged = to_host(metrics((state, es_state)))
  assert logged == {"plateau_scale": 1.0, "best_metric": 2.0, "wait": 2, "should_stop": True}


def test_states_holding_nothing_give_an_empty_dict():
  params = initial_params()
  assert metrics(optax.adam(1e-3).init(params)) == {}
  assert metrics(oc.sgd(0.1).init(params)) == {}
  assert metrics(()) == {} and to_host({}) == {} and unstack({}) == []


def test_nnx_optimizer_state():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, oc.with_diagnostics(oc.sgd(schedule)), wrt=nnx.Param)
  x = jnp.ones((4, 3))
  for _ in range(2):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)
  short, every = to_host(metrics(opt.opt_state)), oc.diagnostics_dict(opt.opt_state)
  assert set(short) == MEASURED and short["step"] == 2
  assert short["grad_norm"] == pytest.approx(np_norm(grads), rel=1e-6)
  for key, value in short.items():
    assert value == every["count" if key == "step" else key], key
  # The state as a mapping of its fields (nnx.state, to_pure_dict), which the checkpoint
  # guide steers NNX users to, gives the same keys and values: the diagnostics were logged
  # under their paths there, as "used_learning_rate" (the fine-tuning trial).
  as_mapping = nnx.state(opt.opt_state)
  for form in (as_mapping, nnx.to_pure_dict(as_mapping)):
    assert oc.diagnostics_dict(form) == every


# ---------------------------------------------------------------------------------------
# to_host() and unstack().


def test_to_host_converts_types_in_one_transfer(monkeypatch):
  tx = oc.with_diagnostics(oc.apply_if_finite(oc.adam(0.1), 3), 0.1)
  params = initial_params()
  _, state = tx.update(gradient(params), tx.init(params), params)
  logged = metrics(state)
  calls, real = [], jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
  host = to_host(logged)
  assert len(calls) == 1
  assert list(host) == list(logged)
  expected_type = {"b": bool, "i": int, "f": float}
  for key, value in host.items():
    assert type(value) is expected_type[np.asarray(logged[key]).dtype.kind], key
    assert value == np.asarray(logged[key]).item(), key
  assert host["gave_up"] is False and host["skipped_steps"] == 0 and host["step"] == 1


def test_to_host_and_unstack_of_a_stacked_dict():
  stacked = {
    "loss": jnp.array([3.0, 2.0, 1.5, 1.25, 1.0]),
    "step": jnp.arange(1, 6),
    "ok": jnp.array([True, False, True, True, True]),
  }
  host = to_host(stacked)
  assert all(isinstance(v, np.ndarray) and v.shape == (5,) for v in host.values())
  np.testing.assert_array_equal(host["loss"], [3.0, 2.0, 1.5, 1.25, 1.0])
  rows = unstack(stacked, every_k=2)
  assert rows == [
    {"loss": 3.0, "step": 1, "ok": True},
    {"loss": 1.5, "step": 3, "ok": True},
    {"loss": 1.0, "step": 5, "ok": True},
  ]
  assert [type(v) for v in rows[0].values()] == [float, int, bool]
  assert unstack(host) == unstack(stacked)  # already on the host


def test_bad_input_is_named():
  tx = oc.adam(0.1)
  with pytest.raises(TypeError, match="`opt_state`.*not the transformation"):
    metrics(tx)
  with pytest.raises(TypeError, match="`opt_state`"):
    metrics({"count": "three"})
  with pytest.raises(TypeError, match="`metrics` must be a dict"):
    to_host([jnp.ones(())])
  with pytest.raises(TypeError, match=r"`metrics\['a'\]`"):
    to_host({"a": "x"})
  with pytest.raises(ValueError, match="`every_k` must be >= 1"):
    unstack({"a": jnp.ones(3)}, every_k=0)
  with pytest.raises(TypeError, match="`every_k` must be an int"):
    unstack({"a": jnp.ones(3)}, every_k=1.5)
  with pytest.raises(ValueError, match=r"`stacked\['a'\]` must have one axis"):
    unstack({"a": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match="different lengths"):
    unstack({"a": jnp.ones(3), "b": jnp.ones(2)})


def test_public_functions_are_documented_and_exported():
  assert om.__all__ == ["metrics", "to_host", "unstack"]
  for fn in (metrics, to_host, unstack):
    assert doc_problems(fn) == [], fn.__name__


# ---------------------------------------------------------------------------------------
# The recipes.


def scan_rows(tx, steps, every_k=1):
  stacked, _ = scan(tx, steps)
  return to_host(stacked), unstack(stacked, every_k=every_k)


class CluShapedWriter:
  """CLU's MetricWriter.write_scalars(step: int, scalars: Mapping[str, Scalar]); CLU's own
  writers import TensorFlow, which the suite does not install."""

  def __init__(self):
    self.written = []

  def write_scalars(self, step, scalars):
    assert type(step) is int
    assert all(isinstance(k, str) and type(v) in (float, int, bool) for k, v in scalars.items())
    self.written.append((step, dict(scalars)))


def test_clu_shaped_writer_gets_every_kth_step():
  stacked, rows = scan_rows(injected_adamw(), 6, every_k=2)
  writer = CluShapedWriter()
  for row in rows:
    writer.write_scalars(row.pop("step"), row)
  assert [step for step, _ in writer.written] == [1, 3, 5]
  for step, scalars in writer.written:
    assert set(scalars) == MEASURED - {"step"}
    for key, value in scalars.items():
      assert value == stacked[key][step - 1].item(), (step, key)


def test_tensorboard_event_files_read_back_with_the_logged_values(tmp_path):
  tensorboardX = pytest.importorskip("tensorboardX")
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  stacked, rows = scan_rows(injected_adamw(), 5)
  writer = tensorboardX.SummaryWriter(str(tmp_path))
  for row in rows:
    step = row.pop("step")
    for key, value in row.items():
      writer.add_scalar(f"optimizer/{key}", value, global_step=step)
  writer.close()
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert sorted(events.Tags()["scalars"]) == sorted(f"optimizer/{k}" for k in MEASURED - {"step"})
  for key in MEASURED - {"step"}:
    read = events.Scalars(f"optimizer/{key}")
    assert [e.step for e in read] == [1, 2, 3, 4, 5]
    # Event files hold float32: the logged float32 values come back exactly.
    np.testing.assert_array_equal(
      np.float32([e.value for e in read]), stacked[key].astype(np.float32), err_msg=key
    )


def test_wandb_shaped_run_logs_a_dict_per_step():
  _, rows = scan_rows(injected_adamw(), 4)
  history = []

  class Run:  # wandb's Run.log(data, step=None)
    def log(self, data, step=None):
      history.append((step, data))

  run = Run()
  for row in rows:
    run.log({f"opt/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
  assert [step for step, _ in history] == [1, 2, 3, 4]
  assert history[2][1]["opt/learning_rate"] == pytest.approx(lr(2), rel=1e-6)


GUIDE_BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)


def test_the_guide_has_its_recipes():
  text = "\n".join(GUIDE_BLOCKS)
  assert len(GUIDE_BLOCKS) >= 6
  for needle in (
    "lax.scan",
    "write_scalars",
    "SummaryWriter",
    "run.log",
    "jax.process_index() == 0",
    "unstack(stacked, every_k=10)",
  ):
    assert needle in text, needle


@pytest.mark.parametrize("index", range(len(GUIDE_BLOCKS)))
def test_guide_block_runs_alone(index, capsys):
  if "tensorboardX" in GUIDE_BLOCKS[index]:
    pytest.importorskip("tensorboardX")
  exec(compile(GUIDE_BLOCKS[index], f"{GUIDE}:block{index}", "exec"), {"__name__": "guide"})


def test_a_clip_that_is_not_first_is_not_the_gradient_norm():
  """A clip_by_global_norm after scale_by_adam measures Adam's directions, not the gradients:
  no `grad_norm` then; first in the chain (or inside apply_if_finite) it is."""
  params = initial_params()
  g = gradient(params)
  late = oc.chain(oc.scale_by_adam(), oc.clip_by_global_norm(1.0))
  first = oc.apply_if_finite(oc.chain(oc.clip_by_global_norm(1.0), oc.scale_by_adam()), 2)
  _, late_state = late.update(g, late.init(params), params)
  _, first_state = first.update(g, first.init(params), params)
  assert "grad_norm" not in metrics(late_state)
  assert to_host(metrics(first_state))["grad_norm"] == pytest.approx(np_norm(g), rel=1e-6)


def test_grad_norm_is_read_through_gradient_accumulation():
  """The training-safety guide's recipe, multi_steps(apply_if_finite(chain(clip, adamw))),
  logged no grad_norm: the clip's norm (of the micro-steps' mean gradient, on the latest real
  step) is read through ours and Optax's MultiSteps."""
  params = initial_params()
  g = gradient(params)
  inner = oc.apply_if_finite(oc.chain(oc.clip_by_global_norm(1.0), oc.adamw(1e-3)), 3)
  for tx in (oc.multi_steps(inner, 2), optax.MultiSteps(inner, 2).gradient_transformation()):
    state = tx.init(params)
    with jax.numpy_dtype_promotion("standard"):  # Optax's MultiSteps divides an int32 count
      for _ in range(2):
        _, state = tx.update(g, state, params)
    assert to_host(metrics(state))["grad_norm"] == pytest.approx(np_norm(g), rel=1e-6)
