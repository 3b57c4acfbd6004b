"""How the suite compares floating-point results, so that it holds on every CPU.

XLA compiles for the host's instruction set (vector width, FMA contraction, the order of a
reduction), so one program rounds differently on two machines, and two *different* programs
(ours and Optax's, a flat buffer and a tree) differ in the last bits on most machines. The
rules, one helper each:

- Formulas are proved in float64 (``x64()``) against Optax or an independent NumPy formula,
  at a tolerance only rounding meets: ``F64_RTOL`` (float64 drift is ~1e-16 per operation;
  a planted formula change -- ``eps`` inside the square root, AdamW's decay after the learning
  rate -- moves the result by more than 1e-7; tests/test_numerics_sensitivity.py shows it).
- float32, bfloat16 and float16 are compared per step from identical inputs (``lockstep``:
  both optimizers see the same gradients and parameters at every step), in units of the
  dtype's epsilon at the leaf's magnitude (``assert_ulps_close``), so no trajectory amplifies
  one ulp into a visible difference.
- Bitwise equality (``np.testing.assert_array_equal``) only where it holds by construction:
  the same program run twice, a resumed run against an uninterrupted one, a value copied.

``make test`` runs the tests marked ``numerics`` three times: on the host's full instruction
set, with XLA limited to SSE4.2 (``--xla_cpu_max_isa=SSE4_2``; the ones also marked
``float64`` are left out there), and at the minimum supported versions limited to AVX2, so a
comparison that holds on one instruction set only fails on every machine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Relative tolerance of float64 comparisons (scaled by the leaf's largest magnitude): far
# above float64 rounding after a few hundred steps (measured: below 2e-12 on every registry
# case and problem, on AVX-512, AVX2 and SSE4.2), far below any formula change (>1e-7).
F64_RTOL = 1e-10


def x64():
  """A context in which JAX computes in float64 (``jax.enable_x64``, or its older home)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # jax < 0.8

  return enable_x64()


def standard_promotion(reference):
  """``reference`` (an Optax transformation, or any function: a schedule, a model's apply)
  run under JAX's standard dtype promotion. The suite runs under strict promotion
  (tests/conftest.py), which Optax's and Flax's own code does not follow (e.g. Optax's bias
  correction ``decay ** count`` meets a Python float with the int32 count): references
  compute as they are written; optcompose, around them, stays under strict promotion."""
  if hasattr(reference, "init") and hasattr(reference, "update"):  # a transformation
    return reference._replace(
      init=standard_promotion(reference.init), update=standard_promotion(reference.update)
    )

  @functools.wraps(reference)
  def run(*args, **kwargs):
    with jax.numpy_dtype_promotion("standard"):
      return reference(*args, **kwargs)

  return run


def on_cpu():
  """Uncommitted arrays created (and jitted steps run) inside this go to the first CPU device:
  a reference computed beside a run on the simulated CPU devices is then computed on the same
  backend, also where an accelerator is the default device."""
  return jax.default_device(jax.devices("cpu")[0])


def bits(tree) -> list:
  """Every leaf's bits as unsigned integers: -0.0 is not 0.0 here, nor one NaN another."""
  return [
    np.asarray(x).view(f"uint{8 * np.asarray(x).dtype.itemsize}") for x in jax.tree.leaves(tree)
  ]


def eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


def dtype_of(x):
  """The dtype of an array as it is (``jnp.asarray`` would turn NumPy float64 into float32)."""
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def ulp_distance(actual, desired, scale=None, dtype=None) -> float:
  """max |actual - desired| in units of ``dtype``'s epsilon (default: ``desired``'s) at
  ``scale`` (default: the largest magnitude in ``desired``, so a near-zero element produced by
  cancellation is judged at the size of the numbers it came from)."""
  desired_dtype = jnp.dtype(dtype) if dtype is not None else dtype_of(desired)
  a = np.asarray(actual, np.float64)
  d = np.asarray(desired, np.float64)
  if a.shape != d.shape:
    raise AssertionError(f"shapes differ: {a.shape} and {d.shape}")
  if d.size == 0:
    return 0.0
  same = (a == d) | (np.isnan(a) & np.isnan(d))
  if np.all(same):
    return 0.0
  if scale is None:
    finite = np.abs(d[np.isfinite(d)])
    scale = float(finite.max()) if finite.size else 0.0
  unit = eps(desired_dtype) * max(scale, float(jnp.finfo(desired_dtype).tiny))
  diff = np.where(same, 0.0, np.abs(a - d))
  return float(np.max(diff) / unit) if np.all(np.isfinite(diff)) else float("inf")


