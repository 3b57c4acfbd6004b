"""What the two Flax recipe examples share: the spiral data, the loss, and the summary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CLASSES = 3


def spirals(n_per_class: int, noise: float, seed: int):
  """Points on CLASSES interleaved spiral arms with Gaussian noise; labels are the arms."""
  rng = np.random.default_rng(seed)
  radius = rng.uniform(0.1, 1.0, size=(CLASSES, n_per_class))
  angle = 2.0 * np.pi * radius + 2 * np.pi * np.arange(CLASSES)[:, None] / CLASSES
  x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1).reshape(-1, 2)
  x = x + noise * rng.normal(size=x.shape)
  y = np.repeat(np.arange(CLASSES), n_per_class)
  order = rng.permutation(len(y))
  return x[order].astype(np.float32), y[order].astype(np.int32)


def cross_entropy(logits, labels):
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def summarize(
  history, stop_state, initial_train_loss, best_val_loss, best_val_acc, verbose: bool
) -> dict:
  """The run's summary: ``history`` holds (train loss, val loss, val accuracy) per epoch."""
  results = {
    "initial_train_loss": initial_train_loss,
    "final_train_loss": history[-1][0],
    "best_epoch": int(stop_state.best_epoch),
    "best_val_loss": best_val_loss,
    "best_val_accuracy": best_val_acc,
    "epochs_run": len(history),
    "val_losses": [h[1] for h in history],
    "stopped_early": bool(stop_state.should_stop),
    "chance": 1.0 / CLASSES,
  }
  if verbose:
    stopped = " (stopped early)" if results["stopped_early"] else ""
    print(
      f"done after {len(history)} epochs{stopped}: train loss {initial_train_loss:.3f} "
      f"-> {results['final_train_loss']:.3f}; best epoch {results['best_epoch']}: val loss "
      f"{best_val_loss:.3f}, val accuracy {best_val_acc:.3f} (chance {results['chance']:.3f})."
    )
  return results


def train_val_split(seed: int, batch_size: int):
  """Spiral data with a held-out 20% validation split; also the minibatches per epoch."""
  x, y = spirals(n_per_class=400, noise=0.06, seed=seed)
  n_val = len(y) // 5
  x_val, y_val, x_train, y_train = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
  return x_train, y_train, x_val, y_val, len(y_train) // batch_size
