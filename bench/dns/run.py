"""DNS benchmark: the appliance's dns service against dnsmasq, same records, one run.

Run through bench/dns/run.sh (it installs dnsperf, dnsmasq and uvloop when missing).
Steps:
  1. an inventory from config/dgxpod.yaml with only `listen.dns` (127.0.0.1, a free
     port) and `listen.admin` (another free port) on, state in a temp dir;
  2. the dnsmasq config `appliance render --as dnsmasq` prints for it, moved to a
     second free port (its DHCP and TFTP are off in that inventory already);
  3. a dnsperf query file: node A, etcd A, api/api-int A, *.apps names, the etcd SRV,
     PTR of the node and LB addresses, AAAA of nodes (NODATA), NXDOMAIN in the zones;
  4. both servers started, waited for, and asked every query once: the answers must
     agree (rcode and answer records), which also warms the appliance's lazily
     encoded answers (wildcard names, NODATA, NXDOMAIN) as a running cluster would;
  5. dnsperf for --duration seconds against each: (a) throughput with `-c 1 -q 100`
     (--clients, --outstanding),
     (b) latency at a fixed 2,000 queries/s, p50/p99/p99.9 from dnsperf's per-query
     `-v` lines (dnsperf 2.10 prints only average/min/max/stddev itself);
  6. results, ratios against the goals (qps >= 0.5x dnsmasq, p99 <= 2x dnsmasq),
     optional JSON; both servers are stopped by PID whatever happens.
Each dnsperf run also records the server's CPU (user and system, from /proc) and
dnsperf's own, so a result says whether the server or the load generator was the limit.
--profile DIR adds, after the measured runs: floor.py (the same event loop answering
with an echo, no DNS work) under the same load, DnsEngine.handle timed in-process, and
a throughput run of the appliance under cProfile (pstats written to DIR). py-spy is
no help here: it samples through ptrace, which lands on syscall boundaries, so its
samples pile up in sendto/epoll whatever the Python code costs.
--rev REV runs the appliance (and `appliance render`) from a `git archive` of REV instead
of the work tree (a before/after pair from one script; see bench/pairs.py).
Traffic goes to 127.0.0.1 only; every wait and every run is bounded.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import datetime
import grp
import json
import os
import platform
import pstats
import pwd
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import AppSource, Children

Result = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "config" / "dgxpod.yaml"
HOST = "127.0.0.1"
APPLIANCE = (sys.executable, "-m", "appliance")
LATENCY_QPS = 2000
GOAL_QPS_RATIO = 0.5  # appliance qps / dnsmasq qps at least this
GOAL_P99_RATIO = 2.0  # appliance p99 / dnsmasq p99 at most this
READY_TIMEOUT = 20.0
# A query unanswered after this many seconds is lost; dnsperf waits this long for the
# last ones after each run, so its default of 5 s would stretch every slice.
TIMEOUT = 1
BUSY = 0.2  # cores used by others above which a run is flagged as noisy

LISTENERS = (
    "dns",
    "dhcp",
    "tftp",
    "http",
    "api",
    "machine_config",
    "ingress_http",
    "ingress_https",
    "admin",
)

# Router-served names a running OpenShift cluster resolves under *.apps.
APPS = (
    "console-openshift-console",
    "oauth-openshift",
    "downloads-openshift-console",
    "canary-openshift-ingress-canary",
    "default-route-openshift-image-registry",
    "prometheus-k8s-openshift-monitoring",
    "alertmanager-main-openshift-monitoring",
    "thanos-querier-openshift-monitoring",
)

# --- processes: started here, stopped here by PID ------------------------------------

CHILDREN = Children("bench/dns")
APP = AppSource()  # the code the appliance runs from; --rev REV: a `git archive` of REV
_stop, _stop_children, _on_signal = CHILDREN.stop, CHILDREN.stop_all, CHILDREN.on_signal


def _start(argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    return CHILDREN.start(Path(argv[0]).name, argv, log, **kw)


# --- set-up ------------------------------------------------------------------------------


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (DNS uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
        return int(port)
    raise SystemExit("bench/dns: no free port on 127.0.0.1")


def write_inventory(tmp: Path, dns_port: int, admin_port: int) -> tuple[Path, dict[str, Any]]:
    raw = yaml.safe_load(SOURCE.read_text())
    raw["listen"] = {key: None for key in LISTENERS}
    raw["listen"]["dns"] = f"{HOST}:{dns_port}"
    raw["listen"]["admin"] = f"{HOST}:{admin_port}"
    raw["state_dir"] = str(tmp / "state")
    path = tmp / "inventory.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, raw


def dnsmasq_config(inventory: Path, dns_port: int, port: int) -> str:
    """`appliance render --as dnsmasq` for the inventory, DNS moved to `port`."""
    out = subprocess.run(
        [*APPLIANCE, "render", "--config", str(inventory), "--as", "dnsmasq"],
        cwd=APP.path,
        env=APP.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    lines = []
    for line in out.splitlines():
        if line == f"port={dns_port}":
            line = f"port={port}"
        elif re.match(r"(dhcp-|enable-tftp|tftp-|log-dhcp|pxe-|interface=)", line):
            continue  # off in this inventory anyway; they would need privileges
        lines.append(line)
    text = "\n".join(lines) + "\n"
    if f"port={port}\n" not in text or f"listen-address={HOST}\n" not in text:
        raise SystemExit(f"bench/dns: unexpected dnsmasq render:\n{out}")
    return text


def query_mix(raw: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, type, kind) lines for dnsperf, from the inventory itself."""
    domain = f"{raw['cluster']['name']}.{raw['cluster']['base_domain']}"
    nodes = raw["nodes"]
    lb = raw["load_balancer"]["address"]
    masters = [n for n in nodes if n["role"] == "master"]

    def ptr(ip: str) -> str:
        return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"

    q: list[tuple[str, str, str]] = []
    q += [(f"{n['name']}.{domain}", "A", "node A") for n in nodes]
    q += [(f"etcd-{i}.{domain}", "A", "node A") for i in range(len(masters))]
    q += [(f"{name}.{domain}", "A", "api A") for name in ("api", "api-int") for _ in range(3)]
    q += [(f"{app}.apps.{domain}", "A", "*.apps A") for app in APPS]
    q += [(f"_etcd-server-ssl._tcp.{domain}", "SRV", "SRV")] * 2
    q += [(ptr(n["ip"]), "PTR", "PTR") for n in nodes]
    q += [(ptr(lb), "PTR", "PTR")]
    q += [(f"{n['name']}.{domain}", "AAAA", "AAAA NODATA") for n in nodes[:3]]
    # Misses inside the zones: a node that is not there, a search-list expansion,
    # in-cluster names leaking out, an address without a node.
    subnet_base = ".".join(nodes[0]["ip"].split(".")[:3])
    q += [
        (f"master-3.{domain}", "A", "NXDOMAIN"),
        (f"worker-9.{domain}", "A", "NXDOMAIN"),
        (f"registry.{domain}", "A", "NXDOMAIN"),
        (f"api.{domain}.{domain}", "A", "NXDOMAIN"),
        (f"kubernetes.default.svc.{domain}", "A", "NXDOMAIN"),
        (ptr(f"{subnet_base}.200"), "PTR", "NXDOMAIN"),
    ]
    return q


