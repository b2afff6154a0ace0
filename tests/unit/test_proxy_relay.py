"""The proxy's data path in-process: pump.py's Direction, poller.py and relay.py.

Real TCP sockets on loopback throughout, no fakes: Direction is driven by hand over
connected socket pairs (the edges a poller would report are set as flags), and the
relay runs inside a real ProxyService (real plan, store and event bus) in front of
real asyncio echo servers on the workers' 127.0.0.x addresses, once with the
edge-triggered epoll poller and once with the add_reader/add_writer fallback that
platforms without epoll use, with splice() on and off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.events import EventBus
from appliance.inventory import load_inventory
from appliance.plan import build_plan
from appliance.runtime import RuntimeState
from appliance.service import ServiceContext
from appliance.storequeue import DaemonStore
from services.proxy import poller as poller_module
from services.proxy.limits import Ledger, derive
from services.proxy.pump import CHUNK, DST_ERROR, EOF, HAVE_SPLICE, SPLICE_AFTER, WAIT, Direction
from services.proxy.server import ProxyService
from tests.helpers import free_port, loopback_inventory, write_inventory

LB = "127.0.0.54"
WORKERS = {"worker-0": "127.0.0.44", "worker-1": "127.0.0.46"}
IO_TIMEOUT = 10.0


# --- Direction over real socket pairs --------------------------------------------------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (client end, accepted end), non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


@pytest.fixture
def chain() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """client -> (proxy_in ... proxy_out) -> server: the Direction runs proxy_in -> proxy_out."""
    client, proxy_in = tcp_pair()
    proxy_out, server = tcp_pair()
    yield client, proxy_in, proxy_out, server
    for s in (client, proxy_in, proxy_out, server):
        s.close()


def drain(sock: socket.socket, until: float = 0.2) -> bytes:
    """Everything readable now (waits up to `until` s for the first byte)."""
    got = bytearray()
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            if got:
                break
            time.sleep(0.005)
            continue
        if not data:
            break
        got += data
    return bytes(got)


def pump_until(way: Direction, want: int, deadline_s: float = 5.0) -> None:
    """Pump (as edges would) until `want` bytes moved; bounded in time."""
    deadline = time.monotonic() + deadline_s
    while way.moved < want and time.monotonic() < deadline:
        way.readable = True
        way.pump()
    assert way.moved >= want, f"moved {way.moved} of {want}"


def test_short_exchange_uses_a_buffer_and_reports_eof(chain: Any) -> None:
    client, proxy_in, proxy_out, server = chain
    way = Direction(proxy_in, proxy_out, splice=HAVE_SPLICE)
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    time.sleep(0.01)
    way.readable = True
    assert way.pump() == WAIT
    assert not way.readable, "a short read empties the queue: wait for the next edge"
    assert way.pipe is None and way.moved == 18
    assert drain(server) == b"GET / HTTP/1.1\r\n\r\n"
    # Nothing new: a spurious edge costs one EAGAIN and changes nothing.
    way.readable = True
    assert way.pump() == WAIT and not way.readable
    # A FIN after data: reported as EOF only once the data is written.
    client.sendall(b"tail")
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.01)
    way.readable, way.peer_shut = True, True
    assert way.pump() == EOF
    assert drain(server) == b"tail" and way.moved == 22


def test_back_pressure_holds_one_chunk(chain: Any) -> None:
    """A receiver that does not read stops the sender: the proxy holds at most a chunk."""
    client, proxy_in, proxy_out, server = chain
    for s in (proxy_out, server):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    way = Direction(proxy_in, proxy_out, splice=False)
    blob = os.urandom(8 << 20)
    sent = 0
    for _ in range(10_000):  # fill every buffer on the way: the client blocks at last
        try:
            sent += client.send(blob[sent : sent + (1 << 20)])
        except BlockingIOError:
            way.readable = True
            before = way.moved
            assert way.pump() == WAIT
            if way.moved == before and way.holding:
                try:
                    sent += client.send(blob[sent : sent + (1 << 20)])
                except BlockingIOError:
                    break
    assert way.holding and len(way.buf) <= CHUNK
    assert sent < len(blob), "the client was never stopped"
    assert way.moved < 4 << 20, "the proxy kept reading although nothing was taken"
    # The receiver reads again: the write edge resumes, every byte arrives in order.
    got = bytearray()
    deadline = time.monotonic() + 20
    while len(got) < sent and time.monotonic() < deadline:
        got += drain(server, 0.05)
        way.readable = True
        way.pump()
        with contextlib.suppress(BlockingIOError):
            if sent < len(blob):
                sent += client.send(blob[sent : sent + (1 << 20)])
    assert bytes(got) == blob[: len(got)] and len(got) == sent


@pytest.mark.skipif(not HAVE_SPLICE, reason="no splice() on this platform")
def test_switches_to_splice_after_the_threshold(chain: Any) -> None:
    client, proxy_in, proxy_out, server = chain
    way = Direction(proxy_in, proxy_out, splice=True)
    blob = os.urandom(SPLICE_AFTER + (3 << 20))
    client.setblocking(True)
    got = bytearray()
    sent = 0
    deadline = time.monotonic() + 20
    while len(got) < len(blob) and time.monotonic() < deadline:
        if sent < len(blob):
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sent += client.send(blob[sent : sent + (256 << 10)])
        way.readable = True
        way.pump()
        got += drain(server, 0.01)
    assert way.pipe is not None, "still on recv/send past SPLICE_AFTER"
    assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
    way.close()
    assert way.pipe is None


@pytest.mark.skipif(not HAVE_SPLICE, reason="no splice() on this platform")
def test_no_pipe_past_the_descriptor_budget(chain: Any) -> None:
    """A direction turning bulk takes its pipe from the proxy's descriptors: when they are
    mostly spent it stays on recv/send, and the bytes still arrive."""
    client, proxy_in, proxy_out, server = chain
    ledger = Ledger(derive(64, {"a": 100}, 0))
    while ledger.take_pipe():
        pass
    full = ledger.fds_used
    way = Direction(proxy_in, proxy_out, True, ledger)
    blob = os.urandom(SPLICE_AFTER + (1 << 20))
    got = bytearray()
    sent = 0
    deadline = time.monotonic() + 20
    while len(got) < len(blob) and time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            if sent < len(blob):
                sent += client.send(blob[sent : sent + (256 << 10)])
        way.readable = True
        way.pump()
        got += drain(server, 0.01)
    assert way.pipe is None and ledger.fds_used == full
    assert bytes(got) == blob
    ledger.give_pipe()  # one pipe's room: the next bulk direction splices
    way2 = Direction(proxy_out, proxy_in, True, ledger)
    way2._open_pipe()
    assert way2.pipe is not None and ledger.fds_used == full
    way2.close()
    assert ledger.fds_used == full - 2


def test_a_reset_receiver_is_a_write_error(chain: Any) -> None:
    client, proxy_in, proxy_out, server = chain
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    server.close()  # RST
    time.sleep(0.01)
    way = Direction(proxy_in, proxy_out, splice=False)
    client.sendall(b"x" * 100)
    time.sleep(0.01)
    results = set()
    for _ in range(3):
        way.readable = True
        results.add(way.pump())
    assert DST_ERROR in results and way.done and isinstance(way.error, OSError)


# --- the relay inside a real ProxyService --------------------------------------------------


@dataclass
class Backend:
    name: str
    server: asyncio.Server


async def echo_backend(name: str, host: str, port: int, banner: bool = False) -> Backend:
    """Echo lines; on the client's EOF answer `bye <name>` and close (half-close).
    With `banner`, the server speaks first (`hi <name>`), as SSH or SMTP do."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            if banner:
                w.write(f"hi {name}\n".encode())
            while line := await r.readline():
                w.write(line)
                await w.drain()
            w.write(f"bye {name}\n".encode())
            await w.drain()
        finally:
            w.close()

    server = await asyncio.start_server(serve, host, port)
    return Backend(name, server)


