"""The load balancer against hostile clients and operators' mistakes (issue 14).

- Descriptors: a daemon started with RLIMIT_NOFILE 1024 (soft and hard, as
  LimitNOFILE=1024 would). One client holds as many idle connections as it can get;
  another client is still served. Then many clients fill the frontend to its cap:
  the other frontend, the admin endpoint, DNS over TCP, the HTTP service and the
  health checks all keep working, and the connections already open keep echoing.
- Self-connections: a backend that is one of the proxy's own listening endpoints (a
  node address equal to a frontend's, or any local address under a wildcard
  listener, on the frontend's port) is refused: never chosen, never probed (a probe
  would be accepted by the proxy itself and call the backend healthy).
"""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from tests.helpers import Daemon, free_port, get_json, write_inventory
from tests.integration.test_proxy_real import (
    LB,
    Backends,
    inventory,
    lb_backend,
    raise_nofile,
    read_line,
    wait_health,
    wait_until,
    who,
)

NOFILE = 1024
STEP_TIMEOUT = 3.0  # one client operation; a stuck one means the daemon is out of descriptors


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    b = Backends(tmp_path / "backends.log")
    yield b
    b.close()


@contextlib.contextmanager
def daemon(tmp_path: Path, raw: dict[str, Any], nofile: int | None = None) -> Iterator[Daemon]:
    d = Daemon(
        write_inventory(tmp_path / "inventory.yaml", raw),
        tmp_path / "daemon.log",
        env={"PYTHONUNBUFFERED": "1"},
        nofile=nofile,
    )
    try:
        d.wait_for("serving", timeout=30)
        yield d
    finally:
        d.stop()


def echo_open(port: int, source: str) -> socket.socket | None:
    """An idle proxied connection from `source` (ECHO answered), or None when refused."""
    sock = socket.create_connection((LB, port), timeout=STEP_TIMEOUT, source_address=(source, 0))
    try:
        sock.sendall(b"ECHO\n")
        line = read_line(sock)
    except ConnectionError:
        line = b""
    except TimeoutError:
        sock.close()
        raise AssertionError(f"a connection from {source} was neither served nor refused") from None
    if not line:
        sock.close()
        return None
    return sock


def fill(port: int, source: str, limit: int, held: list[socket.socket]) -> int:
    """Open connections from `source` until one is refused (or `limit`); how many held."""
    n = 0
    while n < limit:
        sock = echo_open(port, source)
        if sock is None:
            break
        held.append(sock)
        n += 1
    return n


def who_at(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=STEP_TIMEOUT) as sock:
        sock.sendall(b"WHO\n")
        return read_line(sock).decode().strip()


def counters(admin: str, frontend: str) -> dict[str, int]:
    body = get_json(f"{admin}/api/v1/backends")[1]
    c: dict[str, int] = body["frontends"][frontend]["counters"]
    return c


CLIENT = "client_limit"


def metric(admin: str, name: str, **labels: str) -> float:
    """One sample of GET /metrics."""
    with urllib.request.urlopen(f"{admin}/metrics", timeout=STEP_TIMEOUT) as resp:
        text = resp.read().decode()
    want = "appliance_" + name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {want} in /metrics")


def others_work(admin: str, dns_port: int, http_port: int, https_lb: int) -> None:
    """The admin endpoint, DNS over TCP, the HTTP service and the other frontend answer."""
    status, body = get_json(f"{admin}/api/v1/status")
    assert status == 200, body
    query = dns.message.make_query("api.demo.example.com", "A")
    answer = dns.query.tcp(query, "127.0.0.1", port=dns_port, timeout=STEP_TIMEOUT)
    assert [str(r) for rr in answer.answer for r in rr] == [LB]
    url = f"http://127.0.0.1:{http_port}/images/hello.txt"
    with urllib.request.urlopen(url, timeout=STEP_TIMEOUT) as resp:
        assert resp.read() == b"hello\n"
    assert who(https_lb, source="127.0.0.77") == "worker-0"


def checks_after(admin: str, frontend: str, t: float) -> None:
    """A health check of worker-0 finished after wall time `t`, and it passed."""

    def fresh() -> bool:
        checks = lb_backend(admin, frontend, "worker-0")["checks"]
        return any(c["time"] > t for c in checks)

    wait_until(f"a health check of {frontend} after the cap was hit", fresh, timeout=10)
    backend = lb_backend(admin, frontend, "worker-0")
    last = backend["checks"][-1]
    assert last["ok"] and backend["health"] == "up", backend


