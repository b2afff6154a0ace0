"""Proxy benchmark: the appliance's proxy service against HAProxy, same backends, one run.

Run through bench/proxy/run.sh (it installs haproxy, iperf3, wrk and nginx-light when
missing). Everything runs on loopback:
  1. backends on the worker's address 127.0.0.44: an iperf3 server (long-running) and an
     nginx (private config in a temp dir, one worker, no access log) serving a 13-byte
     file; the inventory has one worker, so each frontend has exactly one backend and
     "direct" is the same single server the proxies talk to;
  2. the appliance (`python -m appliance run`, uvloop when installed) with only the
     proxy's two ingress frontends and the admin API on: ingress_http on
     127.0.0.54:P1 -> 127.0.0.44:<iperf3>, ingress_https on 127.0.0.54:P2 ->
     127.0.0.44:<nginx> (ingress_check tcp, check_interval 3600 s so a health check
     never lands in the middle of an iperf3 test), once with splice() and once with
     APPLIANCE_NO_SPLICE=1;
  3. HAProxy (Debian) with the same two frontends on 127.0.0.55: `mode tcp`, nbthread 1,
     no logging, no health checks, once without splice (HAProxy's default) and once
     with `option splice-auto`;
  4. per target (direct, each proxy): `iperf3 -c ADDR -p PORT -t 10` (client -> server
     bulk, one stream) and `wrk -c 32 -t 2 -d 10s -H 'Connection: close' --latency`
     (a new TCP connection per request); the proxy's CPU, the backends' and the
     client's, and the CPU everything else on the machine used during the run. Before
     each measurement the run waits (bounded) until everything else uses under 0.2
     cores; a run that stayed noisy is repeated and the quietest attempt kept;
  5. a table, optional JSON, and the "Proxy" section of docs/benchmarks.md (between
     <!-- proxy:begin --> and <!-- proxy:end -->; the rest of the file is left alone).
--rev REV runs the appliance from a `git archive` of REV instead of the work tree (a
before/after pair from one script; see bench/pairs.py).
--profile records the appliance (splice on) with py-spy during one extra wrk run and
prints the hottest frames.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import DOC, AppSource, Children, machine_busy, stat_cpu, write_section
from bench.common import wait_quiet as common_wait_quiet

Result = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- proxy:begin -->", "<!-- proxy:end -->"
APPLIANCE = (sys.executable, "-m", "appliance")

BACKEND_IP = "127.0.0.44"  # worker-0
APP_IP = "127.0.0.54"  # load_balancer.address: the appliance's frontends
HAP_IP = "127.0.0.55"  # HAProxy's frontends
BUSY = 0.2  # cores used by others above which a run is noisy
READY_TIMEOUT = 20.0
GOAL_BULK, GOAL_CPS = 0.8, 0.5  # of HAProxy's figure

WORK = Path(os.environ.get("BPX_WORK") or "/nonexistent")  # main() makes a temp dir if unset
PIDS = WORK / "pids"
CHILDREN = Children("bench/proxy", PIDS)  # main() points it at the temp dir
APP = AppSource()  # the code the appliance runs from; --rev REV: a `git archive` of REV
_start, _stop, _stop_children, _on_signal = (
    CHILDREN.start,
    CHILDREN.stop,
    CHILDREN.stop_all,
    CHILDREN.on_signal,
)


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def wait_listening(ip: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench/proxy: {proc.args!r} exited:\n{log.read_text()[-3000:]}")
        out = subprocess.run(
            ["ss", "-Hltn", f"src {ip}:{port}"], capture_output=True, text=True, check=False
        )
        if out.stdout.strip():
            return
        time.sleep(0.1)
    raise SystemExit(f"bench/proxy: nothing listens on {ip}:{port} after {READY_TIMEOUT:.0f} s")


# --- measuring --------------------------------------------------------------------------


def wait_quiet(limit: float) -> float:
    return common_wait_quiet(limit, BUSY)


def run_client(argv: list[str], ours: list[int], timeout: float) -> tuple[str, Result]:
    """Run a client; its output, and the CPU of it, of `ours` and of everything else."""
    before = {pid: stat_cpu(pid) for pid in ours}
    busy0, t0 = machine_busy(), time.monotonic()
    out_path = WORK / "client.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    CHILDREN.procs[proc.pid] = proc
    deadline = time.monotonic() + timeout
    status, usage = 0, None
    while True:  # wait4: the client's own CPU from its rusage
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            _stop(proc, signal.SIGKILL)
            usage = None
            break
        time.sleep(0.05)
    CHILDREN.procs.pop(proc.pid, None)
    client_cpu = (usage.ru_utime + usage.ru_stime) if usage else 0.0
    out = out_path.read_bytes()
    wall = time.monotonic() - t0
    busy = machine_busy() - busy0
    used = {pid: stat_cpu(pid) - c for pid, c in before.items()}
    return out.decode(errors="replace"), {
        "wall": wall,
        "busy": busy,
        "ours": used,
        "client": client_cpu,
        "rc": proc.returncode,
    }


# --- the backends, the proxies ------------------------------------------------------------


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/nginx.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    keepalive_timeout 0;
    server {{
        listen {ip}:{port} backlog=4096;
        root {d}/www;
    }}
}}
"""

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 4000
    pidfile {d}/haproxy.pid

