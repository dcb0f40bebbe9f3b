"""Build the pinned Kubernetes test tools from the Go module proxy and link them into .tools/bin.

Binaries are cached by version outside the repository (KVOPS_TOOLS_CACHE, default
~/.cache/kvops/tools/<tool>-<version>), so only the first run on a machine compiles anything.

k8s.io/kubernetes and etcd's server cannot be `go install`ed: their go.mod files replace their
sibling modules with local folders (k8s.io/api => ./staging/src/k8s.io/api, ...). They are built
from a small wrapper module that requires the upstream module and replaces each of those siblings
with its published version; the replace list is read from upstream's own go.mod, because it
changes between releases.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = "v1.37.2"
ETCD_VERSION = "v3.7.3"
HELM_VERSION = "v3.22.0"
KWOK_VERSION = "v0.8.0"
# The real node's runtime and volume provisioner; runc and the CNI plugins come from Debian.
CONTAINERD_VERSION = "v2.4.2"
LOCAL_PATH_PROVISIONER_VERSION = "v0.0.30"
# The real node's cluster DNS (v1.15 needs Go >= 1.26).
COREDNS_VERSION = "v1.15.0"
# Validates the Helm chart's rendered objects against schemas made from the control plane's own
# OpenAPI (e2e/test_helm_chart.py).
KUBECONFORM_VERSION = "v0.8.0"
# Serves the worker pods' Prometheus gauges as custom.metrics.k8s.io to the HPA controller
# (e2e/test_autoscaling_real_node.py).
PROMETHEUS_ADAPTER_VERSION = "v0.12.0"

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN_DIR = REPO_ROOT / ".tools" / "bin"
DEFAULT_CACHE = Path.home() / ".cache" / "kvops" / "tools"


@dataclass
class ToolGroup:
    """Binaries built together from one upstream module at one version."""

    module: str
    version: str
    binaries: dict[str, str]  # binary name -> Go package path
    # version that replaces each locally-replaced sibling module; None: plain `go install`
    sibling_version: str | None = None
    ldflags: list[str] = field(default_factory=list)
    # Built from a module that requires it rather than by `go install`, which also reads the
    # module's version list (for deprecations) and fails where the proxy refuses that list.
    wrapped: bool = False


def kubernetes_ldflags(version: str) -> list[str]:
    # Without these /version and `kubectl version` say v0.0.0-master, which breaks Helm kubeVersion.
    major, minor = version.lstrip("v").split(".")[:2]
    build_date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    flags = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        for name, value in (
            ("gitVersion", version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
            ("buildDate", build_date),
        ):
            flags.append(f"-X {package}.{name}={value}")
    return flags


def tool_groups() -> list[ToolGroup]:
    kube_minor_patch = KUBERNETES_VERSION.lstrip("v").split(".", 1)[1]
    return [
        ToolGroup(
            module="k8s.io/kubernetes",
            version=KUBERNETES_VERSION,
            binaries={
                name: f"k8s.io/kubernetes/cmd/{name}"
                for name in (
                    "kube-apiserver",
                    "kube-controller-manager",
                    "kube-scheduler",
                    "kubectl",
                    "kubelet",
                    "kube-proxy",
                )
            },
            sibling_version=f"v0.{kube_minor_patch}",
            ldflags=kubernetes_ldflags(KUBERNETES_VERSION),
        ),
        ToolGroup(
            module="go.etcd.io/etcd/server/v3",
            version=ETCD_VERSION,
            binaries={"etcd": "go.etcd.io/etcd/server/v3"},
            sibling_version=ETCD_VERSION,
        ),
        ToolGroup(
            module="helm.sh/helm/v3",
            version=HELM_VERSION,
            binaries={"helm": "helm.sh/helm/v3/cmd/helm"},
            ldflags=[f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"],
        ),
        ToolGroup(
            module="sigs.k8s.io/kwok",
            version=KWOK_VERSION,
            binaries={"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
        ),
        ToolGroup(
            module="github.com/containerd/containerd/v2",
            version=CONTAINERD_VERSION,
            binaries={
                name: f"github.com/containerd/containerd/v2/cmd/{name}"
                for name in ("containerd", "containerd-shim-runc-v2", "ctr")
            },
            # Builds with CGO_ENABLED=0: that only leaves out the btrfs snapshotter (overlayfs
            # is used) and containerd applies seccomp profiles without libseccomp.
            ldflags=[
                f"-X github.com/containerd/containerd/v2/version.Version={CONTAINERD_VERSION}"
            ],
        ),
        ToolGroup(
            module="github.com/rancher/local-path-provisioner",
            version=LOCAL_PATH_PROVISIONER_VERSION,
            binaries={"local-path-provisioner": "github.com/rancher/local-path-provisioner"},
        ),
        ToolGroup(
            module="github.com/coredns/coredns",
            version=COREDNS_VERSION,
            binaries={"coredns": "github.com/coredns/coredns"},
        ),
        ToolGroup(
            module="github.com/yannh/kubeconform",
            version=KUBECONFORM_VERSION,
            binaries={"kubeconform": "github.com/yannh/kubeconform/cmd/kubeconform"},
        ),
        ToolGroup(
            module="sigs.k8s.io/prometheus-adapter",
            version=PROMETHEUS_ADAPTER_VERSION,
            binaries={"prometheus-adapter": "sigs.k8s.io/prometheus-adapter/cmd/adapter"},
            wrapped=True,
        ),
    ]


def run_go(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    print("+ go " + " ".join(args), flush=True)
    result = subprocess.run(
        ["go", *args], cwd=cwd, env=env, check=True, text=True, stdout=subprocess.PIPE
    )
    return result.stdout


def upstream_go_mod(group: ToolGroup, workdir: Path, env: dict[str, str]) -> str:
    out = run_go(
        ["list", "-m", "-f", "{{.GoMod}}", f"{group.module}@{group.version}"], workdir, env
    )
    return Path(out.strip()).read_text()


def wrapper_go_mod(group: ToolGroup, upstream: str) -> str:
    """go.mod of a module that builds `group`'s binaries with published sibling modules."""
    # A dependency's go and godebug lines do not apply to the main module: copy them.
    directives = re.findall(r"^(?:go|godebug) .+$", upstream, flags=re.MULTILINE)
    local_replaces = re.findall(r"^\s*(\S+)\s*=>\s*\.{1,2}/\S*\s*$", upstream, flags=re.MULTILINE)
    if not local_replaces:
        raise SystemExit(f"{group.module}@{group.version}: no local replace lines in its go.mod")
    lines = ["module kvops.local/tools-wrapper", "", *directives, ""]
    lines.append(f"require {group.module} {group.version}")
    lines += ["", "replace ("]
    lines += [f"\t{module} => {module} {group.sibling_version}" for module in local_replaces]
    lines += [")", ""]
    return "\n".join(lines)


