"""The dns service against outsiders (issue 14): third-party clients and hostile peers.

dnspython and dig check the conformance of error replies (opcode echoed, REFUSED for
other classes, OPT kept in FORMERR, RFC 7873 COOKIE checks). Hostile peers: a client
that holds every TCP slot, one that never reads its answers, packets that are
responses, spoofed packets "from" reflector ports or from our own listener, and
upstreams that echo queries back or are ourselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rrset
import dns.update
import pytest

import services.dns.server
from appliance.inventory import Endpoint
from appliance.registry import DNS
from appliance.supervisor import Supervisor, load_plan
from services.dns.server import DnsService
from services.dns.tcpslots import TcpLimits
from tests.helpers import need_tool, write_inventory
from tests.integration.test_dns_real import (
    LB,
    TIMEOUT,
    Daemon,
    addresses,
    dgxpod_inventory,
    dig,
    free_dns_port,
    serving_pod,
)

D = "dgxpod.nvidia.com"


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from serving_pod(tmp_path_factory.mktemp("hostile"))


def udp(port: int, q: dns.message.Message) -> dns.message.Message:
    return dns.query.udp(q, "127.0.0.1", timeout=TIMEOUT, port=port)


def tcp(port: int, q: dns.message.Message) -> dns.message.Message:
    return dns.query.tcp(q, "127.0.0.1", timeout=TIMEOUT, port=port)


# --- conformance with third-party clients --------------------------------------------------


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.UPDATE, 15])
def test_other_opcodes_with_dnspython(pod: Daemon, opcode: int) -> None:
    """dnspython drops a reply whose opcode is not the query's (BadResponse)."""
    for send in (udp, tcp):
        for edns in (-1, 0):
            if opcode == dns.opcode.UPDATE:
                update = dns.update.UpdateMessage(D)
                update.replace("x", 300, "A", "192.0.2.1")
                update.use_edns(edns)
                q: dns.message.Message = update
            else:
                q = dns.message.make_query(D, "SOA", use_edns=edns)
                q.flags = (q.flags & ~0x7800) | (opcode << 11)  # any opcode, 15 too
            reply = send(pod.port, q)
            assert reply.opcode() == opcode and reply.rcode() == dns.rcode.NOTIMP
            assert reply.edns == edns


@pytest.mark.tool("dig")
def test_conformance_with_dig(pod: Daemon) -> None:
    need_tool("dig")
    notify = dig(pod.port, "+opcode=notify", D, "SOA")
    assert "opcode: NOTIFY, status: NOTIMP" in notify, notify
    chaos = dig(pod.port, "CH", "TXT", "version.bind")
    assert "status: REFUSED" in chaos and "OPT PSEUDOSECTION" in chaos, chaos
    bad_cookie = dig(pod.port, "+nocookie", "+ednsopt=10:01020304050607", f"api.{D}")
    assert "status: FORMERR" in bad_cookie and "OPT PSEUDOSECTION" in bad_cookie, bad_cookie
    good = dig(pod.port, "+cookie", f"api.{D}")  # dig's own 8-byte client cookie
    assert "status: NOERROR" in good and f"api.{D}. 60 IN A {LB}" in good


def test_classes_and_cookies_with_dnspython(pod: Daemon) -> None:
    for send in (udp, tcp):
        chaos = send(pod.port, dns.message.make_query("version.bind", "TXT", "CH"))
        assert chaos.rcode() == dns.rcode.REFUSED
        for size in (7, 9, 41):
            option = dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * size)
            q = dns.message.make_query(f"api.{D}", "A", use_edns=0, options=[option])
            reply = send(pod.port, q)
            assert reply.rcode() == dns.rcode.FORMERR and reply.edns == 0, size
        cookie = dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8)
        ok = send(pod.port, dns.message.make_query(f"api.{D}", "A", use_edns=0, options=[cookie]))
        assert addresses(ok) == [LB]
    # Two questions with EDNS: FORMERR, and the OPT is there (RFC 6891 7).
    two = dns.message.make_query(D, "SOA", use_edns=0)
    two.question.append(dns.message.make_query(f"api.{D}", "A").question[0])
    reply = udp(pod.port, two)
    assert reply.rcode() == dns.rcode.FORMERR and reply.edns == 0


# --- reflection ---------------------------------------------------------------------------


def test_responses_get_no_answer(pod: Daemon) -> None:
    before = pod.counters()
    response = dns.message.make_response(dns.message.make_query(f"api.{D}", "A"))
    garbage_response = b"\x12\x34\x84\x00" + b"\xff" * 40
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", pod.port))
        sock.settimeout(0.3)
        for packet in (response.to_wire(), garbage_response):
            sock.send(packet)
            with pytest.raises(TimeoutError):
                sock.recv(65535)
    after = pod.counters()
    assert after["responses_dropped"] - before["responses_dropped"] == 2


