"""The recipe with Flax NNX: an MLP classifier trained through ``nnx.Optimizer``.

The same recipe as ``examples/train_linen.py``: ``optcompose.adamw`` with a linear warmup
then cosine decay of the learning rate (``warmup_cosine_decay_schedule``), weight decay on
the kernels only, a held-out validation split, and early stopping on the validation loss that
keeps the best parameters (an ``nnx.State``) and writes them back into the model at the end.

``nnx.Optimizer(model, tx, wrt=nnx.Param)`` keeps the optcompose transformation as a static
attribute and its state in ``optimizer.opt_state``; ``optimizer.update(model, grads)`` takes
one step. The decay mask is a function of the parameters, so it works on the ``nnx.State``
the optimizer hands to ``init`` (paths such as ``['hidden1']['kernel']``).

Run ``python examples/train_nnx.py``; it takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import optcompose as oc
from optcompose.recipe.early_stopping import early_stopping

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_common import CLASSES, cross_entropy, summarize, train_val_split  # noqa: E402


class MLP(nnx.Module):
  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(2, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.hidden1(x))
    x = jax.nn.relu(self.hidden2(x))
    return self.out(x)


@nnx.jit
def train_step(model, optimizer, xb, yb):
  grads = nnx.grad(lambda m: cross_entropy(m(xb), yb))(model)
  optimizer.update(model, grads)


@nnx.jit
def evaluate(model, xb, yb):
  logits = model(xb)
  return cross_entropy(logits, yb), jnp.mean(jnp.argmax(logits, axis=-1) == yb)


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

  model = MLP(hidden=64, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  stopper = early_stopping(mode="min", patience=patience)
  stop_state = stopper.init(nnx.state(model, nnx.Param))
  initial_train_loss = float(evaluate(model, x_train, y_train)[0])
  rng = np.random.default_rng(seed + 1)
  if verbose:
    print(
      f"nnx.Optimizer + optcompose.adamw: {len(y_train)} train / {n_val} validation "
      f"points, {CLASSES} classes"
    )

  history = []
  for epoch in range(epochs):
    order = rng.permutation(len(y_train))
    for i in range(steps_per_epoch):
      batch = order[i * batch_size : (i + 1) * batch_size]
      train_step(model, optimizer, x_train[batch], y_train[batch])
    train_loss = float(evaluate(model, x_train, y_train)[0])
    val_loss, val_acc = map(float, evaluate(model, x_val, y_val))
    history.append((train_loss, val_loss, val_acc))
    stop_state, stop = stopper.step(stop_state, val_loss, nnx.state(model, nnx.Param))
    if verbose and (epoch % 5 == 0 or stop or epoch == epochs - 1):
      print(
        f"epoch {epoch:3d}  lr {float(schedule(optimizer.step[...])):.5f}  train loss "
        f"{train_loss:.4f}  val loss {val_loss:.4f}  val acc {val_acc:.3f}"
      )
    if stop:
      break

  # Write the best parameters back into the model (early stopping kept a copy of them).
  nnx.update(model, stop_state.best_params)
  best_val_loss, best_val_acc = map(float, evaluate(model, x_val, y_val))
  return summarize(history, stop_state, initial_train_loss, best_val_loss, best_val_acc, verbose)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  main(epochs=args.epochs, seed=args.seed)
