#!/usr/bin/env bash
# ducktors' turborepo-remote-cache (npm) with local storage, in the foreground.
# Usage: run-turborepo-remote-cache.sh PORT DATA_DIR TOKEN
# API (Vercel remote cache v8); a team is REQUIRED as ?teamId= / ?team= / ?slug=:
#   PUT  /v8/artifacts/<hash>?teamId=T  (Content-Type: application/octet-stream) -> 200 {"urls":[...]}
#   GET  /v8/artifacts/<hash>?teamId=T  -> 200 body | 404
#   HEAD /v8/artifacts/<hash>?teamId=T;  GET /v8/artifacts/status (health)
# Header: Authorization: Bearer TOKEN. Files land in DATA_DIR/<team>/<hash>.
# PUT bodies are buffered in memory; BODY_LIMIT (bytes) defaults to 100 MiB.
# Env: TURBO_PREFIX (install prefix, default /tmp/nip-bench-turbo),
#      TURBO_VERSION (default 2.12.0), LOG_LEVEL (default warn: no per-request logs).
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 PORT DATA_DIR TOKEN" >&2
  exit 2
fi
PORT=$1
DATA_DIR=$2
TOKEN=$3
PREFIX=${TURBO_PREFIX:-/tmp/nip-bench-turbo}
VERSION=${TURBO_VERSION:-2.12.0}
CLI=$PREFIX/node_modules/turborepo-remote-cache/dist/cli.js

mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)

# Install into a private prefix if missing (needs node >= 20).
if [ ! -f "$CLI" ]; then
  mkdir -p "$PREFIX"
  npm install --prefix "$PREFIX" --no-audit --no-fund "turborepo-remote-cache@$VERSION" >&2
fi

export NODE_ENV=production
export HOST=127.0.0.1
export PORT
export STORAGE_PROVIDER=local
export STORAGE_PATH="$DATA_DIR"
# Without this the path is taken relative to os.tmpdir().
export STORAGE_PATH_USE_TMP_FOLDER=false
export TURBO_TOKEN="$TOKEN"
export LOG_LEVEL=${LOG_LEVEL:-warn}
export BODY_LIMIT=${BODY_LIMIT:-104857600}
exec node "$CLI"
