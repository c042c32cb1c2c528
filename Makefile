# Two commands for a fresh Linux machine with Python 3.11+:
#   make run    creates .venv, installs Bascule, runs the demo (3 backends + Bascule)
#   make test   installs dev dependencies and what the tests need, runs the suite
# Also: make lint (ruff + mypy --strict), make bench (wrk vs nginx/HAProxy),
# make bench-discovery (Consul at catalog scale).

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	&& { echo $$p; break; }; done)

.PHONY: run test test-fast lint bench bench-discovery clean

$(BIN)/bascule: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Bascule needs Python 3.11 or newer (python3.11+ on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.dev: $(BIN)/bascule
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

run: $(BIN)/bascule
	$(BIN)/bascule demo

test: $(VENV)/.dev
	@scripts/ensure-system-packages.sh test
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/mypy proxy strategies plugins

bench: $(VENV)/.dev
	@scripts/ensure-system-packages.sh bench
	$(BIN)/python bench/run.py

bench-discovery: $(VENV)/.dev
	$(BIN)/python bench/discovery_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
