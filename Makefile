# optcompose: every target sets up its own virtual environment from this repository's files.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: test demo bench clean

$(VENV)/.stamp-base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base pyproject.toml
	$(PIP) install --quiet -e ".[test]"
	touch $@

$(VENV)/.stamp-examples: $(VENV)/.stamp-base pyproject.toml
	$(PIP) install --quiet -e ".[examples]"
	touch $@

## make test: create .venv, install the package with its test extra, run the whole suite.
test: $(VENV)/.stamp-test
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

## make demo: create .venv, install the examples extra, run the main example (seven
## optimizers on scikit-learn's digits, an optimizer race; PNGs in demo_output/).
demo: $(VENV)/.stamp-examples
	$(PY) examples/demo.py

$(VENV)/.stamp-bench: $(VENV)/.stamp-test
	$(PIP) install --quiet "torch==2.13.0" || echo "PyTorch not installed: its benchmark rows are skipped"
	touch $@

## make bench: optcompose vs Optax vs PyTorch optimizer steps, written to benchmarks/RESULTS.md.
bench: $(VENV)/.stamp-bench
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
