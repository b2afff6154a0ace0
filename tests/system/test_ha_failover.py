"""A pair of appliances on one link, with shared state in a real three-member etcd.

Network namespaces on one bridge (TEST-NET-1, 192.0.2.0/24) stand for the hosts:
prov-a (192.0.2.16) and prov-b (192.0.2.17), each running an etcd member (Debian's
etcd-server) and `appliance run --member`; a witness (192.0.2.15) with the third etcd
member; a backends host holding the workers' addresses (192.0.2.44, .46) with a real TCP
server on port 80 behind the load balancer's ingress; and a client host that runs
busybox udhcpc, dig, curl (HTTP and TFTP) and TCP connections through the load balancer.
The floating addresses are network.address 192.0.2.1 and load_balancer.address 192.0.2.54.

The kill test takes the leader down with SIGKILL while a client probes every 100 ms and
measures how long the floating addresses stay silent; the partition test cuts the
leader's link (its etcd member goes with it) and samples both members' addresses every
100 ms: never both hold a floating address.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.fakekube import FakeKube
from tests.helpers import CONFIG, ROOT, get_json, in_netns, need_tool, wait_until, write_inventory
from tests.integration.test_cluster import BOOTSTRAPPER_GROUPS, CLIENT, client_csr

pytestmark = pytest.mark.root

FLOAT = "192.0.2.1"
LB = "192.0.2.54"
TTL = 3
BOUND = 2 * TTL + 1  # the takeover bound, seconds
HOSTS = {  # role -> (addresses on its link; the first is its own)
    "a": ["192.0.2.16"],
    "b": ["192.0.2.17"],
    "w": ["192.0.2.15"],
    "k": ["192.0.2.44", "192.0.2.46"],
    "c": ["192.0.2.200"],
}
ETCD_NAMES = {"a": "prov-a", "b": "prov-b", "w": "witness"}
CLIENT_MAC = "52:54:00:99:00:07"  # not in the inventory: a pool address
MASTER0 = ("52:54:00:00:03:50", "192.0.2.50")
_serial = itertools.count()

BACKEND = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(128)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"backend\\n")
    finally:
        c.close()
"""

UDHCPC_SCRIPT = """#!/bin/sh
echo "$1 ${ip:-} ${serverid:-} ${dns:-}" >> "$OUT"
case "$1" in
  bound|renew) ip addr replace "$ip/${mask:-24}" dev "$interface" ;;
esac
"""


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


class Lan:
    """One bridge in its own namespace; a namespace per host, each with `eth0` on it."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000}{next(_serial)}"
        self.made: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self.lan = self._ns("lan")
            _run("ip", "-n", self.lan, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.lan, "link", "set", "br0", "up")
            for role, addresses in HOSTS.items():
                ns = self._ns(role)
                inner, outer = f"e{self.tag}{role}", f"l{self.tag}{role}"
                _run(
                    "ip", "link", "add", inner, "netns", ns, "type", "veth",
                    "peer", "name", outer, "netns", self.lan,
                )  # fmt: skip
                _run("ip", "-n", ns, "link", "set", inner, "name", "eth0")
                if role == "c":  # before any traffic: no neighbour keeps an older MAC
                    _run("ip", "-n", ns, "link", "set", "eth0", "address", CLIENT_MAC)
                for address in addresses:
                    _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                _run("ip", "-n", ns, "link", "set", "eth0", "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", self.lan, "link", "set", outer, "master", "br0")
                _run("ip", "-n", self.lan, "link", "set", outer, "up")
        except BaseException:
            self.close()
            raise

    def _ns(self, role: str) -> str:
        name = f"aph-{self.tag}-{role}"
        _run("ip", "netns", "add", name)
        self.made.append(name)
        return name

    def ns(self, role: str) -> str:
        return f"aph-{self.tag}-{role}"

    def cut(self, role: str, up: bool = False) -> None:
        """The host's port on the bridge down (or up again)."""
        _run("ip", "-n", self.lan, "link", "set", f"l{self.tag}{role}", "up" if up else "down")

    def addresses(self, role: str) -> set[str]:
        out = _run("ip", "-n", self.ns(role), "-j", "-4", "addr", "show", "dev", "eth0")
        return {a["local"] for link in json.loads(out.stdout) for a in link.get("addr_info", [])}

    def popen(self, role: str, cmd: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            # `ip netns exec` execs the command: the pid is the program's own.
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(role), *cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                **kw,
            )
        self.procs.append(proc)
        return proc

    def run(self, role: str, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.ns(role), *cmd, check=False, timeout=timeout)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for ns in reversed(self.made):
            _run("ip", "netns", "del", ns, check=False)


