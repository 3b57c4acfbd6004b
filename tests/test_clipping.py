"""Clipping keeps what it measured, and bounds what it promises."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optcompose as oc

RNG = np.random.default_rng(0)
GRADS = {
  "a": jnp.asarray(RNG.normal(size=(4, 3)) * 5, jnp.float32),
  "b": jnp.asarray(RNG.normal(size=7), jnp.float32),
}


def np_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_global_norm_is_kept_in_the_state_and_bounds_the_output(max_norm):
  tx = oc.clip_by_global_norm(max_norm)
  u, state = jax.jit(tx.update)(GRADS, tx.init(GRADS))
  np.testing.assert_allclose(float(state.global_norm), np_norm(GRADS), rtol=1e-6)
  assert np_norm(u) <= max_norm * (1 + 1e-6)
  if max_norm > np_norm(GRADS):
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(GRADS)):
      np.testing.assert_array_equal(a, b)
  else:  # same direction
    ratio = np.asarray(u["b"]) / np.asarray(GRADS["b"])
    np.testing.assert_allclose(ratio, max_norm / np_norm(GRADS), rtol=1e-5)


def test_leaf_norm_clips_each_leaf_on_its_own():
  tx = oc.clip_by_leaf_norm(1.0)
  u, _ = tx.update(GRADS, tx.init(GRADS))
  for a, g in zip(jax.tree.leaves(u), jax.tree.leaves(GRADS)):
    n = np_norm(g)
    np.testing.assert_allclose(np.asarray(a), np.asarray(g) * min(1.0, 1.0 / n), rtol=1e-5)


def test_adaptive_clip_bounds_each_unit_relative_to_the_parameters():
  params = {"a": jnp.full((4, 3), 0.1), "b": jnp.full(7, 2.0)}
  tx = oc.adaptive_grad_clip(0.01)
  u, _ = tx.update(GRADS, tx.init(params), params)
  # Kernel units are columns (reduce over axis 0): each column's norm <= 0.01 * ||w_col||.
  col_norm = np.sqrt(np.sum(np.asarray(u["a"], np.float64) ** 2, axis=0))
  w_col = np.sqrt(np.sum(np.asarray(params["a"], np.float64) ** 2, axis=0))
  assert np.all(col_norm <= 0.01 * w_col * (1 + 1e-5))
  assert np_norm({"b": u["b"]}) <= 0.01 * np_norm({"b": params["b"]}) * (1 + 1e-5)


def test_clip_by_value():
  u, _ = oc.clip(0.5).update(GRADS, oc.EmptyState())
  np.testing.assert_array_equal(u["b"], np.clip(np.asarray(GRADS["b"]), -0.5, 0.5))


def donated_update_hlo(tx, params) -> str:
  """The compiled text of ``tx.update`` then ``apply_updates``, jitted with the parameters
  and the state donated (the gradients shaped as the parameters)."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return oc.apply_updates(params, updates), state

  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
  return lowered.compile().as_text()


def gradient_sized_temporaries(hlo: str, size: int) -> list:
  """The instructions of the compiled entry computation that write an array of ``size``
  elements without returning it (parameters aside): a pass over memory the step could do
  without."""
  entry = hlo[hlo.index("ENTRY") :]
  lines = [line.strip() for line in entry.splitlines()]
  root = next(line for line in lines if line.startswith("ROOT"))
  written = [
    line.split(" = ")[0].lstrip("%")
    for line in lines
    if re.match(rf"%\S+ = f32\[{size}\]", line) and " parameter(" not in line
  ]
  returned = set(re.findall(r"%([\w.-]+)", root.split("tuple(", 1)[1]))
  return [name for name in written if name not in returned]


@pytest.mark.xla_cpu_program
@pytest.mark.parametrize("clip", ["global_norm", "leaf_norm"])
def test_clipped_gradient_is_consumed_inside_the_adamw_loops(clip):
  """The clip's factor is computed on the norm (a scalar) and applied inside the loops that
  write the moments and the parameters: the compiled step of clip + AdamW on one leaf writes
  no gradient-sized array besides its three outputs (Optax 0.2.8 writes ``g / norm`` first,
  a fourth pass; a select between g and its rescaled copy kept XLA CPU from fusing)."""
  size = 1 << 16
  clipper = {"global_norm": oc.clip_by_global_norm, "leaf_norm": oc.clip_by_leaf_norm}[clip]
  tx = oc.chain(clipper(1.0), oc.adamw(1e-3, weight_decay=1e-4))
  params = {"w": jnp.ones(size)}
  hlo = donated_update_hlo(tx, params)
  assert gradient_sized_temporaries(hlo, size) == []
  loops = [
    line
    for line in hlo[hlo.index("ENTRY") :].splitlines()
    if re.search(rf"= f32\[{size}\]\S* fusion\(", line)
  ]
  assert len(loops) == 3, loops  # mu, nu, and the parameters


@pytest.mark.xla_cpu_program
def test_clipped_gradient_is_consumed_inside_the_adamw_loops_of_every_leaf_of_a_tree():
  """As above on a tree of leaves of several sizes, with a scheduled learning rate: no leaf's
  clipped gradient is written out. Computing the clip's divisor once for the whole tree (one
  scalar shared by every leaf's loop, where each leaf had its own copy) made XLA CPU write
  ``u / n`` out for some leaves; the one-leaf test cannot see that."""
  sizes = [4096 + 64 * i for i in range(6)]
  params = {f"w{i}": jnp.ones(n) for i, n in enumerate(sizes)}
  lr = oc.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
  tx = oc.chain(oc.clip_by_global_norm(1.0), oc.adamw(lr, weight_decay=1e-4))
  hlo = donated_update_hlo(tx, params)
  assert {n: gradient_sized_temporaries(hlo, n) for n in sizes} == {n: [] for n in sizes}


@pytest.mark.parametrize(
  "make",
  [
    lambda lib: lib.clip_by_global_norm(jnp.inf),
    lambda lib: lib.clip(float("inf")),
    lambda lib: lib.clip_by_block_rms(jnp.inf),
    lambda lib: oc.clip_by_leaf_norm(jnp.inf),  # (Optax 0.2.8 has none: ours twice)
    lambda lib: lib.inject_hyperparams(lib.clip_by_global_norm)(max_norm=jnp.inf),
  ],
  ids=["global_norm", "clip", "block_rms", "leaf_norm", "injected"],
)
def test_an_infinite_threshold_clips_nothing_as_in_optax(make):
  """Real code writes clip_by_global_norm(jnp.inf) for "no clipping" (score-based diffusion
  training scripts); it was refused as a non-finite hyperparameter. -inf, NaN and an
  infinite learning rate still are."""
  updates = {"w": jnp.array([3.0, -4.0]), "b": jnp.array([1e10, 2.0])}
  for lib in (oc, optax):
    tx = make(lib)
    clipped, _ = jax.jit(tx.update)(updates, tx.init(updates))
    jax.tree.map(np.testing.assert_array_equal, clipped, updates)
  for bad in (-jnp.inf, jnp.nan, oc.linear_schedule(jnp.inf, 1.0, 10)):  # inf * 0 at its end
    with pytest.raises(ValueError, match="`max_norm` must be finite"):
      oc.clip_by_global_norm(bad)
  state = oc.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0).init(updates)
  assert oc.set_hyperparams(state, max_norm=jnp.inf).hyperparams["max_norm"] == jnp.inf
  with pytest.raises(ValueError, match="`learning_rate` must be finite"):
    oc.sgd(jnp.inf)
