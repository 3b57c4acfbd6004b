"""centralize, zero_nans, keep_params_nonnegative, scale_by_distance_over_gradients (DoG),
scale_gradient, the per-example and unit-wise clips, safe_norm and safe_root_mean_squares,
against Optax's functions of the same names, where the registry cases
(tests/cases_transforms_extra.py) cannot look: NaNs, negative parameters, scalar and empty
leaves, every rank, the functions that are not transformations, and bad input.

Symbols: u the incoming update, w the parameters, w0 the parameters at init; DoG per leaf
d = max(d, ||w - w0||), G = G + ||u||^2, u <- global_scale * d / sqrt(G + eps) * u.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import F64_RTOL, assert_rel_close, assert_ulps_close, x64

RNG = np.random.default_rng(7)


def optax_run(fn):
  """Optax's ``fn`` (a function, or a transformation's init or update) under standard dtype
  promotion and allowed rank promotion: Optax's code relies on both (the suite raises on
  either, tests/conftest.py)."""

  @functools.wraps(fn)
  def run(*args, **kwargs):
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
      return fn(*args, **kwargs)

  return run


def as_optax(tx):
  return tx._replace(init=optax_run(tx.init), update=optax_run(tx.update))


def run_both(ours, ref, params, grads_seq):
  """Both transformations fed the same gradients and parameters (Optax's trajectory);
  yields (step, our (updates, state), Optax's (updates, state))."""
  s_ours, s_ref = ours.init(params), ref.init(params)
  for t, g in enumerate(grads_seq):
    u_ours, s_ours = ours.update(g, s_ours, params)
    u_ref, s_ref = ref.update(g, s_ref, params)
    yield t, (u_ours, s_ours), (u_ref, s_ref)
    params = jax.tree.map(lambda p, u: p + u.reshape(p.shape), params, u_ref)


def tree64(shapes, scale=1.0):
  return {k: jnp.asarray(RNG.normal(size=s) * scale) for k, s in shapes.items()}


SHAPES = {"s": (), "v": (5,), "m": (3, 4), "t": (2, 3, 4), "empty": (0, 3)}


# --- the transformations, in float64 -----------------------------------------------------


@pytest.mark.numerics
@pytest.mark.float64
def test_centralize_matches_optax_at_every_rank():
  """Rank >= 2 leaves lose their mean over axes 1..; scalars, vectors and empty leaves pass."""
  with x64():
    grads = tree64({**SHAPES, "conv": (2, 2, 3, 4)})
    grads["c"] = jnp.asarray(RNG.normal(size=(3, 2)) + 1j * RNG.normal(size=(3, 2)))
    ours, _ = oc.centralize().update(grads, oc.EmptyState())
    ref, _ = as_optax(optax.centralize()).update(grads, optax.EmptyState())
    split = lambda t: jax.tree.map(lambda x: (x.real, x.imag), t)  # complex, part by part
    assert_rel_close(split(ours), split(ref), F64_RTOL)
    np.testing.assert_allclose(np.asarray(ours["m"]).mean(axis=1), 0.0, atol=1e-15)
    np.testing.assert_array_equal(ours["v"], grads["v"])


@pytest.mark.numerics
@pytest.mark.float64
def test_zero_nans_matches_optax_and_records_the_latest_step_only():
  """NaNs (real, complex, in either part) become 0, infinities stay; ``found_nan`` is per leaf
  and describes the latest update; integer and boolean updates pass through, as in Optax."""
  with x64():
    params = {
      "a": jnp.zeros(4),
      "b": jnp.zeros((2, 2)),
      "c": jnp.zeros(2, jnp.complex128),
      "n": jnp.zeros(3, jnp.int32),
      "flag": jnp.zeros((), bool),
    }
    first = {
      "a": jnp.asarray([1.0, np.nan, -np.inf, 2.0]),
      "b": jnp.ones((2, 2)),
      "c": jnp.asarray([1 + 1j, complex(1.0, np.nan)]),
      "n": jnp.arange(3, dtype=jnp.int32),
      "flag": jnp.asarray(True),
    }
    second = {**first, "a": jnp.ones(4), "b": jnp.full((2, 2), np.nan)}
    ours, ref = oc.zero_nans(), as_optax(optax.zero_nans())
    for t, (u, s), (u_ref, s_ref) in run_both(ours, ref, params, [first, second]):
      for a, b in zip(jax.tree.leaves((u, s.found_nan)), jax.tree.leaves((u_ref, s_ref.found_nan))):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
      assert s.found_nan == {"a": t == 0, "b": t == 1, "c": True, "n": False, "flag": False}
    np.testing.assert_array_equal(u["c"], [1 + 1j, 0])


@pytest.mark.numerics
@pytest.mark.float64
def test_keep_params_nonnegative_matches_optax():
  """A step that would cross 0 stops at 0; a negative parameter is moved to 0."""
  with x64():
    params = {
      "w": jnp.asarray([0.0, 0.5, 2.0, -1.0, 1.0]),
      "m": jnp.abs(tree64({"m": (3, 4)})["m"]),
    }
    grads = [
      {"w": jnp.asarray([-1.0, -1.0, -1.0, 0.5, 0.0]), "m": tree64({"m": (3, 4)})["m"]}
      for _ in range(3)
    ]
    ours, ref = oc.keep_params_nonnegative(), as_optax(optax.keep_params_nonnegative())
    for _, (u, _), (u_ref, _) in run_both(ours, ref, params, grads):
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
        np.testing.assert_array_equal(a, b)  # a select: exact
    u, _ = ours.update(grads[0], ours.init(params), params)
    new = oc.apply_updates(params, u)
    np.testing.assert_array_equal(new["w"], [0.0, 0.0, 1.0, 0.0, 1.0])
    assert all(bool(jnp.all(x >= 0)) for x in jax.tree.leaves(new))


def test_keep_params_nonnegative_holds_when_updates_are_narrower_than_params():
  """bfloat16 updates for float32 parameters: -w rounded to bfloat16 can exceed w (0.1001
  rounds to 0.10009765625 > 0.1001 ... or below); the update stays in bfloat16 and the new
  parameters are >= 0 for every value (Optax returns float32 updates here)."""
  w = jnp.asarray(np.linspace(1e-3, 3.0, 2001), jnp.float32)
  u = jnp.full_like(w, -10.0, jnp.bfloat16)
  out, _ = oc.keep_params_nonnegative().update(u, oc.EmptyState(), w)
  assert out.dtype == jnp.bfloat16
  new = oc.apply_updates(w, out)
  assert bool(jnp.all(new >= 0)) and float(jnp.max(new)) < 3.0 * 2.0**-7  # within a bf16 ulp
  rounded = np.asarray(-w.astype(jnp.bfloat16), np.float64)
  assert np.any(np.asarray(w, np.float64) + rounded < 0), "the case the step toward +inf guards"


DOG_OPTIONS = [
  dict(),
  dict(reps_rel=1e-2, param_dtype=jnp.float64),
  dict(reps_rel=1e-1, eps=1e-4, param_dtype=None, global_scale=-1.0),
  dict(reps_rel=3e-2, global_scale=2.5),
]


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("kwargs", DOG_OPTIONS, ids=lambda k: ",".join(k) or "defaults")
def test_distance_over_gradients_matches_optax(kwargs):
  """Updates and state, step by step, float64 parameters (the initial parameters in
  ``param_dtype``); a zero leaf starts at d = reps_rel; leaves move, so d grows past it."""
  with x64():
    shapes = {"v": (5,), "m": (3, 4), "t": (2, 3, 4), "zero": (3,)}
    params = {**tree64(shapes), "zero": jnp.zeros(3)}
    direction = tree64(shapes)  # one direction and noise: the leaves travel, d grows
    grads = [jax.tree.map(lambda a, b: a + 0.3 * b, direction, tree64(shapes)) for _ in range(8)]
    ours = oc.scale_by_distance_over_gradients(**kwargs)
    ref = as_optax(optax.scale_by_distance_over_gradients(**kwargs))
    for _, (u, s), (u_ref, s_ref) in run_both(ours, ref, params, grads):
      assert_rel_close((u, tuple(s)), (u_ref, tuple(s_ref)), F64_RTOL)
      assert [x.dtype for x in jax.tree.leaves(s)] == [x.dtype for x in jax.tree.leaves(s_ref)]
    grew = [float(s.max_dist[k]) > float(ours.init(params).max_dist[k]) for k in shapes]
    assert all(grew), grew


@pytest.mark.numerics
@pytest.mark.float64
def test_distance_over_gradients_keeps_a_scalar_leaf_scalar():
  """Optax's step size has shape (1,), so its update of a scalar leaf has shape (1,) (and
  apply_updates would turn the parameter into a vector); ours keeps the shape, same value."""
  with x64():
    params, grads = {"s": jnp.float64(0.7)}, {"s": jnp.float64(-0.3)}
    ours = oc.scale_by_distance_over_gradients(1e-2)
    ref = as_optax(optax.scale_by_distance_over_gradients(1e-2))
    _, (u, s), (u_ref, _) = next(run_both(ours, ref, params, [grads]))
    assert u["s"].shape == () and u_ref["s"].shape == (1,)
    np.testing.assert_allclose(u["s"], u_ref["s"][0], rtol=1e-15)
    assert s.grad_sum_of_squares["s"].shape == (1,)  # Optax's state layout


@pytest.mark.numerics
def test_distance_over_gradients_defaults_match_optax_in_float32():
  params = {k: jnp.asarray(v, jnp.float32) for k, v in tree64({"v": (6,), "m": (3, 4)}).items()}
  grads = [
    {k: jnp.asarray(v, jnp.float32) for k, v in tree64({"v": (6,), "m": (3, 4)}).items()}
    for _ in range(6)
  ]
  ours = oc.scale_by_distance_over_gradients()
  ref = as_optax(optax.scale_by_distance_over_gradients())
  update = jax.jit(ours.update)
  s_ours, s_ref = ours.init(params), ref.init(params)
  p = params
  for g in grads:
    u, s_ours = update(g, s_ours, p)
    u_ref, s_ref = jax.jit(ref.update)(g, s_ref, p)
    assert_ulps_close(u, u_ref, 8)
    p = jax.tree.map(lambda a, b: a + 1e4 * b, p, u_ref)  # DoG's first steps are 1e-6 long


def test_distance_over_gradients_state_keeps_its_dtype_for_bfloat16_params():
  """Optax's d is bfloat16 after init and float32 after the first update (a state that
  changes dtype recompiles a jitted step); ours is float32 (the wider of the parameters'
  and ``param_dtype``) from the start, and the updates stay bfloat16."""
  params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.bfloat16)}
  grads = {"w": jnp.full(6, 0.5, jnp.bfloat16)}
  ours, ref = (
    oc.scale_by_distance_over_gradients(),
    as_optax(optax.scale_by_distance_over_gradients()),
  )
  s0 = ours.init(params)
  u, s1 = ours.update(grads, s0, params)
  assert s0.max_dist["w"].dtype == s1.max_dist["w"].dtype == jnp.float32
  assert u["w"].dtype == jnp.bfloat16
  r0 = ref.init(params)
  _, r1 = ref.update(grads, r0, params)
  assert (r0.max_dist["w"].dtype, r1.max_dist["w"].dtype) == (jnp.bfloat16, jnp.float32)


