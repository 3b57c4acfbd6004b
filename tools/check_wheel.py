"""Build optcompose's sdist and wheel, install the wheel in a fresh venv, train one step there.

Run with the project's virtual environment (it needs the ``build`` package, from the test
extra)::

    .venv/bin/python tools/check_wheel.py [--keep]

1. ``python -m build`` (an isolated build environment: setuptools comes from the package
   index) writes the sdist, and the wheel built from that sdist, to a temporary folder outside
   the checkout. Its output must hold no warning banner of setuptools or the build backend.
2. The wheel must contain ``optcompose/py.typed``, the checkout's type stubs (every
   ``optcompose/**/*.pyi``, written by tools/gen_stubs.py) and the LICENSE (in
   ``.dist-info/licenses/``, the same bytes as the checkout's); the sdist must contain
   LICENSE, ``py.typed`` and the stubs, and no part of the test suite (MANIFEST.in).
3. A fresh venv (``python -m venv``) in another temporary folder gets the wheel, without
   extras; its dependencies come from the package index or pip's cache.
4. That venv's python, run from the temporary folder (so the checkout cannot be imported),
   imports optcompose from the venv, compares ``importlib.metadata.version`` with
   ``optcompose.__version__``, and runs one jitted ``adamw`` step on a least-squares problem,
   whose loss must go down.

Prints one summary line and exits 0, or prints what failed and exits 1. The temporary folders
are removed at the end (``--keep`` leaves them, and prints where).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "optcompose"

# A warning class (SetuptoolsDeprecationWarning, BuildBackendWarning, ...). (distutils'
# lowercase "warning: ... byte-compiling is disabled" notes are not banners.)
BANNER = re.compile(r"\b[A-Za-z]*Warning\b", re.M)
# A warning about what this repository declares fails the check; one about the build
# backend's own future (a release of setuptools deprecating something we do not use) is shown.
OUR_CONFIG = re.compile(
  r"pyproject|licen[cs]e|classifier|project\.|tool\.setuptools|"
  r"package[-_ ]?(dir|data)|optcompose|editable|py\.typed|\.pyi\b",
  re.I,
)

SMOKE = textwrap.dedent("""\
    import importlib.metadata
    import os
    import sys

    import jax
    import jax.numpy as jnp
    import optcompose as oc

    venv = os.path.realpath(sys.argv[1])
    where = os.path.realpath(oc.__file__)
    assert where.startswith(venv + os.sep), f"optcompose imported from {where}, not the venv"
    assert os.path.isfile(os.path.join(os.path.dirname(where), "py.typed")), "py.typed missing"
    installed = importlib.metadata.version("optcompose")
    assert installed == oc.__version__, (installed, oc.__version__)
    try:   # installed without extras: the strategies must ask for hypothesis, nothing else
      import optcompose.testing.strategies
    except ImportError as e:
      assert "hypothesis" in str(e), e

    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (64, 8))
    y = x @ jax.random.normal(kw, (8, 1)) + 0.5
    params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros(1)}

    def loss(p):
      return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    tx = oc.adamw(1e-2)

    @jax.jit
    def step(p, state):
      value, grads = jax.value_and_grad(loss)(p)
      updates, state = tx.update(grads, state, p)
      return oc.apply_updates(p, updates), state, value

    new_params, _, before = step(params, tx.init(params))
    after = loss(new_params)
    assert float(after) < float(before), (float(before), float(after))
    print(f"optcompose {oc.__version__} from the venv; one adamw step: loss "
          f"{float(before):.4f} -> {float(after):.4f}")
""")


class CheckFailed(Exception):
  pass


def stubs() -> list:
  """The checkout's type stubs, as paths in the wheel (``optcompose/__init__.pyi``, ...)."""
  return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / NAME).rglob("*.pyi"))