# --- a DNS query without libraries (readiness) -----------------------------------------


def _raw_query(name: str, qid: int) -> bytes:
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)


def wait_ready(port: int, name: str, proc: subprocess.Popen[bytes], log: Path) -> float:
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        qid = 1
        while time.monotonic() - start < READY_TIMEOUT:
            if proc.poll() is not None:
                raise SystemExit(f"bench/dns: {proc.args[0]} exited:\n{log.read_text()}")
            qid += 1
            sock.sendto(_raw_query(name, qid), (HOST, port))
            with contextlib.suppress(TimeoutError, ConnectionRefusedError):
                data = sock.recv(4096)
                if data[:2] == struct.pack("!H", qid) and data[3] & 0x0F == 0:
                    return time.monotonic() - start
            time.sleep(0.05)
    raise SystemExit(f"bench/dns: nothing answers on {HOST}:{port}:\n{log.read_text()}")


def compare(queries: list[tuple[str, str, str]], ports: dict[str, int], edns: bool) -> list[str]:
    """Ask both servers each distinct question; the differences, as lines."""
    import dns.query
    import dns.rcode
    from dns.message import make_query

    diffs = []
    for name, qtype, _ in dict.fromkeys(queries):
        seen = {}
        for server, port in ports.items():
            reply = dns.query.udp(make_query(name, qtype, use_edns=edns), HOST, 2.0, port)
            answer = sorted(
                f"{rrset.name} {rrset.rdtype.name} {rd}" for rrset in reply.answer for rd in rrset
            )
            seen[server] = (dns.rcode.to_text(reply.rcode()), answer)
        if len(set(map(repr, seen.values()))) > 1:
            diffs.append(f"{name} {qtype}: " + "; ".join(f"{k} {v}" for k, v in seen.items()))
    return diffs


