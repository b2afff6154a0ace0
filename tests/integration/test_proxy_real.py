"""The load balancer (services/proxy) with real backends and real clients on loopback.

`appliance run` serves a loopback inventory whose nodes are 127.0.0.x addresses
(bootstrap .53, masters .50-.52, workers .44/.46/.45); the LB listens on 127.0.0.54.
The backends are real servers on those node addresses (tests/integration/
proxy_backends.py, in a process of its own so the client loops here do not slow
the health checks); all backends of a frontend share one port number, as in a
cluster. api and machine_config backends speak TLS with a self-signed certificate
and answer GET /readyz and /healthz; ingress backends are plain TCP, with the
router's GET /healthz/ready on :1936 where the http ingress check is on.

Checked:
- balancing over HTTPS (api, https /readyz check) and plain TCP (ingress_http, http
  check on :1936); a backend whose /readyz answers 500 leaves the pool although TCP
  connects, and comes back after `rise` good checks;
- a backend killed (listener gone) leaves the pool within fall x interval by the
  active checks alone; killed mid-run (between two of its connections) under a
  client loop of hundreds of connections, no client sees a failure (passive
  mark-down + retry), and after recovery it rejoins after `rise` checks;
- 100 MB up and 100 MB down arrive intact (sha256), with splice() and with the
  recv/send path (APPLIANCE_NO_SPLICE=1); half-close: the client shuts its write
  side, the backend sees EOF, answers, and the client gets the answer;
- 1,000 concurrent connections through one frontend, started with a soft
  RLIMIT_NOFILE of 1024 (the proxy raises its own);
- SIGHUP with a changed inventory (backends added and removed, a listener moved)
  while a client loop runs: no failed connection; long-lived connections through
  the moved listener and to removed backends keep working;
- drain / disable / enable through the admin API; max_connections; idle_timeout;
- accept() out of descriptors (EMFILE): the listener pauses instead of spinning,
  the waiting clients are served once descriptors are free;
- a reload that cannot bind keeps the old listeners; a frontend switched off by a
  reload keeps its connections, still under its idle timeout;
- a connection from master-0's address to the machine_config frontend shows the
  node's machine-config stage in GET /api/v1/nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.proxy.pump import SPLICE_AFTER
from tests.helpers import ROOT, Daemon, free_port, get_json, loopback_inventory, write_inventory
from tests.integration.proxy_backends import blob_chunks, blob_sha256

LB = "127.0.0.54"
ADDR = {
    "bootstrap": "127.0.0.53",
    "master-0": "127.0.0.50",
    "master-1": "127.0.0.51",
    "master-2": "127.0.0.52",
    "worker-0": "127.0.0.44",
    "worker-1": "127.0.0.46",
    "worker-2": "127.0.0.45",
}
ROUTER_HEALTH_PORT = 1936
INTERVAL, RISE, FALL = 0.3, 2, 2  # check settings of the health tests
# Added to every "within N x interval" bound: the machine runs other benchmarks.
SLACK = 4.0
IO_TIMEOUT = 20.0  # one client operation; generous on a loaded machine
BULK = 100 * 1000 * 1000  # bytes each way in the bulk test

CLIENT_TLS = ssl.create_default_context()
CLIENT_TLS.check_hostname = False
CLIENT_TLS.verify_mode = ssl.CERT_NONE


# --- backends, certificate, inventory ------------------------------------------------------


def raise_nofile(want: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        top = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


class Backends:
    """The backend process: start/kill servers, set health answers, read counters."""

    def __init__(self, log_path: Path) -> None:
        raise_nofile()  # the backends hold 1,000 connections in one test
        self.stderr = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.proxy_backends"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the backend process died (exit {self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if not answer["ok"]:
            raise AssertionError(f"backend command {cmd} failed: {answer['error']}")
        return answer

    def start(
        self, name: str, port: int, tls: tuple[str, str] | None = None, health: int | None = None
    ) -> None:
        self.call(op="start", name=name, host=ADDR[name], port=port, tls=tls, health_port=health)

    def kill(self, name: str) -> None:
        self.call(op="kill", name=name)

    def health(self, name: str, code: int) -> None:
        self.call(op="health", name=name, code=code)

    def stats(self) -> dict[str, dict[str, int]]:
        stats: dict[str, dict[str, int]] = self.call(op="stats")["stats"]
        return stats

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(op="exit")
                self.proc.wait(timeout=5)
            except (OSError, AssertionError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()  # by PID (Popen)
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.stderr.close()


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    b = Backends(tmp_path / "backends.log")
    yield b
    b.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate and key (the cluster CA is not ours to verify either)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api-int.demo.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(d / "cert.pem"), str(d / "key.pem")


def node(name: str) -> dict[str, Any]:
    role = "bootstrap" if name == "bootstrap" else name.split("-")[0]
    octet = int(ADDR[name].rsplit(".", 1)[1])
    return {"name": name, "role": role, "mac": f"52:54:00:00:00:{octet:02x}", "ip": ADDR[name]}


def inventory(
    tmp_path: Path,
    nodes: list[str],
    listen: dict[str, int],
    ports: dict[str, int],
    **lb: Any,
) -> dict[str, Any]:
    """Loopback inventory: these nodes, LB frontends on 127.0.0.54:<listen port>."""
    raw = loopback_inventory(tmp_path)
    if not any(n.startswith("master-") for n in nodes):
        nodes = ["master-0", *nodes]  # the inventory needs one; no frontend of it listens
    raw["nodes"] = [node(n) for n in nodes]
    backend_ports = {"api": 6443, "machine_config": 22623, "ingress_http": 80, "ingress_https": 443}
    raw["load_balancer"] = {
        "address": LB,
        "backend_ports": {**backend_ports, **ports},
        "check_interval": INTERVAL,
        "rise": RISE,
        "fall": FALL,
        "ingress_check": "tcp",
        **lb,
    }
    raw["listen"].update({fe: f"{LB}:{port}" for fe, port in listen.items()})
    return raw


def start_daemon(
    daemons: Callable[..., Daemon], tmp_path: Path, raw: dict[str, Any], **kw: Any
) -> tuple[Daemon, str]:
    d: Daemon = daemons(write_inventory(tmp_path / "inventory.yaml", raw), **kw)
    d.wait_for("serving", timeout=30)
    return d, f"http://{raw['listen']['admin']}"


# --- admin API ------------------------------------------------------------------------------


def lb_backends(admin: str, frontend: str) -> list[dict[str, Any]]:
    status, body = get_json(f"{admin}/api/v1/backends")
    assert status == 200, body
    backends: list[dict[str, Any]] = body["frontends"][frontend]["backends"]
    return backends


def lb_backend(admin: str, frontend: str, name: str) -> dict[str, Any]:
    for b in lb_backends(admin, frontend):
        if b["name"] == name and not b["removed"]:
            return b
    raise AssertionError(f"no backend {name} in {frontend}")


def wait_until(what: str, pred: Callable[[], Any], timeout: float, every: float = 0.05) -> float:
    """Seconds until pred() is true; AssertionError after `timeout`."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(every)
    return time.monotonic() - start


