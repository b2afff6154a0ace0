"""The DNS core without sockets: zone lookups, the fast path, the slow path, the cache."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RR, SOA, A, DNSHeader, DNSQuestion, DNSRecord

from appliance.inventory import parse_endpoint, parse_inventory
from appliance.plan import ARecord, Plan, build_plan
from services.dns.authority import Authority
from services.dns.cache import ForwardCache, UpstreamPicker
from services.dns.engine import DnsEngine, Forward, Reply, cache_reply
from services.dns.rcode import NOERROR, NXDOMAIN
from services.dns.wire import parse_query, patch_reply, template_key, truncate
from tests.helpers import CONFIG, dgxpod_data

D = "dgxpod.nvidia.com"


@pytest.fixture
def plan(dgxpod_raw: dict[str, Any]) -> Plan:
    return build_plan(parse_inventory(dgxpod_raw, "x.yaml", CONFIG))


def q(name: str, qtype: str = "A", *, edns: int | None = None, qid: int = 4242) -> bytes:
    record = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        record.add_ar(EDNS0(udp_len=edns))
    return bytes(record.pack())


def answer(engine: DnsEngine, data: bytes, client: str = "10.33.3.44", tcp: bool = False) -> Any:
    decision = engine.handle(data, client, tcp=tcp)
    assert isinstance(decision, Reply), decision
    return DNSRecord.parse(decision.data)


# --- wire ------------------------------------------------------------------------------


def test_parse_query_and_key_fold_case() -> None:
    data = q("Api.DGXPOD.nvidia.com", edns=4096)
    query = parse_query(data)
    assert query is not None and query.edns and query.udp_size == 4096 and query.qtype == 1
    assert query.key(data) == template_key(f"api.{D}", 1, 1, True)
    plain = parse_query(q(f"api.{D}"))
    assert plain is not None and plain.key(q(f"api.{D}")) == template_key(f"api.{D}", 1, 1, False)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 12,
        q(f"api.{D}")[:-1],  # truncated question
        q(f"api.{D}") + b"\x00",  # trailing garbage
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer loop
    ],
)
def test_parse_query_leaves_the_unusual_to_the_slow_path(data: bytes) -> None:
    assert parse_query(data) is None


def test_patch_reply_makes_the_template_the_clients() -> None:
    engine_plan = build_plan(parse_inventory(_raw(), "x.yaml", CONFIG)).dns
    engine = DnsEngine(engine_plan)
    data = q("MASTER-0.dgxpod.nvidia.com", qid=0xBEEF)
    reply = answer(engine, data)
    assert reply.header.id == 0xBEEF and reply.header.rd == 1 and reply.header.aa == 1
    assert str(reply.q.qname) == "MASTER-0.dgxpod.nvidia.com."
    assert str(reply.rr[0].rname) == "MASTER-0.dgxpod.nvidia.com."  # compressed to the question
    assert str(reply.rr[0].rdata) == "10.33.3.50"


def test_truncate_keeps_question_and_opt() -> None:
    engine = DnsEngine(build_plan(parse_inventory(_raw(), "x.yaml", CONFIG)).dns)
    data = q(f"_etcd-server-ssl._tcp.{D}", "SRV", edns=1232)
    decision = engine.handle(data, "10.33.3.44")
    assert isinstance(decision, Reply)
    full = decision.data
    query = parse_query(data)
    assert query is not None
    cut = DNSRecord.parse(truncate(full, query.qname_end, True))
    assert cut.header.tc == 1 and not cut.rr and [r.rtype for r in cut.ar] == [QTYPE.OPT]


def _raw() -> dict[str, Any]:
    return dgxpod_data()


# --- authority -------------------------------------------------------------------------


def test_lookup_kinds(plan: Plan) -> None:
    auth = Authority(plan.dns)
    a = auth.lookup(f"worker-1.{D}", 1)
    assert a is not None and [str(r.rdata) for r in a.answer] == ["10.33.3.46"]
    wild = auth.lookup(f"console-openshift-console.apps.{D}", 1)
    assert wild is not None and str(wild.answer[0].rname) == f"console-openshift-console.apps.{D}."
    deep = auth.lookup(f"a.b.apps.{D}", 1)
    assert deep is not None and str(deep.answer[0].rdata) == "10.33.3.54"
    for nodata in (f"apps.{D}", f"_tcp.{D}", f"master-0.{D}"):
        res = auth.lookup(nodata, 28)  # AAAA
        assert res is not None and res.rcode == NOERROR and not res.answer
        assert res.authority[0].rtype == QTYPE.SOA
    nx = auth.lookup(f"nope.{D}", 1)
    assert nx is not None and nx.rcode == NXDOMAIN and nx.authority[0].ttl == 30
    assert auth.lookup("example.org", 1) is None
    assert auth.lookup(f"{D.upper()}", 1) is None  # callers fold case first


def test_wildcard_does_not_override_an_existing_name(plan: Plan) -> None:
    zone = plan.dns.zones[0]
    extra = ARecord(f"oauth.apps.{D}", IPv4Address("10.33.3.99"))
    dns = dataclasses.replace(
        plan.dns,
        zones=(dataclasses.replace(zone, records=(*zone.records, extra)), *plan.dns.zones[1:]),
    )
    auth = Authority(dns)
    own = auth.lookup(f"oauth.apps.{D}", 1)
    assert own is not None and str(own.answer[0].rdata) == "10.33.3.99"
    nodata = auth.lookup(f"oauth.apps.{D}", 28)
    assert nodata is not None and nodata.rcode == NOERROR and not nodata.answer
    # Below an existing name the closest encloser is that name: no wildcard there (RFC 4592).
    below = auth.lookup(f"x.oauth.apps.{D}", 1)
    assert below is not None and below.rcode == NXDOMAIN


def test_ptr_and_srv_with_glue(plan: Plan) -> None:
    auth = Authority(plan.dns)
    ptr = auth.lookup("54.3.33.10.in-addr.arpa", 12)
    assert ptr is not None and [str(r.rdata) for r in ptr.answer] == [f"api.{D}.", f"api-int.{D}."]
    srv = auth.lookup(f"_etcd-server-ssl._tcp.{D}", 33)
    assert srv is not None and len(srv.answer) == 3
    assert sorted(str(r.rdata) for r in srv.additional) == [
        "10.33.3.50",
        "10.33.3.51",
        "10.33.3.52",
    ]
    nx = auth.lookup("99.3.33.10.in-addr.arpa", 12)
    assert nx is not None and nx.rcode == NXDOMAIN


def test_any_is_minimal(plan: Plan) -> None:
    res = Authority(plan.dns).lookup(D, 255)
    assert res is not None and len({r.rtype for r in res.answer}) == 1


# --- engine ----------------------------------------------------------------------------


def test_fast_and_slow_paths_agree(plan: Plan) -> None:
    engine = DnsEngine(plan.dns)
    data = q(f"foo.apps.{D}", edns=1232)
    first = engine.handle(data, "10.33.3.44")
    second = engine.handle(data, "10.33.3.44")
    assert first == second
    assert engine.counters["slow"] == 1 and engine.counters["fast"] == 1  # cached after once
    assert isinstance(second, Reply)
    reply = DNSRecord.parse(second.data)
    assert [r.rtype for r in reply.ar] == [QTYPE.OPT] and reply.ar[0].rclass == 1232


def test_foreign_names_refused_without_upstream_or_permission(plan: Plan) -> None:
    engine = DnsEngine(plan.dns)
    assert answer(engine, q("example.org")).header.rcode == 5
    upstream = dataclasses.replace(plan.dns, upstreams=(parse_endpoint("192.0.2.53:53"),))
    engine = DnsEngine(upstream)
    assert isinstance(engine.handle(q("example.org"), "10.33.3.44"), Forward)
    assert isinstance(engine.handle(q("example.org"), "127.0.0.1"), Forward)
    refused = answer(engine, q("example.org"), client="198.51.100.7")
    assert refused.header.rcode == 5 and refused.header.ra == 0
    assert answer(engine, q(f"api.{D}"), client="10.33.3.44").header.ra == 1
    assert answer(engine, q(f"api.{D}"), client="198.51.100.7").header.ra == 0


def test_refusals_and_errors(plan: Plan) -> None:
    engine = DnsEngine(plan.dns)
    assert answer(engine, q(D, "AXFR")).header.rcode == 5
    notify = DNSRecord(DNSHeader(id=1, opcode=4), q=DNSQuestion(D))
    assert answer(engine, bytes(notify.pack())).header.rcode == 4  # NOTIMP
    response = DNSRecord(DNSHeader(id=1, qr=1), q=DNSQuestion(D))
    assert engine.handle(bytes(response.pack()), "10.33.3.44") is None
    assert engine.handle(b"\x01", "10.33.3.44") is None
    garbage = engine.handle(b"\x12\x34\x01\x00" + b"\xff" * 30, "10.33.3.44")
    assert isinstance(garbage, Reply) and garbage.data[3] & 0x0F == 1  # FORMERR
    chaos = DNSRecord(DNSHeader(id=1), q=DNSQuestion("version.bind", QTYPE.TXT, 3))
    assert answer(engine, bytes(chaos.pack())).header.rcode == 5  # REFUSED: not our class
    two = DNSRecord(DNSHeader(id=1), questions=[DNSQuestion(D), DNSQuestion(f"api.{D}")])
    assert answer(engine, bytes(two.pack()), "x").header.rcode == 1
    assert engine.counters["malformed"] >= 2 and engine.counters["responses_dropped"] == 1


def test_badvers(plan: Plan) -> None:
    record = DNSRecord(DNSHeader(id=9), q=DNSQuestion(f"api.{D}"))
    record.add_ar(EDNS0(version=1))
    reply = answer(DnsEngine(plan.dns), bytes(record.pack()))
    assert reply.ar[0].ttl >> 24 == 1  # extended rcode 1 -> BADVERS (16)


def test_udp_truncation_and_tcp(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["network"]["subnet"] = "10.33.0.0/16"
    dgxpod_raw["nodes"] += [
        {
            "name": f"master-{i}",
            "role": "master",
            "mac": f"52:54:00:00:10:{i:02x}",
            "ip": f"10.33.4.{i}",
        }
        for i in range(3, 40)
    ]
    engine = DnsEngine(build_plan(parse_inventory(dgxpod_raw, "x.yaml", CONFIG)).dns)
    srv = f"_etcd-server-ssl._tcp.{D}"
    small = answer(engine, q(srv, "SRV"))
    assert small.header.tc == 1 and not small.rr
    edns_small = answer(engine, q(srv, "SRV", edns=512))
    assert edns_small.header.tc == 1 and edns_small.ar[0].rtype == QTYPE.OPT
    # A client's big buffer is honoured up to ours (1232): no fragmented datagrams.
    big = answer(engine, q(srv, "SRV", edns=65000))
    assert big.header.tc == 1
    over_tcp = answer(engine, q(srv, "SRV"), tcp=True)
    assert over_tcp.header.tc == 0 and len(over_tcp.rr) == 40


def test_template_memory_is_bounded(plan: Plan, monkeypatch: pytest.MonkeyPatch) -> None:
    import services.dns.engine as engine_mod

    monkeypatch.setattr(engine_mod, "TEMPLATE_LIMIT", 50)
    engine = DnsEngine(plan.dns)
    static = len(engine._static)
    for i in range(500):
        engine.handle(q(f"n{i}.apps.{D}"), "10.33.3.44")
    assert len(engine._templates) <= static + 50
    assert answer(engine, q(f"api.{D}")).rr  # the zone's own answers stay


# --- forwarding cache ------------------------------------------------------------------


def _upstream_reply(name: str, rcode: int = 0, ttl: int = 300) -> DNSRecord:
    r = DNSRecord(DNSHeader(id=1, qr=1, ra=1, rcode=rcode), q=DNSQuestion(name))
    if rcode == 0:
        r.add_answer(RR(name, QTYPE.A, rdata=A("192.0.2.10"), ttl=ttl))
    else:
        soa = SOA("ns.example.org", "h.example.org", (1, 2, 3, 4, 60))
        r.add_auth(RR("example.org", QTYPE.SOA, rdata=soa, ttl=900))
    return r


def test_cache_ttl_and_age() -> None:
    cache = ForwardCache()
    key = ("example.org", 1, 1)
    cache.put(key, _upstream_reply("example.org"), now=100.0)
    hit = cache.get(key, now=130.5)
    assert hit is not None
    record, age = hit
    assert age == 30
    reply = DNSRecord.parse(cache_reply(q("Example.org", qid=77), record, age))
    assert reply.header.id == 77 and reply.rr[0].ttl == 270 and reply.header.ra == 1
    assert cache.get(key, now=400.0) is None  # expired
    neg = ("nope.example.org", 1, 1)
    cache.put(neg, _upstream_reply("nope.example.org", rcode=3), now=0.0)
    assert cache.ttl_of(_upstream_reply("x", rcode=3)) == 60  # the SOA minimum
    assert cache.get(neg, now=59.0) is not None and cache.get(neg, now=61.0) is None
    servfail = DNSRecord(DNSHeader(id=1, qr=1, rcode=2), q=DNSQuestion("x"))
    assert cache.ttl_of(servfail) is None


def test_cache_is_bounded() -> None:
    cache = ForwardCache(max_entries=10)
    for i in range(50):
        cache.put((f"n{i}.example.org", 1, 1), _upstream_reply(f"n{i}.example.org"), now=0.0)
    assert len(cache) == 10 and cache.get(("n49.example.org", 1, 1), now=1.0) is not None


def test_upstream_failover_order() -> None:
    a, b = parse_endpoint("192.0.2.1:53"), parse_endpoint("192.0.2.2:53")
    picker = UpstreamPicker((a, b), penalty=30)
    assert picker.order(0) == [a, b]
    picker.failed(a, 10)
    assert picker.order(20) == [b, a]
    assert picker.order(41) == [a, b]  # the penalty ends
    picker.failed(a, 50)
    picker.succeeded(a)
    assert picker.order(51) == [a, b]


def test_patch_reply_do_bit(plan: Plan) -> None:
    engine = DnsEngine(plan.dns)
    record = DNSRecord(DNSHeader(id=5, rd=1), q=DNSQuestion(f"api.{D}"))
    record.add_ar(EDNS0(udp_len=1232, flags="do"))
    data = bytes(record.pack())
    reply = answer(engine, data)
    assert reply.ar[0].ttl & 0x8000  # DO copied
    query = parse_query(data)
    assert query is not None and query.do
    template = engine._templates[query.key(data)]
    assert patch_reply(template, data, query, ra=False)[3] & 0x80 == 0
