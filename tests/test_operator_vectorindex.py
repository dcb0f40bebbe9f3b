"""The VectorIndex's pure parts: which children each state of the build renders, which are
dropped, and how the status reads (no cluster; e2e/test_vectorindex_cluster.py runs them)."""

from __future__ import annotations

import json

from kvops.operator import contract, vectorindex
from kvops.operator.api import VectorIndexSpec
from kvops.operator.diagnosis import Problem
from kvops.operator.vectorindex import Build

SPEC = {
    "source": {"documents": [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}]},
    "chunking": {"size": 128, "overlap": 16},
}
OWNER = {
    "apiVersion": "kvops.io/v1alpha1",
    "kind": "VectorIndex",
    "metadata": {"name": "docs", "namespace": "team", "uid": "uid-1", "generation": 3},
    "spec": SPEC,
}


def spec_with(**changes) -> VectorIndexSpec:
    return VectorIndexSpec.model_validate({**SPEC, **changes})


def rendered(spec: VectorIndexSpec, served: Build | None) -> list[dict]:
    return vectorindex.render(OWNER, spec, vectorindex.build_hash(spec), served)


def status(spec: VectorIndexSpec, *args, **kwargs) -> dict:
    return vectorindex.render_status(OWNER, spec, vectorindex.build_hash(spec), *args, **kwargs)


def by_kind(children: list[dict]) -> dict[str, dict]:
    return {child["kind"]: child for child in children}


def container(child: dict) -> dict:
    return child["spec"]["template"]["spec"]["containers"][0]


def built(spec: VectorIndexSpec, chunks: int = 5) -> Build:
    times = {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:00:30Z"}
    figures = {"documents": 2, "chunks": chunks, "dimension": 384}
    build = vectorindex.build_hash(spec)
    return vectorindex.finished_build(spec, build, {"status": times}, figures)


def test_the_first_build_renders_no_search_deployment():
    spec = spec_with()
    build = vectorindex.build_hash(spec)
    children = rendered(spec, None)
    assert {(c["kind"], c["metadata"]["name"]) for c in children} == {
        ("PersistentVolumeClaim", f"docs-index-{build}"),
        ("ConfigMap", "docs-documents"),
        ("Job", f"docs-build-{build}"),
        ("Service", "docs-search"),
    }
    kinds = by_kind(children)
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    args = container(kinds["Job"])["args"]
    assert args[args.index("--output") + 1] == f"/index/{build}"
    assert args[args.index("--chunk-size") + 1] == "128"
    assert args[args.index("--termination-log") + 1] == "/dev/termination-log"
    volumes = kinds["Job"]["spec"]["template"]["spec"]["volumes"]
    claim = {"claimName": f"docs-index-{build}"}
    assert {"name": "index", "persistentVolumeClaim": claim} in volumes


def test_everything_a_build_job_depends_on_names_it_but_replicas_do_not():
    spec = spec_with()
    job_name = by_kind(rendered(spec, None))["Job"]["metadata"]["name"]
    for change in [
        {"chunking": {"size": 256, "overlap": 16}},
        {"image": "registry.example/kvops-worker:0.2.0"},
        {"imagePullPolicy": "Always"},
        {"storage": {"size": "2Gi"}},
        {"storage": {"accessMode": "ReadWriteMany"}},
    ]:
        other = rendered(spec_with(**change), None)
        assert by_kind(other)["Job"]["metadata"]["name"] != job_name, change
    scaled = rendered(spec_with(replicas=3), None)
    assert by_kind(scaled)["Job"]["metadata"]["name"] == job_name


def test_a_source_config_maps_content_is_part_of_the_build():
    spec = spec_with(source={"configMap": {"name": "docs"}})
    config_map = {"metadata": {"name": "docs"}, "data": {"a.md": "alpha"}}
    build = vectorindex.build_hash(spec, vectorindex.config_map_content(config_map))
    edited = {**config_map, "data": {"a.md": "alpha, edited"}}
    assert vectorindex.build_hash(spec, vectorindex.config_map_content(edited)) != build
    relabelled = {"metadata": {"name": "docs", "labels": {"team": "x"}}, "data": config_map["data"]}
    assert vectorindex.build_hash(spec, vectorindex.config_map_content(relabelled)) == build
    job = by_kind(vectorindex.render(OWNER, spec, build, None))["Job"]
    assert job["metadata"]["name"] == f"docs-build-{build}"
    volumes = job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "source", "configMap": {"name": "docs"}} in volumes


