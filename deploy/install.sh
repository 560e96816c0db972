#!/usr/bin/env bash
# Install Wattmeter's systemd units on this host (or under --root DIR), idempotently; --uninstall takes back what
# an install added. The program itself is a Python package in a venv at /opt/wattmeter, installed before this:
#   python3 -m venv /opt/wattmeter && /opt/wattmeter/bin/pip install /path/to/wattmeter
#
# Usage: deploy/install.sh [options] [agent] [aggregator]      (components; default: agent)
#   --root DIR    install under DIR instead of / (systemctl --root, groupadd --prefix; no daemon-reload, no start)
#   --dry-run     print what would be done, change nothing
#   --environ     also the opt-in drop-in giving the agent CAP_SYS_PTRACE for /proc/<pid>/environ (see README)
#   --udev        also the udev rule for RAPL access at boot (the agent's ExecStartPre does it at every start anyway)
#   --now         start (or restart) the units after enabling them
#   --uninstall   disable and stop the units, remove what an install added (a config you changed stays)
#
# What an install adds is listed in /etc/wattmeter/.install-manifest; --uninstall removes only what is listed there.
# /var/lib/wattmeter (spool, database) is data: never touched.
set -euo pipefail

SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=/opt/wattmeter/bin/wattmeter
GROUP=powercap
MANIFEST=/etc/wattmeter/.install-manifest

root=""
dry_run=0
uninstall=0
environ=0
udev=0
now=0
components=()

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift ;;
    --root=*) root=${1#--root=} ;;
    --dry-run) dry_run=1 ;;
    --uninstall) uninstall=1 ;;
    --environ) environ=1 ;;
    --udev) udev=1 ;;
    --now) now=1 ;;
    agent | aggregator) components+=("$1") ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#components[@]} -eq 0 ] && components=(agent)
if [ -n "$root" ]; then
  [ -d "$root" ] || { echo "install.sh: --root $root is not a directory" >&2; exit 2; }
  root=$(cd "$root" && pwd)
  [ "$root" = / ] && root=""
fi

systemctl_args=()
[ -n "$root" ] && systemctl_args=(--root="$root")
systemd_running=0
[ -z "$root" ] && [ -d /run/systemd/system ] && systemd_running=1

say() { [ "$dry_run" = 1 ] || echo "install.sh: $*"; }  # a dry run prints only what it would run
run() {
  if [ "$dry_run" = 1 ]; then
    echo "would run: $*"
  else
    "$@"
  fi
}

# The manifest: "dir PATH", "file PATH", "config PATH SHA256", "group NAME", paths without the root prefix.
manifest_lines=()
load_manifest() {
  manifest_lines=()
  if [ -f "$root$MANIFEST" ]; then
    mapfile -t manifest_lines <"$root$MANIFEST"
  fi
}
record() {
  local line
  for line in "${manifest_lines[@]}"; do
    [ "$line" = "$*" ] && return 0
  done
  manifest_lines+=("$*")
}
save_manifest() {
  [ "$dry_run" = 1 ] && return 0
  printf '%s\n' "${manifest_lines[@]}" >"$root$MANIFEST.tmp"
  mv "$root$MANIFEST.tmp" "$root$MANIFEST"
}

group_exists() {
  if [ -n "$root" ]; then
    grep -q "^$GROUP:" "$root/etc/group" 2>/dev/null
  else
    getent group "$GROUP" >/dev/null
  fi
}

make_dir() {  # mkdir -p that records each directory it creates, outermost first
  local path=$1 missing=() parent
  parent=$path
  while [ ! -d "$root$parent" ]; do
    missing=("$parent" "${missing[@]}")
    parent=$(dirname "$parent")
  done
  for parent in "${missing[@]}"; do
    run mkdir -m 0755 "$root$parent"
    record dir "$parent"
  done
}

put() {  # put MODE SOURCE DEST: install a file (replacing an older one: upgrades get the new units)
  local mode=$1 from=$2 to=$3
  make_dir "$(dirname "$to")"
  if [ -f "$root$to" ] && cmp -s "$from" "$root$to"; then
    say "$to is up to date"
  else
    run install -m "$mode" "$from" "$root$to"
    say "installed $to"
  fi
  record file "$to"
}

put_config() {  # put_config EXAMPLE DEST: an example config, only where there is none (yours is never replaced)
  local from=$1 to=$2 sha
  if [ -e "$root$to" ]; then
    say "$to exists: kept as it is"
    return 0
  fi
  make_dir "$(dirname "$to")"
  run install -m 0644 "$from" "$root$to"
  say "installed $to (an example: edit it, then 'wattmeter config check')"
  if [ "$dry_run" = 0 ]; then
    sha=$(sha256sum "$root$to" | cut -d' ' -f1)
    record config "$to" "$sha"
  fi
}

units() {
  local component
  for component in "${components[@]}"; do
    echo "wattmeter-$component.service"
  done
}