class Pair:
    """The lab: etcd on a, b and the witness; backends; the two appliances."""

    def __init__(self, lan: Lan, tmp: Path, kubeconfig: Path | None = None) -> None:
        self.lan, self.tmp = lan, tmp
        self.kubeconfig = kubeconfig
        self.etcd: dict[str, subprocess.Popen[bytes]] = {}
        self.app: dict[str, subprocess.Popen[bytes]] = {}
        self.runs = itertools.count()
        self.logs: dict[str, Path] = {}
        cluster = ",".join(f"{n}=http://{HOSTS[r][0]}:2380" for r, n in ETCD_NAMES.items())
        for role, name in ETCD_NAMES.items():
            ip = HOSTS[role][0]
            self.etcd[role] = lan.popen(
                role,
                [
                    need_tool("etcd"), "--name", name, "--data-dir", str(tmp / f"etcd-{name}"),
                    "--listen-client-urls", f"http://{ip}:2379",
                    "--advertise-client-urls", f"http://{ip}:2379",
                    "--listen-peer-urls", f"http://{ip}:2380",
                    "--initial-advertise-peer-urls", f"http://{ip}:2380",
                    "--initial-cluster", cluster, "--initial-cluster-state", "new",
                    "--heartbeat-interval", "100", "--election-timeout", "1000",
                    # As the README's recipe: a member back from a partition does not
                    # force an election (the raft leader stays, writes do not stall).
                    "--pre-vote",
                ],
                tmp / f"etcd-{name}.log",
            )  # fmt: skip
        lan.popen("k", [sys.executable, "-c", BACKEND], tmp / "backend.log")
        self._wait_etcd()
        self.configs = {role: self._inventory(role) for role in ("a", "b")}

    def _wait_etcd(self) -> None:
        endpoints = ",".join(f"http://{HOSTS[r][0]}:2379" for r in ETCD_NAMES)

        def healthy() -> bool:
            res = self.lan.run(
                "w", need_tool("etcdctl"), "--endpoints", endpoints, "endpoint", "health"
            )
            return res.returncode == 0

        wait_until(healthy, 30, "a healthy three-member etcd")

    def _inventory(self, role: str) -> Path:
        raw: dict[str, Any] = yaml.safe_load((CONFIG / "dgxpod.yaml").read_text())
        raw["network"] = {
            "interface": "eth0",
            "address": FLOAT,
            "subnet": "192.0.2.0/24",
            "gateway": "192.0.2.254",
            "dhcp_range": ["192.0.2.100", "192.0.2.199"],
            "lease_time": 120,
            "dhcp_ping_wait": 0,
        }
        raw["load_balancer"] = {
            "address": LB,
            "ingress_check": "tcp",
            "check_interval": 0.5,
            "rise": 1,
        }
        for node in raw["nodes"]:
            node["ip"] = node["ip"].replace("10.33.3.", "192.0.2.")
        raw["listen"] = {
            "dns": "0.0.0.0:53",
            "dhcp": "0.0.0.0:67",
            "tftp": "0.0.0.0:69",
            "http": "0.0.0.0:8080",
            "api": None,
            "machine_config": None,
            "ingress_http": f"{LB}:80",
            "ingress_https": None,
            "admin": "127.0.0.1:9000",
        }
        raw["ha"] = {
            "members": [
                {"name": "prov-a", "address": HOSTS["a"][0]},
                {"name": "prov-b", "address": HOSTS["b"][0]},
            ],
            "etcd": {"endpoints": [f"http://{HOSTS[r][0]}:2379" for r in ETCD_NAMES]},
            "lease_ttl": TTL,
        }
        raw["state_dir"] = str(self.tmp / f"state-{role}")
        if self.kubeconfig is not None:
            raw["kubernetes"] = {
                "kubeconfig": str(self.kubeconfig),
                "gpu_operator": False,
                "approvals_per_minute": 6000,
                "approval_burst": 1000,
            }
        (self.tmp / "tftp").mkdir(exist_ok=True)
        (self.tmp / "tftp" / "hello.txt").write_text("hello from tftp\n")
        (self.tmp / "ignition").mkdir(exist_ok=True)
        for role_name in ("bootstrap", "master", "worker"):
            ign = {"ignition": {"version": "3.2.0"}}
            (self.tmp / "ignition" / f"{role_name}.ign").write_text(json.dumps(ign))
        return write_inventory(self.tmp / f"inventory-{role}.yaml", raw)

    def start(self, role: str) -> None:
        name = ETCD_NAMES[role]
        log = self.tmp / f"appliance-{role}-{next(self.runs)}.log"
        self.logs[role] = log
        self.app[role] = self.lan.popen(
            role,
            [sys.executable, "-m", "appliance", "run", "--config", str(self.configs[role]),
             "--member", name],
            log,
            cwd=ROOT,
        )  # fmt: skip

        def serving() -> bool:
            assert self.app[role].poll() is None, log.read_text()
            return "serving" in log.read_text()

        wait_until(serving, 30, f"{name} serving")

    def kill(self, role: str) -> None:
        proc = self.app[role]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def holder(self) -> str | None:
        held = [r for r in ("a", "b") if FLOAT in self.lan.addresses(r)]
        assert len(held) <= 1, f"both members hold {FLOAT}"
        return held[0] if held else None

    def status(self, role: str, path: str = "/api/v1/status") -> dict[str, Any]:
        token = (self.tmp / f"state-{role}" / "admin.token").read_text().strip()
        code, body = in_netns(
            self.lan.ns(role), lambda: get_json(f"http://127.0.0.1:9000{path}", token)
        )
        assert code == 200, body
        data: dict[str, Any] = body
        return data

    def log(self, role: str) -> str:
        return self.logs[role].read_text()