def assert_ulps_close(actual, desired, ulps: float, scale=None, what: str = "", dtype=None):
  """Every leaf of ``actual`` within ``ulps`` epsilons (of the leaf's dtype, at the leaf's
  magnitude) of ``desired``; same tree, shapes and dtypes. With ``dtype``, epsilons of that
  dtype, and ``desired`` may have another (a float64 reference for a float32 result)."""
  la, ta = jax.tree.flatten(actual)
  ld, td = jax.tree.flatten(desired)
  assert ta == td, f"{what}: tree structures differ: {ta} and {td}"
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(desired)[0]]
  for path, a, d in zip(paths, la, ld):
    want = jnp.dtype(dtype) if dtype is not None else dtype_of(d)
    assert dtype_of(a) == want, f"{what}{path}: dtype {dtype_of(a)}, expected {want}"
    distance = ulp_distance(a, d, scale, dtype)
    assert distance <= ulps, (
      f"{what}{path}: {distance:.3g} ulps apart (allowed {ulps}); "
      "max |difference| "
      f"{np.max(np.abs(np.asarray(a, np.float64) - np.asarray(d, np.float64))):.3g}"
    )


def assert_rel_close(actual, desired, rtol: float, what: str = ""):
  """Every leaf within ``rtol`` of ``desired``, relative to the leaf's largest magnitude
  (float64 trajectories: |a - d| <= rtol * max(|d_leaf|, 1e-3))."""
  la, ta = jax.tree.flatten(actual)
  ld, td = jax.tree.flatten(desired)
  assert ta == td, f"{what}: tree structures differ"
  for i, (a, d) in enumerate(zip(la, ld)):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    scale = max(float(np.max(np.abs(d))) if d.size else 0.0, 1e-3)
    np.testing.assert_allclose(a, d, rtol=0, atol=rtol * scale, err_msg=f"{what} leaf {i}")


def lockstep(
  ours,
  ref,
  problem,
  steps: int,
  jit: bool,
  apply_ref,
  with_value: bool = False,
  jit_ref: bool | None = None,
  jit_apply: bool = False,
):
  """Run two transformations side by side on the reference's trajectory.

  At every step both receive the same gradients, parameters (and ``value=`` loss): the
  reference's (``jit_ref``: the reference's mode, if not ``jit``'s). Yields
  ``(t, our_updates, ref_updates, params)``: the updates each computed from identical
  inputs and its own state. The states evolve by contracting recursions (moving averages,
  sums), so their rounding differences stay at rounding size; comparing
  the updates in ulps proves the same arithmetic without a trajectory to amplify them.

  ``jit_apply``: ``apply_ref`` (the harness's step to the next parameters, not a compared
  computation) runs as one jitted call (``jit_once``) instead of op by op; an elementwise sum
  rounds the same either way, so the parameters, and all that is compared, are unchanged.
  """
  params = problem.params
  s_ours, s_ref = ours.init(params), ref.init(params)
  up_ours = jax.jit(ours.update) if jit else ours.update
  up_ref = jax.jit(ref.update) if (jit if jit_ref is None else jit_ref) else ref.update
  apply_ref = jit_once(apply_ref) if jit_apply else apply_ref
  for t in range(steps):
    g = problem.grad(params, t)
    extra = {"value": problem.loss(params)} if with_value else {}
    u_ours, s_ours = up_ours(g, s_ours, params, **extra)
    u_ref, s_ref = up_ref(g, s_ref, params, **extra)
    yield t, u_ours, u_ref, params
    params = apply_ref(params, u_ref)


@functools.cache
def jit_once(fn):
  """``jax.jit(fn)``, one per function: a harness step shared by every case (``apply_updates``)
  is traced and compiled once per tree and dtype, not once per test."""
  return jax.jit(fn)
