"""The dhcp service on a real link, against real DHCP clients.

Two network namespaces joined by a veth pair carry TEST-NET-1 (192.0.2.0/24): the
appliance runs in one (`ip netns exec`, bound to its veth, 192.0.2.1), the clients
in the other, with the client veth's MAC set to an inventory node's. The clients
are ISC `dhclient` (Debian isc-dhcp-client) and busybox `udhcpc`; their scripts
write what they were told to a file and put the address on the client veth (it
is the namespace's own link), so renew and release go out as unicast as they
would on a real network. The appliance's lease store (SQLite) is read directly.

The inventory is the article's cluster (config/dgxpod.yaml) moved onto 192.0.2.0/24:
10.33.3.X becomes 192.0.2.X, the appliance is 192.0.2.1, the gateway 192.0.2.254.

The restart test fires a burst of DHCP exchanges from 100 MACs through a relay-style
socket (giaddr 192.0.2.2, the client veth's address), kills the appliance with
SIGKILL in the middle of it, and checks that every ACK the clients saw is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.dhcp.ping import Pinger
from tests.helpers import CONFIG, ROOT, in_netns, need_tool, wait_until, write_inventory

pytestmark = pytest.mark.root

scapy_dhcp = pytest.importorskip("scapy.layers.dhcp")
BOOTP, DHCP = scapy_dhcp.BOOTP, scapy_dhcp.DHCP

SERVER = "192.0.2.1"
GATEWAY = "192.0.2.254"
DNS = ["192.0.2.1", "192.0.2.53"]
DOMAIN = "dgxpod.nvidia.com"
MASTER0 = ("52:54:00:00:03:50", "192.0.2.50", "master-0")
WORKER0 = ("02:00:00:00:03:44", "192.0.2.44", "worker-0")
STRANGER = "52:54:00:99:00:01"
POOL = ("192.0.2.100", "192.0.2.249")
_serial = itertools.count()


def in_pool(ip: str) -> bool:
    return IPv4Address(POOL[0]) <= IPv4Address(ip) <= IPv4Address(POOL[1])


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


class Link:
    """A server namespace and a client namespace, joined by a veth pair."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{next(_serial)}"
        self.server_ns, self.client_ns = f"apdh-{tag}-s", f"apdh-{tag}-c"
        # Interface names are at most 15 characters.
        short = f"{os.getpid() % 100000}{tag.rsplit('-', 1)[1]}"
        self.server_if, self.client_if = f"aps{short}", f"apc{short}"
        self.made: list[str] = []
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        for ns in (self.server_ns, self.client_ns):
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
        _run(
            "ip", "link", "add", self.server_if, "netns", self.server_ns, "type", "veth",
            "peer", "name", self.client_if, "netns", self.client_ns,
        )  # fmt: skip
        self.ip_s("addr", "add", f"{SERVER}/24", "dev", self.server_if)
        for ns, dev in ((self.server_ns, self.server_if), (self.client_ns, self.client_if)):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", dev, "up")

    def ip_s(self, *args: str) -> None:
        _run("ip", "-n", self.server_ns, *args)

    def ip_c(self, *args: str) -> None:
        _run("ip", "-n", self.client_ns, *args)

    def client_mac(self, mac: str) -> None:
        self.ip_c("link", "set", "dev", self.client_if, "address", mac)

    def client_addresses(self) -> list[str]:
        out = _run("ip", "-n", self.client_ns, "-4", "-o", "addr", "show", "dev", self.client_if)
        return [line.split()[3] for line in out.stdout.splitlines()]

    def in_client(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.client_ns, *cmd]

    def client_socket(self, address: tuple[str, int]) -> socket.socket:
        """A UDP socket of the client namespace (made by a thread that enters it)."""

        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(address)
            return sock

        return in_netns(self.client_ns, bind)

    def close(self) -> None:
        for ns in self.made:
            _run("ip", "netns", "del", ns, check=False)  # takes the veth pair with it


