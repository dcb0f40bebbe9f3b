"""The VectorIndex's build-then-serve cycle against a real control plane with kwok's fake nodes:
the operator (a subprocess under its own Role) applies claims, Jobs and the search Deployment;
the real kube-controller-manager binds claims, runs the Job and Deployment controllers.

kwok runs no container, so the test plays the parts it cannot see: a provisioner (a volume
pre-bound to each build's claim) and the kubelet finishing a build pod (pod status with a
terminated container and the termination message `kvops index build` writes; the real Job
controller then completes or fails the Job). What kwok cannot show — the build writing its
directory, the search server opening it, its /ready probe gating the pod — e2e/test_real_pods.py
covers on the real node.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from kube_helpers import install_crds, terminate_pod
from test_operator_cluster import Kube, operator_under_its_role

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FIGURES = {"documents": 2, "chunks": 3, "dimension": 384, "seconds": 0.4}


@pytest.fixture(scope="module")
def namespace(kube_cluster) -> str:
    name = f"kvops-vidx-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    install_crds(kube_cluster)
    yield name
    kube_cluster.kubectl("delete", "pv", "-l", f"kvops-e2e/namespace={name}", "--wait=false")


@pytest.fixture(scope="module")
def operator(kube_cluster, namespace, tmp_path_factory):
    with operator_under_its_role(
        kube_cluster, namespace, tmp_path_factory.mktemp("operator")
    ) as process:
        yield process


@pytest.fixture
def kube(kube_cluster, namespace, operator) -> Kube:
    return Kube(kube_cluster, namespace, operator)


def vector_index(name: str, **spec: Any) -> dict[str, Any]:
    documents = [{"id": "kv", "text": "Blocks of KV cache."}, {"id": "pv", "text": "Labels."}]
    return {
        "apiVersion": "kvops.io/v1alpha1",
        "kind": "VectorIndex",
        "metadata": {"name": name},
        "spec": {"source": {"documents": documents}, **spec},
    }


def wanted_build(kube: Kube, name: str, other_than: str | None = None) -> str:
    """The build the spec asks for, once the operator reported it."""

    def build():
        found = kube.status("vidx", name).get("buildHash")
        return found if found and found != other_than else None

    return kube.wait(f"vidx/{name}'s build", build)


def provision(kube: Kube, name: str, build: str) -> None:
    """Play a provisioner: a volume pre-bound to the build's claim."""
    claim = f"{name}-index-{build}"
    kube.cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {
                    "name": f"{kube.namespace}-{claim}",
                    "labels": {"kvops-e2e/namespace": kube.namespace},
                },
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "hostPath": {"path": f"/tmp/kvops-e2e/{claim}"},
                    "claimRef": {"namespace": kube.namespace, "name": claim},
                },
            }
        ),
    )


def build_pod(kube: Kube, build: str) -> dict[str, Any]:
    """The build's pod, once it runs (its claim bound, kwok started it)."""

    def running():
        pods = kube.items("pods", f"kvops.io/build-hash={build},job-name")
        return next((p for p in pods if p["status"].get("phase") == "Running"), None)

    return kube.wait(f"build {build}'s pod running", running)


def search_deployment(kube: Kube, name: str) -> dict[str, Any] | None:
    return kube.get("deployment", f"{name}-search")


def served_directory(kube: Kube, name: str) -> str | None:
    deployment = search_deployment(kube, name)
    if deployment is None:
        return None
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index("--index") + 1]


def conditions(kube: Kube, name: str) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in kube.status("vidx", name).get("conditions", [])}


def degraded(kube: Kube, name: str) -> dict[str, Any]:
    """The Degraded condition, once it is True."""

    def condition():
        found = conditions(kube, name).get("Degraded")
        return found if found and found["status"] == "True" else None

    return kube.wait(f"vidx/{name} Degraded", condition)


def wait_served(kube: Kube, name: str, build: str) -> dict[str, Any]:
    def served():
        status = kube.status("vidx", name)
        return (
            status
            if status.get("servedBuild") == build and status.get("phase") == "Ready"
            else None
        )

    return kube.wait(f"vidx/{name} Ready serving build {build}", served)


def build_and_serve(kube: Kube, name: str, other_than: str | None = None) -> str:
    build = wanted_build(kube, name, other_than)
    provision(kube, name, build)
    terminate_pod(kube, build_pod(kube, build), 0, json.dumps(FIGURES))
    wait_served(kube, name, build)
    return build


def rechunk(kube: Kube, name: str, size: int) -> None:
    patch = {"spec": {"chunking": {"size": size, "overlap": 8}}}
    kube("patch", "vidx", name, "--type=merge", "-p", json.dumps(patch))