@dataclass
class Proxy:
    svc: ProxyService
    port: int
    backend_port: int
    backends: dict[str, Backend]


@contextlib.asynccontextmanager
async def proxy(
    tmp_path: Path,
    poller: str,
    splice: bool,
    monkeypatch: pytest.MonkeyPatch,
    banner: bool = False,
    **lb: Any,
) -> AsyncIterator[Proxy]:
    monkeypatch.setattr(poller_module, "HAVE_EPOLL", poller == "epoll")
    port, backend_port = free_port(host=LB), free_port()
    backends = {n: await echo_backend(n, ip, backend_port, banner) for n, ip in WORKERS.items()}
    raw = loopback_inventory(tmp_path)
    raw["nodes"] = [
        *[n for n in raw["nodes"] if n["role"] != "worker"],
        *[
            {"name": n, "role": "worker", "mac": f"52:54:00:00:01:{i:02x}", "ip": ip}
            for i, (n, ip) in enumerate(WORKERS.items())
        ],
    ]
    raw["load_balancer"] = {
        "address": LB,
        "backend_ports": {"ingress_http": backend_port},
        "ingress_check": "tcp",
        "check_interval": 60,
        "balance": "roundrobin",  # spread over both workers (ingress defaults to source)
        **lb,
    }
    raw["listen"]["ingress_http"] = f"{LB}:{port}"
    plan = build_plan(load_inventory(write_inventory(tmp_path / "inv.yaml", raw)))
    store = DaemonStore.open(plan.state_dir)  # what the supervisor hands a service
    ctx = ServiceContext(
        bus=EventBus(),
        store=store,
        log=logging.getLogger("proxy-test"),
        runtime=RuntimeState(store),
    )
    svc = ProxyService(ctx, plan)
    svc.splice = splice and HAVE_SPLICE
    await svc.start()
    try:
        for _ in range(200):  # the first checks: both backends up
            pool = svc.frontends["ingress_http"].pool.backends
            if all(b.health == "up" for b in pool):
                break
            await asyncio.sleep(0.01)
        yield Proxy(svc, port, backend_port, backends)
    finally:
        await svc.stop()
        for b in backends.values():
            b.server.close()
            await b.server.wait_closed()
        store.close()
    assert svc.poller is None, "the epoll set outlived the service"