def wait_health(admin: str, frontend: str, names: list[str], health: str, timeout: float) -> float:
    return wait_until(
        f"{frontend} {names} {health}",
        lambda: all(lb_backend(admin, frontend, n)["health"] == health for n in names),
        timeout,
    )


def admin_post(admin: str, token: str | None, frontend: str, name: str, action: str) -> Any:
    return get_json(
        f"{admin}/api/v1/frontends/{frontend}/backends/{name}/{action}", token, method="POST"
    )


# --- clients --------------------------------------------------------------------------------


def connect(port: int, tls: bool = False, source: str | None = None) -> socket.socket:
    sock = socket.create_connection(
        (LB, port), timeout=IO_TIMEOUT, source_address=(source, 0) if source else None
    )
    return CLIENT_TLS.wrap_socket(sock) if tls else sock


def read_line(sock: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            break
        line += data
    return bytes(line)


def who(port: int, tls: bool = False, source: str | None = None) -> str:
    """The name of the backend a new connection reaches."""
    with connect(port, tls, source) as sock:
        sock.sendall(b"WHO\n")
        line = read_line(sock)
    if not line.endswith(b"\n"):
        raise ConnectionError(f"no answer through the proxy: {line!r}")
    return line.decode().strip()


def spread(port: int, count: int, tls: bool = False) -> Counter[str]:
    return Counter(who(port, tls) for _ in range(count))


class Echo:
    """A long-lived connection: ECHO, then lines echoed back."""

    def __init__(self, port: int, tls: bool = False) -> None:
        self.sock = connect(port, tls)
        self.sock.sendall(b"ECHO\n")
        self.backend = read_line(self.sock).decode().strip()
        assert self.backend, "no answer to ECHO"

    def echo(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\n")
        return read_line(self.sock).decode().strip()

    def close(self) -> None:
        self.sock.close()


def echo_on(port: int, backend: str, tls: bool = False, tries: int = 8) -> Echo:
    """A long-lived connection that landed on `backend` (round-robin: a few tries)."""
    others = []
    try:
        for _ in range(tries):
            conn = Echo(port, tls)
            if conn.backend == backend:
                return conn
            others.append(conn)
        raise AssertionError(f"no connection reached {backend}")
    finally:
        for conn in others:
            conn.close()


class ClientLoop(threading.Thread):
    """Sequential short connections (WHO), bounded in count and time.

    `between()` lets a test act between two connections: a backend killed while a
    connection to it is established, or still in its accept backlog, loses that
    connection, and no TCP proxy can replay it once the client's bytes went through.
    """

    def __init__(self, port: int, count: int, limit: float, tls: bool = False) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.limit, self.tls = port, count, limit, tls
        self.results: list[tuple[float, str]] = []  # (start time, backend)
        self.failures: list[str] = []
        self.halt = threading.Event()
        self.cond = threading.Condition()
        self.hold = self.parked = False

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        try:
            for i in range(self.count):
                with self.cond:
                    if self.hold:
                        self.parked = True
                        self.cond.notify_all()
                        self.cond.wait_for(lambda: not self.hold, timeout=self.limit)
                        self.parked = False
                if self.halt.is_set() or time.monotonic() > deadline:
                    break
                started = time.monotonic()
                try:
                    self.results.append((started, who(self.port, self.tls)))
                except (OSError, ConnectionError) as exc:
                    self.failures.append(f"connection {i}: {exc!r}")
        finally:
            with self.cond:
                self.cond.notify_all()

    @contextlib.contextmanager
    def between(self) -> Iterator[None]:
        """No connection of the loop is open inside this block."""
        with self.cond:
            self.hold = True
            self.cond.wait_for(lambda: self.parked or not self.is_alive(), timeout=IO_TIMEOUT)
            assert self.parked or not self.is_alive(), "the client loop did not pause"
        try:
            yield
        finally:
            with self.cond:
                self.hold = False
                self.cond.notify_all()

    def after(self, t: float) -> list[str]:
        return [name for started, name in list(self.results) if started > t]

    def wait_after(self, t: float, n: int, timeout: float = 30.0) -> None:
        wait_until(
            f"{n} client connections after t={t:.2f}",
            lambda: len(self.after(t)) >= n or not self.is_alive(),
            timeout,
        )
        assert len(self.after(t)) >= n, f"the client loop ended early: {self.failures[:3]}"

    def finish(self) -> None:
        self.halt.set()
        self.join(timeout=IO_TIMEOUT + 5)
        assert not self.is_alive()


# --- tests ----------------------------------------------------------------------------------


CONTROL = ["bootstrap", "master-0", "master-1", "master-2"]
WORKERS = ["worker-0", "worker-1"]


def test_balancing_and_http_checks(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path, tls: tuple[str, str]
) -> None:
    api_port, http_port = free_port(), free_port()
    lb_api, lb_http = free_port(host=LB), free_port(host=LB)
    for name in CONTROL:
        backends.start(name, api_port, tls=tls)
    for name in WORKERS:
        backends.start(name, http_port, health=ROUTER_HEALTH_PORT)
    raw = inventory(
        tmp_path,
        CONTROL + WORKERS,
        listen={"api": lb_api, "ingress_http": lb_http},
        ports={"api": api_port, "ingress_http": http_port},
        ingress_check="http",
    )
    _, admin = start_daemon(daemons, tmp_path, raw)
    wait_health(admin, "api", CONTROL, "up", timeout=10)
    wait_health(admin, "ingress_http", WORKERS, "up", timeout=10)
    check = lb_backend(admin, "api", "master-0")["checks"][-1]
    assert f"https :{api_port} GET /readyz -> 200" in check["detail"]
    check = lb_backend(admin, "ingress_http", "worker-0")["checks"][-1]
    assert f"http :{ROUTER_HEALTH_PORT} GET /healthz/ready -> 200" in check["detail"]

    # Round-robin over TLS (the client's TLS goes through untouched); ingress balances by
    # source by default (OpenShift's documented balancer): one client, one router.
    api_spread = spread(lb_api, 80, tls=True)
    assert set(api_spread) == set(CONTROL) and min(api_spread.values()) >= 10, api_spread
    http_spread = spread(lb_http, 40)
    assert len(http_spread) == 1 and set(http_spread) <= set(WORKERS), http_spread

    # /readyz answers 500: down after `fall` checks although TCP still connects.
    backends.health("master-2", 500)
    took = wait_health(admin, "api", ["master-2"], "down", timeout=FALL * INTERVAL + SLACK)
    stats = lb_backend(admin, "api", "master-2")
    assert [c["ok"] for c in stats["checks"][-FALL:]] == [False] * FALL
    assert "GET /readyz -> 500" in stats["checks"][-1]["detail"]
    assert stats["failures"] == 0  # no connect failed: the HTTP answer decided
    socket.create_connection((ADDR["master-2"], api_port), timeout=IO_TIMEOUT).close()
    assert "master-2" not in spread(lb_api, 30, tls=True)
    backends.health("master-2", 200)
    wait_health(admin, "api", ["master-2"], "up", timeout=RISE * INTERVAL + SLACK)
    checks = lb_backend(admin, "api", "master-2")["checks"]
    assert [c["ok"] for c in checks[-RISE:]] == [True] * RISE
    assert "master-2" in spread(lb_api, 20, tls=True)

    # The router's health endpoint (:1936) decides for ingress, not the traffic port.
    backends.health("worker-1", 503)
    wait_health(admin, "ingress_http", ["worker-1"], "down", timeout=FALL * INTERVAL + SLACK)
    assert spread(lb_http, 20) == {"worker-0": 20}
    print(f"\n/readyz 500 -> down after {took:.2f} s (fall {FALL} x interval {INTERVAL} s)")


def test_killed_backend_leaves_and_rejoins(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path, tls: tuple[str, str]
) -> None:
    control = ["bootstrap", "master-0", "master-1"]
    api_port, lb_api = free_port(), free_port(host=LB)
    for name in control:
        backends.start(name, api_port, tls=tls)
    raw = inventory(tmp_path, control, listen={"api": lb_api}, ports={"api": api_port})
    _, admin = start_daemon(daemons, tmp_path, raw)
    wait_health(admin, "api", control, "up", timeout=10)

    # No traffic: the active checks alone take a dead backend out within fall x interval.
    backends.kill("bootstrap")
    took_idle = wait_health(admin, "api", ["bootstrap"], "down", timeout=FALL * INTERVAL + SLACK)
    assert lb_backend(admin, "api", "bootstrap")["failures"] == 0  # no client met it

    # Under a client loop: killed mid-run, nobody notices; back after `rise` checks.
    loop = ClientLoop(lb_api, count=3000, limit=60.0, tls=True)
    loop.start()
    try:
        loop.wait_after(0.0, 60)
        with loop.between():
            t_kill = time.monotonic()
            backends.kill("master-1")
        took_down = wait_health(admin, "api", ["master-1"], "down", timeout=FALL * INTERVAL + SLACK)
        t_down = time.monotonic()
        loop.wait_after(t_down, 60)
        t_revive = time.monotonic()
        backends.start("master-1", api_port, tls=tls)
        took_up = wait_health(admin, "api", ["master-1"], "up", timeout=RISE * INTERVAL + SLACK)
        t_up = time.monotonic()
        checks = lb_backend(admin, "api", "master-1")["checks"]
        assert [c["ok"] for c in checks[-RISE:]] == [True] * RISE
        loop.wait_after(t_up, 60)
    finally:
        loop.finish()
    assert loop.failures == [], loop.failures[:5]
    before = [n for t, n in loop.results if t < t_kill]
    assert "master-1" in before
    gone = [n for t, n in loop.results if t_down < t < t_revive]
    assert gone and "master-1" not in gone
    assert "master-1" in loop.after(t_up)
    assert "bootstrap" not in loop.after(0.0)
    retries = get_json(f"{admin}/api/v1/backends")[1]["frontends"]["api"]["counters"]["retries"]
    print(
        f"\nkilled, idle: down after {took_idle:.2f} s; under load: down after "
        f"{took_down:.2f} s, back {took_up:.2f} s after restart; "
        f"{len(loop.results)} TLS connections, 0 failed, {retries} retried"
    )


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "recv-send"])
def test_bulk_sha256_and_half_close(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path, splice: bool
) -> None:
    port, lb_port = free_port(), free_port(host=LB)
    for name in WORKERS:
        backends.start(name, port)
    raw = inventory(
        tmp_path,
        WORKERS,
        listen={"ingress_https": lb_port},
        ports={"ingress_https": port},
        check_interval=1.0,
    )
    env = {} if splice else {"APPLIANCE_NO_SPLICE": "1"}
    d, admin = start_daemon(daemons, tmp_path, raw, env=env)
    assert get_json(f"{admin}/api/v1/backends")[1]["splice"] is splice

    # Short exchanges go through a buffer; past SPLICE_AFTER bytes each way a connection
    # on the splice path holds two pipes (four descriptors), on recv/send none.
    def pipes() -> int:
        count = 0
        for fd in Path(f"/proc/{d.proc.pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # a check's socket closed meanwhile
                count += os.readlink(fd).startswith("pipe:")
        return count

    base = pipes()
    held = Echo(lb_port)
    assert pipes() - base == 0
    line = "x" * 65_000
    for _ in range(2 * SPLICE_AFTER // len(line) + 1):
        assert held.echo(line) == line
    assert pipes() - base == (4 if splice else 0)
    held.close()

    # Half-close: the backend answers only after it has seen the client's EOF.
    with connect(lb_port) as sock:
        sock.sendall(b"SINK\nhello")
        sock.shutdown(socket.SHUT_WR)
        assert read_line(sock) == _sink_answer(b"hello")
        assert sock.recv(1) == b""  # then the backend's EOF arrives too

    # 100 MB up: the client half-closes, the backend hashes to EOF and answers.
    start = time.monotonic()
    with connect(lb_port) as sock:
        sock.sendall(b"SINK\n")
        for chunk in blob_chunks(BULK):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = read_line(sock)
    up = time.monotonic() - start
    assert answer == f"{blob_sha256(BULK)} {BULK}\n".encode()

    # 100 MB down.
    start = time.monotonic()
    got = 0
    digest = hashlib.sha256()
    with connect(lb_port) as sock:
        sock.sendall(f"BLOB {BULK}\n".encode())
        while data := sock.recv(1 << 20):
            digest.update(data)
            got += len(data)
    down = time.monotonic() - start
    assert got == BULK and digest.hexdigest() == blob_sha256(BULK)

    pool = lb_backends(admin, "ingress_https")
    assert sum(b["bytes_in"] for b in pool) >= BULK
    assert sum(b["bytes_out"] for b in pool) >= BULK
    print(
        f"\n{'splice' if splice else 'recv/send'}: 100 MB up {BULK / up / 1e6:.0f} MB/s, "
        f"down {BULK / down / 1e6:.0f} MB/s"
    )


def _sink_answer(data: bytes) -> bytes:
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode()


def test_thousand_concurrent_connections(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path
) -> None:
    n = 1000
    sources = 8
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * n:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} is too low for {n} connections")
    raise_nofile()
    port, lb_port = free_port(), free_port(host=LB)
    for name in WORKERS:
        backends.start(name, port)
    raw = inventory(
        tmp_path, WORKERS, listen={"ingress_http": lb_port}, ports={"ingress_http": port}
    )
    raw["load_balancer"]["check_interval"] = 1.0
    # The daemon starts with the common soft limit of 1024 and must raise it itself:
    # 1,000 spliced connections need about 6,000 descriptors.
    now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, now_hard))
    try:
        d, admin = start_daemon(daemons, tmp_path, raw)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (now_soft, now_hard))
    assert "open files limit raised from 1024" in d.output()
    wait_health(admin, "ingress_http", WORKERS, "up", timeout=10)

    async def run() -> tuple[list[str], int, int, Counter[str]]:
        gate = asyncio.Semaphore(200)  # open in waves: listen backlogs are finite

        async def open_one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
            # From several client addresses: one address may hold a share of the cap only.
            source = (f"127.0.0.{1 + i % sources}", 0)
            async with gate:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(LB, lb_port, local_addr=source), IO_TIMEOUT
                )
                w.write(b"ECHO\n")
                name = await asyncio.wait_for(r.readline(), IO_TIMEOUT)
                if not name.endswith(b"\n"):
                    w.close()
                    raise ConnectionError(f"no answer: {name!r}")
                return r, w, name.decode().strip()

        opened = await asyncio.gather(*(open_one(i) for i in range(n)), return_exceptions=True)
        conns = [c for c in opened if not isinstance(c, BaseException)]
        failures = [repr(c) for c in opened if isinstance(c, BaseException)]
        # All of them open at the same time, here and in the proxy.
        status = await asyncio.to_thread(get_json, f"{admin}/api/v1/backends")
        active = status[1]["frontends"]["ingress_http"]["active"]
        held = sum(s.get("open", 0) for s in (await asyncio.to_thread(backends.stats)).values())

        async def echo(i: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(f"token-{i}\n".encode())
            line = await asyncio.wait_for(r.readline(), IO_TIMEOUT)
            if line != f"token-{i}\n".encode():
                raise ConnectionError(f"connection {i} echoed {line!r}")

        echoed = await asyncio.gather(
            *(echo(i, r, w) for i, (r, w, _) in enumerate(conns)), return_exceptions=True
        )
        failures += [repr(e) for e in echoed if isinstance(e, BaseException)]
        for _, w, _ in conns:
            w.close()
        for _, w, _ in conns:
            try:
                await w.wait_closed()
            except OSError as exc:
                failures.append(repr(exc))
        return failures, active, held, Counter(name for _, _, name in conns)

    start = time.monotonic()
    failures, active, held, names = asyncio.run(run())
    took = time.monotonic() - start
    assert failures == [], failures[:5]
    assert active == n, f"the proxy held {active} connections at the peak"
    assert held >= n, f"the backends held {held} connections at the peak"
    assert set(names) == set(WORKERS) and min(names.values()) >= n // 4, names
    counters = get_json(f"{admin}/api/v1/backends")[1]["frontends"]["ingress_http"]["counters"]
    assert counters.get("accept_errors", 0) == 0 and counters.get("over_limit", 0) == 0
    wait_until(
        "all connections closed in the proxy",
        lambda: get_json(f"{admin}/api/v1/backends")[1]["frontends"]["ingress_http"]["active"] == 0,
        timeout=10,
    )
    print(f"\n{n} concurrent connections: opened, echoed and closed in {took:.2f} s")


def test_reload_under_load_drops_nothing(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path, tls: tuple[str, str]
) -> None:
    api_port, http_port = free_port(), free_port()
    lb_api, lb_api_moved, lb_http = free_port(host=LB), free_port(host=LB), free_port(host=LB)
    for name in ("bootstrap", "master-0"):
        backends.start(name, api_port, tls=tls)
    for name in ("worker-0", "worker-1", "worker-2"):
        backends.start(name, http_port)
    ports = {"api": api_port, "ingress_http": http_port}
    raw = inventory(
        tmp_path,
        ["bootstrap", "master-0", "worker-0", "worker-1"],
        listen={"api": lb_api, "ingress_http": lb_http},
        ports=ports,
        balance="roundrobin",  # both workers see traffic (ingress defaults to source)
    )
    d, admin = start_daemon(daemons, tmp_path, raw)
    wait_health(admin, "api", ["bootstrap", "master-0"], "up", timeout=10)
    wait_health(admin, "ingress_http", ["worker-0", "worker-1"], "up", timeout=10)

    # Long-lived connections: to a backend that the reload removes, and through the
    # api listener that the reload moves.
    to_removed = echo_on(lb_http, "worker-1")
    through_moved = echo_on(lb_api, "bootstrap", tls=True)
    assert to_removed.echo("before") == "before" and through_moved.echo("before") == "before"

    # New plan: bootstrap and worker-1 leave, worker-2 joins, api moves to another port.
    raw["nodes"] = [node(n) for n in ("master-0", "worker-0", "worker-2")]
    raw["listen"]["api"] = f"{LB}:{lb_api_moved}"
    loop = ClientLoop(lb_http, count=4000, limit=60.0)
    loop.start()
    try:
        loop.wait_after(0.0, 100)
        total_before = lb_backend(admin, "ingress_http", "worker-0")["total"]
        write_inventory(tmp_path / "inventory.yaml", raw)
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_for("reload: new plan in force", timeout=20)
        t_reload = time.monotonic()
        loop.wait_after(t_reload, 150)
    finally:
        loop.finish()

    assert loop.failures == [], loop.failures[:5]
    assert "worker-1" in [n for t, n in loop.results if t < t_reload]
    after = loop.after(t_reload)
    assert "worker-1" not in after and set(after) == {"worker-0", "worker-2"}, Counter(after)
    assert "reload refused" not in d.output()
    # worker-0 stays in both plans: its state (here its counters) is kept.
    assert lb_backend(admin, "ingress_http", "worker-0")["total"] > total_before

    # Both long-lived connections survived and still work.
    assert to_removed.echo("after") == "after"
    assert through_moved.echo("after") == "after"
    removed = [b for b in lb_backends(admin, "ingress_http") if b["name"] == "worker-1"]
    assert len(removed) == 1 and removed[0]["removed"] and removed[0]["active"] == 1
    # The listener moved: the old port is closed, the new one balances over master-0 only.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LB, lb_api), timeout=IO_TIMEOUT).close()
    assert spread(lb_api_moved, 6, tls=True) == {"master-0": 6}
    assert get_json(f"{admin}/api/v1/status")[1]["reloads"]["ok"] == 1

    # Once its last connection ends, the removed backend is forgotten.
    to_removed.close()
    through_moved.close()
    wait_until(
        "worker-1 forgotten",
        lambda: all(b["name"] != "worker-1" for b in lb_backends(admin, "ingress_http")),
        timeout=10,
    )
    print(f"\nreload under load: {len(loop.results)} connections, 0 failed")


def test_drain_disable_enable(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path
) -> None:
    port, lb_port = free_port(), free_port(host=LB)
    for name in WORKERS:
        backends.start(name, port)
    raw = inventory(
        tmp_path,
        WORKERS,
        listen={"ingress_http": lb_port},
        ports={"ingress_http": port},
        balance="roundrobin",  # both workers see traffic (ingress defaults to source)
    )
    _, admin = start_daemon(daemons, tmp_path, raw)
    token = (Path(raw["state_dir"]) / "admin.token").read_text().strip()
    wait_health(admin, "ingress_http", WORKERS, "up", timeout=10)

    held = Echo(lb_port)
    target = held.backend
    other = next(w for w in WORKERS if w != target)

    assert admin_post(admin, None, "ingress_http", target, "drain")[0] == 401
    assert admin_post(admin, token, "ingress_http", "nobody", "drain")[0] == 404
    assert admin_post(admin, token, "nowhere", target, "drain")[0] == 404
    assert admin_post(admin, token, "ingress_http", target, "explode")[0] == 404

    # drain: no new connections, the existing one goes on.
    status, body = admin_post(admin, token, "ingress_http", target, "drain")
    assert status == 200 and body["backend"]["admin"] == "drain"
    assert spread(lb_port, 20) == {other: 20}
    assert held.echo("still here") == "still here"
    stats = lb_backend(admin, "ingress_http", target)
    assert stats["admin"] == "drain" and stats["active"] == 1

    # disable: its connections are closed too.
    status, body = admin_post(admin, token, "ingress_http", target, "disable")
    assert status == 200 and body["backend"]["admin"] == "disabled"
    held.sock.settimeout(IO_TIMEOUT)
    try:
        held.sock.sendall(b"anyone?\n")
        closed = held.sock.recv(64) == b""
    except ConnectionError:
        closed = True
    assert closed, "a disabled backend's connection stayed open"
    held.close()
    assert lb_backend(admin, "ingress_http", target)["active"] == 0
    assert spread(lb_port, 10) == {other: 10}

    # enable: back in rotation.
    status, body = admin_post(admin, token, "ingress_http", target, "enable")
    assert status == 200 and body["backend"]["admin"] == "enabled"
    back = spread(lb_port, 20)
    assert set(back) == set(WORKERS), back


def test_max_connections_and_idle_timeout(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path
) -> None:
    port, lb_port, lb_idle = free_port(), free_port(host=LB), free_port(host=LB)
    backends.start("worker-0", port)
    raw = inventory(
        tmp_path,
        ["worker-0"],
        listen={"ingress_http": lb_port, "ingress_https": lb_idle},
        ports={"ingress_http": port, "ingress_https": port},
        max_connections=3,
        idle_timeout={"ingress_https": 1.0},
    )
    _, admin = start_daemon(daemons, tmp_path, raw)

    # idle_timeout: a connection without a byte either way for 1 s is closed.
    idle = Echo(lb_idle)
    start = time.monotonic()
    idle.sock.settimeout(IO_TIMEOUT)
    with contextlib.suppress(ConnectionError):  # an EOF, or a reset: closed either way
        assert idle.sock.recv(64) == b""
    took = time.monotonic() - start
    idle.close()
    assert 0.5 <= took < IO_TIMEOUT
    counters = get_json(f"{admin}/api/v1/backends")[1]["frontends"]["ingress_https"]["counters"]
    assert counters["idle_closed"] == 1

    # max_connections: the fourth connection is closed at once; the three go on.
    held = [Echo(lb_port) for _ in range(3)]
    try:
        with connect(lb_port) as extra:
            extra.sendall(b"WHO\n")
            try:
                answer = extra.recv(64)
            except ConnectionError:
                answer = b""
        assert answer == b"", "a connection over max_connections was served"
        counters = get_json(f"{admin}/api/v1/backends")[1]["frontends"]["ingress_http"]["counters"]
        assert counters["over_limit"] == 1
        assert all(h.echo("ok") == "ok" for h in held)
    finally:
        for h in held:
            h.close()
    wait_until(
        "the held connections closed",
        lambda: get_json(f"{admin}/api/v1/backends")[1]["frontends"]["ingress_http"]["active"] == 0,
        timeout=10,
    )
    assert who(lb_port) == "worker-0"


def test_out_of_descriptors_pauses_accept(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path
) -> None:
    """accept() failing with EMFILE neither spins nor floods the log; the clients that
    waited in the backlog are served once descriptors are free again."""
    port, lb_port = free_port(), free_port(host=LB)
    backends.start("worker-0", port)
    raw = inventory(
        tmp_path,
        ["worker-0"],
        listen={"ingress_http": lb_port},
        ports={"ingress_http": port},
        check_interval=60.0,  # no check opens a socket while the test counts descriptors
    )
    d, admin = start_daemon(daemons, tmp_path, raw)
    wait_health(admin, "ingress_http", ["worker-0"], "up", timeout=10)
    pid = d.proc.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)

    def fds() -> set[int]:
        return {int(fd.name) for fd in Path(f"/proc/{pid}/fd").iterdir()}

    # Settle: the admin API's connection of the last request closes a moment later.
    used = fds()
    for _ in range(50):
        time.sleep(0.2)
        if (now := fds()) == used:
            break
        used = now
    lowest_free = min(set(range(len(used) + 1)) - used)
    waiting: list[socket.socket] = []
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, limits[1]))
    try:
        for _ in range(3):  # the kernel completes these; the proxy cannot accept them
            sock = socket.create_connection((LB, lb_port), timeout=IO_TIMEOUT)
            sock.sendall(b"WHO\n")
            waiting.append(sock)
        time.sleep(1.5)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    try:
        assert [read_line(s) for s in waiting] == [b"worker-0\n"] * 3
    finally:
        for sock in waiting:
            sock.close()
    counters = get_json(f"{admin}/api/v1/backends")[1]["frontends"]["ingress_http"]["counters"]
    assert 1 <= counters["accept_errors"] < 100, counters  # ~10 per second, not a spin
    assert d.output().count("accept failed") == 1
    assert who(lb_port) == "worker-0"


