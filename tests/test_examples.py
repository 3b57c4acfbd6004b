"""The examples run and produce what they promise (the demo itself: tests/test_demo.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_schedule_picture_is_written(tmp_path):
  out = tmp_path / "schedules.png"
  subprocess.run(
    [sys.executable, str(ROOT / "examples" / "plot_schedules.py"), "--out", str(out)],
    check=True,
    capture_output=True,
    timeout=300,
  )
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert out.stat().st_size > 20_000  # seven curves, not an empty canvas
