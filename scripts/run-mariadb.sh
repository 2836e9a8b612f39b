#!/usr/bin/env bash
# Throwaway MariaDB server (Debian's mariadb-server) in DATA_DIR, listening on 127.0.0.1:PORT
# only, its socket inside DATA_DIR, with a user `nip` (password `nip`) allowed to create databases.
# Usage: run-mariadb.sh PORT DATA_DIR [start|fg|stop|url]
#   start (default) create the data directory if needed, start in the background, print URL
#   fg              same, but exec mariadbd in the foreground (kill PID to stop)
#   stop            shut down the server of DATA_DIR
#   url             print the connection URL only
# Env: MARIADB_FAST=1 trades durability for speed (tests only).
# As root the server runs as the `mysql` user, so DATA_DIR's parents must be traversable by it.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 PORT DATA_DIR [start|fg|stop|url]" >&2
  exit 2
fi
PORT=$1
DATA_DIR=$2
CMD=${3:-start}
URL="mysql://nip:nip@127.0.0.1:$PORT/nip"

if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      -o DPkg::Lock::Timeout=120 mariadb-server >&2
  else
    echo "mariadb-server is missing and this is not root: install it with apt-get" >&2
    exit 1
  fi
fi
export PATH="$PATH:/usr/sbin"

case "$CMD" in
  url) echo "$URL"; exit 0 ;;
  start|fg|stop) ;;
  *) echo "unknown command: $CMD" >&2; exit 2 ;;
esac

mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)
SOCK="$DATA_DIR/mysqld.sock"
PIDFILE="$DATA_DIR/mysqld.pid"

if [ "$CMD" = stop ]; then
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  exit 0
fi

user=$(id -un)
[ "$(id -u)" = 0 ] && user=mysql
chown "$user" "$DATA_DIR" 2>/dev/null || true
chmod 700 "$DATA_DIR"

# No option file is read (--no-defaults): the system's /etc/mysql settings never apply.
opts=(--no-defaults --datadir="$DATA_DIR/db" --socket="$SOCK" --port="$PORT"
      --bind-address=127.0.0.1 --pid-file="$PIDFILE" --log-error="$DATA_DIR/server.log"
      --user="$user" --skip-name-resolve --max-connections=500
      --character-set-server=utf8mb4 --collation-server=utf8mb4_bin)
if [ "${MARIADB_FAST:-0}" = 1 ]; then
  opts+=(--innodb-flush-log-at-trx-commit=0 --sync-binlog=0 --innodb-doublewrite=0
         --innodb-buffer-pool-size=64M --innodb-log-file-size=16M)
fi

first=0
if [ ! -d "$DATA_DIR/db/mysql" ]; then
  first=1
  mariadb-install-db --no-defaults --datadir="$DATA_DIR/db" --user="$user" \
    --auth-root-authentication-method=socket --skip-test-db >"$DATA_DIR/install.log" 2>&1 \
    || { cat "$DATA_DIR/install.log" >&2; exit 1; }
fi

if [ "$CMD" = fg ]; then
  echo "$URL"
  exec mariadbd "${opts[@]}"
fi

mariadbd "${opts[@]}" >/dev/null 2>&1 &
for _ in $(seq 1 300); do
  mariadb-admin --no-defaults --socket="$SOCK" -uroot ping >/dev/null 2>&1 && break
  if [ -f "$DATA_DIR/server.log" ] && ! kill -0 $! 2>/dev/null; then
    cat "$DATA_DIR/server.log" >&2
    echo "mariadbd did not start" >&2
    exit 1
  fi
  sleep 0.1
done
if [ "$first" = 1 ]; then
  # `nip` may create and drop databases: the tests make one per test.
  mariadb --no-defaults --socket="$SOCK" -uroot <<'SQL'
CREATE USER 'nip'@'127.0.0.1' IDENTIFIED BY 'nip';
CREATE USER 'nip'@'localhost' IDENTIFIED BY 'nip';
GRANT ALL PRIVILEGES ON *.* TO 'nip'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO 'nip'@'localhost';
CREATE DATABASE nip;
SQL
fi
echo "mariadbd PID $(cat "$PIDFILE"); stop: $0 $PORT $DATA_DIR stop" >&2
echo "$URL"
