"""The Flax recipe examples (linen TrainState, nnx.Optimizer) learn what they promise."""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["train_linen", "train_nnx"])
def test_recipe_example_learns_and_keeps_the_best_params(name, capsys):
  main = runpy.run_path(str(ROOT / "examples" / f"{name}.py"))["main"]
  results = main(epochs=12, seed=1)

  # The training loss falls substantially from its start (about ln 3 for 3 classes).
  assert results["final_train_loss"] < 0.5 * results["initial_train_loss"]
  # The held-out accuracy of the kept parameters beats chance by a clear margin.
  assert results["best_val_accuracy"] > results["chance"] + 0.3
  # Early stopping put back the parameters of the best epoch: their validation loss is the
  # lowest one recorded, whichever epoch that was.
  assert 0 <= results["best_epoch"] < results["epochs_run"] == len(results["val_losses"])
  assert results["best_val_loss"] == pytest.approx(min(results["val_losses"]), rel=1e-5)
  assert results["best_val_loss"] == pytest.approx(
    results["val_losses"][results["best_epoch"]], rel=1e-5
  )
  assert "done after" in capsys.readouterr().out