def run(cmd, *, cwd, env=None, what):
  """Runs cmd, returns its output (stdout and stderr together); raises CheckFailed on failure."""
  proc = subprocess.run(
    [str(c) for c in cmd],
    cwd=cwd,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  if proc.returncode != 0:
    raise CheckFailed(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}")
  return proc.stdout


def source_version() -> str:
  text = (ROOT / NAME / "__init__.py").read_text()
  match = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
  if not match:
    raise CheckFailed(f"no __version__ line in {NAME}/__init__.py")
  return match.group(1)


def check_wheel(wheel: Path, license_text: bytes) -> None:
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    for needed in (f"{NAME}/py.typed", *stubs()):
      if needed not in names:
        raise CheckFailed(f"{wheel.name} lacks {needed}")
    licenses = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/(licenses/)?LICENSE", n)]
    if not licenses:
      raise CheckFailed(f"{wheel.name} lacks LICENSE in its .dist-info")
    if zf.read(licenses[0]) != license_text:
      raise CheckFailed(f"{wheel.name}: {licenses[0]} differs from the checkout's LICENSE")
    metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    if "License-Expression: Apache-2.0" not in metadata:
      raise CheckFailed(f"{wheel.name}: METADATA has no 'License-Expression: Apache-2.0'")


def check_sdist(sdist: Path, version: str) -> None:
  with tarfile.open(sdist) as tf:
    names = set(tf.getnames())
  top = f"{NAME}-{version}"
  for needed in ("LICENSE", f"{NAME}/py.typed", *stubs(), "pyproject.toml", "README.md"):
    if f"{top}/{needed}" not in names:
      raise CheckFailed(f"{sdist.name} lacks {top}/{needed}")
  partial = sorted(n for n in names if n.startswith(f"{top}/tests/"))
  if partial:  # setuptools' default took tests/test_*.py without their helpers (MANIFEST.in)
    raise CheckFailed(f"{sdist.name} holds {partial[0]} and {len(partial) - 1} more tests")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--keep", action="store_true", help="leave the temporary folders")
  args = parser.parse_args()

  try:
    import build  # noqa: F401  (only its presence: it runs as `python -m build`)
  except ImportError:
    print(
      f"check_wheel: {sys.executable} has no `build` package; install the test extra "
      "(pip install -e '.[test]') or `pip install build`",
      file=sys.stderr,
    )
    return 1

  start = time.perf_counter()
  tmp = Path(tempfile.mkdtemp(prefix=f"{NAME}-wheel-check-")).resolve()
  if tmp == ROOT or ROOT in tmp.parents:
    print(
      f"check_wheel: the temporary folder {tmp} is inside the checkout; set TMPDIR", file=sys.stderr
    )
    shutil.rmtree(tmp)
    return 1
  times = {}
  try:
    version = source_version()
    dist, venv = tmp / "dist", tmp / "venv"

    t = time.perf_counter()
    out = run(
      [sys.executable, "-m", "build", "--outdir", dist, ROOT], cwd=ROOT, what="python -m build"
    )
    times["build"] = time.perf_counter() - t
    banners = sorted({line.strip() for line in out.splitlines() if BANNER.search(line)})
    ours = [b for b in banners if OUR_CONFIG.search(b)]
    if ours:
      raise CheckFailed(
        "the build printed warnings about this project's configuration:\n  "
        + "\n  ".join(ours)
        + f"\nfull output:\n{out}"
      )
    if banners:  # the build backend's own news (a deprecation in a new setuptools): shown only
      print("check_wheel: note: the build printed\n  " + "\n  ".join(banners))
    wheels = list(dist.glob(f"{NAME}-{version}-py3-none-any.whl"))
    sdists = list(dist.glob(f"{NAME}-{version}.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
      raise CheckFailed(
        f"expected one wheel and one sdist of version {version} in {dist}, "
        f"found {sorted(p.name for p in dist.iterdir())}"
      )
    check_wheel(wheels[0], (ROOT / "LICENSE").read_bytes())
    check_sdist(sdists[0], version)

    t = time.perf_counter()
    run([sys.executable, "-m", "venv", venv], cwd=tmp, what="python -m venv")
    python = venv / "bin" / "python"
    if not python.exists():  # Windows
      python = venv / "Scripts" / "python.exe"
    run(
      [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheels[0]],
      cwd=tmp,
      what="pip install of the wheel",
    )
    times["install"] = time.perf_counter() - t

    t = time.perf_counter()
    (tmp / "smoke.py").write_text(SMOKE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("JAX_PLATFORMS", "cpu")  # the venv has jax's CPU wheel only
    smoke = (
      run(
        [python, tmp / "smoke.py", venv],
        cwd=tmp,
        env=env,
        what="the training step in the fresh venv",
      )
      .strip()
      .splitlines()
    )
    times["step"] = time.perf_counter() - t
  except CheckFailed as e:
    print(f"check_wheel: FAILED: {e}", file=sys.stderr)
    return 1
  finally:
    if args.keep:
      print(f"check_wheel: kept {tmp}")
    else:
      shutil.rmtree(tmp, ignore_errors=True)

  print(
    f"check_wheel: OK: {wheels[0].name} and {sdists[0].name} (LICENSE, py.typed, "
    f"{len(stubs())} stubs) built in "
    f"{times['build']:.0f}s, installed in a fresh venv in {times['install']:.0f}s; "
    f"{smoke[-1] if smoke else ''} ({times['step']:.0f}s); "
    f"{time.perf_counter() - start:.0f}s in all"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
