"""Graceful stop on SIGTERM: listeners close, LB connections drain, the store is flushed.

A long transfer through the load balancer (a real TCP backend in a thread of this
test, a real client reading slowly) finishes during the drain while new connections
are already refused; a connection that does not finish is cut at
`load_balancer.stop_timeout` and the daemon still exits 0 in time. In-process: a
DHCP lease decided just before the stop and the events published while the services
stop reach the SQLite store.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.plan import Plan
from appliance.store import Store
from appliance.supervisor import Supervisor, load_plan
from services.dhcp import codec
from services.dhcp.codec import DhcpMessage
from services.dhcp.server import DhcpService
from tests.helpers import Daemon, free_port, loopback_inventory, write_inventory

LB = "127.0.0.54"  # load_balancer.address of loopback_inventory
WORKER = "127.0.0.44"  # worker-0: the ingress backend
BLOB = 8 << 20  # bytes: with a slow reader this takes a few seconds
PATTERN = hashlib.shake_256(b"graceful stop").digest(1 << 16)


def _blob(n: int) -> Iterator[bytes]:
    while n > 0:
        chunk = PATTERN[: min(n, len(PATTERN))]
        n -= len(chunk)
        yield chunk


class Backend:
    """A TCP server on worker-0's address: `BLOB n` sends n bytes, `HOLD` keeps the
    connection open (reading until EOF); anything else (a TCP health check) is closed."""

    def __init__(self) -> None:
        self.port = free_port(host=WORKER)
        self.listener = socket.create_server((WORKER, self.port))
        self.listener.settimeout(0.2)
        self.running = True
        self.threads: list[threading.Thread] = []
        self.accept_thread = threading.Thread(target=self._accept, daemon=True)
        self.accept_thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn, contextlib.suppress(OSError):
            line = b""
            while not line.endswith(b"\n") and len(line) < 100:
                data = conn.recv(1)
                if not data:
                    return
                line += data
            words = line.split()
            if words[:1] == [b"BLOB"]:
                for chunk in _blob(int(words[1])):
                    conn.sendall(chunk)
            elif words == [b"HOLD"]:
                while conn.recv(65536):
                    pass

    def close(self) -> None:
        self.running = False
        self.accept_thread.join(timeout=2)
        self.listener.close()
        for t in self.threads:
            t.join(timeout=5)


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


def _lb_inventory(tmp_path: Path, backend: Backend, stop_timeout: float | None) -> Path:
    raw = loopback_inventory(tmp_path)
    raw["load_balancer"] = {
        "address": LB,
        "backend_ports": {"ingress_http": backend.port},
        "ingress_check": "tcp",
        "check_interval": 0.2,
        "rise": 1,
    }
    if stop_timeout is not None:
        raw["load_balancer"]["stop_timeout"] = stop_timeout
    raw["listen"]["ingress_http"] = f"{LB}:{free_port(host=LB)}"
    return write_inventory(tmp_path / "inv.yaml", raw)


def _port(config: Path) -> int:
    return int(config.read_text().split(f"ingress_http: {LB}:")[1].split()[0])


def _request(port: int, line: bytes) -> socket.socket:
    sock = socket.create_connection((LB, port), timeout=10)
    sock.sendall(line)
    return sock


def _wait_backend_up(port: int) -> None:
    """Until a request through the LB reaches the backend (its first check passed)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), _request(port, b"BLOB 10\n") as s:
            if s.recv(100):
                return
        time.sleep(0.1)
    raise AssertionError("the backend never came up behind the load balancer")


