"""Hostile and non-conforming input to the DNS core (issue 14): no sockets.

Opcodes other than QUERY, classes other than IN, FORMERR with EDNS, malformed
COOKIE options, responses sent to us, reflector source ports, and the TCP slot
table (per-client cap and idle timeout that shrink under pressure).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord, EDNSOption

from appliance.inventory import InventoryError, parse_inventory
from appliance.plan import build_plan
from services.dns.engine import DnsEngine, Reply, unsafe_source
from services.dns.tcpslots import TcpLimits, TcpSlots, client_key
from services.dns.wire import has_opt, parse_query
from tests.helpers import CONFIG

D = "dgxpod.nvidia.com"
COOKIE = 10
CLIENT = "10.33.3.44"


@pytest.fixture
def engine(dgxpod_raw: dict[str, Any]) -> DnsEngine:
    return DnsEngine(build_plan(parse_inventory(dgxpod_raw, "x.yaml", CONFIG)).dns)


def query(
    name: str = f"api.{D}",
    qtype: int = QTYPE.A,
    qclass: int = 1,
    *,
    opcode: int = 0,
    edns: bool = False,
    options: list[EDNSOption] | None = None,
    qid: int = 0x4242,
) -> bytes:
    record = DNSRecord(DNSHeader(id=qid, rd=1, opcode=opcode), q=DNSQuestion(name, qtype, qclass))
    if edns or options:
        record.add_ar(EDNS0(udp_len=1232, opts=options or []))
    return bytes(record.pack())


def reply_of(engine: DnsEngine, data: bytes, tcp: bool = False) -> DNSRecord:
    decision = engine.handle(data, CLIENT, tcp=tcp)
    assert isinstance(decision, Reply), decision
    return DNSRecord.parse(decision.data)


def opt_of(record: DNSRecord) -> list[Any]:
    return [rr for rr in record.ar if rr.rtype == QTYPE.OPT]


# --- opcodes ---------------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [1, 2, 4, 5, 6, 15])
@pytest.mark.parametrize("edns", [False, True])
def test_other_opcodes_get_notimp_with_their_opcode(
    engine: DnsEngine, opcode: int, edns: bool
) -> None:
    reply = reply_of(engine, query(D, QTYPE.SOA, opcode=opcode, edns=edns))
    assert reply.header.qr == 1 and reply.header.rcode == 4  # NOTIMP
    assert reply.header.opcode == opcode  # else clients (dnspython, dig) reject it
    assert len(opt_of(reply)) == int(edns)


def test_other_opcode_with_an_unreadable_body(engine: DnsEngine) -> None:
    data = struct.pack("!HHHHHH", 7, 0x7800, 1, 0, 0, 0) + b"\xff" * 20
    decision = engine.handle(data, CLIENT)
    assert isinstance(decision, Reply)
    assert decision.data[:2] == b"\x00\x07" and decision.data[2] & 0xF8 == 0xF8  # QR, opcode 15
    assert decision.data[3] & 15 == 4


# --- classes ---------------------------------------------------------------------------


@pytest.mark.parametrize("qclass", [3, 4, 254, 42])  # CH, HS, NONE, unassigned
@pytest.mark.parametrize("edns", [False, True])
def test_other_classes_are_refused(engine: DnsEngine, qclass: int, edns: bool) -> None:
    reply = reply_of(engine, query("version.bind", QTYPE.TXT, qclass, edns=edns))
    assert reply.header.rcode == 5  # REFUSED, not FORMERR: the query is well formed
    assert reply.q.qclass == qclass and str(reply.q.qname) == "version.bind."
    assert len(opt_of(reply)) == int(edns)
    own = reply_of(engine, query(f"api.{D}", QTYPE.A, qclass))
    assert own.header.rcode == 5 and not own.rr


# --- FORMERR keeps EDNS ------------------------------------------------------------------


def test_formerr_to_an_edns_query_carries_opt(engine: DnsEngine) -> None:
    two = DNSRecord(DNSHeader(id=9), questions=[DNSQuestion(D), DNSQuestion(f"api.{D}")])
    two.add_ar(EDNS0(udp_len=1232))
    lying = bytearray(query(edns=True))
    lying[6:8] = b"\x00\x02"  # ANCOUNT 2, no answers there
    for data in (bytes(two.pack()), bytes(lying)):
        reply = reply_of(engine, data)
        assert reply.header.rcode == 1 and reply.header.id == struct.unpack("!H", data[:2])[0]
        assert len(opt_of(reply)) == 1, "RFC 6891 7: FORMERR without OPT means 'no EDNS here'"
    # Without EDNS in the query: none in the reply.
    two_plain = DNSRecord(DNSHeader(id=9), questions=[DNSQuestion(D), DNSQuestion(f"api.{D}")])
    assert not opt_of(reply_of(engine, bytes(two_plain.pack())))


def test_formerr_for_a_broken_option_still_carries_opt(engine: DnsEngine) -> None:
    data = bytearray(query(edns=True))
    # OPT rdata: one option whose length runs past the record.
    data[-2:] = b"\x00\x06"
    data += b"\x00\x0a\x00\x08\x01\x02"
    reply = reply_of(engine, bytes(data))
    assert reply.header.rcode == 1 and len(opt_of(reply)) == 1


def test_has_opt() -> None:
    assert has_opt(query(edns=True)) and not has_opt(query())
    assert not has_opt(b"\x00" * 11) and not has_opt(b"\x00\x01" + b"\xff" * 40)


# --- COOKIE (RFC 7873 5.2.2) -------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, 9, 15, 41])
def test_malformed_cookie_is_formerr(engine: DnsEngine, size: int) -> None:
    data = query(options=[EDNSOption(COOKIE, b"\x01" * size)])
    for tcp in (False, True):
        reply = reply_of(engine, data, tcp)
        assert reply.header.rcode == 1, size  # FORMERR
        assert len(opt_of(reply)) == 1
    assert parse_query(data) is None  # the fast path leaves it to the slow path


@pytest.mark.parametrize("size", [8, 16, 40])
def test_good_cookie_is_answered_on_the_fast_path(engine: DnsEngine, size: int) -> None:
    data = query(options=[EDNSOption(COOKIE, b"\x01" * size)])
    assert parse_query(data) is not None
    reply = reply_of(engine, data)
    assert reply.header.rcode == 0 and str(reply.rr[0].rdata) == "10.33.3.54"
    assert engine.counters["fast"] == 1


def test_two_cookies_are_formerr(engine: DnsEngine) -> None:
    data = query(options=[EDNSOption(COOKIE, b"\x01" * 8), EDNSOption(COOKIE, b"\x02" * 8)])
    assert parse_query(data) is None
    assert reply_of(engine, data).header.rcode == 1


def test_other_options_pass(engine: DnsEngine) -> None:
    data = query(options=[EDNSOption(12, b"\x00" * 30), EDNSOption(8, b"\x00\x01\x18\x00\x0a")])
    assert parse_query(data) is not None
    assert reply_of(engine, data).header.rcode == 0


# --- responses and reflectors ----------------------------------------------------------


def test_responses_are_dropped_before_parsing(engine: DnsEngine) -> None:
    response = bytearray(query())
    response[2] |= 0x80
    for data in (
        bytes(response),
        b"\x00\x01\x80" + b"\xff" * 30,
        b"\x00\x01\x84\x00" + b"\x00" * 8,
    ):
        for tcp in (False, True):
            assert engine.handle(data, CLIENT, tcp=tcp) is None
    assert engine.counters["responses_dropped"] == 6
    assert engine.counters["dropped"] == 6 and engine.counters["slow"] == 0


def test_short_packets_are_dropped(engine: DnsEngine) -> None:
    for data in (b"", b"\x01", b"\x00" * 11):
        assert engine.handle(data, CLIENT) is None
    assert engine.counters["dropped"] == 3


@pytest.mark.parametrize("port", [0, 7, 13, 19, 37])
def test_reflector_ports_are_unsafe(port: int) -> None:
    assert unsafe_source(port)


@pytest.mark.parametrize("port", [53, 1024, 5353, 33333, 65535])
def test_client_ports_are_safe(port: int) -> None:
    assert not unsafe_source(port)


# --- TCP slots ---------------------------------------------------------------------------

LIMITS = TcpLimits(total=16, per_client=8, per_client_min=2, idle=10.0, idle_min=1.0)


def test_client_key() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:3::9") == client_key("2001:db8:1:2:ffff::1")  # one /64
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")


def test_per_client_cap() -> None:
    slots = TcpSlots(LIMITS)
    for i in range(8):
        assert slots.open(("a", i), "192.0.2.1", 0.0).ok
    refused = slots.open(("a", 8), "192.0.2.1", 0.0)
    assert not refused.ok and refused.reason == "client"
    assert slots.open(("b", 0), "192.0.2.2", 0.0).ok  # another client is not held up
    slots.close(("a", 0))
    assert slots.open(("a", 9), "192.0.2.1", 0.0).ok
    assert len(slots) == 9


def test_cap_and_idle_timeout_shrink_under_pressure() -> None:
    slots = TcpSlots(LIMITS)
    assert slots.client_cap() == 8 and slots.idle_timeout() == 10.0
    for i in range(8):
        slots.open(("a", i), "192.0.2.1", 0.0)
    assert slots.client_cap() == 8 and slots.idle_timeout() == 10.0  # half full: no pressure
    for i in range(4):
        slots.open(("b", i), "192.0.2.2", 0.0)
    assert 2 < slots.client_cap() < 8 and 1.0 < slots.idle_timeout() < 10.0
    for i in range(4):
        slots.open(("c", i), f"192.0.2.{10 + i}", 0.0)
    assert len(slots) == 16 and slots.client_cap() == 2 and slots.idle_timeout() == 1.0
    assert slots.deadline() == 1.0
    assert len(slots.expired(0.5)) == 0 and len(slots.expired(1.0)) == 16


def test_idle_deadline_follows_activity() -> None:
    slots = TcpSlots(LIMITS)
    slots.open("x", "192.0.2.1", 0.0)
    slots.open("y", "192.0.2.1", 0.0)
    assert slots.deadline() == 10.0
    slots.busy("x", 5.0)  # answering: not idle, not due
    assert slots.deadline() == 10.0
    assert slots.expired(10.0) == ["y"]
    assert slots.deadline() is None
    slots.idle("x", 7.0)
    assert slots.deadline() == 17.0 and slots.expired(16.9) == []
    slots.close("x")
    assert slots.deadline() is None and len(slots) == 0


def test_full_table_evicts_the_longest_idle_of_the_biggest_holder() -> None:
    slots = TcpSlots(TcpLimits(total=8, per_client=8, per_client_min=8, idle=10.0, idle_min=1.0))
    for i in range(6):
        slots.open(("a", i), "192.0.2.1", float(i))
    slots.open(("b", 0), "192.0.2.2", 0.0)
    slots.open(("c", 0), "192.0.2.3", 0.0)
    slots.busy(("a", 0), 6.0)  # mid-answer: never evicted
    admit = slots.open(("d", 0), "192.0.2.4", 7.0)
    assert admit.ok and admit.evict == [("a", 1)]
    assert len(slots) == 8


def test_full_table_of_busy_connections_refuses() -> None:
    slots = TcpSlots(TcpLimits(total=2, per_client=2, per_client_min=2, idle=10.0, idle_min=1.0))
    for i in range(2):
        slots.open(i, "192.0.2.1", 0.0)
        slots.busy(i, 0.0)
    admit = slots.open(2, "192.0.2.2", 0.0)
    assert not admit.ok and admit.reason == "full" and not admit.evict


# --- an upstream that is ourselves ---------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "upstream", "loops"),
    [
        ("127.0.0.1:5353", "127.0.0.1:5353", True),
        ("127.0.0.1:5353", "127.0.0.2:5353", False),  # another socket
        ("127.0.0.1:5353", "127.0.0.1:53", False),
        ("0.0.0.0:53", "127.0.0.53", True),  # the wildcard is every local address
        ("0.0.0.0:53", "10.33.3.18", True),  # network.address
        ("0.0.0.0:53", "10.33.3.54:53", True),  # load_balancer.address
        ("0.0.0.0:53", "192.0.2.53", False),
        ("10.33.3.18:53", "127.0.0.1", False),
    ],
)
def test_upstream_that_is_our_own_listener_is_refused(
    dgxpod_raw: dict[str, Any], listen: str, upstream: str, loops: bool
) -> None:
    dgxpod_raw["listen"] = {"dns": listen}
    dgxpod_raw["network"]["upstream_dns"] = ["192.0.2.1", upstream]
    if not loops:
        parse_inventory(dgxpod_raw, "x.yaml", CONFIG)
        return
    with pytest.raises(InventoryError) as err:
        parse_inventory(dgxpod_raw, "x.yaml", CONFIG)
    (line,) = err.value.lines()
    assert line.startswith("x.yaml: network.upstream_dns[1]: ") and "would loop" in line


def test_messages_without_an_answer_keep_no_one_alive() -> None:
    slots = TcpSlots(LIMITS)
    slots.open("junk", "192.0.2.1", 0.0)
    slots.open("good", "192.0.2.2", 1.0)
    since = slots.busy("junk", 5.0)  # a response or garbage: dropped, no answer
    slots.idle("junk", since)
    assert since == 0.0 and slots.deadline() == 10.0
    assert slots.expired(10.0) == ["junk"]
    slots.busy("good", 2.0)
    slots.idle("good", 2.0)  # answered: idle from then
    assert slots.deadline() == 12.0


@pytest.mark.parametrize("qtype", ["A", "HTTPS", "SVCB", "CAA", "TYPE90", "AAAA", "TXT"])
def test_a_reply_to_any_query_type_matches_its_question(qtype: str) -> None:
    """Types 65-90 have a capital ASCII letter as their low byte: lower-casing the whole
    question made every HTTPS (65) answer look like a reply to another question."""
    from dnslib import DNSRecord

    from services.dns.resolution import question_bytes, same_question

    query = DNSRecord.question("Example.ORG", qtype).pack()
    reply = DNSRecord.parse(query).reply().pack()
    assert same_question(reply, question_bytes(query))
    other = DNSRecord.question("example.org", "MX").pack()
    assert not same_question(DNSRecord.parse(other).reply().pack(), question_bytes(query))


def test_refused_never_raises_on_what_dnslib_cannot_parse(engine: DnsEngine) -> None:
    """The forward-loop answer runs outside the handler's try: it must not raise."""
    data = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03or"  # cut short
    out = engine.refused(data)
    assert out[:2] == b"\x12\x34" and out[3] & 15 == 5 and out[2] & 0x80
