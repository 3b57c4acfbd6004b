# optcompose: every target sets up its own virtual environment from this repository's files.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MIN    := .venv-min
PYTEST := -m pytest -q -n 2 --dist loadgroup
# The minimum-versions venv needs Python 3.10 or 3.11: its pinned releases (numpy 1.26.0,
# scikit-learn 1.3.0) have no wheels for newer Pythons. The first of these that is one.
MIN_PYTHON := $(shell for p in $(PYTHON) python3.11 python3.10; do \
  $$p -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 10), (3, 11)))' 2>/dev/null \
  && { echo $$p; break; }; done)
NO_MIN_PYTHON := SKIPPED: the minimum-versions run needs Python 3.10 or 3.11 (the pinned
NO_MIN_PYTHON += releases have no wheels for newer ones); install python3.11 to run it

.PHONY: test lint test-main test-isa test-min test-wheel min-venv demo bench docs clean

$(VENV)/.stamp-base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base pyproject.toml
	$(PIP) install --quiet -e ".[test,docs,lint]"
	touch $@

$(VENV)/.stamp-examples: $(VENV)/.stamp-base pyproject.toml
	$(PIP) install --quiet -e ".[examples]"
	touch $@

# The oldest supported versions, pinned (requirements-min.txt); the checkout is imported from
# the working directory, not installed.
$(MIN)/.stamp: requirements-min.txt constraints-min.txt
	rm -rf $(MIN)
	$(MIN_PYTHON) -m venv $(MIN)
	$(MIN)/bin/python -m pip install --quiet --upgrade pip
	$(MIN)/bin/python -m pip install --quiet -r requirements-min.txt -c constraints-min.txt
	touch $@

min-venv:
	@if [ -n "$(MIN_PYTHON)" ]; then $(MAKE) --no-print-directory $(MIN)/.stamp; \
	else echo "$(NO_MIN_PYTHON)"; fi

## make test: create .venv (and .venv-min), then
##   1. the whole suite, on this CPU's full instruction set (XLA CPU's previous emitters:
##      see FAST_COMPILE below);
##   2. the numerics tests again with XLA limited to SSE4.2 (x86_64 only) and XLA's default
##      emitters, but those in float64 (marker float64), whose tolerance is four orders above
##      any ISA's rounding, the eager runs (op by op: the jitted runs exercise the ISA's
##      fusions) and the constant-schedule checks (a 2e-6 tolerance no ISA approaches);
##   3. the same numerics tests and the API-surface tests at the minimum versions
##      (requirements-min.txt), with XLA limited to AVX2 (x86_64; elsewhere the default);
##   4. the wheel: built, installed in a fresh venv outside the checkout, one training step.
## (The installs and the wheel's build run beside the whole suite: they mostly wait on the
## disk and the package index while the suite keeps both cores busy.)
## make lint: ruff's rules and its formatter (a check: nothing is rewritten) on every Python file,
## and pyrefly's type check of the package and of a user's annotated script against its stubs
## (tests/typecheck; [tool.ruff], [tool.pyrefly] in pyproject.toml; the same hooks in
## .pre-commit-config.yaml).
lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/ruff format --no-cache --check .
	$(VENV)/bin/pyrefly check --python-interpreter-path $(PY) --progress-bar no

test:
	@echo "== $$(date +%T) lint, format and types"
	@$(MAKE) --no-print-directory lint
	@echo "== $$(date +%T) the whole suite (and, beside it, the minimum-versions venv and the wheel check)"
	@$(MAKE) --no-print-directory -j3 test-main min-venv test-wheel
	@echo "== $$(date +%T) the numerics tests limited to SSE4.2"
	@$(MAKE) --no-print-directory test-isa
	@echo "== $$(date +%T) the minimum versions"
	@$(MAKE) --no-print-directory test-min
	@echo "== $$(date +%T) make test: all passed"

# The whole suite compiles a few thousand small programs: with XLA CPU's previous emitters
# (--xla_cpu_use_fusion_emitters=false; jax 0.6's default) they compile about a third
# faster. The SSE4.2 run below keeps the default emitters, so the numerics tests still run on
# the pipeline users get. (Only if this jax knows the flag: XLA aborts on an unknown one.)
FAST_COMPILE := --xla_cpu_use_fusion_emitters=false
test-main: $(VENV)/.stamp-test
	@flags=$$(XLA_FLAGS=$(FAST_COMPILE) $(PY) -c "import jax; jax.devices()" 2>/dev/null \
	  && echo $(FAST_COMPILE)); echo "XLA_FLAGS=$$flags $(PY) $(PYTEST) tests"; \
	XLA_FLAGS="$${XLA_FLAGS:-} $$flags" $(PY) $(PYTEST) tests

test-isa: $(VENV)/.stamp-test
	@if [ "$$(uname -m)" = x86_64 ]; then \
	  echo "numerics tests but the float64 ones, XLA limited to SSE4.2"; \
	  XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 $(PY) $(PYTEST) -p no:cacheprovider \
	    -m "numerics and not float64" -k "not eager and not constant_schedule" tests; \
	else echo "not x86_64: no instruction-set variant to run"; fi

# Markers (pyproject.toml): `numerics` compares floating-point results of two programs;
# `min_versions` marks the API surface that moved between versions (tests/conftest.py).
test-min: min-venv
	@[ -n "$(MIN_PYTHON)" ] || exit 0; \
	isa=$$([ "$$(uname -m)" = x86_64 ] && echo --xla_cpu_max_isa=AVX2); \
	echo "numerics and API tests at the minimum versions (requirements-min.txt), XLA_FLAGS=$$isa"; \
	PYTHONPATH=$(CURDIR) XLA_FLAGS=$$isa $(MIN)/bin/python $(PYTEST) -p no:cacheprovider \
	  -m "(numerics and not float64) or min_versions" -k "not eager and not constant_schedule" tests

test-wheel: $(VENV)/.stamp-test
	$(PY) tools/check_wheel.py

## make demo: create .venv, install the examples extra, run the main example (seven
## optimizers on scikit-learn's digits, an optimizer race; PNGs in demo_output/).
## make docs: create .venv (test and docs extras), build the documentation site into site/
## (mkdocs.yml; --strict: a warning is an error). make test builds it too
## (tests/test_docs_site.py), with the API reference's coverage check.
docs: $(VENV)/.stamp-test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

demo: $(VENV)/.stamp-examples
	$(PY) examples/demo.py

$(VENV)/.stamp-bench: $(VENV)/.stamp-test
	$(PIP) install --quiet "torch==2.13.0" || echo "PyTorch not installed: its benchmark rows are skipped"
	touch $@

## make bench: optcompose vs Optax vs PyTorch optimizer steps, written to benchmarks/RESULTS.md.
bench: $(VENV)/.stamp-bench
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(MIN) .pytest_cache .hypothesis site
