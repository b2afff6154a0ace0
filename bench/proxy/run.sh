#!/usr/bin/env bash
# Proxy benchmark: the appliance's proxy service against HAProxy (one thread) in front of
# the same backends (iperf3 and nginx on 127.0.0.44), plus the direct figures, one run.
#
#   bench/proxy/run.sh [--seconds 10] [--wrk-connections 32]
#                      [--targets direct,haproxy,haproxy_splice,appliance,appliance_plain]
#                      [--tests bulk,conn] [--wait-quiet 120] [--retry-noisy 1]
#                      [--profile bulk,conn] [--rev REV] [--json FILE] [--no-doc]
#
# Installs haproxy, iperf3, wrk and nginx-light (Debian) when missing, and uvloop (PyPI,
# the `speed` extra) into the interpreter that runs the appliance; py-spy for --profile.
# The system's haproxy/nginx services are never used or touched: each runs here in the
# foreground with its own config in a temp dir. Everything else is in run.py; results
# go to docs/benchmarks.md (section "Proxy").
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v ss >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bench/proxy: missing ${need[*]} (needs root to install)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
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

# run.py stops its processes itself; this trap is the fallback if it is killed: the PIDs
# it recorded (one file each).
export BPX_WORK
BPX_WORK=$(mktemp -d /tmp/bench-proxy.XXXXXX)
cleanup() {
  local f pid
  if [ -n "${PY_PID:-}" ] && kill -0 "$PY_PID" 2>/dev/null; then
    kill "$PY_PID" 2>/dev/null || true
    wait "$PY_PID" 2>/dev/null || true
  fi
  for f in "$BPX_WORK"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ -z "${BPX_KEEP:-}" ]; then rm -rf "$BPX_WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

"$PYTHON" bench/proxy/run.py "$@" &
PY_PID=$!
wait "$PY_PID"