# --- the client's probes -------------------------------------------------------------


def dns_ok(lan: Lan) -> bool:
    res = lan.run(
        "c", "dig", "+short", "+time=1", "+tries=1", f"@{FLOAT}", "api.dgxpod.nvidia.com",
        timeout=5,
    )  # fmt: skip
    return res.stdout.strip() == LB


def lb_ok(lan: Lan) -> bool:
    def connect() -> bytes:
        with socket.create_connection((LB, 80), timeout=0.5) as s:
            s.settimeout(0.5)
            return s.recv(64)

    try:
        return in_netns(lan.ns("c"), connect) == b"backend\n"
    except OSError:
        return False


def http_ok(lan: Lan, path: str = "/healthz") -> str | None:
    res = lan.run("c", "curl", "-s", "-f", "--max-time", "1", f"http://{FLOAT}:8080{path}")
    return res.stdout if res.returncode == 0 else None


def tftp_ok(lan: Lan) -> bool:
    res = lan.run("c", "curl", "-s", "--max-time", "2", f"tftp://{FLOAT}/hello.txt")
    return res.returncode == 0 and res.stdout == "hello from tftp\n"


class Udhcpc:
    """busybox udhcpc in the client namespace, in the foreground; SIGUSR1 renews."""

    def __init__(self, lan: Lan, tmp: Path) -> None:
        self.out = tmp / "udhcpc.out"
        self.out.write_text("")
        script = tmp / "udhcpc.sh"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        self.proc = lan.popen(
            "c",
            [need_tool("busybox"), "udhcpc", "-f", "-i", "eth0", "-s", str(script), "-t", "20",
             "-T", "1", "-A", "1"],
            tmp / "udhcpc.log",
            env={**os.environ, "OUT": str(self.out)},
        )  # fmt: skip

    def lines(self) -> list[list[str]]:
        return [line.split() for line in self.out.read_text().splitlines()]

    def bound(self) -> list[list[str]]:
        return [w for w in self.lines() if w and w[0] in ("bound", "renew")]


