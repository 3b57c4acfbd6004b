"""The contract: registry completeness, Optax's names and defaults, schedules everywhere,
the step count in the state, keyword arguments, and raw gradients through chain."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import standard_promotion
from problems import assert_resumes_exactly, mlp, quadratic, run
from registry import CASES, COVERED_ELSEWHERE

from optcompose.core.registry import REGISTRY

PUBLIC = oc.TRANSFORMATIONS + oc.OPTIMIZERS + oc.WRAPPERS


def discovered_builders():
  """Every public function of the package that returns a GradientTransformation."""
  found = set()
  for name in dir(oc):
    fn = getattr(oc, name)
    if name.startswith("_") or inspect.isclass(fn) or not callable(fn):
      continue
    if (fn.__doc__ or "").startswith("Deprecated") and name not in REGISTRY:
      continue  # an unregistered warning alias of a deprecated Optax name (optimistic_adam)
    annotation = inspect.signature(fn).return_annotation
    if annotation in ("GradientTransformation", oc.GradientTransformation):
      found.add(name)
  # Combinators and adapters of functions or transformations the caller writes:
  return found - {
    "chain",
    "stateless",
    "stateless_with_tree_map",
    "with_extra_args_support",
    "flat_optimizer",
    "multi_transform",  # Optax's former name of partition: a plain alias, not a builder
  }


def unregistered(cases, public):
  covered = {name for case in cases for name in case.covers} | set(COVERED_ELSEWHERE)
  return sorted(set(public) - covered)


def test_every_public_builder_is_declared():
  assert discovered_builders() == set(PUBLIC) - {"inject_hyperparams"}  # returns a factory


def test_every_numeric_argument_of_a_builder_is_a_declared_hyperparameter():
  """A number argument left out of ``@public`` is neither range-checked (``b2=1.5`` passed
  silently) nor drawn by the property kit, nor named when given a schedule (the contributor
  trial left one out and no test failed). rmsprop's ``initial_scale`` was such a one (its
  transformation declares it)."""
  import numbers

  from optcompose.core.registry import REGISTRY

  undeclared = [
    f"{name}({p.name}={p.default!r})"
    for name, entry in REGISTRY.items()
    for p in inspect.signature(entry.builder).parameters.values()
    if isinstance(p.default, numbers.Real) and not isinstance(p.default, bool)
    if p.name not in entry.hypers
  ]
  assert undeclared == [], f"declare these in the builder's @public(...): {undeclared}"


def test_every_public_builder_has_a_registry_case():
  assert unregistered(CASES, PUBLIC) == []


def test_completeness_check_catches_a_missing_case():
  without_adamw = [c for c in CASES if "adamw" not in c.covers]
  assert unregistered(without_adamw, PUBLIC) == ["adamw"]


def optax_counterpart(name):
  """The Optax function a builder declares as its counterpart (registry), e.g. contrib.sam."""
  target = optax
  for part in REGISTRY[name].optax.split("."):
    target = getattr(target, part)
  return target


def test_every_declared_optax_counterpart_exists_and_shares_the_name():
  for name in PUBLIC:
    if REGISTRY[name].optax:
      assert callable(optax_counterpart(name)), name
      assert REGISTRY[name].optax.rpartition(".")[2] == name, "Optax's name"
  undeclared = [n for n in PUBLIC if hasattr(optax, n) and not REGISTRY[n].optax]
  assert undeclared == [], "Optax has these: declare them with @public(..., optax=...)"


def _maker(default):
  """What made a default that is a function or a transformation: the function's name, or
  the builder whose ``init`` it holds (``lbfgs(linesearch=scale_by_zoom_linesearch(...))``);
  a private leading underscore aside."""
  fn = default.init if isinstance(default, tuple) and hasattr(default, "init") else default
  return fn.__qualname__.split(".<locals>")[0].lstrip("_")


def same_default(ours, theirs) -> bool:
  if callable(theirs) or isinstance(theirs, optax.GradientTransformation):
    return type(ours) is not type(None) and _maker(ours) == _maker(theirs)
  return ours == theirs


@pytest.mark.parametrize("name", [n for n in PUBLIC if REGISTRY[n].optax])
def test_optax_names_arguments_and_defaults(name):
  ours = inspect.signature(getattr(oc, name)).parameters
  theirs = inspect.signature(optax_counterpart(name)).parameters
  assert list(ours)[: len(theirs)] == list(theirs), "Optax's arguments, in Optax's order"
  for arg, p in theirs.items():
    assert same_default(ours[arg].default, p.default), f"{name}({arg}=...) default"
    assert ours[arg].kind == p.kind, f"{name}({arg}) kind"
  for arg in list(ours)[len(theirs) :]:
    assert ours[arg].kind is inspect.Parameter.KEYWORD_ONLY, f"extension {arg} is keyword-only"
    assert ours[arg].default is not inspect.Parameter.empty


def _buffers(tree) -> list:
  return [
    x.unsafe_buffer_pointer()
    for x in jax.tree.leaves(tree)
    if isinstance(x, jax.Array) and x.size and not x.is_deleted()
  ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_fresh_state_holds_one_buffer_per_leaf_and_none_of_the_params(case):
  # A jitted step donating the state is refused a buffer given twice ("Attempt to donate the
  # same buffer twice"), and one shared with the parameters would be deleted under them.
  prob = quadratic()
  state = case.ours().init(prob.params)
  mine = _buffers(state)
  assert len(set(mine)) == len(mine), f"{case.name}: two leaves of the state share a buffer"
  assert not set(mine) & set(_buffers(prob.params)), f"{case.name}: the state holds params"


def test_a_fresh_early_stopping_state_holds_one_buffer_per_leaf():
  baseline = jnp.float32(0.5)  # the caller's array: not held by the state
  for es in (oc.early_stopping(patience=2), oc.early_stopping(patience=2, baseline=baseline)):
    state = es.init({"w": jnp.ones(3)})
    mine = _buffers(state)
    assert len(set(mine)) == len(mine) and baseline.unsafe_buffer_pointer() not in mine


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_unknown_keyword_arguments_are_accepted_and_ignored(case):
  prob = quadratic()
  tx = case.ours()
  state = tx.init(prob.params)
  g = prob.grad(prob.params, 0)
  needed = {"value": jnp.float32(3.0)} if case.with_value else {}
  plain = tx.update(g, state, prob.params, **needed)
  extra = tx.update(g, state, prob.params, value=jnp.float32(3.0), some_flag=True)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(extra)):
    np.testing.assert_array_equal(a, b)


SCHEDULABLE = [
  (name, arg) for name in PUBLIC for arg in getattr(getattr(oc, name), "schedulable", ())
]

VALUES = {
  "decay": 0.9,
  "b1": 0.8,
  "b2": 0.99,
  "eps": 1e-6,
  "eps_root": 1e-8,
  "step_size": -0.01,
  "weight_decay": 0.05,
  "l1": 0.1,
  "l2": 0.2,
  "learning_rate": 0.01,
  "max_delta": 0.5,
  "max_norm": 1.0,
  "threshold": 0.5,
  "clipping": 0.1,
}
REQUIRED = {
  "trace": {"decay": 0.9},
  "ema": {"decay": 0.9},
  "scale_by_bias_correction": {"decay": 0.9},
  "add_l2_penalty": {"l2": 0.1},
  "prox_l1": {"l1": 0.1, "learning_rate": 0.01},
  "prox_elastic_net": {"l1": 0.1, "l2": 0.2, "learning_rate": 0.01},
  "scale": {"step_size": -0.01},
  "clip": {"max_delta": 0.5},
  "clip_by_global_norm": {"max_norm": 1.0},
  "clip_by_leaf_norm": {"max_norm": 1.0},
  "clip_by_block_rms": {"threshold": 0.5},
  "adaptive_grad_clip": {"clipping": 0.1},
}


def _value(name, arg):
  """The value tried for ``name(arg=...)``: from VALUES, else the middle of the range the
  registry declares for the property kit (geometric for a positive range)."""
  if arg in VALUES:
    return VALUES[arg]
  draw = REGISTRY[name].hypers[arg].draw
  draw = draw[1] if draw[0] == "optional" else draw
  lo, hi = draw[1], draw[2]
  return float(np.sqrt(lo * hi)) if lo > 0 else (lo + hi) / 2


def _required(name):
  """Arguments without a default (REQUIRED, else the declared middle values)."""
  if name in REQUIRED:
    return dict(REQUIRED[name])
  params = inspect.signature(getattr(oc, name)).parameters
  return {
    p: _value(name, p)
    for p, v in params.items()
    if v.default is inspect.Parameter.empty and p in REGISTRY[name].hypers
  }


def test_schedulable_hyperparameters_are_declared():
  assert len(SCHEDULABLE) >= 15
  assert ("scale_by_adam", "b1") in SCHEDULABLE and ("trace", "decay") in SCHEDULABLE


@pytest.mark.numerics  # a constant folded at compile time against one computed per step
@pytest.mark.parametrize("name, arg", SCHEDULABLE)
def test_a_constant_schedule_equals_the_number(name, arg):
  """Every hyperparameter accepts a schedule; a constant one reproduces the number."""
  build = getattr(oc, name)
  kwargs = _required(name)
  kwargs[arg] = _value(name, arg)
  with_number = oc.chain(build(**kwargs), oc.scale(-0.01))
  kwargs[arg] = lambda count, v=kwargs[arg]: jnp.float32(v) + 0 * jnp.asarray(count, jnp.float32)
  with_schedule = oc.chain(build(**kwargs), oc.scale(-0.01))
  prob = quadratic()
  a, sa = run(with_number, prob, 12, True, oc.apply_updates)
  b, sb = run(with_schedule, prob, 12, True, oc.apply_updates)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7)
  assert int(sb[0].count) == 12  # the count lives in the state


def test_schedule_reads_the_count_in_the_state():
  seen = []
  tx = oc.scale_by_learning_rate(lambda count: seen.append(count) or 0.1)
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(params, state, params)
  assert [int(c) for c in seen[1:]] == [0, 1, 2]  # seen[0] is init's check at step 0
  assert int(state.count) == 3


@pytest.mark.parametrize(
  "name", ["sgd_nesterov", "adamw_masked_scheduled", "prox_l1", "rmsprop_centered_momentum"]
)
def test_resuming_from_a_saved_state_continues_exactly(name):
  case = next(c for c in CASES if c.name == name)
  assert_resumes_exactly(case.ours(), mlp(), steps=20, save_at=10, apply_updates=oc.apply_updates)


def test_count_saturates_instead_of_wrapping():
  top = jnp.iinfo(jnp.int32).max
  assert int(oc.safe_increment(jnp.int32(top))) == top
  assert int(oc.safe_increment(jnp.int32(5))) == 6
  tx = oc.adam(1e-3)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  state = (state[0]._replace(count=jnp.int32(top)), state[1])
  u, state = tx.update({"w": jnp.ones(3)}, state, params)
  assert int(state[0].count) == top
  assert np.all(np.isfinite(u["w"]))


def test_bias_correction_is_computed_in_float32_for_bfloat16_moments():
  """0.999 rounds to 1.0 in bfloat16; computing 1 - b2^t there would divide by zero."""
  params = {"w": jnp.ones(4, jnp.bfloat16)}
  grads = {"w": jnp.array([1.0, -2.0, 0.5, 3.0], jnp.bfloat16)}
  for tx in (
    oc.adam(1.0),
    oc.chain(oc.ema(0.999), oc.scale(1.0)),
    oc.rmsprop(1.0, decay=0.999, bias_correction=True),
  ):
    u, _ = tx.update(grads, tx.init(params), params)
    assert u["w"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(u["w"], np.float32)))
  u, _ = oc.adam(1.0).update(grads, oc.adam(1.0).init(params), params)
  np.testing.assert_allclose(
    np.asarray(u["w"], np.float32), -np.sign([1.0, -2.0, 0.5, 3.0]), rtol=1e-2
  )


def test_chain_is_associative_for_the_natural_spelling_of_adam_after_clipping():
  """Finding 1 of the architecture issue: clipping, then Adam from pieces, grouped either
  way, gives the same step; the second moment sees the clipped gradient."""
  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.array([10.0, -20.0, 40.0])}
  pieces = (
    oc.scale_by_second_moment(
      0.999, direction=oc.chain(oc.ema(0.9, debias=False), oc.scale_by_bias_correction(0.9))
    ),
  )
  flat = oc.chain(oc.clip_by_global_norm(1.0), *pieces)
  nested = oc.chain(oc.clip_by_global_norm(1.0), oc.chain(*pieces))
  u_flat, _ = flat.update(g, flat.init(params), params)
  u_nested, _ = nested.update(g, nested.init(params), params)
  np.testing.assert_array_equal(u_flat["w"], u_nested["w"])
  # Adam's first step is sign(g) (up to eps), whatever the clipping did to |g|.
  np.testing.assert_allclose(u_flat["w"], [1.0, -1.0, 1.0], rtol=1e-4)  # eps = 1e-8 at |g| ~ 0.02


def test_second_moment_scales_its_direction_by_the_statistic_of_its_input():
  """LaProp (normalise, then average) and Adam (average, then normalise) from the same
  pieces; the statistic is built from the piece's own input."""
  params = {"w": jnp.zeros(3)}
  g1, g2 = {"w": jnp.array([1.0, -2.0, 4.0])}, {"w": jnp.array([3.0, 1.0, -1.0])}
  laprop = oc.chain(oc.scale_by_second_moment(0.99, 1e-30), oc.ema(0.9, debias=True))
  adam = oc.scale_by_second_moment(0.99, 1e-30, direction=oc.ema(0.9, debias=True))
  s_l, s_a = laprop.init(params), adam.init(params)
  for g in (g1, g2):
    u_l, s_l = laprop.update(g, s_l, params)
    u_a, s_a = adam.update(g, s_a, params)
  v = m = n_avg = 0.0  # NumPy: v from g; LaProp averages g / sqrt(v_hat), Adam divides m_hat
  for t, g in enumerate((g1, g2), start=1):
    x = np.asarray(g["w"], np.float64)
    v = 0.99 * v + 0.01 * x**2
    n_avg = 0.9 * n_avg + 0.1 * x / np.sqrt(v / (1 - 0.99**t))
    m = 0.9 * m + 0.1 * x
  np.testing.assert_allclose(u_l["w"], n_avg / (1 - 0.9**2), rtol=3e-6)
  np.testing.assert_allclose(u_a["w"], (m / (1 - 0.9**2)) / np.sqrt(v / (1 - 0.99**2)), rtol=3e-6)
  # Scaling the input scales the statistic too: (10 g) / sqrt(0.5 (10 g)^2) = sqrt(2) sign(g),
  # however the chain is grouped.
  for tx in (
    oc.chain(oc.scale(10.0), oc.scale_by_second_moment(0.5, 1e-30, debias=False)),
    oc.chain(oc.scale(10.0), oc.chain(oc.scale_by_second_moment(0.5, 1e-30, debias=False))),
  ):
    u, _ = tx.update(g1, tx.init(params), params)
    np.testing.assert_allclose(u["w"], np.sqrt(2.0) * np.sign(np.asarray(g1["w"])), rtol=1e-6)


