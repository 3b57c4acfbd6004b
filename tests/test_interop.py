"""Interop both ways: optcompose inside Optax and Flax, Optax inside optcompose.

Trajectories of ours against Optax's run in float64 (tests/numerics.py): two programs agree
there to rounding on every CPU, while float32 runs of a non-convex MLP drift apart by more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optcompose as oc
from numerics import F64_RTOL, assert_rel_close, standard_promotion, x64
from problems import mlp, run

pytestmark = pytest.mark.numerics


def assert_trees_close(a, b, rtol=F64_RTOL):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(a))
  assert_rel_close(a, b, rtol)


def final_params_f64(tx, steps, apply_updates):
  with x64():
    path, _ = run(tx, mlp(jnp.float64), steps, True, apply_updates)
    return path[-1]


@pytest.mark.float64
def test_optcompose_inside_optax_chain():
  prob = mlp()
  ours = optax.chain(optax.clip_by_global_norm(0.5), oc.adamw(1e-2, weight_decay=0.1))
  ref = standard_promotion(
    optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.1))
  )
  assert_trees_close(
    final_params_f64(ours, 100, optax.apply_updates),
    final_params_f64(ref, 100, optax.apply_updates),
  )
  # optax.chain passes extra keyword arguments; they reach our update without error.
  state = ours.init(prob.params)
  ours.update(prob.grad(prob.params, 0), state, prob.params, value=jnp.float32(1.0))


@pytest.mark.float64
def test_optax_inside_optcompose_chain():
  prob = mlp()
  # clip_by_global_norm is an Optax transformation without **extra; scale_by_adam too.
  # (Optax's scale_by_adam relies on implicit dtype promotion; the suite's is strict.)
  ours = oc.chain(
    optax.clip_by_global_norm(0.5),
    standard_promotion(optax.scale_by_adam()),
    oc.scale_by_learning_rate(1e-2),
  )
  ref = standard_promotion(optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)))
  assert_trees_close(
    final_params_f64(ours, 100, oc.apply_updates), final_params_f64(ref, 100, optax.apply_updates)
  )
  # Extra keyword arguments are withheld from Optax members that take none.
  state = ours.init(prob.params)
  ours.update(prob.grad(prob.params, 0), state, prob.params, value=jnp.float32(1.0))


def test_optcompose_transformations_are_optax_types_and_get_keywords_in_optax_chain():
  """Ours are optax.GradientTransformationExtraArgs: Optax's chain hands them the keyword
  arguments (a plain GradientTransformation would be wrapped, and its keywords dropped)."""
  assert isinstance(oc.adamw(1e-2), optax.GradientTransformation)
  assert isinstance(oc.chain(oc.sgd(0.1)), optax.GradientTransformationExtraArgs)
  params = {"w": jnp.ones(3)}
  tx = optax.chain(oc.sgd(0.1), oc.reduce_on_plateau(factor=0.5, patience=1))
  state = tx.init(params)
  for value in (1.0, 2.0, 3.0):  # no improvement after the first: the scale halves
    updates, state = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(value))
  assert float(optax.tree.get(state, "scale")) == 0.25
  np.testing.assert_allclose(updates["w"], -0.1 * 0.25)


def test_a_hand_built_transformation_takes_keywords_in_optax_s_combinators():
  """``oc.GradientTransformation(init, update)`` with an ``update`` written without
  ``**kwargs`` (Optax's usual pattern) is an ``optax.GradientTransformationExtraArgs``, so
  Optax's combinators hand it keyword arguments (``value=`` for a plateau): it takes and
  drops them, where it raised a TypeError."""

  def update(updates, state, params=None):
    return jax.tree.map(lambda g: -0.1 * g, updates), state

  mine = oc.GradientTransformation(lambda params: oc.EmptyState(), update)
  assert isinstance(mine, optax.GradientTransformationExtraArgs)
  params = {"w": jnp.ones(3)}
  for tx in (
    optax.chain(mine, oc.reduce_on_plateau()),
    optax.masked(mine, {"w": True}),
    optax.apply_if_finite(mine, 2),
    optax.inject_hyperparams(lambda: mine)(),
    optax.with_extra_args_support(mine),
  ):
    updates, _ = tx.update(params, tx.init(params), params, value=jnp.float32(1.0))
    np.testing.assert_array_equal(updates["w"], np.float32(-0.1))


def _two_argument_update(updates, state):
  return updates, state


_two_argument_update.mark = "kept"


def test_a_hand_built_update_keeps_its_named_keywords_arity_and_marks():
  """The wrapper of an ``update`` without ``**kwargs`` passes on the keywords it names
  (``value``), calls a two-argument ``update(u, s)`` without params, keeps the function's
  attributes, pickles as the function does and compares equal for the same function; a
  member returning a list pair is taken as the pair."""
  import pickle

  seen = {}

  def named(updates, state, params=None, *, value=None):
    seen["value"] = value
    return updates, state

  two = _two_argument_update
  params = {"w": jnp.ones(2)}
  tx = oc.GradientTransformation(lambda p: oc.EmptyState(), named)
  optax.chain(tx).update(params, optax.chain(tx).init(params), params, value=3.0, other=1)
  assert seen == {"value": 3.0}
  pair = oc.GradientTransformation(lambda p: oc.EmptyState(), two)
  assert pair.update(params, oc.EmptyState())[0] is params and pair.update.mark == "kept"
  assert pair == oc.GradientTransformation(pair.init, two)
  assert pickle.loads(pickle.dumps(pair.update)).wrapped is two
  listed = oc.GradientTransformation(lambda p: oc.EmptyState(), lambda u, s, p=None, **e: [u, s])
  chained = oc.chain(listed, oc.sgd(0.1))
  np.testing.assert_allclose(chained.update(params, chained.init(params), params)[0]["w"], -0.1)


def test_optax_extra_args_member_receives_keywords():
  seen = {}

  def init(params):
    return optax.EmptyState()

  def update(updates, state, params=None, **extra):
    seen.update(extra)
    return updates, state

  tx = oc.chain(optax.GradientTransformationExtraArgs(init, update), oc.sgd(0.1))
  params = {"w": jnp.ones(3)}
  tx.update({"w": jnp.ones(3)}, tx.init(params), params, value=jnp.float32(2.0))
  assert float(seen["value"]) == 2.0
  assert set(seen) == {"value"}  # the caller's keywords, nothing hidden


def test_optax_lbfgs_with_linesearch_inside_optcompose_chain():
  """L-BFGS's zoom linesearch rejects keyword arguments it does not consume."""
  loss = lambda p: jnp.sum((p["w"] - jnp.arange(3.0)) ** 2 * jnp.array([1.0, 10.0, 100.0]))
  params = {"w": jnp.zeros(3)}

  def solve(tx):
    @jax.jit
    def step(p, state):
      value, grad = jax.value_and_grad(loss)(p)
      u, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=loss)
      return oc.apply_updates(p, u), state

    p, state = params, tx.init(params)
    for _ in range(15):
      p, state = step(p, state)
    return p

  ours, ref = solve(oc.chain(optax.lbfgs())), solve(optax.chain(optax.lbfgs()))
  np.testing.assert_allclose(ours["w"], ref["w"], rtol=1e-6)
  np.testing.assert_allclose(ours["w"], [0.0, 1.0, 2.0], atol=1e-4)


