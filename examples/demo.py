"""The optcompose demo: seven optimizers train one Flax MLP on handwritten digits, and four
of them race on three classic 2-D landscapes.

Part 1, the training recipe. scikit-learn's ``load_digits`` (1797 8x8 images, 10 classes,
shipped inside the package, so nothing is downloaded) is split 60/20/20 into train,
validation and test sets with a fixed seed, and standardised with the training set's mean
and spread. A Flax linen MLP (64 -> 128 -> 10) starts from the same initial weights for
every optimizer and is trained on minibatches with

    SGD, SGD + momentum, Nesterov, RMSProp, Adam, AdamW, AdamW + L1

each with a linear warmup then cosine decay of the learning rate, and early stopping on the
validation accuracy that keeps the best parameters. One jitted function runs a whole epoch
(``jax.lax.scan`` over the minibatches, then the evaluation and the early-stopping update),
so each optimizer compiles once. At the end the best parameters are restored and scored on
the test set, and a table is printed, with the fraction of the kernels' weights that are
exactly zero: AdamW's L1 proximal step makes many of them zero, plain weight decay none.

Part 2, the optimizer race: SGD, momentum, RMSProp and Adam from the same start for the
same number of steps on Rosenbrock's valley, Beale's function and the saddle x^2 - y^2,
drawn over contour plots, with a marker every 50 steps; where paths overlap, the one that
covers less of the panel is drawn on top and thinner, so every path stays in sight.

Run ``make demo`` or ``python examples/demo.py [--out DIR] [--epochs N] [--quick]``. The
pictures go to ``demo_output/`` by default; their absolute paths are printed at the end.
``plot_curves`` and ``plot_race`` return their matplotlib figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from matplotlib import patheffects
from matplotlib.figure import Figure  # no pyplot: figures straight to PNG, no window
from matplotlib.lines import Line2D
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import optcompose as oc
from optcompose.wrappers.diagnostics import zero_fraction

SEED = 0
CLASSES = 10
BATCH_SIZE = 32
PATIENCE = 10  # early stopping: non-improving epochs tolerated in a row
RACE_STEPS = 400
CURVES_PNG = "training_curves.png"
RACE_PNG = "optimizer_race.png"
OPTIMIZER_NAMES = ("SGD", "Momentum", "Nesterov", "RMSProp", "Adam", "AdamW", "AdamW+L1")


# ---------------------------------------------------------------------------------------
# Data: a stratified train / validation / test split with a fixed seed, standardised.


class Split(NamedTuple):
  x: np.ndarray  # float32, (n, 64)
  y: np.ndarray  # int32, (n,)


def digits_splits(seed: int = SEED) -> tuple[Split, Split, Split]:
  """60% train, 20% validation, 20% test; features standardised with the training set's
  mean and standard deviation (pixels that never vary keep a spread of 1)."""
  x, y = load_digits(return_X_y=True)
  x_rest, x_test, y_rest, y_test = train_test_split(
    x, y, test_size=0.2, stratify=y, random_state=seed
  )
  x_train, x_val, y_train, y_val = train_test_split(
    x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=seed
  )
  mean, std = x_train.mean(axis=0), x_train.std(axis=0)
  std = np.where(std > 0, std, 1.0)

  def make(xs, ys):
    return Split(((xs - mean) / std).astype(np.float32), ys.astype(np.int32))

  return make(x_train, y_train), make(x_val, y_val), make(x_test, y_test)


# ---------------------------------------------------------------------------------------
# Model and loss.


class MLP(nn.Module):
  """64 inputs -> 128 ReLU units -> 10 logits."""

  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(CLASSES, name="out")(x)


MODEL = MLP()


def cross_entropy(logits, labels):
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def loss_fn(params, x, y):
  return cross_entropy(MODEL.apply({"params": params}, x), y)


def evaluate(params, x, y):
  """(mean cross-entropy, accuracy) on a whole split."""
  logits = MODEL.apply({"params": params}, x)
  return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, axis=-1) == y)


KERNELS = oc.mask_from_paths(include="kernel")  # weight matrices only, not the biases


def kernel_zero_fraction(params):
  """The fraction of the kernels' entries that are exactly 0 (what L1 should raise)."""
  return zero_fraction(params, KERNELS)


