#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for the tests marked `postgres` (a 2-worker Optuna study on
# a shared RDB storage), create a user and a database, and print their URL on stdout (nothing else goes there):
#
#     export KVZAP_TEST_POSTGRES_URL="$(.ci/postgres.sh)"
#
# Installs Debian's postgresql package when no server binaries are present. The server runs as the `postgres`
# system user when this script runs as root (PostgreSQL refuses root), listens on loopback only, on a free port
# (or $KVZAP_PG_PORT), with its data, socket and log in a fresh temporary directory; stop it with
# `pg_ctl -D <dir>/data stop` (the directory is printed on stderr).
set -euo pipefail

if ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
  echo "installing postgresql (apt-get)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
PORT="${KVZAP_PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
DIR="$(mktemp -d /tmp/kvzap-postgres.XXXXXX)"
USER_NAME=kvzap
PASSWORD=kvzap
DB=kvzap_test

as_postgres=()
if [[ "$(id -u)" == 0 ]]; then
  chown postgres "$DIR"
  as_postgres=(runuser -u postgres --)
fi

"${as_postgres[@]}" "$BIN/initdb" -D "$DIR/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 >"$DIR/initdb.log" 2>&1 \
  || { cat "$DIR/initdb.log" >&2; exit 1; }
"${as_postgres[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR" start >&2 \
  || { cat "$DIR/server.log" >&2; exit 1; }
"${as_postgres[@]}" "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -q \
  -c "CREATE USER $USER_NAME PASSWORD '$PASSWORD'" -c "CREATE DATABASE $DB OWNER $USER_NAME" >&2
echo "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT, data in $DIR/data" >&2
echo "postgresql+psycopg2://$USER_NAME:$PASSWORD@127.0.0.1:$PORT/$DB"
