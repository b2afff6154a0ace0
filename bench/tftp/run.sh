#!/usr/bin/env bash
# TFTP benchmark: the appliance's tftp service against tftpd-hpa (our own in.tftpd),
# one 64 MiB file, blksize 1468, curl and a raw-UDP client (lock-step and windowsize 16),
# in one run, on loopback.
#
#   bench/tftp/run.sh [--reps 5] [--reps-other 3] [--cpu 0] [--profile] [--json FILE]
#                     [--no-doc] [--keep]
#
# Installs tftpd-hpa (only for its in.tftpd binary: the system's tftpd-hpa service is
# never started, stopped or configured here), curl and strace (Debian) when missing and
# running as root, and uvloop (PyPI) into the interpreter that runs the appliance.
# Everything else is in run.py; results go to docs/benchmarks.md (section "TFTP").
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

need=()
command -v in.tftpd >/dev/null || need+=(tftpd-hpa)
command -v curl >/dev/null || need+=(curl)
command -v strace >/dev/null || need+=(strace)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bench/tftp: needs ${need[*]} (apt-get install ${need[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Where the package's own service gets started by the install, it is left as it is:
  # this benchmark runs its own in.tftpd on a free loopback port.
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  }
fi
if ! "$PYTHON" -c 'import uvloop' 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check 'uvloop>=0.19'
fi

# run.py stops its processes itself; this trap is the fallback if it is killed: the
# PIDs it recorded (one file each) and, for in.tftpd, the children it forked.
export BTF_WORK
BTF_WORK=$(mktemp -d /tmp/bench-tftp.XXXXXX)
cleanup() {
  local f pid kid
  if [ -n "${PY_PID:-}" ] && kill -0 "$PY_PID" 2>/dev/null; then
    kill "$PY_PID" 2>/dev/null || true
    wait "$PY_PID" 2>/dev/null || true
  fi
  for f in "$BTF_WORK"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    for kid in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
      kill -9 "$kid" 2>/dev/null || true
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [[ " $* " != *" --keep "* ]]; then rm -rf "$BTF_WORK"; fi
}
trap 'cleanup "$@"' EXIT
trap 'exit 130' INT TERM HUP

"$PYTHON" bench/tftp/run.py "$@" &
PY_PID=$!
wait "$PY_PID"
