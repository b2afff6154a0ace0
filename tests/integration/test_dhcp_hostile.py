"""The dhcp service under hostile clients (issue 14), on loopback, every packet built
and read by scapy: a random-MAC DISCOVER flood, DECLINEs from clients holding nothing,
a NAK flood, spoofed packets that would make it reflect or loop, and a pool client's
host name. The appliance is 127.0.0.1 on 127.0.0.0/24 with a pool of 16 addresses
where a test needs one; clients are sockets on 127.0.0.1, answered at their address."""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Daemon, free_port, get_json, loopback_inventory, write_inventory

scapy_dhcp = pytest.importorskip("scapy.layers.dhcp")
BOOTP, DHCP = scapy_dhcp.BOOTP, scapy_dhcp.DHCP

SERVER = "127.0.0.1"
POOL = ("127.0.0.100", "127.0.0.115")
_xids = itertools.count(0x7E000001)


class Env:
    def __init__(self, daemon: Daemon, port: int, admin: str) -> None:
        self.daemon, self.port, self.admin = daemon, port, admin

    def api(self, path: str) -> Any:
        status, body = get_json(f"http://{self.admin}{path}")
        assert status == 200, body
        return body

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.daemon.proc.pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1])


@pytest.fixture
def start(daemons: Callable[..., Daemon], tmp_path: Path) -> Callable[..., Env]:
    def run(pool: bool = False) -> Env:
        raw = loopback_inventory(tmp_path)
        port = free_port(socket.SOCK_DGRAM)
        raw["listen"]["dhcp"] = f"{SERVER}:{port}"
        if pool:
            raw["network"]["dhcp_range"] = list(POOL)
        d = daemons(write_inventory(tmp_path / "inv.yaml", raw))
        d.wait_for("serving")
        return Env(d, port, raw["listen"]["admin"])

    return run


@pytest.fixture
def client() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def packet(kind: str, mac: str, *options: tuple[Any, ...], **bootp: Any) -> Any:
    bootp.setdefault("xid", next(_xids))
    return BOOTP(chaddr=mac_bytes(mac), **bootp) / DHCP(
        options=[("message-type", kind), *options, "end"]
    )


def replies(sock: socket.socket, wait: float) -> list[Any]:
    """Every DHCP reply that reaches `sock` within `wait` seconds of quiet."""
    got: list[Any] = []  # scapy packets (scapy is untyped)
    sock.settimeout(wait)
    while True:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return got
        got.append(BOOTP(data))


def exchange(sock: socket.socket, pkt: Any, port: int) -> Any:
    sock.sendto(bytes(pkt), (SERVER, port))
    sock.settimeout(3.0)
    while True:
        reply = BOOTP(sock.recv(4096))
        if reply.xid == pkt[BOOTP].xid:
            return reply


def option(reply: Any, name: str) -> Any:
    for item in reply[DHCP].options:
        if isinstance(item, tuple) and item[0] == name:
            return item[1]
    return None


def kind(reply: Any) -> int:
    return int(option(reply, "message-type"))


def random_macs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5)) for _ in range(n)]


def flood(sock: socket.socket, packets: list[bytes], port: int, seconds: float = 5.0) -> int:
    """Send each datagram once, paced so the receive buffer keeps up; bounded in time."""
    deadline = time.monotonic() + seconds
    for i, data in enumerate(packets):
        if time.monotonic() > deadline:
            return i
        sock.sendto(data, (SERVER, port))
        if i % 200 == 199:
            time.sleep(0.01)
    return len(packets)


# --- item 5: a random-MAC DISCOVER flood without a pool ---------------------------------


def test_random_mac_flood_is_bounded_in_log_store_and_api(
    start: Callable[..., Env], client: socket.socket
) -> None:
    env = start()
    macs = random_macs(6000, seed=5)
    rss_before = env.rss_kb()
    data = [bytes(packet("discover", mac, ("vendor_class_id", b"PXEClient"))) for mac in macs]
    sent = flood(client, data, env.port)
    assert sent == len(macs)
    assert not replies(client, 0.3), "a stranger got an answer"
    # The store catches up in batches (one transaction a second).
    deadline = time.monotonic() + 10
    page = env.api("/api/v1/unknown-machines?limit=10")
    while time.monotonic() < deadline and page["total"] + page["evicted"] < 5000:
        time.sleep(0.2)
        page = env.api("/api/v1/unknown-machines?limit=10")
    rss_after = env.rss_kb()
    assert page["total"] <= 4096 and page["evicted"] > 0, page
    assert page["total"] + page["evicted"] >= 5000  # UDP on loopback may drop a few
    assert len(page["machines"]) == 10 and page["limit"] == 10
    newest = page["machines"][0]
    assert newest["mac"] in macs and newest["vendor_class"] == "PXEClient"
    tail = env.api(f"/api/v1/unknown-machines?limit=1000&offset={page['total'] - 5}")
    assert len(tail["machines"]) == 5
    status, body = get_json(f"http://{env.admin}/api/v1/unknown-machines?limit=0")
    assert status == 400 and "limit" in body["error"]
    # One line per MAC was 10.9 MB of log in 9 s: now the first ten, then a sum a minute.
    lines = env.daemon.output().count("unknown machine ")
    assert lines <= 10, lines
    print(f"RSS {rss_before} kB -> {rss_after} kB after {sent} random-MAC DISCOVERs")
    assert rss_after - rss_before < 30_000


