# Every target bootstraps .venv when it is missing or older than pyproject.toml,
# so a fresh machine with only Python 3.11 and make needs nothing else.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

up: $(STAMP)  ## run the whole system: embedded NATS server, topology, actors, demo
	$(BIN)/hms up --demo

test: lint  ## lint, type check, then the whole test suite against a real nats-server
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)  ## benchmarks; print their figures
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/worker_bench.py
	$(BIN)/python bench/e2e_bench.py
	$(BIN)/python bench/cluster_bench.py
	$(BIN)/python bench/timer_bench.py --schedules 200000
	$(BIN)/python bench/ledger_bench.py

clean:
	rm -rf $(VENV) .hms .mypy_cache .pytest_cache .ruff_cache