@pytest.mark.float64
def test_adam_from_pieces_after_clipping_sees_the_clipped_gradient():
  pieces = oc.scale_by_second_moment(
    0.999, 1e-8, direction=oc.chain(oc.ema(0.9, debias=False), oc.scale_by_bias_correction(0.9))
  )
  ours = oc.chain(optax.clip_by_global_norm(1.0), pieces, oc.scale_by_learning_rate(0.1))
  ref = standard_promotion(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)))
  assert_trees_close(
    final_params_f64(ours, 50, oc.apply_updates), final_params_f64(ref, 50, optax.apply_updates)
  )


@pytest.mark.float64
def test_flax_train_state():
  def train(tx):
    prob = mlp(jnp.float64)
    state = train_state.TrainState.create(apply_fn=None, params=prob.params, tx=tx)
    step = jax.jit(lambda s, t: s.apply_gradients(grads=prob.grad(s.params, t)))
    for t in range(50):
      state = step(state, t)
    return state

  with x64():
    ours = train(oc.adamw(1e-2, weight_decay=0.1))
    ref = train(standard_promotion(optax.adamw(1e-2, weight_decay=0.1)))
  assert int(ours.step) == 50
  assert_trees_close(ours.params, ref.params)
  assert [x.shape for x in jax.tree.leaves(ours.opt_state)] == [
    x.shape for x in jax.tree.leaves(ref.opt_state)
  ]