def _refused(port: int, timeout: float = 5.0) -> float:
    """Seconds until a new connection to the LB is refused."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            socket.create_connection((LB, port), timeout=1).close()
        except ConnectionRefusedError:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"{LB}:{port} still accepts connections {timeout} s after SIGTERM")


def test_long_transfer_finishes_during_the_drain(
    daemons: Callable[..., Daemon], tmp_path: Path, backend: Backend
) -> None:
    config = _lb_inventory(tmp_path, backend, stop_timeout=None)  # the default: 10 s
    port = _port(config)
    d = daemons(config)
    d.wait_for("serving")
    _wait_backend_up(port)

    with _request(port, f"BLOB {BLOB}\n".encode()) as client:
        digest, got = hashlib.sha256(), 0
        sigterm_at = None
        refused_after = None
        while True:
            data = client.recv(65536)
            if not data:
                break
            digest.update(data)
            got += len(data)
            time.sleep(0.01)  # a slow reader: the transfer outlives the SIGTERM
            if sigterm_at is None and got >= 1 << 20:
                d.proc.send_signal(signal.SIGTERM)
                sigterm_at = time.monotonic()
                # New connections are refused while this one still flows.
                refused_after = _refused(port)
                assert d.proc.poll() is None
        finished_at = time.monotonic()
    assert sigterm_at is not None and refused_after is not None
    assert got == BLOB
    assert digest.hexdigest() == hashlib.sha256(b"".join(_blob(BLOB))).hexdigest()
    assert finished_at - sigterm_at > 0.5, "the transfer should outlive the SIGTERM"
    try:
        code = d.proc.wait(timeout=30)  # the supervisor abandons a stuck service after 20 s
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit 30 s after the transfer ended:\n{d.output()}") from None
    assert code == 0, d.output()
    assert "did not stop within" not in d.output(), d.output()
    exited_at = time.monotonic()
    assert exited_at - finished_at < 3, "the daemon should exit once the drain is done"
    out = d.output()
    assert re.search(r"proxy: draining \d+ connections? \(up to 10\.0 s\)", out)
    assert "proxy: all connections finished in" in out
    assert re.search(r"stopping admin, (cluster, )?proxy", out)
    assert "flushed and closed" in out and "stopped" in out


def test_connection_still_open_at_stop_timeout_is_cut(
    daemons: Callable[..., Daemon], tmp_path: Path, backend: Backend
) -> None:
    config = _lb_inventory(tmp_path, backend, stop_timeout=1.0)
    port = _port(config)
    d = daemons(config)
    d.wait_for("serving")
    _wait_backend_up(port)
    with _request(port, b"HOLD\n") as client:
        time.sleep(0.3)  # the connection is through to the backend
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        _refused(port)
        client.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert client.recv(100) == b""  # cut by the appliance at the timeout
        cut_after = time.monotonic() - t0
        assert d.proc.wait(timeout=10) == 0
        took = time.monotonic() - t0
    assert 0.9 <= cut_after <= 4, cut_after
    assert took <= 5, took
    out = d.output()
    # (The probe of _wait_backend_up may still be closing: "draining 1 or 2".)
    assert re.search(r"proxy: draining \d+ connections? \(up to 1\.0 s\)", out)
    assert "proxy: 1 connection still open after 1.0 s: cut" in out


def test_bad_stop_timeout_is_refused(tmp_path: Path) -> None:
    raw = loopback_inventory(tmp_path)
    raw["load_balancer"]["stop_timeout"] = -1
    config = write_inventory(tmp_path / "inv.yaml", raw)
    with pytest.raises(Exception, match=r"load_balancer\.stop_timeout"):
        load_plan(config)


# --- the store is flushed (in-process) ---------------------------------------------------


def _request_message(mac: str, ip: str, server: str) -> bytes:
    m = DhcpMessage(
        op=codec.BOOTREQUEST,
        xid=0x5EED,
        chaddr=bytes.fromhex(mac.replace(":", "")),
        options={
            codec.OPT_MESSAGE_TYPE: bytes((codec.REQUEST,)),
            codec.OPT_SERVER_ID: socket.inet_aton(server),
            codec.OPT_REQUESTED_IP: socket.inet_aton(ip),
        },
    )
    return codec.encode(m)


async def test_stop_flushes_pending_leases_and_events(tmp_path: Path) -> None:
    """A lease decided an instant before the stop is in the group-commit queue, not on
    disk; its ACK event is published only once it is. Both must be in the store after
    stop(). (The real dhcp service and store, in this process, on a loopback port.)"""
    raw: dict[str, Any] = loopback_inventory(tmp_path)
    raw["listen"]["dhcp"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    config = write_inventory(tmp_path / "inv.yaml", raw)
    plan: Plan = load_plan(config)
    sup = Supervisor(config)
    await sup.start(plan)
    dhcp = sup.running["dhcp"]
    assert isinstance(dhcp, DhcpService)
    node = raw["nodes"][0]
    dhcp.on_datagram(
        _request_message(node["mac"], node["ip"], "127.0.0.1"),
        ("127.0.0.1", 68),
        dhcp.transports[0],
        False,
    )
    assert dhcp.pending.leases, "the lease should wait for its group commit"
    await sup.stop()  # no await in between: the committer never ran
    with Store.open(plan.state_dir) as store:
        leases = {lease.mac: lease for lease in store.leases()}
        events = [(e.node, e.stage) for e in store.events()]
    assert leases[node["mac"]].ip == node["ip"] and leases[node["mac"]].state == "bound"
    assert (node["name"], "dhcp-ack") in events
