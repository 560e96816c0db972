#!/usr/bin/env bash
# System tools run for real: promtool (Debian `prometheus`), systemd-analyze (Debian `systemd`, for the units in
# deploy/systemd) and a PostgreSQL server (Debian `postgresql`, for the aggregator's store tests) for the tests; with
# --bench, node_exporter too.
#
# PostgreSQL: unless WATTMETER_TEST_POSTGRES_URL points elsewhere, a local Debian cluster is created if there is none,
# started, and given the role and database `wattmeter_test` (password `wattmeter_test`) that the tests' default URL
# postgresql://wattmeter_test:wattmeter_test@127.0.0.1:5432/wattmeter_test names. Every step is idempotent.
set -euo pipefail
TEST_ROLE=wattmeter_test
TEST_PORT=${WATTMETER_TEST_POSTGRES_PORT:-5432}  # another port: set WATTMETER_TEST_POSTGRES_URL to match
URL_VARIABLE=WATTMETER_TEST_POSTGRES_URL

postgres_server_installed() {
  command -v pg_lsclusters >/dev/null && compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null
}

need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)  # verify and security-review the units in deploy/systemd
if [ "${1:-}" = "--bench" ]; then
  command -v prometheus-node-exporter >/dev/null || need+=(prometheus-node-exporter)
fi
manage_postgres=1
[ -n "${!URL_VARIABLE:-}" ] && manage_postgres=0
if [ "$manage_postgres" = 1 ] && ! postgres_server_installed; then
  need+=(postgresql)
fi

if [ "$(id -u)" -ne 0 ]; then
  missing=()
  for package in "${need[@]}"; do
    # without PostgreSQL its tests skip (and say why), unless WATTMETER_REQUIRE_POSTGRES=1
    if [ "$package" = postgresql ] && [ "${WATTMETER_REQUIRE_POSTGRES:-}" != 1 ]; then
      echo "note: no PostgreSQL server: the PostgreSQL store tests will skip" \
        "('sudo apt-get install postgresql' to run them)" >&2
      continue
    fi
    missing+=("$package")
  done
  if [ ${#missing[@]} -ne 0 ]; then
    echo "missing ${missing[*]}: run 'sudo apt-get install ${missing[*]}' (Debian/Ubuntu), then try again" >&2
    exit 1
  fi
  if [ "$manage_postgres" = 1 ] && postgres_server_installed && ! pg_isready -q -h 127.0.0.1 -p "$TEST_PORT"; then
    echo "note: PostgreSQL is not running on port $TEST_PORT: the PostgreSQL store tests will skip" \
      "('sudo bash scripts/install-test-tools.sh' starts it)" >&2
  fi
  exit 0
fi

if [ ${#need[@]} -ne 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # the packages start their own daemons where systemd runs; the tests start theirs on free ports
  for service in prometheus prometheus-node-exporter; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
      systemctl stop "$service" || true
    fi
  done
fi

[ "$manage_postgres" = 1 ] || exit 0

# The Debian cluster on the test port, else a new one on the newest installed version (a fresh install usually
# made one, not started where there is no systemd).
cluster=$(pg_lsclusters -h | awk -v port="$TEST_PORT" '$3 == port { print $1 " " $2; exit }')
if [ -z "$cluster" ]; then
  if pg_isready -q -h 127.0.0.1 -p "$TEST_PORT"; then
    echo "note: a PostgreSQL that pg_ctlcluster does not manage listens on port $TEST_PORT: give it the role and" \
      "database $TEST_ROLE (password $TEST_ROLE), or set $URL_VARIABLE" >&2
    exit 0
  fi
  version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n | tail -n 1)
  name=main
  [ -d "/etc/postgresql/$version/$name" ] && name=wattmeter_test
  pg_createcluster --port "$TEST_PORT" "$version" "$name" >/dev/null
  cluster="$version $name"
fi
read -r version name <<<"$cluster"
if ! pg_lsclusters -h "$version" "$name" | awk '{ exit ($4 == "online") ? 0 : 1 }'; then
  pg_ctlcluster "$version" "$name" start
fi
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 -p "$TEST_PORT" && break
  sleep 1
done
pg_isready -q -h 127.0.0.1 -p "$TEST_PORT" || {
  echo "PostgreSQL $version/$name did not start: see /var/log/postgresql/postgresql-$version-$name.log" >&2
  exit 1
}
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -p "$TEST_PORT" -d postgres <<SQL
SELECT 'CREATE ROLE $TEST_ROLE LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$TEST_ROLE')
\gexec
ALTER ROLE $TEST_ROLE LOGIN PASSWORD '$TEST_ROLE';
SELECT 'CREATE DATABASE $TEST_ROLE OWNER $TEST_ROLE' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$TEST_ROLE')
\gexec
SQL
