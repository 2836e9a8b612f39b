#!/usr/bin/env bash
# One command for the benchmarks of issue 8: installs what is missing (apt: wrk, nginx, curl,
# python3-venv, nodejs/npm, zstd, xz-utils; a venv with flask, gunicorn and cryptography in /tmp/nip-bench-venv;
# turborepo-remote-cache from npm in /tmp/nip-bench-turbo), builds nip and the criterion benches
# (release), runs bench/run.py and writes BENCHMARKS.md + bench/results.json.
# Usage: bench/run.sh [--quick] [--only p1p2,p2b,p3,p4,p5,p6,p7,p9,criterion] (p9 needs Nix: scripts/nix-fixture/install-nix.sh)
# Full: about 8 minutes after the builds; --quick: under 2 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NIP_BENCH_VENV=${NIP_BENCH_VENV:-/tmp/nip-bench-venv}
export TURBO_PREFIX=${TURBO_PREFIX:-/tmp/nip-bench-turbo}

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v xz >/dev/null 2>&1 || need+=(xz-utils)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
export PATH=$PATH:/usr/sbin

if ! "$NIP_BENCH_VENV/bin/python" -c 'import flask, gunicorn, cryptography' 2>/dev/null; then
  python3 -m venv "$NIP_BENCH_VENV"
  "$NIP_BENCH_VENV/bin/pip" install -q 'flask>=3,<4' gunicorn cryptography >&2
fi
if [ ! -f "$TURBO_PREFIX/node_modules/turborepo-remote-cache/dist/cli.js" ]; then
  mkdir -p "$TURBO_PREFIX"
  npm install --prefix "$TURBO_PREFIX" --no-audit --no-fund "turborepo-remote-cache@${TURBO_VERSION:-2.12.0}" >&2
fi

nice cargo build --release --locked -p nip >&2
nice cargo bench --locked --no-run -p nip-core --bench core >&2
nice cargo bench --locked --no-run -p nip-client --bench cache_key >&2
target=${CARGO_TARGET_DIR:-target}
exec nice "$NIP_BENCH_VENV/bin/python" bench/run.py "$target/release/nip" "$@"
