#!/usr/bin/env bash
# HTTP benchmark: the appliance's http service against nginx (one worker, sendfile),
# a 256 MiB image with curl and a 1 MiB file with wrk, same directory, one run, loopback.
#
#   bench/http/run.sh [--reps 7] [--duration 10] [--connections 32] [--threads 2]
#                     [--cpu 0] [--no-asyncio] [--no-unpinned] [--profile]
#                     [--json FILE] [--no-doc] [--keep]
#
# Installs nginx-light, wrk, curl and strace (Debian) when missing and running as root,
# uvloop (PyPI) into the interpreter that runs the appliance, and py-spy with --profile.
# nginx runs from a private config in a temp dir (no daemon, its own pid file and logs):
# no system nginx service is started, stopped or configured here.
# Everything else is in run.py; results go to docs/benchmarks.md (section "HTTP").
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
command -v strace >/dev/null || need+=(strace)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bench/http: needs ${need[*]} (apt-get install ${need[*]})" >&2
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

# run.py stops its processes itself; this trap is the fallback if it is killed: the
# PIDs it recorded (one file each) and their children (nginx's worker).
export BHT_WORK
BHT_WORK=$(mktemp -d /tmp/bench-http.XXXXXX)
cleanup() {
  local f pid kid
  if [ -n "${PY_PID:-}" ] && kill -0 "$PY_PID" 2>/dev/null; then
    kill "$PY_PID" 2>/dev/null || true
    wait "$PY_PID" 2>/dev/null || true
  fi
  for f in "$BHT_WORK"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    for kid in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
      kill -9 "$kid" 2>/dev/null || true
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [[ " $* " != *" --keep "* ]]; then rm -rf "$BHT_WORK"; fi
}
trap 'cleanup "$@"' EXIT
trap 'exit 130' INT TERM HUP

"$PYTHON" bench/http/run.py "$@" &
PY_PID=$!
wait "$PY_PID"