defaults
    mode tcp
    retries 3
    option redispatch
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{splice}
frontend bulk
    bind {ip}:{bulk}
    default_backend bulk

backend bulk
    balance roundrobin
    server worker-0 {backend}:{iperf}

frontend http
    bind {ip}:{http}
    default_backend http

backend http
    balance roundrobin
    server worker-0 {backend}:{nginx}
"""


def write_inventory(d: Path, ports: Result) -> Path:
    inv = {
        "cluster": {"name": "bench", "base_domain": "example.com", "ignition_dir": "ignition"},
        "network": {"address": "127.0.0.1", "subnet": "127.0.0.0/24", "lease_time": 3600},
        "load_balancer": {
            "address": APP_IP,
            "backend_ports": {"ingress_http": ports["iperf"], "ingress_https": ports["nginx"]},
            "ingress_check": "tcp",
            "check_interval": 3600,
            "rise": 1,
            "fall": 1,
            "max_connections": 20000,
        },
        "boot": {"tftp_root": "tftp", "images_dir": "images"},
        "nodes": [
            {
                "name": "bootstrap",
                "role": "bootstrap",
                "mac": "52:54:00:00:00:53",
                "ip": "127.0.0.53",
            },
            {"name": "master-0", "role": "master", "mac": "52:54:00:00:00:50", "ip": "127.0.0.50"},
            {"name": "worker-0", "role": "worker", "mac": "52:54:00:00:00:44", "ip": BACKEND_IP},
        ],
        "listen": {
            "dns": None,
            "dhcp": None,
            "tftp": None,
            "http": None,
            "api": None,
            "machine_config": None,
            "ingress_http": f"{APP_IP}:{ports['bulk']}",
            "ingress_https": f"{APP_IP}:{ports['http']}",
            "admin": f"127.0.0.1:{ports['admin']}",
        },
        "kubernetes": {"approve_csrs": False, "gpu_operator": False},
        "state_dir": "state",
    }
    d.mkdir(parents=True, exist_ok=True)
    path = d / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


class Target:
    """Where a client connects, and the process (if any) in between."""

    def __init__(self, key: str, label: str, ip: str, ports: Result) -> None:
        self.key, self.label, self.ip = key, label, ip
        self.bulk_port = ports["iperf"] if key == "direct" else ports["bulk"]
        self.http_port = ports["nginx"] if key == "direct" else ports["http"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports = ports

    def start(self) -> None:
        d = WORK / self.key
        d.mkdir(parents=True, exist_ok=True)
        log = d / "server.out"
        if self.key == "direct":
            return
        if self.key.startswith("haproxy"):
            conf = d / "haproxy.cfg"
            splice = "    option splice-auto\n" if self.key == "haproxy_splice" else ""
            conf.write_text(
                HAPROXY_CONF.format(d=d, ip=HAP_IP, backend=BACKEND_IP, splice=splice, **self.ports)
            )
            subprocess.run(["haproxy", "-c", "-q", "-f", str(conf)], check=True)
            self.proc = _start(self.key, ["haproxy", "-db", "-f", str(conf)], log)
        else:
            inv = write_inventory(d, self.ports)
            env = APP.env()
            env.pop("APPLIANCE_NO_SPLICE", None)
            if self.key == "appliance_plain":
                env["APPLIANCE_NO_SPLICE"] = "1"
            argv = [*APPLIANCE, "run", "--config", str(inv)]
            self.proc = _start(self.key, argv, log, cwd=APP.path, env=env)
            self._wait_admin(log)
        wait_listening(self.ip, self.bulk_port, self.proc, log)
        wait_listening(self.ip, self.http_port, self.proc, log)
        time.sleep(0.5)

    def _wait_admin(self, log: Path) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        url = f"http://127.0.0.1:{self.ports['admin']}/api/v1/status"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench/proxy: appliance exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                status = json.load(urllib.request.urlopen(url, timeout=2))
                self.status0 = status["services"]["proxy"]
                return
            time.sleep(0.2)
        raise SystemExit(f"bench/proxy: appliance admin API not up in {READY_TIMEOUT:.0f} s")

    def proxy_status(self) -> Result | None:
        if not self.key.startswith("appliance"):
            return None
        url = f"http://127.0.0.1:{self.ports['admin']}/api/v1/status"
        with contextlib.suppress(OSError, ValueError):
            return json.load(urllib.request.urlopen(url, timeout=2))["services"]["proxy"]
        return None

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


# --- the two tests --------------------------------------------------------------------------


def measure(what: str, target: Target, backend_pid: int, args: argparse.Namespace) -> Result:
    best: Result | None = None
    for attempt in range(1 + args.retry_noisy):
        wait_quiet(args.wait_quiet)
        ours = [backend_pid] + ([target.proc.pid] if target.proc else [])
        if what == "bulk":
            argv = [
                "iperf3",
                "-c",
                target.ip,
                "-p",
                str(target.bulk_port),
                "-t",
                str(args.seconds),
                "-J",
            ]
        else:
            argv = [
                "wrk", "-c", str(args.wrk_connections), "-t", "2", "-d", f"{args.seconds}s",
                "-H", "Connection: close", "--latency",
                f"http://{target.ip}:{target.http_port}/tiny.txt",
            ]  # fmt: skip
        out, cpu = run_client(argv, ours, timeout=args.seconds + 30)
        res = parse_bulk(out) if what == "bulk" else parse_wrk(out)
        wall = cpu["wall"]
        res["proxy_cores"] = cpu["ours"].get(target.proc.pid, 0.0) / wall if target.proc else 0.0
        res["backend_cores"] = cpu["ours"][backend_pid] / wall
        res["client_cores"] = cpu["client"] / wall
        res["others_cores"] = max(
            0.0, (cpu["busy"] - sum(cpu["ours"].values()) - cpu["client"]) / wall
        )
        res["attempt"] = attempt + 1
        res["raw_tail"] = out[-1500:]
        print(f"  {target.label:22s} {what:5s} {summary(what, res)}", flush=True)
        if best is None or res["others_cores"] < best["others_cores"]:
            best = res
        if res["others_cores"] < BUSY and res.get("ok", True):
            break
    assert best is not None
    best["noisy"] = best["others_cores"] >= BUSY
    return best


def parse_bulk(out: str) -> Result:
    try:
        data = json.loads(out[out.index("{") :])
    except ValueError:
        return {"ok": False, "gbps": 0.0, "error": out[-500:]}
    if "error" in data and not data.get("end", {}).get("sum_received"):
        return {"ok": False, "gbps": 0.0, "error": data["error"]}
    end = data["end"]
    recv = end["sum_received"]["bits_per_second"] / 1e9
    cpu = end.get("cpu_utilization_percent", {})
    # iperf3's own CPU (percent of one core, user+system): the client side
    client = cpu.get("host_total", 0.0) / 100.0
    return {
        "ok": True,
        "gbps": recv,
        "retransmits": end.get("sum_sent", {}).get("retransmits"),
        "iperf_client_cores": client,
        "iperf_server_cores": cpu.get("remote_total", 0.0) / 100.0,
    }


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(out: str) -> Result:
    res: Result = {"ok": False, "rps": 0.0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res.update(ok=True, rps=float(m.group(1)))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        res["requests"] = int(m.group(1))
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if m:
            res[f"p{pct}_ms"] = _ms(m.group(1), m.group(2))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    return res


def summary(what: str, r: Result) -> str:
    tail = f"proxy {r['proxy_cores']:.2f} cores, others {r['others_cores']:.2f}"
    if not r.get("ok"):
        return f"FAILED ({r.get('error', r.get('raw_tail', '')[-200:])!r}) {tail}"
    if what == "bulk":
        return f"{r['gbps']:.2f} Gbit/s ({tail})"
    return (
        f"{r['rps']:,.0f} req/s p50 {r.get('p50_ms', 0):.2f} ms p99 {r.get('p99_ms', 0):.2f} ms"
        f" errors {r['socket_errors']} ({tail})"
    )


def profile(target: Target, backend_pid: int, args: argparse.Namespace) -> Result:
    """py-spy on the appliance during one wrk run (and one iperf3 run when asked)."""
    assert target.proc is not None
    found: Result = {}
    for what in args.profile.split(","):
        raw = WORK / f"pyspy-{what}.txt"
        spy = _start(
            "py-spy",
            ["py-spy", "record", "--native", "-r", "200", "-f", "raw",
             "-o", str(raw), "-p", str(target.proc.pid), "-d", str(args.seconds + 2)],
            WORK / f"pyspy-{what}.out",
        )  # fmt: skip
        time.sleep(1.0)
        r = measure(
            what, target, backend_pid, argparse.Namespace(**{**vars(args), "retry_noisy": 0})
        )
        spy.wait(args.seconds + 30)
        _stop(spy)
        found[what] = {"result": r, "hot": hot_frames(raw)}
    return found


def hot_frames(raw: Path, top: int = 12) -> Result:
    """The hottest leaves (Python or native) with three callers, from py-spy's raw stacks."""
    stacks: dict[str, int] = {}
    total = 0
    if not raw.exists():
        return {"total": 0, "top": []}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r" \(.*\)$", "", f) for f in stack.split(";")]
        key = " < ".join(reversed(frames[-4:]))
        stacks[key] = stacks.get(key, 0) + n
    best = sorted(stacks.items(), key=lambda kv: -kv[1])[:top]
    return {"total": total, "top": best}