def test_the_first_build_gates_search(kube):
    kube.apply(vector_index("gate"))
    build = wanted_build(kube, "gate")
    provision(kube, "gate", build)
    pod = build_pod(kube, build)
    kube.wait("vidx/gate Building", lambda: kube.status("vidx", "gate").get("phase") == "Building")
    # The Service exists from the start; no search pod opens an index that is not built.
    assert kube.get("service", "gate-search") is not None
    assert search_deployment(kube, "gate") is None
    assert conditions(kube, "gate")["Ready"]["status"] == "False"

    terminate_pod(kube, pod, 0, json.dumps(FIGURES))
    status = wait_served(kube, "gate", build)
    assert served_directory(kube, "gate") == f"/index/{build}"
    assert (status["documents"], status["chunks"], status["dimension"]) == (2, 3, 384)
    assert status["readyReplicas"] == 1
    assert status["endpoint"] == f"gate-search.{kube.namespace}.svc:50051"
    assert conditions(kube, "gate")["Ready"]["status"] == "True"
    # The finished Job is no longer needed: what is served is recorded on the Deployment.
    kube.wait(
        "the served build's Job dropped",
        lambda: not kube.items("jobs", "kvops.io/vectorindex=gate"),
    )


def test_a_rebuild_serves_the_old_build_until_it_succeeds(kube):
    kube.apply(vector_index("rebuild"))
    first = build_and_serve(kube, "rebuild")

    rechunk(kube, "rebuild", 64)
    failing = wanted_build(kube, "rebuild", other_than=first)
    provision(kube, "rebuild", failing)
    pod = build_pod(kube, failing)
    progressing = kube.wait(
        "a Building indication",
        lambda: (c := conditions(kube, "rebuild")["Progressing"])["reason"] == "Building" and c,
    )
    assert progressing["status"] == "True"
    status = kube.status("vidx", "rebuild")
    assert (status["phase"], status["servedBuild"]) == ("Ready", first)
    assert served_directory(kube, "rebuild") == f"/index/{first}"

    error = "Traceback (most recent call last):\nValueError: no documents in /source"
    terminate_pod(kube, pod, 1, error)
    failure = degraded(kube, "rebuild")
    assert failure["reason"] == "BuildFailed"
    assert failing in failure["message"] and "no documents in /source" in failure["message"]
    status = kube.status("vidx", "rebuild")
    assert (status["phase"], status["servedBuild"]) == ("Degraded", first)
    assert conditions(kube, "rebuild")["Ready"]["status"] == "True"  # the old build answers
    assert served_directory(kube, "rebuild") == f"/index/{first}"
    assert "BuildFailed" in kube("get", "events", "--field-selector", "involvedObject.name=rebuild")

    # A fixed spec builds anew; the failed build's Job and claim go, then the first build's claim.
    rechunk(kube, "rebuild", 96)
    fixed = build_and_serve(kube, "rebuild", other_than=failing)
    assert served_directory(kube, "rebuild") == f"/index/{fixed}"
    assert conditions(kube, "rebuild")["Degraded"]["status"] == "False"

    def claims():
        return {c["metadata"]["name"] for c in kube.items("pvc", "kvops.io/vectorindex=rebuild")}

    kube.wait("only the served build's claim left", lambda: claims() == {f"rebuild-index-{fixed}"})
    assert kube.items("jobs", "kvops.io/vectorindex=rebuild") == []


def test_an_image_change_builds_anew_and_drops_a_superseded_running_job(kube):
    kube.apply(vector_index("images"))
    first = build_and_serve(kube, "images")

    def image(tag: str) -> None:
        patch = {"spec": {"image": f"registry.example/kvops-worker:{tag}"}}
        kube("patch", "vidx", "images", "--type=merge", "-p", json.dumps(patch))

    image("0.2.0")
    superseded = wanted_build(kube, "images", other_than=first)
    provision(kube, "images", superseded)
    build_pod(kube, superseded)
    image("0.3.0")
    latest = wanted_build(kube, "images", other_than=superseded)
    kube.wait(
        "the superseded running Job deleted",
        lambda: kube.get("job", f"images-build-{superseded}") is None,
    )
    [job] = kube.items("jobs", "kvops.io/vectorindex=images")
    assert job["metadata"]["name"] == f"images-build-{latest}"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.3.0")
    # Search runs the image that built what it serves until the new build succeeded.
    deployment = search_deployment(kube, "images")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0")

    provision(kube, "images", latest)
    terminate_pod(kube, build_pod(kube, latest), 0, json.dumps(FIGURES))
    wait_served(kube, "images", latest)
    deployment = search_deployment(kube, "images")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.3.0")


def test_a_source_config_map_is_awaited_and_its_edits_build_anew(kube):
    obj = vector_index("from-files")
    obj["spec"]["source"] = {"configMap": {"name": "handbook"}}
    kube.apply(obj)
    missing = degraded(kube, "from-files")
    assert missing["reason"] == "SourceNotFound" and "handbook" in missing["message"]
    assert kube.items("jobs", "kvops.io/vectorindex=from-files") == []

    def handbook(text: str) -> None:
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "handbook"}}
        kube.apply({**config_map, "data": {"kv-cache.md": text}})

    handbook("The KV cache lives in fixed-size blocks.")
    first = build_and_serve(kube, "from-files")
    handbook("The KV cache lives in fixed-size blocks of 16 tokens.")
    edited = build_and_serve(kube, "from-files", other_than=first)
    assert served_directory(kube, "from-files") == f"/index/{edited}"
