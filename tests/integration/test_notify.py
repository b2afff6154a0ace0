"""The systemd notify protocol against a real unix datagram socket bound by the test.

The test plays systemd's part: it binds NOTIFY_SOCKET (a path, or an abstract `@`
name), starts `appliance run` with WATCHDOG_USEC, and reads what arrives: READY=1
with MAINPID and STATUS only once the listeners answer, WATCHDOG=1 at about half
the interval, RELOADING=1 + MONOTONIC_USEC and READY=1 again on SIGHUP, STOPPING=1
on SIGTERM. A blocked event loop is shown to stop the pings (in-process, with the
real watchdog loop and the real socket).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from appliance.notify import monotonic_usec, notify, watchdog_interval, watchdog_loop
from tests.helpers import ROOT, Daemon, free_port, loopback_inventory, write_inventory

WATCHDOG_USEC = 400_000  # 0.4 s: pings every 0.2 s


class NotifySocket:
    """systemd's end: a bound SOCK_DGRAM socket; a thread timestamps every datagram."""

    def __init__(self, address: str) -> None:
        self.name = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append((time.monotonic(), data.decode()))

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.messages)

    def wait(self, prefix: str, after: int = 0, timeout: float = 15.0) -> tuple[int, float, str]:
        """(index, arrival time, text) of the first message from index `after` on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (t, text) in enumerate(self.snapshot()[after:], start=after):
                if text.startswith(prefix):
                    return i, t, text
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} after #{after} in {self.snapshot()}")

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=2)
        self.sock.close()


def _fields(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@appliance-test-{os.getpid()}-{time.monotonic_ns()}"
    ns = NotifySocket(address)
    yield ns
    ns.close()


def _dns_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP (DNS listens on both)."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM, host)
        with socket.socket() as tcp:
            try:
                tcp.bind((host, port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free for both UDP and TCP")


def _inventory(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    raw = loopback_inventory(tmp_path)
    raw["listen"]["dns"] = f"127.0.0.1:{_dns_port()}"
    raw["listen"]["http"] = f"127.0.0.1:{free_port()}"
    return write_inventory(tmp_path / "inv.yaml", raw), raw


def _listeners_answer(raw: dict[str, Any]) -> None:
    """Every listener of the inventory answers a real client right now."""
    with urllib.request.urlopen(f"http://{raw['listen']['admin']}/healthz", timeout=5) as r:
        assert r.status == 200
    host, port = raw["listen"]["http"].split(":")
    with socket.create_connection((host, int(port)), timeout=5):
        pass
    host, port = raw["listen"]["dns"].split(":")
    answer = dns.query.udp(
        dns.message.make_query("api.demo.example.com", "A"), host, port=int(port), timeout=5
    )
    assert [str(r) for rrset in answer.answer for r in rrset] == ["127.0.0.54"]


def _start(config: Path, log_path: Path, env: dict[str, str], own_pid: bool) -> Daemon:
    """The Daemon helper; with own_pid, WATCHDOG_PID is set to the daemon's own pid
    (as systemd does) by a shell that execs the daemon, keeping its pid."""
    if not own_pid:
        return Daemon(config, log_path, env=env)
    d = Daemon.__new__(Daemon)
    d.config, d.log_path = config, log_path
    d.log = log_path.open("w")
    cmd = f'WATCHDOG_PID=$$ exec "{sys.executable}" -m appliance run --config "{config}"'
    d.proc = subprocess.Popen(
        ["/bin/sh", "-c", cmd],
        cwd=ROOT,
        stdout=d.log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    return d


@pytest.mark.parametrize("watchdog_pid", ["unset", "own"])
def test_ready_watchdog_reload_stop(
    notify_socket: NotifySocket, tmp_path: Path, watchdog_pid: str
) -> None:
    config, raw = _inventory(tmp_path)
    env = {"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    d = _start(config, tmp_path / "daemon.log", env, own_pid=watchdog_pid == "own")
    try:
        i, _, ready = notify_socket.wait("READY=1")
        assert i == 0, notify_socket.snapshot()  # nothing before READY
        fields = _fields(ready)
        assert fields["MAINPID"] == str(d.proc.pid)
        status = fields["STATUS"]
        assert status.startswith("serving demo.example.com: 3 nodes, dns, http, cluster, admin")
        _listeners_answer(raw)  # READY came after every listener was bound

        # Pings at about half of WATCHDOG_USEC, from the running loop.
        time.sleep(1.5)
        pings = [t for t, text in notify_socket.snapshot() if text == "WATCHDOG=1"]
        assert len(pings) >= 5, notify_socket.snapshot()
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        half = WATCHDOG_USEC / 2e6
        assert 0.8 * half <= sum(gaps) / len(gaps) <= 1.5 * half, gaps
        assert max(gaps) < 2 * WATCHDOG_USEC / 1e6, gaps  # systemd would never fire

        # SIGHUP: RELOADING=1 with a fresh MONOTONIC_USEC, then READY=1 again.
        mark = len(notify_socket.snapshot())
        before = monotonic_usec()
        d.proc.send_signal(signal.SIGHUP)
        r, _, reloading = notify_socket.wait("RELOADING=1", after=mark)
        stamp = int(_fields(reloading)["MONOTONIC_USEC"])
        assert before <= stamp <= monotonic_usec()
        assert _fields(reloading)["STATUS"] == f"reloading {config}"
        _, _, again = notify_socket.wait("READY=1", after=r + 1)
        assert _fields(again)["STATUS"].startswith("serving demo.example.com")
        d.wait_for("reload: new plan in force (3 nodes): no changes")

        # SIGTERM: STOPPING=1 first, then a clean exit.
        mark = len(notify_socket.snapshot())
        d.proc.send_signal(signal.SIGTERM)
        _, _, stopping = notify_socket.wait("STOPPING=1", after=mark)
        assert _fields(stopping)["STATUS"] == "stopping dns, http, cluster, admin"
        assert d.proc.wait(timeout=15) == 0
    finally:
        d.stop()
    assert "stopped" in d.output()


def test_watchdog_pid_of_another_process_means_no_pings(
    notify_socket: NotifySocket, tmp_path: Path
) -> None:
    """sd_watchdog_enabled(3): WATCHDOG_PID names who pings; here it is not us."""
    config, _ = _inventory(tmp_path)
    env = {
        "NOTIFY_SOCKET": notify_socket.name,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "WATCHDOG_PID": str(os.getpid()),  # the test, not the daemon
    }
    d = Daemon(config, tmp_path / "daemon.log", env=env)
    try:
        notify_socket.wait("READY=1")
        time.sleep(1.0)
        assert not [m for _, m in notify_socket.snapshot() if m == "WATCHDOG=1"]
    finally:
        assert d.stop() == 0
    assert "systemd watchdog" not in d.output()


async def test_blocked_event_loop_stops_the_pings(notify_socket: NotifySocket) -> None:
    """The real watchdog loop and notify() on this event loop: while a callback blocks
    the loop (time.sleep), no WATCHDOG=1 leaves; pings resume when it is free again."""
    env = {"NOTIFY_SOCKET": notify_socket.name}
    interval = 0.05
    task = asyncio.create_task(watchdog_loop(interval, send=lambda m: notify(m, env)))
    await asyncio.sleep(0.5)
    blocked_from = time.monotonic()
    time.sleep(0.8)  # a stuck loop: e.g. a blocking call on the event loop thread
    blocked_to = time.monotonic()
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)  # the reader thread catches up
    pings = [t for t, m in notify_socket.snapshot() if m == "WATCHDOG=1"]
    before = [t for t in pings if t < blocked_from]
    during = [t for t in pings if blocked_from + 0.01 < t < blocked_to - 0.01]
    after = [t for t in pings if t >= blocked_to]
    assert len(before) >= 5 and len(after) >= 5, pings
    assert during == [], (blocked_from, blocked_to, pings)
    assert max(b - a for a, b in itertools.pairwise(pings)) >= 0.75


def test_notify_never_blocks_on_a_full_queue(tmp_path: Path) -> None:
    """A manager that stops reading costs lost messages, never a stalled loop."""
    path = str(tmp_path / "full.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(path)
        env = {"NOTIFY_SOCKET": path}
        t0 = time.monotonic()
        results = [notify("WATCHDOG=1", env) for _ in range(2000)]
        assert time.monotonic() - t0 < 5
        assert results[0] is True and results[-1] is False  # the queue filled up
    assert notify("READY=1", {"NOTIFY_SOCKET": path}) is False  # nobody bound any more
    assert notify("READY=1", {}) is False  # not under systemd


def test_watchdog_interval_from_environment() -> None:
    me = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(me)}) == 0.2
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "7"}, pid=7) == 0.2
    for bad in ("", "0", "-5", "abc", "1e6"):
        assert watchdog_interval({"WATCHDOG_USEC": bad}) is None
    assert watchdog_interval({}) is None
