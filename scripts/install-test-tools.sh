#!/usr/bin/env bash
# System tools run for real: promtool (Debian `prometheus`) for the tests; with --bench, node_exporter too.
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
if [ "${1:-}" = "--bench" ]; then
  command -v prometheus-node-exporter >/dev/null || need+=(prometheus-node-exporter)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing ${need[*]}: run 'sudo apt-get install ${need[*]}' (Debian/Ubuntu), then try again" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# the packages start their own daemons where systemd runs; the tests start theirs on free ports
for service in prometheus prometheus-node-exporter; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl stop "$service" || true
  fi
done