def test_refused_reload_and_a_frontend_switched_off(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path
) -> None:
    """A reload that cannot bind (a port some other program holds) changes nothing; a
    frontend switched off stops listening, its connections go on under its idle timeout."""
    port, lb_port, lb_other, lb_off = (free_port(), *(free_port(host=LB) for _ in range(3)))
    backends.start("worker-0", port)
    raw = inventory(
        tmp_path,
        ["worker-0"],
        listen={"ingress_http": lb_port, "ingress_https": lb_off},
        ports={"ingress_http": port, "ingress_https": port},
        idle_timeout={"ingress_https": 3.0},
    )
    d, admin = start_daemon(daemons, tmp_path, raw)
    held = Echo(lb_port)
    with socket.socket() as squatter:  # "some other program" on the new address
        squatter.bind((LB, lb_other))
        squatter.listen(1)
        raw["listen"]["ingress_http"] = f"{LB}:{lb_other}"
        write_inventory(tmp_path / "inventory.yaml", raw)
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_for("reload refused", timeout=20)
        assert who(lb_port) == "worker-0"  # the old listener still accepts
        assert held.echo("still") == "still"
    held.close()
    status = get_json(f"{admin}/api/v1/status")[1]
    assert status["reloads"]["failed"] == 1 and status["reloads"].get("ok", 0) == 0
    assert lb_backend(admin, "ingress_http", "worker-0")["health"] == "up"

    # ingress_https switched off: no listener, the connection through it goes on...
    off = Echo(lb_off)
    raw["listen"]["ingress_http"] = f"{LB}:{lb_port}"
    raw["listen"]["ingress_https"] = None
    write_inventory(tmp_path / "inventory.yaml", raw)
    assert off.echo("before") == "before"
    os.kill(d.proc.pid, signal.SIGHUP)
    d.wait_for("reload: new plan in force", timeout=20)
    assert off.echo("after") == "after"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LB, lb_off), timeout=IO_TIMEOUT).close()
    assert "ingress_https" not in get_json(f"{admin}/api/v1/backends")[1]["frontends"]
    # ...and its idle timeout still ends it.
    off.sock.settimeout(IO_TIMEOUT)
    with contextlib.suppress(ConnectionError):
        assert off.sock.recv(64) == b""
    off.close()
    assert who(lb_port) == "worker-0"


