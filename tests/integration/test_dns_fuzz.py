"""Property tests of the DNS core: whatever bytes arrive, DnsEngine.handle answers sanely.

Random bytes, valid queries with mutations (flipped bytes, cut, extended, lying
section counts, odd flags) and valid queries for names with any bytes in their
labels. The engine must never raise; a reply must be a response to the packet
(QR set, the ID echoed, parseable by an independent decoder, the question echoed
byte for byte) and fit the client's UDP size; a forward must carry the query as is.
"""

from __future__ import annotations

import copy
import struct
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance.inventory import parse_inventory
from appliance.plan import build_plan
from services.dns.engine import DnsEngine, Forward, Reply
from services.dns.wire import parse_query
from tests.helpers import CONFIG, dgxpod_data

D = "dgxpod.nvidia.com"
RAW: dict[str, Any] = dgxpod_data()


def _engine(**network: Any) -> DnsEngine:
    raw = copy.deepcopy(RAW)
    raw["network"].update(network)
    return DnsEngine(build_plan(parse_inventory(raw, "dgxpod.yaml", CONFIG)).dns)


FORWARDING = _engine(upstream_dns=["192.0.2.53"])  # loopback and the subnet may recurse
AUTHORITATIVE = _engine()  # no upstream: foreign names are refused
ENGINES = st.sampled_from([FORWARDING, AUTHORITATIVE])
CLIENTS = st.sampled_from(["127.0.0.1", "10.33.3.44", "192.0.2.99", "::1", "not-an-ip"])

NAMES = [
    D,
    f"api.{D}",
    f"api-int.{D}",
    f"master-0.{D}",
    f"worker-1.{D}",
    f"etcd-2.{D}",
    f"ns.{D}",
    f"_etcd-server-ssl._tcp.{D}",
    f"_tcp.{D}",
    f"apps.{D}",
    f"*.apps.{D}",
    f"console.apps.{D}",
    f"a.b.apps.{D}",
    f"nope.{D}",
    "3.33.10.in-addr.arpa",
    "50.3.33.10.in-addr.arpa",
    "54.3.33.10.in-addr.arpa",
    "99.3.33.10.in-addr.arpa",
    "example.org",
    ".",
]
TYPES = ["A", "AAAA", "SRV", "PTR", "SOA", "NS", "ANY", "TXT", "AXFR", "IXFR", "OPT", "TYPE0"]

PLAIN = set(b"abcdefghijklmnopqrstuvwxyz0123456789-_*")


