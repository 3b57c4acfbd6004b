"""The documentation site (mkdocs.yml, docs/): every public name has an entry in the API
reference, the nav and the pages agree, the docstrings' examples run, and, where mkdocs is
installed (the `docs` extra), the site builds with no warning.

``python tests/test_docs_site.py`` prints the ``::: path`` entry to add for each public name
the API reference lacks."""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import optcompose as oc

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"

# The public submodules whose names are documented under their own path (the top level's
# names are checked separately). A module without ``__all__`` exports what it defines.
SUBMODULES = (
  "optcompose.checkpoint",
  "optcompose.sharding",
  "optcompose.schedules",
  "optcompose.masks",
  "optcompose.flat",
  "optcompose.migrate",
  "optcompose.metrics",
  "optcompose.tree",
  "optcompose.tree_utils",
  "optcompose.testing",
  "optcompose.testing.invariants",
  "optcompose.testing.strategies",
)
# The floors whose public names are the top level's (checked there).
FLOORS = (
  "optcompose.core",
  "optcompose.transforms",
  "optcompose.wrappers",
  "optcompose.optimizers",
  "optcompose.recipe",
  "optcompose.contrib",  # optax.contrib's names that optcompose has: the top level's objects
)
# Optax's own types, re-exported (type aliases of Optax's: nothing of ours to document), so
# docs/api/index.md lists them in a table instead of `::: ` entries.
OPTAX_TYPES = ("Params", "Updates", "OptState", "TransformInitFn", "TransformUpdateFn")
ENTRY = re.compile(r"^::: ([\w.]+)[ \t]*\n((?:[ \t]+\S.*\n|[ \t]*\n)*)", re.M)


# --- the API reference covers every public name ----------------------------------------------


def defined_names(module) -> set:
  """The names a module binds at its top level (def, class, assignment), read from its source."""
  names = set()
  for node in ast.parse(Path(module.__file__).read_text()).body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
        for leaf in ast.walk(target):
          if isinstance(leaf, ast.Name):
            names.add(leaf.id)
  return names


def public_names(module) -> list:
  """``module.__all__``, or else the public names it defines or imports from optcompose."""
  if hasattr(module, "__all__"):
    return list(module.__all__)
  defined = defined_names(module)

  def ours(value) -> bool:
    return str(getattr(value, "__module__", "")).startswith("optcompose")

  return sorted(
    n
    for n in dir(module)
    if not n.startswith("_")
    and not inspect.ismodule(getattr(module, n))
    and (n in defined or ours(getattr(module, n)))
  )


def required() -> dict:
  """``(module name, public name) -> object`` for every name the reference must document."""
  out = {
    ("optcompose", n): getattr(oc, n)
    for n in dir(oc)
    if not n.startswith("_") and not inspect.ismodule(getattr(oc, n)) and n not in OPTAX_TYPES
  }
  for name in SUBMODULES:
    module = importlib.import_module(name)
    out.update({(name, n): getattr(module, n) for n in public_names(module)})
  return out


def resolve(path: str):
  """The object at a dotted path: the longest importable module, then attributes."""
  parts = path.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for part in parts[i:]:
      obj = getattr(obj, part)
    return obj
  raise ImportError(path)


def api_entries(texts) -> list:
  """``(path, options text)`` of every ``::: path`` entry in the given Markdown texts."""
  return [(m.group(1), m.group(2)) for text in texts for m in ENTRY.finditer(text)]


def documented(entries) -> set:
  """``(name, id(object))`` pairs the entries render: an object under its own name, and every
  public name of a module given whole (without a ``members`` option)."""
  out = set()
  for path, options in entries:
    obj = resolve(path)
    if inspect.ismodule(obj):
      if not re.search(r"^\s+members:", options, re.M):
        out |= {(n, id(getattr(obj, n))) for n in public_names(obj)}
    else:
      out.add((path.rsplit(".", 1)[1], id(obj)))
  return out


def missing(entries) -> list:
  """The required names the entries do not document, as ``module.name``."""
  have = documented(entries)
  # A builder is the registry's validating wrapper of the function it documents
  # (functools.wraps: the same docstring and signature); the entry may name either.
  return sorted(
    f"{module}.{name}"
    for (module, name), obj in required().items()
    if (name, id(obj)) not in have and (name, id(getattr(obj, "__wrapped__", obj))) not in have
  )


def api_texts() -> list:
  return [p.read_text() for p in sorted(API.glob("*.md"))]


def test_every_public_name_has_an_api_entry():
  assert missing(api_entries(api_texts())) == [], (
    "public names without a `::: path` entry in docs/api/*.md (run this file to list them)"
  )


def test_every_public_module_is_checked():
  """A new public module of the package is either documented under its own path (SUBMODULES)
  or a floor whose names the top level exports (FLOORS)."""
  modules = {
    f"optcompose.{m.name}" for m in pkgutil.iter_modules(oc.__path__) if not m.name.startswith("_")
  }
  assert sorted(modules - set(SUBMODULES) - set(FLOORS)) == []


def test_optax_types_are_listed_on_the_api_overview():
  import optax

  table = (API / "index.md").read_text()
  for name in OPTAX_TYPES:
    assert getattr(oc, name) is getattr(optax, name)  # Optax's: the table says so
    assert re.search(rf"^\| `{name}` \|", table, re.M), name