class Net(nnx.Module):
  def __init__(self, rngs, dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.dense1 = nnx.Linear(4, 8, **kw)
    self.norm = nnx.LayerNorm(8, **kw)
    self.dense2 = nnx.Linear(8, 1, **kw)

  def __call__(self, x):
    h = self.dense1(x)
    # Flax's LayerNorm meets its float32 constants with float64 activations under x64:
    # standard promotion for Flax's code (the suite's is strict).
    with jax.numpy_dtype_promotion("standard"):
      h = self.norm(h)
    return self.dense2(jax.nn.relu(h))


def _nnx_train(tx, steps=30, dtype=jnp.float32):
  model = Net(nnx.Rngs(0), dtype)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4)), dtype)
  y = jnp.sum(x, axis=1, keepdims=True)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(steps)]
  return model, opt, losses


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
@pytest.mark.float64
def test_flax_nnx_optimizer(name):
  with x64():
    ours_model, ours_opt, ours_loss = _nnx_train(getattr(oc, name)(1e-2), dtype=jnp.float64)
    ref_model, _, ref_loss = _nnx_train(
      standard_promotion(getattr(optax, name)(1e-2)), dtype=jnp.float64
    )
  assert ours_loss[-1] < ours_loss[0]
  np.testing.assert_allclose(ours_loss, ref_loss, rtol=F64_RTOL)
  assert_trees_close(nnx.state(ours_model, nnx.Param), nnx.state(ref_model, nnx.Param))


def test_nnx_masked_weight_decay_leaves_bias_and_norm_scale_undecayed():
  """With zero gradients, AdamW moves only the decayed leaves (kernels)."""
  model = Net(nnx.Rngs(0))
  decay_kernels = lambda params: jax.tree_util.tree_map_with_path(
    lambda path, _: jax.tree_util.keystr(path).endswith("['kernel']"), params
  )
  opt = nnx.Optimizer(model, oc.adamw(0.1, weight_decay=0.5, mask=decay_kernels), wrt=nnx.Param)
  # Non-zero bias and scale, so that decaying them would show.
  model.dense1.bias[...] = jnp.ones(8)
  before = jax.tree.map(jnp.array, nnx.state(model, nnx.Param))
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  opt.update(model, zeros)
  after = nnx.state(model, nnx.Param)
  for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b) * (1 - 0.1 * 0.5), rtol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_hand_built_transformation_logs_its_own_functions():
  # An `update` without **extra is wrapped to drop the extra arguments; the wrapper showed
  # as `<..._DroppingExtra object at 0x...>` in the transformation's repr, in logs.
  def my_update(updates, state, params=None):
    return updates, state

  tx = oc.GradientTransformation(lambda params: oc.EmptyState(), my_update)
  assert repr(my_update) in repr(tx)
  assert "DroppingExtra" not in repr(tx)


def _bf16_accumulating(lib):
  """A subclass of ``lib.MultiSteps`` written against Optax's, as training code does
  (EasyLM's bfloat16 accumulation): its own init and update, Optax's private attributes,
  and ``optax._src.numerics``."""

  class Bf16Steps(lib.MultiSteps):
    def init(self, params):
      acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.bfloat16), params)
      return lib.MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=jnp.zeros([], jnp.int32),
        inner_opt_state=self._opt.init(params),
        acc_grads=acc,
        skip_state=self._should_skip_update_fn(acc, jnp.zeros([], jnp.int32), params)[1],
      )

    def update(self, updates, state, params=None, **extra):
      low = jax.tree.map(lambda g: g.astype(jnp.bfloat16), updates)
      acc = jax.tree.map(
        lambda g, a: self._acc_update(g, a, n_acc=state.mini_step), low, state.acc_grads
      )
      increment = lib._src.numerics.safe_int32_increment
      last = state.mini_step >= self._every_k_schedule(state.gradient_step) - 1
      wide = jax.tree.map(lambda a: a.astype(jnp.float64), acc)
      real, inner = self._opt.update(wide, state.inner_opt_state, params)
      return jax.tree.map(lambda u: jnp.where(last, u, 0.0), real), lib.MultiStepsState(
        mini_step=jnp.where(last, 0, increment(state.mini_step)),
        gradient_step=jnp.where(last, increment(state.gradient_step), state.gradient_step),
        inner_opt_state=jax.tree.map(
          lambda n, o: jnp.where(last, n, o), inner, state.inner_opt_state
        ),
        acc_grads=jax.tree.map(lambda a: jnp.where(last, jnp.zeros_like(a), a), acc),
        skip_state=state.skip_state,
      )

  return Bf16Steps