# --- scale_gradient ---------------------------------------------------------------------


def _loss(scale_fn, scale):
  def loss(x):
    y = scale_fn(x, scale)
    return jnp.sum(jnp.sin(y["a"])) * jnp.sum(y["b"] ** 2)

  return loss


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("scale", [0.5, -2.0, 0.0, 1.0])
def test_scale_gradient_matches_optax(scale):
  with x64():
    x = {"a": jnp.linspace(-1.0, 1.0, 4), "b": jnp.arange(3.0)}
    ours = jax.grad(_loss(oc.scale_gradient, scale))(x)
    ref = jax.grad(_loss(optax_run(optax.scale_gradient), scale))(x)
    plain = jax.grad(_loss(lambda x, s: x, scale))(x)
    assert_rel_close(ours, ref, F64_RTOL)
    assert_rel_close(ours, jax.tree.map(lambda g: scale * g, plain), F64_RTOL)
    assert oc.scale_gradient(x, scale) is x or scale != 1.0
    traced = jax.jit(jax.grad(lambda x, s: _loss(oc.scale_gradient, s)(x)))(x, scale)
    assert_rel_close(traced, ours, F64_RTOL)  # a traced scale: the custom VJP


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("scale", [0.5, -2.0])
def test_scale_gradient_scales_every_order_of_derivative(scale):
  """Differentiated twice (meta-gradients, Hessians), the scaling applies at each order, as
  in Optax: the Hessian is scale**2 times the plain one, under jit with a traced scale too.
  (Returning the unscaled input as the forward pass's output gave scale times it.) Reverse
  over reverse: a custom VJP has no forward mode (Optax's neither)."""
  hessian = lambda f: jax.jacrev(jax.jacrev(f))  # noqa: E731
  with x64():
    x = {"a": jnp.linspace(-1.0, 1.0, 4), "b": jnp.arange(3.0)}
    ours = hessian(_loss(oc.scale_gradient, scale))(x)
    ref = hessian(_loss(optax_run(optax.scale_gradient), scale))(x)
    plain = hessian(_loss(lambda x, s: x, scale))(x)
    assert_rel_close(ours, ref, F64_RTOL)
    assert_rel_close(ours, jax.tree.map(lambda h: scale**2 * h, plain), F64_RTOL)
    traced = jax.jit(hessian(lambda x, s: _loss(oc.scale_gradient, s)(x)))(x, scale)
    assert_rel_close(traced, ours, F64_RTOL)


