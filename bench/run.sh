#!/usr/bin/env bash
# One command for the benchmarks: installs wrk and nginx when missing, builds nip (release), runs
# bench/run.py and writes BENCHMARKS.md + bench/results.json. `--quick` takes about 2 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
cargo build --release --locked -p nip >&2
target=${CARGO_TARGET_DIR:-target}
exec python3 bench/run.py "$target/release/nip" "$@"