def test_nu_dtype_stores_the_second_moment_in_that_dtype():
  params = {"w": jnp.linspace(-1.0, 1.0, 8)}
  grads = {"w": jnp.linspace(0.5, -2.0, 8)}
  wide, narrow = oc.scale_by_adam(), oc.scale_by_adam(nu_dtype=jnp.bfloat16)
  sw, sn = wide.init(params), narrow.init(params)
  assert sn.nu["w"].dtype == jnp.bfloat16 and sn.mu["w"].dtype == jnp.float32
  for _ in range(3):
    uw, sw = wide.update(grads, sw, params)
    un, sn = narrow.update(grads, sn, params)
  assert sn.nu["w"].dtype == jnp.bfloat16 and un["w"].dtype == jnp.float32
  # Same statistic up to bfloat16 rounding of v (8 significant bits; sqrt halves the error).
  np.testing.assert_allclose(un["w"], uw["w"], rtol=2**-8)


@pytest.mark.parametrize("alias", ["adam", "nadam", "adamw", "nadamw"])
def test_every_adam_alias_takes_mu_and_nu_dtype(alias):
  params = {"w": jnp.linspace(-1.0, 1.0, 8), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  wide = getattr(oc, alias)(1e-2)
  narrow = getattr(oc, alias)(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  sw, sn = wide.init(params), narrow.init(params)
  moments = [x for x in jax.tree.leaves(sn) if x.ndim]
  assert len(moments) == 4 and all(x.dtype == jnp.bfloat16 for x in moments)
  for _ in range(3):
    uw, sw = wide.update(grads, sw, params)
    un, sn = narrow.update(grads, sn, params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(sn) if x.ndim)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2**-6, atol=1e-6), un, uw)


