# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: install run test lint typecheck pytest bench bench-tools bench-compare bench-profile clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start every service in one process on the plan's ports (SQLite + in-memory limits).
run: install
	$(BIN)/leaky-tokens up

## Lint, type-check and run the whole suite (PostgreSQL/Redis variants run when they answer).
test: install lint typecheck pytest

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

## Benchmarks (loopback only); figures are written to bench/results/.
bench: install bench-tools
	$(BIN)/python -m bench

## The load generator, Debian's wrk, installed when missing (root, or sudo when there is one).
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
bench-tools:
	@command -v wrk >/dev/null || $(SUDO) apt-get install -y -q wrk \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q wrk; }

## The bench's own venv: LiteLLM's proxy and py-spy, pinned with hashes (not project deps).
BENCH_VENV  := bench/.venv
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
$(BENCH_STAMP): bench/requirements-bench.lock
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --require-hashes --no-deps -r bench/requirements-bench.lock
	touch $(BENCH_STAMP)

## Leaky Tokens beside LiteLLM's proxy against one OpenAI-format stub: bench/results/compare.json.
bench-compare: install bench-tools $(BENCH_STAMP)
	$(BIN)/python -m bench.compare

## py-spy profile of the serving process under 32 connections: bench/results/profile-*.
bench-profile: install bench-tools $(BENCH_STAMP)
	$(BIN)/python -m bench.profile

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