install_all() {
  if [ ! -x "$root$BIN" ]; then
    echo "install.sh: no $root$BIN: the units run Wattmeter from a venv there. Create it first:" >&2
    echo "  python3 -m venv $root/opt/wattmeter && $root/opt/wattmeter/bin/pip install /path/to/wattmeter" >&2
    exit 1
  fi
  load_manifest
  make_dir /etc/wattmeter
  local component
  for component in "${components[@]}"; do
    put 0644 "$SOURCE/systemd/wattmeter-$component.service" "/etc/systemd/system/wattmeter-$component.service"
  done
  put 0644 "$SOURCE/../README.md" /usr/local/share/doc/wattmeter/README.md
  if [[ " ${components[*]} " == *" agent "* ]]; then
    if group_exists; then
      say "group $GROUP exists"
    else
      if [ -n "$root" ]; then
        run groupadd --system --prefix "$root" "$GROUP"
      else
        run groupadd --system "$GROUP"
      fi
      record group "$GROUP"
      say "created group $GROUP"
    fi
    put 0755 "$SOURCE/systemd/rapl-access" /usr/local/libexec/wattmeter/rapl-access
    if [ "$environ" = 1 ]; then
      put 0644 "$SOURCE/systemd/wattmeter-agent.service.d/environ.conf" \
        /etc/systemd/system/wattmeter-agent.service.d/environ.conf
    fi
    if [ "$udev" = 1 ]; then
      put 0644 "$SOURCE/udev/99-wattmeter-powercap.rules" /etc/udev/rules.d/99-wattmeter-powercap.rules
    fi
    # under DynamicUser the socket belongs to a user no workload shares: every user's processes may register
    # (each labels only itself: the agent takes the pid from SO_PEERCRED)
    local config
    config=$(mktemp)
    sed 's/^socket_mode = 0o660$/socket_mode = 0o666                 # any user may register (pid from SO_PEERCRED)/' \
      "$SOURCE/agent.example.toml" >"$config"
    if ! grep -q '^socket_mode = 0o666 ' "$config"; then
      echo "install.sh: $SOURCE/agent.example.toml has no 'socket_mode = 0o660' line to open up: fix install.sh" >&2
      exit 1
    fi
    put_config "$config" /etc/wattmeter/agent.toml
    rm -f "$config"
  fi
  if [[ " ${components[*]} " == *" aggregator "* ]]; then
    put_config "$SOURCE/aggregator.example.toml" /etc/wattmeter/aggregator.toml
  fi
  save_manifest
  if [ "$udev" = 1 ] && [ -z "$root" ] && command -v udevadm >/dev/null; then
    run udevadm control --reload || true
    run udevadm trigger --subsystem-match=powercap --action=add || true
  fi
  if [ "$systemd_running" = 1 ]; then
    run systemctl daemon-reload
  fi
  mapfile -t unit_names < <(units)
  run systemctl "${systemctl_args[@]}" enable "${unit_names[@]}"
  if [ "$now" = 1 ] && [ "$systemd_running" = 1 ]; then
    run systemctl restart "${unit_names[@]}"
  elif [ "$systemd_running" = 1 ]; then
    say "enabled; start with: systemctl start ${unit_names[*]}"
  else
    say "enabled (no running systemd here: nothing started, no daemon-reload)"
  fi
}

uninstall_all() {
  load_manifest
  if [ ${#manifest_lines[@]} -eq 0 ]; then
    say "nothing to uninstall ($MANIFEST not found under ${root:-/})"
    return 0
  fi
  local line kind path sha unit_names=() dirs=()
  for line in "${manifest_lines[@]}"; do
    read -r kind path sha <<<"$line"
    case "$path" in */wattmeter-*.service) [ "$kind" = file ] && unit_names+=("$(basename "$path")") ;; esac
  done
  if [ ${#unit_names[@]} -ne 0 ]; then
    if [ "$systemd_running" = 1 ]; then
      run systemctl disable --now "${unit_names[@]}" || true
    else
      run systemctl "${systemctl_args[@]}" disable "${unit_names[@]}" || true
    fi
  fi
  for line in "${manifest_lines[@]}"; do
    read -r kind path sha <<<"$line"
    case "$kind" in
      file)
        [ -e "$root$path" ] && run rm -f "$root$path" && say "removed $path"
        ;;
      config)
        if [ ! -e "$root$path" ]; then
          :
        elif [ "$(sha256sum "$root$path" | cut -d' ' -f1)" = "$sha" ]; then
          run rm -f "$root$path" && say "removed $path (unchanged example)"
        else
          say "kept $path: it was changed since the install"
        fi
        ;;
      group)
        if [ -n "$root" ]; then
          run groupdel --prefix "$root" "$path" && say "removed group $path"
        else
          run groupdel "$path" && say "removed group $path"
        fi
        ;;
      dir) dirs=("$path" "${dirs[@]}") ;;  # innermost first
    esac
  done
  [ "$dry_run" = 0 ] && rm -f "$root$MANIFEST"
  for path in "${dirs[@]}"; do
    if [ -d "$root$path" ] && [ -z "$(ls -A "$root$path")" ]; then
      run rmdir "$root$path"
    elif [ -d "$root$path" ]; then
      say "kept $path: not empty"
    fi
  done
  if [ "$systemd_running" = 1 ]; then
    run systemctl daemon-reload
  fi
  say "uninstalled; /var/lib/wattmeter (spool, database) is left as it was"
}

if [ "$uninstall" = 1 ]; then
  uninstall_all
else
  install_all
fi