def _udp4(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 + UDP packet (UDP checksum 0: none, allowed over IPv4)."""
    udp_header = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0)
    ip_header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + 8 + len(payload),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,  # the kernel fills in the checksum for IPPROTO_RAW
        socket.inet_aton(src[0]),
        socket.inet_aton(dst[0]),
    )
    return ip_header + udp_header + payload


@pytest.mark.root
def test_spoofed_from_our_own_listener(pod: Daemon) -> None:
    """A query "from" 127.0.0.1:<our port>: answering it would be a reply to ourselves."""
    before = pod.status()["services"]["dns"]
    query = dns.message.make_query(f"api.{D}", "A").to_wire()
    ours = ("127.0.0.1", pod.port)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for _ in range(3):
            raw.sendto(_udp4(ours, ours, query), ours)
    time.sleep(0.3)
    after = pod.status()["services"]["dns"]
    assert after["rcodes"].get("NOERROR", 0) == before["rcodes"].get("NOERROR", 0)
    moved = after["counters"].get("self_dropped", 0) - before["counters"].get("self_dropped", 0)
    assert moved == 3


@pytest.mark.root
@pytest.mark.parametrize("port", [7, 19])
def test_queries_from_reflector_ports_are_dropped(pod: Daemon, port: int) -> None:
    """echo (7) and chargen (19) answer anything: a reply to them would loop."""
    before = pod.counters()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.settimeout(0.3)
        sock.sendto(dns.message.make_query(f"api.{D}", "A").to_wire(), ("127.0.0.1", pod.port))
        with pytest.raises(TimeoutError):
            sock.recv(65535)
    assert pod.counters()["reflector_dropped"] - before["reflector_dropped"] == 1


# --- TCP slots -----------------------------------------------------------------------------


def _open(port: int, source: str, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(
            ("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0)
        )
        out.append(s)
    return out


def _is_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def test_one_client_cannot_hold_every_tcp_slot(pod: Daemon) -> None:
    """256 idle connections from 127.0.0.1 used to leave no slot for anyone else."""
    hog = _open(pod.port, "127.0.0.1", 260)
    try:
        time.sleep(0.2)
        q = dns.message.make_query(f"api.{D}", "A")
        reply = dns.query.tcp(q, "127.0.0.1", timeout=TIMEOUT, port=pod.port, source="127.0.0.2")
        assert addresses(reply) == [LB]
        held = sum(_is_open(s) for s in hog)
        assert held <= services.dns.server.TCP_LIMITS.per_client
        counters = pod.counters()
        assert counters["tcp_refused_client"] >= 260 - held
    finally:
        for s in hog:
            s.close()


async def _in_process(tmp_path: Path, **network: Any) -> tuple[Supervisor, int]:
    port = free_dns_port()
    raw = dgxpod_inventory(tmp_path / "state", port, **network)
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    sup = Supervisor(config, specs=[DNS])
    await sup.start(load_plan(config))
    return sup, port


async def test_idle_timeout_shrinks_and_a_full_table_makes_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = TcpLimits(total=32, per_client=16, per_client_min=4, idle=10.0, idle_min=0.5)
    monkeypatch.setattr(services.dns.server, "TCP_LIMITS", limits)
    sup, port = await _in_process(tmp_path)
    svc = sup.running["dns"]
    assert isinstance(svc, DnsService)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # Eight clients open what they may: the table fills, the cap shrinks on the way.
        for i in range(8):
            for _ in range(16):
                held.append(
                    await asyncio.open_connection(
                        "127.0.0.1", port, local_addr=(f"127.0.0.{10 + i}", 0)
                    )
                )
        await asyncio.sleep(0.1)
        status = svc.status()
        assert status.tcp_connections == 32
        # A newcomer is answered at once: the longest idle of the biggest holder makes room.
        q = dns.message.make_query(f"api.{D}", "A")
        start = time.monotonic()
        reply = await dns.asyncquery.tcp(
            q, "127.0.0.1", timeout=TIMEOUT, port=port, source="127.0.0.99"
        )
        assert addresses(reply) == [LB] and time.monotonic() - start < 0.5
        # At full pressure the longest idle go after idle_min (0.5 s), not after 10 s; as
        # the table empties the others get longer (the timeout follows the pressure).
        while svc.status().counters.get("tcp_idle_closed", 0) == 0:
            assert time.monotonic() - start < 1.0
            await asyncio.sleep(0.05)
        assert svc.status().counters["tcp_evicted"] >= 1
        assert svc.status().tcp_connections < 32
    finally:
        for _, w in held:
            w.close()
        await sup.stop()


async def test_a_client_that_never_reads_loses_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services.dns.server, "TCP_LIMITS", TcpLimits(idle=1.0, idle_min=0.5))
    sup, port = await _in_process(tmp_path)
    svc = sup.running["dns"]
    assert isinstance(svc, DnsService)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        wire = dns.message.make_query(f"_etcd-server-ssl._tcp.{D}", "SRV").to_wire()
        frame = struct.pack("!H", len(wire)) + wire
        sent, deadline = 0, time.monotonic() + 4
        # Queries until the server stops reading them (its answers pile up unread).
        stalled_since: float | None = None
        while time.monotonic() < deadline and sent < 20_000_000:
            try:
                sent += sock.send(frame * 256)
                stalled_since = None
            except ConnectionError:
                break  # the server cut us off
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if svc.status().tcp_connections == 0:
                    break
            await asyncio.sleep(0.01)
        assert svc.status().tcp_connections == 0, (sent, stalled_since, svc.status())
        assert svc.status().counters["tcp_write_timeouts"] == 1
        sock.close()
    finally:
        await sup.stop()


# --- the forwarder -------------------------------------------------------------------------


class FakeUpstream:
    """A hostile upstream DNS server on 127.0.0.2, served by a thread until close()."""

    port: int
    socks: list[socket.socket]

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


async def ask_through(
    tmp_path: Path, upstream: FakeUpstream, timeout: float
) -> dns.message.Message:
    """example.org A from a dns service that forwards to `upstream` (closed after)."""
    try:
        sup, port = await _in_process(tmp_path, upstream_dns=[f"127.0.0.2:{upstream.port}"])
        try:
            q = dns.message.make_query("example.org", "A")
            return await dns.asyncquery.udp(q, "127.0.0.1", timeout=timeout, port=port)
        finally:
            await sup.stop()
    finally:
        upstream.close()


class EchoFirst(FakeUpstream):
    """An upstream that sends the query back (QR=0), a reply to another question, then
    the real answer (example.org A 192.0.2.10): only the last one may be taken."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.socks = [self.sock]
        self._start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            self.sock.sendto(data, addr)  # the query itself, echoed
            other = dns.message.make_response(dns.message.make_query("evil.example", "A"))
            other.id = query.id
            other.answer.append(dns.rrset.from_text("evil.example.", 300, "IN", "A", "192.0.2.66"))
            self.sock.sendto(other.to_wire(), addr)
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.RA
            reply.answer.append(
                dns.rrset.from_text(query.question[0].name, 300, "IN", "A", "192.0.2.10")
            )
            self.sock.sendto(reply.to_wire(), addr)


async def test_forwarder_takes_only_the_reply_to_its_query(tmp_path: Path) -> None:
    reply = await ask_through(tmp_path, EchoFirst(), TIMEOUT)
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["192.0.2.10"]


async def test_forwarder_pointed_at_itself_does_not_loop(tmp_path: Path) -> None:
    """upstream_dns = our own listener (here past the inventory check, which refuses it)."""
    port = free_dns_port()
    raw = dgxpod_inventory(tmp_path / "state", port)
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    plan = load_plan(config)
    looped = dataclasses.replace(plan.dns, upstreams=(Endpoint("127.0.0.1", port),))
    sup = Supervisor(config, specs=[DNS])
    await sup.start(dataclasses.replace(plan, dns=looped))
    try:
        q = dns.message.make_query("example.org", "A")
        start = time.monotonic()
        reply = await dns.asyncquery.udp(q, "127.0.0.1", timeout=TIMEOUT * 2, port=port)
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - start < 0.5  # not after the upstream timeout
        counters = sup.running["dns"].status().to_json()["counters"]
        assert counters["forward_loop"] >= 1
    finally:
        await sup.stop()


class EchoOverTcp(FakeUpstream):
    """An upstream that says TC over UDP and then, over TCP, sends the query back."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.port = free_dns_port(host)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((host, self.port))
        self.udp.settimeout(0.1)
        self.tcp = socket.socket()
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((host, self.port))
        self.tcp.listen(4)
        self.tcp.settimeout(0.1)
        self.echoed = 0
        self.socks = [self.udp, self.tcp]
        self._start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.udp.recvfrom(65535)
                reply = dns.message.make_response(dns.message.from_wire(data))
                reply.flags |= dns.flags.TC
                self.udp.sendto(reply.to_wire(), addr)
            except TimeoutError:
                pass
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                head = conn.recv(2, socket.MSG_WAITALL)
                query = conn.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
                conn.sendall(head + query)  # the query itself: QR=0, same ID, same question
                self.echoed += 1


async def test_forwarder_over_tcp_takes_only_a_response(tmp_path: Path) -> None:
    upstream = EchoOverTcp()
    reply = await ask_through(tmp_path, upstream, TIMEOUT * 3)
    assert upstream.echoed == 1
    assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer
