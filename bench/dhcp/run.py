"""DHCP benchmark: the appliance's dhcp service against dnsmasq and kea-dhcp4, one run.

Run through bench/dhcp/run.sh (root; it installs perfdhcp, kea-dhcp4, dnsmasq and
uvloop when missing). Steps:
  1. two network namespaces, bdh-srv-<tag> (192.0.2.1) and bdh-cli-<tag> (192.0.2.2),
     joined by a veth pair; both ends are /20 (192.0.0.0/20) so the relay address,
     the servers' address and the pool share one subnet;
  2. one pool of 2,000 addresses, 192.0.8.1-192.0.15.208, lease time 3600 s, for all
     three servers: an appliance inventory (only listen.dhcp 0.0.0.0:67 and the admin
     API on 127.0.0.1 on), the dnsmasq config `appliance render --as dnsmasq` prints for
     it (log-dhcp removed, quiet-dhcp and no-ping added: neither other server logs
     per lease or pings; the appliance's ping check is off too, dhcp_ping_wait 0),
     and a kea-dhcp4 config with the same subnet, pool, options and
     reservation (memfile, persist true);
  3. each server in turn in the server namespace, fresh lease store, then perfdhcp in
     the client namespace as a relay (`-l 192.0.2.2`: giaddr 192.0.2.2, unicast to
     192.0.2.1:67, replies to the relay's port 67), `-R 2000` clients, each offered
     rate for --period seconds, 1 s to collect late replies (-W), a reply later than
     1 s (-d) counts as dropped;
  4. per run: DISCOVERs sent, ACKs received, completed exchanges per second (ACKs /
     period), completion (ACKs / DISCOVERs), DISCOVER-OFFER and REQUEST-ACK delays,
     the server's CPU, UDP receive-buffer overflows in each namespace (who dropped),
     and the CPU everything else on the machine used (a noisy neighbour shows there);
  5. durability: (a) syncs per ACK, from `strace -c` on each server during a short
     run at 250/s (fsync/fdatasync calls against ACKs); (b) after its sweep each
     server is killed with SIGKILL and every address perfdhcp saw ACKed must be
     in its lease store; (c) the appliance once more from an empty store, SIGKILLed
     in the middle of a 2,000/s run: every lease ACKed before the kill must be in
     SQLite;
  6. a table, optional JSON, and the "DHCP" section of docs/benchmarks.md (between
     <!-- dhcp:begin --> and <!-- dhcp:end -->; the rest of the file is left alone).
--profile RATE records the appliance with py-spy (speedscope JSON and a text summary
of the hottest frames) during that rate's run.
Traffic stays inside the two namespaces; every run and every wait is bounded.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import (
    DOC,
    AppSource,
    Children,
    children_cpu,
    machine_busy,
    stat_cpu,
    write_section,
)
from bench.common import wait_quiet as common_wait_quiet

Result = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- dhcp:begin -->", "<!-- dhcp:end -->"
APPLIANCE = (sys.executable, "-m", "appliance")
APP = AppSource()  # the code the appliance runs from; --rev REV: a `git archive` of REV

SERVER_IP, CLIENT_IP, PREFIX = "192.0.2.1", "192.0.2.2", 20
SUBNET = ipaddress.ip_network(f"{SERVER_IP}/{PREFIX}", strict=False)  # 192.0.0.0/20
POOL = ("192.0.8.1", "192.0.15.208")  # 2,000 addresses, clear of 192.0.2.x
LEASE_TIME = 3600
# dnsmasq's default dhcp-lease-max is 1,000: without this it leases half the pool.
LEASE_MAX = int(ipaddress.ip_address(POOL[1])) - int(ipaddress.ip_address(POOL[0])) + 1 + 1
DOMAIN = "bench.example.com"
NODE = {"name": "master-0", "role": "master", "mac": "52:54:00:00:00:50", "ip": "192.0.2.50"}
LB = "192.0.2.54"
GOAL_RATE = 2000
READY_TIMEOUT = 20.0
KILL_AFTER = 1000  # leases committed before the crash test's SIGKILL
BUSY = 0.2  # cores used by others above which a run is flagged as noisy

SERVERS = ("appliance", "dnsmasq", "kea")
LABEL = {"appliance": "appliance", "dnsmasq": "dnsmasq", "kea": "kea-dhcp4"}

# --- processes: started here, stopped here by PID ------------------------------------

WORK = Path(os.environ.get("BDH_WORK") or tempfile.mkdtemp(prefix="bench-dhcp."))
PIDS = WORK / "pids"
CHILDREN = Children("bench/dhcp", PIDS)
_start, _stop, _stop_children, _on_signal = (
    CHILDREN.start,
    CHILDREN.stop,
    CHILDREN.stop_all,
    CHILDREN.on_signal,
)


# --- namespaces ---------------------------------------------------------------------------


class Netns:
    def __init__(self, tag: str) -> None:
        self.srv, self.cli = f"bdh-srv-{tag}", f"bdh-cli-{tag}"
        self.vsrv, self.vcli = f"bdhs{tag}"[:15], f"bdhc{tag}"[:15]

    def up(self) -> None:
        ip = ["ip"]
        for ns in (self.srv, self.cli):
            subprocess.run([*ip, "netns", "add", ns], check=True)
        subprocess.run(
            [*ip, "link", "add", self.vsrv, "type", "veth", "peer", "name", self.vcli], check=True
        )
        for ns, dev, addr in ((self.srv, self.vsrv, SERVER_IP), (self.cli, self.vcli, CLIENT_IP)):
            subprocess.run([*ip, "link", "set", dev, "netns", ns], check=True)
            subprocess.run(
                [*ip, "-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev], check=True
            )
            subprocess.run([*ip, "-n", ns, "link", "set", dev, "up"], check=True)
            subprocess.run([*ip, "-n", ns, "link", "set", "lo", "up"], check=True)

    def down(self) -> None:
        for ns in (self.srv, self.cli):
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)

    def run(self, ns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], text=True, **kw)

    def udp_rcvbuf_errors(self, ns: str) -> int:
        text = self.run(ns, ["cat", "/proc/net/snmp"], capture_output=True, check=True).stdout
        rows = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
        return int(dict(zip(rows[0][1:], rows[1][1:], strict=True))["RcvbufErrors"])

    def port67_bound(self) -> bool:
        out = self.run(self.srv, ["ss", "-Hlun", "sport = :67"], capture_output=True, check=False)
        return bool(out.stdout.strip())


# --- the three servers ----------------------------------------------------------------------


def write_inventory(d: Path, admin_port: int) -> Path:
    inv = {
        "cluster": {"name": "bench", "base_domain": "example.com", "ignition_dir": "ignition"},
        "network": {
            "address": SERVER_IP,
            "subnet": str(SUBNET),
            "dhcp_range": list(POOL),
            "lease_time": LEASE_TIME,
        },
        "load_balancer": {"address": LB},
        "boot": {"tftp_root": "tftp", "images_dir": "images"},
        "nodes": [NODE],
        "listen": {
            "dns": None,
            "dhcp": "0.0.0.0:67",
            "tftp": None,
            "http": None,
            "api": None,
            "machine_config": None,
            "ingress_http": None,
            "ingress_https": None,
            "admin": f"127.0.0.1:{admin_port}",
        },
        "kubernetes": {"approve_csrs": False, "gpu_operator": False},
        "state_dir": "state",
    }
    d.mkdir(parents=True, exist_ok=True)
    if "dhcp_ping_wait" in (APP.path / "appliance" / "inventory.py").read_text():
        # As dnsmasq's --no-ping below (kea does not ping either). Older code (--rev)
        # has no ping check and would refuse the key.
        network = inv["network"]
        assert isinstance(network, dict)
        network["dhcp_ping_wait"] = 0
    path = d / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def dnsmasq_conf(inventory: Path, d: Path) -> Path:
    """What `appliance render --as dnsmasq` prints, less per-lease logging."""
    text = subprocess.run(
        [*APPLIANCE, "render", "--as", "dnsmasq", "--config", str(inventory)],
        capture_output=True, text=True, check=True, cwd=APP.path, env=APP.env(),
    ).stdout  # fmt: skip
    if f"dhcp-range={POOL[0]},{POOL[1]}," not in text:
        raise SystemExit(f"bench/dhcp: rendered dnsmasq config lacks the pool:\n{text}")
    lines = [line for line in text.splitlines() if line.strip() != "log-dhcp"]
    path = d / "dnsmasq.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def kea_conf(d: Path, interface: str) -> Path:
    conf = {
        "Dhcp4": {
            "interfaces-config": {"interfaces": [interface], "dhcp-socket-type": "udp"},
            "lease-database": {
                "type": "memfile",
                "persist": True,
                "name": str(d / "kea-leases4.csv"),
                "lfc-interval": 0,
            },
            "valid-lifetime": LEASE_TIME,
            "renew-timer": LEASE_TIME // 2,
            "rebind-timer": LEASE_TIME * 7 // 8,
            "option-data": [
                {"name": "domain-name-servers", "data": SERVER_IP},
                {"name": "domain-name", "data": DOMAIN},
            ],
            "subnet4": [
                {
                    "id": 1,
                    "subnet": str(SUBNET),
                    "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}],
                    "reservations": [
                        {
                            "hw-address": NODE["mac"],
                            "ip-address": NODE["ip"],
                            "hostname": NODE["name"],
                        }
                    ],
                }
            ],
            "loggers": [
                {
                    "name": "kea-dhcp4",
                    "output_options": [{"output": str(d / "kea.log")}],
                    "severity": "WARN",
                }
            ],
        }
    }
    path = d / "kea-dhcp4.json"
    path.write_text(json.dumps(conf, indent=2))
    return path


class Server:
    def __init__(self, kind: str, net: Netns, d: Path, admin_port: int) -> None:
        self.kind, self.net, self.d, self.admin_port = kind, net, d, admin_port
        self.proc: subprocess.Popen[bytes] | None = None
        d.mkdir(parents=True, exist_ok=True)
        if kind == "appliance":
            self.inventory = write_inventory(d, admin_port)
        elif kind == "dnsmasq":
            self.conf = dnsmasq_conf(write_inventory(d / "render", admin_port), d)
        else:
            self.conf = kea_conf(d, net.vsrv)

    def argv(self) -> list[str]:
        if self.kind == "appliance":
            return [*APPLIANCE, "run", "--config", str(self.inventory)]
        if self.kind == "dnsmasq":
            return [
                "dnsmasq", "--no-daemon", f"--conf-file={self.conf}",
                f"--interface={self.net.vsrv}", "--bind-interfaces", "--dhcp-authoritative",
                f"--dhcp-leasefile={self.d / 'dnsmasq.leases'}", "--port=0",
                f"--pid-file={self.d / 'dnsmasq.pid'}", "--no-hosts", "--no-resolv",
                "--quiet-dhcp", "--no-ping", f"--log-facility={self.d / 'dnsmasq.log'}",
                f"--dhcp-lease-max={LEASE_MAX}",
            ]  # fmt: skip
        return ["kea-dhcp4", "-c", str(self.conf)]

    def start(self) -> subprocess.Popen[bytes]:
        env = dict(APP.env(), KEA_PIDFILE_DIR=str(self.d), KEA_LOCKFILE_DIR=str(self.d))
        argv = ["ip", "netns", "exec", self.net.srv, *self.argv()]  # ip execs: same PID
        self.proc = _start(self.kind, argv, self.d / "server.out", cwd=APP.path, env=env)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"bench/dhcp: {self.kind} exited ({self.proc.returncode}):\n"
                    + (self.d / "server.out").read_text()[-3000:]
                )
            if self.net.port67_bound() and (self.kind != "appliance" or self.status()):
                time.sleep(0.3)
                return self.proc
            time.sleep(0.1)
        raise SystemExit(f"bench/dhcp: {self.kind} not ready in {READY_TIMEOUT:.0f} s")

    def status(self) -> Result | None:
        """The appliance's dhcp counters from its admin API (inside the server namespace)."""
        code = (
            "import json,sys,urllib.request as u;"
            f"d=json.load(u.urlopen('http://127.0.0.1:{self.admin_port}/api/v1/status',timeout=2));"
            "print(json.dumps(d['services']['dhcp']))"
        )
        out = self.net.run(
            self.net.srv, [sys.executable, "-c", code], capture_output=True, check=False
        )
        return json.loads(out.stdout) if out.returncode == 0 else None

    def leases(self) -> set[str]:
        """Addresses the server's lease store holds as leased now."""
        now = time.time()
        if self.kind == "appliance":
            db = self.d / "state" / "appliance.db"
            with contextlib.closing(sqlite3.connect(db)) as conn:
                rows = conn.execute(
                    "SELECT ip FROM leases WHERE state = 'bound' AND expires > ?", (now,)
                )
                return {r[0] for r in rows}
        if self.kind == "dnsmasq":
            path = self.d / "dnsmasq.leases"
            found = set()
            for line in path.read_text().splitlines() if path.exists() else []:
                f = line.split()
                if len(f) >= 3 and (int(f[0]) == 0 or int(f[0]) > now):
                    found.add(f[2])
            return found
        last: dict[str, tuple[int, int, str]] = {}
        path = self.d / "kea-leases4.csv"
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            f = line.split(",")
            if len(f) >= 10:
                last[f[0]] = (int(f[3]), int(f[4]), f[9])  # valid_lifetime, expire, state
        return {
            ip for ip, (valid, exp, st) in last.items() if valid > 0 and exp > now and st == "0"
        }


# --- measuring ----------------------------------------------------------------------------


def wait_quiet(limit: float) -> float:
    return common_wait_quiet(limit, BUSY)


def _section(text: str, title: str) -> str:
    m = re.search(rf"\*\*\*Statistics for: {title}\*\*\*(.*?)(?=\*\*\*|\Z)", text, re.S)
    return m.group(1) if m else ""


def _num(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def parse_perfdhcp(text: str) -> Result:
    out: Result = {"rate_reported": _num(r"Rate: ([\d.]+)", text)}
    for key, title in (("do", "DISCOVER-OFFER"), ("ra", "REQUEST-ACK")):
        sec = _section(text, title)
        out[key] = {
            "sent": int(_num(r"sent packets: (\d+)", sec) or 0),
            "received": int(_num(r"received packets: (\d+)", sec) or 0),
            "drops": int(_num(r"drops: (\d+)", sec) or 0),
            "orphans": int(_num(r"orphans: (\d+)", sec) or 0),
            "rejected": int(_num(r"rejected leases: (\d+)", sec) or 0),
            "min_ms": _num(r"min delay: ([\d.]+) ms", sec),
            "avg_ms": _num(r"avg delay: ([\d.]+) ms", sec),
            "max_ms": _num(r"max delay: ([\d.]+) ms", sec),
        }
    m = re.search(r"\*\*\*Leases for REQUEST-ACK\*\*\*\n(.*?)(?:\n\n|\Z)", text, re.S)
    acked = set()
    if m:
        for line in m.group(1).splitlines()[1:]:
            f = line.split(",")
            if len(f) >= 2 and f[1]:
                acked.add(f[1])
    out["acked"] = acked
    return out


def perfdhcp_argv(rate: int, period: float, clients: int, base_mac: str | None = None) -> list[str]:
    argv = ["perfdhcp", "-4", "-g", "multi", "-l", CLIENT_IP, "-R", str(clients)]
    if base_mac:
        argv += ["-b", f"mac={base_mac}"]
    argv += ["-r", str(rate), "-p", f"{period:g}", "-d", "1", "-W", "1000000", "-x", "l", SERVER_IP]
    return argv


def run_rate(
    net: Netns, server: Server, rate: int, period: float, clients: int, profile: Path | None
) -> Result:
    pid = server.proc.pid if server.proc else 0
    st0 = server.status() if server.kind == "appliance" else None
    srv0, cli0 = net.udp_rcvbuf_errors(net.srv), net.udp_rcvbuf_errors(net.cli)
    cpu0, kids0, busy0, t0 = stat_cpu(pid), children_cpu(), machine_busy(), time.monotonic()
    spy = None
    if profile is not None:
        spy = subprocess.Popen(
            ["py-spy", "record", "--nonblocking", "-r", "250", "-d", f"{period + 1:g}",
             "-p", str(pid), "-f", "raw", "-o", str(profile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        time.sleep(0.5)
    out = net.run(
        net.cli, perfdhcp_argv(rate, period, clients), capture_output=True,
        timeout=period + 30, check=False,
    )  # fmt: skip
    wall = time.monotonic() - t0
    cpu1, kids1, busy1 = stat_cpu(pid), children_cpu(), machine_busy()
    if spy is not None:
        spy.wait(period + 30)
    if out.returncode not in (0, 3):
        raise SystemExit(
            f"bench/dhcp: perfdhcp failed ({out.returncode}):\n{out.stdout}{out.stderr}"
        )
    r = parse_perfdhcp(out.stdout)
    time.sleep(0.3)
    srv1, cli1 = net.udp_rcvbuf_errors(net.srv), net.udp_rcvbuf_errors(net.cli)
    st1 = server.status() if server.kind == "appliance" else None
    server_cpu = cpu1 - cpu0
    client_cpu = kids1 - kids0  # perfdhcp (and the status probes, a few ms)
    sent, acks = r["do"]["sent"], r["ra"]["received"]
    res: Result = {
        "server": server.kind,
        "rate": rate,
        "period": period,
        "discovers": sent,
        "offers": r["do"]["received"],
        "requests": r["ra"]["sent"],
        "acks": acks,
        "completed_per_s": acks / period,
        "completion": acks / sent if sent else 0.0,
        "do": r["do"],
        "ra": r["ra"],
        "rate_reported": r["rate_reported"],
        "server_cpu_s": server_cpu,
        "server_cpu_ms_per_dora": 1000 * server_cpu / acks if acks else None,
        "client_cpu_s": client_cpu,
        "others_cores": max(0.0, (busy1 - busy0 - server_cpu - client_cpu) / wall),
        "rcvbuf_drops_server": srv1 - srv0,
        "rcvbuf_drops_client": cli1 - cli0,
        "acked": r["acked"],
    }
    if st0 and st1:
        c0, c1 = st0.get("counters", {}), st1.get("counters", {})
        d = {
            k: c1.get(k, 0) - c0.get(k, 0)
            for k in ("received", "sent", "commits", "leases_committed", "commit_failures")
        }
        d["batch_mean"] = d["leases_committed"] / d["commits"] if d["commits"] else None
        res["appliance"] = d
    return res


def sync_probe(net: Netns, server: Server, period: float, clients: int) -> Result | None:
    """fsync/fdatasync calls per ACK, from strace -c on the server during a 250/s run."""
    if not shutil.which("strace") or server.proc is None:
        return None
    log = server.d / "strace.txt"
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,sync_file_range,msync",
         "-o", str(log), "-p", str(server.proc.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)
    out = net.run(
        net.cli, perfdhcp_argv(250, period, clients), capture_output=True,
        timeout=period + 30, check=False,
    )  # fmt: skip
    time.sleep(0.5)
    tracer.send_signal(signal.SIGINT)
    try:
        tracer.wait(10)
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait(5)
    calls = 0
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[-1] in ("fsync", "fdatasync", "sync_file_range", "msync"):
                calls += int(f[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
    acks = parse_perfdhcp(out.stdout)["ra"]["received"]
    return {"syncs": calls, "acks": acks, "per_ack": calls / acks if acks else None}


def crash_test(net: Netns, d: Path, admin_port: int, rate: int, clients: int) -> Result:
    """The appliance from an empty store, SIGKILLed mid-run: ACKed leases must be in SQLite.

    The kill comes once the appliance reports KILL_AFTER leases committed (or after 5 s),
    so hundreds of exchanges are in flight: offered, requested, in a batch being written.
    """
    server = Server("appliance", net, d, admin_port)
    proc = server.start()
    argv = ["ip", "netns", "exec", net.cli]
    argv += perfdhcp_argv(rate, 3.0, clients, base_mac="00:0c:02:00:00:00")
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0, committed = time.monotonic(), 0
    try:
        while time.monotonic() - t0 < 5.0 and committed < KILL_AFTER:
            status = server.status() or {}
            committed = status.get("counters", {}).get("leases_committed", 0)
        os.kill(proc.pid, signal.SIGKILL)
        killed_after = time.monotonic() - t0
        out, _ = client.communicate(timeout=40)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)
    _stop(proc)
    acked = parse_perfdhcp(out)["acked"]
    stored = server.leases()
    return {
        "rate": rate,
        "killed_after_s": round(killed_after, 2),
        "committed_seen": committed,
        "acked": len(acked),
        "stored": len(stored),
        "missing": len(acked - stored),
    }


# --- report -------------------------------------------------------------------------------


def machine() -> Result:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def first_line(argv: list[str]) -> str:
        p = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (p.stdout or p.stderr).strip().split("\n")[0]

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
        "dnsmasq": first_line(["dnsmasq", "--version"]).split("  ")[0],
        "kea": "kea-dhcp4 " + first_line(["kea-dhcp4", "-v"]),
        "perfdhcp": "perfdhcp " + first_line(["perfdhcp", "-v"]),
        "disk": first_line(["sh", "-c", f"df -T {WORK} | tail -1 | awk '{{print $1\" \"$2}}'"]),
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.0f}")


def table(results: list[Result]) -> list[str]:
    rows = [
        "| server | offered/s | DISCOVERs | ACKs | completed/s | completion | D-O avg / max ms "
        "| R-A avg / max ms | server CPU ms/DORA | leases per fsync | rcvbuf drops srv / cli "
        "| others' cores |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        noisy = " (!)" if r["others_cores"] > BUSY else ""
        cpu = r["server_cpu_ms_per_dora"]
        mean = (r.get("appliance") or {}).get("batch_mean")
        batch = "-" if mean is None else f"{mean:.1f}"
        rows.append(
            f"| {LABEL[r['server']]} | {r['rate']:,} | {r['discovers']:,} | {r['acks']:,} "
            f"| {r['completed_per_s']:,.0f} | {100 * r['completion']:.1f}% "
            f"| {_ms(r['do']['avg_ms'])} / {_ms(r['do']['max_ms'])} "
            f"| {_ms(r['ra']['avg_ms'])} / {_ms(r['ra']['max_ms'])} "
            f"| {'-' if cpu is None else f'{cpu:.3f}'} | {batch} "
            f"| {r['rcvbuf_drops_server']:,} / {r['rcvbuf_drops_client']:,} "
            f"| {r['others_cores']:.2f}{noisy} |"
        )
    return rows


def verdicts(results: list[Result], durability: Result) -> list[str]:
    lines = []
    for kind in SERVERS:
        at = [r for r in results if r["server"] == kind and r["rate"] == GOAL_RATE]
        if not at:
            continue
        r = at[0]
        full = [x["rate"] for x in results if x["server"] == kind and x["acks"] == x["discovers"]]
        best = max((x["completed_per_s"] for x in results if x["server"] == kind), default=0)
        sync = durability.get("syncs", {}).get(kind)
        sync_txt = (
            "not measured" if not sync or sync["per_ack"] is None else f"{sync['per_ack']:.2f}"
        )
        upto = f"100% up to {max(full):,}/s offered" if full else "never 100%"
        lines.append(
            f"- {LABEL[kind]}: {100 * r['completion']:.2f}% completed at {GOAL_RATE:,}/s "
            f"offered; {upto}; best {best:,.0f} completed/s; fsync/fdatasync calls per ACK: "
            f"{sync_txt}."
        )
    app = [r for r in results if r["server"] == "appliance" and r["rate"] == GOAL_RATE]
    if app:
        r = app[0]
        crash = durability.get("crash")
        kill = durability.get("kill", {}).get("appliance")
        durable = bool(crash and crash["missing"] == 0 and kill and kill["missing"] == 0)
        counters = r.get("appliance") or {}
        batch = counters.get("batch_mean")
        rate_ok = r["acks"] == r["discovers"]
        met = rate_ok and durable
        lines.append(
            f"- **Goal (100% completion at {GOAL_RATE:,}/s offered, every ACKed lease on disk "
            f"before the ACK leaves): {'met' if met else 'not met'}.** Rate: "
            f"{r['acks']:,} of {r['discovers']:,} exchanges completed "
            f"({100 * r['completion']:.2f}%){'' if rate_ok else ', short of 100%'}. Durability: "
            + ("every ACKed lease found in SQLite after SIGKILL" if durable else "see below")
            + (
                f"; group commit at {GOAL_RATE:,}/s: {counters['commits']:,} transactions "
                f"(one fsync each) for {counters['leases_committed']:,} leases, "
                f"{batch:.1f} leases per fsync on average"
                if batch
                else ""
            )
            + "."
        )
        cpu = r["server_cpu_ms_per_dora"]
        if cpu is not None:
            lines.append(
                f"- At {GOAL_RATE:,}/s the appliance used {cpu * GOAL_RATE / 1000:.2f} cores "
                + "".join(
                    f"({LABEL[x['server']]} {x['server_cpu_ms_per_dora'] * GOAL_RATE / 1000:.2f}"
                    " at the same rate), "
                    for x in results
                    if x["server"] == "kea"
                    and x["rate"] == GOAL_RATE
                    and x["server_cpu_ms_per_dora"] is not None
                )
                + f"perfdhcp "
                f"{r['client_cpu_s'] / r['period']:.2f} and everything else on this "
                f"{os.cpu_count()}-core machine {r['others_cores']:.2f}"
                + (
                    ": a noisy run; rerun on a quiet machine before reading the completion "
                    "as the appliance's own limit."
                    if r["others_cores"] > BUSY
                    else "."
                )
            )
    return lines


def durability_lines(durability: Result) -> list[str]:
    lines = []
    for kind, k in durability.get("kill", {}).items():
        lines.append(
            f"- {LABEL[kind]}, SIGKILLed after its sweep: {k['acked']:,} distinct addresses "
            f"ACKed during the sweep, {k['stored']:,} leased in its store, {k['missing']:,} "
            "ACKed but missing."
        )
    for kind, s in durability.get("syncs", {}).items():
        if s:
            per = "-" if s["per_ack"] is None else f"{s['per_ack']:.3f}"
            lines.append(
                f"- {LABEL[kind]}, 250/s under `strace -f -c`: {s['syncs']:,} fsync/fdatasync "
                f"calls for {s['acks']:,} ACKs ({per} per ACK)."
            )
    c = durability.get("crash")
    if c:
        lines.append(
            f"- appliance from an empty store, SIGKILLed {c['killed_after_s']:g} s into a "
            f"{c['rate']:,}/s run (after it reported {c['committed_seen']:,} leases committed): "
            f"{c['acked']:,} addresses ACKed before the kill, "
            f"{c['stored']:,} bound in SQLite, {c['missing']:,} ACKed but missing."
        )
    return lines


def markdown(info: Result, command: str, results: list[Result], durability: Result) -> str:
    lines = [
        BEGIN,
        "## DHCP",
        "",
        "perfdhcp (kea-admin) in one network namespace, relaying (`-l 192.0.2.2`: giaddr set, "
        "unicast to 192.0.2.1:67) to the server in another, joined by a veth pair; "
        f"`-R 2000` clients (MACs), each offered rate for {results[0]['period']:g} s, replies "
        "later than 1 s count as dropped. One pool of 2,000 addresses (192.0.8.1-192.0.15.208 "
        f"in {SUBNET}, lease 3600 s) for all three servers: the appliance (uvloop; its ping "
        "check off, `network.dhcp_ping_wait: 0`, as dnsmasq's `--no-ping` below; leases in "
        "SQLite, WAL, synchronous=FULL, group commit: an ACK leaves after the transaction "
        "holding its lease is fsynced), dnsmasq with the config `appliance render --as "
        "dnsmasq` prints (less `log-dhcp`; plus `--quiet-dhcp --no-ping "
        f"--dhcp-lease-max={LEASE_MAX}`, as dnsmasq leases at most 1,000 addresses by "
        "default and the rendered config does not raise that; it rewrites and "
        "fsyncs its lease file on every change) and kea-dhcp4 (memfile, persist true: "
        "leases appended to a CSV file, no fsync; default, single-threaded). Each server "
        "starts from an empty lease store and serves every rate in turn, so after the first "
        "pass most exchanges renew a lease the MAC already has.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {info['cores']} cores, {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']} ({info['loop']}), lease store on {info['disk']}  ",
        f"Appliance: {info['appliance']}  ",
        f"Versions: {info['dnsmasq']}; {info['kea']}; {info['perfdhcp']}  ",
        f"Date: {info['date']}",
        "",
        *table(results),
        "",
        "completed/s = ACKs received / period; completion = ACKs / DISCOVERs sent; D-O and "
        "R-A are perfdhcp's DISCOVER-OFFER and REQUEST-ACK delays; rcvbuf drops are UDP "
        "receive-buffer overflows in the server and client namespaces during the run "
        "(server: requests the server did not read in time; client: replies perfdhcp did "
        f"not read in time); others' cores: CPU used by anything else on the machine "
        f"during the run. A run with others above {BUSY} cores is repeated (after waiting "
        "for the machine to quieten) and the quietest attempt kept; (!) marks a run that "
        "stayed noisy.",
        "",
        *verdicts(results, durability),
        "",
        "Durability checks. The SIGKILL checks show the order (no ACK before its lease is "
        "written): a kill cannot lose what the kernel already holds, so the other two pass "
        "them as well. Surviving a power cut needs the fsync before the ACK, which the "
        "strace counts show: dnsmasq fsyncs its whole lease file per change, kea-dhcp4 "
        "never, the appliance once per group of leases.",
        "",
        *durability_lines(durability),
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_doc(section: str) -> None:
    write_section(section, BEGIN, END)


def print_table(results: list[Result], header: bool = True) -> None:
    for line in table(results)[0 if header else 2 :]:
        print(line)
    sys.stdout.flush()


# --- main ---------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--period", type=float, default=10.0, help="seconds per rate (default 10)")
    p.add_argument("--rates", default="250,500,1000,2000,4000")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--profile", type=int, metavar="RATE", help="py-spy the appliance at RATE")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        metavar="S",
        help="before each server, wait up to S s for other load to stop (default 120)",
    )
    p.add_argument(
        "--retry-noisy",
        type=int,
        default=2,
        metavar="N",
        help="repeat a run up to N times while others use the machine; keep the quietest",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=30.0,
        help="stop waiting for quiet and retrying after this long (default 30)",
    )
    p.add_argument(
        "--rev",
        metavar="REV",
        help="run the appliance as committed at REV (default: the working tree)",
    )
    p.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, lease files)")
    args = p.parse_args()
    rates = [int(x) for x in args.rates.split(",")]
    servers = [s for s in args.servers.split(",") if s]
    if any(s not in SERVERS for s in servers):
        p.error(f"--servers: choose from {','.join(SERVERS)}")
    if os.geteuid() != 0:
        raise SystemExit("bench/dhcp: needs root (network namespaces, port 67)")
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    command = "bench/dhcp/run.sh" + "".join(f" {a}" for a in sys.argv[1:])
    net = Netns(os.environ.get("BDH_TAG") or str(os.getpid()))
    info = machine()
    if args.rev:
        APP.use_rev(args.rev, WORK)
    info["appliance"] = APP.describe()
    print(
        f"bench/dhcp: {info['cores']} cores ({info['cpu']}), {info['loop']}, work dir {WORK}, "
        f"appliance: {info['appliance']}",
        flush=True,
    )
    results: list[Result] = []
    deadline = time.monotonic() + 60 * args.max_minutes
    durability: Result = {"kill": {}, "syncs": {}}
    try:
        net.up()
        for i, kind in enumerate(servers):
            server = Server(kind, net, WORK / kind, 9067 + i)
            proc = server.start()
            print(f"--- {LABEL[kind]} (pid {proc.pid})", flush=True)
            acked: set[str] = set()
            for rate in rates:
                prof = None
                if args.profile == rate and kind == "appliance":
                    prof = WORK / f"py-spy-appliance-{rate}.txt"
                r = None
                for attempt in range(1 + args.retry_noisy):
                    late = time.monotonic() > deadline
                    wait_quiet(0 if late else args.wait_quiet)
                    again = run_rate(net, server, rate, args.period, args.clients, prof)
                    acked |= again["acked"]  # every ACK of every attempt must be stored
                    if r is None or again["others_cores"] < r["others_cores"]:
                        r = again
                    if r["others_cores"] <= BUSY or late or attempt == args.retry_noisy:
                        break
                    print(
                        f"    noisy run ({again['others_cores']:.2f} cores used by others): "
                        "once more",
                        flush=True,
                    )
                    time.sleep(1.0)
                assert r is not None
                results.append(r)
                print_table([r], header=rate == rates[0])
                if prof is not None:
                    print(f"    py-spy samples: {prof}", flush=True)
                    summarise_profile(prof)
                time.sleep(1.0)
            durability["syncs"][kind] = sync_probe(net, server, 3.0, args.clients)
            _stop(proc, signal.SIGKILL)  # no graceful flush: what is on disk is what counts
            stored = server.leases()
            durability["kill"][kind] = {
                "acked": len(acked), "stored": len(stored), "missing": len(acked - stored),
            }  # fmt: skip
            print(f"    durability: {durability['kill'][kind]} syncs: {durability['syncs'][kind]}")
        if "appliance" in servers:
            durability["crash"] = crash_test(
                net, WORK / "appliance-crash", 9066, GOAL_RATE, args.clients
            )
            print(f"--- appliance SIGKILL mid-run: {durability['crash']}", flush=True)
    finally:
        _stop_children()
        net.down()
    print()
    print_table(results)
    for line in verdicts(results, durability) + durability_lines(durability):
        print(line)
    if args.json:
        clean = [{k: v for k, v in r.items() if k != "acked"} for r in results]
        args.json.write_text(
            json.dumps({"machine": info, "results": clean, "durability": durability}, indent=2)
        )
    if not args.no_doc:
        write_doc(markdown(info, command, results, durability))
        print(f"bench/dhcp: wrote the DHCP section of {DOC.relative_to(ROOT)}")
    if not args.keep and not os.environ.get("BDH_WORK"):
        shutil.rmtree(WORK, ignore_errors=True)
    return 0


def summarise_profile(path: Path, top: int = 25) -> None:
    """The hottest frames of a py-spy raw (collapsed stacks) file, own and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            frames = stack.split(";")
            total += int(n)
            own[frames[-1]] += int(n)
            for f in set(frames):
                incl[f] += int(n)
    out = path.with_suffix(".summary.txt")
    with out.open("w") as f:
        print(f"{total} samples", file=f)
        print("-- own", file=f)
        for k, v in own.most_common(top):
            print(f"{v:6d} {100 * v / max(total, 1):5.1f}%  {k}", file=f)
        print("-- inclusive", file=f)
        for k, v in incl.most_common(top * 2):
            print(f"{v:6d} {100 * v / max(total, 1):5.1f}%  {k}", file=f)
    print(f"    py-spy summary: {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
