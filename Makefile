# The two README commands. Both install what they need first (idempotent) into a virtual
# environment: PYTHON itself when it is a virtual environment's interpreter (an activated one, or
# the one .ci/run passes), else $(VENV), made from PYTHON when missing. So a system Python that
# refuses installs into itself (PEP 668: Debian, Ubuntu, Homebrew) works as well.
PYTHON ?= python3
VENV ?= .venv

# "venv" for a virtual environment's interpreter, else the installation it belongs to
PYTHON_HOME := $(shell $(PYTHON) -c 'import sys; print("venv" if sys.prefix != sys.base_prefix else sys.prefix)')
ifeq ($(PYTHON_HOME),)
$(error PYTHON=$(PYTHON) does not run: install Python 3.9 or newer, or pass PYTHON=/path/to/python3)
endif
ifeq ($(PYTHON_HOME),venv)
PY := $(PYTHON)
ENVIRONMENT :=
else
PY := $(VENV)/bin/python
ENVIRONMENT := $(VENV)/bin/activate
# An existing $(VENV) made from another Python would silently test that one instead.
VENV_HOME := $(shell test -x $(PY) && $(PY) -c 'import sys; print(sys.base_prefix)')
ifneq ($(VENV_HOME),)
ifneq ($(VENV_HOME),$(PYTHON_HOME))
$(error $(VENV) was made from the Python in $(VENV_HOME), not PYTHON=$(PYTHON) ($(PYTHON_HOME)): remove $(VENV) or pass VENV=another-folder)
endif
endif
endif

.PHONY: setup demo test test-install bench setup-slicer58 test-slicer58

# venv writes bin/activate last, so a run that stopped half-way (Debian without python3-venv:
# no ensurepip) is redone.
$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

setup: $(ENVIRONMENT)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

demo: setup
	$(PY) -m EOIRRegistrationLib demo --output-dir eoir-demo-output --overwrite

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q Testing/Python

# The package as a user installs it: `pip install .` (not editable, with the dependencies
# pyproject.toml declares, at the versions installed in $(PY)) into a clean virtual environment
# made from the same Python, then eoir-register run outside the clone (Testing/check_install.py).
# A dependency missing from pyproject.toml fails it. .ci/run runs it after `make test`.
test-install: $(ENVIRONMENT)
	$(PY) Testing/check_install.py

# Slicer 5.8's stack (Python 3.9, numpy 1.26, torch 2.8): the engine and command-line tests.
# The rest runs on the main stack only: slicer-core and import-linter have no Python 3.9 wheels,
# and training, the cohort command, the catalog, the benchmarks' helpers and the fault injection
# (process kills and signals) do not depend on the Python version; CI has 15 minutes.
SLICER58_TESTS := alignment bundled_models cli contrast eoir_model foreground geometry \
	input_checks intensity inverse losses masks memory metrics optimise options overview \
	pipeline refine spatial
setup-slicer58: $(ENVIRONMENT)
	$(PY) -m pip install --quiet -r requirements-slicer58.txt

test-slicer58: setup-slicer58
	$(PY) -m pytest -q $(SLICER58_TESTS:%=Testing/Python/test_%.py)

bench: setup
	$(PY) benchmarks/bench_pipeline.py --threads 2 --save-results