# --- report ----------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        import uvloop  # type: ignore[import-not-found]

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    return (
        f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}, "
        f"Python {platform.python_version()} ({loop})"
    )


def versions() -> str:
    def first(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (out.stdout + out.stderr).strip().splitlines()[0]

    hap = first(["haproxy", "-v"]).split(" - ")[0]
    return "; ".join(
        [hap, first(["nginx", "-v"]).replace("nginx version: ", ""),
         first(["iperf3", "--version"]).split(" (")[0], first(["wrk", "--version"]).split(" [")[0]]
    )  # fmt: skip


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render(
    results: dict[str, Result], labels: dict[str, str], args: argparse.Namespace, meta: Result
) -> str:
    r = results
    hap = r.get("haproxy", {})
    lines = [
        BEGIN,
        "## Proxy (TCP load balancer)",
        "",
        "Everything on loopback. Backends on the worker's address 127.0.0.44: an iperf3 server"
        " (long-running) and nginx (one worker, no access log, `keepalive_timeout 0`) serving a"
        " 13-byte file. The inventory has one worker, so each ingress frontend has exactly one"
        ' backend and "direct" is the same single server the proxies talk to (iperf3\'s control'
        " and data connections must reach the same server, and a second nginx behind the proxies"
        ' would give them twice the backend capacity of "direct"). The appliance'
        " (`python -m appliance run`, only the proxy's ingress_http/ingress_https frontends and the"
        " admin API on, `ingress_check: tcp`, `check_interval: 3600`) on 127.0.0.54, once with its"
        " splice() pump and once with `APPLIANCE_NO_SPLICE=1` (recv/send); HAProxy on 127.0.0.55"
        " with a hand-written config of the same two frontends: `mode tcp`, `nbthread 1` (one"
        " thread, like the one Python process), no logging, no health checks; without splice"
        " (HAProxy's default) and with `option splice-auto`. Bulk: `iperf3 -c ADDR -p PORT"
        f" -t {args.seconds}` (one stream, client to server; Gbit/s received). New connections:"
        f" `wrk -c {args.wrk_connections} -t 2 -d {args.seconds}s -H 'Connection: close' --latency`"
        " (every request a new TCP connection through the proxy and a new one to nginx).",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Appliance: {meta['source']}  ",
        f"Versions: {meta['versions']}  ",
        f"Date: {meta['date']}",
        "",
        "| target | bulk Gbit/s | vs direct | vs HAProxy | proxy cores (bulk) | new conn/s"
        " | p50 ms | p99 ms | vs direct | vs HAProxy | proxy cores (conn) | errors"
        " | others' cores |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    dr = r.get("direct", {})
    for key, label in labels.items():
        if key not in r:
            continue
        b, c = r[key].get("bulk"), r[key].get("conn")

        def ratio(x: Result | None, base: Result | None, field: str) -> str:
            if not x or not base or not x.get("ok") or not base.get("ok") or not base.get(field):
                return "-"
            return fmt_ratio(x[field] / base[field])

        cells = [label]
        if b:
            cells += [
                f"{b['gbps']:.2f}" if b.get("ok") else "failed",
                ratio(b, dr.get("bulk"), "gbps"),
                ratio(b, hap.get("bulk"), "gbps") if key != "haproxy" else "1.00x",
                f"{b['proxy_cores']:.2f}" if key != "direct" else "-",
            ]
        else:
            cells += ["-"] * 4
        if c:
            cells += [
                f"{c['rps']:,.0f}" if c.get("ok") else "failed",
                f"{c.get('p50_ms', 0):.2f}",
                f"{c.get('p99_ms', 0):.2f}",
                ratio(c, dr.get("conn"), "rps"),
                ratio(c, hap.get("conn"), "rps") if key != "haproxy" else "1.00x",
                f"{c['proxy_cores']:.2f}" if key != "direct" else "-",
                str(c["socket_errors"] + c["non2xx"]),
            ]
        else:
            cells += ["-"] * 7
        noisy = [x for x in (b, c) if x and x.get("noisy")]
        others = max((x["others_cores"] for x in (b, c) if x), default=0.0)
        cells.append(f"{others:.2f}" + (" (!)" if noisy else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "proxy cores: CPU of the proxy process / wall time of the run (a core is 1.00);"
        " errors: wrk's socket errors plus non-2xx responses; others' cores: CPU used by"
        " anything on the machine but the proxy, the backend server and the client during"
        " the run, (!) marks a run that stayed above 0.2 after waiting and"
        " repeating.",
        "",
    ]
    lines += meta["verdicts"]
    if meta.get("notes"):
        lines += ["", *meta["notes"]]
    lines += [END]
    return "\n".join(lines) + "\n"


def verdicts(results: dict[str, Result]) -> list[str]:
    out = []
    hap = results.get("haproxy", {})
    for key, label in (("appliance", "splice"), ("appliance_plain", "recv/send")):
        app = results.get(key, {})
        for what, field, goal, name in (
            ("bulk", "gbps", GOAL_BULK, "bulk throughput"),
            ("conn", "rps", GOAL_CPS, "new connections/s"),
        ):
            a, h = app.get(what), hap.get(what)
            if not a or not h or not a.get("ok") or not h.get("ok"):
                out.append(f"- appliance ({label}), {name}: not measured.")
                continue
            ratio = a[field] / h[field]
            met = "met" if ratio >= goal else "**missed**"
            out.append(
                f"- appliance ({label}), {name}: {ratio:.2f}x HAProxy's (goal {goal}x): {met}."
            )
    return out


def computed_notes(results: dict[str, Result]) -> list[str]:
    out = []
    for key, label in (
        ("haproxy", "HAProxy (no splice)"),
        ("haproxy_splice", "HAProxy (splice-auto)"),
        ("appliance", "appliance (splice)"),
        ("appliance_plain", "appliance (recv/send)"),
    ):
        c = results.get(key, {}).get("conn")
        if c and c.get("ok") and c["rps"]:
            out.append(
                f"- {label}: {1e6 * c['proxy_cores'] / c['rps']:.0f} us of CPU per proxied"
                f" connection ({c['proxy_cores']:.2f} cores at {c['rps']:,.0f}/s)."
            )
    return out


def profile_notes(profiles: Result) -> list[str]:
    out = []
    for what, pr in profiles.items():
        hot = pr["hot"]
        r = pr["result"]
        rate = f"{r['rps']:,.0f} req/s" if what == "conn" else f"{r.get('gbps', 0):.2f} Gbit/s"
        out.append(
            f"py-spy `--native` on the appliance (splice) during one more {what} run ({rate}"
            f" while sampled, {hot['total']} samples of the main thread), hottest stacks"
            " (leaf < callers):"
        )
        out.append("")
        out += [f"- {100 * n / max(1, hot['total']):.1f}% `{name}`" for name, n in hot["top"][:8]]
        out.append("")
    return out


# Found by hand on this machine (2026-11-28), with the appliance behind wrk as above:
# `strace -c -f -p`, `perf record -g -p`, `py-spy record`, and the CPU per connection from
# /proc/PID/task/*/schedstat over a wrk run (steady under other load, unlike the rates).
ANALYSIS = [
    "Where the appliance's time goes on short connections (by hand, same setup: `strace -c"
    " -f -p`, `perf record -g -p`, `py-spy record`, CPU per connection from"
    " /proc/PID/task/*/schedstat over 5 s wrk runs):",
    "",
    "- Before (commit 8d6c745, uvloop `add_reader`/`remove_reader` per socket and"
    " direction): 100-110 us of CPU per proxied connection, the proxy CPU-bound at one"
    " core, 43 system calls per connection against HAProxy's 18: 18 `epoll_ctl` (each"
    " `add_reader` made a libuv poll handle: an epoll ADD+DEL probe and an"
    " `ioctl(FIONBIO)`; each `remove_reader` a DEL and a second DEL failing with ENOENT),"
    " 5 `ioctl`, 3 `getpid` (`asyncio.get_running_loop()`), a `getsockopt(SO_ERROR)` per"
    " connect. Its last conn-only run, the same day: 8,698/s against HAProxy's 22,845/s"
    " (0.38x) at 0.97 cores, about 111 us per connection against HAProxy's 35.",
    "- Now: every proxied socket sits in one edge-triggered epoll set of the proxy's own"
    " (services/proxy/poller.py), registered once with EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET"
    " and taken out by its close(); uvloop watches only that set's descriptor. Handlers"
    " read and write until EAGAIN (a short read means the queue is empty), so interest"
    " never changes. The client's first bytes go to the backend right after the"
    " non-blocking connect() (on loopback the kernel has finished the handshake; EAGAIN"
    " waits for the write edge; an error there is a failed connect and the held bytes go"
    " to the next backend). One timer per frontend checks connect deadlines (no"
    " TimerHandle per connection); upstream sockets are made with SOCK_NONBLOCK; the last"
    " FIN goes with close() instead of shutdown() + close().",
    "- System calls per connection now 18, HAProxy's count: accept4, getsockname (Python's"
    " socket object checks the descriptor), ioctl(FIONBIO), 2 setsockopt(TCP_NODELAY),"
    " socket, connect, 2 epoll_ctl, 4 recvfrom, 2 sendto, 1 shutdown, 2 close.",
    "- perf now: 63% kernel (loopback TCP, the same work HAProxy's ~35 us consist of), 30%"
    " CPython interpreter, 5% libc, under 1% uvloop. What is left over HAProxy is the"
    " interpreter: the accept loop, a Connection and two Direction objects, 4-5 edge"
    " callbacks per connection (about 15-20 us).",
    "",
    "Bulk varies run to run (one 10 s iperf3 stream each) and with the load others put on"
    " this 2-core machine; the CPU per connection is the steadier figure.",
    "",
    "The task's reference figures (one HAProxy thread without splice: 10.9 Gbit/s bulk"
    " against 29.7 direct, 9,600 new connections/s against 18,500) came from another setup;"
    " the ratios above are from this run only, all targets measured back to back.",
]


def write_doc(section: str) -> None:
    write_section(section, BEGIN, END)


# --- main --------------------------------------------------------------------------------------


LABELS = {
    "direct": "direct (no proxy)",
    "haproxy": "HAProxy, no splice",
    "haproxy_splice": "HAProxy, splice-auto",
    "appliance": "appliance, splice",
    "appliance_plain": "appliance, recv/send",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--wrk-connections", type=int, default=32)
    p.add_argument(
        "--targets",
        default="direct,haproxy,haproxy_splice,appliance,appliance_plain",
        help="comma-separated subset",
    )
    p.add_argument("--tests", default="bulk,conn")
    p.add_argument("--wait-quiet", type=float, default=120.0, help="seconds, per measurement")
    p.add_argument("--retry-noisy", type=int, default=1)
    p.add_argument(
        "--profile", default="", help="bulk,conn: py-spy the appliance (splice) during these"
    )
    p.add_argument("--rev", help="run the appliance from a `git archive` of this commit")
    p.add_argument("--json", type=Path)
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--from-json", type=Path, help="re-render the doc section from a --json file")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results, meta, profiles = saved["results"], saved["meta"], saved["profiles"]
        meta["verdicts"] = verdicts(results)
        meta["notes"] = [*computed_notes(results), "", *ANALYSIS]
        if profiles:
            meta["notes"] += ["", *profile_notes(profiles)]
        write_doc(
            render(
                results, LABELS, argparse.Namespace(**{**vars(args), **meta.get("args", {})}), meta
            )
        )
        print(f"re-rendered the proxy section of {DOC} from {args.from_json}")
        return 0

    labels = LABELS
    global WORK, PIDS
    if not os.environ.get("BPX_WORK"):
        WORK = Path(tempfile.mkdtemp(prefix="bench-proxy."))
        PIDS = WORK / "pids"
        CHILDREN.pids = PIDS
    chosen = [t for t in args.targets.split(",") if t]
    tests = [t for t in args.tests.split(",") if t]
    ports = {
        "iperf": free_port(BACKEND_IP),
        "nginx": free_port(BACKEND_IP),
        "bulk": free_port(APP_IP),
        "http": free_port(APP_IP),
        "admin": free_port("127.0.0.1"),
    }
    results: dict[str, Result] = {}
    profiles: Result = {}
    started = time.monotonic()
    if args.rev:
        APP.use_rev(args.rev, WORK)
    try:
        # backends
        www = WORK / "nginx" / "www"
        www.mkdir(parents=True)
        (WORK / "nginx" / "tmp").mkdir()
        (www / "tiny.txt").write_text("hello, proxy\n")
        nconf = WORK / "nginx" / "nginx.conf"
        nconf.write_text(NGINX_CONF.format(d=WORK / "nginx", ip=BACKEND_IP, port=ports["nginx"]))
        nlog = WORK / "nginx" / "out"
        nginx = _start("nginx", ["nginx", "-c", str(nconf), "-p", str(WORK / "nginx")], nlog)
        wait_listening(BACKEND_IP, ports["nginx"], nginx, nlog)
        ilog = WORK / "iperf3.out"
        iperf = _start(
            "iperf3", ["iperf3", "-s", "-B", BACKEND_IP, "-p", str(ports["iperf"])], ilog
        )
        wait_listening(BACKEND_IP, ports["iperf"], iperf, ilog)

        for key in chosen:
            t = Target(key, labels[key], {"direct": BACKEND_IP, "haproxy": HAP_IP,
                       "haproxy_splice": HAP_IP}.get(key, APP_IP), ports)  # fmt: skip
            t.start()
            print(f"{t.label}:", flush=True)
            try:
                results[key] = {}
                for what in tests:
                    pid = iperf.pid if what == "bulk" else nginx.pid
                    results[key][what] = measure(what, t, pid, args)
                st = t.proxy_status()
                if st is not None:
                    results[key]["status"] = st
                if key == "appliance" and args.profile:
                    profiles = profile(t, nginx.pid, args)
            finally:
                t.stop()
    finally:
        _stop_children()

    meta = {
        "command": "bench/proxy/run.sh " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "source": APP.describe(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "verdicts": verdicts(results),
        "notes": [*computed_notes(results), "", *ANALYSIS],
        "args": {"seconds": args.seconds, "wrk_connections": args.wrk_connections},
    }
    print("\n".join(meta["verdicts"]))
    if profiles:
        for what, pr in profiles.items():
            hot = pr["hot"]
            print(f"\npy-spy --native during {what} ({hot['total']} samples of the main thread):")
            for name, n in hot["top"]:
                print(f"  {100 * n / max(1, hot['total']):5.1f}%  {name}")
        meta["notes"] += ["", *profile_notes(profiles)]
    if args.json:
        args.json.write_text(
            json.dumps(
                {"results": results, "meta": meta, "profiles": profiles}, indent=1, default=str
            )
        )
    if not args.no_doc:
        write_doc(render(results, labels, args, meta))
        print(f"wrote the proxy section of {DOC}")
    print(f"bench/proxy: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
