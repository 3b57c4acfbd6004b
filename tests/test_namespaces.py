"""Optax's namespaces under optcompose: ``optax.tree``, ``optax.tree_utils`` and
``optax.transforms`` (0.2.8), name for name; the tree functions against Optax's on a pytree of
float64 and float32 leaves; the deprecated names warning as Optax's do; and every optcompose
transformation an instance of Optax's transformation types."""

from __future__ import annotations

import contextlib
import os
import inspect
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
from numerics import assert_ulps_close, standard_promotion, x64
from registry import CASES

# Names of Optax's that optcompose does not answer yet, each with what is missing. Checked to
# contain every unresolved name (a name added to optcompose may stay here until this list is
# next edited; the test prints the ones that resolve now). Empty: every name resolves.
NOT_YET = {
  "tree": {},
  "tree_utils": {},
  "transforms": {},
  "schedules": {"WrappedSchedule": "stateful schedules: Optax's inject_stateful_hyperparams"},
}

# Optax's top-level names optcompose does not rebuild, each on purpose
# (docs/coming-from-optax.md): the error for each says what to use instead.
NOT_REBUILT = {
  "WrappedSchedule": "stateful schedules: Optax's inject_stateful_hyperparams"
}  # (and the module optax.contrib: its optimizers, Optax's own, work in our chains)
# Optax's state classes whose contents optcompose keeps in another class: an isinstance test
# against Optax's class would silently be False, so the error names ours.
KEPT_ELSEWHERE = {"ScaleByScheduleState": "InjectHyperparamsState"}


def test_every_top_level_name_of_optax_resolves_but_the_ones_not_rebuilt():
  assert unresolved(oc, optax) == sorted({*NOT_REBUILT, *KEPT_ELSEWHERE})


@pytest.mark.parametrize("name", sorted(KEPT_ELSEWHERE))
def test_a_state_kept_elsewhere_names_the_class_to_test_for(name):
  ours = KEPT_ELSEWHERE[name]
  for space in (oc, oc.schedules) if hasattr(optax.schedules, name) else (oc,):
    with pytest.raises(AttributeError, match=rf"isinstance\(s, optcompose\.{ours}\)"):
      getattr(space, name)


def test_optax_s_schedules_names_are_the_top_level_s():
  """``optax.schedules.inject_hyperparams`` (Tunix and Optax's own docstrings use it)."""
  assert oc.schedules.inject_hyperparams is oc.inject_hyperparams
  assert oc.schedules.InjectHyperparamsState is oc.InjectHyperparamsState
  assert oc.schedules.inject_stateful_hyperparams is oc.inject_stateful_hyperparams
  tx = oc.schedules.inject_hyperparams(oc.adam)(learning_rate=0.1)
  assert float(tx.init({"w": jnp.ones(2)}).hyperparams["learning_rate"]) == pytest.approx(0.1)


def public(module) -> list:
  """``module``'s public names, without the modules it happens to import (``functools``)."""
  return sorted(
    n for n in dir(module) if not n.startswith("_") and not inspect.ismodule(getattr(module, n))
  )


def unresolved(ours, theirs) -> list:
  missing = []
  for name in public(theirs):
    try:
      getattr(ours, name)
    except AttributeError as e:
      helpful = "not rebuilt yet" in str(e) or "so test for that class" in str(e)
      assert helpful, f"{ours.__name__}.{name}: {e}"
      missing.append(name)
  return missing


@pytest.mark.parametrize("namespace", sorted(NOT_YET))
def test_every_name_of_optax_s_namespace_resolves(namespace):
  ours, theirs = getattr(oc, namespace), getattr(optax, namespace)
  missing = unresolved(ours, theirs)
  print(
    f"optax.{namespace}: {len(public(theirs))} names; not yet in optcompose.{namespace}: "
    f"{missing or 'none'}"
  )
  stale = sorted(set(NOT_YET[namespace]) - set(missing))
  if stale:
    print(f"  resolve now (drop them from NOT_YET): {stale}")
  assert set(missing) <= set(NOT_YET[namespace])


