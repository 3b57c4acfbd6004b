"""Every ``python`` example of README.md and docs/ runs alone, in a fresh namespace, as a reader
would paste it; and what some of them build does what their text says (the pieces-built Adam
equals oc.adam, the safety recipe freezes and accumulates, the usage example trains).

(``py`` blocks are excerpts, not run; the one of docs/guides/testing.md runs in
tests/test_properties.py as a module of its own, since hypothesis reads its source.)"""

import re
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optcompose as oc

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A block may be indented (inside a list item): it ends at a fence indented alike.
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def blocks() -> list:
  """``(id, source)`` of every python block, the id naming its page and position."""
  out = []
  for page in PAGES:
    for i, match in enumerate(BLOCK.finditer(page.read_text())):
      out.append((f"{page.relative_to(ROOT)}:{i}", textwrap.dedent(match.group(2))))
  return out


BLOCKS = dict(blocks())


def run(block_id: str) -> dict:
  """Run one block alone, with JAX's default promotion rules (which readers have; this
  suite makes them strict), and return its namespace."""
  namespace = {"__name__": "__docs_example__"}
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(BLOCKS[block_id], block_id, "exec"), namespace)
  return namespace


def containing(snippet: str) -> str:
  """The one block whose source contains ``snippet``."""
  found = [i for i, src in BLOCKS.items() if snippet in src]
  assert len(found) == 1, f"{snippet!r} is in blocks {found}, expected exactly one"
  return found[0]


def test_there_are_examples_on_the_front_page_and_in_the_docs():
  assert any(i.startswith("README.md:") for i in BLOCKS)
  assert sum(not i.startswith("README.md:") for i in BLOCKS) >= 10


@pytest.mark.parametrize("block_id", sorted(BLOCKS))
def test_example_runs_alone(block_id):
  run(block_id)


def test_no_code_in_a_table_holds_a_pipe():
  """A ``|`` inside code in a table row renders differently by renderer: GitHub splits the
  cell there unless it is written ``\\|``, and the docs site (Python-Markdown) then shows the
  backslash inside the code, where a reader copying ``exclude="bias\\|scale"`` got a regex
  matching nothing (a literal ``|``): weight decay silently on biases and norms."""
  found = [
    f"{page.relative_to(ROOT)}:{n}: {span.replace(chr(0), chr(92) + '|')}"
    for page in PAGES
    for n, line in enumerate(page.read_text().splitlines(), 1)
    if line.lstrip().startswith("|")
    for span in re.findall(r"`[^`]*`", line.replace("\\|", "\x00"))
    if "|" in span or "\x00" in span
  ]
  assert not found, "code with a | in a table row (move it under the table):\n" + "\n".join(found)


def test_front_page_example_trains():
  block = containing("for _ in range(20):")
  assert block.startswith("README.md:")
  ns = run(block)
  x, y = ns["x"], ns["y"]
  with jax.numpy_rank_promotion("allow"):
    start = ns["loss"](jax.tree.map(jnp.zeros_like, ns["params"]), x, y)  # where it started
    assert float(ns["loss"](ns["params"], x, y)) < float(start)
  lr = oc.current_hyperparams(ns["state"])["learning_rate"]
  assert float(lr) == pytest.approx(float(ns["lr"](19)), rel=1e-6)  # the 20th step's value


def test_usage_example_trains():
  ns = run(containing("schedule = lambda step:"))
  with jax.numpy_rank_promotion("allow"):
    assert float(ns["loss"](ns["params"], ns["x"], ns["y"])) < 1.0  # 1.0 at zero weights
  assert float(jnp.max(jnp.abs(ns["params"]["w"]))) > 0.0


def test_pieces_built_adam_equals_adam():
  ns = run(containing("laprop = "))
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  g = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2)}
  a, b = ns["adam"], oc.adam(1e-3)
  sa, sb = a.init(params), b.init(params)
  for _ in range(3):
    ua, sa = a.update(g, sa, params)
    ub, sb = b.update(g, sb, params)
    for u, v in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
      np.testing.assert_allclose(u, v, rtol=1e-6)


def test_safety_recipe_freezes_and_accumulates():
  """With a frozen embedding, 4 micro-steps make one real step."""
  tx = run(containing("with_frozen = "))["with_frozen"]
  p = {"embed": jnp.ones(3), "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  s = tx.init(p)
  for k in range(4):
    u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    moved = float(jnp.max(jnp.abs(u["dense"]["kernel"])))
    assert (moved > 0.0) == (k == 3)  # only the fourth micro-step applies the mean
    assert float(jnp.max(jnp.abs(u["embed"]))) == 0.0