# --- dnsperf ------------------------------------------------------------------------


def _num(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def machine_busy() -> tuple[float, float, float]:
    """CPU seconds since boot, all cores: (tasks, irq + softirq, steal), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system) / tick, (irq + softirq) / tick, steal / tick


def others_busy(seconds: float = 1.0) -> float:
    """Cores busy on this machine over `seconds` (before a run: someone else's load)."""
    before = machine_busy()
    time.sleep(seconds)
    after = machine_busy()
    return sum(a - b for a, b in zip(after, before, strict=True)) / seconds


def dnsperf(
    port: int, qfile: Path, seconds: float, extra: list[str], verbose: bool, pid: int
) -> Result:
    """One dnsperf run: its counts, latencies (with -v), and the CPU everyone used."""
    argv = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(qfile), "-l", f"{seconds:g}"]
    argv += [*extra, "-v"] if verbose else extra
    before, children, t0 = cpu_times(pid), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    busy = machine_busy()
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 20, check=False
    ).stdout
    wall = time.time() - t0
    tasks, irq, steal = (a - b for a, b in zip(machine_busy(), busy, strict=True))
    after, children_after = cpu_times(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after[0] - before[0], after[1] - before[1]
    perf_cpu = (children_after.ru_utime - children.ru_utime) + (
        children_after.ru_stime - children.ru_stime
    )
    summary = out[out.find("Statistics:") :] if "Statistics:" in out else out[-3000:]
    runtime = _num(r"Run time \(s\):\s+([\d.]+)", summary)
    completed = _num(r"Queries completed:\s+(\d+)", summary)
    if runtime is None or completed is None:
        raise SystemExit(f"bench/dns: dnsperf failed ({' '.join(argv)}):\n{out[-3000:]}")
    codes = re.search(r"Response codes:\s+(.*)", summary)
    return {
        "command": " ".join(argv).replace(str(qfile), "queries.txt"),
        "sent": _num(r"Queries sent:\s+(\d+)", summary) or 0,
        "completed": completed,
        "lost": _num(r"Queries lost:\s+(\d+)", summary) or 0,
        "runtime": runtime,
        "avg": _num(r"Average Latency \(s\):\s+([\d.]+)", summary) or 0.0,
        "max": _num(r"Average Latency \(s\):.*max ([\d.]+)", summary) or 0.0,
        "rcodes": collections.Counter(
            {k: int(v) for k, v in re.findall(r"(\w+) (\d+) \(", codes.group(1) if codes else "")}
        ),
        "latencies": [float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M)],
        "cpu": {
            "wall": wall,
            "user": user,
            "system": system,
            "dnsperf": perf_cpu,
            "tasks": tasks,
            "irq": irq,
            "steal": steal,
        },
    }


