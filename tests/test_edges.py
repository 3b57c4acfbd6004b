"""Edges that user trials of 2026-12-02 found: complex parameters with real gradients, a
complex hyperparameter dtype, builders that started JAX's backends (which
``jax.distributed.initialize`` must precede), and plain-dict labels against Flax NNX's
Variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optcompose as oc
from numerics import x64

ROOT = Path(__file__).resolve().parents[1]

DECAYING = {
  "add_decayed_weights": lambda m: m.add_decayed_weights(0.5),
  "adamw": lambda m: m.adamw(0.1, weight_decay=0.5),
  "nadamw": lambda m: m.nadamw(0.1, weight_decay=0.5),
  "adamaxw": lambda m: m.adamaxw(0.1, weight_decay=0.5),
  "lamb": lambda m: m.lamb(0.1, weight_decay=0.5),
  "lion": lambda m: m.lion(0.1, weight_decay=0.5),
  "lars": lambda m: m.lars(0.1, weight_decay=0.5),
}


@pytest.mark.parametrize("name", sorted(DECAYING))
def test_weight_decay_of_a_complex_parameter_keeps_its_imaginary_part(name):
  """A real gradient of a complex parameter: the decay ``wd * w`` is complex, and its
  imaginary part was dropped (the sum cast to the gradient's real dtype), silently; Optax
  keeps it (lamb's trust ratio changed too)."""
  with x64():
    p = {"w": jnp.array([1 + 1j, 2 - 3j], jnp.complex128)}
    g = {"w": jnp.array([0.5, -0.5], jnp.float64)}
    got = []
    for m in (optax, oc):
      with jax.numpy_dtype_promotion("standard" if m is optax else "strict"):
        tx = DECAYING[name](m)
        state = tx.init(p)
        for _ in range(2):
          u, state = tx.update(g, state, p)
      got.append(np.asarray(u["w"]))
    assert got[1].dtype == np.complex128
    np.testing.assert_allclose(got[1], got[0], rtol=1e-12, atol=1e-15)


def test_a_complex_decay_keeps_the_gradient_s_precision():
  p = {"w": jnp.array([1 + 1j], jnp.complex64)}
  u, _ = oc.add_decayed_weights(0.5).update({"w": jnp.array([0.5], jnp.bfloat16)}, None, p)
  assert u["w"].dtype == jnp.complex64 and complex(u["w"][0]) == 1.0 + 0.5j


def test_a_complex_hyperparameter_dtype_is_refused_at_construction_by_its_name():
  """It was accepted, then refused at init as "`learning_rate` expected a real number"."""
  with pytest.raises(TypeError, match=r"`hyperparam_dtype` must be a real floating-point dtype"):
    oc.inject_hyperparams(oc.adam, hyperparam_dtype=jnp.complex64)
  with pytest.raises(TypeError, match=r"`hyperparam_dtype` must be a floating-point dtype \(such"):
    oc.inject_hyperparams(oc.adam, hyperparam_dtype=jnp.int32)
  with pytest.raises(TypeError, match="complex for complex parameters"):  # a moment may be
    oc.adam(0.1, mu_dtype=jnp.int8)
  oc.adam(0.1, mu_dtype=jnp.complex64)


BUILDERS = """
import jax, numpy as np, optcompose as oc
from jax._src import xla_bridge
built = [
  oc.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 10_000),
  oc.warmup_exponential_decay_schedule(0.0, 1e-3, 100, 1000, 0.5),
  oc.exponential_decay(1e-3, 1000, 0.5, end_value=1e-5),
  oc.inverse_time_decay(1e-3, 100, 0.5),
  oc.sgdr_schedule([dict(init_value=0.0, peak_value=1e-3, warmup_steps=10, decay_steps=100)] * 2),
  oc.join_schedules([oc.linear_schedule(0.0, 1.0, 10), oc.constant_schedule(1.0)], [10]),
  oc.adamw(oc.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 10_000), weight_decay=0.1),
  oc.inject_hyperparams(oc.adamw)(learning_rate=oc.linear_schedule(1e-3, 1e-4, 100)),
  oc.noisy_sgd(0.1, key=3),
  oc.fromage(np.float32(1e-3)),
  oc.chain(oc.clip_by_global_norm(1.0), oc.adamw(1e-3)),
]
assert not xla_bridge.backends_are_initialized(), "a builder started JAX's backends"
jax.distributed.initialize("localhost:{port}", num_processes=1, process_id=0)
import jax.numpy as jnp
params = {{"w": jnp.ones(3)}}
for tx in built[6:]:
  state = tx.init(params)
  tx.update(params, state, params)
jax.distributed.shutdown()
print("ok")
"""


def test_building_optimizers_and_schedules_leaves_jax_distributed_initialize_possible():
  """Building a joined schedule evaluated it over its first 2^16 steps, exponential_decay at
  step 2^31 - 1, inject_hyperparams its schedules at step 0 and noisy_sgd its key: each
  started JAX's backends, and a later jax.distributed.initialize failed (Optax's builders
  evaluate nothing). Before the backends are up those checks wait for init."""
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  run = subprocess.run(
    [sys.executable, "-c", BUILDERS.format(port=port)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    timeout=300,
  )
  assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


COLD = """
import jax, jax.numpy as jnp, optcompose as oc
from jax._src import xla_bridge
built = [
  oc.inject_hyperparams(oc.adam)(learning_rate=oc.linear_schedule(-1e-3, 1e-3, 10)),
  oc.adam(0.1, b1=oc.exponential_decay(0.9, 10, 1.5)),
  oc.sgd(0.1, momentum=oc.exponential_decay(0.9, 100, 1.01)),
  oc.rmsprop(0.1, eps=oc.exponential_decay(1e-8, 1000, 0.5)),
  oc.adamw(oc.join_schedules([oc.linear_schedule(0.0, 1e-3, 10),
                              oc.linear_schedule(1e-3, -1e-3, 100)], [10])),
  oc.inject_hyperparams(oc.adam)(learning_rate=0.1, b1=oc.exponential_decay(0.9, 10, 1.5)),
]
assert not xla_bridge.backends_are_initialized()
for tx in built:
  try:
    jax.jit(tx.init)({{"w": jnp.ones(2)}})
    print("accepted")
  except ValueError as e:
    print("refused", str(e).split(":")[1].split("`")[1])
"""


def test_a_bad_schedule_built_before_the_backends_are_up_is_refused_at_init():
  """The review of the change: the records of a schedule built cold were left out for good
  (a growing b1, an eps decaying to 0, a join reaching a negative learning rate all trained).
  They are now evaluated at the first init (here a jitted one), naming the argument; built
  once the backends are up, each is refused at construction, as before."""
  run = subprocess.run(
    [sys.executable, "-c", COLD.format()],
    capture_output=True,
    text=True,
    env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    timeout=300,
  )
  got = run.stdout.split("\n")[:6]
  want = ["learning_rate", "b1", "decay", "eps", "learning_rate", "b1"]
  assert got == [f"refused {name}" for name in want], run.stdout + run.stderr[-2000:]
  with pytest.raises(ValueError, match="`b1`"):  # warm: at construction
    oc.adam(0.1, b1=oc.exponential_decay(0.9, 10, 1.5))


def test_plain_dict_labels_against_nnx_variables_say_so():
  """The message said "['backbone']['bias'].value is missing" and called a path that exists
  "unexpected": the labels are plain dicts, the parameters Variables."""

  class Model(nnx.Module):
    def __init__(self):
      self.backbone = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
      self.head = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

  model = Model()
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  labels = jax.tree_util.tree_map_with_path(
    lambda p, _: "frozen" if "backbone" in jax.tree_util.keystr(p) else "train", pure
  )
  tx = oc.partition({"train": oc.adam(1e-2), "frozen": oc.set_to_zero()}, labels)
  with pytest.raises(ValueError, match=r"is a Flax Variable's value where `param_labels` has a"):
    nnx.Optimizer(model, tx, wrt=nnx.Param)
  state_labels = jax.tree.map(
    lambda v: "frozen" if v.shape == (3, 3) or v.shape == (3,) else "train",
    nnx.state(model, nnx.Param),
  )
  del state_labels  # a tree of the same kind is what the message asks for (see the guide)


def test_a_numpy_float64_template_leaf_is_named_as_such(tmp_path):
  """The hint asked whether x64 had changed since saving, when the template held a NumPy
  float64 array (x64 never on): JAX would hold it as float32."""
  if jax.config.jax_enable_x64:
    pytest.skip("under x64 a float64 template leaf is JAX's too")
  from optcompose.checkpoint import CheckpointMismatchError, restore_checkpoint, save_checkpoint

  path = tmp_path / "state.msgpack"
  save_checkpoint(path, {"mu": jnp.zeros(3)})
  with pytest.raises(CheckpointMismatchError, match="a NumPy float64 array there"):
    restore_checkpoint(path, {"mu": np.zeros(3)})
  restore_checkpoint(path, {"mu": jnp.zeros(3)})


LINEN = {
  "params": {
    "Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
    "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
  }
}


def _mask(**patterns):
  return {
    jax.tree_util.keystr(p): on
    for p, on in jax.tree_util.tree_flatten_with_path(oc.mask_from_paths(**patterns)(LINEN))[0]
  }


def test_path_patterns_anchor_on_the_keys_joined_by_slashes():
  """Every printed dict path ends in "']", so `exclude="bias$"` matched nothing and the
  biases were decayed, silently (the 2am-mistakes trial). Patterns are also searched in
  "params/Dense_0/bias"."""
  no_bias = _mask(exclude="bias$")
  assert [k for k, on in no_bias.items() if not on] == [
    "['params']['Dense_0']['bias']",
    "['params']['LayerNorm_0']['bias']",
  ]
  assert sum(_mask(include="Dense_0/kernel$").values()) == 1
  assert all(_mask(include="^params/").values())
  assert _mask(exclude=r"bias|scale") == {k: "kernel" in k for k in no_bias}  # as before
  labels = oc.labels_from_paths([("bias$", "no_decay")], default="decay")(LINEN)
  assert labels["params"]["Dense_0"] == {"kernel": "decay", "bias": "no_decay"}


def test_path_patterns_mean_the_same_for_every_leaf_and_alternative():
  """A first version searched the "/" form only for a pattern found in no printed path of
  the tree given: `bias$|scale` then excluded no bias (`scale` was found as printed), and one
  mask meant different things in two partition groups (the path-pattern trial). A negative
  lookaround must hold in both forms (a lookahead for ['head'] holds in every "/" form)."""
  assert [k for k, on in _mask(exclude=r"bias$|scale").items() if on] == [
    "['params']['Dense_0']['kernel']"
  ]
  assert _mask(include=r"kernel$|embedding") == _mask(include="kernel")
  tree = {"params": {"head": {"kernel": jnp.ones(2)}, "body": {"kernel": jnp.ones(2)}}}
  want = {"params": {"head": {"kernel": False}, "body": {"kernel": True}}}
  assert oc.mask_from_paths(include=r"^(?!.*\['head'\])")(tree) == want
  assert oc.mask_from_paths(include=r"^(?!params/head)")(tree) == want
  assert all(jax.tree.leaves(oc.mask_from_paths(include=r"['\"]kernel['\"]")(tree)))
  decay = oc.add_decayed_weights(1.0, mask=oc.mask_from_paths(exclude=r"bias$|scale"))
  labels = oc.labels_from_paths([("LayerNorm", "a")], default="b")
  tx = oc.partition({"a": decay, "b": decay}, labels)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, LINEN), tx.init(LINEN), LINEN)
  decayed = {
    jax.tree_util.keystr(p): bool(x.any()) for p, x in jax.tree_util.tree_flatten_with_path(u)[0]
  }
  assert [k for k, on in decayed.items() if on] == ["['params']['Dense_0']['kernel']"]


def test_a_path_copied_as_printed_is_refused_with_the_slash_form():
  """ "['Dense_0']['kernel']" as a regex is a set of characters: it matched every leaf."""
  with pytest.raises(ValueError, match=r"is a path as printed.*'Dense_0/kernel'"):
    oc.mask_from_paths(include="['Dense_0']['kernel']")
  with pytest.raises(ValueError, match=r"rules\[0\]\[0\]` .* is a path as printed"):
    oc.labels_from_paths([("['LayerNorm_0']", "no_decay")], default="decay")
  with pytest.raises(
    ValueError, match=r"'.layers\[0\].weight' is a path as printed.*'layers/0/weight'"
  ):
    oc.mask_from_paths(exclude=".layers[0].weight")  # Equinox's, printed
  oc.mask_from_paths(include=r"\['Dense_0'\]")  # escaped: the printed path, literally


@pytest.mark.parametrize("params", [{"w": jnp.ones(2)}, (jnp.ones(2), jnp.ones(3))])
@pytest.mark.parametrize("build", [lambda: oc.adam(1e-3), lambda: oc.sgd(0.1)])
def test_a_chain_given_its_state_where_the_updates_go_says_so(build, params):
  """Only bare primitives named the order of the arguments: a chain said "Pass the state
  returned by init", and sgd on tuple parameters returned the state as the updates."""
  tx = build()
  with pytest.raises(TypeError, match=r"update\(updates, state, params\), gradients first"):
    tx.update(tx.init(params), params, params)


def test_a_gradient_tuple_holding_a_count_is_not_taken_for_a_state():
  """The review: a tuple gradient with a NamedTuple of a `count` field, under a nested chain
  whose state shows no EmptyState at its top, was refused as swapped arguments."""
  from typing import NamedTuple

  class Stats(NamedTuple):
    mean: jax.Array
    count: jax.Array

  g = (jnp.ones(2), Stats(jnp.ones(2), jnp.ones(2)))
  for tx in (oc.chain(oc.adam(0.1)), oc.chain(oc.trace(0.9)), oc.adam(0.1)):
    tx.update(g, tx.init(g), g)
  with pytest.raises(ValueError, match=r"must lie in \[-2\*\*63, 2\*\*63\)"):
    oc.noisy_sgd(0.1, key=2**80)  # an int seed checked when built, not at the first init


def test_a_transformation_without_state_refuses_another_optimizer_s_state():
  """It passed the foreign state back: a rebuilt adam(1e-3) kept the old schedule's state,
  and current_hyperparams reported its stale learning rate forever (Optax's scale and clip
  do the same; its stateless returns a fresh EmptyState; docs/coming-from-optax.md)."""
  params = {"w": jnp.ones(2)}
  old = oc.adam(oc.linear_schedule(1e-2, 0.0, 100))
  with pytest.raises(oc.StateMismatchError, match=r"state\[1\] is an InjectHyperparamsState"):
    oc.adam(1e-3).update(params, old.init(params), params)
  with pytest.raises(oc.StateMismatchError, match=r"is a ClipByGlobalNormState, expected an"):
    oc.clip(1.0).update(params, oc.clip_by_global_norm(1.0).init(params), params)
  for empty in (oc.EmptyState(), optax.EmptyState(), None, (), {}):  # leafless: accepted
    oc.clip(1.0).update(params, empty, params)


def test_a_python_float_gradient_under_x64_keeps_the_float64_learning_rate():
  """Eagerly, a Python-float gradient counted as float32, so the injected learning rate was
  rounded to float32 (0.3 * float32(0.1) = 0.030000000447): the RL trial's 0-d log_alpha."""
  with x64():
    p = jnp.zeros(())
    tx = oc.inject_hyperparams(oc.sgd)(learning_rate=0.1, momentum=0.9)
    state = tx.init(p)
    for update in (tx.update, jax.jit(tx.update)):
      assert float(update(0.3, state, p)[0]) == -0.3 * 0.1


def test_an_unfiltered_equinox_model_as_params_is_named():
  """The message said ".activation is missing", with no word of eqx.filter (Optax's update
  happens to run on the unfiltered model)."""
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
  grads = eqx.filter_grad(lambda m, x: jnp.sum(m(x)))(model, jnp.ones(2))
  tx = oc.adamw(1e-3)
  state = tx.init(eqx.filter(model, eqx.is_array))
  with pytest.raises(ValueError, match=r"not an array: .*eqx\.filter\(model, eqx\.is_array\)"):
    tx.update(grads, state, model)
  tx.update(grads, state, eqx.filter(model, eqx.is_array))


def test_join_schedules_checks_the_order_of_its_final_boundary_too():
  """Documented as checked, the final boundary (where the last schedule ends) was cut off
  before the order check: [100, 50] for two schedules passed."""
  two = [oc.constant_schedule(1.0), oc.constant_schedule(0.5)]
  with pytest.raises(ValueError, match=r"non-decreasing, got \[100, 50\]"):
    oc.join_schedules(two, [100, 50])
  assert float(oc.join_schedules(two, [100, 200])(150)) == 0.5
