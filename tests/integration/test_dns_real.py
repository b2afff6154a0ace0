"""The dns service with real clients: dig and dnspython against `appliance run`.

The daemon serves the article's cluster (config/dgxpod.yaml) on 127.0.0.1 with a
free port for UDP and TCP. Checked: every record of the cluster, negative answers,
case echo, EDNS, ANY, AXFR, truncation and the TCP retry (a 40-master inventory,
served by an in-process Supervisor), forwarding with failover and the cache
against a small upstream server on 127.0.0.2, who may recurse, reload under
query load, and bad packets on real sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import yaml

from appliance.inventory import Listen
from appliance.registry import DNS
from appliance.supervisor import Supervisor, load_plan
from tests import helpers
from tests.helpers import free_port, need_tool, write_inventory

D = "dgxpod.nvidia.com"
LB = "10.33.3.54"
NODES = {
    "bootstrap": "10.33.3.53",
    "master-0": "10.33.3.50",
    "master-1": "10.33.3.51",
    "master-2": "10.33.3.52",
    "worker-0": "10.33.3.44",
    "worker-1": "10.33.3.46",
}
TIMEOUT = 2.0  # per query; every answer here comes from loopback in milliseconds


# --- setup ---------------------------------------------------------------------------


def free_dns_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on host."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM, host)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both UDP and TCP")


def dgxpod_inventory(state_dir: Path, dns_port: int, **network: Any) -> dict[str, Any]:
    """config/dgxpod.yaml with dns on 127.0.0.1:dns_port, admin on a free port, rest off."""
    raw = helpers.dgxpod_data()
    raw["listen"] = dict.fromkeys(Listen.model_fields)  # every listener off ...
    raw["listen"]["dns"] = f"127.0.0.1:{dns_port}"  # ... but these two
    raw["listen"]["admin"] = f"127.0.0.1:{free_port()}"
    raw["state_dir"] = str(state_dir)
    raw["network"].update(network)
    return raw


class Daemon(helpers.Daemon):
    """`python -m appliance run` in a subprocess, stopped by PID, with its DNS port."""

    def __init__(self, config: Path, raw: dict[str, Any], log_path: Path) -> None:
        super().__init__(config, log_path, env={"PYTHONUNBUFFERED": "1"})
        self.raw = raw
        self.port = int(raw["listen"]["dns"].rsplit(":", 1)[1])
        self.admin = f"http://{raw['listen']['admin']}"
        try:
            self.wait_for("serving ")
        except BaseException:
            self.stop()
            raise

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.admin}/api/v1/status", timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
        return body

    def counters(self) -> Counter[str]:
        return Counter(self.status()["services"]["dns"]["counters"])


def start_daemon(tmp: Path, raw: dict[str, Any]) -> Daemon:
    config = write_inventory(tmp / "inventory.yaml", raw)
    return Daemon(config, raw, tmp / "daemon.log")


def serving_pod(tmp: Path) -> Iterator[Daemon]:
    """The article's cluster, no upstream, run from `tmp` for a module's fixture; its
    log must show no traceback at the end."""
    d = start_daemon(tmp, dgxpod_inventory(tmp / "state", free_dns_port()))
    yield d
    d.stop()
    assert "Traceback" not in d.output()


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The article's cluster, no upstream: shared by the read-only tests below."""
    yield from serving_pod(tmp_path_factory.mktemp("pod"))


# --- clients ---------------------------------------------------------------------------


def ask(
    port: int,
    name: str,
    rdtype: str = "A",
    *,
    tcp: bool = False,
    source: str | None = None,
    **query: Any,
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **query)
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", timeout=TIMEOUT, port=port, source=source)
    return dns.query.udp(q, "127.0.0.1", timeout=TIMEOUT, port=port, source=source)


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrset in reply.answer for rd in rrset if rrset.rdtype == 1)


def targets(reply: dns.message.Message) -> list[str]:
    return sorted(rd.target.to_text() for rrset in reply.answer for rd in rrset)