def fuzz(examples: int) -> settings:
    """Bounded: a fixed number of examples, no per-example deadline, no example database."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


def _udp_limit(query: bytes) -> int:
    """What the client can take over UDP: 512, or its EDNS size up to our 1232."""
    try:
        msg = dns.message.from_wire(query)
    except (dns.exception.DNSException, ValueError, IndexError, KeyError):
        return 1232
    return 512 if msg.edns < 0 else min(max(512, msg.payload), 1232)


def _question_end(data: bytes) -> int | None:
    """Where an uncompressed question section of one question ends, if it does."""
    pos = 12
    while pos < len(data) and 0 < data[pos] < 64:
        pos += data[pos] + 1
    if pos >= len(data) or data[pos] != 0 or pos + 5 > len(data):
        return None
    return pos + 5


def check(engine: DnsEngine, data: bytes, client: str, tcp: bool) -> Reply | Forward | None:
    decision = engine.handle(data, client, tcp=tcp)
    if decision is None:
        return None
    if isinstance(decision, Forward):
        assert decision.data == data
        assert parse_query(data) is not None  # the plain shape the forwarder can match
        assert decision.udp_size <= 1232 and (decision.edns or decision.udp_size == 512)
        return decision
    assert isinstance(decision, Reply)
    out = decision.data
    assert len(out) >= 12 and out[:2] == data[:2]  # the client's ID
    assert out[2] & 0x80  # QR: a response, never a query
    assert not data[2] & 0x80  # and never a response to a response
    assert tcp or len(out) <= _udp_limit(data)
    reply = dns.message.from_wire(out, ignore_trailing=False)
    if reply.question and reply.opcode() == dns.opcode.QUERY:
        end = _question_end(data)
        if end is not None and struct.unpack_from("!H", data, 4)[0] == 1:
            assert out[12:end] == data[12:end]  # the question, its case and bytes kept
    return decision


# --- random bytes ---------------------------------------------------------------------


@fuzz(1500)
@given(data=st.binary(max_size=600), engine=ENGINES, client=CLIENTS, tcp=st.booleans())
def test_random_bytes(data: bytes, engine: DnsEngine, client: str, tcp: bool) -> None:
    check(engine, data, client, tcp)


@fuzz(1000)
@given(
    body=st.binary(max_size=300),
    qd=st.integers(0, 3),
    ar=st.integers(0, 2),
    engine=ENGINES,
    tcp=st.booleans(),
)
def test_random_bytes_behind_a_plausible_header(
    body: bytes, qd: int, ar: int, engine: DnsEngine, tcp: bool
) -> None:
    check(engine, struct.pack("!HHHHHH", 0x4242, 0x0100, qd, 0, 0, ar) + body, "127.0.0.1", tcp)


# --- mutated valid queries ----------------------------------------------------------------


@st.composite
def valid_queries(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES))
    mixed = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    rdtype = draw(st.sampled_from(TYPES))
    edns = draw(st.sampled_from([-1, 0, 0, 1]))
    kwargs: dict[str, Any] = {"use_edns": edns}
    if edns >= 0:
        kwargs["payload"] = draw(st.sampled_from([0, 511, 512, 1232, 4096, 65535]))
        kwargs["want_dnssec"] = draw(st.booleans())
    q = dns.message.make_query(mixed, rdtype, **kwargs)
    q.id = draw(st.integers(0, 65535))
    if draw(st.booleans()):
        q.flags |= dns.flags.CD
    return q.to_wire()


MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 200), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 200)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("count"), st.integers(0, 3), st.sampled_from([0, 1, 2, 255, 65535])),
    st.tuples(st.just("flags"), st.integers(0, 65535)),
    st.tuples(st.just("insert"), st.integers(0, 200), st.binary(min_size=1, max_size=8)),
)


def mutate(data: bytes, mutation: tuple[Any, ...]) -> bytes:
    out = bytearray(data)
    kind = mutation[0]
    if kind == "flip" and out:
        out[mutation[1] % len(out)] = mutation[2]
    elif kind == "cut":
        del out[mutation[1] % (len(out) + 1) :]
    elif kind == "extend":
        out += mutation[1]
    elif kind == "count" and len(out) >= 12:
        struct.pack_into("!H", out, 4 + 2 * mutation[1], mutation[2])
    elif kind == "flags" and len(out) >= 4:
        struct.pack_into("!H", out, 2, mutation[1])
    elif kind == "insert":
        pos = mutation[1] % (len(out) + 1)
        out[pos:pos] = mutation[2]
    return bytes(out)


@fuzz(2500)
@given(
    query=valid_queries(),
    mutations=st.lists(MUTATIONS, max_size=4),
    engine=ENGINES,
    client=CLIENTS,
    tcp=st.booleans(),
)
def test_mutated_queries(
    query: bytes, mutations: list[tuple[Any, ...]], engine: DnsEngine, client: str, tcp: bool
) -> None:
    data = query
    for mutation in mutations:
        data = mutate(data, mutation)
    decision = check(engine, data, client, tcp)
    if not mutations:  # an untouched query is always answered or forwarded
        assert decision is not None


# --- any bytes in the labels ----------------------------------------------------------------


@fuzz(1500)
@given(
    labels=st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=3),
    suffix=st.sampled_from([D, f"apps.{D}", "3.33.10.in-addr.arpa", "example.org"]),
    rdtype=st.sampled_from(["A", "AAAA", "PTR", "ANY"]),
    edns=st.sampled_from([-1, 0]),
    engine=ENGINES,
    tcp=st.booleans(),
)
@example([b"x", b"*"], f"apps.{D}", "A", 0, AUTHORITATIVE, False)  # below *.apps: NXDOMAIN
@example([b"*", b"x"], f"apps.{D}", "A", -1, FORWARDING, False)  # *.x.apps: synthesized
@example([b"*"], f"apps.{D}", "ANY", 0, AUTHORITATIVE, True)  # the wildcard's own name
def test_names_with_any_bytes(
    labels: list[bytes], suffix: str, rdtype: str, edns: int, engine: DnsEngine, tcp: bool
) -> None:
    name = dns.name.Name([*labels, *dns.name.from_text(suffix).labels])
    data = dns.message.make_query(name, rdtype, use_edns=edns).to_wire()
    decision = check(engine, data, "127.0.0.1", tcp)
    assert decision is not None
    if isinstance(decision, Forward):
        assert suffix == "example.org" and engine is FORWARDING
        return
    reply = dns.message.from_wire(decision.data)
    if reply.rcode() == dns.rcode.FORMERR:
        return  # dnslib takes only UTF-8 labels: a query it cannot read gets FORMERR
    assert reply.question[0].name == name
    if suffix == f"apps.{D}" and rdtype in ("A", "ANY") and len(labels) > 1 and labels[-1] == b"*":
        # Below the wildcard's own node (x.*.apps): "*.apps" is the closest encloser and
        # "*.*.apps" does not exist, so RFC 4592 says NXDOMAIN, not a synthesized answer.
        assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    elif suffix == f"apps.{D}" and rdtype in ("A", "ANY"):
        # Under the wildcard: the answer is synthesized for the name exactly as asked.
        assert reply.rcode() == dns.rcode.NOERROR
        assert [rrset.name for rrset in reply.answer] == [name]
        assert reply.answer[0].name.labels == name.labels
        assert [rd.address for rd in reply.answer[0]] == ["10.33.3.54"]
    elif suffix == "example.org":
        assert reply.rcode() == dns.rcode.REFUSED
    elif any(set(label.lower()) - PLAIN for label in labels):
        # No name in the zones has such a label: NXDOMAIN, or NODATA at most.
        assert not reply.answer and reply.rcode() in (dns.rcode.NXDOMAIN, dns.rcode.NOERROR)
