#!/usr/bin/env bash
# Print a PostgreSQL URL the tests can create databases on. In order:
#  1. $LOUPE_TEST_POSTGRES_URL as given;
#  2. a server already listening on 127.0.0.1:5432 that lets us in (trust auth);
#  3. a throwaway cluster: install PostgreSQL from Debian if needed, initdb into a temporary folder, start it on a
#     free loopback port (stop it with: scripts/ensure-postgres.sh --stop). It lives under /tmp, which the
#     postgres user can reach wherever the checkout is.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PGDIR=${TMPDIR:-/tmp}/loupe-test-pg-$(echo "$ROOT" | sha1sum | cut -c1-10)
say() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
SUDO=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && SUDO="sudo"

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [[ -n "$d" ]] && echo "$d"
}
as_pg() {  # initdb/postgres refuse to run as root
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [[ "${1:-}" == "--stop" ]]; then
  bin=$(pg_bin || true)
  if [[ -n "$bin" && -f $PGDIR/data/postmaster.pid ]]; then as_pg "$bin/pg_ctl" -D "$PGDIR/data" -m fast stop >/dev/null || true; fi
  exit 0
fi

can_connect() {
  .venv/bin/python - "$1" <<'PY' 2>/dev/null
import sys, psycopg
with psycopg.connect(sys.argv[1], connect_timeout=3) as c:
    c.execute("select 1")
PY
}

if [[ -n "${LOUPE_TEST_POSTGRES_URL:-}" ]]; then echo "$LOUPE_TEST_POSTGRES_URL"; exit 0; fi
if [[ -z "${LOUPE_TEST_THROWAWAY_PG:-}" ]]; then
  for url in "postgresql://postgres@127.0.0.1:5432/postgres" "postgresql://$(id -un)@127.0.0.1:5432/postgres"; do
    if can_connect "$url"; then echo "$url"; exit 0; fi
  done
fi

bin=$(pg_bin || true)
if [[ -z "$bin" ]]; then
  say "no PostgreSQL here: installing it from Debian's packages"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  bin=$(pg_bin)
fi
if [[ -f $PGDIR/port ]] && can_connect "postgresql://postgres@127.0.0.1:$(cat $PGDIR/port)/postgres"; then
  echo "postgresql://postgres@127.0.0.1:$(cat $PGDIR/port)/postgres"; exit 0
fi
say "starting a throwaway PostgreSQL cluster in $PGDIR"
rm -rf "$PGDIR"; mkdir -p "$PGDIR"
[[ $(id -u) -eq 0 ]] && chown postgres "$PGDIR"
as_pg "$bin/initdb" -D "$PGDIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "$port" > "$PGDIR/port"
as_pg "$bin/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w -o "-p $port -k $PGDIR -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
echo "postgresql://postgres@127.0.0.1:$port/postgres"
