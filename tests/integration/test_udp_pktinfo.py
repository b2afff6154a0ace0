"""Wildcard UDP listeners answer from the address asked (appliance.pktinfo), on loopback.

The whole of 127.0.0.0/8 is local: a client at 127.0.0.1 that asks 127.0.0.2 gets a
reply from a wildcard socket with the kernel's source for the route back, 127.0.0.1,
unless the reply says its source. So no namespace is needed to see the bug (the root
test tests/system/test_udp_source_address.py has it on a real link, with dig, curl and
tftp-hpa). Checked: the reader's reply source (and, as a control, the plain reply's),
many datagrams queued at once all read, and `appliance run` with dns and tftp on
0.0.0.0: dnspython (which rejects a reply from an unexpected source) and tftp-hpa
asking 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from appliance import pktinfo
from tests.helpers import Daemon, free_port, loopback_inventory, need_tool, write_inventory

ASKED = "127.0.0.2"  # the address the client asks: not the route's source back to it
CLIENT = "127.0.0.1"


def _client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((CLIENT, 0))
    sock.settimeout(5)
    return sock


def test_needs_pktinfo_only_for_a_wildcard_ipv4_udp_socket() -> None:
    cases = [
        (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", True),
        (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", False),
        (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", False),
    ]
    for family, kind, host, want in cases:
        with socket.socket(family, kind) as sock:
            sock.bind((host, 0))
            assert pktinfo.needs_pktinfo(sock) is want, (family, kind, host)


def test_reply_leaves_from_the_address_asked() -> None:
    async def run() -> tuple[Any, Any, list[bytes | None]]:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("0.0.0.0", 0))
        port = server.getsockname()[1]
        seen: list[bytes | None] = []
        errors: list[OSError] = []

        def handler(data: bytes, addr: tuple[Any, ...], dst: bytes | None) -> None:
            seen.append(dst)
            reader.sendto(b"with:" + data, addr, dst)
            # The control: what the same socket's plain reply looks like.
            pktinfo.sendto(server, b"plain:" + data, addr, None)

        reader = pktinfo.UdpReader(server, handler, errors.append)
        reader.start(loop)
        client = _client()
        try:
            client.sendto(b"q", (ASKED, port))
            first = await loop.run_in_executor(None, client.recvfrom, 100)
            second = await loop.run_in_executor(None, client.recvfrom, 100)
        finally:
            client.close()
            reader.close()
        assert not errors
        return first, second, seen

    first, second, seen = asyncio.run(run())
    assert seen == [socket.inet_aton(ASKED)]
    assert pktinfo.host(socket.inet_aton(ASKED)) == ASKED
    replies = {first[0]: first[1][0], second[0]: second[1][0]}
    assert replies[b"with:q"] == ASKED
    assert replies[b"plain:q"] == CLIENT  # without IP_PKTINFO: the bug this fixes


def test_a_queue_of_datagrams_is_drained_in_bounded_batches() -> None:
    """300 datagrams queued before the loop looks: every one read, at most `batch` per
    readiness callback (other work on the loop runs in between)."""
    count = 300

    async def run() -> tuple[list[int], list[int]]:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        server.bind(("0.0.0.0", 0))
        port = server.getsockname()[1]
        got: list[int] = []
        per_ready: list[int] = []

        def handler(data: bytes, addr: tuple[Any, ...], dst: bytes | None) -> None:
            got.append(int(data))

        reader = pktinfo.UdpReader(server, handler, lambda exc: None, batch=64)
        ready = reader._ready

        def counted() -> None:
            before = len(got)
            ready()
            per_ready.append(len(got) - before)

        reader._ready = counted  # type: ignore[method-assign]
        client = _client()
        for i in range(count):
            client.sendto(str(i).encode(), (ASKED, port))
        reader.start(loop)
        deadline = loop.time() + 10
        while len(got) < count and loop.time() < deadline:
            await asyncio.sleep(0.01)
        client.close()
        reader.close()
        assert reader.is_closing()
        return got, per_ready

    got, per_ready = asyncio.run(run())
    assert sorted(got) == list(range(count))
    assert max(per_ready) == 64
    assert len([n for n in per_ready if n]) < count / 10  # batches, not one per callback


def test_a_reply_from_an_address_gone_is_a_socket_error_not_a_crash() -> None:
    """The address asked was taken away before the reply (an HA floating address moved):
    the send fails, on_error counts it, the caller goes on."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 0))
    errors: list[OSError] = []
    reader = pktinfo.UdpReader(server, lambda d, a, t: None, errors.append)
    try:
        reader.sendto(b"reply", (CLIENT, 9), socket.inet_aton("192.0.2.99"))
    finally:
        reader.close()
    assert len(errors) == 1 and isinstance(errors[0], OSError)


