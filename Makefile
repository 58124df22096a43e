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
# slicer-core and import-linter have no Python 3.9 wheels, so the tests that need them
# (test_slicer_*, test_front_ends_agree, test_architecture, test_interop) run on the main stack
# only, like the fault injection (process kills and signals: the same on every Python; 2 minutes).
setup-slicer58: $(ENVIRONMENT)
	$(PY) -m pip install --quiet -r requirements-slicer58.txt

test-slicer58: setup-slicer58
	$(PY) -m pytest -q Testing/Python --ignore-glob='*/test_slicer_*.py' \
		--ignore=Testing/Python/test_front_ends_agree.py --ignore=Testing/Python/test_architecture.py \
		--ignore=Testing/Python/test_interop.py --ignore=Testing/Python/test_fault_injection.py

bench: setup
	$(PY) benchmarks/bench_pipeline.py --threads 2 --save-results