def test_scale_gradient_keeps_cotangent_dtypes_and_integer_inputs():
  """A bfloat16 input gets a bfloat16 gradient with a float32 array scale; integer leaves
  (no gradient) ride along."""

  def f(x):
    out = oc.scale_gradient({"x": x, "n": jnp.arange(3)}, jnp.float32(0.25))
    return jnp.sum(out["x"].astype(jnp.float32) * out["n"].astype(jnp.float32))

  g = jax.grad(f)(jnp.ones(3, jnp.bfloat16))
  assert g.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(g, np.float32), [0.0, 0.25, 0.5])


# --- per-example clipping -----------------------------------------------------------------


def test_per_example_global_norm_clip_matches_optax_s_docstring_example():
  grads = [jnp.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
  for clip, total, count in [(jnp.inf, 7.0, 0), (0.0, 0.0, 3), (1.25, 1.75, 3)]:
    (summed,), n = oc.per_example_global_norm_clip(grads, clip)
    (summed_ref,), n_ref = optax_run(optax.per_example_global_norm_clip)(grads, clip)
    assert summed.dtype == summed_ref.dtype and n.dtype == n_ref.dtype
    np.testing.assert_array_equal(summed, np.full(3, total))
    np.testing.assert_array_equal(summed_ref, summed)
    assert int(n) == int(n_ref) == count


BATCHED = {"w": (6, 3, 2), "b": (6, 4), "s": (6,)}


def batched64():
  grads = tree64(BATCHED, scale=2.0)
  return jax.tree.map(lambda g: g.at[2].set(0.0), grads)  # one all-zero example: 0 / 0


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("clip", [0.0, 0.5, 3.0, float("inf")])
def test_per_example_global_norm_clip_matches_optax(clip):
  with x64():
    grads = batched64()
    ours = oc.per_example_global_norm_clip(grads, clip)
    ref = optax_run(optax.per_example_global_norm_clip)(grads, clip)
    assert_rel_close(ours[0], ref[0], F64_RTOL)
    assert int(ours[1]) == int(ref[1]) and ours[1].dtype == ref[1].dtype
    jitted = jax.jit(oc.per_example_global_norm_clip)(grads, jnp.float64(clip))
    assert_rel_close(jitted[0], ours[0], F64_RTOL)


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("clip", [0.5, 3.0])
def test_per_example_layer_norm_clip_matches_optax(uniform, clip):
  with x64():
    grads = batched64()
    sums, counts = oc.per_example_layer_norm_clip(grads, clip, uniform)
    sums_ref, counts_ref = optax_run(optax.per_example_layer_norm_clip)(grads, clip, uniform)
    assert_rel_close(sums, sums_ref, F64_RTOL)
    assert jax.tree.map(int, counts) == jax.tree.map(int, counts_ref)
    assert sum(jax.tree.leaves(jax.tree.map(int, counts))) > 0  # something was clipped


@pytest.mark.numerics
def test_per_example_clip_of_bfloat16_keeps_the_dtype_and_measures_in_float32():
  """Norms summed in float32: each example's clipped sum is within a bfloat16 rounding of the
  float64 formula (Optax measures in bfloat16)."""
  grads = {"w": jnp.asarray(RNG.normal(size=(8, 50)) * 40, jnp.bfloat16)}
  (summed,), _ = oc.per_example_global_norm_clip([grads["w"]], 10.0)
  g = np.asarray(grads["w"], np.float64)
  m = np.minimum(1.0, 10.0 / np.linalg.norm(g, axis=1))
  assert summed.dtype == jnp.bfloat16
  assert_ulps_close(summed, m @ g, 2, dtype=jnp.bfloat16)


# --- unit-wise norms and clipping ---------------------------------------------------------

UNIT_SHAPES = [
  (),
  (5,),
  (1, 5),
  (3, 4),
  (2, 3, 4),
  (2, 2, 3, 4),
  (2, 2, 2, 3, 4),
  (1, 1, 1, 1, 1, 1, 4),
]


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("shape", UNIT_SHAPES, ids=str)
def test_unitwise_norm_matches_optax_at_every_rank(shape):
  with x64():
    x = jnp.asarray(RNG.normal(size=shape))
    assert_rel_close(oc.unitwise_norm(x), optax_run(optax.transforms.unitwise_norm)(x), F64_RTOL)
    if len(shape) >= 2:
      for axis in (1, (0, len(shape) - 1)):
        assert_rel_close(
          oc.unitwise_norm(x, axis), optax_run(optax.transforms.unitwise_norm)(x, axis), F64_RTOL
        )


def test_unitwise_norm_of_integers_complex_and_float16():
  """Integers give float32 norms and complex arrays real ones, as Optax's; float16 squares
  are summed in float32 (300^2 overflows float16, where Optax gives inf)."""
  ints = jnp.arange(12).reshape(3, 4)
  np.testing.assert_array_equal(
    oc.unitwise_norm(ints), optax_run(optax.transforms.unitwise_norm)(ints)
  )
  z = jnp.asarray(RNG.normal(size=(3, 2)) + 1j * RNG.normal(size=(3, 2)), jnp.complex64)
  assert_ulps_close(oc.unitwise_norm(z), optax_run(optax.transforms.unitwise_norm)(z), 2)
  big = jnp.full((4, 2), 300.0, jnp.float16)
  ours = oc.unitwise_norm(big)
  assert ours.dtype == jnp.float16 and float(ours[0, 0]) == 600.0
  assert bool(jnp.isinf(optax_run(optax.transforms.unitwise_norm)(big)[0, 0]))


@pytest.mark.numerics
@pytest.mark.float64
def test_unitwise_clip_matches_optax_and_is_adaptive_grad_clip_s_step():
  with x64():
    w = jnp.asarray(RNG.normal(size=(4, 3)))
    g = jnp.asarray(RNG.normal(size=(4, 3)) * np.array([0.01, 1.0, 100.0]))
    g_norm = oc.unitwise_norm(g)
    max_norm = 0.1 * jnp.maximum(oc.unitwise_norm(w), 1e-3)
    ours = oc.unitwise_clip(g_norm, max_norm, g)
    assert_rel_close(ours, optax_run(optax.transforms.unitwise_clip)(g_norm, max_norm, g), F64_RTOL)
    np.testing.assert_array_equal(ours[:, 0], g[:, 0])  # the small unit kept
    agc, _ = oc.adaptive_grad_clip(0.1).update(g, oc.EmptyState(), w)
    assert_rel_close(agc, ours, F64_RTOL)
    tiny = oc.unitwise_clip(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), div_eps=1e-6)
    np.testing.assert_array_equal(tiny, [0.0, 0.0])  # 0 / max(0, div_eps): no NaN