def test_optax_s_transforms_names_are_the_top_level_s():
  for name in public(optax.transforms):
    if name in NOT_YET["transforms"]:
      continue
    value = getattr(oc.transforms, name)
    theirs = getattr(optax.transforms, name)
    assert value is getattr(oc, name, theirs), name  # ours, or Optax's where a type only
    if value is theirs:
      assert getattr(theirs, "_is_protocol", False), f"{name} is Optax's and not a type"
  assert "chain" in dir(oc.transforms) and "momentum" in dir(oc.transforms)  # and the modules


def test_a_transforms_name_not_rebuilt_says_so(monkeypatch):
  def planted():
    pass

  planted.__module__ = "optax.transforms._planted"
  monkeypatch.setattr(optax.transforms, "planted_transform", planted, raising=False)
  with pytest.raises(
    AttributeError,
    match=r"module 'optcompose.transforms' has no attribute "
    r"'planted_transform' yet: Optax's `optax.transforms.planted_transform`",
  ):
    oc.transforms.planted_transform
  with pytest.raises(AttributeError, match="has no attribute 'not_a_name'$"):
    oc.transforms.not_a_name


# ---------------------------------------------------------------------------------------
# optcompose.tree against optax.tree.


@pytest.mark.parametrize("name", public(optax.tree))
def test_tree_functions_take_optax_s_arguments(name):
  def params(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]

  assert params(getattr(oc.tree, name)) == params(getattr(optax.tree, name))


def trees():
  """Two trees of one structure, float64 and float32 leaves mixed (under x64)."""
  rng = np.random.default_rng(0)
  shapes = {
    "a": ((3,), jnp.float64),
    "b": {"c": ((2, 2), jnp.float32), "d": ((), jnp.float64)},
    "e": [((4,), jnp.float32), ((0,), jnp.float32)],
  }

  def make(low, high):
    return jax.tree.map(
      lambda s: jnp.asarray(rng.uniform(low, high, s[0]), s[1]),
      shapes,
      is_leaf=lambda s: isinstance(s, tuple) and isinstance(s[0], tuple),
    )

  return make(-2.0, 2.0), make(0.5, 1.5)


def calls(x, y):
  """(label, function of a tree namespace) pairs covering every optax.tree function."""
  key = jax.random.key(3)
  uniform = jax.tree.map(lambda v: v.astype(jnp.float32), x)
  return [
    ("add", lambda t: t.add(x, y)),
    ("add3", lambda t: t.add(x, y, x)),
    ("sub", lambda t: t.sub(x, y)),
    ("mul", lambda t: t.mul(x, y)),
    ("div", lambda t: t.div(x, y)),
    ("scale", lambda t: t.scale(0.5, x)),
    ("scale_f32", lambda t: t.scale(jnp.float32(0.5), x)),
    ("add_scale", lambda t: t.add_scale(x, 0.3, y)),
    ("vdot", lambda t: t.vdot(x, y)),
    ("sum", lambda t: t.sum(x)),
    ("sum_assoc", lambda t: t.sum(x, associative_reduction=True)),
    ("max", lambda t: t.max(x)),
    ("min", lambda t: t.min(x)),
    ("size", lambda t: t.size(x)),
    ("conj", lambda t: t.conj(x)),
    ("real", lambda t: t.real(x)),
    ("norm", lambda t: t.norm(x)),
    ("norm_sq", lambda t: t.norm(x, squared=True)),
    ("norm_1", lambda t: t.norm(x, ord=1)),
    ("norm_inf", lambda t: t.norm(x, ord="inf")),
    ("norm_inf_sq", lambda t: t.norm(x, ord=jnp.inf, squared=True)),
    ("batch_shape", lambda t: t.batch_shape(x, (2,))),
    ("zeros_like", lambda t: t.zeros_like(x)),
    ("zeros_like_f32", lambda t: t.zeros_like(x, dtype=jnp.float32)),
    ("ones_like", lambda t: t.ones_like(x)),
    ("full_like", lambda t: t.full_like(x, fill_value=2.5)),
    ("full_like_f64", lambda t: t.full_like(x, 3, jnp.float64)),
    ("clip", lambda t: t.clip(x, min_value=-0.5, max_value=0.5)),
    ("clip_low", lambda t: t.clip(x, -0.5)),
    ("update_moment", lambda t: t.update_moment(x, y, 0.9, 1)),
    ("update_moment_2", lambda t: t.update_moment(x, y, 0.99, 2)),
    ("update_infinity_moment", lambda t: t.update_infinity_moment(x, y, 0.9, 1e-8)),
    ("update_moment_per_elem_norm", lambda t: t.update_moment_per_elem_norm(x, y, 0.9, 2)),
    ("bias_correction", lambda t: t.bias_correction(y, 0.9, jnp.int32(3))),
    ("bias_correction_f32", lambda t: t.bias_correction(y, jnp.float32(0.999), jnp.int32(7))),
    ("where", lambda t: t.where(jnp.asarray(False), x, y)),
    ("allclose", lambda t: t.allclose(x, x)),
    ("not_allclose", lambda t: t.allclose(x, y)),
    ("cast", lambda t: t.cast(x, jnp.float32)),
    ("cast_like", lambda t: t.cast_like(x, uniform)),
    ("dtype_promote", lambda t: t.dtype(x, "promote")),
    ("dtype_highest", lambda t: t.dtype(x, "highest")),
    ("dtype_lowest", lambda t: t.dtype(x, mixed_dtype_handler="lowest")),
    ("dtype", lambda t: t.dtype(uniform)),
    ("split_key_like", lambda t: jax.tree.map(jax.random.key_data, t.split_key_like(key, x))),
    ("random_like", lambda t: t.random_like(key, x)),
    ("unwrap_random_key_data", lambda t: t.unwrap_random_key_data({"k": key, "x": x})),
  ]