def test_a_subclass_of_multi_steps_runs_its_own_init_and_update_as_in_optax():
  """The real-code trial: optcompose's MultiSteps set ``init`` and ``update`` on the instance,
  so a subclass's own were never called (EasyLM's bfloat16 accumulation silently ran as a
  float32 one: 3.8e-3 apart after 20 steps), and it had none of Optax's private attributes
  the subclass reads. ``gradient_transformation()`` and ``step`` take the subclass's too."""
  with x64(), jax.numpy_dtype_promotion("standard"):  # as the subclass's users run it
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    finals = []
    for lib in (oc, optax):
      tx = _bf16_accumulating(lib)(lib.adamw(1e-2, weight_decay=1e-2), 3)
      for use in (tx, tx.gradient_transformation()):
        p, state = params, use.init(params)
        assert state.acc_grads["w"].dtype == jnp.bfloat16
        for i in range(7):
          grads = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), p)
          updates, state = jax.jit(use.update)(grads, state, p)
          p = optax.apply_updates(p, updates)
        finals.append(p)
    for p in finals[1:]:
      assert_rel_close(p, finals[0], F64_RTOL)
    # optcompose.step takes the subclass's update too (its generic form)
    tx = _bf16_accumulating(oc)(oc.adamw(1e-2, weight_decay=1e-2), 3)
    p, state = params, tx.init(params)
    for i in range(7):
      grads = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), p)
      p, state = tx.step(grads, state, p)
      assert state.acc_grads["w"].dtype == jnp.bfloat16
    assert_rel_close(p, finals[0], F64_RTOL)


def test_optax_private_module_names_are_answered_with_ours():
  """``from optax._src.base import init_empty_state`` (levanter), ``optax._src.numerics.
  safe_int32_increment`` (EasyLM): the names of Optax's private modules that our top level
  has; another is an AttributeError naming Optax's module."""
  from optcompose._src.base import GradientTransformation, init_empty_state
  import optcompose._src.numerics as numerics

  assert init_empty_state is oc.init_empty_state
  assert GradientTransformation is oc.GradientTransformation
  assert oc._src.numerics is numerics and numerics.safe_norm is oc.safe_norm
  assert oc._src.alias.adamw is oc.adamw
  with pytest.raises(AttributeError, match=r"`optax._src.numerics`.*public name"):
    numerics.abs_sq
  with pytest.raises(ImportError):
    import optcompose._src.no_such_module  # noqa: F401


def test_join_schedules_takes_a_last_boundary_where_the_last_schedule_ends_as_optax():
  """MaxText passes as many boundaries as schedules (the last where the last one ends); Optax
  ignores the last, and every MaxText run stopped at construction here."""
  for lib in (oc, optax):
    pieces = [
      lib.linear_schedule(0.0, 1.0, 10),
      lib.cosine_decay_schedule(1.0, 90),
      lib.constant_schedule(0.0),
    ]
    joined = lib.join_schedules(pieces, [10, 100, 130])
    values = np.asarray(jax.vmap(standard_promotion(joined))(jnp.arange(200)))
    if lib is oc:
      ours = values
  np.testing.assert_allclose(ours, values, rtol=1e-6, atol=1e-7)
  assert ours[150] == 0.0 and ours[100] == 0.0 and ours[5] == 0.5


@pytest.mark.parametrize(
  "make",
  [
    lambda: optax.adamw(0.1, weight_decay=0.5, mask=lambda p: jax.tree.map(jnp.ndim, p)),
    lambda: optax.lamb(0.1),
    lambda: optax.chain(optax.clip_by_block_rms(0.1), optax.sgd(0.1)),
  ],
  ids=["adamw-mask-callable", "lamb", "clip_by_block_rms"],
)
def test_an_optax_transformation_given_flat_params_is_refused(make):
  # Optax's transformations do not know FlatParams: a mask callable got the buckets (weight
  # decay silently off), a per-leaf trust ratio or clip was taken per bucket (LAMB 0.2 away
  # from Optax's own step).
  params = {"w": jnp.arange(1.0, 7.0).reshape(3, 2), "b": jnp.array([0.5, -2.0])}
  with pytest.raises(
    TypeError, match=r"flat_optimizer: the inner transformation \(optax's .*FlatParams"
  ):
    oc.flat_optimizer(make()).init(params)
  inside = oc.flat_optimizer(oc.chain(oc.scale(1.0), make()))  # also inside our combinators
  with pytest.raises(
    TypeError, match=r"chain: argument 1 \(optax's .* not optcompose's.*FlatParams"
  ):
    inside.init(params)
  flat = oc.flat_params(params)
  with pytest.raises(TypeError, match="not optcompose's"):  # and where the caller packs
    oc.chain(make()).init(flat)