# --- safe norms and the increment ----------------------------------------------------------

NORM_ARGS = [
  dict(),
  dict(ord=1),
  dict(ord=jnp.inf, axis=1),
  dict(axis=0, keepdims=True),
  dict(ord="fro", axis=(0, 1)),
  dict(axis=1),
]


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("kwargs", NORM_ARGS, ids=lambda k: str(k) or "defaults")
@pytest.mark.parametrize("floor", [0.0, 0.5, 100.0])
def test_safe_norm_matches_optax_in_value_and_gradient(kwargs, floor):
  """Rows of zeros take the floor with a zero gradient (not NaN); others, the norm's."""

  def squared(fn, x):
    return jnp.sum(fn(x, floor, **kwargs) ** 2)

  with x64():
    x = jnp.asarray(RNG.normal(size=(3, 4))).at[1].set(0.0)
    ref = optax_run(optax.safe_norm)
    assert_rel_close(oc.safe_norm(x, floor, **kwargs), ref(x, floor, **kwargs), F64_RTOL)
    grad = jax.grad(squared, argnums=1)(oc.safe_norm, x)
    assert_rel_close(grad, jax.grad(squared, argnums=1)(ref, x), F64_RTOL)
    assert bool(jnp.all(jnp.isfinite(grad)))
    zero_grad = jax.grad(lambda x: oc.safe_norm(x, 1e-3))(jnp.zeros(3))
    np.testing.assert_array_equal(zero_grad, np.zeros(3))


