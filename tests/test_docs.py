"""Every public builder and contract function documents itself (Google style): a one-line
summary, then ``Args:`` (one entry per parameter), ``Returns:`` and ``References:``, in that
order."""

from __future__ import annotations

import inspect
import re

import pytest

import optcompose as oc
from optcompose.core.registry import REGISTRY

CONTRACT = (
  "chain",
  "apply_updates",
  "stateless",
  "stateless_with_tree_map",
  "identity",
  "current_hyperparams",
  "set_hyperparams",
  "inject_hyperparams",
  "with_schedules",
  "averaged_params",
  "slow_params",
  "diagnostics_dict",
)
REQUIRED = ("Args", "Returns", "References")
SECTION = re.compile(r"^([A-Z][A-Za-z ]*):$")  # an unindented section header, e.g. "Args:"
ENTRY = re.compile(r"^  (\*{0,2}\w+)(?: \([^)]*\))?:")  # "  name: ..." or "  name (type): ..."
STARS = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}


def doc_problems(fn) -> list:
  """What ``fn``'s docstring lacks (empty when it is complete)."""
  lines = (inspect.getdoc(fn) or "").splitlines()
  sections, current = {}, None  # header -> its lines, in the docstring's order
  for line in lines:
    if SECTION.match(line):
      current = sections.setdefault(SECTION.match(line).group(1), [])
    elif current is not None:
      current.append(line)
  problems = []
  if not lines or not lines[0].strip():
    problems.append("no summary line")
  elif len(lines) > 1 and lines[1].strip():
    problems.append("the summary is longer than one line")
  params = [STARS.get(p.kind, "") + p.name for p in inspect.signature(fn).parameters.values()]
  documented = {m.group(1) for line in sections.get("Args", ()) if (m := ENTRY.match(line))}
  if params and "Args" not in sections:
    problems.append("no Args: section")
  elif params and set(params) - documented:
    problems.append(f"Args: lacks {[p for p in params if p not in documented]}")
  problems += [f"no {s}: section" for s in REQUIRED[1:] if s not in sections]
  order = [s for s in sections if s in REQUIRED]
  if order != sorted(order, key=REQUIRED.index):
    problems.append(f"sections out of order: {order}")
  return problems


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_builder_is_documented(name):
  assert doc_problems(REGISTRY[name].builder) == []


@pytest.mark.parametrize("name", CONTRACT)
def test_contract_function_is_documented(name):
  assert doc_problems(getattr(oc, name)) == []


def documented(fn, doc):
  fn.__doc__ = doc
  return fn


def test_the_check_catches_a_missing_section_or_argument():
  tail = "\n\nReturns:\n  Nothing.\n\nReferences:\n  None."
  complete = documented(
    lambda a, *rest, b=1, **extra: None,
    "Summary.\n\nArgs:\n  a: 1.\n  *rest: more.\n  b (int): 2.\n  **extra: the rest." + tail,
  )
  without_args = documented(lambda a: None, "Summary." + tail)
  one_missing = documented(
    lambda a, b: None,
    "Summary, which goes on\nover two lines.\n\nReferences:\n  None.\n\nArgs:\n  a: 1.",
  )
  assert doc_problems(complete) == []
  assert doc_problems(without_args) == ["no Args: section"]
  assert doc_problems(one_missing) == [
    "the summary is longer than one line",
    "Args: lacks ['b']",
    "no Returns: section",
    "sections out of order: ['References', 'Args']",
  ]
  assert doc_problems(lambda: None) == [
    "no summary line",
    "no Returns: section",
    "no References: section",
  ]