def assert_same(ours, theirs, what):
  if not jax.tree.leaves(theirs) or isinstance(theirs, (int, bool, np.dtype)):
    assert ours == theirs and type(ours) is type(theirs), what
    return
  if any(jnp.iscomplexobj(v) for v in jax.tree.leaves(theirs)):  # each part, and the dtypes
    assert jax.tree.map(jnp.result_type, ours) == jax.tree.map(jnp.result_type, theirs), what
    ours, theirs = [jax.tree.map(lambda v: (jnp.real(v), jnp.imag(v)), t) for t in (ours, theirs)]
  assert_ulps_close(ours, theirs, 2, what=what)


@pytest.mark.float64
def test_tree_functions_compute_optax_s_values_on_mixed_float64_float32_leaves():
  """Ours run under the suite's strict promotion; Optax's need standard promotion there."""
  with x64():
    x, y = trees()
    for label, call in calls(x, y):
      ours = call(oc.tree)
      theirs = standard_promotion(call)(optax.tree)
      assert_same(ours, theirs, label)


def test_covers_every_optax_tree_function():
  """Each function is compared above, or is Optax's own (the lookups by key)."""
  lines = inspect.getsource(calls)
  assert [
    n
    for n in public(optax.tree)
    if f"t.{n}(" not in lines and getattr(oc.tree, n) is not getattr(optax.tree, n)
  ] == []


def test_tree_dtype_errors_as_optax_s():
  with x64():
    x, _ = trees()
    incomparable = {"a": jnp.int32(1), "b": jnp.uint32(1)}  # neither promotes to the other
    for tree, handler in (
      (x, None),
      (x, "nonsense"),
      (incomparable, "highest"),
      (incomparable, "lowest"),
    ):
      with pytest.raises(ValueError) as ours:
        oc.tree.dtype(tree, handler)
      with pytest.raises(ValueError) as theirs:
        standard_promotion(optax.tree.dtype)(tree, handler)
      assert str(ours.value) == str(theirs.value)


def test_complex_leaves():
  z = {"a": jnp.asarray([1 + 2j, -3j], jnp.complex64), "b": jnp.asarray([0.5 - 1j], jnp.complex64)}
  m = jax.tree.map(lambda v: jnp.abs(v), z)
  for label, call in [
    ("norm", lambda t: t.norm(z)),
    ("vdot", lambda t: t.vdot(z, z)),
    ("per_elem", lambda t: t.update_moment_per_elem_norm(z, m, 0.9, 2)),
    ("per_elem_3", lambda t: t.update_moment_per_elem_norm(z, m, 0.9, 3)),
    ("conj", lambda t: t.conj(z)),
    ("norm_1", lambda t: t.norm(z, ord=1)),
  ]:
    assert_same(call(oc.tree), standard_promotion(call)(optax.tree), label)