def summarize(slices: list[Result]) -> Result:
    """The slices of one server's run as one result."""
    completed = sum(s["completed"] for s in slices)
    runtime = sum(s["runtime"] for s in slices)
    cpu = {k: sum(s["cpu"][k] for s in slices) for k in slices[0]["cpu"]}
    # Cores while dnsperf was sending (its run time), not over its start and final wait.
    wall, busy = min(cpu["wall"], runtime), cpu["user"] + cpu["system"]
    rcodes: collections.Counter[str] = sum((s["rcodes"] for s in slices), collections.Counter())
    res: Result = {
        "command": re.sub(r"-l \S+", f"-l {runtime / len(slices):.0f}", slices[0]["command"]),
        "slices": len(slices),
        "seconds": round(runtime, 2),
        "sent": sum(s["sent"] for s in slices),
        "completed": completed,
        "lost": sum(s["lost"] for s in slices),
        "qps": round(completed / runtime, 1),
        "slice_qps": [round(s["completed"] / s["runtime"]) for s in slices],
        "avg_ms": _ms(sum(s["avg"] * s["completed"] for s in slices) / max(completed, 1)),
        "max_ms": _ms(max(s["max"] for s in slices)),
        "rcodes": ", ".join(
            f"{k} {n} ({100 * n / max(completed, 1):.2f}%)" for k, n in rcodes.most_common()
        ),
        # CPU of the server during the run: cores busy, user/system split, per answer.
        "server_cores": round(busy / wall, 3),
        "server_user_share": round(cpu["user"] / max(busy, 1e-9), 3),
        "server_us_per_query": round(1e6 * busy / max(completed, 1), 2),
        "dnsperf_cores": round(cpu["dnsperf"] / wall, 3),
        # Other processes busy meanwhile: noise if well above 0. Softirq is mostly the
        # loopback traffic itself; steal is the hypervisor giving the vCPUs elsewhere.
        "other_cores": round(max(0.0, (cpu["tasks"] - busy - cpu["dnsperf"]) / wall), 3),
        "softirq_cores": round(cpu["irq"] / wall, 3),
        "steal_cores": round(cpu["steal"] / wall, 3),
    }
    lat = sorted(x for s in slices for x in s["latencies"])
    if lat:
        res.update(
            samples=len(lat),
            p50_ms=_ms(_pct(lat, 50)),
            p90_ms=_ms(_pct(lat, 90)),
            p99_ms=_ms(_pct(lat, 99)),
            p999_ms=_ms(_pct(lat, 99.9)),
        )
    return res


def _pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# --- profile --------------------------------------------------------------------------


def engine_cost(inventory: Path, queries: list[tuple[str, str, str]], edns: bool) -> float:
    """Microseconds per DnsEngine.handle over the mix, in this process, no sockets."""
    from collections import Counter

    from dns.message import make_query

    if str(APP.path) not in sys.path[:1]:
        sys.path.insert(0, str(APP.path))  # --rev: that commit's engine, not the work tree's
    from appliance.inventory import load_inventory
    from appliance.plan import build_plan
    from services.dns.engine import DnsEngine

    engine = DnsEngine(build_plan(load_inventory(inventory)).dns, Counter())
    wires = [make_query(n, t, use_edns=edns).to_wire() for n, t, _ in queries]
    for data in wires:  # the lazily encoded answers, as in the live runs
        engine.handle(data, HOST)
    handle, rounds = engine.handle, 5000
    t0 = time.perf_counter()
    for _ in range(rounds):
        for data in wires:
            handle(data, HOST)
    return 1e6 * (time.perf_counter() - t0) / (rounds * len(wires))


def profile(
    tmp: Path,
    qfile: Path,
    probe: str,
    queries: list[tuple[str, str, str]],
    args: argparse.Namespace,
) -> Result:
    """Where the appliance's time goes: floor server, engine alone, cProfile of the daemon."""
    out: Path = args.profile
    out.mkdir(parents=True, exist_ok=True)
    flags = [*(["-e"] if args.edns else []), "-c", str(args.clients), "-q", str(args.outstanding)]
    flags += ["-t", str(TIMEOUT)]
    found: Result = {}

    port = free_port()
    log = tmp / "floor.log"
    floor = _start([sys.executable, str(Path(__file__).with_name("floor.py")), str(port)], log)
    wait_ready(port, probe, floor, log)
    print(f"dnsperf throughput against floor.py for {args.duration} s ...", flush=True)
    found["floor"] = summarize([dnsperf(port, qfile, args.duration, flags, False, floor.pid)])
    _stop(floor)

    with contextlib.suppress(Exception):  # services/ may change under this benchmark
        found["engine_us_per_query"] = round(
            engine_cost(tmp / "inventory.yaml", queries, args.edns), 2
        )

    pdir = tmp / "cprofile"
    pdir.mkdir()
    port, admin = free_port(), free_port()
    inventory, _ = write_inventory(pdir, port, admin)
    pstats_file = out / "appliance-dns.pstats"
    log = pdir / "appliance.log"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(pstats_file), *APPLIANCE[1:]]
    app = _start(
        [*cmd, "--log-level", "warning", "run", "--config", str(inventory)],
        log,
        cwd=APP.path,
        env=APP.env(),
    )
    wait_ready(port, probe, app, log)
    print(f"dnsperf throughput against the appliance under cProfile for {args.duration} s ...")
    found["cprofile_run"] = summarize([dnsperf(port, qfile, args.duration, flags, False, app.pid)])
    _stop(app)
    if not pstats_file.exists():
        print(f"profile: cProfile wrote nothing:\n{log.read_text()}")
        return found
    stats = pstats.Stats(str(pstats_file)).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.items():
        where = f"{func} ({file.replace(str(APP.path) + '/', '')}:{line})" if line else func
        rows.append((where, ncalls, tottime, cumtime))
    answered = max((n for w, n, _, _ in rows if w.startswith("datagram_received")), default=0)
    found["cprofile_top"] = (
        [
            {"function": w, "calls": n, "tottime_us_per_query": round(1e6 * t / answered, 3)}
            for w, n, t, _ in sorted(rows, key=lambda r: -r[2])[:15]
        ]
        if answered
        else []
    )
    found["cprofile_pstats"] = str(pstats_file)
    return found


