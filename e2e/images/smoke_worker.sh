#!/bin/bash
# Smoke check of the worker image as a pod runs it: runc, read-only root filesystem, tmpfs at
# /cache and /tmp, uid 10001, the host's network; serves the default model and asks it for a
# chat completion. Needs root and the image in the storage build_images.py uses.
#   e2e/images/smoke_worker.sh [image] [http port]
set -euo pipefail
IMAGE=${1:-ghcr.io/kvops/kvops-worker:0.1.0}
PORT=${2:-18000}
CACHE=${KVOPS_IMAGES_CACHE:-$HOME/.cache/kvops/images}
B=(buildah --root="$CACHE/buildah/overlay" --runroot=/run/kvops-buildah-overlay --storage-driver=overlay)
BUNDLE=$(mktemp -d)
NAME=kvops-smoke-$$
CONTAINER=$("${B[@]}" from --pull-never "$IMAGE")
cleanup() {
  runc kill "$NAME" KILL 2>/dev/null || true; sleep 1; runc delete -f "$NAME" 2>/dev/null || true
  "${B[@]}" umount "$CONTAINER" >/dev/null; "${B[@]}" rm "$CONTAINER" >/dev/null; rm -rf "$BUNDLE"
}
trap cleanup EXIT
ROOTFS=$("${B[@]}" mount "$CONTAINER")
# The image's environment, then an OCI runtime config shaped like the operator's pod.
"${B[@]}" inspect --format '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' "$IMAGE" >"$BUNDLE/env"
(cd "$BUNDLE" && runc spec)
python3 - "$BUNDLE" "$ROOTFS" "$PORT" <<'PY'
import json, sys
bundle, rootfs, port = sys.argv[1], sys.argv[2], sys.argv[3]
config = json.load(open(f"{bundle}/config.json"))
config["root"] = {"path": rootfs, "readonly": True}
config["process"].update(
    terminal=False, cwd="/cache", user={"uid": 10001, "gid": 10001},
    env=[line for line in open(f"{bundle}/env").read().splitlines() if line],
    args=["kvops", "serve", "--host", "127.0.0.1", "--http-port", port,
          "--grpc-port", str(int(port) + 1)],
)
tmpfs = ["nosuid", "nodev", "mode=1777"]
config["mounts"] += [
    {"destination": d, "type": "tmpfs", "source": "tmpfs", "options": tmpfs}
    for d in ("/cache", "/tmp")
]
config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
json.dump(config, open(f"{bundle}/config.json", "w"))
PY
runc run --bundle "$BUNDLE" "$NAME" >"$BUNDLE/log" 2>&1 &
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/v1/models"; echo
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is a paged KV cache?"}], "max_tokens": 24}'
echo
echo "== files written (all under /cache and /tmp: the root is read-only)"
runc exec "$NAME" find /cache /tmp -mindepth 1 -maxdepth 3
echo "== worker log"
cat "$BUNDLE/log"
grep -q "prebuilt for" "$BUNDLE/log"
