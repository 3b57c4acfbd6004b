"""Test problems shared by the suite: each gives params, a jitted gradient and its data."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Problem(NamedTuple):
  name: str
  params: Any
  grad: Callable  # jitted: (params, step) -> grads
  loss: Callable  # jitted: params -> scalar


def compute_dtype(dtype):
  """Low-precision parameters are trained through a float32 loss; float64 ones (under
  ``numerics.x64()``) through a float64 loss, so float64 runs round at float64 size only."""
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def shared(build: Callable[..., Problem]) -> Callable[..., Problem]:
  """One problem per (dtype, arguments, x64 mode) per process: its jitted gradient and loss
  compile once for the whole suite, not once per test."""
  cache = {}

  @functools.wraps(build)
  def get(dtype=jnp.float32, **kwargs) -> Problem:
    key = (jnp.dtype(dtype).name, tuple(sorted(kwargs.items())), bool(jax.config.jax_enable_x64))
    if key not in cache:
      cache[key] = build(dtype, **kwargs)
    return cache[key]

  return get


@shared
def quadratic(dtype=jnp.float32) -> Problem:
  """f(w) = 1/2 sum_i h_i (w_i - c_i)^2 with condition number 1e3, in two leaves."""
  f = compute_dtype(dtype)
  h = {
    "a": jnp.logspace(-1.3, 1.7, 6, dtype=f),
    "b": jnp.logspace(-1.0, 1.0, 4, dtype=f).reshape(2, 2),
  }
  c = {"a": jnp.linspace(-1.0, 1.0, 6, dtype=f), "b": jnp.full((2, 2), 0.5, f)}
  params = {"a": jnp.zeros(6, dtype), "b": jnp.ones((2, 2), dtype)}

  def loss(p):
    return sum(0.5 * jnp.sum(h[k] * (p[k].astype(f) - c[k]) ** 2) for k in p)

  grad = jax.jit(lambda p, step: jax.tree.map(lambda g, x: g.astype(x.dtype), jax.grad(loss)(p), p))
  return Problem("quadratic", params, grad, jax.jit(loss))


@shared
def mlp(dtype=jnp.float32, outputs: int = 1) -> Problem:
  """A 8-16-``outputs`` tanh MLP regressing random data; minibatch i is a fixed slice per step."""
  f = compute_dtype(dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32).astype(f)
  y = jnp.asarray(np.sin(rng.normal(size=(64, outputs)) * 2), jnp.float32).astype(f)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {
    "dense1": {
      "kernel": jax.random.normal(k1, (8, 16), jnp.float32) / jnp.sqrt(8.0),
      "bias": jnp.zeros(16),
    },
    "dense2": {
      "kernel": jax.random.normal(k2, (16, outputs), jnp.float32) / 4.0,
      "bias": jnp.zeros(outputs),
    },
  }
  params = jax.tree.map(lambda a: a.astype(dtype), params)

  def loss_on(p, xb, yb):
    p = jax.tree.map(lambda a: a.astype(f), p)
    h = jnp.tanh(xb @ p["dense1"]["kernel"] + p["dense1"]["bias"][None, :])
    out = h @ p["dense2"]["kernel"] + p["dense2"]["bias"][None, :]
    return jnp.mean((out - yb) ** 2)

  def grad(p, step):
    i = (step % 4) * 16
    xb = jax.lax.dynamic_slice_in_dim(x, i, 16)
    yb = jax.lax.dynamic_slice_in_dim(y, i, 16)
    g = jax.grad(loss_on)(p, xb, yb)
    return jax.tree.map(lambda a, q: a.astype(q.dtype), g, p)

  return Problem("mlp", params, jax.jit(grad), jax.jit(functools.partial(loss_on, xb=x, yb=y)))


def run(
  tx,
  problem: Problem,
  steps: int,
  jit: bool,
  apply_updates,
  with_value: bool = False,
  jit_apply: bool = False,
):
  """Train ``steps`` steps; return the list of params after each step and the final state.

  ``with_value`` passes the current loss as ``value=`` (for plateau control).
  ``jit_apply`` runs ``apply_updates`` as one jitted call (``numerics.jit_once``: compiled
  once per function, tree and dtype) instead of op by op; an elementwise sum rounds the same
  either way, so the path is unchanged.
  """
  params = problem.params
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  if jit_apply:
    from numerics import jit_once

    apply_updates = jit_once(apply_updates)
  path = []
  for t in range(steps):
    g = problem.grad(params, t)
    extra = {"value": problem.loss(params)} if with_value else {}
    u, state = update(g, state, params, **extra)
    params = apply_updates(params, u)
    path.append(params)
  return path, state


def assert_resumes_exactly(tx, problem: Problem, steps: int, save_at: int, apply_updates):
  """Train ``steps`` jitted steps; separately train to ``save_at``, copy (params, state) to
  host memory as a checkpoint would, and resume: both must end bitwise equal."""

  update = jax.jit(tx.update)

  def train(params, state, start):
    for t in range(start, steps):
      u, state = update(problem.grad(params, t), state, params)
      params = apply_updates(params, u)
    return params, state

  first = train(problem.params, tx.init(problem.params), 0)
  # Re-run to the save point, copy to host, and continue from the copy.
  p, s = problem.params, tx.init(problem.params)
  for t in range(save_at):
    u, s = update(problem.grad(p, t), s, p)
    p = apply_updates(p, u)
  saved = jax.tree.map(np.asarray, (p, s))
  resumed = train(*jax.tree.map(jnp.asarray, saved), save_at)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