def test_float16_gradients_keep_adam_finite_and_nu_dtype_float32_keeps_small_squares():
  """float16: eps = 1e-8 and 1 / (1 - b2^t) for b2 = 0.99999 leave its range, and g^2
  underflows below |g| = 2.4e-4; the statistics are computed in float32 where it matters."""
  g = {"w": jnp.asarray([1.0, 0.0, 1e-3, -1e-4], jnp.float16)}
  params = jax.tree.map(jnp.zeros_like, g)
  for tx in (
    oc.scale_by_adam(b2=0.99999),
    oc.scale_by_adam(nu_dtype=jnp.float32),
    oc.rmsprop(1.0, centered=True, bias_correction=True, eps_in_sqrt=False),
    oc.adagrad(1.0),
  ):
    u, _ = tx.update(g, tx.init(params), params)
    assert u["w"].dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(u["w"])))
  # Adam's first step is sign(g) (m_hat / sqrt(v_hat) = g / |g|), up to eps, even for
  # |g| = 1e-4 once the second moment is stored in float32.
  tx = oc.scale_by_adam(nu_dtype=jnp.float32)
  u, state = tx.update(g, tx.init(params), params)
  assert state.nu["w"].dtype == jnp.float32 and float(state.nu["w"][3]) > 0
  np.testing.assert_allclose(np.asarray(u["w"], np.float32), [1.0, 0.0, 1.0, -1.0], atol=2e-3)