class Appliance:
    """`appliance run` inside the server namespace, with its state under `tmp`."""

    def __init__(self, link: Link, tmp: Path) -> None:
        self.link, self.tmp = link, tmp
        raw: dict[str, Any] = yaml.safe_load((CONFIG / "dgxpod.yaml").read_text())
        raw["network"] = {
            "interface": link.server_if,
            "address": SERVER,
            "subnet": "192.0.2.0/24",
            "gateway": GATEWAY,
            "dns_servers": DNS,
        }
        raw["load_balancer"]["address"] = "192.0.2.54"
        for node in raw["nodes"]:
            node["ip"] = node["ip"].replace("10.33.3.", "192.0.2.")
        raw["listen"] = {
            "dns": None,
            "dhcp": "0.0.0.0:67",
            "tftp": None,
            "http": None,
            "api": None,
            "machine_config": None,
            "ingress_http": None,
            "ingress_https": None,
            "admin": "127.0.0.1:9000",  # inside the server namespace
        }
        raw["state_dir"] = str(tmp / "state")
        self.raw = raw
        self.config = tmp / "dgxpod.yaml"
        write_inventory(self.config, raw)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.tmp / f"appliance-{self.runs}.log"

    def log(self) -> str:
        return self.log_path.read_text()

    def start(self) -> None:
        self.runs += 1
        with self.log_path.open("w") as log:
            # `ip netns exec` execs the command: the Popen pid is the appliance's own.
            self.proc = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.link.server_ns,
                    sys.executable, "-m", "appliance", "run", "--config", str(self.config),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait_log("serving")

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        def seen() -> bool:
            if text in self.log():
                return True
            assert self.proc is not None and self.proc.poll() is None, self.log()
            return False

        wait_until(seen, timeout, f"{text!r} in the appliance log")

    def reconfigure(self, **network: Any) -> None:
        self.raw["network"].update(network)
        write_inventory(self.config, self.raw)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.wait_log("reload: new plan in force")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=15)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)

    # --- the lease store, read as an operator's sqlite3 would --------------------------

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        path = self.tmp / "state" / "appliance.db"
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def lease(self, mac: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT mac, ip, hostname, expires, state, updated FROM leases WHERE mac = ?", mac
        )
        if not rows:
            return None
        keys = ("mac", "ip", "hostname", "expires", "state", "updated")
        return dict(zip(keys, rows[0], strict=True))

    def leases(self) -> dict[str, tuple[str, str]]:
        return {
            mac: (ip, state) for mac, ip, state in self.query("SELECT mac, ip, state FROM leases")
        }