# --- item 6: DECLINE from anyone ---------------------------------------------------------


def test_declines_from_clients_holding_nothing_leave_the_pool_alone(
    start: Callable[..., Env], client: socket.socket
) -> None:
    env = start(pool=True)
    first, last = (int(a.rsplit(".", 1)[1]) for a in POOL)
    for mac, host in zip(random_macs(200, seed=6), itertools.cycle(range(first, last + 1))):
        decline = packet(
            "decline",
            mac,
            ("requested_addr", f"127.0.0.{host}"),
            ("server_id", SERVER),
        )
        client.sendto(bytes(decline), (SERVER, env.port))
    assert not replies(client, 0.3)
    offer = exchange(client, packet("discover", "02:00:00:00:06:01"), env.port)
    assert kind(offer) == 2 and offer.yiaddr == POOL[0]  # the pool is untouched


def test_a_real_decline_quarantines_and_warns(
    start: Callable[..., Env], client: socket.socket
) -> None:
    env = start(pool=True)
    mac = "02:00:00:00:06:02"
    offer = exchange(client, packet("discover", mac), env.port)
    decline = packet("decline", mac, ("requested_addr", offer.yiaddr), ("server_id", SERVER))
    client.sendto(bytes(decline), (SERVER, env.port))
    env.daemon.wait_for(f"found {offer.yiaddr} in use on the network", timeout=5)
    again = exchange(client, packet("discover", mac), env.port)
    assert again.yiaddr != offer.yiaddr


# --- item 20: the pool client's host name --------------------------------------------------


def test_pool_client_hostname_is_echoed_stored_and_listed(
    start: Callable[..., Env], client: socket.socket
) -> None:
    env = start(pool=True)
    leases: dict[str, str | None] = {}
    for mac, name in (("02:00:00:00:20:01", b"scratch-box"), ("02:00:00:00:20:02", b"x\n<b>")):
        offer = exchange(client, packet("discover", mac, ("hostname", name)), env.port)
        ack = exchange(
            client,
            packet(
                "request",
                mac,
                ("requested_addr", offer.yiaddr),
                ("server_id", SERVER),
                ("hostname", name),
            ),
            env.port,
        )
        assert kind(ack) == 5
        echoed = option(ack, "hostname")
        leases[mac] = echoed.decode() if echoed is not None else None
    assert leases == {"02:00:00:00:20:01": "scratch-box", "02:00:00:00:20:02": None}
    listed = {x["mac"]: x["hostname"] for x in env.api("/api/v1/leases")["leases"]}
    assert listed == leases


# --- item 1 (DHCP part): no reflection, no loops, NAKs rate-limited ----------------------


def test_a_nak_flood_is_rate_limited(start: Callable[..., Env], client: socket.socket) -> None:
    env = start(pool=True)
    bad = [
        bytes(packet("request", mac, ("requested_addr", "192.0.2.1")))
        for mac in random_macs(500, seed=7)
    ]
    flood(client, bad, env.port)
    naks = [r for r in replies(client, 0.5) if kind(r) == 6]
    assert 0 < len(naks) <= 40, len(naks)


def test_a_bootreply_gets_no_answer(start: Callable[..., Env], client: socket.socket) -> None:
    env = start()
    reply = packet("offer", "52:54:00:00:00:50", ("server_id", "127.0.0.9"), op=2)
    client.sendto(bytes(reply), (SERVER, env.port))
    assert not replies(client, 0.3)


class Echo:
    """A UDP echo service (port 7): whatever reaches it goes straight back to its sender."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.echoed = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 30  # bounded even if a test forgets to stop it
        while self.running and time.monotonic() < deadline:
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if self.echoed < 1000:
                self.echoed += 1
                self.sock.sendto(data, addr)

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.mark.root
def test_spoofed_requests_are_not_reflected(start: Callable[..., Env]) -> None:
    """Requests forged with the source of an echo service, of another DHCP server (port
    67, no relay) and of the server itself get no answer: no reflection, no loop."""
    scapy_all = pytest.importorskip("scapy.all")
    env = start()
    echo = Echo(7)
    try:
        forged = [
            ("127.0.0.1", 7),  # echo: it would bounce our OFFER back to us
            ("127.0.0.1", 67),  # another server's port without giaddr
            ("127.0.0.1", env.port),  # our own address and port: a reply to ourselves
        ]
        for sport_src, sport in forged:
            pkt = (
                scapy_all.IP(src=sport_src, dst=SERVER)
                / scapy_all.UDP(sport=sport, dport=env.port)
                / packet("discover", "52:54:00:00:00:50")
            )
            scapy_all.send(pkt, iface="lo", verbose=False)
        time.sleep(0.5)
        assert echo.echoed == 0, f"the echo service got {echo.echoed} replies from us"
        counters = env.api("/api/v1/status")
        assert "reflection" in str(counters), counters
    finally:
        echo.close()
