"""What with_diagnostics' measurements and multi_steps' accumulation cost the step, read
from the compiled HLO (issue 16), and the pieces that keep them cheap: ordered_after changes
no bit, and the zero count is exact beyond float32's integers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc
import optcompose.wrappers.measures as measures
from optcompose.core import ordered_after
from numerics import x64
from test_clipping import donated_update_hlo, gradient_sized_temporaries

SIZE = 1 << 16


def entry(tx) -> str:
  hlo = donated_update_hlo(tx, {"w": jnp.ones(SIZE, jnp.float32)})
  return hlo[hlo.index("ENTRY") :]


def big_copies(hlo: str) -> list:
  return re.findall(rf"= f32\[{SIZE}\]\S* copy\(", hlo)


def loops(hlo: str) -> int:
  return len(re.findall(rf"= f32\[{SIZE}\]\S* fusion\(", hlo))


@pytest.mark.xla_cpu_program
@pytest.mark.parametrize("every_k", [1, 10])
def test_the_step_updates_the_donated_buffers_in_place(every_k):
  """The measurements (a lax.cond that reads the parameters and AdamW's moments) run before
  the step, which then writes its three loops in place, as AdamW alone does: no copy of a
  parameter-sized buffer. Before (measuring the step's own updates), XLA copied the
  parameters and wrote the updates out (4.5x the bare step on XLA CPU)."""
  bare = entry(oc.adamw(1e-3, weight_decay=1e-4))
  wrapped = entry(oc.with_diagnostics(oc.adamw(1e-3, weight_decay=1e-4), every_k=every_k))
  assert big_copies(bare) == [] and big_copies(wrapped) == []
  assert loops(wrapped) == loops(bare) == 3
  assert " conditional(" in wrapped  # every_k=1 too: not inlined into the step


@pytest.mark.xla_cpu_program
def test_multi_steps_writes_its_accumulator_in_place():
  """The real step accumulates inside its conditional; the accumulator is written after it,
  in place. The step's only parameter-sized temporary is then the conditional's updates
  (what either branch returns); before, the new accumulator was written out first as the
  conditional's operand (multi_steps(adamw, 4): 2.9x AdamW per call on average, 1.8x
  since, XLA CPU)."""
  size = SIZE
  params = {"w": jnp.ones(size, jnp.float32)}
  tx = oc.multi_steps(oc.adamw(1e-3, weight_decay=1e-4), 4)
  hlo = donated_update_hlo(tx, params)
  temporaries = gradient_sized_temporaries(hlo, size)
  assert len(temporaries) == 1 and temporaries[0].startswith("cond"), temporaries
  assert big_copies(hlo[hlo.index("ENTRY") :]) == []


def bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("token", [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.5, -1e30])
def test_ordered_after_changes_no_bit(dtype, token):
  # 1e-40 and -1e-45: float32 and bfloat16 subnormals, which XLA CPU's arithmetic flushes.
  values = jnp.asarray([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-3, -7.25, 6e4, 1e-40, -1e-45], dtype)
  other = {"i": jnp.arange(3), "c": jnp.asarray([complex(np.inf, 1.0)], jnp.complex64)}
  out = jax.jit(ordered_after)({"x": values, **other}, jnp.float32(token))
  np.testing.assert_array_equal(bits(out["x"]), bits(values))
  np.testing.assert_array_equal(np.asarray(out["i"]), np.arange(3))
  assert np.asarray(out["c"])[0] == complex(np.inf, 1.0)


def test_ordered_after_passes_derivatives_through():
  """The derivative of the identity, whatever the token: through the integer bits JAX would
  give none, and through a norm at zero, NaN. with_diagnostics stays differentiable."""
  x = jnp.zeros(4)
  f = lambda x: jnp.sum(ordered_after(x, jnp.sqrt(jnp.sum(x * x))) * 2.0)  # noqa: E731
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(f))(x)), 2.0)
  params = {"w": jnp.ones(SIZE, jnp.float32)}
  tx = oc.with_diagnostics(oc.sgd(0.1))
  state = tx.init(params)
  total = lambda g: jnp.sum(tx.update(g, state, params)[0]["w"])  # noqa: E731
  grad = jax.jit(jax.grad(total))({"w": jnp.zeros(SIZE, jnp.float32)})["w"]
  np.testing.assert_allclose(np.asarray(grad), -0.1, rtol=1e-6)


def test_second_derivatives_through_the_ordering_inside_scan_are_the_identity_s():
  """Inside lax.scan, reverse-over-reverse differentiation (jax.hessian) differentiates the
  ordering's body, not its derivative rule: through integer bits alone that body had a zero
  derivative, and MultiSteps' Hessians (every leaf ordered) came out halved or worse."""
  with x64():
    x0 = jnp.array([1.0, 2.0])

    def f(x, order):
      def body(y, _):
        return (ordered_after(y, jnp.float32(1.0)) if order else y) * x, None

      return jnp.sum(jax.lax.scan(body, x, None, length=3)[0])  # sum(x ** 4)

    for second in (jax.hessian, lambda g: jax.jacrev(jax.jacrev(g))):
      want = second(lambda x: f(x, False))(x0)
      np.testing.assert_allclose(np.asarray(want), np.diag(12 * np.asarray(x0) ** 2))
      np.testing.assert_array_equal(np.asarray(second(lambda x: f(x, True))(x0)), want)

    def through(m, data):  # 6 scanned MultiSteps(sgd, 2) calls on a least-squares loss
      tx, p = m.MultiSteps(m.sgd(0.1), 2), {"w": jnp.ones(2)}

      def call(carry, _):
        p, s = carry
        g = jax.grad(lambda p: jnp.sum((p["w"] * data - 1.0) ** 2))(p)
        u, s = tx.update(g, s, p)
        return (m.apply_updates(p, u), s), None

      (p, _), _ = jax.lax.scan(call, (p, tx.init(p)), None, length=6)
      return jnp.sum(p["w"] ** 3)

    data = jnp.array([0.7, 1.3])
    ours = jax.hessian(lambda d: through(oc, d))(data)
    with jax.numpy_dtype_promotion("standard"):  # Optax's code mixes dtypes
      theirs = jax.hessian(lambda d: through(optax, d))(data)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_zero_fraction_counts_exactly_by_rows_beyond_float32_integers(monkeypatch):
  """Leaves above the exact range (lowered here to 2^12 elements) are counted by rows of a
  power of two, or as integers where no long row divides them; every count exact."""
  monkeypatch.setattr(measures, "_EXACT", 1 << 12)
  rng = np.random.default_rng(0)
  leaves = {}
  for name, size in {"rows": 1 << 14, "threes": 3 << 12, "odd": 5001, "small": 300}.items():
    x = rng.normal(size=size).astype(np.float32)
    x[rng.random(size) < 0.3] = 0.0
    leaves[name] = x
  expected = sum(int(np.sum(x == 0)) for x in leaves.values()) / sum(
    x.size for x in leaves.values()
  )
  tree = jax.tree.map(jnp.asarray, leaves)
  for f in (measures.zero_fraction, jax.jit(measures.zero_fraction)):
    assert float(f(tree)) == pytest.approx(expected, rel=1e-6)
  for name in ("rows", "odd", "small"):  # each way of counting
    nan = {**tree, name: tree[name].at[5].set(jnp.nan)}
    assert np.isnan(float(measures.zero_fraction(nan))), name


def test_zero_fraction_counts_in_the_leaf_s_own_dtype():
  """A float64 1e-300 is not zero (it would be in float32); nor a complex one."""
  with x64():
    x = jnp.asarray([1e-300, 1e-50, 1.0, 0.0], jnp.float64)
    assert float(measures.zero_fraction([x])) == 0.25
    z = jnp.asarray([1e-300 + 0j, 1.0 + 0j], jnp.complex128)
    assert float(measures.zero_fraction([z])) == 0.0


def test_a_nonfinite_count_from_the_norm_falls_back_to_counting():
  """A norm that overflowed from finite gradients (1e30 squared) is not finite: the exact
  count then runs and finds none; a NaN gradient is counted."""
  g = {"a": jnp.asarray([1e30, 1.0], jnp.float32), "b": jnp.asarray([2.0], jnp.float32)}
  norm = oc.tree.global_norm(g)
  assert not np.isfinite(float(norm))
  assert int(measures.nonfinite_count(g, norm=norm)) == 0
  bad = {**g, "b": jnp.asarray([jnp.nan], jnp.float32)}
  assert int(measures.nonfinite_count(bad, norm=oc.tree.global_norm(bad))) == 1
  assert int(jax.jit(measures.nonfinite_count)(bad, oc.tree.global_norm(bad))) == 1


@pytest.mark.numerics
@pytest.mark.parametrize(
  "make",
  [lambda: oc.adamw(1e-3, weight_decay=1e-2), lambda: oc.sgd(1e-2, 0.9, nesterov=True)],
  ids=["adamw", "sgd_nesterov"],
)
def test_ordered_leaves_step_as_the_inner_does(make):
  """Leaves large enough to be ordered after the measurements (SIZE elements): the
  wrapper's jitted updates and state equal the inner's to 2 ulps per step (the bound of the
  small-leaf test in tests/test_diagnostics.py: two programs, which may contract a
  multiply-add differently)."""
  from numerics import assert_ulps_close

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=SIZE), jnp.float32)}
  wrapped, bare = oc.with_diagnostics(make()), make()
  s_w, s_b = wrapped.init(params), bare.init(params)
  up_w, up_b = jax.jit(wrapped.update), jax.jit(bare.update)
  for _ in range(4):
    g = {"w": jnp.asarray(rng.normal(size=SIZE) * 1e-2, jnp.float32)}
    u_w, s_w = up_w(g, s_w, params)
    u_b, s_b = up_b(g, s_b, params)
    assert_ulps_close((u_w, s_w.inner_state), (u_b, s_b), 2)
    params = jax.tree.map(lambda p, u: p + u, params, u_b)