def test_l2_norm_of_16_bit_leaves_is_squared_in_float32():
  """The deliberate difference: Optax squares float16 300 in float16 (inf)."""
  tree = {"w": jnp.full((4,), 300.0, jnp.float16)}
  assert jnp.isinf(optax.tree.norm(tree))
  norm = oc.tree.norm(tree)
  assert norm.dtype == jnp.float16 and float(norm) == 600.0


@pytest.mark.parametrize("enable_x64", [False, True])
def test_l2_norm_of_integer_leaves_and_of_nothing_is_in_the_default_float_dtype(enable_x64):
  """As Optax's: under x64 an integer leaf's norm is float64, exact to float64 (it was
  float32, 2.236068 for sqrt(5)), and so is the norm of an empty tree."""
  with x64() if enable_x64 else contextlib.nullcontext():
    ints = {"a": jnp.arange(3)}
    for tree in (ints, {}, {"a": None}):
      ours, ref = oc.tree.norm(tree), optax.tree.norm(tree)
      assert ours.dtype == ref.dtype == jnp.result_type(float), tree
      np.testing.assert_allclose(ours, ref, rtol=1e-15 if enable_x64 else 1e-7)
    for dtype in (jnp.float32, jnp.bfloat16):  # beside floats, the floats' dtype
      mixed = {**ints, "b": jnp.ones(2, dtype)}
      ours, ref = oc.tree.norm(mixed), standard_promotion(optax.tree.norm)(mixed)
      assert ours.dtype == ref.dtype == dtype
      np.testing.assert_allclose(np.float32(ours), np.float32(ref), rtol=1e-2)
    assert float(oc.tree.norm(ints, squared=True)) == 5.0


def test_state_lookups_work_on_optcompose_states():
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  tx = oc.chain(oc.clip_by_global_norm(1.0), oc.adam(1e-3))
  state = tx.init(params)
  assert int(oc.tree.get(state, "count")) == 0
  assert [k for k, _ in oc.tree.get_all_with_path(state, "mu")]
  assert int(oc.tree.get(oc.tree.set(state, count=jnp.int32(5)), "count")) == 5
  specs = oc.tree.map_params(tx, lambda _: "spec", state, transform_non_params=lambda _: None)
  mu = oc.tree.get(specs, "mu")
  assert mu == {"w": "spec", "b": "spec"}


# ---------------------------------------------------------------------------------------
# optcompose.tree_utils.

DEPRECATED_TREE_UTILS = (
  "tree_scalar_mul",
  "tree_add_scalar_mul",
  "tree_l1_norm",
  "tree_l2_norm",
  "tree_linf_norm",
)


@pytest.mark.parametrize("name", public(optax.tree_utils))
def test_tree_utils_names_are_the_tree_functions(name):
  if name == "NamedTupleKey":
    assert oc.tree_utils.NamedTupleKey is optax.tree_utils.NamedTupleKey
  else:
    assert getattr(oc.tree_utils, name) is getattr(oc.tree, name.removeprefix("tree_"))


@pytest.mark.parametrize("name", DEPRECATED_TREE_UTILS)
def test_deprecated_tree_utils_names_warn_as_optax_s(name):
  with pytest.warns(DeprecationWarning, match="optax.tree_utils.tree_"):
    theirs = getattr(optax.tree_utils, name)
  with pytest.warns(DeprecationWarning, match=f"optax.tree_utils.{name} is deprecated"):
    ours = getattr(oc.tree_utils, name)
  x = {"a": jnp.asarray([3.0, -4.0]), "b": jnp.asarray([[1.0]])}
  args = (x,) if "norm" in name else (x, 0.5, x) if name == "tree_add_scalar_mul" else (0.5, x)
  assert_same(ours(*args), standard_promotion(theirs)(*args), name)
  with pytest.raises(AttributeError, match="no attribute 'tree_nothing'"):
    oc.tree_utils.tree_nothing