def print_profile(found: Result) -> None:
    f = found["floor"]
    print("\n== where the appliance's time goes")
    print(
        f"   floor.py (same event loop, echo, no DNS work): {f['qps']:,.0f} queries/s, "
        f"{f.get('server_us_per_query', 0):.2f} us CPU/query, {f['server_cores']:.2f} cores, "
        f"user share {f['server_user_share']:.0%}"
    )
    if "engine_us_per_query" in found:
        print(f"   DnsEngine.handle alone, in-process: {found['engine_us_per_query']:.2f} us/query")
    c = found.get("cprofile_run")
    if c:
        print(f"   under cProfile: {c['qps']:,.0f} queries/s; tottime per answered query:")
        for row in found.get("cprofile_top", []):
            print(f"     {row['tottime_us_per_query']:8.3f} us  {row['function']}")
        print(f"   pstats: {found.get('cprofile_pstats')} (python -m pstats, snakeviz)")


# --- report ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    version = subprocess.run(
        ["dnsmasq", "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    perf = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True, check=False)
    perf_version = (re.search(r"Version ([\d.]+)", perf.stdout + perf.stderr) or [None, "?"])[1]
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loop": loop,
        "dnsmasq": version,
        "dnsperf": perf_version,
        "source": APP.describe(),
    }


