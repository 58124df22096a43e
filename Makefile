# The two README commands. Both install what they need first (idempotent).
PYTHON ?= python3

.PHONY: setup demo test bench

setup:
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .

demo: setup
	$(PYTHON) -m EOIRRegistrationLib demo --output-dir eoir-demo-output --overwrite

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q Testing/Python

bench: setup
	$(PYTHON) benchmarks/bench_pipeline.py --threads 2 --save-results