def build_group(group: ToolGroup, cache: Path) -> None:
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false -mod=mod")
    ldflags = " ".join(["-s", "-w", *group.ldflags])
    with tempfile.TemporaryDirectory(prefix="kvops-tools-") as tmp:
        workdir = Path(tmp)
        out_dir = workdir / "out"
        out_dir.mkdir()
        (workdir / "go.mod").write_text("module kvops.local/tools-wrapper\n")
        if group.sibling_version is None and not group.wrapped:
            for name, package in group.binaries.items():
                gobin_env = dict(env, GOBIN=str(out_dir))
                run_go(
                    ["install", "-trimpath", "-ldflags", ldflags, f"{package}@{group.version}"],
                    workdir,
                    gobin_env,
                )
                produced = out_dir / package.rsplit("/", 1)[-1]
                produced.rename(out_dir / name)
        else:
            go_mod = (
                wrapper_go_mod(group, upstream_go_mod(group, workdir, env))
                if group.sibling_version
                else f"module kvops.local/tools-wrapper\n\nrequire {group.module} {group.version}\n"
            )
            (workdir / "go.mod").write_text(go_mod)
            imports = "\n".join(f'\t_ "{package}"' for package in group.binaries.values())
            (workdir / "tools.go").write_text(
                f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n"
            )
            run_go(["mod", "tidy"], workdir, env)
            for name, package in group.binaries.items():
                run_go(
                    ["build", "-trimpath", "-ldflags", ldflags, "-o", str(out_dir / name), package],
                    workdir,
                    env,
                )
        for name in group.binaries:
            os.replace(out_dir / name, cache / f"{name}-{group.version}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=Path, default=DEFAULT_BIN_DIR)
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("KVOPS_TOOLS_CACHE") or DEFAULT_CACHE)
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="BINARY",
        help="build and link only the groups holding these binaries (repeatable)",
    )
    args = parser.parse_args()
    if shutil.which("go") is None:
        raise SystemExit("build_tools: the `go` command is needed to build the test tools")
    args.cache.mkdir(parents=True, exist_ok=True)
    args.bin_dir.mkdir(parents=True, exist_ok=True)
    os.nice(10)  # a cold build takes long on few cores: leave room for everything else
    groups = [
        group
        for group in tool_groups()
        if not args.only or any(name in group.binaries for name in args.only)
    ]
    for group in groups:
        cached = [args.cache / f"{name}-{group.version}" for name in group.binaries]
        if not all(path.is_file() for path in cached):
            print(f"building {group.module}@{group.version} (cold builds take minutes)", flush=True)
            build_group(group, args.cache)
        for name, path in zip(group.binaries, cached, strict=True):
            link = args.bin_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(path)
    print(f"tools ready in {args.bin_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
