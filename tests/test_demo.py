"""examples/demo.py (`make demo`): seven optimizers train a Flax MLP on scikit-learn's digits
with early stopping, AdamW + L1 ends sparse, the pictures are written and readable, and
nothing warns.

One quick run of the demo (fewer epochs, small pictures) is shared by the end-to-end
checks; the import check and the race picture's check train nothing.
"""

import contextlib
import importlib.util
import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo's data ships with scikit-learn (examples extra)")
pytest.importorskip("tqdm", reason="the demo's progress bars need tqdm (examples extra)")
pytest.importorskip("flax")
pytest.importorskip("matplotlib")

# The demo runs once, in one test (a module fixture would run once per xdist worker).
pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANCE = 0.1  # ten classes


def load_demo():
  spec = importlib.util.spec_from_file_location("optcompose_demo", ROOT / "examples" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Flax modules are dataclasses: they look their module up
  spec.loader.exec_module(module)
  return module


def run_demo(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_output")
  printed = io.StringIO()
  # Every warning raised while the demo loads and runs is recorded, even one that this
  # process has shown before.
  with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
    warnings.simplefilter("always")
    demo = load_demo()
    results = demo.main(["--quick", "--no-progress", "--out", str(out)])
  return demo, results, out, printed.getvalue(), caught


def check_every_optimizer_learns_far_above_chance(run):
  demo, results, *_ = run
  assert list(results) == list(demo.OPTIMIZER_NAMES)
  for name, r in results.items():
    assert r["best_val_accuracy"] > 0.8, name  # chance is 0.1
    # The restored best parameters are scored on the held-out test set.
    assert 0.8 < r["test_accuracy"] <= 1.0, name
    assert np.all(np.isfinite(r["history"]["train_loss"])), name
    # Training works: the loss falls well below the untrained ln(10) = 2.30.
    assert r["history"]["train_loss"][-1] < 0.5 * r["history"]["train_loss"][0], name


def check_early_stopping_keeps_the_best_epoch(run):
  demo, results, *_ = run
  for name, r in results.items():
    accuracies = r["history"]["val_accuracy"]
    assert len(accuracies) == r["last_epoch"] + 1, name
    assert 0 <= r["best_epoch"] <= r["last_epoch"], name
    # The kept epoch is the first one with the highest validation accuracy seen.
    assert r["best_val_accuracy"] == pytest.approx(max(accuracies), abs=1e-6), name
    assert accuracies.index(max(accuracies)) == r["best_epoch"], name
    if r["stopped_early"]:  # PATIENCE epochs without improvement are tolerated, not one more
      assert r["last_epoch"] == r["best_epoch"] + demo.PATIENCE + 1, name
    else:
      assert r["last_epoch"] - r["best_epoch"] <= demo.PATIENCE, name


def check_l1_makes_exact_zeros_that_weight_decay_does_not(run):
  _, results, *_ = run
  plain, sparse = results["AdamW"]["zero_fraction"], results["AdamW+L1"]["zero_fraction"]
  assert plain < 0.01
  assert sparse > plain + 0.1
  # Only the L1 proximal step zeroes weights; every other optimizer keeps them dense.
  others = [r["zero_fraction"] for name, r in results.items() if name != "AdamW+L1"]
  assert max(others) < 0.01


def check_pictures_are_written_and_named(run):
  demo, results, out, printed, _ = run
  from matplotlib import image

  for name in (demo.CURVES_PNG, demo.RACE_PNG):
    path = out / name
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, name
    pixels = image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100, name
    assert np.ptp(pixels[..., :3]) > 0.5, name  # drawn on, not a blank canvas
    assert str(path.resolve()) in printed  # the demo says where the pictures are
  for name in results:  # the final table has a row per optimizer
    assert any(line.startswith(name + " ") for line in printed.splitlines()), name


def check_no_warnings(run):
  caught = run[-1]
  assert not caught, "\n".join(
    f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
  )


def check_every_loss_panel_is_labelled(run):
  demo, results, out, *_ = run
  fig = demo.plot_curves(results, out / "again.png", dpi=40)
  panels = {ax.get_title(): ax for ax in fig.axes}
  for name in results:
    ax = panels[name]
    assert ax.get_yscale() == "log", name
    assert "loss" in ax.get_ylabel() and "log" in ax.get_ylabel(), name
  # The zero-weights panel: the lines drawn can be told apart (no two with the same values),
  # the legend names every optimizer, and a drawn line is the share the run recorded.
  ax = panels["kernel weights that are exactly 0"]
  assert ax.get_ylabel() and ax.get_xlabel() == "epoch"
  ys = [np.asarray(line.get_ydata()) for line in ax.get_lines()]
  for i in range(len(ys)):
    for j in range(i):
      assert not (ys[i].shape == ys[j].shape and np.array_equal(ys[i], ys[j])), (i, j)
  legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
  for name in results:
    assert name in legend, name
  sparse = 100 * np.asarray(results["AdamW+L1"]["history"]["zero_fraction"])
  assert any(y.shape == sparse.shape and np.allclose(y, sparse) for y in ys)


def test_demo_end_to_end(tmp_path_factory):
  run = run_demo(tmp_path_factory)
  check_every_optimizer_learns_far_above_chance(run)
  check_early_stopping_keeps_the_best_epoch(run)
  check_l1_makes_exact_zeros_that_weight_decay_does_not(run)
  check_pictures_are_written_and_named(run)
  check_every_loss_panel_is_labelled(run)
  check_no_warnings(run)


def test_the_demo_imports_without_a_warning():
  """What `make demo` shows first: importing the demo (JAX, Flax, scikit-learn, matplotlib,
  tqdm, optcompose) and building its optimizers, in a fresh process where any warning is an
  error (the end-to-end test cannot see warnings of modules this process imported before)."""
  code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='optcompose_demo_import')"
  proc = subprocess.run(
    [sys.executable, "-W", "error", "-c", code, str(ROOT / "examples" / "demo.py")],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Warning" not in proc.stderr, proc.stderr[-3000:]


def pixels(fig):
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].astype(np.int16)


def test_every_race_path_stays_visible_where_paths_overlap(tmp_path):
  """Synthetic paths as the race makes them, overlapping the hard way: SGD crawls along the
  start of momentum's path (Rosenbrock's valley, the saddle's ridge) and Adam crosses both.
  Hiding one optimizer's line must remove pixels of its own colour along at least half of
  its length inside the frame, in every panel: no path is hidden under another."""
  from matplotlib.colors import to_rgb

  demo = load_demo()
  steps = 400
  t = np.linspace(0.0, 1.0, steps + 1)[:, None]
  paths = {}
  for land in demo.LANDSCAPES:
    (x0, x1), (y0, y1) = land.box
    lo, span = np.array([x0, y0]), np.array([x1 - x0, y1 - y0])

    def line(a, b, t=t, lo=lo, span=span):  # from a to b, in fractions of the box
      return lo + span * (np.asarray(a) + t * (np.subtract(b, a)))

    momentum = line((0.1, 0.1), (0.9, 0.8))
    sgd = momentum[np.minimum(np.arange(steps + 1) // 4, steps)]  # a quarter as fast
    paths[land.name] = {
      "SGD": sgd,
      "Momentum": momentum,
      "RMSProp": line((0.1, 0.1), (0.2, 0.9)),
      "Adam": line((0.1, 0.9), (0.9, 0.15)),
    }
  fig = demo.plot_race(paths, steps, tmp_path / "race.png", dpi=40)
  before = pixels(fig)
  height = before.shape[0]
  for name in demo.RACERS:
    lines = [
      line for line in fig.findobj() if getattr(line, "get_gid", lambda: None)() == f"path:{name}"
    ]
    assert len(lines) == len(demo.LANDSCAPES), name
    for line in lines:
      line.set_visible(False)
    changed = np.any(np.abs(pixels(fig) - before) > 40, axis=-1)
    for line in lines:
      line.set_visible(True)
      ax = line.axes
      # Pixels of the line's own colour that hiding it changes: a line that only peeks out
      # from under another as a blend of both colours at its edges does not count.
      color = np.round(255 * np.asarray(to_rgb(line.get_color()))).astype(np.int16)
      own = changed & np.all(np.abs(before - color) < 60, axis=-1)
      xy = ax.transData.transform(line.get_xydata())
      inside = np.array([ax.bbox.contains(x, y) for x, y in xy])
      seg = np.linalg.norm(np.diff(xy, axis=0), axis=1)
      length = np.sum(seg[inside[:-1] & inside[1:]])  # on screen, in pixels
      (bx0, by0), (bx1, by1) = ax.bbox.get_points()
      # Pixel rows count from the top; display coordinates from the bottom.
      region = own[int(height - by1) : int(height - by0), int(bx0) : int(bx1)]
      # A line at least 1.4 points wide (2 pixels) shows a pixel or more of its colour
      # across its length where it is visible; one hidden under another shows none.
      assert region.sum() > 0.5 * length, (name, ax.get_title(), region.sum(), length)
