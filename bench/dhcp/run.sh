#!/usr/bin/env bash
# DHCP benchmark: the appliance's dhcp service against dnsmasq and kea-dhcp4, the same
# 2,000-address pool, perfdhcp (relay mode) from a second network namespace, one run.
#
#   bench/dhcp/run.sh [--period 10] [--rates 250,500,1000,2000,4000]
#                     [--servers appliance,dnsmasq,kea] [--json FILE] [--profile RATE]
#                     [--no-doc] [--keep]
#
# Needs root (network namespaces, port 67). Installs kea-admin (perfdhcp),
# kea-dhcp4-server, dnsmasq-base, iproute2 and strace (Debian) when missing, and uvloop
# (PyPI, the `speed` extra) into the interpreter that runs the appliance. The system's
# kea-dhcp4-server service is never used or touched: kea-dhcp4 runs here in its own
# namespace with its own config, lease, PID and lock files in a temp dir.
# Everything else is in run.py; results go to docs/benchmarks.md (section "DHCP").
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
  echo "bench/dhcp: needs root (network namespaces, port 67)" >&2
  exit 1
fi

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

need=()
command -v perfdhcp >/dev/null || need+=(kea-admin)
command -v kea-dhcp4 >/dev/null || need+=(kea-dhcp4-server)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v ip >/dev/null || need+=(iproute2)
command -v strace >/dev/null || need+=(strace)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # Packages only: a service the install starts (kea-dhcp4-server.service) runs in the
  # host namespace with the system config and is irrelevant to this benchmark.
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  }
fi

if ! "$PYTHON" -c 'import uvloop' 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check 'uvloop>=0.19'
fi
if [[ " $* " == *" --profile "* ]] && ! command -v py-spy >/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check py-spy
fi

# run.py creates these namespaces and stops its processes itself; this trap is the
# fallback if it is killed: the PIDs it recorded (one file each), then the namespaces.
export BDH_TAG=$$
export BDH_WORK
BDH_WORK=$(mktemp -d /tmp/bench-dhcp.XXXXXX)
cleanup() {
  local f pid
  if [ -n "${PY_PID:-}" ] && kill -0 "$PY_PID" 2>/dev/null; then
    kill "$PY_PID" 2>/dev/null || true
    wait "$PY_PID" 2>/dev/null || true
  fi
  for f in "$BDH_WORK"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill -9 "$pid" 2>/dev/null || true
  done
  ip netns del "bdh-srv-$BDH_TAG" 2>/dev/null || true
  ip netns del "bdh-cli-$BDH_TAG" 2>/dev/null || true
  if [[ " $* " != *" --keep "* ]]; then rm -rf "$BDH_WORK"; fi
}
trap 'cleanup "$@"' EXIT
trap 'exit 130' INT TERM HUP

"$PYTHON" bench/dhcp/run.py "$@" &
PY_PID=$!
wait "$PY_PID"
