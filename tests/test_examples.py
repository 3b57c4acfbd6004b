"""The examples run and produce what they promise."""

import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_schedule_picture_is_written(tmp_path):
  out = tmp_path / "schedules.png"
  subprocess.run([sys.executable, str(ROOT / "examples" / "plot_schedules.py"), "--out", str(out)],
                 check=True, capture_output=True, timeout=300)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert out.stat().st_size > 20_000  # seven curves, not an empty canvas


def test_demo_loss_falls(capsys):
  import jax
  with jax.numpy_rank_promotion("allow"):  # the demo is user code: JAX's default applies
    runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
  lines = [l for l in capsys.readouterr().out.splitlines() if "train loss" in l]
  losses = [float(l.rsplit(" ", 1)[1]) for l in lines]
  assert losses[-1] < 0.01 < losses[0]