# ---------------------------------------------------------------------------------------
# The optimizers: each an optcompose alias with the same warmup + cosine schedule shape.


def optimizers(steps_per_epoch: int, epochs: int) -> dict[str, oc.GradientTransformation]:
  """Name -> optimizer. Peak learning rates are per family (plain SGD takes larger steps
  than the adaptive methods, whose step is normalised)."""

  def lr(peak):
    return oc.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=2 * steps_per_epoch,
      decay_steps=epochs * steps_per_epoch,
      end_value=peak / 100,
    )

  return {
    "SGD": oc.sgd(lr(0.1)),
    "Momentum": oc.sgd(lr(0.02), 0.9),
    "Nesterov": oc.sgd(lr(0.02), 0.9, nesterov=True),
    "RMSProp": oc.rmsprop(lr(1e-3)),
    "Adam": oc.adam(lr(2e-3)),
    "AdamW": oc.adamw(lr(2e-3), weight_decay=1e-2, mask=KERNELS),
    # The L1 threshold is lr * l1, against Adam's normalised step lr * m_hat / sqrt(v_hat):
    # a weight whose gradient is mostly minibatch noise (|m_hat| / sqrt(v_hat) < l1)
    # is driven to an exact zero and stays there.
    "AdamW+L1": oc.adamw(lr(2e-3), weight_decay=1e-2, mask=KERNELS, l1=0.2, l1_mask=KERNELS),
  }


# ---------------------------------------------------------------------------------------
# Training: one compiled epoch per optimizer.


