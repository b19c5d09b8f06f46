#!/usr/bin/env bash
# Installs npm's s3rver (a small S3 server that, unlike moto, checks credentials) into a
# project-local folder for the store tests, and optionally starts it on loopback.
#
#   scripts/s3rver.sh install          # idempotent; prints the path of the s3rver binary
#   scripts/s3rver.sh start DIR PORT   # runs it in the foreground on 127.0.0.1:PORT
#
# The tests find it at .cache/node/node_modules/.bin/s3rver (or $COLLAFUSE_S3RVER, or on
# PATH) and start their own instance; credentials are s3rver's defaults, S3RVER/S3RVER.
set -euo pipefail

S3RVER_VERSION="${S3RVER_VERSION:-3.7.1}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX="${S3RVER_PREFIX:-$ROOT/.cache/node}"
BIN="$PREFIX/node_modules/.bin/s3rver"

log() { printf '[s3rver] %s\n' "$*" >&2; }

install() {
  if [ -x "$BIN" ] && [ "$("$BIN" --version 2>/dev/null)" = "$S3RVER_VERSION" ]; then
    echo "$BIN"
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    log "npm not found: install Node.js and npm (Debian: apt-get install nodejs npm)"
    return 1
  fi
  log "npm install s3rver@$S3RVER_VERSION into $PREFIX"
  mkdir -p "$PREFIX"
  npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error "s3rver@$S3RVER_VERSION" >&2
  echo "$BIN"
}

start() {
  local dir="${1:?usage: s3rver.sh start DIR PORT}" port="${2:?usage: s3rver.sh start DIR PORT}"
  install >/dev/null
  mkdir -p "$dir"
  exec "$BIN" --directory "$dir" --address 127.0.0.1 --port "$port" --silent
}

case "${1:-install}" in
  install) install ;;
  start) shift; start "$@" ;;
  *) log "unknown command ${1}; want install or start"; exit 2 ;;
esac
