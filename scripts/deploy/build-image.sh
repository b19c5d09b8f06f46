#!/usr/bin/env bash
# Builds the CPU image offline and proves it runs: `make image`.
#
#   1. Debian's docker.io and debootstrap (apt), dockerd started by hand if none runs
#      (--bridge=none --iptables=false: builds and containers get no network at all);
#   2. a base image from debootstrap (bookworm minbase + python3, python3-venv), `docker import`ed
#      as collafuse-base:bookworm, because no image registry is reachable here;
#   3. a wheelhouse in docker/wheelhouse (pip wheel of the package, torch and every pinned
#      dependency, plus setuptools/wheel for the build backend);
#   4. docker build --network none with OFFLINE=1 and BASE_IMAGE=collafuse-base:bookworm;
#   5. a container with a read-only root filesystem, uid 10001, all capabilities dropped and no
#      network runs `collafuse coordinator`; the script waits for Docker's HEALTHCHECK to report
#      healthy. Where the coordinator command does not exist yet it falls back to proving the
#      image with `collafuse --help` and an import, and says so.
#
# Environment: IMAGE (default collafuse:<version>-cpu), KEEP_DOCKERD=1 to leave a dockerd this
# script started running, REBUILD_BASE=1 / REBUILD_WHEELS=1 to redo those steps, SKIP_BUILD=1 to
# only run step 5 on an image built before.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
IMAGE="${IMAGE:-collafuse:${VERSION}-cpu}"
BASE="${BASE_TAG:-collafuse-base:bookworm}"
WORK=".cache/image"
WHEELS="docker/wheelhouse"
DOCKER=/usr/bin/docker   # Debian's client, matching Debian's dockerd (a newer client may be on PATH)
PY="${PYTHON:-/usr/bin/python3}"
log() { printf '[image] %s\n' "$*"; }
mkdir -p "$WORK"

# 1. tools ------------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
STARTED_DOCKERD=""
if ! "$DOCKER" info >/dev/null 2>&1; then
  log "starting dockerd (log: $WORK/dockerd.log)"
  dockerd --bridge=none --iptables=false --ip6tables=false --storage-driver=overlay2 \
    --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; exit 1; }
fi
CID=""
cleanup() {
  [ -n "$CID" ] && "$DOCKER" rm -f "$CID" >/dev/null 2>&1 || true
  if [ -n "$STARTED_DOCKERD" ] && [ "${KEEP_DOCKERD:-0}" != 1 ]; then
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    wait "$STARTED_DOCKERD" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
# 2. base image -------------------------------------------------------------------------------
if [ "${REBUILD_BASE:-0}" = 1 ] || ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  log "debootstrap bookworm minbase + python3 -> $BASE"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

# 3. wheelhouse -------------------------------------------------------------------------------
if [ "${REBUILD_WHEELS:-0}" = 1 ] || ! ls "$WHEELS"/torch-*.whl >/dev/null 2>&1; then
  log "pip wheel -> $WHEELS (python: $("$PY" --version))"
  rm -rf "$WORK/wheel-venv"
  "$PY" -m venv "$WORK/wheel-venv"
  "$WORK/wheel-venv/bin/pip" install -q --upgrade pip
  find "$WHEELS" -name '*.whl' -delete
  "$WORK/wheel-venv/bin/pip" wheel -q --wheel-dir "$WHEELS" -c constraints.txt torch==2.13.0 . \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  "$WORK/wheel-venv/bin/pip" download -q --dest "$WHEELS" --only-binary=:all: setuptools wheel \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  rm -f "$WHEELS"/collafuse-*.whl   # the image installs the package from source
fi
log "wheelhouse: $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"

# 4. build ------------------------------------------------------------------------------------
log "docker build -> $IMAGE"
start=$(date +%s)
"$DOCKER" build --network none -f docker/Dockerfile -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE" --build-arg OFFLINE=1 . >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; exit 1; }
log "built in $(( $(date +%s) - start )) s, size $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

fi

# 5. run and health check ---------------------------------------------------------------------
RUN=("$DOCKER" run --network none --read-only --tmpfs /tmp --tmpfs /var/lib/collafuse:uid=10001,gid=10001
     --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges)
"${RUN[@]}" --rm --entrypoint id "$IMAGE"
"${RUN[@]}" --rm "$IMAGE" --help >/dev/null
for cmd in coordinator "server serve" "server train" site; do
  # shellcheck disable=SC2086
  "${RUN[@]}" --rm "$IMAGE" $cmd --help >/dev/null 2>&1 && log "collafuse $cmd --help: ok" \
    || log "collafuse $cmd --help: not available in this package version"
done
"${RUN[@]}" --rm --entrypoint python3 "$IMAGE" -c \
  'import collafuse, torch; print("collafuse", collafuse.__name__, "torch", torch.__version__)'

# Docker's HEALTHCHECK on a running service. Until `collafuse coordinator` exists in the package,
# a stand-in /healthz server (standard library, same user and restrictions) proves the mechanism.
STANDIN=""
if "${RUN[@]}" --rm "$IMAGE" coordinator --help >/dev/null 2>&1; then
  cat >"$WORK/federation.json" <<'JSON'
{"T": 100, "schedule": "cosine", "client_fraction": 0.9, "image_shape": [1, 28, 28],
 "num_classes": 10, "sites": ["site-a"], "seed": 0}
JSON
  echo '{}' >"$WORK/site-tokens.json"
  chmod 0644 "$WORK/federation.json" "$WORK/site-tokens.json"
  CID=$("${RUN[@]}" -d \
    -v "$PWD/$WORK/federation.json:/etc/collafuse/config/federation.json:ro" \
    -v "$PWD/$WORK/site-tokens.json:/etc/collafuse/auth/site-tokens.json:ro" \
    -e COLLAFUSE_CONFIG=/etc/collafuse/config/federation.json \
    -e COLLAFUSE_SITE_TOKENS=/etc/collafuse/auth/site-tokens.json \
    -e COLLAFUSE_ADMIN_TOKEN=image-check-admin-token-0123456789 \
    -e COLLAFUSE_STORE=file:///var/lib/collafuse/store \
    "$IMAGE" coordinator --host 0.0.0.0 --port 8000)
else
  STANDIN=1
  log "'collafuse coordinator' is not in this package version yet: checking the HEALTHCHECK"
  log "against a stand-in /healthz server on port 8000 instead"
  CID=$("${RUN[@]}" -d --entrypoint python3 "$IMAGE" -c '
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404); self.end_headers()
http.server.HTTPServer(("0.0.0.0", 8000), H).serve_forever()')
fi
status=starting
for _ in $(seq 60); do
  status=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CID" 2>/dev/null || echo gone)
  [ "$status" = healthy ] || [ "$status" = unhealthy ] || [ "$status" = gone ] && break
  sleep 2
done
if [ "$status" != healthy ]; then
  log "container is '$status'; its log:"
  "$DOCKER" logs "$CID" 2>&1 | tail -30
  exit 1
fi
if [ -n "$STANDIN" ]; then
  log "RESULT: $IMAGE built; collafuse --help and imports run; HEALTHCHECK healthy against a"
  log "stand-in server (the coordinator command is not in the package yet)"
else
  log "RESULT: $IMAGE healthy: 'collafuse coordinator' answered GET /healthz to Docker's HEALTHCHECK"
fi
log "(read-only root fs, uid 10001, all capabilities dropped, no-new-privileges, no network)"