# ---------------------------------------------------------------------------------------
# The top level: Optax's types, deprecated names, flat aliases.


def test_optax_s_types_at_the_top_level():
  for name in (
    "TransformInitFn",
    "TransformUpdateFn",
    "TransformUpdateExtraArgsFn",
    "OptState",
    "Params",
    "Updates",
    "ScalarOrSchedule",
  ):
    assert getattr(oc, name) is getattr(optax, name), name
  assert oc.Schedule == typing.Callable[[jax.typing.ArrayLike], jax.typing.ArrayLike]  # Optax's,
  inspect.signature(oc.Schedule)  # spelled so that it has a signature (base.py says why)
  assert issubclass(oc.GradientTransformationExtraArgs, optax.GradientTransformationExtraArgs)
  assert oc.GradientTransformationExtraArgs is oc.GradientTransformation
  assert oc.EmptyState() == ()  # ours: a state class, not a type only
  assert oc.MaskOrFn is optax.MaskOrFn  # a type only: Optax's


def test_global_norm_warns_at_call_as_optax_s():
  x = {"a": jnp.asarray([3.0, -4.0]), "b": [jnp.asarray(12.0)]}
  fn = oc.global_norm  # looking it up does not warn; calling it does, as in Optax
  with pytest.warns(
    DeprecationWarning, match="optax.global_norm is deprecated in favor of optax.tree.norm"
  ):
    value = fn(x)
  assert float(value) == 13.0


def test_inject_stateful_hyperparams_warns_and_injects():
  with pytest.warns(DeprecationWarning, match="inject_stateful_hyperparams is deprecated"):
    tx = oc.inject_stateful_hyperparams(oc.sgd)(learning_rate=0.1)
  params = {"w": jnp.ones(2)}
  updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1)


def test_optax_s_flat_tree_aliases_are_ours():
  for name, ours in [
    ("bias_correction", oc.tree.bias_correction),
    ("update_moment", oc.tree.update_moment),
    ("update_moment_per_elem_norm", oc.tree.update_moment_per_elem_norm),
    ("update_infinity_moment", oc.tree.update_infinity_moment),
    ("tree_map_params", oc.tree.map_params),
  ]:
    assert getattr(oc, name) is ours, name


# ---------------------------------------------------------------------------------------
# Every transformation is an instance of Optax's types.


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_transformation_is_an_optax_gradient_transformation(case):
  tx = case.ours()
  assert isinstance(tx, optax.GradientTransformation), type(tx)
  assert isinstance(tx, optax.GradientTransformationExtraArgs), type(tx)
  assert optax.with_extra_args_support(tx) is tx  # Optax hands it keyword arguments


def test_chain_and_helpers_are_optax_gradient_transformations():
  made = [
    oc.chain(),
    oc.chain(oc.sgd(0.1), optax.clip(1.0)),
    oc.identity(),
    oc.stateless(lambda u, p: u),
    oc.stateless_with_tree_map(lambda u, p: u),
    oc.GradientTransformationExtraArgs(oc.init_empty_state, lambda u, s, p=None, **e: (u, s)),
    oc.chain(oc.sgd(0.1))._replace(init=oc.init_empty_state),
  ]
  for tx in made:
    assert isinstance(tx, oc.GradientTransformation)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
  # Optax's own stays Optax's (adapted, not passed through, inside our chains).
  assert not isinstance(optax.sgd(0.1), oc.GradientTransformation)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert repr(oc.identity()).startswith("GradientTransformation(init=")