def test_descriptor_caps_keep_everything_else_alive(backends: Backends, tmp_path: Path) -> None:
    raise_nofile()  # this process holds the client ends
    port, lb_http, lb_https = free_port(), free_port(host=LB), free_port(host=LB)
    dns_port, http_port = free_port(), free_port()
    backends.start("worker-0", port)
    raw = inventory(
        tmp_path,
        ["worker-0"],
        listen={"ingress_http": lb_http, "ingress_https": lb_https},
        ports={"ingress_http": port, "ingress_https": port},
    )
    raw["listen"]["dns"] = f"127.0.0.1:{dns_port}"
    raw["listen"]["http"] = f"127.0.0.1:{http_port}"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "hello.txt").write_text("hello\n")
    (tmp_path / "tftp").mkdir()
    held: list[socket.socket] = []
    with daemon(tmp_path, raw, nofile=NOFILE) as d:
        admin = f"http://{raw['listen']['admin']}"
        wait_health(admin, "ingress_http", ["worker-0"], "up", timeout=10)
        try:
            # One client takes what it can: it is capped, another client is served.
            start = time.monotonic()
            first = fill(lb_http, "127.0.0.1", 2 * NOFILE, held)
            assert first < NOFILE // 8, f"one client holds {first} connections"
            assert who(lb_http, source="127.0.0.2") == "worker-0"
            others_work(admin, dns_port, http_port, lb_https)
            assert counters(admin, "ingress_http").get("client_limit", 0) >= 1

            # Many clients fill the frontend to its cap.
            for i in range(3, 3 + 40):
                if fill(lb_http, f"127.0.0.{i}", 2 * NOFILE, held) == 0:
                    break
                assert time.monotonic() - start < 60, "filling took too long"
            else:
                raise AssertionError("the frontend took every client: no cap")
            at_cap = time.time()
            c = counters(admin, "ingress_http")
            assert c.get("over_limit", 0) + c.get("descriptors", 0) >= 1, c
            assert echo_open(lb_http, "127.0.0.99") is None, "a connection over the cap"
            others_work(admin, dns_port, http_port, lb_https)
            checks_after(admin, "ingress_http", at_cap)
            checks_after(admin, "ingress_https", at_cap)
            # The established connections are unharmed.
            for sock in held[:: max(1, len(held) // 20)]:
                sock.sendall(b"still here\n")
                assert read_line(sock) == b"still here\n"
            status = get_json(f"{admin}/api/v1/backends")[1]
            assert status["frontends"]["ingress_http"]["active"] == len(held)
            fds = status["descriptors"]
            assert fds["limit"] == NOFILE and fds["in_use"] <= fds["budget"], fds
            assert metric(admin, "lb_refused_total", frontend="ingress_http", reason=CLIENT) >= 1
            assert metric(admin, "lb_descriptors", kind="in_use") == fds["in_use"]
            print(
                f"\nRLIMIT_NOFILE {NOFILE}: one client held {first}, all clients {len(held)};"
                f" descriptors {fds}"
            )
        finally:
            for sock in held:
                sock.close()
        assert d.output().count("descriptors: limit") == 1, d.output()


def test_backend_that_is_our_own_frontend_is_refused(backends: Backends, tmp_path: Path) -> None:
    """worker-0's address and port are a frontend's own listener (127.0.0.44:P), and
    under the wildcard listener of ingress_https every local address is ours."""
    port = free_port(host="127.0.0.44")
    wild = free_port()  # ingress_https: 0.0.0.0:<wild>, its backends on <wild> too
    backends.start("worker-1", port)
    raw = inventory(
        tmp_path,
        ["worker-0", "worker-1"],
        listen={},
        ports={"ingress_http": port, "ingress_https": wild},
        max_connections=200,  # bounds the damage on the code without the check
    )
    raw["listen"]["ingress_http"] = f"127.0.0.44:{port}"
    raw["listen"]["ingress_https"] = f"0.0.0.0:{wild}"
    with daemon(tmp_path, raw) as d:
        admin = f"http://{raw['listen']['admin']}"
        wait_health(admin, "ingress_http", ["worker-1"], "up", timeout=10)
        time.sleep(4 * 0.3)  # a few check intervals: the checks would have probed us by now
        names = [who_at("127.0.0.44", port) for _ in range(3)]
        # ingress_http: only worker-1 serves; worker-0 was never connected to (or probed).
        looped = lb_backend(admin, "ingress_http", "worker-0")
        assert names == ["worker-1"] * 3
        assert looped["health"] == "down" and looped["total"] == 0, looped
        assert "own" in (looped.get("self_loop") or ""), looped
        assert counters(admin, "ingress_http")["accepted"] == 3
        # ingress_https: both workers (127.0.0.44 and .46 on <wild>) are local addresses
        # under 0.0.0.0:<wild>: a client gets no backend, and nothing loops.
        with socket.create_connection(("127.0.0.1", wild), timeout=STEP_TIMEOUT) as sock:
            sock.sendall(b"WHO\n")
            with contextlib.suppress(ConnectionError):
                assert sock.recv(64) == b""
        time.sleep(0.5)
        c = counters(admin, "ingress_https")
        assert c["accepted"] == 1 and c.get("no_backend", 0) == 1, c
        for name in ("worker-0", "worker-1"):
            assert lb_backend(admin, "ingress_https", name)["self_loop"], name
        assert get_json(f"{admin}/api/v1/backends")[1]["frontends"]["ingress_https"]["active"] == 0
        assert "is this proxy's own" in d.output()