@pytest.fixture
def link() -> Iterator[Link]:
    need_tool("ip")
    made = Link()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def appliance(link: Link, tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(link, tmp_path)
    try:
        app.start()
        yield app
    finally:
        app.close()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Client processes a test starts in the background: killed by PID at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# --- client scripts: what a DHCP client was told, and the address on the link ---------

SCRIPT = """#!/bin/sh
# {client} calls this at each event; its environment says what the server sent.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
event="${{reason:-$1}}"
env | grep -E '^[a-z_][a-z0-9_]*=' | sort > "{out}/.new.$$"
mv "{out}/.new.$$" "{out}/$(date +%s%N).$event"
case "$event" in
  BOUND|RENEW|REBIND|REBOOT) ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface" ;;
  bound|renew) ip addr replace "$ip/$mask" dev "$interface" ;;
  RELEASE|EXPIRE|STOP|deconfig) ip addr flush dev "$interface" ;;
esac
exit 0
"""


def client_script(tmp: Path, client: str) -> tuple[Path, Path]:
    out = tmp / f"{client}-events"
    out.mkdir()
    script = tmp / f"{client}-script.sh"
    script.write_text(SCRIPT.format(client=client, out=out))
    script.chmod(0o755)
    return script, out


def events(out: Path) -> list[tuple[str, dict[str, str]]]:
    """(event, environment) for every script run, in order."""
    found = []
    done = [p for p in out.iterdir() if not p.name.startswith(".")]
    for path in sorted(done, key=lambda p: int(p.name.split(".")[0])):
        env = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        found.append((path.name.split(".", 1)[1], env))
    return found


def event(out: Path, name: str, after: str | None = None) -> dict[str, str] | None:
    """The environment of the last `name` event (that came after an `after` event)."""
    names = [ev for ev, _ in events(out)]
    start = len(names) - names[::-1].index(after) if after in names else 0
    if after is not None and not start:
        return None
    return next((env for ev, env in reversed(events(out)[start:]) if ev == name), None)


# --- ISC dhclient -------------------------------------------------------------------------


def test_dhclient_gets_its_reservation_and_releases_it(
    link: Link, appliance: Appliance, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    dhclient = need_tool("dhclient")
    mac, ip, name = MASTER0
    link.client_mac(mac)
    script, out = client_script(tmp_path, "dhclient")
    conf = tmp_path / "dhclient.conf"
    conf.write_text(
        "timeout 10;\nretry 1;\n"
        "request subnet-mask, broadcast-address, routers, domain-name,\n"
        "        domain-name-servers, host-name;\n"
    )
    files = ["-cf", str(conf), "-lf", str(tmp_path / "dhclient.leases"), "-sf", str(script)]
    # Foreground, one try; it stays to look after its lease until it is stopped.
    with (tmp_path / "dhclient.log").open("w") as log:
        proc = subprocess.Popen(
            link.in_client(
                dhclient, "-4", "-1", "-d", "-v", *files, "-pf", str(tmp_path / "bound.pid"),
                link.client_if,
            ),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip
    processes.append(proc)
    bound = wait_until(lambda: event(out, "BOUND"), 20, "dhclient BOUND")
    assert bound["new_ip_address"] == ip
    assert bound["new_host_name"] == name
    assert bound["new_domain_name"] == DOMAIN
    assert bound["new_domain_name_servers"].split() == DNS
    assert bound["new_routers"] == GATEWAY and bound["new_subnet_mask"] == "255.255.255.0"
    assert bound["new_dhcp_server_identifier"] == SERVER
    assert bound["new_dhcp_lease_time"] == "3600"
    assert link.client_addresses() == [f"{ip}/24"]
    lease = wait_until(lambda: appliance.lease(mac), 5, "lease stored")
    assert (lease["ip"], lease["state"], lease["hostname"]) == (ip, "bound", name)
    assert lease["expires"] == pytest.approx(time.time() + 3600, abs=60)

    # Release: the running client is stopped (by its PID), then `dhclient -r` sends a
    # RELEASE for the lease in the lease file, unicast from the bound address. (Its own
    # pid file is a new one: it would otherwise signal the pid of the stopped client.)
    proc.terminate()
    proc.wait(timeout=10)
    release = _run(
        *link.in_client(
            dhclient, "-4", "-r", "-v", *files, "-pf", str(tmp_path / "release.pid"),
            link.client_if,
        )
    )  # fmt: skip
    assert f"DHCPRELEASE of {ip} on {link.client_if} to {SERVER} port 67" in release.stderr
    released = wait_until(
        lambda: (lease := appliance.lease(mac)) and lease["state"] == "released" and lease,
        10,
        "lease released",
    )
    assert released["ip"] == ip and released["expires"] <= time.time()
    assert event(out, "RELEASE") is not None and link.client_addresses() == []


# --- busybox udhcpc -----------------------------------------------------------------------


def udhcpc(link: Link, script: Path, *args: str) -> list[str]:
    return link.in_client(
        need_tool("busybox"), "udhcpc", "-i", link.client_if, "-f", "-s", str(script), *args
    )


def test_udhcpc_reservation_renew_and_release(
    link: Link, appliance: Appliance, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    mac, ip, name = WORKER0
    link.client_mac(mac)
    script, out = client_script(tmp_path, "udhcpc")
    # In the background without -q: it keeps its lease; SIGUSR1 renews, SIGUSR2 releases.
    log_path = tmp_path / "udhcpc.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            udhcpc(link, script, "-t", "5", "-T", "1", "-x", "hostname:bbox"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    processes.append(proc)
    bound = wait_until(lambda: event(out, "bound"), 15, "udhcpc bound")
    assert bound["ip"] == ip and bound["hostname"] == name
    assert bound["dns"].split() == DNS and bound["domain"] == DOMAIN
    assert bound["router"] == GATEWAY and bound["subnet"] == "255.255.255.0"
    assert bound["serverid"] == SERVER and bound["lease"] == "3600"
    assert link.client_addresses() == [f"{ip}/24"]
    first = wait_until(lambda: appliance.lease(mac), 5, "lease stored")
    assert (first["ip"], first["state"], first["hostname"]) == (ip, "bound", name)

    # Renew: a unicast REQUEST from the bound address (ciaddr set), ACKed to it.
    time.sleep(0.05)  # the renewed lease's times must differ from the first
    proc.send_signal(signal.SIGUSR1)
    renewed = wait_until(lambda: event(out, "renew"), 10, "udhcpc renew")
    assert renewed["ip"] == ip and renewed["hostname"] == name
    second = wait_until(
        lambda: (lease := appliance.lease(mac)) and lease["updated"] > first["updated"] and lease,
        5,
        "renewed lease stored",
    )
    assert second["state"] == "bound" and second["expires"] > first["expires"]
    assert f"sending renew to server {SERVER}" in log_path.read_text()

    # Release: a RELEASE from the bound address; the store says released.
    proc.send_signal(signal.SIGUSR2)
    wait_until(
        lambda: (lease := appliance.lease(mac)) and lease["state"] == "released",
        10,
        "lease released",
    )
    wait_until(lambda: event(out, "deconfig", after="renew"), 5, "deconfig after release")
    assert link.client_addresses() == []
    assert f"unicasting a release of {ip} to {SERVER}" in log_path.read_text()
    proc.terminate()
    proc.wait(timeout=10)


def test_unknown_machine_gets_nothing_until_a_pool_is_on(
    link: Link, appliance: Appliance, tmp_path: Path
) -> None:
    link.client_mac(STRANGER)
    script, out = client_script(tmp_path, "udhcpc")
    pxe = ["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"]
    # No pool: three DISCOVERs a second apart, no answer; udhcpc gives up (-n).
    t0 = time.monotonic()
    refused = _run(*udhcpc(link, script, "-n", "-q", "-t", "3", "-T", "1", *pxe), check=False)
    assert refused.returncode != 0 and time.monotonic() - t0 < 15
    assert event(out, "bound") is None and appliance.lease(STRANGER) is None
    seen = wait_until(
        lambda: appliance.query(
            "SELECT vendor_class, arch FROM unknown_machines WHERE mac = ?", STRANGER
        ),
        5,
        "unknown machine recorded",
    )
    assert seen == [("PXEClient:Arch:00007:UNDI:003016", "7")]
    assert f"unknown machine {STRANGER} is network-booting" in appliance.log()

    # The pool switched on by a reload: the same machine now gets a pool address.
    appliance.reconfigure(dhcp_range=list(POOL))
    got = _run(*udhcpc(link, script, "-n", "-q", "-t", "5", "-T", "1", *pxe), check=False)
    assert got.returncode == 0, got.stdout + got.stderr
    bound = event(out, "bound")
    assert bound is not None and "hostname" not in bound
    # A UEFI x64 PXE client (option 93 = 7): the boot loader from TFTP on the appliance.
    assert (bound["boot_file"], bound["siaddr"], bound["tftp"]) == ("ipxe.efi", SERVER, SERVER)
    ip = bound["ip"]
    assert in_pool(ip)
    assert bound["dns"].split() == DNS and bound["domain"] == DOMAIN
    lease = wait_until(lambda: appliance.lease(STRANGER), 5, "pool lease stored")
    assert (lease["ip"], lease["state"]) == (ip, "bound")


# --- RFC 2131 4.1: unicast to a client without an address, unless it asks for broadcast ----


def offer_frame(link: Link, mac: str, broadcast: bool) -> Any:
    """A DISCOVER sent as the client's firmware sends it (an Ethernet broadcast from
    0.0.0.0, on a packet socket in the client namespace) and the Ethernet frame the
    OFFER came back in."""
    scapy_l2 = pytest.importorskip("scapy.layers.l2")
    scapy_inet = pytest.importorskip("scapy.layers.inet")
    Ether, IP, UDP = scapy_l2.Ether, scapy_inet.IP, scapy_inet.UDP
    xid = 0x5EED0000 + next(_serial)
    frame = (
        Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")), xid=xid,
                flags=0x8000 if broadcast else 0)
        / DHCP(options=[("message-type", "discover"), "end"])
    )  # fmt: skip

    def exchange() -> Any:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        try:
            sock.bind((link.client_if, 0))
            sock.settimeout(0.5)
            deadline = time.monotonic() + 10
            sock.send(bytes(frame))
            while time.monotonic() < deadline:
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    sock.send(bytes(frame))  # lost, or the server was not ready: again
                    continue
                got = Ether(data)
                if UDP in got and got[UDP].dport == 68 and BOOTP in got and got[BOOTP].xid == xid:
                    return got
            raise AssertionError("no OFFER within 10 s")
        finally:
            sock.close()

    return in_netns(link.client_ns, exchange)


def test_offer_is_unicast_unless_the_client_asks_for_broadcast(
    link: Link, appliance: Appliance
) -> None:
    mac, ip, _ = MASTER0
    link.client_mac(mac)
    unicast = offer_frame(link, mac, broadcast=False)
    assert unicast[BOOTP].yiaddr == ip
    assert (unicast.dst, unicast["IP"].dst) == (mac, ip)  # its MAC, its new address
    broadcast = offer_frame(link, mac, broadcast=True)
    assert (broadcast.dst, broadcast["IP"].dst) == ("ff:ff:ff:ff:ff:ff", "255.255.255.255")


# --- the ping check: a pool address someone already uses is skipped -----------------------

SQUATTER = "192.0.2.100"  # the pool's first address, held by a machine without a lease


def squat(link: Link) -> None:
    """A machine in the client namespace that holds SQUATTER without any lease: the
    address sits on its loopback, the kernel answers ARP for it on the veth (arp_ignore
    0) and a device route carries its echo replies back."""
    link.ip_c("addr", "add", f"{SQUATTER}/32", "dev", "lo")
    link.ip_c("route", "add", "192.0.2.0/24", "dev", link.client_if)


@pytest.mark.parametrize("kind", ["raw", "datagram"])
def test_pinger_answers_and_silence(link: Link, kind: str) -> None:
    """services.dhcp.ping.Pinger on a real link, on either socket it can open: a raw
    ICMP socket (root; its ICMP_FILTER keeps echo replies only) or, where
    net.ipv4.ping_group_range lets our group in, an ICMP datagram socket. The squatter
    answers at once, a free address stays silent for the whole wait."""
    squat(link)
    if kind == "datagram":
        gid = str(os.getgid())
        _run("ip", "netns", "exec", link.server_ns, "sysctl", "-q", "-w",
             f"net.ipv4.ping_group_range={gid} {gid}")  # fmt: skip

    async def probes() -> tuple[bool, bool, float]:
        pinger = Pinger.open(link.server_if, logging.getLogger("test-ping"))
        assert pinger is not None and pinger.raw is (kind == "raw")
        try:
            taken = await pinger.probe(IPv4Address(SQUATTER), 2.0)
            t0 = time.monotonic()
            free = await pinger.probe(IPv4Address("192.0.2.77"), 0.3)
            return taken, free, time.monotonic() - t0
        finally:
            pinger.close()

    taken, free, waited = in_netns(link.server_ns, lambda: asyncio.run(probes()))
    assert taken is True and free is False and waited >= 0.29


def test_pool_skips_an_address_that_answers_a_ping(
    link: Link, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """RFC 2131 3.1 (and dnsmasq): a pool address is pinged before its first offer. The
    first pool address answers, so udhcpc is offered the next one, and the answered
    address is logged and kept out of the pool."""
    squat(link)
    app = Appliance(link, tmp_path)
    app.raw["network"]["dhcp_range"] = list(POOL)
    write_inventory(app.config, app.raw)
    try:
        app.start()
        link.client_mac(STRANGER)
        script, out = client_script(tmp_path, "udhcpc")
        got = _run(*udhcpc(link, script, "-n", "-q", "-t", "5", "-T", "1"), check=False)
        assert got.returncode == 0, got.stdout + got.stderr + app.log()
        bound = event(out, "bound")
        assert bound is not None and bound["ip"] == "192.0.2.101", bound
        assert f"pool address {SQUATTER} answered a ping" in app.log()
        lease = wait_until(lambda: app.lease(STRANGER), 5, "pool lease stored")
        assert (lease["ip"], lease["state"]) == ("192.0.2.101", "bound")
        assert SQUATTER not in {ip for ip, _ in app.leases().values()}
    finally:
        app.close()


# --- a burst, kill -9 in the middle of it, and restarts -------------------------------------


class RelayClient:
    """Many clients at once through one relay-style socket (giaddr = its own address).

    Requests go unicast to the server port from port 67, replies come back to
    giaddr:67; one socket can so speak for any number of MACs without raw sockets.
    Packets are built and read by scapy.
    """

    def __init__(self, sock: socket.socket, giaddr: str) -> None:
        self.sock, self.giaddr = sock, giaddr
        self.xids = itertools.count(0x7A000000)

    def packet(self, kind: str, mac: str, xid: int, **options: Any) -> bytes:
        opts = [("message-type", kind), *options.items(), "end"]
        pkt = BOOTP(
            chaddr=bytes.fromhex(mac.replace(":", "")), xid=xid, giaddr=self.giaddr, hops=1
        ) / DHCP(options=opts)
        return bytes(pkt)

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # ICMP errors while the server is down
            self.sock.sendto(data, (SERVER, 67))

    def replies(self, timeout: float) -> Iterator[tuple[str, int, str]]:
        """(kind, xid, yiaddr) of replies arriving within `timeout`."""
        self.sock.settimeout(timeout)
        while True:
            try:
                data, _ = self.sock.recvfrom(4096)
            except (TimeoutError, ConnectionRefusedError):
                return
            reply = BOOTP(data)
            kind = next(o[1] for o in reply[DHCP].options if o[0] == "message-type")
            yield {2: "offer", 5: "ack", 6: "nak"}.get(kind, str(kind)), reply.xid, reply.yiaddr
            self.sock.settimeout(0 if timeout == 0 else min(timeout, 0.2))

    def offers(self, macs: list[str], rounds: int = 3) -> dict[str, str]:
        """DISCOVER for every MAC (retried); MAC -> offered address."""
        got: dict[str, str] = {}
        for _ in range(rounds):
            pending = {next(self.xids): mac for mac in macs if mac not in got}
            if not pending:
                break
            for xid, mac in pending.items():
                self.send(self.packet("discover", mac, xid))
            for kind, xid, yiaddr in self.replies(1.0):
                if kind == "offer" and xid in pending:
                    got[pending[xid]] = yiaddr
                    if len(got) == len(macs):
                        break
        return got

    def burst(
        self,
        macs: list[str],
        window: int,
        on_ack: Callable[[dict[str, str]], None] = lambda acked: None,
        until: Callable[[], bool] = lambda: False,
        deadline: float = 20.0,
    ) -> tuple[dict[str, str], set[str]]:
        """DORA for every MAC, `window` at a time; (MAC -> ACKed address, MACs requested).

        Lost exchanges start again after a second; the burst ends when every MAC has
        its ACK, when `until()` says so, or at the deadline.
        """
        acked: dict[str, str] = {}
        requested: set[str] = set()
        todo = list(reversed(macs))
        inflight: dict[int, tuple[str, str, float]] = {}  # xid -> mac, stage, sent at
        stop = time.monotonic() + deadline
        while (todo or inflight) and time.monotonic() < stop and not until():
            while todo and len(inflight) < window:
                mac, xid = todo.pop(), next(self.xids)
                inflight[xid] = (mac, "discover", time.monotonic())
                self.send(self.packet("discover", mac, xid))
            for kind, xid, yiaddr in self.replies(0.3):
                if xid not in inflight:
                    continue
                mac, stage, _ = inflight[xid]
                if kind == "offer" and stage == "discover":
                    inflight[xid] = (mac, "request", time.monotonic())
                    requested.add(mac)
                    self.send(
                        self.packet("request", mac, xid, server_id=SERVER, requested_addr=yiaddr)
                    )
                elif kind == "ack" and stage == "request":
                    del inflight[xid]
                    acked[mac] = yiaddr
                    on_ack(acked)
                elif kind == "nak":
                    del inflight[xid]
                    todo.append(mac)
                if len(inflight) < window // 2 and todo:
                    break
            now = time.monotonic()
            for xid, (mac, _, sent) in list(inflight.items()):
                if now - sent > 1.0:  # lost (or the server is down): start that one again
                    del inflight[xid]
                    todo.append(mac)
        return acked, requested


def test_leases_survive_kill_9_mid_burst_and_a_graceful_restart(link: Link, tmp_path: Path) -> None:
    link.ip_c("addr", "add", "192.0.2.2/24", "dev", link.client_if)
    app = Appliance(link, tmp_path)
    app.raw["network"]["dhcp_range"] = list(POOL)
    write_inventory(app.config, app.raw)
    relay = RelayClient(link.client_socket(("192.0.2.2", 67)), giaddr="192.0.2.2")
    macs = [f"02:b0:00:00:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(100)]
    try:
        app.start()
        killed: list[float] = []

        def kill_mid_burst(acked: dict[str, str]) -> None:
            if len(acked) >= 40 and not killed:
                assert app.proc is not None
                app.proc.kill()  # SIGKILL: no flush, no goodbye
                killed.append(time.monotonic())

        # Replies already on their way are still collected for half a second.
        acked, requested = relay.burst(
            macs,
            window=16,
            on_ack=kill_mid_burst,
            until=lambda: bool(killed) and time.monotonic() - killed[0] > 0.5,
            deadline=10.0,
        )
        assert killed, "the burst ended before the kill"
        assert app.proc is not None
        app.proc.wait(timeout=10)
        assert app.proc.returncode == -signal.SIGKILL
        stored = app.leases()
        stats = f"{len(acked)} ACKed, {len(requested)} REQUESTed, {len(stored)} stored"
        # Killed in the middle: many clients had not had their ACK yet.
        assert 40 <= len(acked) <= len(requested) < len(macs), stats
        assert len(set(acked.values())) == len(acked), "one address ACKed to two MACs"

        # Every ACK the clients saw was on disk before it was sent.
        for mac, ip in acked.items():
            assert stored.get(mac) == (ip, "bound"), f"{mac}: {stats}"
        ips = [ip for ip, _ in stored.values()]
        assert len(ips) == len(set(ips))

        # After the restart the same MACs are offered the same addresses...
        app.start()
        assert f"{len(stored)} leases loaded" in app.log()
        assert relay.offers(list(acked)) == acked
        # ...and the burst completes for everyone, on distinct addresses.
        done, _ = relay.burst(macs, window=16)
        assert len(done) == len(macs) and len(set(done.values())) == len(macs)
        assert all(done[mac] == ip for mac, ip in acked.items())
        assert all(in_pool(ip) for ip in done.values())

        # A graceful restart (SIGTERM) keeps every lease too.
        assert app.stop() == 0
        assert app.leases() == {mac: (ip, "bound") for mac, ip in done.items()}
        app.start()
        assert f"{len(macs)} leases loaded" in app.log()
        assert relay.offers(macs) == done
    finally:
        app.close()
        relay.sock.close()