def _f(v: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"\n== DNS benchmark, {m['date']}: {m['cores']} cores, {m['cpu']}")
    print(f"   appliance on {m['loop']}, Python {m['python']}: {m.get('source', '?')}")
    print(f"   {m['dnsmasq']}; dnsperf {m['dnsperf']}")
    mix = collections.Counter(kind for _, _, kind in results["queries"])
    total = sum(mix.values())
    shares = ", ".join(f"{k} {100 * n / total:.0f}%" for k, n in mix.items())
    print(f"   {total} questions, {'with' if results['edns'] else 'without'} EDNS0: {shares}")
    for run in ("throughput", "latency"):
        cmd = re.sub(r"-p \d+", "-p PORT", results["appliance"][run]["command"])
        print(f"   {run}: {cmd}  (x {results['appliance'][run]['slices']} slices)")
    rows = [
        ("throughput: queries/s", "throughput", "qps", "{:,.0f}"),
        ("throughput: lost", "throughput", "lost", "{:,.0f}"),
        ("throughput: avg latency ms", "throughput", "avg_ms", "{:.3f}"),
        ("throughput: server cores", "throughput", "server_cores", "{:.2f}"),
        ("throughput: server user share", "throughput", "server_user_share", "{:.0%}"),
        ("throughput: server CPU us/query", "throughput", "server_us_per_query", "{:.2f}"),
        ("throughput: dnsperf cores", "throughput", "dnsperf_cores", "{:.2f}"),
        ("throughput: softirq cores", "throughput", "softirq_cores", "{:.2f}"),
        ("throughput: other cores busy", "throughput", "other_cores", "{:.2f}"),
        ("throughput: steal cores", "throughput", "steal_cores", "{:.2f}"),
        (f"@{LATENCY_QPS} q/s: p50 ms", "latency", "p50_ms", "{:.3f}"),
        (f"@{LATENCY_QPS} q/s: p99 ms", "latency", "p99_ms", "{:.3f}"),
        (f"@{LATENCY_QPS} q/s: p99.9 ms", "latency", "p999_ms", "{:.3f}"),
        (f"@{LATENCY_QPS} q/s: max ms", "latency", "max_ms", "{:.3f}"),
        (f"@{LATENCY_QPS} q/s: lost", "latency", "lost", "{:,.0f}"),
        (f"@{LATENCY_QPS} q/s: other cores busy", "latency", "other_cores", "{:.2f}"),
    ]
    print(f"\n   {'':32} {'appliance':>12} {'dnsmasq':>12}")
    for label, run, key, fmt in rows:
        a = results["appliance"][run].get(key)
        d = results["dnsmasq"][run].get(key)
        print(f"   {label:32} {_f(a, fmt):>12} {_f(d, fmt):>12}")
    r = results["ratios"]
    qok = "met" if r["qps_ok"] else "MISSED"
    pok = "met" if r["p99_ok"] else "MISSED"
    print(f"\n   qps ratio appliance/dnsmasq: {r['qps']:.2f} (goal >= {GOAL_QPS_RATIO}: {qok})")
    print(f"   p99 ratio appliance/dnsmasq: {r['p99']:.2f} (goal <= {GOAL_P99_RATIO}: {pok})")
    if len(r["qps_per_slice"]) > 1:
        spread = ", ".join(f"{x:.2f}" for x in r["qps_per_slice"])
        print(f"   qps ratio per slice pair, sorted: {spread}")
    for s in ("appliance", "dnsmasq"):
        for run in ("throughput", "latency"):
            print(f"   {s} {run} rcodes: {results[s][run]['rcodes']}")
    noisy = [
        f"{s} {run} {results[s][run]['other_cores'] + results[s][run]['steal_cores']:.2f}"
        for s in ("appliance", "dnsmasq")
        for run in ("throughput", "latency")
        if results[s][run]["other_cores"] + results[s][run]["steal_cores"] > BUSY
    ]
    if noisy or m["busy_before"] > BUSY:
        print(
            f"   WARNING: other load on the machine (cores: before {m['busy_before']:.2f}; ", end=""
        )
        print(f"during {', '.join(noisy) or '-'}): these numbers are not clean")
    if results["differences"]:
        print("   answers that differ between the two:")
        for line in results["differences"]:
            print(f"     {line}")
    else:
        print("   both servers gave the same rcode and answer records for every query")


