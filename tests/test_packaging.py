"""The declared dependency floors are the versions the minimum-versions run tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def floors():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  out = {}
  for line in project["dependencies"] + project["optional-dependencies"]["test"]:
    req = Requirement(line)
    lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(lower) == 1, f"{line}: give exactly one >= floor"
    out[req.name.lower()] = lower[0]
  return out


def pins():
  out = {}
  for line in (ROOT / "requirements-min.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s]+)", line).groups()
      out[name.lower()] = Version(version)
  return out


def test_every_floor_is_pinned_in_the_minimum_versions_environment():
  declared, pinned = floors(), pins()
  untested = {
    n: str(v) for n, v in declared.items() if n != "build" and pinned.get(n) != v
  }  # build only serves tools/check_wheel.py
  assert not untested, f"floors without the same pin in requirements-min.txt: {untested}"
  extra = set(pinned) - set(declared) - {"jaxlib"}  # jaxlib comes with jax, at jax's version
  assert not extra, f"pins that pyproject.toml does not declare: {extra}"
  assert pinned["jaxlib"] == pinned["jax"]


def test_the_version_is_written_once():
  import optcompose

  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert "version" not in project and "version" in project["dynamic"]
  assert re.fullmatch(r"\d+\.\d+\.\d+", optcompose.__version__)