def make_epoch(
  tx: oc.GradientTransformation, stopper: oc.EarlyStopping, steps_per_epoch: int, batch_size: int
) -> Callable:
  """A jitted epoch: scan the minibatch steps, evaluate, update early stopping.

  ``order`` (steps_per_epoch, batch_size) holds this epoch's shuffled example indices.
  """

  def train_step(carry, batch):
    params, opt_state = carry
    xb, yb = batch
    grads = jax.grad(loss_fn)(params, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (oc.apply_updates(params, updates), opt_state), None

  @jax.jit
  def epoch(params, opt_state, stop_state, order, train, val):
    (params, opt_state), _ = jax.lax.scan(
      train_step, (params, opt_state), (train.x[order], train.y[order])
    )
    train_loss, _ = evaluate(params, train.x, train.y)
    val_loss, val_acc = evaluate(params, val.x, val.y)
    stop_state = stopper.update(stop_state, val_acc, params)  # keeps the best params
    metrics = {
      "train_loss": train_loss,
      "val_loss": val_loss,
      "val_accuracy": val_acc,
      "zero_fraction": kernel_zero_fraction(params),
    }
    return params, opt_state, stop_state, metrics

  return epoch


def train(
  name: str,
  tx: oc.GradientTransformation,
  init_params: Any,
  splits,
  *,
  epochs: int,
  batch_size: int,
  patience: int,
  progress: bool,
) -> dict:
  """Train one optimizer until early stopping (or `epochs`); score the best params."""
  train_set, val_set, test_set = splits
  steps_per_epoch = train_set.y.shape[0] // batch_size
  stopper = oc.early_stopping(mode="max", patience=patience)
  run_epoch = make_epoch(tx, stopper, steps_per_epoch, batch_size)

  params, opt_state = init_params, tx.init(init_params)
  stop_state = stopper.init(params)
  rng = np.random.default_rng(SEED)  # the same minibatch order for every optimizer
  n_used = steps_per_epoch * batch_size  # the remainder of a shuffle waits for the next epoch
  history: dict[str, list] = {
    "train_loss": [],
    "val_loss": [],
    "val_accuracy": [],
    "zero_fraction": [],
    "learning_rate": [],
  }
  start = time.perf_counter()
  with tqdm(
    total=epochs,
    desc=f"{name:>9}",
    unit="epoch",
    disable=not progress,
    leave=True,
    dynamic_ncols=True,
  ) as bar:
    for _ in range(epochs):
      order = rng.permutation(len(train_set.y))[:n_used].reshape(steps_per_epoch, batch_size)
      params, opt_state, stop_state, metrics = run_epoch(
        params, opt_state, stop_state, order, train_set, val_set
      )
      metrics = jax.device_get(metrics)
      for k, v in metrics.items():
        history[k].append(float(v))
      # A schedule's value in force is kept in the optimizer state: read it for the bar.
      history["learning_rate"].append(float(oc.current_hyperparams(opt_state)["learning_rate"]))
      bar.set_postfix(
        val_acc=f"{history['val_accuracy'][-1]:.3f}",
        best=f"{float(stop_state.best_metric):.3f}",
        lr=f"{history['learning_rate'][-1]:.1e}",
        refresh=False,
      )
      bar.update()
      if bool(stop_state.should_stop):
        bar.set_description(f"{name:>9} (stopped)", refresh=True)
        break
  seconds = time.perf_counter() - start

  best = stop_state.best_params  # restore the best checkpoint, not the last one
  _, test_acc = evaluate(best, test_set.x, test_set.y)
  return {
    "best_val_accuracy": float(stop_state.best_metric),
    "best_epoch": int(stop_state.best_epoch),
    "last_epoch": len(history["val_loss"]) - 1,
    "stopped_early": bool(stop_state.should_stop),
    "test_accuracy": float(test_acc),
    "zero_fraction": float(kernel_zero_fraction(best)),
    "history": history,
    "seconds": seconds,
  }


def print_table(results: dict) -> None:
  print()
  print(
    f"{'optimizer':<10} {'best val acc':>12} {'best epoch':>10} {'epochs run':>10} "
    f"{'test acc':>9} {'zero weights':>12}"
  )
  for name, r in results.items():
    print(
      f"{name:<10} {r['best_val_accuracy']:>12.3f} {r['best_epoch']:>10d} "
      f"{r['last_epoch'] + 1:>10d} {r['test_accuracy']:>9.3f} {r['zero_fraction']:>12.1%}"
    )
  print(
    "(test accuracy and zero weights: the restored best parameters; zero weights: the "
    "share of the kernels' entries that are exactly 0)"
  )


def plot_curves(results: dict, path: Path, dpi: int) -> Figure:
  """Training and validation loss per epoch, one panel per optimizer, with the epoch that
  early stopping kept; the last panel shows the kernels' share of exact zeros. Returns the
  figure, after writing it to `path`."""
  fig = Figure(figsize=(16, 7), layout="constrained")
  axes = fig.subplots(2, 4, sharex=True).ravel()
  for ax, (name, r) in zip(axes, results.items()):
    h = r["history"]
    epochs = np.arange(len(h["train_loss"]))
    ax.plot(epochs, h["train_loss"], label="train loss", color="tab:blue")
    ax.plot(epochs, h["val_loss"], label="validation loss", color="tab:orange")
    best = r["best_epoch"]
    ax.axvline(best, color="tab:green", ls="--", lw=1)
    ax.plot(
      [best],
      [h["val_loss"][best]],
      "o",
      color="tab:green",
      label=f"kept: epoch {best}, val acc {r['best_val_accuracy']:.3f}",
    )
    if r["stopped_early"]:
      ax.plot([epochs[-1]], [h["val_loss"][-1]], "x", color="tab:red", ms=8, label="stopped")
    ax.set_yscale("log")
    ax.set_ylabel("cross-entropy loss (log scale)")
    ax.set_title(name)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
  for ax in axes[4:7]:
    ax.set_xlabel("epoch")
  plot_zero_fractions(axes[7], results)
  fig.suptitle(
    "Flax MLP on scikit-learn digits: loss per epoch; the dashed line is the epoch "
    "early stopping restores"
  )
  fig.savefig(path, dpi=dpi)
  return fig


def plot_zero_fractions(ax, results: dict) -> None:
  """The kernels' share of exact zeros per epoch: a line for each optimizer that makes
  zeros, and one line, named in the legend, for those that stay at 0 at every epoch (six
  lines drawn on top of each other could not be told apart)."""
  colors = dict(zip(results, [f"C{i}" for i in range(len(results))]))
  never = [name for name, r in results.items() if not any(r["history"]["zero_fraction"])]
  for name, r in results.items():
    if name not in never:
      ax.plot(100 * np.asarray(r["history"]["zero_fraction"]), color=colors[name], lw=2, label=name)
  if never:
    longest = max(len(results[name]["history"]["zero_fraction"]) for name in never)
    names = ",\n".join(", ".join(never[i : i + 3]) for i in range(0, len(never), 3))
    ax.plot(np.zeros(longest), color="0.4", ls="--", lw=1.5, label=f"0 at every epoch:\n{names}")
  ax.set_title("kernel weights that are exactly 0")
  ax.set_ylabel("share of the kernels' entries (%)")
  ax.set_xlabel("epoch")
  ax.set_ylim(bottom=-0.04 * max(ax.get_ylim()[1], 1.0))  # the zero line clear of the frame
  ax.legend(fontsize=7, loc="center right", bbox_to_anchor=(1.0, 0.3))
  ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------------------
# The optimizer race on 2-D functions.


def rosenbrock(p):
  return (1 - p["x"]) ** 2 + 100 * (p["y"] - p["x"] ** 2) ** 2


def beale(p):
  x, y = p["x"], p["y"]
  return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def saddle(p):
  return p["x"] ** 2 - p["y"] ** 2


class Landscape(NamedTuple):
  name: str
  f: Callable
  start: tuple[float, float]
  minimum: Optional[tuple[float, float]]  # None: unbounded below (the saddle)
  box: tuple[tuple[float, float], tuple[float, float]]  # the plotted (x, y) ranges
  learning_rates: dict  # optimizer name -> learning rate, tuned by hand for this landscape
  log_levels: bool  # contour levels on a log scale (for a minimum at 0 in a steep bowl)


LANDSCAPES = (
  Landscape(
    "Rosenbrock",
    rosenbrock,
    (-1.5, 2.0),
    (1.0, 1.0),
    ((-2, 2), (-1, 3)),
    {"SGD": 1e-3, "Momentum": 1e-3, "RMSProp": 1e-2, "Adam": 0.1},
    True,
  ),
  Landscape(
    "Beale",
    beale,
    (1.0, 1.5),
    (3.0, 0.5),
    ((-0.5, 4), (-1.5, 2)),
    {"SGD": 2e-3, "Momentum": 2e-3, "RMSProp": 2e-2, "Adam": 0.05},
    True,
  ),
  Landscape(
    "saddle x^2 - y^2",
    saddle,
    (1.0, 0.01),
    None,
    ((-1.5, 1.5), (-1.5, 1.5)),
    {"SGD": 1e-3, "Momentum": 1e-3, "RMSProp": 1e-2, "Adam": 1e-2},
    False,
  ),
)

# The learning rate is a live hyperparameter (inject_hyperparams): one compiled run per
# optimizer serves every landscape and learning rate.
RACERS = {
  "SGD": oc.inject_hyperparams(oc.sgd)(learning_rate=0.0),
  "Momentum": oc.inject_hyperparams(oc.sgd)(learning_rate=0.0, momentum=0.9),
  "RMSProp": oc.inject_hyperparams(oc.rmsprop)(learning_rate=0.0),
  "Adam": oc.inject_hyperparams(oc.adam)(learning_rate=0.0),
}


def make_race(tx: oc.GradientTransformation, steps: int) -> Callable:
  """A jitted run of `steps` updates on landscape `which` (traced: one compile serves all)."""
  grads = [jax.grad(land.f) for land in LANDSCAPES]

  @jax.jit
  def run(start, learning_rate, which):
    params = {"x": start[0], "y": start[1]}  # a 2-parameter pytree
    state = oc.set_hyperparams(tx.init(params), learning_rate=learning_rate)

    def step(carry, _):
      params, state = carry
      g = jax.lax.switch(which, grads, params)
      updates, state = tx.update(g, state, params)
      params = oc.apply_updates(params, updates)
      return (params, state), jnp.stack([params["x"], params["y"]])

    _, path = jax.lax.scan(step, (params, state), None, length=steps)
    return jnp.concatenate([start[None], path])

  return run


def race(steps: int) -> dict:
  """{landscape name: {optimizer name: path, an array (steps + 1, 2)}}."""
  runs = {name: make_race(tx, steps) for name, tx in RACERS.items()}
  paths = {}
  for which, land in enumerate(LANDSCAPES):
    start = jnp.asarray(land.start, jnp.float32)
    paths[land.name] = {
      name: np.asarray(run(start, jnp.float32(land.learning_rates[name]), which))
      for name, run in runs.items()
    }
  return paths


RACE_STYLES = {  # name -> (color, marker); the markers tell the paths apart where they meet
  "SGD": ("tab:blue", "o"),
  "Momentum": ("tab:orange", "s"),
  "RMSProp": ("tab:green", "^"),
  "Adam": ("tab:red", "D"),
}
MARK_EVERY = 50  # steps between two markers on a path: their spacing shows the speed


def footprint(trajectory: np.ndarray, box, cells: int = 200) -> int:
  """How much of the plotted box a path covers: the cells of a `cells` x `cells` grid over
  the box that it passes through (a path that zigzags in a narrow valley covers little more
  than the valley's stretch; the part outside the frame covers nothing)."""
  (x0, x1), (y0, y1) = box
  scaled = (trajectory - [x0, y0]) / [x1 - x0, y1 - y0]
  # Points a hundredth of a cell apart along each segment (8 points at least).
  fine = [
    np.linspace(a, b, max(8, int(100 * cells * np.abs(b - a).max())), endpoint=False)
    for a, b in zip(scaled[:-1], scaled[1:])
  ]
  points = np.concatenate(fine + [scaled[-1:]])
  points = points[np.all((points >= 0) & (points < 1), axis=1)]
  return len(np.unique(np.floor(points * cells).astype(np.int64), axis=0))


def plot_race(paths: dict, steps: int, path: Path, dpi: int) -> Figure:
  """The race's paths over contour plots, one panel per landscape. Returns the figure,
  after writing it to `path`.

  Paths overlap: SGD crawls along the start of momentum's track, and momentum, Adam and
  RMSProp share Rosenbrock's valley. So the path that covers the least of the panel (its
  `footprint`) is drawn on top and the thinnest, and each path below is wider than those
  above it, so that it shows as a border around them; each optimizer's markers (every
  MARK_EVERY steps) are drawn above every line.
  """
  fig = Figure(figsize=(6 * len(LANDSCAPES), 6.4), layout="constrained")
  axes = fig.subplots(1, len(LANDSCAPES))
  for ax, land in zip(axes, LANDSCAPES):
    (x0, x1), (y0, y1) = land.box
    xs, ys = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    zs = np.asarray(land.f({"x": xs, "y": ys}))
    if land.log_levels:
      ax.contourf(xs, ys, np.log10(zs - zs.min() + 1e-3), levels=30, cmap="Greys_r", alpha=0.6)
    else:
      ax.contourf(xs, ys, zs, levels=30, cmap="Greys_r", alpha=0.6)
    runs = paths[land.name]
    # The widest footprint first: each path is drawn over those that cover more.
    order = sorted(runs, key=lambda name: -footprint(runs[name], land.box))
    handles = []
    widths = np.linspace(5.0, 1.4, len(order))  # each path a border around those above it
    # A white halo around the bottom path sets the group off from dark contours.
    halo = [patheffects.withStroke(linewidth=widths[0] + 1.2, foreground="white")]
    for depth, name in enumerate(order):
      trajectory, (color, marker) = runs[name], RACE_STYLES[name]
      ax.plot(
        trajectory[:, 0],
        trajectory[:, 1],
        "-",
        lw=widths[depth],
        color=color,
        zorder=2 + depth,
        solid_capstyle="round",
        path_effects=halo if depth == 0 else [],
        gid=f"path:{name}",
      )
      marks = trajectory[MARK_EVERY::MARK_EVERY]
      ax.plot(
        marks[:, 0],
        marks[:, 1],
        marker,
        ls="none",
        ms=4.5,
        color=color,
        mec="white",
        mew=0.6,
        zorder=10 + depth,
        gid=f"marks:{name}",
      )
      ax.plot(
        trajectory[-1, 0],
        trajectory[-1, 1],
        marker,
        ms=9,
        color=color,
        mec="k",
        zorder=20 + depth,
        gid=f"end:{name}",
      )
    for name, (color, marker) in RACE_STYLES.items():
      handles.append(
        Line2D(
          [],
          [],
          color=color,
          lw=2,
          marker=marker,
          ms=6,
          mec="white",
          label=f"{name} (lr {land.learning_rates[name]:g})",
        )
      )
    handles.append(ax.plot(*land.start, "ks", ms=7, zorder=30, label="start")[0])
    if land.minimum is not None:
      handles.append(
        ax.plot(*land.minimum, "*", color="gold", mec="k", ms=15, zorder=30, label="minimum")[0]
      )
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(land.name)
    # Below the panel, where it covers no path.
    ax.legend(handles=handles, fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
  fig.suptitle(
    f"Optimizer race: {steps} steps from the same start; a small marker every "
    f"{MARK_EVERY} steps, a large one where each ended (if inside the frame)"
  )
  fig.savefig(path, dpi=dpi)
  return fig


# ---------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Run the demo; return {optimizer name: results} (see `train`)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="demo_output", help="folder for the PNG files")
  parser.add_argument(
    "--epochs",
    type=int,
    default=None,
    help="maximum epochs per optimizer (default 60, 15 with --quick)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="fewer epochs and lighter pictures (for tests)"
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  epochs = args.epochs if args.epochs is not None else (15 if args.quick else 60)
  if epochs < 3:
    parser.error("--epochs must be at least 3 (the learning rate warms up for 2)")
  dpi = 60 if args.quick else 110
  race_steps, batch_size, patience = RACE_STEPS, BATCH_SIZE, PATIENCE
  out = Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()

  splits = jax.device_put(digits_splits())  # on the device once, not at every epoch
  train_set, val_set, test_set = splits
  steps_per_epoch = len(train_set.y) // batch_size
  print(
    f"digits: {len(train_set.y)} train / {len(val_set.y)} validation / {len(test_set.y)} "
    f"test images; MLP 64-128-10; minibatches of {batch_size}, at most {epochs} epochs, "
    f"early stopping on validation accuracy (patience {patience})"
  )
  init_params = MODEL.init(jax.random.PRNGKey(SEED), train_set.x[:1])["params"]
  results = {}
  for name, tx in optimizers(steps_per_epoch, epochs).items():
    results[name] = train(
      name,
      tx,
      init_params,
      splits,
      epochs=epochs,
      batch_size=batch_size,
      patience=patience,
      progress=not args.no_progress,
    )
  print_table(results)

  curves_png, race_png = out / CURVES_PNG, out / RACE_PNG
  plot_curves(results, curves_png, dpi)
  plot_race(race(race_steps), race_steps, race_png, dpi)
  print(f"\ndone in {time.perf_counter() - start:.1f} s. Pictures:")
  print(f"  {curves_png}")
  print(f"  {race_png}")
  return results


if __name__ == "__main__":
  main()
