"""What with_diagnostics' measurements cost the step, read from the compiled HLO (issue 16),
and the pieces that keep them cheap: ordered_after changes no bit, and the zero count is
exact beyond float32's integers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc
import optcompose.wrappers.measures as measures
from optcompose.core import ordered_after

SIZE = 1 << 16


def entry(tx) -> str:
  params = {"w": jnp.ones(SIZE, jnp.float32)}

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return oc.apply_updates(params, updates), state

  jitted = jax.jit(step, donate_argnums=(0, 1))
  hlo = jitted.lower(params, tx.init(params), params).compile().as_text()
  return hlo[hlo.index("ENTRY") :]


def big_copies(hlo: str) -> list:
  return re.findall(rf"= f32\[{SIZE}\]\S* copy\(", hlo)


def loops(hlo: str) -> int:
  return len(re.findall(rf"= f32\[{SIZE}\]\S* fusion\(", hlo))


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


def bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("token", [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.5, -1e30])
def test_ordered_after_changes_no_bit(dtype, token):
  values = jnp.asarray([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-3, -7.25, 6e4], dtype)
  other = {"i": jnp.arange(3), "c": jnp.asarray([complex(np.inf, 1.0)], jnp.complex64)}
  out = jax.jit(ordered_after)({"x": values, **other}, jnp.float32(token))
  np.testing.assert_array_equal(bits(out["x"]), bits(values))
  np.testing.assert_array_equal(np.asarray(out["i"]), np.arange(3))
  assert np.asarray(out["c"])[0] == complex(np.inf, 1.0)


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
  nan = {**tree, "rows": tree["rows"].at[5].set(jnp.nan)}
  assert np.isnan(float(measures.zero_fraction(nan)))


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