@pytest.mark.numerics
@pytest.mark.float64
@pytest.mark.parametrize("floor", [0.0, 0.1, 10.0])
def test_safe_root_mean_squares_matches_optax_in_value_and_gradient(floor):
  ref = optax_run(optax.safe_root_mean_squares)
  with x64():
    for x in (
      jnp.asarray(RNG.normal(size=(3, 4))),
      jnp.zeros(5),
      jnp.asarray(RNG.normal(size=3) + 1j * RNG.normal(size=3)),
    ):
      assert_rel_close(oc.safe_root_mean_squares(x, floor), ref(x, floor), F64_RTOL)
      if not jnp.iscomplexobj(x):
        g = jax.grad(oc.safe_root_mean_squares)(x, floor)
        assert_rel_close(g, jax.grad(ref)(x, floor), F64_RTOL)
        assert bool(jnp.all(jnp.isfinite(g)))


def test_safe_int32_increment_is_optax_s_alias_of_safe_increment():
  assert oc.safe_int32_increment is oc.safe_increment
  top = jnp.iinfo(jnp.int32).max
  for count in (jnp.int32(5), jnp.int32(top)):
    assert int(oc.safe_int32_increment(count)) == int(optax.safe_int32_increment(count))


# --- names, arguments, defaults --------------------------------------------------------------

