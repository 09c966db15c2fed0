# Conveyor's only entry point. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.DEFAULT_GOAL := help
.PHONY: help install dev test test-processes lint typecheck proto proto-check bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## Create .venv with Conveyor and its development tools

dev: $(STAMP)  ## Run Conveyor locally: embedded PostgreSQL, a server and a demo worker
	$(BIN)/conveyor dev

# The suite waits on processes, sockets and clocks far more than it computes: run in one
# process it kept a third of one core busy. So it runs in 4 processes even on 2 cores (10:26
# in one process, 4:05 in 4), each file whole in one of them, so a file's shared fixtures
# start once and its tests keep their order. TEST_PROCESSES=0 runs everything in this one.
TEST_PROCESSES ?= 4

test-processes:  # for .ci/run, whose PostgreSQL 15 pass runs in as many
	@echo $(TEST_PROCESSES)

test: $(STAMP)  ## Run the whole test suite: lint, types, generated code, every test
	$(MAKE) --no-print-directory lint typecheck
	$(BIN)/pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)  ## mypy --strict on src
	$(BIN)/mypy src

proto: $(STAMP)  ## Regenerate the protobuf and gRPC code from the .proto files
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --grpc_python_out=src \
		--mypy_out=src --mypy_grpc_out=src src/conveyor/protocol/v1/conveyor.proto

proto-check: $(STAMP)  ## Fail if the committed generated code is stale
	$(BIN)/python -m pytest -q tests/unit/test_protocol_generated.py

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## Benchmark Conveyor against its peers (BENCH_ARGS=--quick for a smoke run)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:  ## Remove the virtualenv and caches (keeps .conveyor/ data)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