async def exchange(port: int, lines: list[str]) -> list[str]:
    """Send lines, half-close, read everything back to the proxy's EOF."""
    r, w = await asyncio.wait_for(asyncio.open_connection(LB, port), IO_TIMEOUT)
    try:
        for line in lines:
            w.write(line.encode() + b"\n")
        await w.drain()
        w.write_eof()
        data = await asyncio.wait_for(r.read(), IO_TIMEOUT)
    finally:
        w.close()
    return data.decode().splitlines()


POLLERS = pytest.mark.parametrize(
    "poller,splice",
    [("epoll", True), ("epoll", False), ("loop", True), ("loop", False)],
    ids=["epoll-splice", "epoll-recv", "fallback-splice", "fallback-recv"],
)


@POLLERS
async def test_round_trip_half_close_and_bulk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poller: str, splice: bool
) -> None:
    async with proxy(tmp_path, poller, splice, monkeypatch) as p:
        kind = type(p.svc.get_poller()).__name__
        assert kind == ("EpollPoller" if poller == "epoll" else "LoopPoller")
        seen = set()
        for i in range(6):
            answer = await exchange(p.port, [f"hello {i}", "again"])
            assert answer[:2] == [f"hello {i}", "again"] and answer[2].startswith("bye ")
            seen.add(answer[2].split()[1])
        assert seen == set(WORKERS)  # round-robin
        # Past SPLICE_AFTER each way: 2 MB echoed line by line arrive intact.
        blob = [os.urandom(3000).hex() for _ in range(350)]
        answer = await exchange(p.port, blob)
        assert answer[:-1] == blob and answer[-1].startswith("bye ")
        fe = p.svc.frontends["ingress_http"]
        total_in = sum(b.bytes_in for b in fe.pool.backends)
        assert total_in >= sum(len(x) + 1 for x in blob)
        for _ in range(100):
            if not fe.connections:
                break
            await asyncio.sleep(0.01)
        assert not fe.connections and all(b.active == 0 for b in fe.pool.backends)


@POLLERS
async def test_refused_connect_is_retried_and_marks_the_backend_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poller: str, splice: bool
) -> None:
    async with proxy(tmp_path, poller, splice, monkeypatch) as p:
        dead = p.backends["worker-1"].server
        dead.close()
        await dead.wait_closed()
        for i in range(4):  # round-robin meets worker-1 at once; nobody notices
            answer = await exchange(p.port, [f"try {i}"])
            assert answer == [f"try {i}", "bye worker-0"]
        fe = p.svc.frontends["ingress_http"]
        state = fe.pool.find("worker-1")
        assert state is not None and state.health == "down" and state.failures == 1
        assert "connect: Connection refused" in state.history[-1][2]
        assert fe.counters["retries"] == 1


@POLLERS
async def test_connect_timeout_moves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poller: str, splice: bool
) -> None:
    """A backend whose accept queue is full drops the SYN: the connect times out."""
    async with proxy(tmp_path, poller, splice, monkeypatch, connect_timeout=0.3) as p:
        stuck = p.backends["worker-1"].server
        stuck.close()
        await stuck.wait_closed()
        squat = socket.socket()
        squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squat.bind((WORKERS["worker-1"], p.backend_port))
        squat.listen(0)
        fillers = []
        for _ in range(4):  # fill the accept queue; then SYNs are dropped
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex((WORKERS["worker-1"], p.backend_port))
            fillers.append(f)
        await asyncio.sleep(0.2)
        try:
            started = time.monotonic()
            answers = [await exchange(p.port, [f"slow {i}"]) for i in range(2)]
            took = time.monotonic() - started
        finally:
            for s in [squat, *fillers]:
                s.close()
        assert answers == [["slow 0", "bye worker-0"], ["slow 1", "bye worker-0"]]
        assert 0.3 <= took < 0.3 + 2.0
        state = p.svc.frontends["ingress_http"].pool.find("worker-1")
        assert state is not None and state.health == "down"
        assert state.history[-1][2] == "connect: timed out"


@POLLERS
async def test_the_backend_speaks_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poller: str, splice: bool
) -> None:
    """Nothing from the client yet: the connect completes on its own write edge and the
    backend's banner comes through before the client says a word."""
    async with proxy(tmp_path, poller, splice, monkeypatch, banner=True) as p:
        for _ in range(2):
            r, w = await asyncio.wait_for(asyncio.open_connection(LB, p.port), IO_TIMEOUT)
            try:
                hello = await asyncio.wait_for(r.readline(), IO_TIMEOUT)
                assert hello.startswith(b"hi worker-")
                w.write(b"ping\n")
                assert await asyncio.wait_for(r.readline(), IO_TIMEOUT) == b"ping\n"
            finally:
                w.close()
        fe = p.svc.frontends["ingress_http"]
        assert sum(b.total for b in fe.pool.backends) == 2
        assert sum(b.bytes_out for b in fe.pool.backends) >= 2 * len("hi worker-0\nping\n")