FUNCTIONS = {
  "scale_gradient": optax.scale_gradient,
  "safe_norm": optax.safe_norm,
  "safe_root_mean_squares": optax.safe_root_mean_squares,
  "safe_int32_increment": optax.safe_int32_increment,
  "per_example_global_norm_clip": optax.transforms.per_example_global_norm_clip,
  "per_example_layer_norm_clip": optax.transforms.per_example_layer_norm_clip,
  "unitwise_norm": optax.transforms.unitwise_norm,
  "unitwise_clip": optax.transforms.unitwise_clip,
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_functions_have_optax_s_names_arguments_and_defaults(name):
  ours = inspect.signature(getattr(oc, name)).parameters
  theirs = inspect.signature(FUNCTIONS[name]).parameters
  assert [(p.name, p.kind, p.default) for p in ours.values()] == [
    (p.name, p.kind, p.default) for p in theirs.values()
  ]


def test_state_types_have_optax_s_names_and_fields():
  assert oc.ZeroNansState._fields == optax.ZeroNansState._fields
  dog_state = optax.scale_by_distance_over_gradients().init({"w": jnp.ones(2)})  # not exported
  assert oc.ScaleByDistanceOverGradientsState._fields == dog_state._fields
  assert oc.NonNegativeParamsState is oc.EmptyState


# --- bad input ------------------------------------------------------------------------------

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
GRADS = jax.tree.map(lambda p: p + 0.5, PARAMS)


@pytest.mark.parametrize(
  "call, error, match",
  [
    (lambda: oc.scale_by_distance_over_gradients(reps_rel=0.0), ValueError, "`reps_rel`"),
    (lambda: oc.scale_by_distance_over_gradients(reps_rel=-1e-6), ValueError, "`reps_rel`"),
    (
      lambda: oc.scale_by_distance_over_gradients(reps_rel=lambda c: 1e-6),
      TypeError,
      "`reps_rel` does not accept a schedule",
    ),
    (lambda: oc.scale_by_distance_over_gradients(eps=0.0), ValueError, "`eps`"),
    (
      lambda: oc.scale_by_distance_over_gradients(param_dtype=jnp.int32),
      TypeError,
      "`param_dtype`",
    ),
    (
      lambda: oc.scale_by_distance_over_gradients(global_scale=float("nan")),
      ValueError,
      "`global_scale` must be finite",
    ),
    (
      lambda: oc.scale_by_distance_over_gradients().init({"n": jnp.arange(3)}),
      TypeError,
      r"params\['n'\]",
    ),
    (
      lambda: oc.scale_by_distance_over_gradients().update(
        GRADS, oc.scale_by_distance_over_gradients().init(PARAMS)
      ),
      ValueError,
      "needs `params`",
    ),
    (
      lambda: oc.scale_by_distance_over_gradients().update(
        {"w": jnp.ones((3, 2)), "b": jnp.ones(3)},
        oc.scale_by_distance_over_gradients().init(PARAMS),
        PARAMS,
      ),
      ValueError,
      r"updates\['w'\]` has shape \(3, 2\)",
    ),
    (
      lambda: oc.scale_by_distance_over_gradients().update(GRADS, oc.EmptyState(), PARAMS),
      ValueError,
      "expected a ScaleByDistanceOverGradientsState",
    ),
    (
      lambda: oc.scale_by_distance_over_gradients().init(oc.flat_params(PARAMS)),
      TypeError,
      "scale_by_distance_over_gradients computes one value per leaf",
    ),
    (
      lambda: oc.centralize().update(oc.flat_params(GRADS), oc.EmptyState()),
      TypeError,
      "centralize computes one value per leaf",
    ),
    (
      lambda: oc.centralize().update({"n": jnp.ones((2, 2), jnp.int32)}, oc.EmptyState()),
      TypeError,
      r"centralize needs floating-point updates",
    ),
    (
      lambda: oc.keep_params_nonnegative().update(GRADS, oc.EmptyState()),
      ValueError,
      "keep_params_nonnegative needs `params`",
    ),
    (
      lambda: oc.keep_params_nonnegative().update({"w": jnp.ones((2, 3))}, oc.EmptyState(), PARAMS),
      ValueError,
      r"\['b'\] is missing",
    ),
    (
      lambda: oc.zero_nans().update({"w": jnp.ones((2, 3))}, oc.zero_nans().init(PARAMS)),
      ValueError,
      r"zero_nans: `updates` does not have the structure.*\['b'\] is missing",
    ),
    (lambda: oc.zero_nans().update(GRADS, oc.EmptyState()), ValueError, "expected a ZeroNansState"),
    (
      lambda: oc.scale_gradient(PARAMS, jnp.ones(2)),
      ValueError,
      "scale_gradient: `scale` must be a scalar",
    ),
    (lambda: oc.scale_gradient(PARAMS, "2"), TypeError, "scale_gradient: `scale`"),
    (lambda: oc.scale_gradient(PARAMS, True), TypeError, "scale_gradient: `scale`"),
    (
      lambda: oc.per_example_global_norm_clip({"a": jnp.ones((4, 2)), "b": jnp.ones((3, 2))}, 1.0),
      ValueError,
      (
        r"per_example_global_norm_clip expects .* `grads\['b'\]` has shape \(3, 2\) "
        r"and `grads\['a'\]` \(4, 2\)"
      ),
    ),
    (
      lambda: oc.per_example_global_norm_clip({"a": jnp.ones(4), "s": jnp.float32(1.0)}, 1.0),
      ValueError,
      r"`grads\['s'\]` has shape \(\)",
    ),
    (lambda: oc.per_example_global_norm_clip({}, 1.0), ValueError, "`grads` has no arrays"),
    (
      lambda: oc.per_example_global_norm_clip([jnp.ones((2, 2))], -1.0),
      ValueError,
      "`l2_norm_clip` must be >= 0",
    ),
    (
      lambda: oc.per_example_global_norm_clip([jnp.ones((2, 2))], float("nan")),
      ValueError,
      "`l2_norm_clip` must be >= 0",
    ),
    (
      lambda: oc.per_example_global_norm_clip([jnp.ones((2, 2))], jnp.ones(2)),
      ValueError,
      "`l2_norm_clip` must be a scalar",
    ),
    (lambda: oc.per_example_global_norm_clip([jnp.ones((2, 2))], "1"), TypeError, "`l2_norm_clip`"),
    (
      lambda: oc.per_example_layer_norm_clip([jnp.ones((2, 2)), jnp.ones(3)], 1.0),
      ValueError,
      r"per_example_layer_norm_clip expects .*`grads\[1\]` has shape \(3,\)",
    ),
    (
      lambda: oc.per_example_layer_norm_clip([jnp.ones((2, 2))], -2.0),
      ValueError,
      "`global_l2_norm_clip` must be >= 0",
    ),
    (
      lambda: oc.per_example_layer_norm_clip([jnp.ones((2, 2))], 1.0, uniform="no"),
      TypeError,
      "`uniform` must be a bool",
    ),
    (
      lambda: oc.unitwise_norm(jnp.ones((2,) * 6)),
      ValueError,
      r"unitwise_norm: no default unit for an array of rank 6",
    ),
    (
      lambda: oc.unitwise_norm(jnp.ones((2, 3)), axis=4),
      ValueError,
      r"unitwise_norm: `axis` 4 does not fit `x` of shape \(2, 3\)",
    ),
    (
      lambda: oc.unitwise_clip(jnp.ones(3), jnp.ones(3), jnp.ones((2, 3))),
      ValueError,
      r"unitwise_clip: .* got \(3,\), \(3,\) and \(2, 3\)",
    ),
    (lambda: oc.safe_norm(jnp.ones(3), "0"), TypeError, "safe_norm: `min_norm`"),
    (
      lambda: oc.safe_root_mean_squares(jnp.ones(3), 1j),
      TypeError,
      "safe_root_mean_squares: `min_rms`",
    ),
  ],
  ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_named(call, error, match):
  with pytest.raises(error, match=match):
    call()