def test_close_leaves_the_loop_and_frees_the_port() -> None:
    """A service stopped and started again (a reload that moves a listener) binds the
    same port: close() takes the socket off the loop and closes it, once."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("0.0.0.0", 0))
        port = server.getsockname()[1]
        fd = server.fileno()
        errors: list[OSError] = []
        reader = pktinfo.UdpReader(server, lambda d, a, t: None, errors.append)
        reader.start(loop)
        reader.close()
        reader.close()
        assert reader.is_closing()
        assert not loop.remove_reader(fd)  # no reader left for that descriptor
        reader.sendto(b"late", (CLIENT, 9), socket.inet_aton(ASKED))  # after close: nothing
        assert not errors
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("0.0.0.0", port))

    asyncio.run(run())


# --- the services, in `appliance run` ------------------------------------------------


@pytest.fixture(scope="module")
def wildcard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, bytes]]:
    base = tmp_path_factory.mktemp("pktinfo")
    raw = loopback_inventory(base)
    dns_port, tftp_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    raw["listen"]["dns"] = f"0.0.0.0:{dns_port}"
    raw["listen"]["tftp"] = f"0.0.0.0:{tftp_port}"
    content = os.urandom(512 * 30 + 5)
    (base / "tftp").mkdir()
    (base / "tftp" / "file").write_bytes(content)
    (base / "ignition").mkdir()
    daemon = Daemon(write_inventory(base / "inventory.yaml", raw), base / "daemon.log")
    try:
        daemon.wait_for("serving demo.example.com")
        yield dns_port, tftp_port, content
    finally:
        daemon.stop()


def test_dns_on_a_wildcard_answers_from_the_address_asked(
    wildcard: tuple[int, int, bytes],
) -> None:
    port = wildcard[0]
    for _ in range(3):  # several in a row on the same listener
        q = dns.message.make_query("master-0.demo.example.com", "A")
        # dnspython raises UnexpectedSource on a reply from another address.
        reply = dns.query.udp(q, ASKED, timeout=5, port=port, source=CLIENT)
        assert [rd.address for rrset in reply.answer for rd in rrset] == ["127.0.0.50"]


def test_tftp_on_a_wildcard_serves_from_the_address_asked(
    wildcard: tuple[int, int, bytes], tmp_path: Path
) -> None:
    _, port, content = wildcard
    tool = need_tool("tftp")
    dest = tmp_path / "got"
    cmd = [tool, "-m", "binary", ASKED, str(port), "-c", "get", "file", str(dest)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert dest.exists() and dest.read_bytes() == content, out.stdout + out.stderr


def test_tftp_error_on_a_wildcard_comes_from_the_address_asked(
    wildcard: tuple[int, int, bytes],
) -> None:
    port = wildcard[1]
    client = _client()
    try:
        client.sendto(b"\x00\x01no-such-file\x00octet\x00", (ASKED, port))
        deadline = time.monotonic() + 5
        data, addr = client.recvfrom(2048)
        assert time.monotonic() < deadline
    finally:
        client.close()
    assert data[:2] == b"\x00\x05", data
    assert addr[0] == ASKED, addr