def test_an_elementwise_optax_transformation_declared_as_ours_runs_on_flat_params():
  params = {"w": jnp.arange(1.0, 7.0).reshape(3, 2), "b": jnp.array([0.5, -2.0])}
  grads = jax.tree.map(lambda x: x / 3 - 1, params)
  theirs = optax.adam(0.1)
  declared = oc.flat_optimizer(oc.GradientTransformation(theirs.init, theirs.update))
  with jax.numpy_dtype_promotion("standard"):  # Optax adds an int32 count to floats
    state = declared.init(params)
    for _ in range(3):
      updates, state = declared.update(grads, state, params)
    expected, expected_state = grads, theirs.init(params)
    for _ in range(3):
      expected, expected_state = theirs.update(grads, expected_state, params)
  for key in params:
    np.testing.assert_allclose(updates[key], expected[key], rtol=1e-6)


@pytest.mark.parametrize(
  "make",
  [
    lambda mask: oc.adamw(1e-2, mask=mask),
    lambda mask: oc.chain(oc.adam(1e-2), oc.add_decayed_weights(0.1, mask)),
    lambda mask: oc.sgd(0.1, momentum=0.9, l1=0.01, reg_mask=mask),
    lambda mask: optax.chain(oc.adam(1e-2), oc.freeze(mask)),
    lambda mask: oc.masked(oc.adam(1e-2), mask),
    lambda mask: oc.partition({True: oc.adam(1e-2), False: oc.sgd(0.1, 0.9)}, mask),
  ],
  ids=["adamw", "add_decayed_weights", "sgd-l1", "freeze", "masked", "partition"],
)
def test_optax_s_tree_map_params_maps_the_states_of_tree_masked_transformations(make):
  # Optax's tree_map_params calls init with a leafless stand-in for the parameters: a tree
  # mask checked against it at init was "neither the parameter tree's structure nor a
  # prefix of it", where Optax's own masked transformations map.
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  mask = {"w": True, "b": False}
  tx = make(mask)
  state = tx.update(params, tx.init(params), params)[1]  # moments no longer 0
  mapped = optax.tree_utils.tree_map_params(
    tx, lambda p: jnp.full_like(p, 7.0), state, transform_non_params=lambda x: x
  )
  moments = [x for x in jax.tree.leaves(mapped) if np.shape(x) in ((3, 2), (2,))]
  assert moments and all(np.all(np.asarray(x) == 7.0) for x in moments)
  others = [x for x in jax.tree.leaves(mapped) if np.shape(x) not in ((3, 2), (2,))]
  expected = [x for x in jax.tree.leaves(state) if np.shape(x) not in ((3, 2), (2,))]
  assert len(others) == len(expected)
  for a, b in zip(others, expected):
    np.testing.assert_array_equal(a, b)


def test_an_adapted_optax_transformation_keeps_its_signature_and_ours_stay_unadapted():
  # The FlatParams check wrapped Optax's functions in (*args, **kwargs): jax.jit's
  # donate_argnames found no `state` to donate, silently, and keyword calls failed; and
  # optcompose's own MultiSteps (an object, not a GradientTransformation) was refused on
  # FlatParams as "not optcompose's".
  params = {"w": jnp.ones(3)}
  tx = oc.with_extra_args_support(optax.sgd(0.1, momentum=0.9))
  state = tx.init(params=params)
  updates, state = tx.update(updates=params, state=state, params=params)
  step = jax.jit(tx.update, donate_argnames="state")
  old = jax.tree.leaves(state)
  step(params, state, params)
  assert all(x.is_deleted() for x in old)
  flat = oc.flat_params({"w": jnp.ones(3), "b": jnp.ones(2)})
  for tx in (oc.MultiSteps(oc.adam(0.1), 2), oc.chain(oc.MultiSteps(oc.adam(0.1), 2))):
    tx.update(flat, tx.init(flat), flat)
  oc.flat_optimizer(oc.MultiSteps(oc.adam(0.1), 2)).init({"w": jnp.ones(3)})