def test_step_if_finite_steps_or_leaves_everything_untouched():
  """Finite gradients: the step ``tx.update`` then ``apply_updates`` take (bitwise, eagerly;
  to 2 ulps jitted: two programs). A NaN or an Inf anywhere: parameters and state as they
  were, bit for bit, and ``finite`` False; with Optax's transformation too."""
  from numerics import assert_ulps_close

  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.zeros(4)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  for tx in (oc.adamw(1e-2, weight_decay=1e-2), optax.sgd(0.1, momentum=0.9)):
    state = tx.init(params)
    updates, want_state = tx.update(grads, state, params)
    want = oc.apply_updates(params, updates)
    got, got_state, ok = oc.step_if_finite(tx, grads, state, params)
    assert bool(ok)
    for a, b in zip(jax.tree.leaves((got, got_state)), jax.tree.leaves((want, want_state))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    got, got_state, ok = jax.jit(oc.step_if_finite, static_argnums=0)(tx, grads, state, params)
    assert bool(ok)
    assert_ulps_close((got, got_state), (want, want_state), 2)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      g = {**grads, "b": grads["b"].at[2].set(bad)}
      for step in (oc.step_if_finite, jax.jit(oc.step_if_finite, static_argnums=0)):
        got, got_state, ok = step(tx, g, state, params)
        assert not bool(ok)
        for a, b in zip(jax.tree.leaves((got, got_state)), jax.tree.leaves((params, state))):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.xla_cpu_program
def test_step_if_finite_writes_the_step_in_place():
  """The parameters' update inside the conditional: the donated step has AdamW's three
  loops, no parameter-sized temporary and no copy (apply_if_finite, which must return
  its updates, writes them out: one temporary)."""
  params = {"w": jnp.ones(SIZE, jnp.float32)}
  tx = oc.adamw(1e-3, weight_decay=1e-4)

  def step(params, state, grads):
    return oc.step_if_finite(tx, grads, state, params)[:2]

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
  hlo = hlo.compile().as_text()
  entry = hlo[hlo.index("ENTRY") :]
  written = re.findall(rf"%\S+ = f32\[{SIZE}\]\S* (?!parameter\()[\w-]+\(", entry)
  assert written == [], written  # all the step's writes are inside the conditional, in place
  assert big_copies(hlo) == []
  old = donated_update_hlo(oc.apply_if_finite(tx, 3), params)
  assert len(gradient_sized_temporaries(old, SIZE)) == 1


def test_step_if_finite_names_a_bad_transformation():
  with pytest.raises(TypeError, match="step_if_finite"):
    oc.step_if_finite(object(), {}, (), {})


@pytest.mark.parametrize(
  "wrap",
  [
    lambda inner: oc.apply_if_finite(inner, 3),
    lambda inner: oc.multi_steps(inner, 4),
    lambda inner: oc.conditionally_transform(inner, lambda step: step % 2 == 0),
  ],
  ids=["apply_if_finite", "multi_steps", "conditionally_transform"],
)
def test_the_conditional_wrappers_trace_the_inner_step_once(wrap):
  """The branch that skips the inner step takes its updates' types from the branch that
  runs it, as lax.cond traced that one first; it traced the inner step a second time (with
  jax.eval_shape), which made tracing apply_if_finite(adamw) on 148 leaves 2.2x Optax's."""
  calls = []
  adam = oc.adam(1e-2)

  def update(updates, state, params=None):
    calls.append(1)
    return adam.update(updates, state, params)

  tx = wrap(oc.GradientTransformation(adam.init, update))
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  state = tx.init(params)
  jax.jit(tx.update).trace(params, state, params)
  assert len(calls) == 1
