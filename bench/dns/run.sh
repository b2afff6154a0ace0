#!/usr/bin/env bash
# DNS benchmark: the appliance's dns service against dnsmasq serving the same records
# (rendered by `appliance render --as dnsmasq`), with dnsperf, in one run, on loopback.
#
#   bench/dns/run.sh [--duration 10] [--slices 5] [--rev REV] [--json FILE] [--profile DIR] [--keep]
#
# Installs dnsperf and dnsmasq (Debian) when missing and running as root, and uvloop
# plus dnspython (PyPI) into the interpreter that runs the appliance when missing.
# Everything else is in run.py; see docs/benchmarks.md for what it measures.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

if ! command -v dnsperf >/dev/null || ! command -v dnsmasq >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq dnsperf dnsmasq-base >/dev/null 2>&1 || {
      apt-get update -qq
      apt-get install -y -qq dnsperf dnsmasq-base >/dev/null
    }
  else
    echo "bench/dns: dnsperf and dnsmasq are needed (apt-get install dnsperf dnsmasq-base)" >&2
    exit 1
  fi
fi

missing=()
"$PYTHON" -c 'import uvloop' 2>/dev/null || missing+=('uvloop>=0.19')
"$PYTHON" -c 'import dns.message' 2>/dev/null || missing+=('dnspython>=2.6')
if [ ${#missing[@]} -gt 0 ]; then
  "$PYTHON" -m pip install -q --disable-pip-version-check "${missing[@]}"
fi

exec "$PYTHON" bench/dns/run.py "$@"
