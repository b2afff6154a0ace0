#!/usr/bin/env bash
# HA benchmark (issue 18): takeover time over 20 kills of the leader, and DHCP DORA/s with
# the etcd store against the SQLite store, in the lab of tests/system/test_ha_failover.py.
#
#   bench/ha/run.sh [--rounds 20] [--rates 1000,2000,4000] [--passes 2] [--period 10]
#                   [--clients 2000] [--skip takeover|dora] [--json FILE] [--no-doc] [--keep]
#
# Needs root (network namespaces), Debian's etcd-server, dnsutils, curl, busybox and
# kea-admin (perfdhcp). Everything else is in run.py: it removes its namespaces and
# stops its processes by PID; results go to docs/benchmarks.md (section ha18).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
  echo "bench/ha: needs root (network namespaces)" >&2
  exit 1
fi
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PATH="$PATH:/usr/sbin:/sbin"
exec "$PYTHON" bench/ha/run.py "$@"