def test_search_serves_the_finished_build_while_the_next_one_builds():
    old = spec_with()
    served = built(old)
    new = spec_with(chunking={"size": 64, "overlap": 8}, image="kvops-worker:next", replicas=2)
    kinds = by_kind(rendered(new, served))
    search = kinds["Deployment"]
    args = container(search)["args"]
    assert args[args.index("--index") + 1] == f"/index/{served.hash}"
    assert container(search)["image"] == old.image  # the image that built what is served
    assert search["spec"]["replicas"] == 2  # scaling does not wait for a build
    claim = search["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]
    assert claim == {"claimName": f"docs-index-{served.hash}", "readOnly": True}
    new_build = vectorindex.build_hash(new)
    assert kinds["Job"]["metadata"]["name"] == f"docs-build-{new_build}"
    assert container(kinds["Job"])["image"] == "kvops-worker:next"
    # The Deployment records what it serves: the next reconcile reads it back.
    assert Build.of_deployment(search) == served


def test_once_the_spec_build_is_served_no_job_is_rendered():
    spec = spec_with()
    kinds = by_kind(rendered(spec, built(spec)))
    assert "Job" not in kinds
    assert set(kinds) == {"PersistentVolumeClaim", "ConfigMap", "Service", "Deployment"}
    assert Build.of_deployment(None) is None
    assert Build.of_deployment({"metadata": {"annotations": {}}}) is None


def test_search_pods_follow_the_access_mode():
    together = by_kind(rendered(spec_with(), built(spec_with())))["Deployment"]
    affinity = together["spec"]["template"]["spec"]["affinity"]
    [term] = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    labels = together["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    many = spec_with(storage={"accessMode": "ReadWriteMany"})
    spread = by_kind(rendered(many, built(many)))["Deployment"]
    affinity = spread["spec"]["template"]["spec"]["affinity"]
    assert list(affinity) == ["podAntiAffinity"]
    strategy = spread["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}


def named(name: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "labels": labels}}


def test_superseded_jobs_and_claims_are_dropped_but_not_what_search_pods_mount():
    jobs = [named("docs-build-old"), named("docs-build-new"), named("docs-build-older")]
    claims = [named(f"docs-index-{build}") for build in ("old", "new", "older", "rolling")]
    search_pod = named("docs-search-x", **{"app.kubernetes.io/name": "kvops-index-search"})
    search_pod["metadata"]["labels"]["kvops.io/build-hash"] = "rolling"
    served = Build("old", "img", "IfNotPresent", "ReadWriteOnce")
    stale = vectorindex.stale_children("docs", "new", served, jobs, claims, [search_pod])
    assert sorted(stale) == [
        ("batch/v1", "Job", "docs-build-old"),
        ("batch/v1", "Job", "docs-build-older"),
        ("v1", "PersistentVolumeClaim", "docs-index-older"),
    ]
    # Once the new build is served its Job is done too; the old claim goes with its pods.
    now_served = Build("new", "img", "IfNotPresent", "ReadWriteOnce")
    stale = vectorindex.stale_children("docs", "new", now_served, jobs, claims, [])
    assert ("batch/v1", "Job", "docs-build-new") in stale
    assert ("v1", "PersistentVolumeClaim", "docs-index-old") in stale
    assert ("v1", "PersistentVolumeClaim", "docs-index-new") not in stale


def deployment(ready: int, replicas: int = 1) -> dict:
    status = {"readyReplicas": ready, "replicas": replicas, "updatedReplicas": replicas}
    return {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, **status}}


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_through_the_first_build():
    spec = spec_with()
    pending = status(spec, None, None, None)
    assert pending["phase"] == "Pending" and pending["servedBuild"] is None
    assert conditions(pending)["Ready"] == ("False", "NoBuild")
    running = {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}
    building = status(spec, running, None, None)
    assert building["phase"] == "Building" and building["documents"] is None
    assert conditions(building)["Progressing"] == ("True", "Building")
    served = built(spec)
    starting = status(spec, None, served, deployment(0))
    assert starting["phase"] == "Starting"  # the Job finished; nothing answers yet
    assert conditions(starting)["Ready"] == ("False", "NoReadyReplicas")
    ready = status(spec, None, served, deployment(1))
    assert ready["phase"] == "Ready" and conditions(ready)["Ready"][0] == "True"
    assert conditions(ready)["Progressing"] == ("False", "Served")
    assert (ready["servedBuild"], ready["buildHash"]) == (served.hash, served.hash)
    assert (ready["documents"], ready["chunks"], ready["dimension"]) == (2, 5, 384)
    assert ready["buildDurationSeconds"] == 30.0
    assert ready["endpoint"] == "docs-search.team.svc:50051"
    idle = status(spec_with(replicas=0), None, served, deployment(0, 0))
    assert idle["phase"] == "Built" and conditions(idle)["Ready"] == ("False", "NoReplicas")


def test_a_rebuild_keeps_ready_and_a_failed_one_says_why():
    served = built(spec_with())
    new = spec_with(chunking={"size": 64, "overlap": 8})
    running = {"status": {"active": 1, "startTime": "2026-01-01T01:00:00Z"}}
    rebuilding = status(new, running, served, deployment(1))
    assert rebuilding["phase"] == "Ready"
    assert conditions(rebuilding)["Ready"][0] == "True"
    assert conditions(rebuilding)["Progressing"] == ("True", "Building")
    assert rebuilding["servedBuild"] == served.hash != rebuilding["buildHash"]
    failed_job = {
        "metadata": {"labels": {"kvops.io/build-hash": rebuilding["buildHash"]}},
        "status": {
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "x"}
            ]
        },
    }
    pod = Problem("ContainerFailed", "pod p container build: exited with code 1: no documents")
    problem = vectorindex.build_failure(failed_job, pod)
    assert problem.reason == "BuildFailed"
    assert rebuilding["buildHash"] in problem.message and "no documents" in problem.message
    degraded = status(new, failed_job, served, deployment(1), problem)
    assert degraded["phase"] == "Degraded"
    assert conditions(degraded)["Ready"][0] == "True"  # the old build still answers
    assert conditions(degraded)["Degraded"] == ("True", "BuildFailed")
    assert degraded["chunks"] == served.chunks
    first = status(new, failed_job, None, None, problem)
    assert first["phase"] == "Failed" and conditions(first)["Ready"][0] == "False"


def test_the_build_figures_come_from_the_termination_message():
    message = json.dumps({"documents": 2, "chunks": 7, "dimension": 384, "seconds": 1.5})
    pods = [
        {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 1}}}]}},
        {
            "status": {
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 0, "message": message}}}
                ]
            }
        },
    ]
    assert vectorindex.build_result(pods)["chunks"] == 7
    assert vectorindex.build_result(pods[:1]) == {}


def test_the_rendered_containers_are_command_lines_kvops_accepts():
    spec = spec_with()
    children = rendered(spec, built(spec))
    children.append(by_kind(rendered(spec, None))["Job"])
    assert {c["name"] for c in contract.containers(children)} == {"build", "search"}
    assert contract.children_problem(children) is None