def test_optax_contrib_answers_with_what_optcompose_has_of_it():
  """``optax.contrib.reduce_on_plateau`` written against optcompose (attribute, ``import
  optcompose.contrib`` or ``from optcompose.contrib import``) is the top level's; a contrib
  optimizer not rebuilt raises an error naming Optax's own."""
  import importlib

  contrib = importlib.import_module("optcompose.contrib")
  assert oc.contrib is contrib
  names = [n for n in dir(optax.contrib) if not n.startswith("_") and hasattr(oc, n)]
  assert "reduce_on_plateau" in names and "sam" in names
  assert sorted(contrib.__all__) == sorted(names + ["NormalizeState"])  # contrib's only
  for name in names:
    assert getattr(contrib, name) is getattr(oc, name)
  assert type(contrib.normalize().init({"w": jnp.ones(2)})) is contrib.NormalizeState
  with pytest.raises(
    AttributeError,
    match=r"optcompose.contrib' has no attribute 'muon' yet.*"
    r"`import optax; optax.contrib.muon\(...\)`",
  ):
    contrib.muon  # noqa: B018
  with pytest.raises(AttributeError, match="nor has Optax"):
    contrib.not_a_name_anywhere  # noqa: B018


def test_optax_namespaces_outside_the_optimizer_domain_import_as_submodules():
  """``from optax.losses import ...`` written as ``from optcompose.losses import ...``."""
  import importlib

  for name in ("losses", "projections", "second_order", "experimental"):
    assert importlib.import_module(f"optcompose.{name}") is getattr(optax, name)
  from optcompose.losses import softmax_cross_entropy_with_integer_labels as loss

  assert loss is optax.losses.softmax_cross_entropy_with_integer_labels
  with pytest.raises(ModuleNotFoundError):
    importlib.import_module("optcompose.not_a_namespace")


def test_optax_s_inject_hyperparams_state_class_names_ours():
  """Optax 0.2.8's inject_hyperparams returns an InjectStatefulHyperparamsState, and real
  code tests for both classes (RecML's metrics: isinstance(s, (optax.
  InjectStatefulHyperparamsState, optax.InjectHyperparamsState))); here the name was an
  AttributeError. It is our InjectHyperparamsState, at the top level and in schedules."""
  assert oc.InjectStatefulHyperparamsState is oc.InjectHyperparamsState
  assert oc.schedules.InjectStatefulHyperparamsState is oc.InjectHyperparamsState
  state = oc.inject_hyperparams(oc.adam)(learning_rate=0.1).init({"w": jnp.ones(2)})
  assert isinstance(state, (oc.InjectStatefulHyperparamsState, oc.InjectHyperparamsState))


_IMPORT_EVERYTHING = """
import importlib, os, pkgutil, sys
import optcompose
from jax._src import xla_bridge
started = []
def check(what):
  if xla_bridge.backends_are_initialized() and not started:
    started.append(what)
check("import optcompose")
for module in pkgutil.walk_packages(optcompose.__path__, "optcompose."):
  importlib.import_module(module.name)
  check(module.name)
for name in sorted(set(optcompose._ON_FIRST_USE) | {"losses", "tree", "contrib", "_src"}):
  getattr(optcompose, name)
  check("optcompose." + name)
print(started)
"""


def test_importing_optcompose_leaves_the_backend_alone():
  """``import optcompose`` started JAX's backend (a default ``jnp.zeros`` in a state class;
  the Flax/Equinox trial), where ``import optax`` does not: then ``jax.distributed.initialize``,
  ``jax_num_cpu_devices`` and an ``XLA_FLAGS`` device count set after the imports fail or are
  silently ignored. Importing every module and lazy name must start nothing."""
  import subprocess
  import sys

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run(
    [sys.executable, "-c", _IMPORT_EVERYTHING], capture_output=True, text=True, env=env
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip().splitlines()[-1] == "[]", f"started by {run.stdout}"


def test_optcompose_standing_in_for_the_optax_module_says_why_optax_names_fail():
  """``sys.modules["optax"] = optcompose`` (so that Flax's own code uses it) made every name
  optcompose forwards to Optax (``optax.l2_loss``) a RecursionError; now an AttributeError
  that says why, and optcompose's own names still resolve."""
  import subprocess
  import sys

  code = (
    "import sys, optcompose\n"
    "sys.modules['optax'] = optcompose\n"
    "import optax\n"
    "assert optax.adam is optcompose.adam\n"
    "try:\n"
    "  optax.l2_loss\n"
    "except AttributeError as e:\n"
    "  print(e)\n"
  )
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "sys.modules['optax'] is optcompose" in run.stdout
  assert "import optcompose as optax" in run.stdout
