#!/usr/bin/env bash
# Boot-storm benchmark: 200 machines PXE-boot (DHCP, TFTP loader, HTTP kernel and
# initramfs) at once from the appliance and from dnsmasq + nginx, in one run.
#
#   bench/storm/run.sh [--machines 200] [--kernel-mib 10] [--initramfs-mib 60]
#                      [--reps 3] [--only appliance|dnsmasq] [--no-doc] [--json FILE]
#
# Needs root (network namespaces). Installs dnsmasq-base, nginx-light, busybox-static,
# ipxe and iproute2 (Debian) when missing, uvloop (PyPI) into the interpreter that runs
# the appliance. nginx and dnsmasq run from private configs in a temp dir: no system
# service is started, stopped or configured here. The work is in run.py; results go to
# docs/benchmarks.md (section "Boot storm").
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

if [ "$(id -u)" != 0 ]; then
  echo "bench/storm: needs root (network namespaces)" >&2
  exit 1
fi
need=()
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v nginx >/dev/null || need+=(nginx-light)
command -v ip >/dev/null || need+=(iproute2)
[ -e /usr/lib/ipxe/undionly.kpxe ] || need+=(ipxe)
[ -x /bin/busybox ] || need+=(busybox-static)  # the clients are busybox applets
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  }
fi
if ! "$PYTHON" -c 'import uvloop' 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check 'uvloop>=0.19'
fi

# run.py stops what it started by PID and deletes its namespaces; if it is killed, this
# trap stops it (its own cleanup then runs on SIGTERM).
"$PYTHON" bench/storm/run.py "$@" &
PY_PID=$!
trap 'kill "$PY_PID" 2>/dev/null || true; wait "$PY_PID" 2>/dev/null || true' INT TERM HUP
wait "$PY_PID"