# --- main -------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per dnsperf run (10)")
    p.add_argument(
        "--slices",
        type=int,
        default=5,
        help="split each server's run into this many slices, alternating between the servers,\n"
        "so that load from outside hits both alike (5; 1 = one run each)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--profile", type=Path, metavar="DIR", help="add floor and cProfile runs, pstats in DIR"
    )
    p.add_argument("--clients", type=int, default=1, help="dnsperf -c (1)")
    p.add_argument("--outstanding", type=int, default=100, help="dnsperf -q (100)")
    p.add_argument("--edns", action="store_true", help="queries with EDNS0 (dnsperf -e)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--rev", help="run the appliance from a `git archive` of this commit")
    args = p.parse_args()
    if not 1 <= args.slices <= args.duration:
        p.error("--slices: 1 to --duration")
    if not 1 <= args.duration <= 20:
        p.error("--duration: 1 to 20 seconds (the whole run must stay under two minutes)")
    for tool in ("dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/dns: {tool} not found (run bench/dns/run.sh)")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _on_signal)
    atexit.register(_stop_children)
    # Set-up and checks take a few seconds; four dnsperf runs; the profile run if asked.
    signal.alarm(
        40
        + 5 * args.duration
        + (2 * args.duration + 20) * bool(args.profile)
        + 30 * bool(args.rev)  # git archive and the C build of the TFTP loop
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench-dns-"))
    try:
        return _run(args, tmp)
    finally:
        _stop_children()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, tmp: Path) -> int:
    if args.rev:
        APP.use_rev(args.rev, tmp)
    app_port, dnsmasq_port, admin_port = free_port(), free_port(), free_port()
    while len({app_port, dnsmasq_port, admin_port}) < 3:
        dnsmasq_port, admin_port = free_port(), free_port()
    inventory, raw = write_inventory(tmp, app_port, admin_port)
    conf = tmp / "dnsmasq.conf"
    conf.write_text(dnsmasq_config(inventory, app_port, dnsmasq_port))
    queries = query_mix(raw)
    qfile = tmp / "queries.txt"
    qfile.write_text("".join(f"{name} {qtype}\n" for name, qtype, _ in queries))
    probe = f"api.{raw['cluster']['name']}.{raw['cluster']['base_domain']}"

    env = APP.env()
    app_log, dnsmasq_log = tmp / "appliance.log", tmp / "dnsmasq.log"
    app = _start(
        [*APPLIANCE, "--log-level", "warning", "run", "--config", str(inventory)],
        app_log,
        cwd=APP.path,
        env=env,
    )
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    dnsmasq = _start(
        [
            shutil.which("dnsmasq") or "dnsmasq",
            "--keep-in-foreground",  # not --no-daemon: that is debug mode
            f"--conf-file={conf}",  # and no other file: /etc/dnsmasq.conf stays out
            f"--user={user}",  # as root: stay root rather than switch to a system user
            f"--group={group}",
            "--pid-file=",  # none
            "--log-facility=-",  # stderr, into the log file here
        ],
        dnsmasq_log,
    )
    t_app = wait_ready(app_port, probe, app, app_log)
    t_dm = wait_ready(dnsmasq_port, probe, dnsmasq, dnsmasq_log)
    print(f"appliance pid {app.pid} on {HOST}:{app_port} (ready in {t_app:.1f} s)")
    print(f"dnsmasq   pid {dnsmasq.pid} on {HOST}:{dnsmasq_port} (ready in {t_dm:.1f} s)")
    ports = {"appliance": app_port, "dnsmasq": dnsmasq_port}
    diffs = compare(queries, ports, args.edns)
    load = ["-e"] if args.edns else []
    load += ["-c", str(args.clients), "-q", str(args.outstanding), "-t", str(TIMEOUT)]

    results: Result = {"machine": machine(), "edns": args.edns, "queries": queries}
    results["machine"]["busy_before"] = idle_load = round(others_busy(), 2)
    if idle_load > BUSY:
        print(f"warning: {idle_load:.2f} cores busy before the run: results will be noisy")
    results["differences"] = diffs
    runs = {
        "throughput": (load, False),
        "latency": ([*load, "-Q", str(LATENCY_QPS)], True),
    }
    pids = {"appliance": app.pid, "dnsmasq": dnsmasq.pid}
    seconds = args.duration / args.slices
    for run, (extra, verbose) in runs.items():
        print(f"dnsperf {run}: {args.duration} s each, in {args.slices} alternating slices ...")
        slices: dict[str, list[Result]] = {server: [] for server in ports}
        for i in range(args.slices):
            for server in sorted(ports, reverse=bool(i % 2)):  # who goes first alternates
                res = dnsperf(ports[server], qfile, seconds, extra, verbose, pids[server])
                slices[server].append(res)
        for server in ports:
            results.setdefault(server, {})[run] = summarize(slices[server])
    for proc, log in ((app, app_log), (dnsmasq, dnsmasq_log)):
        if proc.poll() is not None:
            raise SystemExit(f"bench/dns: {proc.args[0]} died during the run:\n{log.read_text()}")
    a, d = results["appliance"], results["dnsmasq"]
    qps_ratio = a["throughput"]["qps"] / d["throughput"]["qps"]
    p99_ratio = a["latency"]["p99_ms"] / max(d["latency"]["p99_ms"], 0.001)
    pairs = sorted(
        x / y
        for x, y in zip(a["throughput"]["slice_qps"], d["throughput"]["slice_qps"], strict=True)
    )
    results["ratios"] = {
        "qps": round(qps_ratio, 3),
        "qps_per_slice": [round(r, 3) for r in pairs],
        "p99": round(p99_ratio, 3),
        "qps_ok": qps_ratio >= GOAL_QPS_RATIO,
        "p99_ok": p99_ratio <= GOAL_P99_RATIO,
    }
    report(results)
    if args.profile:
        results["profile"] = profile(tmp, qfile, probe, queries, args)
        print_profile(results["profile"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"   results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
