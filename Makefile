# The two README commands. Both install what they need first (idempotent).
PYTHON ?= python3

.PHONY: setup demo test bench setup-slicer58 test-slicer58

setup:
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .

demo: setup
	$(PYTHON) -m EOIRRegistrationLib demo --output-dir eoir-demo-output --overwrite

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q Testing/Python

# Slicer 5.8's stack (Python 3.9, numpy 1.26, torch 2.8): the engine and command-line tests.
# slicer-core and import-linter have no Python 3.9 wheels, so the tests that need them
# (test_slicer_*, test_front_ends_agree, test_architecture, test_interop) run on the main stack
# only, like the fault injection (process kills and signals: the same on every Python; 2 minutes).
setup-slicer58:
	$(PYTHON) -m pip install --quiet -r requirements-slicer58.txt

test-slicer58: setup-slicer58
	$(PYTHON) -m pytest -q Testing/Python --ignore-glob='*/test_slicer_*.py' \
		--ignore=Testing/Python/test_front_ends_agree.py --ignore=Testing/Python/test_architecture.py \
		--ignore=Testing/Python/test_interop.py --ignore=Testing/Python/test_fault_injection.py

bench: setup
	$(PYTHON) benchmarks/bench_pipeline.py --threads 2 --save-results
