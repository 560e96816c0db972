PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench venv clean format tools bench-tools proto

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $(STAMP)

# The main job: `wattmeter demo`, the whole pipeline on this machine (an aggregator, an agent on this host's real
# sensors plus simulated GPUs, a synthetic inference server and training job on them) with a live view of energy
# per GPU, phase and request; Ctrl-C stops it. ARGS="--duration 60 --data-dir DIR" and more: wattmeter demo --help.
run: venv
	$(BIN)/wattmeter demo $(ARGS)

tools:
	bash scripts/install-test-tools.sh

bench-tools:
	bash scripts/install-test-tools.sh --bench

test: venv tools
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check collector tests bench
	$(BIN)/ruff format --check collector tests bench
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format collector tests bench
	$(BIN)/ruff check --fix collector tests bench

bench: venv bench-tools
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Regenerate the committed gRPC/protobuf code; tests/test_proto.py fails when it is stale.
proto: venv
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. collector/proto/wattmeter.proto