def test_every_api_entry_names_a_real_object_once():
  paths = [p for p, _ in api_entries(api_texts())]
  assert len(paths) > 200
  for path in paths:
    resolve(path)  # raises for a path that names nothing
  assert sorted({p for p in paths if paths.count(p) > 1}) == []


def test_the_coverage_check_catches_a_missing_entry():
  entries = api_entries(api_texts())
  assert missing([e for e in entries if e[0] != "optcompose.optimizers.adam.adamw"]) == [
    "optcompose.adamw"
  ]
  assert "optcompose.sharding.init_sharded" in missing(
    [e for e in entries if not e[0].startswith("optcompose.sharding.")]
  )
  tree = [e for e in entries if e[0] != "optcompose.tree"]  # a module given whole, then not
  assert "optcompose.tree.global_norm" in missing(tree)
  restricted = tree + [("optcompose.tree", "    options:\n      members: false\n")]
  assert "optcompose.tree.global_norm" in missing(restricted)


# --- the nav and the pages --------------------------------------------------------------------


def nav_pages() -> list:
  """The pages mkdocs.yml's nav lists (plain YAML, no Python tags: safe_load reads it)."""
  yaml = pytest.importorskip("yaml")
  config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

  def walk(node):
    if isinstance(node, str):
      yield node
    elif isinstance(node, list):
      for item in node:
        yield from walk(item)
    elif isinstance(node, dict):
      for value in node.values():
        yield from walk(value)

  return list(walk(config["nav"]))


def test_every_nav_entry_exists_and_every_page_is_in_the_nav():
  pages = nav_pages()
  assert len(pages) == len(set(pages)), "a page listed twice"
  assert [p for p in pages if not (DOCS / p).is_file()] == []
  on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
  assert sorted(set(on_disk) - set(pages)) == []


def test_relative_links_between_pages_resolve():
  """Links to other pages (``page.md`` or ``page.md#anchor``) name files that exist; the
  README's links into docs/ too. (mkdocs checks the anchors when it builds.)"""
  link = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")
  broken = []
  for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
    for target in link.findall(page.read_text()):
      if "://" not in target and not (page.parent / target).resolve().is_file():
        broken.append(f"{page.relative_to(ROOT)} -> {target}")
  assert broken == []


def test_optax_suite_summary_is_the_one_classify_writes():
  """docs/coming-from-optax.md holds, between its markers, what tools/optax_suite/classify.py
  writes from the recorded results (run.py, then classify.py, regenerate both)."""
  spec = importlib.util.spec_from_file_location(
    "optax_suite_classify", ROOT / "tools" / "optax_suite" / "classify.py"
  )
  classify = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(classify)
  assert classify.PAGE == DOCS / "coming-from-optax.md"
  results, real = classify._load("results.json"), classify._load("results_real.json")
  text = classify.PAGE.read_text()
  start, end = text.index(classify.START), text.index(classify.END) + len(classify.END)
  assert text[start:end] == classify.readme_block(results, real)


# --- the docstrings' examples run --------------------------------------------------------------


def package_modules() -> list:
  names = ["optcompose"]
  for info in pkgutil.walk_packages(oc.__path__, "optcompose."):
    names.append(info.name)
  return names


def test_docstring_examples_run():
  """Every ``>>>`` example in the package's docstrings, with JAX's default promotion rules
  (which readers have; this suite makes them strict). The docstrings optcompose.tree takes
  from Optax's functions keep Optax's examples, which call ``optax.tree_utils...``: they run
  with ``optax`` bound to optcompose (``import optcompose as optax``), against Optax's
  expected outputs."""
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  runner = doctest.DocTestRunner(optionflags=flags)
  finder = doctest.DocTestFinder()
  examples = 0
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    for name in package_modules():
      module = importlib.import_module(name)
      for test in finder.find(module, name, extraglobs={"optax": oc}):
        examples += len(test.examples)
        runner.run(test)
  results = runner.summarize(verbose=False)
  assert results.failed == 0, f"{results.failed} docstring examples failed (printed above)"
  assert examples >= 5, "the docstrings' examples went missing"


# --- the site builds (where the docs extra is installed) ---------------------------------------


@pytest.mark.slow
def test_the_site_builds_without_a_warning(tmp_path):
  pytest.importorskip("mkdocs")
  pytest.importorskip("mkdocstrings")
  mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's end-of-life banner
  done = subprocess.run(
    [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  # Every entry was rendered: its path is in the site's inventory of objects.
  import zlib

  data = (tmp_path / "site" / "objects.inv").read_bytes()
  body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
  inventory = {line.split(" ", 1)[0] for line in body.splitlines()}
  rendered = [p for p, _ in api_entries(api_texts()) if not inspect.ismodule(resolve(p))]
  assert [p for p in rendered if p not in inventory] == []
  assert "optcompose.tree.global_norm" in inventory  # a member of a module given whole


if __name__ == "__main__":
  for path in missing(api_entries(api_texts())):
    module, name = path.rsplit(".", 1)
    obj = getattr(importlib.import_module(module), name)
    home = getattr(obj, "__module__", None) or module
    where = f"::: {module}.{name}" + (f"` or `::: {home}.{name}" if home != module else "")
    print(f"{path}: add `{where}` to a page of docs/api/")