_T = TypeVar("_T")


class Kube:
    """The fake API server (tests/fakekube.py: no kube-apiserver can run here) on its own
    event loop in a thread of the test, reached from inside both members' namespaces at
    127.0.0.1:<its port> (the name its certificate has) through a byte relay: a listener
    made in each namespace, an upstream connection made here."""

    def __init__(self, tmp: Path, namespaces: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = FakeKube(tmp / "kube")
        asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)
        self.port = self.fake.port
        self.kubeconfig = self.fake.kubeconfig(tmp / "kubeconfig")
        self.listeners: list[socket.socket] = []
        for ns in namespaces:

            def listen() -> socket.socket:
                sock = socket.socket()
                sock.bind(("127.0.0.1", self.port))
                sock.listen(64)
                return sock

            sock = in_netns(ns, listen)
            self.listeners.append(sock)
            threading.Thread(target=self._accept, args=(sock, ns), daemon=True).start()
        self.connections: list[tuple[str, float]] = []  # (namespace, monotonic time)

    def since(self, ns: str, t0: float) -> int:
        """Connections to the API server from `ns` since `t0`."""
        return sum(1 for n, t in list(self.connections) if n == ns and t >= t0)

    def _accept(self, listener: socket.socket, ns: str) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            self.connections.append((ns, time.monotonic()))
            try:
                up = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def do(self, fn: Callable[[FakeKube], _T]) -> _T:
        """Call `fn(fake)` on the fake's loop (it is not thread-safe)."""

        async def call() -> _T:
            return fn(self.fake)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    for tool in ("ip", "etcd", "etcdctl", "dig", "curl", "busybox"):
        need_tool(tool)
    lan = Lan()
    try:
        yield Pair(lan, tmp_path)
    finally:
        lan.close()


def _wait_leader(pair: Pair, timeout: float = 20) -> str:
    found: list[str] = []

    def one() -> bool:
        holder = pair.holder()
        if holder is not None:
            found.append(holder)
        return holder is not None and lb_ok(pair.lan) and dns_ok(pair.lan)

    wait_until(one, timeout, "one member holding the floating addresses and answering")
    return found[-1]


