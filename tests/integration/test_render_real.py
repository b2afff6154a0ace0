"""The rendered configs pass the real daemons' own checks (dnsmasq --test, haproxy -c)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from appliance.inventory import load_inventory, parse_inventory
from appliance.plan import Plan, build_plan
from appliance.render import render_dnsmasq, render_haproxy
from tests.helpers import (
    CONFIG,
    Daemon,
    dgxpod_data,
    free_port,
    loopback_inventory,
    need_tool,
    write_inventory,
)
from tests.integration.test_dns_real import Upstream, free_dns_port
from tests.integration.test_proxy_real import ADDR, LB, Backends

_Answers = TypeVar("_Answers")


def _config(name: str) -> Plan:
    return build_plan(load_inventory(CONFIG / name))


def _dgxpod(edit: Callable[[dict[str, Any]], None]) -> Plan:
    raw = dgxpod_data()
    edit(raw)
    return build_plan(parse_inventory(raw, "test.yaml", CONFIG))


def _proxy(raw: dict[str, Any]) -> None:
    raw["network"]["dhcp_mode"] = "proxy"


def _busy(raw: dict[str, Any]) -> None:
    # Everything optional at once: pool, upstreams with ports, NTP, an interface, IPv6 bind.
    raw["network"].update(
        interface="lo",
        dhcp_range=["10.33.3.100", "10.33.3.150"],
        upstream_dns=["192.0.2.53", "198.51.100.53:5353"],
        ntp_servers=["10.33.3.1"],
    )
    raw["listen"] = {"dns": "10.33.3.18:5353", "api": "[::]:6443", "ingress_http": None}


def _wide(raw: dict[str, Any]) -> None:
    # Sixteen reverse zones, and the LB's /24 outside the node subnet.
    raw["network"]["subnet"] = "10.33.0.0/20"
    raw["load_balancer"]["address"] = "192.0.2.54"


def _tuned(raw: dict[str, Any]) -> None:
    raw["load_balancer"].update(
        balance="source",
        check_interval=0.25,
        rise=3,
        fall=5,
        connect_timeout=1.5,
        idle_timeout={"machine_config": 30},
        ingress_check="tcp",
        stop_timeout=0,
    )


def _no_backends(plan: Plan) -> Plan:
    empty = tuple(dataclasses.replace(fe, backends=()) for fe in plan.frontends)
    return dataclasses.replace(plan, frontends=empty)


PLANS: dict[str, Callable[[], Plan]] = {
    "dgxpod": lambda: _config("dgxpod.yaml"),
    "example": lambda: _config("example.yaml"),
    "dgxpod-proxy": lambda: _dgxpod(_proxy),
    "dgxpod-busy": lambda: _dgxpod(_busy),
    "dgxpod-wide": lambda: _dgxpod(_wide),
    "dgxpod-tuned": lambda: _dgxpod(_tuned),
}
# haproxy accepts a backend without servers; the plan can produce one only in theory.
HAPROXY_PLANS: dict[str, Callable[[], Plan]] = {
    **PLANS,
    "dgxpod-no-backends": lambda: _no_backends(_config("dgxpod.yaml")),
}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.tool("dnsmasq")
@pytest.mark.parametrize("case", sorted(PLANS))
def test_dnsmasq_accepts_the_rendered_config(tmp_path: Path, case: str) -> None:
    dnsmasq = need_tool("dnsmasq")
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(render_dnsmasq(PLANS[case]()))
    result = _run([dnsmasq, "--test", "-C", str(conf)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "syntax check OK" in output


@pytest.mark.tool("haproxy")
@pytest.mark.parametrize("case", sorted(HAPROXY_PLANS))
def test_haproxy_accepts_the_rendered_config(tmp_path: Path, case: str) -> None:
    haproxy = need_tool("haproxy")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render_haproxy(HAPROXY_PLANS[case]()))
    result = _run([haproxy, "-c", "-f", str(cfg)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- equivalence: each render, run by the real daemon, against the appliance ------------------
#
# One inventory; the appliance serves it, then the real daemon serves the render of the same
# plan, on the same loopback address and port (one after the other, so the rendered config
# is used exactly as printed). Both are asked the same questions by the same clients.

DOMAIN = "demo.example.com"
# The proxy tests' loopback nodes but worker-2, and their load balancer address.
DNS_NODES = {name: ip for name, ip in ADDR.items() if name != "worker-2"}
DNS_LB = LB
DNS_TIMEOUT = 2.0


def _dns_inventory(tmp_path: Path, port: int) -> dict[str, Any]:
    raw = loopback_inventory(tmp_path)
    raw["nodes"] = [
        {
            "name": name,
            "role": name.split("-")[0],
            "mac": f"52:54:00:00:00:{int(ip.rsplit('.', 1)[1]):02x}",
            "ip": ip,
        }
        for name, ip in DNS_NODES.items()
    ]
    raw["load_balancer"] = {"address": DNS_LB}
    raw["listen"]["dns"] = f"127.0.0.1:{port}"
    return raw


def _rev(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


def _questions() -> list[tuple[str, str]]:
    d = DOMAIN
    qs: list[tuple[str, str]] = []
    for name, ip in DNS_NODES.items():
        qs += [(f"{name}.{d}", "A"), (_rev(ip), "PTR")]
    qs += [(f"api.{d}", "A"), (f"api-int.{d}", "A"), (_rev(DNS_LB), "PTR")]
    qs += [(f"{n}.apps.{d}", "A") for n in ("console-openshift-console", "oauth", "a.b")]
    qs += [(f"apps.{d}", "A"), (f"oauth.apps.{d}", "AAAA"), (f"apps.{d}", "TXT")]
    qs += [(f"etcd-{i}.{d}", "A") for i in range(3)]
    qs += [(f"_etcd-server-ssl._tcp.{d}", "SRV"), (f"_tcp.{d}", "SRV")]
    qs += [(d, "SOA"), (d, "NS"), (d, "A"), (f"ns.{d}", "A"), (_rev("127.0.0.1"), "PTR")]
    qs += [("0.0.127.in-addr.arpa", "SOA"), ("0.0.127.in-addr.arpa", "NS")]
    # negatives: NXDOMAIN and NODATA
    qs += [(f"nope.{d}", "A"), (f"x.master-0.{d}", "A"), (_rev("127.0.0.99"), "PTR")]
    qs += [(f"master-0.{d}", "AAAA"), (f"master-0.{d}", "TXT"), (f"api.{d}", "MX")]
    # not ours (no upstreams: refused by both)
    qs += [("example.org", "A"), ("0.127.in-addr.arpa", "PTR"), (_rev("192.0.2.1"), "PTR")]
    return qs


def _ask_all(port: int) -> dict[tuple[str, str, str], dns.message.Message]:
    """Every question over UDP and over TCP: (qname, qtype, transport) -> reply."""
    out = {}
    for qname, qtype in _questions():
        query = dns.message.make_query(qname, qtype)
        out[qname, qtype, "udp"] = dns.query.udp(query, "127.0.0.1", port=port, timeout=DNS_TIMEOUT)
        out[qname, qtype, "tcp"] = dns.query.tcp(query, "127.0.0.1", port=port, timeout=DNS_TIMEOUT)
    return out


def _rrsets(section: list[dns.rrset.RRset]) -> dict[tuple[str, int], set[str]]:
    return {
        (r.name.to_text().lower(), r.rdtype): {rd.to_text().lower() for rd in r} for r in section
    }


def _flatten_cname(reply: dns.message.Message, qname: str) -> tuple[bool, dict[Any, set[str]]]:
    """dnsmasq serves a wildcard in an auth zone only as a CNAME to a name of the zone: the
    answer is `qname CNAME target` + target's RRset. Seen by a resolver, that is target's
    RRset under qname; so compare that."""
    sets = _rrsets(reply.answer)
    key = (qname.lower() + ".", dns.rdatatype.CNAME)
    if key not in sets:
        return False, sets
    (target,) = sets.pop(key)
    return True, {(qname.lower() + ".", t): v for (n, t), v in sets.items() if n == target}


def _soa_fields(rd_text: str) -> str:
    # dnsmasq's SOA minimum (the negative TTL) is its auth-ttl: leave the last field out.
    return " ".join(rd_text.split()[:-1])


# Where dnsmasq itself cannot do what the appliance does (its limits, not the render's).
DNSMASQ_QUIRKS = {
    # dnsmasq reads a partial reverse name as an address (127.0.0.0) inside its auth-zone
    # subnet and answers NXDOMAIN authoritatively; the name is above the appliance's zone.
    ("0.127.in-addr.arpa", "PTR"): (dns.rcode.REFUSED, dns.rcode.NXDOMAIN),
}


def _compare_dns(
    appliance: dns.message.Message, dnsmasq: dns.message.Message, qname: str, qtype: str
) -> list[str]:
    what = f"{qname} {qtype}"
    quirk = DNSMASQ_QUIRKS.get((qname, qtype))
    if quirk is not None:
        seen = (appliance.rcode(), dnsmasq.rcode())
        return [] if seen == quirk else [f"{what}: rcodes {seen}, expected {quirk}"]
    diffs = []
    if appliance.rcode() != dnsmasq.rcode():
        diffs.append(
            f"{what}: rcode {dns.rcode.to_text(appliance.rcode())} (appliance) vs "
            f"{dns.rcode.to_text(dnsmasq.rcode())} (dnsmasq)"
        )
    aa = (bool(appliance.flags & dns.flags.AA), bool(dnsmasq.flags & dns.flags.AA))
    if aa[0] != aa[1]:
        diffs.append(f"{what}: AA {aa[0]} (appliance) vs {aa[1]} (dnsmasq)")
    ours = _rrsets(appliance.answer)
    wildcard, theirs = _flatten_cname(dnsmasq, qname)
    for sets in (ours, theirs):
        for key, rds in sets.items():
            if key[1] == dns.rdatatype.SOA:
                sets[key] = {_soa_fields(rd) for rd in rds}
    if qtype == "PTR" and qname == _rev(DNS_LB):
        # dnsmasq answers one PTR per address (its first host-record name); the appliance
        # both LB names. The render gives dnsmasq the plan's first (api).
        expected = {(qname + ".", dns.rdatatype.PTR): {f"api.{DOMAIN}."}}
        if theirs != expected or not all(v >= {f"api.{DOMAIN}."} for v in ours.values()):
            diffs.append(f"{what}: answer {ours} (appliance) vs {theirs} (dnsmasq)")
    elif ours != theirs:
        diffs.append(f"{what}: answer {ours} (appliance) vs {theirs} (dnsmasq)")
    soa = [any(r.rdtype == dns.rdatatype.SOA for r in m.authority) for m in (appliance, dnsmasq)]
    # After a wildcard CNAME dnsmasq has an answer, so no SOA (the CNAME is the answer).
    if soa[0] != soa[1] and not wildcard:
        diffs.append(f"{what}: SOA in authority {soa[0]} (appliance) vs {soa[1]} (dnsmasq)")
    return diffs


class _Dnsmasq:
    """The real dnsmasq in the foreground with a config file, stopped by PID."""

    def __init__(self, conf: Path, log: Path, port: int) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [
                need_tool("dnsmasq"),
                "--keep-in-foreground",
                "-C",
                str(conf),
                "--pid-file=",
                f"--log-facility={log}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        query = dns.message.make_query(f"ns.{DOMAIN}", "A")
        deadline = time.monotonic() + 10
        while True:
            try:
                dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
                return
            except (dns.exception.Timeout, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"dnsmasq did not answer: {log.read_text()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # by PID (Popen)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ours_then_dnsmasqs(
    tmp_path: Path, config: Path, port: int, ask: Callable[[], _Answers]
) -> tuple[_Answers, _Answers]:
    """`ask`'s answers from the appliance serving `config`, then from dnsmasq serving its
    render on the same port."""
    daemon = Daemon(config, tmp_path / "daemon.log", env={"PYTHONUNBUFFERED": "1"})
    try:
        daemon.wait_for("serving ")
        ours = ask()
    finally:
        daemon.stop()
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(render_dnsmasq(build_plan(load_inventory(config))))
    dnsmasq = _Dnsmasq(conf, tmp_path / "dnsmasq.log", port)
    try:
        theirs = ask()
    finally:
        dnsmasq.stop()
    return ours, theirs


@pytest.mark.tool("dnsmasq")
def test_dnsmasq_render_answers_as_the_appliance(tmp_path: Path) -> None:
    port = free_dns_port()
    raw = _dns_inventory(tmp_path, port)
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    ours, theirs = _ours_then_dnsmasqs(tmp_path, config, port, lambda: _ask_all(port))
    diffs = [
        f"{key[2]}: {d}" for key in ours for d in _compare_dns(ours[key], theirs[key], *key[:2])
    ]
    assert not diffs, "\n".join(diffs)


# --- haproxy: the rendered config in the real haproxy, against the appliance's proxy -------------

# A loopback /24 of its own: the proxy tests' backends (127.0.0.x, router :1936) may run
# at the same time.
PX_NET = "127.0.3"
PX_LB = f"{PX_NET}.54"
PX_WORKERS = {f"worker-{i}": f"{PX_NET}.{44 + i}" for i in range(3)}
PX_IO = 5.0  # seconds, one client operation
INTERVAL, RISE, FALL = 0.25, 2, 4  # distinct, so a swapped or hard-coded value shows
CONNECT_TIMEOUT, IDLE = 0.6, 1.0
SWEEP = 1.0  # the appliance checks idle connections once a second
SLACK = 1.0  # scheduling on a busy machine


def _listening(host: str, port: int) -> bool:
    """A TCP listener on host:port, from /proc (a test connection would reach a backend)."""
    packed = bytes(reversed([int(o) for o in host.split(".")])).hex().upper()
    want = f"{packed}:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(
            f[1] == want and f[3] == "0A" for f in (line.split() for line in table) if len(f) > 3
        )


@pytest.fixture
def px_backends(tmp_path: Path) -> Iterator[Backends]:
    b = Backends(tmp_path / "backends.log")
    yield b
    b.close()


def _px_inventory(tmp_path: Path, lb_port: int, port: int, **lb: Any) -> Path:
    raw = loopback_inventory(tmp_path)
    raw["network"] = {"address": f"{PX_NET}.1", "subnet": f"{PX_NET}.0/24"}
    raw["nodes"] = [
        {"name": "master-0", "role": "master", "mac": "52:54:00:00:00:50", "ip": f"{PX_NET}.50"},
        *(
            {"name": n, "role": "worker", "mac": f"52:54:00:00:01:{i:02x}", "ip": ip}
            for i, (n, ip) in enumerate(PX_WORKERS.items())
        ),
    ]
    raw["load_balancer"] = {
        "address": PX_LB,
        "backend_ports": {"ingress_http": port},
        "check_interval": INTERVAL,
        "rise": RISE,
        "fall": FALL,
        "connect_timeout": CONNECT_TIMEOUT,
        "idle_timeout": {"ingress_http": IDLE},
        **lb,
    }
    raw["listen"]["ingress_http"] = f"{PX_LB}:{lb_port}"
    return write_inventory(tmp_path / "inventory.yaml", raw)


@contextlib.contextmanager
def _load_balancer(kind: str, config: Path, tmp_path: Path) -> Iterator[int]:
    """The appliance, or haproxy with the render of the same inventory: yields the LB port."""
    plan = build_plan(load_inventory(config))
    ep = plan.frontend("ingress_http").listen
    assert ep is not None
    daemon: Daemon | None = None
    proc: subprocess.Popen[bytes] | None = None
    if kind == "appliance":
        daemon = Daemon(config, tmp_path / "daemon.log")
    else:
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(render_haproxy(plan))
        log = (tmp_path / "haproxy.log").open("w")
        proc = subprocess.Popen(
            [need_tool("haproxy"), "-db", "-f", str(cfg)], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        while not _listening(ep.host, ep.port):
            if time.monotonic() > deadline:
                logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
                raise AssertionError(f"{kind} does not listen on {ep}:\n{logs}")
            time.sleep(0.05)
        yield ep.port
    finally:
        if daemon is not None:
            daemon.stop()
        if proc is not None:
            proc.terminate()  # by PID
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _connect(port: int, source: str | None = None) -> socket.socket:
    src = (source, 0) if source else None
    return socket.create_connection((PX_LB, port), timeout=PX_IO, source_address=src)


def _line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def _who(port: int, source: str | None = None) -> str:
    with _connect(port, source) as sock:
        sock.sendall(b"WHO\n")
        return _line(sock)


def _echo(port: int) -> tuple[socket.socket, str]:
    sock = _connect(port)
    sock.sendall(b"ECHO\n")
    return sock, _line(sock)


@pytest.mark.parametrize("kind", ["appliance", "haproxy"])
@pytest.mark.parametrize("balance", ["roundrobin", "leastconn", "source"])
def test_haproxy_render_balances_as_the_appliance(
    tmp_path: Path, px_backends: Backends, kind: str, balance: str
) -> None:
    port, lb_port = free_port(), free_port(host=PX_LB)
    for name, ip in PX_WORKERS.items():
        px_backends.call(op="start", name=name, host=ip, port=port, tls=None, health_port=None)
    config = _px_inventory(tmp_path, lb_port, port, balance=balance, ingress_check="tcp")
    order = list(PX_WORKERS)
    with _load_balancer(kind, config, tmp_path) as lb:
        if balance == "roundrobin":
            seen = [_who(lb) for _ in range(3 * len(order))]
            start = order.index(seen[0])
            assert seen == [order[(start + i) % len(order)] for i in range(len(seen))]
        elif balance == "leastconn":
            held = [_echo(lb) for _ in order]
            assert sorted(name for _, name in held) == sorted(order)  # one each: all at 0
            sock, freed = held.pop(1)
            sock.close()
            time.sleep(0.3)  # the LB sees the close
            assert _who(lb) == freed  # the one backend with no connection
            for sock, _ in held:
                sock.close()
        else:
            sources = [f"{PX_NET}.{i}" for i in range(101, 117)]
            spread = {src: {_who(lb, src) for _ in range(3)} for src in sources}
            assert all(len(names) == 1 for names in spread.values()), spread  # sticky
            assert len(set().union(*spread.values())) > 1, spread  # and not all on one


class _Blackhole:
    """A listener whose accept queue is full: SYNs are dropped, a connect hangs."""

    def __init__(self, host: str, port: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.fill = []
        for _ in range(2):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((host, port))
            self.fill.append(s)
        time.sleep(0.05)

    def close(self) -> None:
        for s in [*self.fill, self.listener]:
            s.close()


def _timed_who(port: int) -> tuple[float, str]:
    start = time.monotonic()
    name = _who(port)
    return time.monotonic() - start, name


@pytest.mark.parametrize("kind", ["appliance", "haproxy"])
def test_haproxy_render_times_out_and_checks_as_the_appliance(
    tmp_path: Path, px_backends: Backends, kind: str
) -> None:
    """connect_timeout with retry on another backend, passive mark-down, rise/fall of the
    HTTP check (router's :1936), idle timeout: the same numbers through both."""
    if kind == "haproxy":
        need_tool("haproxy")
    port, lb_port = free_port(), free_port(host=PX_LB)
    w0, w1, w2 = PX_WORKERS
    # worker-0's router says healthy, but its traffic port never completes a handshake.
    px_backends.call(op="start", name="w0-health", host=PX_WORKERS[w0], port=1936, tls=None)
    for name in (w1, w2):
        px_backends.call(
            op="start", name=name, host=PX_WORKERS[name], port=port, tls=None, health_port=1936
        )
    hole = _Blackhole(PX_WORKERS[w0], port)
    # roundrobin: each backend in turn (ingress defaults to source, one backend per client).
    config = _px_inventory(tmp_path, lb_port, port, ingress_check="http", balance="roundrobin")
    try:
        with _load_balancer(kind, config, tmp_path) as lb:
            time.sleep(2 * INTERVAL)  # first checks: all up
            # connect timeout: the connection sent to worker-0 waits connect_timeout, then
            # goes to another backend; worker-0 leaves the pool at once.
            times = [_timed_who(lb) for _ in range(3)]
            slow = [(t, name) for t, name in times if t > CONNECT_TIMEOUT / 2]
            assert len(slow) == 1, times
            took, name = slow[0]
            assert CONNECT_TIMEOUT * 0.9 <= took <= CONNECT_TIMEOUT + SLACK, times
            assert name in (w1, w2)
            after = [_timed_who(lb) for _ in range(4)]
            assert all(t < CONNECT_TIMEOUT / 2 and n in (w1, w2) for t, n in after), after
            px_backends.call(op="health", name="w0-health", code=503)  # and stays out

            # fall: worker-2's router fails; out after `fall` failed checks, not before.
            px_backends.call(op="health", name=w2, code=503)
            t0 = time.monotonic()
            last_w2 = t0
            run = 0
            while run < 6:  # six answers in a row without worker-2: it is out
                assert time.monotonic() - t0 < FALL * INTERVAL + 5 * SLACK
                if _who(lb) == w2:
                    last_w2, run = time.monotonic(), 0
                else:
                    run += 1
                time.sleep(0.02)
            down = last_w2 - t0
            # (the last answer from worker-2 comes a poll before it is out: 0.1 s of margin)
            assert (FALL - 1) * INTERVAL - 0.1 <= down <= FALL * INTERVAL + SLACK, down
            # rise: back after `rise` good checks.
            px_backends.call(op="health", name=w2, code=200)
            t1 = time.monotonic()
            while _who(lb) != w2:
                assert time.monotonic() - t1 < RISE * INTERVAL + 5 * SLACK
                time.sleep(0.02)
            up = time.monotonic() - t1
            assert (RISE - 1) * INTERVAL <= up <= RISE * INTERVAL + SLACK, up

            # idle timeout: a silent connection is closed; one that talks meanwhile is not.
            quiet, _ = _echo(lb)
            busy, _ = _echo(lb)
            t2 = time.monotonic()
            quiet.setblocking(False)
            closed = None
            with quiet, busy:
                while time.monotonic() - t2 < IDLE + SWEEP + 2 * SLACK:
                    busy.sendall(b"ping\n")
                    assert _line(busy) == "ping", "the busy connection was cut"
                    with contextlib.suppress(BlockingIOError):
                        assert quiet.recv(1) == b""
                        closed = time.monotonic() - t2
                        break
                    time.sleep(IDLE / 8)
            assert closed is not None, "the silent connection stayed open"
            assert IDLE * 0.9 <= closed <= IDLE + SWEEP + SLACK, closed
            print(
                f"{kind}: connect {took:.2f} s, down {down:.2f} s, up {up:.2f} s, idle {closed:.2f}"
            )
    finally:
        hole.close()


@pytest.mark.tool("dnsmasq")
def test_dnsmasq_render_with_upstreams_forwards_as_the_appliance(tmp_path: Path) -> None:
    """With upstreams the render gives up AA (dnsmasq never forwards at an auth-server
    address) so that names outside the cluster still resolve: the same addresses as the
    appliance's, for the cluster's names and forwarded ones."""
    upstream = Upstream()
    port = free_dns_port()
    raw = _dns_inventory(tmp_path, port)
    raw["network"]["upstream_dns"] = [f"{upstream.host}:{upstream.port}"]
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    names = [f"master-0.{DOMAIN}", f"api.{DOMAIN}", f"oauth.apps.{DOMAIN}", "example.org"]

    def addresses() -> dict[str, set[str]]:
        out = {}
        for name in names:
            reply = dns.query.udp(
                dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=DNS_TIMEOUT
            )
            assert reply.rcode() == dns.rcode.NOERROR, (name, reply)
            out[name] = {rd.address for r in reply.answer if r.rdtype == 1 for rd in r}
        return out

    try:
        ours, theirs = _ours_then_dnsmasqs(tmp_path, config, port, addresses)
    finally:
        upstream.close()
    assert ours == theirs
    assert ours["example.org"] == {"192.0.2.10"} and ours["oauth.apps." + DOMAIN] == {DNS_LB}