def _optax_takes_no_learning_rate(name):
  try:
    tx = standard_promotion(optax_counterpart(name)(None))
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
  except TypeError:
    return False
  return True


@pytest.mark.parametrize(
  "name",
  [
    n
    for n in PUBLIC
    if REGISTRY[n].kind == "optimizer"
    and REGISTRY[n].optax
    and "learning_rate" in inspect.signature(REGISTRY[n].builder).parameters
    and n not in ("adadelta", "lbfgs")  # None: lr = 1 (coming-from-optax.md); a line search
    and _optax_takes_no_learning_rate(n)
  ],
)
def test_learning_rate_none_is_optax_s_unscaled_direction(name):
  """``learning_rate=None`` where Optax's counterpart takes it (24 optimizers): no learning
  rate applied (the direction, not negated), equal to Optax's to float64 rounding."""
  from numerics import F64_RTOL, assert_rel_close, x64

  with x64():
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.5, -2.0])}
    grads = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, params)
    theirs = standard_promotion(optax_counterpart(name)(None))
    ours = REGISTRY[name].builder(None)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for _ in range(3):
      u_ours, s_ours = ours.update(grads, s_ours, params)
      u_theirs, s_theirs = theirs.update(grads, s_theirs, params)
      for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs)):
        assert_rel_close(a, b, F64_RTOL)
  with pytest.raises(TypeError, match="fromage: `learning_rate` expected a number"):
    oc.fromage(None)  # it scales its weight decay by the learning rate: required
  with pytest.raises(TypeError, match="sm3: `learning_rate` expected a number"):
    oc.sm3(None)  # Optax's refuses it


def test_injected_hyperparameters_hold_buffers_of_their_own():
  # The caller's array was kept: given for b1 and b2 it was one buffer twice ("Attempt to
  # donate the same buffer twice"); given once, a donating step deleted the caller's array.
  b, lr = jnp.float32(0.9), jnp.float32(0.1)
  state = oc.inject_hyperparams(oc.adam)(learning_rate=lr, b1=b, b2=b).init({"w": jnp.ones(3)})
  mine = _buffers(state)
  assert len(set(mine)) == len(mine)
  assert not {b.unsafe_buffer_pointer(), lr.unsafe_buffer_pointer()} & set(mine)
