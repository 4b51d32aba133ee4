# The two commands of the README:
#   make run   installs what is missing, then runs every study at quick scale and prints the report
#   make test  installs what is missing, then runs ruff and the whole test suite
PYTHON ?= python3
OUT ?= studies_out
JOBS ?= 2

.PHONY: run test deps lint format bench gpu-check

deps:
	@PYTHON=$(PYTHON) bash scripts/ensure_deps.sh

run: deps
	$(PYTHON) -m normlab study all scale=quick jobs=$(JOBS) out=$(OUT)

test: deps lint
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

format:
	$(PYTHON) -m ruff check --fix src tests benchmarks
	$(PYTHON) -m ruff format src tests benchmarks

bench: deps
	$(PYTHON) -m pip install -q -e ".[bench]"
	for b in benchmarks/bench_*.py; do $(PYTHON) $$b || exit 1; done

# On a CUDA machine: every GPU-specific check in one table (about 5 minutes)
gpu-check: deps
	$(PYTHON) benchmarks/gpu_check.py