def test_machine_config_event(
    daemons: Callable[..., Daemon], backends: Backends, tmp_path: Path, tls: tuple[str, str]
) -> None:
    mc_port, lb_mc = free_port(), free_port(host=LB)
    for name in ("bootstrap", "master-0"):
        backends.start(name, mc_port, tls=tls)
    raw = inventory(
        tmp_path,
        ["bootstrap", "master-0"],
        listen={"machine_config": lb_mc},
        ports={"machine_config": mc_port},
    )
    _, admin = start_daemon(daemons, tmp_path, raw)
    wait_health(admin, "machine_config", ["bootstrap", "master-0"], "up", timeout=10)
    check = lb_backend(admin, "machine_config", "master-0")["checks"][-1]
    assert f"https :{mc_port} GET /healthz -> 200" in check["detail"]

    assert who(lb_mc, tls=True) in ("bootstrap", "master-0")  # from 127.0.0.1: nobody's
    assert who(lb_mc, tls=True, source=ADDR["master-0"]) in ("bootstrap", "master-0")

    def stages() -> dict[str, dict[str, Any]]:
        nodes = get_json(f"{admin}/api/v1/nodes")[1]["nodes"]
        return {n["name"]: n["stages"] for n in nodes}

    wait_until("master-0 machine-config", lambda: "machine-config" in stages()["master-0"], 10)
    seen = stages()
    assert ADDR["master-0"] in seen["master-0"]["machine-config"]["detail"]
    assert "machine-config" not in seen["bootstrap"]