def dig(port: int, *args: str, server: str = "127.0.0.1") -> str:
    tool = need_tool("dig")
    cmd = [tool, f"@{server}", "-p", str(port), "+time=2", "+tries=1", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return _squeeze(done.stdout + done.stderr)


def _squeeze(out: str) -> str:
    """dig's output with each run of blanks (tabs for alignment) as one space."""
    return "\n".join(" ".join(line.split()) for line in out.splitlines())


def short(port: int, *args: str) -> list[str]:
    return sorted(line for line in dig(port, "+short", *args).splitlines() if line)


def negative_soa(reply: dns.message.Message, origin: str = D) -> dns.rrset.RRset:
    """The one SOA in the authority section (RFC 2308), with the negative TTL."""
    assert not reply.answer
    (soa,) = reply.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == origin + "."
    assert soa.ttl == 30 and soa[0].minimum == 30
    return soa


# --- every record of the article's cluster ------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_every_record_with_dnspython(pod: Daemon, tcp: bool) -> None:
    port = pod.port

    def a(name: str) -> list[str]:
        reply = ask(port, name, tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
        assert not reply.flags & dns.flags.RA  # no upstream: no recursion for anybody
        assert all(rrset.ttl == 60 for rrset in reply.answer)
        return addresses(reply)

    for node, ip in NODES.items():
        assert a(f"{node}.{D}") == [ip]
        reply = ask(port, ".".join(reversed(ip.split("."))) + ".in-addr.arpa", "PTR", tcp=tcp)
        assert targets(reply) == [f"{node}.{D}."]
    for name in ("api", "api-int", "console-openshift-console.apps", "oauth.apps", "a.b.apps"):
        assert a(f"{name}.{D}") == [LB]
    for i in range(3):
        assert a(f"etcd-{i}.{D}") == [NODES[f"master-{i}"]]

    srv = ask(port, f"_etcd-server-ssl._tcp.{D}", "SRV", tcp=tcp)
    (rrset,) = srv.answer
    assert sorted((r.priority, r.weight, r.port, r.target.to_text()) for r in rrset) == [
        (0, 10, 2380, f"etcd-{i}.{D}.") for i in range(3)
    ]
    glue = {rr.name.to_text(): rr[0].address for rr in srv.additional}
    assert glue == {f"etcd-{i}.{D}.": NODES[f"master-{i}"] for i in range(3)}

    soa = ask(port, D, "SOA", tcp=tcp).answer[0][0]
    assert soa.mname.to_text() == f"ns.{D}." and soa.rname.to_text() == f"hostmaster.{D}."
    assert (soa.refresh, soa.retry, soa.expire, soa.minimum) == (3600, 600, 604800, 30)
    ns = ask(port, D, "NS", tcp=tcp)
    assert targets(ns) == [f"ns.{D}."]
    assert [rr[0].address for rr in ns.additional] == ["10.33.3.18"]
    assert a(f"ns.{D}") == ["10.33.3.18"]

    reverse = ask(port, "3.33.10.in-addr.arpa", "SOA", tcp=tcp)
    assert reverse.flags & dns.flags.AA and reverse.answer[0][0].mname.to_text() == f"ns.{D}."
    lb = ask(port, "54.3.33.10.in-addr.arpa", "PTR", tcp=tcp)
    assert targets(lb) == [f"api-int.{D}.", f"api.{D}."]


@pytest.mark.tool("dig")
def test_every_record_with_dig(pod: Daemon) -> None:
    need_tool("dig")
    port = pod.port
    for node, ip in NODES.items():
        assert short(port, f"{node}.{D}") == [ip]
        assert short(port, "-x", ip) == [f"{node}.{D}."]
    assert short(port, "-x", LB) == [f"api-int.{D}.", f"api.{D}."]
    for name in ("api", "api-int", "console-openshift-console.apps", "a.b.apps"):
        assert short(port, f"{name}.{D}") == [LB]
    for i in range(3):
        assert short(port, f"etcd-{i}.{D}") == [NODES[f"master-{i}"]]
    assert short(port, f"_etcd-server-ssl._tcp.{D}", "SRV") == [
        f"0 10 2380 etcd-{i}.{D}." for i in range(3)
    ]
    (soa,) = short(port, D, "SOA")
    assert soa.startswith(f"ns.{D}. hostmaster.{D}. ") and soa.endswith(" 3600 600 604800 30")
    assert short(port, D, "NS") == [f"ns.{D}."]

    out = dig(port, "+tcp", f"master-2.{D}")
    assert "status: NOERROR" in out and "flags: qr aa rd;" in out
    assert f"master-2.{D}. 60 IN A 10.33.3.52" in out
    assert f"SERVER: 127.0.0.1#{port}(127.0.0.1) (TCP)" in out
    assert short(port, "+tcp", "-x", "10.33.3.44") == [f"worker-0.{D}."]


# --- negative answers, case, EDNS, ANY, AXFR ----------------------------------------------


@pytest.mark.tool("dig")
def test_nxdomain_and_nodata(pod: Daemon) -> None:
    need_tool("dig")
    port = pod.port
    for tcp in (False, True):
        nx = ask(port, f"nope.{D}", tcp=tcp)
        assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
        negative_soa(nx)
        for name, rdtype in (
            (f"master-0.{D}", "AAAA"),  # the name exists, the type does not
            (f"apps.{D}", "A"),  # empty non-terminal above the wildcard
            (f"_tcp.{D}", "SRV"),  # empty non-terminal above the SRV
            (f"x.apps.{D}", "AAAA"),  # the wildcard matches, the type does not
            (f"api.{D}", "TXT"),
        ):
            nodata = ask(port, name, rdtype, tcp=tcp)
            assert nodata.rcode() == dns.rcode.NOERROR, name
            negative_soa(nodata)
    # A name below an existing name is not covered by *.apps: NXDOMAIN.
    assert ask(port, f"x.api.{D}").rcode() == dns.rcode.NXDOMAIN
    reverse_nx = ask(port, "99.3.33.10.in-addr.arpa", "PTR")
    assert reverse_nx.rcode() == dns.rcode.NXDOMAIN
    negative_soa(reverse_nx, "3.33.10.in-addr.arpa")

    out = dig(port, f"nope.{D}")
    assert "status: NXDOMAIN" in out and "AUTHORITY: 1" in out
    assert f"{D}. 30 IN SOA ns.{D}. hostmaster.{D}." in out
    out = dig(port, f"master-0.{D}", "AAAA")
    assert "status: NOERROR" in out and "ANSWER: 0, AUTHORITY: 1" in out
    out = dig(port, f"apps.{D}")
    assert "status: NOERROR" in out and "ANSWER: 0, AUTHORITY: 1" in out
    assert "status: NXDOMAIN" in dig(port, "-x", "10.33.3.99")


@pytest.mark.tool("dig")
def test_question_case_is_echoed(pod: Daemon) -> None:
    need_tool("dig")
    port = pod.port
    cases = (
        ("MaStEr-0.DgXpOd.NVIDIA.com", "A", dns.rcode.NOERROR),  # pre-encoded fast path
        ("Foo.APPS.dgxpod.Nvidia.COM", "A", dns.rcode.NOERROR),  # wildcard, encoded lazily
        ("NoPe.DGXPOD.nvidia.com", "A", dns.rcode.NXDOMAIN),
        ("_ETCD-server-ssl._TCP.dgxpod.nvidia.com", "SRV", dns.rcode.NOERROR),
    )
    for tcp in (False, True):
        for edns in (-1, 0):
            for name, rdtype, rcode in cases:
                reply = ask(port, name, rdtype, tcp=tcp, use_edns=edns)
                assert reply.rcode() == rcode
                assert reply.question[0].name.to_text() == name + "."
                for rrset in reply.answer:
                    assert rrset.name.to_text() == name + "."
    out = dig(port, "MaStEr-0.DgXpOd.NVIDIA.com")
    assert ";MaStEr-0.DgXpOd.NVIDIA.com. IN A" in out
    assert "MaStEr-0.DgXpOd.NVIDIA.com. 60 IN A 10.33.3.50" in out


@pytest.mark.tool("dig")
def test_edns(pod: Daemon) -> None:
    need_tool("dig")
    port = pod.port
    for name in (f"api.{D}", f"nope.{D}", f"y.apps.{D}"):
        plain = ask(port, name, use_edns=False)
        assert plain.edns == -1 and not plain.additional  # no OPT unless asked with one
        big = ask(port, name, use_edns=0, payload=4096)
        assert big.edns == 0 and big.payload == 1232 and not big.ednsflags & dns.flags.DO
        do = ask(port, name, use_edns=0, want_dnssec=True)
        assert do.edns == 0 and do.ednsflags & dns.flags.DO  # DO echoed (RFC 3225)
        cookie = dns.edns.CookieOption(os.urandom(8), b"")
        with_option = ask(port, name, use_edns=0, options=[cookie], tcp=True)
        assert with_option.edns == 0 and with_option.rcode() != dns.rcode.FORMERR
    badvers = ask(port, f"api.{D}", use_edns=1)
    assert badvers.rcode() == dns.rcode.BADVERS and badvers.edns == 0
    assert "udp: 1232" in dig(port, f"api.{D}")
    assert "BADVERS, retrying with EDNS version 0" in dig(port, "+edns=1", f"api.{D}")


@pytest.mark.tool("dig")
def test_any_is_minimal_and_axfr_is_refused(pod: Daemon) -> None:
    need_tool("dig")
    port = pod.port
    node = ask(port, f"master-1.{D}", "ANY")
    assert [(r.rdtype, len(r)) for r in node.answer] == [(dns.rdatatype.A, 1)]
    apex = ask(port, D, "ANY", tcp=True)
    assert len(apex.answer) == 1 and len(apex.answer[0]) == 1  # one RRset (RFC 8482)
    assert short(port, f"a.b.apps.{D}", "ANY") == [LB]

    for tcp in (False, True):
        for rdtype in ("AXFR", "IXFR"):
            assert ask(port, D, rdtype, tcp=tcp).rcode() == dns.rcode.REFUSED
    assert "Transfer failed" in dig(port, "AXFR", D)


@pytest.mark.tool("dig")
def test_no_upstream_refuses_foreign_names(pod: Daemon) -> None:
    need_tool("dig")
    for tcp in (False, True):
        reply = ask(pod.port, "example.org", tcp=tcp)
        assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
        assert not reply.flags & dns.flags.RA
    assert ask(pod.port, "10.0.0.10.in-addr.arpa", "PTR").rcode() == dns.rcode.REFUSED
    assert "status: REFUSED" in dig(pod.port, "example.org")


# --- truncation: a 40-master cluster, in-process --------------------------------------------


@pytest.mark.tool("dig")
async def test_truncation_and_tcp_retry(tmp_path: Path) -> None:
    """The SRV answer with 40 targets and their addresses is ~3 KB: UDP truncates it."""
    tool = need_tool("dig")
    port = free_dns_port()
    raw = dgxpod_inventory(tmp_path / "state", port)
    raw["nodes"] += [
        {
            "name": f"m{i}",
            "role": "master",
            "mac": f"52:54:00:00:04:{i:02x}",
            "ip": f"10.33.3.{100 + i}",
        }
        for i in range(37)
    ]
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    sup = Supervisor(config, specs=[DNS])
    await sup.start(load_plan(config))
    try:
        srv = f"_etcd-server-ssl._tcp.{D}"

        async def udp(**kw: Any) -> dns.message.Message:
            q = dns.message.make_query(srv, "SRV", **kw)
            return await dns.asyncquery.udp(q, "127.0.0.1", timeout=TIMEOUT, port=port)

        for kw in ({"use_edns": False}, {"use_edns": 0, "payload": 512}, {"use_edns": 0}):
            reply = await udp(**kw)
            assert reply.flags & dns.flags.TC and not reply.answer and not reply.authority
            assert reply.edns == (-1 if kw["use_edns"] is False else 0)
        # A client that offers 4096 still gets at most 1232 bytes: no IP fragments.
        offered = await udp(use_edns=0, payload=4096)
        assert offered.flags & dns.flags.TC
        assert (await udp(use_edns=0, payload=512)).question[0].name.to_text() == srv + "."

        q = dns.message.make_query(srv, "SRV")
        full = await dns.asyncquery.tcp(q, "127.0.0.1", timeout=TIMEOUT, port=port)
        assert not full.flags & dns.flags.TC
        assert len(full.answer[0]) == 40 and len(full.additional) == 40
        assert targets(full) == sorted(f"etcd-{i}.{D}." for i in range(40))

        async def run_dig(*args: str) -> str:
            proc = await asyncio.create_subprocess_exec(
                tool,
                "@127.0.0.1",
                "-p",
                str(port),
                "+time=2",
                "+tries=1",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            return _squeeze(out.decode())

        notcp = await run_dig("+bufsize=512", "+notcp", "+ignore", srv, "SRV")
        assert "flags: qr aa tc rd;" in notcp and "ANSWER: 0" in notcp
        retried = await run_dig("+bufsize=512", srv, "SRV")
        assert "Truncated, retrying in TCP mode" in retried
        assert "ANSWER: 40," in retried and "(TCP)" in retried
        assert retried.count("IN SRV 0 10 2380 etcd-") == 40
        counters = sup.running["dns"].status().to_json()["counters"]
        assert counters["truncated"] >= 5
    finally:
        await sup.stop()


# --- forwarding -------------------------------------------------------------------------


class Upstream:
    """A small DNS server for example.org on UDP and TCP, counting what it is asked.

    example.org A 192.0.2.10 (TTL 300); big.example.org TXT is too big for UDP (TC
    over UDP, the whole answer over TCP); everything else NXDOMAIN with the SOA.
    """

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.host = host
        self.port = free_dns_port(host)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((host, self.port))
        self.tcp = socket.socket()
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((host, self.port))
        self.tcp.listen(16)
        self.asked: Counter[tuple[str, str]] = Counter()  # (name, "udp"|"tcp")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def count(self, name: str) -> int:
        return self.asked[(name, "udp")] + self.asked[(name, "tcp")]

    def answer(self, wire: bytes, tcp: bool) -> bytes:
        query = dns.message.from_wire(wire)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.RA
        qname = query.question[0].name
        name = qname.to_text().lower().rstrip(".")
        rdtype = query.question[0].rdtype
        self.asked[(name, "tcp" if tcp else "udp")] += 1
        if name == "example.org" and rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(qname, 300, "IN", "A", "192.0.2.10"))
        elif name == "big.example.org" and rdtype == dns.rdatatype.TXT:
            if tcp:
                texts = [f'"{i:02d}-{"x" * 200}"' for i in range(12)]
                reply.answer.append(dns.rrset.from_text_list(qname, 300, "IN", "TXT", texts))
            else:
                reply.flags |= dns.flags.TC
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            soa = "ns.example.org. hostmaster.example.org. 1 3600 600 86400 60"
            reply.authority.append(dns.rrset.from_text("example.org.", 120, "IN", "SOA", soa))
        return reply.to_wire(max_size=65535)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.udp, selectors.EVENT_READ)
            sel.register(self.tcp, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    try:
                        if key.fileobj is self.udp:
                            data, addr = self.udp.recvfrom(65535)
                            self.udp.sendto(self.answer(data, tcp=False), addr)
                        else:
                            self._tcp_client(self.tcp.accept()[0])
                    except (OSError, dns.exception.DNSException):
                        continue

    def _tcp_client(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            while True:
                head = conn.recv(2, socket.MSG_WAITALL)
                if len(head) < 2:
                    return
                data = conn.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
                out = self.answer(data, tcp=True)
                conn.sendall(struct.pack("!H", len(out)) + out)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


@pytest.mark.tool("dig")
def test_forwarding_failover_cache_and_acl(upstream: Upstream, tmp_path: Path) -> None:
    need_tool("dig")
    dead = free_port(socket.SOCK_DGRAM, "127.0.0.3")  # nothing listens: ICMP unreachable
    raw = dgxpod_inventory(
        tmp_path / "state",
        free_dns_port(),
        upstream_dns=[f"127.0.0.3:{dead}", f"127.0.0.2:{upstream.port}"],
        forward_allowed=["127.0.0.1/32"],
    )
    # A bare address means port 53.
    bare = {**raw, "network": {**raw["network"], "upstream_dns": ["127.0.0.2"]}}
    bare_plan = load_plan(write_inventory(tmp_path / "bare.yaml", bare))
    assert [(u.host, u.port) for u in bare_plan.dns.upstreams] == [("127.0.0.2", 53)]

    d = start_daemon(tmp_path, raw)
    try:
        port = d.port
        first = ask(port, "example.org")  # the dead upstream first: failover
        assert first.rcode() == dns.rcode.NOERROR and first.flags & dns.flags.RA
        assert addresses(first) == ["192.0.2.10"] and first.answer[0].ttl <= 300
        assert upstream.count("example.org") == 1
        time.sleep(1.1)
        for tcp in (False, True):  # from the cache, over both transports, aged
            again = ask(port, "Example.ORG", tcp=tcp)
            assert addresses(again) == ["192.0.2.10"]
            assert again.question[0].name.to_text() == "Example.ORG."
            assert again.answer[0].ttl < first.answer[0].ttl
        assert short(port, "example.org") == ["192.0.2.10"]
        assert upstream.count("example.org") == 1

        nx = ask(port, "nothing.example.org")
        assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].ttl <= 120
        assert ask(port, "nothing.example.org").rcode() == dns.rcode.NXDOMAIN
        assert upstream.count("nothing.example.org") == 1  # the negative answer is cached too

        # Upstream says TC over UDP: we ask it over TCP; the client gets TC, then TCP.
        big = dig(port, "big.example.org", "TXT")
        assert "Truncated, retrying in TCP mode" in big and "ANSWER: 12," in big
        assert upstream.asked[("big.example.org", "tcp")] == 1

        # Not in forward_allowed: refused, even what is in the cache; our zones still answer.
        for tcp in (False, True):
            refused = ask(port, "example.org", tcp=tcp, source="127.0.0.9")
            assert refused.rcode() == dns.rcode.REFUSED and not refused.answer
            own = ask(port, f"api.{D}", tcp=tcp, source="127.0.0.9")
            assert addresses(own) == [LB] and not own.flags & dns.flags.RA
        assert "status: REFUSED" in dig(port, "-b", "127.0.0.9", "example.org")
        assert ask(port, f"api.{D}").flags & dns.flags.RA  # 127.0.0.1 may recurse
        assert upstream.count("example.org") == 1

        # A question compressed into the header (it reads as ".") is not sent upstream.
        pointer = _header(0x5151) + b"\xc0\x04\x00\x01\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.sendto(pointer, ("127.0.0.1", port))
            formerr = dns.message.from_wire(sock.recv(65535))
        assert formerr.id == 0x5151 and formerr.rcode() == dns.rcode.FORMERR

        counters = d.counters()
        assert counters["upstream_failures"] == 1 and counters["cache_hits"] >= 4
        assert counters["forwarded"] >= 7 and counters["refused"] >= 3
        assert counters["upstream_tcp"] == 1 and counters.get("errors", 0) == 0
    finally:
        d.stop()
    assert "Traceback" not in d.output()


# --- reload under load ------------------------------------------------------------------


@pytest.mark.tool("dig")
def test_reload_under_query_load(tmp_path: Path) -> None:
    need_tool("dig")
    raw = dgxpod_inventory(tmp_path / "state", free_dns_port())
    d = start_daemon(tmp_path, raw)
    try:
        port = d.port
        serial = ask(port, D, "SOA").answer[0][0].serial
        new = yaml.safe_load(yaml.safe_dump(raw))
        worker0 = next(n for n in new["nodes"] if n["name"] == "worker-0")
        worker0["ip"] = "10.33.3.45"
        new["nodes"].append(
            {"name": "worker-2", "role": "worker", "mac": "02:00:00:00:03:47", "ip": "10.33.3.47"}
        )
        seen: list[str] = []  # worker-0's address, answer after answer
        lost: list[str] = []
        deadline = time.monotonic() + 10
        # UDP on one socket, and every 10th query over one TCP connection opened before
        # the reload: connections, like the sockets, live through it.
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as tcp,
        ):
            udp.connect(("127.0.0.1", port))
            udp.setblocking(False)  # dnspython waits with its own timeout on a given socket
            tcp.setblocking(False)
            for i in range(300):
                if time.monotonic() > deadline:
                    break
                if i == 40:
                    write_inventory(d.config, new)
                    d.proc.send_signal(signal.SIGHUP)
                q = dns.message.make_query(f"worker-0.{D}", "A")
                try:
                    if i % 10 == 5:
                        reply = dns.query.tcp(q, "127.0.0.1", TIMEOUT, port, sock=tcp)
                    else:
                        reply = dns.query.udp(q, "127.0.0.1", TIMEOUT, port, sock=udp)
                except dns.exception.Timeout:
                    lost.append(f"query {i}")
                    continue
                assert reply.id == q.id and reply.rcode() == dns.rcode.NOERROR
                seen.append(",".join(addresses(reply)))
                if seen[-50:] == ["10.33.3.45"] * 50:
                    break  # the new plan has answered 50 times in a row
        assert not lost
        assert set(seen) <= {"10.33.3.44", "10.33.3.45"}, Counter(seen)
        switch = seen.index("10.33.3.45")  # old answers, then new ones: one swap
        assert set(seen[:switch]) == {"10.33.3.44"} and set(seen[switch:]) == {"10.33.3.45"}
        assert switch >= 40
        assert d.status()["reloads"]["ok"] == 1

        assert short(port, f"worker-2.{D}") == ["10.33.3.47"]
        assert short(port, "-x", "10.33.3.45") == [f"worker-0.{D}."]
        assert short(port, "-x", "10.33.3.47") == [f"worker-2.{D}."]
        assert ask(port, "44.3.33.10.in-addr.arpa", "PTR").rcode() == dns.rcode.NXDOMAIN
        assert ask(port, D, "SOA").answer[0][0].serial != serial  # secondaries would notice
        assert d.counters()["queries"] >= len(seen)
    finally:
        d.stop()


# --- bad input ----------------------------------------------------------------------------


def _header(
    qid: int, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def _name(text: str) -> bytes:
    wire = dns.name.from_text(text).to_wire()
    assert wire is not None  # None only when it writes to a file
    return wire


def _bad_packets() -> list[tuple[str, bytes, set[int | None]]]:
    """(what, packet, acceptable replies: an rcode, or None for no answer)."""
    q = _name(f"api.{D}") + struct.pack("!HH", 1, 1)
    rng = random.Random(1234)
    formerr_or_none: set[int | None] = {dns.rcode.FORMERR, None}
    packets: list[tuple[str, bytes, set[int | None]]] = [
        ("one byte", b"\x07", {None}),
        ("half a header", b"\x07\x08\x01\x00\x00", {None}),
        ("12 zero bytes", b"\x00" * 12, {dns.rcode.FORMERR}),
        ("header, no question", _header(0x1101), {dns.rcode.FORMERR}),
        ("cut in the name", _header(0x1102) + q[:7], {dns.rcode.FORMERR}),
        ("cut in the type", _header(0x1103) + q[:-3], {dns.rcode.FORMERR}),
        ("class CH", _header(0x1104) + _name("version.bind") + b"\x00\x10\x00\x03", {5}),
        ("class 42", _header(0x1105) + _name(f"api.{D}") + b"\x00\x01\x00\x2a", {5}),
        ("two questions", _header(0x1106, qd=2) + q + q, {dns.rcode.FORMERR}),
        ("pointer loop", _header(0x1107) + b"\xc0\x0c\x00\x01\x00\x01", {dns.rcode.FORMERR}),
        (
            "pointer ring",
            _header(0x1108) + b"\x01a\xc0\x0e\x00\x01\x00\x01",
            {dns.rcode.FORMERR},
        ),
        ("label type 0x40", _header(0x1109) + b"\x41" + b"x" * 10, {dns.rcode.FORMERR}),
        ("answer count lies", _header(0x110A, an=3) + q, {dns.rcode.FORMERR}),
        ("QR set", _header(0x110B, flags=0x8100) + q, {None}),
        ("QR set, broken", _header(0x110C, flags=0x8100, qd=9) + b"\xff", {None}),
        ("opcode UPDATE", _header(0x110D, flags=0x2800) + q, {dns.rcode.NOTIMP}),
        ("trailing OPT cut", _header(0x110E, ar=1) + q + b"\x00\x00\x29", formerr_or_none),
    ]
    for i in range(8):
        garbage = bytes(rng.getrandbits(8) for _ in range(rng.randrange(13, 300)))
        packets.append((f"garbage {i}", garbage, {dns.rcode.FORMERR, dns.rcode.NOTIMP, None}))
    return packets


def test_bad_packets_on_a_real_socket(pod: Daemon) -> None:
    port = pod.port
    before = pod.counters()
    expected_drops = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        sock.settimeout(TIMEOUT)
        for n, (what, packet, accept) in enumerate(_bad_packets()):
            # The bad packet, then a good query: what comes back before the good reply
            # is the bad packet's (the server answers datagrams in order).
            probe = dns.message.make_query(f"master-0.{D}", "A", id=0xA000 + n)
            sock.send(packet)
            sock.send(probe.to_wire())
            replies = []
            while True:
                data = sock.recv(65535)
                if data[:2] == probe.id.to_bytes(2, "big") and len(data) > 12:
                    assert addresses(dns.message.from_wire(data)) == ["10.33.3.50"], what
                    break
                replies.append(data)
            assert len(replies) <= 1, what
            if not replies:
                assert None in accept, f"{what}: no answer"
                expected_drops += 1
                continue
            reply = dns.message.from_wire(replies[0])
            assert reply.flags & dns.flags.QR, what
            assert reply.rcode() in accept, f"{what}: {dns.rcode.to_text(reply.rcode())}"
            assert replies[0][:2] == packet[:2], what  # the ID is echoed

    # TCP: bad messages on one connection do not end it; broken connections do no harm.
    good = dns.message.make_query(f"api.{D}", "A", id=0x3333).to_wire()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        for packet in (b"\x00" * 12, b"\x01\x02\x03", _header(0x2201, qd=2)):
            conn.sendall(struct.pack("!H", len(packet)) + packet + struct.pack("!H", len(good)))
            conn.sendall(good)
            answers: list[bytes] = []
            while not answers or answers[-1][:2] != good[:2]:
                size = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))[0]
                answers.append(conn.recv(size, socket.MSG_WAITALL))
            assert addresses(dns.message.from_wire(answers[-1])) == [LB]
    for junk in (b"\x00", b"\x01\x00" + b"x" * 10, b"\x00\x00"):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
            conn.sendall(junk)
    assert addresses(ask(port, f"api.{D}")) == [LB]
    assert addresses(ask(port, f"api.{D}", tcp=True)) == [LB]

    after = pod.counters()
    assert after["malformed"] - before["malformed"] >= 12
    assert after["refused"] - before["refused"] >= 2  # class CH and 42: well formed
    assert after["responses_dropped"] - before["responses_dropped"] >= 2
    assert after["dropped"] - before["dropped"] >= expected_drops >= 3
    assert after.get("errors", 0) == 0
    assert pod.proc.poll() is None
