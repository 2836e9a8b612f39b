#!/usr/bin/env bash
# The plain Flask reference of the /v1 artifact API (flask_reference.py) under gunicorn, in the
# foreground (exec: the PID of this script is the gunicorn master; stop it with `kill PID`).
# Workers: (2 × CPUs) + 1 sync workers, gunicorn's documented recommendation, so the peer is
# deployed as its docs say rather than weakened.
# Venv: $NIP_BENCH_VENV (default /tmp/nip-bench-venv) with flask and gunicorn, made when missing.
# Usage: run-flask-reference.sh PORT DATA_DIR TOKEN
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 PORT DATA_DIR TOKEN" >&2
  exit 2
fi
PORT=$1
DATA_DIR=$2
TOKEN=$3
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${NIP_BENCH_VENV:-/tmp/nip-bench-venv}

mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)

if [ ! -x "$VENV/bin/gunicorn" ] || ! "$VENV/bin/python" -c 'import flask' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'flask>=3,<4' gunicorn >&2
fi

export DATA_DIR TOKEN
cd "$HERE"
# Long timeout so big uploads are not killed.
exec "$VENV/bin/gunicorn" --workers $((2 * $(nproc) + 1)) --worker-class sync --timeout 600 \
  --bind "127.0.0.1:$PORT" --log-level warning flask_reference:app