def test_kill9_of_the_leader_the_other_takes_over_with_the_state(pair: Pair) -> None:
    """kill -9 of the leader: the other member holds the floating addresses and answers
    DNS, DHCP, TFTP, HTTP and load-balancer connections on them within 2 x ttl + 1 s; the
    DHCP client's renew is ACKed with its address; master-0, installed before, boots
    from disk; the old leader, restarted, joins as a follower."""
    lan = pair.lan
    pair.start("a")
    pair.start("b")
    leader = _wait_leader(pair)
    other = "b" if leader == "a" else "a"
    st = pair.status(other)["ha"]
    assert st["leading"] is False and st["leader"] == ETCD_NAMES[leader], st
    assert pair.status(other)["services"]["dhcp"]["state"] == "standby"

    # A pool lease from the leader, and master-0's install (its ignition fetched).
    dhcp = Udhcpc(lan, pair.tmp)
    wait_until(lambda: bool(dhcp.bound()), 20, "a DHCP lease")
    first = dhcp.bound()[-1]
    address = first[1]
    assert first[2] == FLOAT  # the server identifier is the floating address
    assert first[3:5] == [FLOAT, HOSTS["a"][0]] or first[3] == FLOAT, first
    _run("ip", "-n", lan.ns("c"), "addr", "add", f"{MASTER0[1]}/24", "dev", "eth0")
    res = lan.run(
        "c", "curl", "-s", "-f", "--max-time", "2", "--interface", MASTER0[1],
        f"http://{FLOAT}:8080/ignition/master.ign",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ipxe = http_ok(lan, f"/boot.ipxe?mac={MASTER0[0]}")
    assert ipxe is not None and "local disk" in ipxe, ipxe
    assert tftp_ok(lan) and http_ok(lan) is not None

    t0 = time.monotonic()
    pair.kill(leader)
    back = None
    while time.monotonic() - t0 < BOUND + 5:
        if dns_ok(lan) and lb_ok(lan):
            back = time.monotonic() - t0
            break
        time.sleep(0.1)
    assert back is not None and back <= BOUND, f"took over after {back} s (bound {BOUND} s)"
    assert pair.holder() == other
    assert tftp_ok(lan) and http_ok(lan) is not None
    # The install mark came with the state: master-0 boots from disk.
    ipxe = http_ok(lan, f"/boot.ipxe?mac={MASTER0[0]}")
    assert ipxe is not None and "local disk" in ipxe, ipxe

    # A renew from the dead leader's client: ACKed by the new leader, same address.
    before = len(dhcp.bound())
    dhcp.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: len(dhcp.bound()) > before, 15, "the renew answered")
    assert dhcp.bound()[-1][1] == address, dhcp.lines()
    assert pair.status(other)["ha"]["leading"] is True
    leases = pair.status(other, "/api/v1/leases")["leases"]
    ips = [lease["ip"] for lease in leases]
    assert len(ips) == len(set(ips)), leases  # never one address for two MACs
    assert {(x["mac"], x["ip"]) for x in leases} >= {(CLIENT_MAC, address)}, leases

    # The old leader, restarted, joins as a follower.
    pair.start(leader)
    time.sleep(TTL)
    assert pair.holder() == other
    st = pair.status(leader)
    assert st["ha"]["leading"] is False and st["ha"]["leader"] == ETCD_NAMES[other]
    assert st["services"]["dhcp"]["state"] == "standby"

    # An operator's edit of the ha block, reloaded: refused, the pair keeps running.
    raw = yaml.safe_load(pair.configs[other].read_text())
    raw["ha"]["lease_ttl"] = 5
    write_inventory(pair.configs[other], raw)
    pair.app[other].send_signal(signal.SIGHUP)
    wait_until(lambda: "needs a restart" in pair.log(other), 10, "the reload refused")
    assert pair.holder() == other and dns_ok(lan)
    print(f"takeover after kill -9: {back:.2f} s (bound {BOUND} s)")


def test_a_leader_cut_from_etcd_steps_down_and_never_both_hold(pair: Pair) -> None:
    """The leader's link down (its etcd member goes with it): it drops the floating
    addresses within lease_ttl (+ the kernel's timer), the other takes them; sampled in
    both namespaces every 100 ms, never both at once."""
    lan = pair.lan
    pair.start("a")
    pair.start("b")
    leader = _wait_leader(pair)
    other = "b" if leader == "a" else "a"
    t0 = time.monotonic()
    lan.cut(leader)
    dropped = taken = None
    while time.monotonic() - t0 < BOUND + 5 and (dropped is None or taken is None):
        held = {r for r in ("a", "b") if FLOAT in lan.addresses(r)}
        assert len(held) < 2, f"both members hold {FLOAT} at {time.monotonic() - t0:.2f} s"
        now = time.monotonic() - t0
        if dropped is None and leader not in held:
            dropped = now
        if taken is None and other in held:
            taken = now
        time.sleep(0.1)
    assert dropped is not None and dropped <= TTL, f"dropped after {dropped} s"
    assert taken is not None and taken <= BOUND, f"taken after {taken} s"
    assert "stepping down" in pair.log(leader)
    # Back on the link: it stays a follower.
    lan.cut(leader, up=True)
    time.sleep(TTL)
    assert pair.holder() == other, (pair.log(other)[-1500:], pair.log(leader)[-1500:])
    print(f"partition: dropped after {dropped:.2f} s, taken after {taken:.2f} s")


def test_the_csr_approver_runs_on_exactly_one_member(tmp_path: Path) -> None:
    """Kubelet client CSRs keep arriving while the leader is killed: every one is approved
    once (the fake API server counts the approval PUTs per CSR), and only the member that
    leads talks to the API server at all (the relay counts connections per namespace): the
    follower before the kill, and the old leader once it is back as a follower, never."""
    for tool in ("ip", "etcd", "etcdctl", "dig", "curl", "busybox"):
        need_tool(tool)
    lan = Lan()
    kube: Kube | None = None
    try:
        kube = Kube(tmp_path, [lan.ns("a"), lan.ns("b")])
        pair = Pair(lan, tmp_path, kube.kubeconfig)
        pair.start("a")
        pair.start("b")
        t_start = time.monotonic()
        leader = _wait_leader(pair)
        other = "b" if leader == "a" else "a"
        names: list[str] = []
        nodes = ["master-0", "master-1", "master-2", "worker-0", "worker-1"]

        def create(i: int) -> None:
            name = f"csr-{i:03d}"
            names.append(name)
            kube.do(lambda fake: client_csr(fake, name, nodes[i % len(nodes)]))

        for i in range(10):
            create(i)
            time.sleep(0.1)

        def all_approved() -> bool:
            approved = kube.do(lambda f: dict(f.approved))
            return all(approved.get(n) for n in names)

        wait_until(all_approved, 20, "first approvals")
        assert kube.since(lan.ns(other), t_start) == 0, "the follower called the API server"
        assert kube.since(lan.ns(leader), t_start) > 0
        t_kill = time.monotonic()
        pair.kill(leader)
        for i in range(10, 30):
            create(i)
            time.sleep(0.2)
        pair.start(leader)  # back, as a follower: it must not approve again
        t_back = time.monotonic()
        wait_until(all_approved, 30, "every approval")
        time.sleep(2 * TTL)
        puts = kube.do(lambda f: dict(f.approval_puts))
        assert {n: puts.get(n, 0) for n in names} == dict.fromkeys(names, 1), puts
        assert kube.since(lan.ns(leader), t_back) == 0, "the old leader called the API server"
        assert kube.since(lan.ns(other), t_kill) > 0  # the new leader took the loop over
        assert BOOTSTRAPPER_GROUPS and CLIENT  # the CSRs are the kubelet bootstrapper's
    finally:
        if kube is not None:
            kube.close()
        lan.close()


def test_a_dhcp_burst_across_the_kill_loses_no_ack_and_gives_no_address_twice(
    pair: Pair,
) -> None:
    """80 machines DORA through a relay (giaddr 192.0.2.200) while the leader is killed
    after the 30th ACK: the burst completes on the new leader; no address is ACKed to two
    MACs; every ACK seen, before or after the kill, is a bound lease in the shared store."""
    from tests.system.test_dhcp_netns import RelayClient

    lan = pair.lan
    pair.start("a")
    pair.start("b")
    leader = _wait_leader(pair)
    other = "b" if leader == "a" else "a"

    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOSTS["c"][0], 67))
        return sock

    relay = RelayClient(in_netns(lan.ns("c"), bind), giaddr=HOSTS["c"][0])
    macs = [f"02:b1:00:00:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(80)]
    killed: list[float] = []
    before: dict[str, str] = {}

    def kill_mid_burst(acked: dict[str, str]) -> None:
        if len(acked) >= 30 and not killed:
            before.update(acked)
            pair.kill(leader)
            killed.append(time.monotonic())

    try:
        acked, _ = relay.burst(macs, window=16, on_ack=kill_mid_burst, deadline=40.0)
    finally:
        relay.sock.close()
    assert killed, "the burst ended before the kill"
    assert len(acked) == len(macs), f"{len(acked)} of {len(macs)} ACKed"
    assert len(set(acked.values())) == len(acked), "one address ACKed to two MACs"
    assert all(acked[mac] == ip for mac, ip in before.items())
    leases = pair.status(other, "/api/v1/leases")["leases"]
    stored = {x["mac"]: (x["ip"], x["state"]) for x in leases}
    missing = {m: ip for m, ip in acked.items() if stored.get(m) != (ip, "bound")}
    assert not missing, f"ACKed but not stored as bound: {missing}"
    ips = [x["ip"] for x in leases]
    assert len(ips) == len(set(ips))
