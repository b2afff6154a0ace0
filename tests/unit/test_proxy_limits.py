"""The proxy's caps and self-connection refusal (services/proxy/limits.py), the
descriptor budget (appliance/fdbudget.py) and the netlink address parser, all pure."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from ipaddress import IPv4Address

import pytest

from appliance.fdbudget import RESERVE_MIN, budget
from appliance.inventory import Endpoint
from appliance.plan import Backend, HealthCheck
from services.proxy.checks import probe
from services.proxy.limits import (
    CLIENT_LIMIT,
    CLIENT_MIN,
    DESCRIPTORS,
    FDS_PER_CONNECTION,
    OVER_LIMIT,
    Ledger,
    derive,
    own_endpoint,
)
from services.proxy.localaddr import parse_addresses
from services.proxy.pool import BackendState
from services.proxy.server import _own

FOUR = ("api", "machine_config", "ingress_http", "ingress_https")


# --- the budget --------------------------------------------------------------------------


def test_budget_keeps_a_reserve() -> None:
    assert budget(20_000).reserve == 2_000 and budget(20_000).spendable == 18_000
    assert budget(1024).reserve == 512  # never more than half
    assert budget(4096).reserve == RESERVE_MIN
    assert budget(600).reserve == 300
    assert budget(0).spendable == 0


def test_caps_of_the_issue() -> None:
    """RLIMIT_NOFILE 20,000, four frontends of max_connections 10,000, 10 backends."""
    fds = budget(20_000)
    caps = derive(fds.spendable, dict.fromkeys(FOUR, 10_000), 4 * 10)
    assert caps.fds == 18_000 - 40 and caps.connections == caps.fds // FDS_PER_CONNECTION
    fe = caps.frontends["ingress_http"]
    assert fe.floor == caps.connections // 8
    assert fe.cap == fe.floor + caps.shared < 10_000
    assert fe.per_client == fe.cap // 4
    # Everything the proxy may hold stays within its share: the reserve is untouched.
    assert sum(c.floor for c in caps.frontends.values()) + caps.shared == caps.connections


def test_small_max_connections_is_the_cap() -> None:
    caps = derive(budget(20_000).spendable, {"api": 3, "ingress_http": 10_000}, 2)
    assert caps.frontends["api"].cap == 3 and caps.frontends["api"].per_client == 3
    # api's unused floor goes to the shared pool.
    assert caps.frontends["ingress_http"].cap == caps.connections - 3
    assert caps.frontends["ingress_http"].per_client >= CLIENT_MIN


# --- admission ---------------------------------------------------------------------------


def ledger_for(limit: int, frontends: dict[str, int]) -> Ledger:
    ledger = Ledger(derive(0, {}, 0))
    for name in frontends:
        ledger.gate(name)
    ledger.retune(derive(budget(limit).spendable, frontends, 0))
    return ledger


def test_one_client_cannot_take_a_frontend() -> None:
    """The issue: 10,100 idle connections from one client, limit 20,000."""
    ledger = ledger_for(20_000, dict.fromkeys(FOUR, 10_000))
    ingress, api = ledger.gates[2], ledger.gates[0]
    results = [ingress.admit("198.51.100.7") for _ in range(10_100)]
    held = results.count(None)
    assert held == ingress.per_client and set(results[held:]) == {CLIENT_LIMIT}
    assert ledger.fds_used == held * FDS_PER_CONNECTION <= ledger.fds
    assert ingress.admit("198.51.100.8") is None
    assert api.admit("198.51.100.7") is None  # a client's cap is per frontend


def test_frontend_cap_floor_and_shared_pool() -> None:
    ledger = ledger_for(1024, {"a": 10_000, "b": 10_000})
    a, b = ledger.gates
    # Many clients fill frontend a: its floor, then the whole shared pool.
    clients = (f"192.0.2.{i}" for i in range(1, 250))
    admitted = 0
    while (why := a.admit(next(clients))) is None:
        admitted += 1
    assert why == OVER_LIMIT and admitted == a.cap == a.floor + ledger.shared
    # b still has its floor, and nothing more: the shared pool is a's.
    for i in range(b.floor):
        assert b.admit(f"198.51.100.{i % 250}") is None
    assert b.admit("203.0.113.1") == DESCRIPTORS
    assert ledger.fds_used <= ledger.fds
    # a connection of a closes: b may take its place in the shared pool.
    a.release("192.0.2.1")
    assert b.admit("203.0.113.1") is None
    assert b.admit("203.0.113.2") == DESCRIPTORS


def test_release_returns_everything() -> None:
    ledger = ledger_for(1024, {"a": 10_000})
    (a,) = ledger.gates
    for _ in range(10):
        assert a.admit("192.0.2.1") is None
    for _ in range(10):
        a.release("192.0.2.1")
    assert (a.active, ledger.fds_used, ledger.shared_used, a.clients) == (0, 0, 0, {})


def test_retune_keeps_counts_and_retired_gates_refuse() -> None:
    ledger = ledger_for(2048, {"a": 10_000, "b": 10_000})
    a, b = ledger.gates
    for i in range(a.floor + 5):
        assert a.admit(f"192.0.2.{i % 200}") is None
    assert ledger.shared_used == 5
    b.retired = True
    ledger.retune(derive(budget(2048).spendable, {"a": 10_000}, 0))
    # a alone: a larger floor, so its connections no longer draw from the shared pool.
    assert a.floor > a.active and ledger.shared_used == 0
    assert b.admit("192.0.2.1") == OVER_LIMIT


def test_pipes_leave_room_for_connections() -> None:
    ledger = ledger_for(1024, {"a": 10_000})
    pipes = 0
    while ledger.take_pipe():
        pipes += 1
    assert ledger.fds_used <= ledger.fds * 3 // 4 < ledger.fds
    (a,) = ledger.gates
    assert a.admit("192.0.2.1") is None  # connections still come in
    for _ in range(pipes):
        ledger.give_pipe()
    a.release("192.0.2.1")
    assert ledger.fds_used == 0 and ledger.pipes == 0


# --- self-connections --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "port", "listeners", "local", "own"),
    [
        ("10.33.3.54", 6443, ["10.33.3.54:6443"], (), "10.33.3.54:6443"),
        ("10.33.3.54", 6444, ["10.33.3.54:6443"], (), None),
        ("10.33.3.50", 6443, ["10.33.3.54:6443"], (), None),
        ("10.33.3.50", 6443, ["0.0.0.0:6443"], (), None),  # another host
        ("10.33.3.50", 6443, ["0.0.0.0:6443"], ("10.33.3.50",), "0.0.0.0:6443"),
        ("127.0.0.44", 80, ["0.0.0.0:80"], (), "0.0.0.0:80"),  # loopback is always us
        ("127.0.0.44", 80, ["[::]:80"], (), "[::]:80"),  # a dual-stack wildcard too
        ("0.0.0.0", 80, ["0.0.0.0:80"], (), "0.0.0.0:80"),
    ],
)
def test_own_endpoint(
    address: str, port: int, listeners: list[str], local: tuple[str, ...], own: str | None
) -> None:
    def parse(text: str) -> Endpoint:
        host, _, p = text.rpartition(":")
        return Endpoint(host.strip("[]"), int(p))

    found = own_endpoint(address, port, [parse(x) for x in listeners], frozenset(local))
    assert (str(found) if found else None) == own


def test_own_backend_and_own_check_port() -> None:
    backend = BackendState(Backend("w0", IPv4Address("10.33.3.50"), 80, "worker"), 2, 3)
    listeners = {Endpoint("0.0.0.0", 1936): "api"}
    tcp, router = HealthCheck("tcp", None), HealthCheck("http", 1936, "/healthz/ready")
    local = frozenset({"10.33.3.50"})
    assert _own(backend, tcp, listeners, local) is None
    reason = _own(backend, router, listeners, local)
    assert reason is not None and reason.startswith("its health check 10.33.3.50:1936")
    assert _own(backend, router, listeners, frozenset()) is None


def test_refused_backend_stays_down_until_taken_back() -> None:
    b = BackendState(Backend("w0", IPv4Address("10.33.3.50"), 80, "worker"), 2, 3)
    assert b.check_result(True, 1.0) == "up"
    assert b.set_self_loop("loops", 2.0) and b.health == "down" and not b.eligible
    assert not b.set_self_loop("loops", 3.0)
    assert b.check_result(True, 4.0) is None and b.health == "down"  # a check in flight
    assert b.set_self_loop(None, 5.0)
    # As a tuple: mypy would keep `b.health` narrowed to "down" by the line above.
    assert (b.health, b.eligible) == ("unknown", True)
    assert b.check_result(True, 6.0) == "up"


# --- netlink -----------------------------------------------------------------------------


def nlmsg(kind: int, body: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body
    return msg + b"\0" * (-len(msg) % 4)


def rtattr(kind: int, value: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(value), kind) + value
    return attr + b"\0" * (-len(attr) % 4)


def ifaddr(family: int, *attrs: bytes) -> bytes:
    return struct.pack("=BBBBI", family, 24, 0, 0, 2) + b"".join(attrs)


def test_parse_addresses() -> None:
    a, b = socket.inet_aton("192.0.2.1"), socket.inet_aton("198.51.100.1")
    batch = (
        nlmsg(20, ifaddr(socket.AF_INET, rtattr(1, a)))
        + nlmsg(20, ifaddr(socket.AF_INET, rtattr(1, a), rtattr(2, b)))  # IFA_LOCAL wins
        + nlmsg(20, ifaddr(socket.AF_INET6, rtattr(1, b"\0" * 16)))
        + nlmsg(20, b"\x02")  # truncated: skipped
    )
    assert parse_addresses(batch) == ({"192.0.2.1", "198.51.100.1"}, False)
    assert parse_addresses(nlmsg(3, b"\0\0\0\0")) == (set(), True)
    with pytest.raises(OSError):
        parse_addresses(nlmsg(2, b"\xff\xff\xff\xff"))


# --- health checks out of descriptors ----------------------------------------------------


async def test_a_check_that_cannot_be_made_here_is_no_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EMFILE in the probe is this host's trouble: no result, the backend keeps its health
    (before, every backend was marked down when the daemon ran out of descriptors)."""

    async def out_of_fds(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    async def refused(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    check = HealthCheck("tcp", None)
    monkeypatch.setattr(asyncio, "open_connection", out_of_fds)
    ok, detail = await probe(check, "192.0.2.10", 80)
    assert ok is None and "Too many open files" in detail
    monkeypatch.setattr(asyncio, "open_connection", refused)
    assert (await probe(check, "192.0.2.10", 80))[0] is False
