"""The recipe with Flax linen: an MLP classifier trained through ``TrainState``.

The recipe: ``optcompose.adamw`` with a linear warmup then cosine decay of the learning rate
(``warmup_cosine_decay_schedule``), weight decay on the kernels only (biases are left alone),
a held-out validation split, and early stopping on the validation loss that keeps the best
parameters and puts them back at the end.

The data: three interleaved noisy spirals in the plane (generated with NumPy), a problem no
linear classifier solves (chance is 1/3). Run ``python examples/train_linen.py``; it takes a
few seconds on a CPU. ``examples/train_nnx.py`` is the same recipe with ``nnx.Optimizer``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.training import train_state

import optcompose as oc
from optcompose.recipe.early_stopping import early_stopping

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_common import CLASSES, cross_entropy, summarize, train_val_split  # noqa: E402


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(CLASSES)(x)


def main(
  epochs: int = 40,
  seed: int = 0,
  batch_size: int = 64,
  peak_lr: float = 1e-2,
  weight_decay: float = 1e-3,
  patience: int = 8,
  verbose: bool = True,
) -> dict:
  """Train, stop early, restore the best parameters; return a summary of the run."""
  x_train, y_train, x_val, y_val, steps_per_epoch = train_val_split(seed, batch_size)
  n_val = len(y_val)  # a held-out validation split: 20%

  schedule = oc.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=2 * steps_per_epoch,
    decay_steps=epochs * steps_per_epoch,
    end_value=peak_lr / 100,
  )
  tx = oc.adamw(schedule, weight_decay=weight_decay, mask=oc.mask_from_paths(include="kernel"))

  model = MLP()
  params = model.init(jax.random.PRNGKey(seed), x_train[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def loss_fn(params, xb, yb):
    return cross_entropy(state.apply_fn({"params": params}, xb), yb)

  @jax.jit
  def train_step(state, xb, yb):
    grads = jax.grad(loss_fn)(state.params, xb, yb)
    return state.apply_gradients(grads=grads)

  @jax.jit
  def evaluate(params, xb, yb):
    logits = state.apply_fn({"params": params}, xb)
    return cross_entropy(logits, yb), jnp.mean(jnp.argmax(logits, axis=-1) == yb)

  stopper = early_stopping(mode="min", patience=patience)
  stop_state = stopper.init(state.params)
  initial_train_loss = float(evaluate(state.params, x_train, y_train)[0])
  rng = np.random.default_rng(seed + 1)
  if verbose:
    print(
      f"linen TrainState + optcompose.adamw: {len(y_train)} train / {n_val} validation "
      f"points, {CLASSES} classes"
    )

  history = []
  for epoch in range(epochs):
    order = rng.permutation(len(y_train))
    for i in range(steps_per_epoch):
      batch = order[i * batch_size : (i + 1) * batch_size]
      state = train_step(state, x_train[batch], y_train[batch])
    train_loss = float(evaluate(state.params, x_train, y_train)[0])
    val_loss, val_acc = map(float, evaluate(state.params, x_val, y_val))
    history.append((train_loss, val_loss, val_acc))
    stop_state, stop = stopper.step(stop_state, val_loss, state.params)
    if verbose and (epoch % 5 == 0 or stop or epoch == epochs - 1):
      print(
        f"epoch {epoch:3d}  lr {float(schedule(state.step)):.5f}  train loss "
        f"{train_loss:.4f}  val loss {val_loss:.4f}  val acc {val_acc:.3f}"
      )
    if stop:
      break

  # Put the best parameters back (early stopping kept a copy of them).
  state = state.replace(params=stop_state.best_params)
  best_val_loss, best_val_acc = map(float, evaluate(state.params, x_val, y_val))
  return summarize(history, stop_state, initial_train_loss, best_val_loss, best_val_acc, verbose)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  main(epochs=args.epochs, seed=args.seed)
