"""The bad-input contract: one row per kind of bad input, the same rows as the table of
docs/bad-input.md.

Each row says what the input gets (an exception of a given type whose message names the
argument or tree path, or a documented skip) and is checked here. Rows that call ``update``
or ``apply_updates`` also prove that nothing is corrupted: the call is made eagerly and again
under ``jax.jit`` with parameters and state *donated*, and afterwards both are still alive
and bitwise what they were (the error is raised while tracing, before any buffer is given up).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc

PARAMS = {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "bias": jnp.zeros(2)}}
GRADS = jax.tree.map(lambda p: jnp.cos(p) + 0.5, PARAMS)


class Row(NamedTuple):
  id: str
  bad_input: str
  response: str
  error: Optional[type]  # None: a documented skip, checked by `check`
  names: str  # a regex the message must contain (the argument or the tree path)
  check: Callable  # raises (or, for a skip, asserts the skip) when called


def _update_call(tx, grads, params=PARAMS, with_params=True):
  """(fn(params, state), params, state): the call to check eagerly and with donation."""
  state = tx.init(params)

  def call(p, s):
    return tx.update(grads, s, p) if with_params else tx.update(grads, s)

  return call, params, state


def _nan_skip():
  tx = oc.apply_if_finite(oc.adam(1e-2), max_consecutive_errors=3)
  state = tx.init(PARAMS)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), GRADS)
  updates, new_state = jax.jit(tx.update)(bad, state, PARAMS)
  params = oc.apply_updates(PARAMS, updates)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(PARAMS)):
    np.testing.assert_array_equal(a, b)  # the step is skipped: parameters unchanged
  for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(a, b)  # and the inner optimizer's state too
  assert int(new_state.notfinite_count) == 1


ROWS = [
  Row(
    "hyperparameter-out-of-range",
    "a hyperparameter outside its range (`b1=1.0`, `learning_rate=-0.1`, `eps=-1e-8`)",
    "`ValueError` at construction, naming it",
    ValueError,
    "`b1`",
    lambda: oc.adam(1e-3, b1=1.0),
  ),
  Row(
    "hyperparameter-not-finite",
    "a NaN or infinite hyperparameter",
    "`ValueError` at construction, naming it",
    ValueError,
    "`learning_rate`",
    lambda: oc.sgd(float("inf")),
  ),
  Row(
    "hyperparameter-not-scalar",
    "an array, string or bool where a number is expected",
    "`ValueError`/`TypeError` at construction, naming it",
    (ValueError, TypeError),
    "`learning_rate`",
    lambda: oc.adam(jnp.ones(3)),
  ),
  Row(
    "traced-hyperparameter-not-scalar",
    "a traced array or bool where a number is expected (an optimizer built inside `jax.jit` "
    "from an argument: an array would broadcast over the parameters, a per-element rate)",
    "`ValueError`/`TypeError` at construction, naming it (a scalar traced under `jax.vmap` "
    "is a scalar: a sweep over learning rates works)",
    ValueError,
    "sgd: `learning_rate` expected a scalar, got an array of shape \\(3,\\)",
    lambda: jax.jit(lambda lr: oc.sgd(lr).init(PARAMS))(jnp.full(3, 0.1)),
  ),
  Row(
    "schedule-out-of-range",
    "a schedule whose value at step 0 is out of range",
    "`ValueError` from `init`, naming the hyperparameter",
    ValueError,
    "`b1`",
    lambda: oc.adam(1e-3, b1=lambda count: 1.0 + 0.0 * jnp.asarray(count, jnp.float32)).init(
      PARAMS
    ),
  ),
  Row(
    "schedule-leaves-range",
    "a schedule of `optcompose.schedules` whose later values leave the range (a negative "
    "peak or floor, `b1` reaching 1; Optax would then step uphill)",
    "`ValueError` at construction, naming the hyperparameter and the value (each schedule "
    "records its start, peak, floor and end; a function of your own is checked at step 0)",
    ValueError,
    r"sgd: `learning_rate` must lie in \[0, inf\), got -0.1\. The schedule given as",
    lambda: oc.sgd(oc.warmup_cosine_decay_schedule(0.0, -0.1, 5, 50)),
  ),
  Row(
    "sgd-prox-momentum-one",
    "`sgd(lr, momentum=1, l1=...)` (or `l2`): its proximal step is lr / (1 - momentum)",
    "`ValueError` at construction, naming `momentum` (a buffer that never forgets never settles)",
    ValueError,
    r"sgd: `momentum` must be below 1 with `l1`/`l2`",
    lambda: oc.sgd(0.1, 1.0, l1=0.5),
  ),
  Row(
    "schedule-grows-unbounded",
    "a schedule that grows without bound (`exponential_decay` with `decay_rate > 1` and no "
    "`end_value`) for a hyperparameter bounded above (`b2` passes 1 at step 12 here)",
    "`ValueError` at construction, naming it (a learning rate's range test is accepted: "
    "it has no upper bound)",
    ValueError,
    r"adam: `b2` must lie in \[0, 1\), got 3.40\d*e\+38\. .* grows without bound",
    lambda: oc.adam(1e-2, b2=oc.exponential_decay(0.9, 10, 1.1)),
  ),
  Row(
    "integer-params",
    "integer or boolean parameters",
    "`TypeError` from `init`, naming the leaf",
    TypeError,
    r"params\['n'\]",
    lambda: oc.adam(1e-3).init({"w": jnp.ones(2), "n": jnp.arange(2)}),
  ),
  Row(
    "params-not-arrays",
    "a leaf of the parameters that is not an array (a string) for an optimizer that keeps "
    "state per parameter (a stateless one, `sgd` without momentum, leaves it alone, as "
    "Optax's: its `init` takes an Equinox model whole, functions among its leaves)",
    "`TypeError` from `init`, naming the leaf",
    TypeError,
    r"params\['name'\]` is a str",
    lambda: oc.sgd(1e-3, momentum=0.9).init({"w": jnp.ones(2), "name": "abc"}),
  ),
  Row(
    "integer-gradients",
    "integer or boolean gradients (`jax.grad` never makes them: "
    "labels or counts passed by mistake)",
    "`TypeError` from `update`, naming the leaf "
    "(never truncated to a zero step, never a boolean ascent step; `identity` and "
    "`set_to_zero` pass them through)",
    TypeError,
    r"updates\['dense'\]\['bias'\]` has dtype int32",
    _update_call(
      oc.sgd(0.1), {"dense": {"kernel": GRADS["dense"]["kernel"], "bias": jnp.array([1, 2])}}
    ),
  ),
  Row(
    "complex-gradients",
    "complex gradients of real parameters",
    "`TypeError` from `update`, naming the leaf (a real state would drop the imaginary part, "
    "or become complex)",
    TypeError,
    r"`updates\['dense'\]\['bias'\]` is complex but `params\['dense'\]\['bias'\]` is real",
    _update_call(
      oc.adam(0.1),
      {"dense": {"kernel": GRADS["dense"]["kernel"], "bias": jnp.full(2, 1j, jnp.complex64)}},
    ),
  ),
  Row(
    "state-count-not-integer",
    "a state whose step count is not an integer scalar (the whole state cast to bfloat16, "
    "whose count would stop at 256 and freeze the schedules)",
    "`TypeError` from `update`, naming `state.count`",
    TypeError,
    r"`state.count` must be an integer scalar \(int32, as init makes it\), got bfloat16",
    (
      lambda p, s: oc.adam(0.1).update(GRADS, s, p),
      PARAMS,
      jax.tree.map(lambda x: x.astype(jnp.bfloat16), oc.adam(0.1).init(PARAMS)),
    ),
  ),
  Row(
    "integer-state-dtype",
    "an integer or boolean `mu_dtype`, `nu_dtype`, `accumulator_dtype` or `hyperparam_dtype`",
    "`TypeError` at construction, naming it (the state would be truncated)",
    TypeError,
    "`mu_dtype`",
    lambda: oc.adam(1e-3, mu_dtype=jnp.int32),
  ),
  Row(
    "hyperparameter-rounds-out-of-range",
    "a value in range in float64 but not in the "
    "dtype it is used in (`b1=1 - 1e-9` is 1.0 in float32; `1e39` is inf)",
    "`ValueError` at construction, naming it and the rounded value",
    ValueError,
    r"`b1` must lie in \[0, 1\), got 0.999999999 \(1.0 in float32",
    lambda: oc.adam(1e-3, b1=1 - 1e-9),
  ),
  Row(
    "eps-zero",
    "`eps=0` where nothing else keeps the denominator from 0 (Adam with "
    "`eps_root=0`, RMSProp): a zero gradient gives 0 / 0 = NaN (Optax accepts it)",
    "`ValueError` at construction, naming `eps` (and `eps_root`)",
    ValueError,
    "`eps` and `eps_root` are both 0",
    lambda: oc.adam(1e-3, eps=0.0),
  ),
  Row(
    "eps-schedule-zero",
    "an `eps` schedule that reaches 0 (`cosine_decay_schedule(1e-8, n)`) beside "
    "`eps_root=0`: NaN from step n for a gradient that stayed 0",
    "`ValueError` at construction, as for `eps=0` (two schedules that each reach 0, "
    "possibly at different steps, are accepted)",
    ValueError,
    "`eps` and `eps_root` are both 0 .*got a schedule reaching 0 and 0.0",
    lambda: oc.adam(1e-3, eps=oc.cosine_decay_schedule(1e-8, 10)),
  ),
  Row(
    "eps-subnormal",
    "an `eps` below float32's smallest normal number (`rmsprop(eps=1e-40)`, `adamax`, "
    "`adadelta`, `scale_by_stddev`, Adafactor's `epsilon`) where it alone keeps the "
    "denominator from 0: XLA CPU flushes it to 0, and a zero gradient gives NaN (Optax "
    "accepts it)",
    "`ValueError` at construction, naming `eps`",
    ValueError,
    r"`eps` = 1e-40 is below float32's smallest normal number",
    lambda: oc.rmsprop(1e-3, eps=1e-40),
  ),
  Row(
    "set-hyperparams-invalid",
    "`set_hyperparams` with a value construction would reject "
    "(`b1=1.0`, NaN, a negative rate, a bool, a string)",
    "`ValueError`/`TypeError`, naming it; validated as stored (in its dtype)",
    (ValueError, TypeError),
    "`b1`",
    lambda: oc.set_hyperparams(oc.inject_hyperparams(oc.adam)(1e-3).init(PARAMS), b1=1.0),
  ),
  Row(
    "set-hyperparams-ambiguous",
    "`set_hyperparams` with a name two injected optimizers hold",
    "`ValueError` listing both paths, to be given instead of the name",
    ValueError,
    r"`learning_rate` is held in 2 places",
    lambda: oc.set_hyperparams(
      oc.partition(
        {"a": oc.inject_hyperparams(oc.sgd)(0.1), "b": oc.inject_hyperparams(oc.sgd)(0.2)},
        {"dense": {"kernel": "a", "bias": "b"}},
      ).init(PARAMS),
      learning_rate=0.5,
    ),
  ),
  Row(
    "updates-structure",
    "gradients whose tree differs from the state's (a leaf missing)",
    "`ValueError` from `update`, naming the path",
    ValueError,
    r"\['dense'\]\['bias'\]",
    _update_call(oc.adam(1e-3), {"dense": {"kernel": GRADS["dense"]["kernel"]}}),
  ),
  Row(
    "updates-shape",
    "a gradient of another shape than its parameter (would broadcast)",
    "`ValueError` from `update`, naming the path and both shapes",
    ValueError,
    r"updates\['dense'\]\['kernel'\]` has shape \(3, 1\)",
    _update_call(oc.sgd(1e-3, 0.9), {"dense": {"kernel": jnp.ones((3, 1)), "bias": jnp.ones(2)}}),
  ),
  Row(
    "updates-shape-stateless",
    "the same through a transformation without state of the parameters' shapes (plain SGD, "
    "`clip`, `clip_by_global_norm`; Optax passes it on, and Flax's `apply_gradients` "
    "broadcasts it)",
    "`ValueError` from `update`, naming the path and both shapes",
    ValueError,
    r"`updates\['dense'\]\['kernel'\]` has shape \(3, 1\) but `params.* \(it would be broadcast\)",
    _update_call(oc.sgd(1e-3), {"dense": {"kernel": jnp.ones((3, 1)), "bias": jnp.ones(2)}}),
  ),
  Row(
    "apply-updates-mismatch",
    "`apply_updates` with a tree or shape that differs",
    "`ValueError`, naming the path",
    ValueError,
    r"\['dense'\]\['bias'\]",
    (
      lambda p, s: oc.apply_updates(
        p, {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(3)}}
      ),
      PARAMS,
      (),
    ),
  ),
  Row(
    "apply-updates-integer",
    "a float update for an integer parameter",
    "`TypeError`, naming the leaf (never truncated)",
    TypeError,
    r"params\['n'\]",
    (lambda p, s: oc.apply_updates(p, {"n": jnp.full(3, 0.4)}), {"n": jnp.arange(3)}, ()),
  ),
  Row(
    "mask-structure",
    "a mask that does not match the parameters",
    "`ValueError` from `init`, naming `mask` and the differing path",
    ValueError,
    r"`mask`.*\['dense'\]\['bias'\] is missing",
    lambda: oc.adamw(1e-3, mask={"dense": {"kernel": True, "scale": False}}).init(PARAMS),
  ),
  Row(
    "mask-not-boolean",
    "a mask with non-boolean leaves",
    "`TypeError` from `init`, naming the leaf",
    TypeError,
    r"mask\['dense'\]\['bias'\]",
    lambda: oc.adamw(1e-3, mask={"dense": {"kernel": 1, "bias": 0}}).init(PARAMS),
  ),
  Row(
    "missing-params",
    "`update` without `params` where they are needed (weight decay, L1, lookahead)",
    "`ValueError`, naming `params`",
    ValueError,
    "`params`",
    _update_call(oc.adamw(1e-3), GRADS, with_params=False),
  ),
  Row(
    "foreign-state",
    "a state from another optimizer",
    "`ValueError`, saying what was expected",
    ValueError,
    "chain of 2 transformations",
    (lambda p, s: oc.adam(1e-3).update(GRADS, s, p), PARAMS, (oc.scale_by_adam().init(PARAMS),)),
  ),
  Row(
    "foreign-member-state",
    "a state from another optimizer of the same length",
    "`ValueError` from the first `update`, naming the member's path and the state type expected",
    ValueError,
    r"state\[0\] is a TraceState, expected a ScaleByAdamState",
    (lambda p, s: oc.adam(1e-3).update(GRADS, s, p), PARAMS, oc.sgd(1e-3, 0.9).init(PARAMS)),
  ),
  Row(
    "averager-not-last",
    "`ema_params` or `swa` (alone, or inside a wrapper: `inject_hyperparams`, `partition`, "
    "`masked`, ...) followed in a chain by a transformation "
    "that changes the updates (the average would be of params + raw gradient)",
    "`ValueError` at construction, naming both positions",
    ValueError,
    "argument 0 averages the parameters",
    lambda: oc.chain(oc.ema_params(0.9), oc.sgd(0.1)),
  ),
  Row(
    "not-a-transformation",
    "something that is not a transformation in `chain`",
    "`TypeError`, naming its position",
    TypeError,
    "argument 1",
    lambda: oc.chain(oc.scale(1.0), lambda g: g),
  ),
  Row(
    "update-not-a-pair",
    "a transformation of your own whose `update` returns the updates alone (a dict of two "
    "parameters would unpack into its keys), in `chain` or `inject_hyperparams`",
    "`TypeError` from the first `update`, naming the member",
    TypeError,
    r"chain: member 1: `update` must return a pair \(updates, new_state\), got dict",
    _update_call(
      oc.chain(
        oc.sgd(0.1), oc.GradientTransformation(oc.init_empty_state, lambda u, s, p=None, **_: u)
      ),
      GRADS,
    ),
  ),
  Row(
    "flat-per-leaf",
    "`FlatParams` given to a transformation computing one value per model leaf (the "
    "per-leaf clippings, trust ratios and block scales, `sm3`, a factored `adafactor`; "
    "docs/performance.md lists them)",
    "`TypeError`, naming the transformation",
    TypeError,
    "clip_by_leaf_norm",
    lambda: oc.clip_by_leaf_norm(1.0).update(
      oc.flat_params(GRADS), oc.EmptyState(), oc.flat_params(PARAMS)
    ),
  ),
  Row(
    "unsharded-abstract-params",
    "abstract parameters without a sharding for `sharding.state_shardings`",
    "`ValueError`, naming the leaf",
    ValueError,
    r"params\['w'\]",
    lambda: oc.sharding.state_shardings(
      oc.adam(1e-3), {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    ),
  ),
  Row(
    "flat-optimizer-given-flat-params",
    "`FlatParams` given to a `flat_optimizer`'s `init` (it packs the model's tree itself)",
    "`TypeError`, saying to pass the model's tree or to give the FlatParams to the "
    "transformation inside",
    TypeError,
    r"flat_optimizer: `params` is a FlatParams.*params.unflatten\(\)",
    lambda: oc.flat_optimizer(oc.adam(1e-3)).init(oc.flat_params(PARAMS)),
  ),
  Row(
    "flat-split-params",
    "parameters split over devices on explicit mesh axes, given to `flat_params` or a "
    "`flat_optimizer` (a bucket cannot keep a leaf's sharding)",
    "`ValueError`, naming the leaf and saying to place it replicated or to keep per-leaf state",
    ValueError,
    r"flat_optimizer: `params\['w'\]` is split over the mesh.*replicated",
    lambda: _flat_split_params(),
  ),
  Row(
    "average-shape",
    "`incremental_update` or `periodic_update` trees of other structures or leaf shapes",
    "`ValueError`, naming the function and the first path (never broadcast)",
    ValueError,
    r"incremental_update: `new_tensors\['w'\]` has shape \(3, 1\)",
    lambda: oc.incremental_update({"w": jnp.ones((3, 1))}, {"w": jnp.zeros(3)}, 0.5),
  ),
  Row(
    "checkpoint-over-a-file",
    "`save_checkpoint` to a path holding a file it did not write (a mistyped path: a script, "
    "another tool's data), or to a directory",
    "`ValueError` naming the path; the file is left as it was (a checkpoint of ours, or an "
    "empty file, is replaced)",
    ValueError,
    r"train.py exists and is not an optcompose checkpoint",
    lambda: _checkpoint_over_a_file(),
  ),
  Row(
    "checkpoint-over-foreign-weights",
    "`save_checkpoint` to an existing msgpack state dict of another tree (downloaded "
    '`{"params": ...}` weights at a mistyped path)',
    "`ValueError` naming the file and the first differing path; the file is left as it was "
    "(an older checkpoint of the same whole tree is replaced)",
    ValueError,
    r"not an optcompose checkpoint \(it is a msgpack state dict of another tree",
    lambda: _checkpoint_over_weights(),
  ),
  Row(
    "checkpoint-flat-no-layout",
    "a template holding a `FlatParams` restored from a checkpoint that records no layout "
    "(written by Orbax alone: `CheckpointManager`, `StandardCheckpointer`)",
    "`ValueError` before anything is restored, naming the FlatParams' path and `layouts=` "
    "(never values restored into another leaf's slots)",
    ValueError,
    r"records no layout for the FlatParams at `\['p'\]`.*layouts=",
    lambda: _checkpoint_flat_no_layout(),
  ),
  Row(
    "orbax-leaf",
    "`save_orbax_checkpoint` of a leaf Orbax cannot store (a string, a complex Python number)",
    "`TypeError` naming the leaf, before anything is written",
    TypeError,
    r"`\['name'\]` is a str, which Orbax does not store",
    lambda: oc.checkpoint.save_orbax_checkpoint(
      Path(__import__("tempfile").mkdtemp()) / "c", {"name": "run-1", "w": jnp.ones(2)}
    ),
  ),
  Row(
    "orbax-array-leaf",
    "`save_orbax_checkpoint` of an array or number Orbax stores wrongly or not at all (a dtype "
    "TensorStore lacks: `uint4`, strings, dates; an empty, `float0`, object or deleted array; "
    "an int wider than 64 bits)",
    "`TypeError` naming the leaf, before anything is written (it failed inside Orbax, naming "
    "none, and left a temporary directory)",
    TypeError,
    r"`\['q'\]` is an array of dtype uint4, which Orbax \(TensorStore\) does not store",
    lambda: oc.checkpoint.save_orbax_checkpoint(
      Path(__import__("tempfile").mkdtemp()) / "c", {"q": jnp.ones(2, jnp.uint4)}
    ),
  ),
  Row(
    "orbax-path-bracket",
    "`save_orbax_checkpoint` to a path with `[` or `]` in it (`run[lr=0.1]`)",
    "`ValueError` naming the character, before anything is written (Orbax wrote a checkpoint "
    "without its arrays there, and reported success)",
    ValueError,
    r"run\[lr=0.1\] has a '\[' in it.*use another name",
    lambda: oc.checkpoint.save_orbax_checkpoint(
      Path(__import__("tempfile").mkdtemp()) / "run[lr=0.1]", {"w": jnp.ones(2)}
    ),
  ),
  Row(
    "msgpack-leaf",
    "`save_checkpoint` of a leaf a msgpack file would not read back as it was (`np.str_`, a "
    "string, `float0`, structured or big-endian array, an int wider than 64 bits, a deleted "
    "array)",
    "`TypeError` naming the leaf, before anything is written (the previous checkpoint stays; "
    "it was replaced by a file no restore could read)",
    TypeError,
    r"`\['meta'\]` is an array of strings",
    lambda: oc.checkpoint.save_checkpoint(
      Path(__import__("tempfile").mkdtemp()) / "c.msgpack", {"meta": np.array(["adamw"])[0]}
    ),
  ),
  Row(
    "checkpoint-number-overflow",
    "a Python number saved in a checkpoint, restored into a 0-d template whose dtype cannot "
    "hold it (`2**40` into int32, `1e300` into float32)",
    "`CheckpointMismatchError` naming the path (never inf, never wrapped around)",
    ValueError,
    r"`\['x'\]` is the Python float 1e\+300 in the checkpoint but a 0-d array of dtype float32",
    lambda: _checkpoint_number_overflow(),
  ),
  Row(
    "checkpoint-not-a-file",
    "`save_checkpoint` or `restore_checkpoint` of a path that is a FIFO or a device",
    "`ValueError` naming the path, before it is opened (a FIFO waited for a writer forever, "
    "a device was read without end)",
    ValueError,
    r"c.msgpack is a FIFO \(named pipe\), not a regular file",
    lambda: _checkpoint_fifo(),
  ),
  Row(
    "checkpoint-mismatch",
    "a checkpoint restored into a template of another structure, shape or dtype",
    "`CheckpointMismatchError` (a `ValueError`), naming the first path",
    ValueError,
    r"\['w'\]",
    lambda: _checkpoint_mismatch(),
  ),
  Row(
    "checkpoint-corrupt",
    "a checkpoint whose bytes changed after it was written (a flipped bit), msgpack or Orbax",
    "`CheckpointCorruptError` (a `ValueError`) on restore, naming the leaf",
    ValueError,
    r"the data of `\['w'\]`",
    lambda: _checkpoint_flipped(),
  ),
  Row(
    "checkpoint-flat-layout",
    "a `FlatParams` checkpoint restored into another layout "
    "(buckets of the same sizes, leaves of other shapes)",
    "`CheckpointMismatchError`, "
    "naming the first leaf that differs (never values shuffled between layers)",
    ValueError,
    r"has another layout: its leaf 0 is `\['a'\]`",
    lambda: _checkpoint_flat_layout(),
  ),
  Row(
    "early-stopping-mode",
    "`early_stopping(mode=...)` other than \"min\"/\"max\", or a negative `patience`/`min_delta`",
    "`ValueError` at construction, naming it",
    ValueError,
    "`mode`",
    lambda: oc.early_stopping(mode="minimize"),
  ),
  Row(
    "non-finite-gradients",
    "NaN or infinite gradients",
    "propagated by default, as in Optax and PyTorch; wrapped in `apply_if_finite` the step "
    "is skipped: parameters and the inner state unchanged, the skip counted",
    None,
    "",
    _nan_skip,
  ),
  Row(
    "unknown-keywords",
    "keyword arguments to `update` that a transformation does not use",
    "ignored (so one training step can serve every optimizer)",
    None,
    "",
    lambda: oc.adam(1e-3).update(GRADS, oc.adam(1e-3).init(PARAMS), PARAMS, not_an_argument=1.0),
  ),
  Row(
    "lookahead-shape",
    "`lookahead` gradients, fast or slow weights of mismatched shapes (would broadcast)",
    "`ValueError` from `update`, naming the path and both shapes",
    ValueError,
    r"`params.slow\['dense'\]\['kernel'\]` has shape \(1, 2\)",
    (
      lambda p, s: oc.lookahead(oc.sgd(1e-3), 2, 0.5).update(GRADS, s, p),
      oc.LookaheadParams(PARAMS, {"dense": {"kernel": jnp.ones((1, 2)), "bias": jnp.zeros(2)}}),
      oc.lookahead(oc.sgd(1e-3), 2, 0.5).init(PARAMS),
    ),
  ),
  Row(
    "lookahead-slow-weights",
    "`lookahead_in_state` parameters of another shape or dtype "
    "than the slow weights kept in its state",
    "`ValueError` (`TypeError` for a dtype) from "
    "`update`, naming the path and both shapes (dtypes)",
    ValueError,
    r"`params\['dense'\]\['kernel'\]` has shape \(1, 2\) but `state.slow",
    (
      lambda p, s: oc.lookahead_in_state(oc.sgd(1e-3), 2, 0.5).update(p, s, p),
      {"dense": {"kernel": jnp.ones((1, 2)), "bias": jnp.zeros(2)}},
      oc.lookahead_in_state(oc.sgd(1e-3), 2, 0.5).init(PARAMS),
    ),
  ),
  Row(
    "sam-shape",
    "`sam` gradients of another shape than the parameters (would broadcast)",
    "`ValueError` from `update`, naming the path and both shapes",
    ValueError,
    r"`updates\['dense'\]\['kernel'\]` has shape \(1, 2\)",
    _update_call(
      oc.sam(oc.sgd(1e-3), oc.sgd(1e-2)),
      {"dense": {"kernel": jnp.ones((1, 2)), "bias": jnp.ones(2)}},
    ),
  ),
  Row(
    "early-stopping-dtype",
    "`early_stopping` best parameters of another dtype (or shape) than those given to `init`",
    "`TypeError` (`ValueError` for a shape) from `update`, "
    "naming the path and both dtypes; never rounded to the kept dtype",
    TypeError,
    r"`best_params\['dense'\]\['bias'\]` has dtype bfloat16",
    (
      lambda p, s: oc.early_stopping().update(s, 0.5, p),
      jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS),
      oc.early_stopping().init(PARAMS),
    ),
  ),
  Row(
    "partition-mixed-labels",
    "`partition` labels of mixed types (`0` and `\"x\"`)",
    "`TypeError` at construction, listing the labels (JAX sorts the state's dict keys)",
    TypeError,
    r"`transforms`.*\['x', 0\]",
    lambda: oc.partition(
      {0: oc.sgd(1e-3), "x": oc.sgd(1e-3)}, {"dense": {"kernel": 0, "bias": "x"}}
    ),
  ),
  Row(
    "path-matches-nothing",
    "a `mask_from_paths` `include` pattern (or a "
    "`labels_from_paths` rule) that matches no parameter path (a typo)",
    "`ValueError` "
    "from `init`, naming the argument and the pattern and listing paths (an all-False mask "
    "would pass raw gradients through `masked`: an ascent step)",
    ValueError,
    r"`include`.*'attention'",
    lambda: oc.masked(oc.sgd(0.1), oc.mask_from_paths(include="attention")).init(PARAMS),
  ),
  Row(
    "labels-rule-shadowed",
    "a `labels_from_paths` rule that matches paths but never assigns its label (each is "
    "taken by an earlier rule found in its regex: `[('dense', 'a'), ('dense.*kernel', "
    "'b')]`), so its leaves train in another group",
    "`ValueError` from `init`, naming both rules and a path (put the more specific rule first)",
    ValueError,
    r"`rules\[1\]` \('dense\.\*kernel', 'b'\) never assigns its label.*`rules\[0\]`",
    lambda: oc.partition(
      {"a": oc.sgd(0.1), "b": oc.sgd(0.2)},
      oc.labels_from_paths([("dense", "a"), ("dense.*kernel", "b")]),
    ).init(PARAMS),
  ),
  Row(
    "partition-not-a-transformation",
    "a value of `partition`'s `transforms` that is not a transformation",
    "`TypeError` at construction, naming `transforms[label]`",
    TypeError,
    r"`transforms\['a'\]` is float",
    lambda: oc.partition({"a": 0.1, "b": oc.sgd(0.1)}, {"dense": {"kernel": "a", "bias": "b"}}),
  ),
  Row(
    "path-regex",
    "an invalid regex in `mask_from_paths` or `labels_from_paths`",
    "`ValueError` at construction, naming the argument, the pattern and the regex error",
    ValueError,
    r"`include` is not a valid regex: '\['",
    lambda: oc.mask_from_paths(include="["),
  ),
  Row(
    "path-regex-escaped-pipe",
    "a backslash before a pipe in a `mask_from_paths` or `labels_from_paths` pattern "
    "(a Markdown table's escape, copied): a literal pipe, so an `exclude` would exclude "
    "nothing (weight decay on biases and norms)",
    "`ValueError` at construction, naming the argument and the pattern without the backslash",
    ValueError,
    r"`exclude` 'bias\\\\\|scale' has .*write 'bias\|scale'",
    lambda: oc.mask_from_paths(exclude="bias\\|scale"),
  ),
  Row(
    "update-arguments-swapped",
    "an optimizer state passed where the updates go (`tx.update(state, grads)`)",
    "`TypeError` naming the state's class and the order of the arguments (it was a dtype "
    "error about `updates.count`)",
    TypeError,
    r"`updates` is a ScaleByAdamState, an optimizer state: the arguments are "
    r"update\(updates, state, params\)",
    lambda: oc.scale_by_adam().update(oc.scale_by_adam().init(PARAMS), PARAMS),
  ),
  Row(
    "schedule-step-count",
    "a schedule's step count beyond int32 (`transition_steps=2**40`, "
    "boundaries, warmup steps, cycle lengths)",
    "`ValueError` at construction, naming the argument and the limit 2**31 - 1",
    ValueError,
    r"`transition_steps` must be <= 2\*\*31",
    lambda: oc.exponential_decay(1.0, 2**40, 0.5),
  ),
  Row(
    "schedule-zero-steps",
    "a `linear_schedule` or `polynomial_schedule` of 0 steps (Optax's: constant at "
    "`init_value`, never reaching `end_value`) given to an optimizer, or joined where it is used",
    "`ValueError` when the optimizer is built, naming the argument; accepted as a segment of "
    "`join_schedules` that is never used (a warmup of 0 steps before boundary 0)",
    ValueError,
    r"`learning_rate`: linear_schedule with `transition_steps` = 0 stays at `init_value`",
    lambda: oc.adamw(oc.linear_schedule(0.0, 1e-3, 0)),
  ),
  Row(
    "schedule-phase-collision",
    "`linear_onecycle_schedule` phases ending at the same step "
    "(`int(pct * transition_steps)` equal)",
    "`ValueError` at construction, naming "
    "`pct_start` and `pct_final` (one phase would silently replace another)",
    ValueError,
    "`pct_final`",
    lambda: oc.linear_onecycle_schedule(10, 1.0, 0.3, 0.35),
  ),
  Row(
    "multi-steps-k-schedule",
    "a `multi_steps` k schedule returning a non-integer (`2.7`, a float array)",
    "`TypeError` from `init` (or while tracing `update`), naming "
    "`every_k_schedule`; never truncated",
    TypeError,
    "`every_k_schedule`",
    lambda: oc.multi_steps(oc.sgd(1e-3), lambda step: 2.7).init(PARAMS),
  ),
]


def _checkpoint_mismatch():
  import tempfile

  path = Path(tempfile.mkdtemp()) / "c.msgpack"
  oc.checkpoint.save_checkpoint(path, {"w": jnp.ones(3, jnp.bfloat16)})
  oc.checkpoint.restore_checkpoint(path, {"w": jnp.ones(3, jnp.float32)})


def _checkpoint_number_overflow():
  import tempfile

  path = Path(tempfile.mkdtemp()) / "c.msgpack"
  oc.checkpoint.save_checkpoint(path, {"x": 1e300})
  oc.checkpoint.restore_checkpoint(path, {"x": jnp.zeros([], jnp.float32)})


def _checkpoint_fifo():
  import os
  import tempfile

  path = Path(tempfile.mkdtemp()) / "c.msgpack"
  os.mkfifo(path)
  oc.checkpoint.save_checkpoint(path, {"w": jnp.ones(2)})


def _checkpoint_over_a_file():
  import tempfile

  script = Path(tempfile.mkdtemp()) / "train.py"
  script.write_text("print('training')\n")
  try:
    oc.checkpoint.save_checkpoint(script, {"w": jnp.ones(3)})
  finally:
    assert script.read_text() == "print('training')\n"


def _checkpoint_over_weights():
  import tempfile

  from flax import serialization

  path = Path(tempfile.mkdtemp()) / "pretrained.msgpack"
  weights = serialization.to_bytes({"params": {"kernel": np.ones((3, 3), np.float32)}})
  path.write_bytes(weights)
  try:
    oc.checkpoint.save_checkpoint(path, {"params": {"w": jnp.zeros(2)}})
  finally:
    assert path.read_bytes() == weights


def _checkpoint_flat_no_layout():
  import tempfile

  import orbax.checkpoint as ocp

  path = Path(tempfile.mkdtemp()) / "plain"
  with ocp.StandardCheckpointer() as checkpointer:  # Orbax alone: no layout recorded
    checkpointer.save(path, {"p": oc.flat_params({"a": jnp.ones(2), "b": jnp.ones(3)})})
  target = {"p": oc.flat_params({"a": jnp.ones(3), "b": jnp.ones(2)})}
  oc.checkpoint.restore_orbax_checkpoint(path, target)


def _checkpoint_flipped():
  import tempfile

  path = Path(tempfile.mkdtemp()) / "c.msgpack"
  w = np.arange(1000, dtype=np.float32)
  oc.checkpoint.save_checkpoint(path, {"w": w})
  data = bytearray(path.read_bytes())
  data[data.find(w.tobytes()) + 2001] ^= 0x01
  path.write_bytes(bytes(data))
  oc.checkpoint.restore_checkpoint(path, {"w": w})


def _checkpoint_flat_layout():
  import tempfile

  path = Path(tempfile.mkdtemp()) / "c.msgpack"
  oc.checkpoint.save_checkpoint(path, oc.flat_params({"a": jnp.ones(2), "b": jnp.ones(3)}))
  oc.checkpoint.restore_checkpoint(path, oc.flat_params({"a": jnp.ones(3), "b": jnp.ones(2)}))


def _flat_split_params():
  """A leaf split on its second dimension over explicit axes: ``flat_optimizer``'s ``init``."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec

  if len(jax.devices()) < 2 or not hasattr(jax.sharding, "reshard"):
    pytest.skip("needs 2 devices and explicit sharding (JAX 0.7 or later)")
  mesh = jax.make_mesh((2,), ("fsdp",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
  split = NamedSharding(mesh, PartitionSpec(None, "fsdp"))
  jax.jit(oc.flat_optimizer(oc.adam(1e-3)).init)({"w": jax.device_put(jnp.ones((4, 6)), split)})


def _alive_and_equal(tree, snapshot):
  for leaf, saved in zip(jax.tree.leaves(tree), jax.tree.leaves(snapshot)):
    assert not leaf.is_deleted(), "a rejected call consumed a donated buffer"
    np.testing.assert_array_equal(np.asarray(leaf), saved)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_contract_row(row):
  if row.error is None:
    row.check()  # a documented skip or acceptance: the check asserts it
    return
  if isinstance(row.check, tuple):  # a call on (params, state): check nothing is corrupted
    call, params, state = row.check
    params = jax.tree.map(jnp.copy, params)
    state = jax.tree.map(jnp.copy, state)
    snapshot = jax.tree.map(np.asarray, (params, state))
    with pytest.raises(row.error, match=row.names):
      call(params, state)
    with pytest.raises(row.error, match=row.names):
      jax.jit(call, donate_argnums=(0, 1))(params, state)
    _alive_and_equal((params, state), snapshot)
  else:
    with pytest.raises(row.error, match=row.names):
      row.check()


def test_docs_table_lists_exactly_these_rows():
  text = (Path(__file__).parents[1] / "docs" / "bad-input.md").read_text()
  ids = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M)
  assert ids == [r.id for r in ROWS]


def readme_table() -> str:
  """The table of docs/bad-input.md, generated from ROWS (``python tests/test_bad_input.py``)."""
  lines = ["| row | bad input | what it gets |", "|---|---|---|"]
  lines += [f"| `{r.id}` | {r.bad_input} | {r.response} |" for r in ROWS]
  return "\n".join(lines)


if __name__ == "__main__":
  print(readme_table())
