"""examples/demo.py (`make demo`): seven optimizers train a Flax MLP on scikit-learn's digits
with early stopping, AdamW + L1 ends sparse, and the pictures are written.

One quick run of the demo (fewer epochs, small pictures) is shared by every test here.
"""

import contextlib
import importlib.util
import io
import sys
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
  spec = importlib.util.spec_from_file_location("optcompose_demo",
                                                ROOT / "examples" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Flax modules are dataclasses: they look their module up
  spec.loader.exec_module(module)
  return module


def run_demo(tmp_path_factory):
  demo = load_demo()
  out = tmp_path_factory.mktemp("demo_output")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    results = demo.main(["--quick", "--no-progress", "--out", str(out)])
  return demo, results, out, printed.getvalue()


def check_every_optimizer_learns_far_above_chance(run):
  demo, results, _, _ = run
  assert list(results) == list(demo.OPTIMIZER_NAMES)
  for name, r in results.items():
    assert r["best_val_accuracy"] > 0.8, name  # chance is 0.1
    # The restored best parameters are scored on the held-out test set.
    assert 0.8 < r["test_accuracy"] <= 1.0, name
    assert np.all(np.isfinite(r["history"]["train_loss"])), name
    # Training works: the loss falls well below the untrained ln(10) = 2.30.
    assert r["history"]["train_loss"][-1] < 0.5 * r["history"]["train_loss"][0], name


def check_early_stopping_keeps_the_best_epoch(run):
  demo, results, _, _ = run
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
  _, results, _, _ = run
  plain, sparse = results["AdamW"]["zero_fraction"], results["AdamW+L1"]["zero_fraction"]
  assert plain < 0.01
  assert sparse > plain + 0.1
  # Only the L1 proximal step zeroes weights; every other optimizer keeps them dense.
  others = [r["zero_fraction"] for name, r in results.items() if name != "AdamW+L1"]
  assert max(others) < 0.01


def check_pictures_are_written_and_named(run):
  demo, results, out, printed = run
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


def test_demo_end_to_end(tmp_path_factory):
  run = run_demo(tmp_path_factory)
  check_every_optimizer_learns_far_above_chance(run)
  check_early_stopping_keeps_the_best_epoch(run)
  check_l1_makes_exact_zeros_that_weight_decay_does_not(run)
  check_pictures_are_written_and_named(run)
