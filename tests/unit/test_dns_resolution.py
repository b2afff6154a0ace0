"""The forwarder's resolution state machine over bytes and `now`: no sockets, no clock.

Each test plays the upstreams (and the spoofers) by hand: it takes the bytes the core
wants sent, answers with bytes, and moves time by passing `now`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from dnslib import EDNS0, QTYPE, RR, TXT, A, DNSHeader, DNSQuestion, DNSRecord

from appliance.inventory import Endpoint
from services.dns.cache import UpstreamPicker
from services.dns.engine import Forward
from services.dns.rcode import NXDOMAIN, REFUSED, SERVFAIL
from services.dns.resolution import (
    TOTAL_TIMEOUT,
    TRY_TIMEOUT,
    Done,
    Resolution,
    Send,
    client_reply,
)

U1, U2, U3 = Endpoint("127.0.0.2", 53), Endpoint("127.0.0.3", 5353), Endpoint("::1", 53)


def query(
    name: str = "example.org", qtype: str = "A", qid: int = 4242, edns: bool = False
) -> bytes:
    record = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns:
        record.add_ar(EDNS0(udp_len=4096))
    return bytes(record.pack())


def answer_to(sent: bytes, address: str = "192.0.2.10", **flags: int) -> bytes:
    """The honest upstream's reply to the bytes the core sent."""
    reply = DNSRecord.parse(sent).reply()
    reply.add_answer(RR(reply.q.qname, QTYPE.A, rdata=A(address), ttl=300))
    for key, value in flags.items():
        setattr(reply.header, key, value)
    return bytes(reply.pack())


def ids(*values: int) -> Iterator[int]:
    return iter(values)


def start(
    data: bytes | None = None,
    upstreams: tuple[Endpoint, ...] = (U1, U2),
    counters: Counter[str] | None = None,
    new_ids: tuple[int, ...] = (0x1111, 0x2222, 0x3333, 0x4444),
) -> tuple[Resolution, Send | Done]:
    it = iter(new_ids)
    res = Resolution(
        data if data is not None else query(),
        UpstreamPicker(upstreams),
        0.0,
        counters if counters is not None else Counter(),
        new_id=lambda: next(it),
    )
    return res, res.start(0.0)


def src(ep: Endpoint) -> tuple[str, int]:
    return (ep.host, ep.port)


def test_sends_the_query_with_a_fresh_id_and_takes_the_matching_reply() -> None:
    data = query(qid=4242)
    res, act = start(data)
    assert isinstance(act, Send) and act.upstream == U1 and not act.tcp
    assert act.data[:2] == b"\x11\x11" and act.data[2:] == data[2:]  # only the ID is ours
    assert res.get_timer() == TRY_TIMEOUT
    done = res.receive(answer_to(act.data), src(U1), 0.1)
    assert isinstance(done, Done) and done.record is not None
    assert str(done.record.a.rdata) == "192.0.2.10"
    assert res.get_timer() is None
    assert res.receive(answer_to(act.data), src(U1), 0.2) is None  # late duplicate: ignored


def test_spoofed_reply_with_the_right_id_but_another_question_is_dropped() -> None:
    counters: Counter[str] = Counter()
    res, act = start(counters=counters)
    assert isinstance(act, Send)
    spoof = DNSRecord.parse(query("evil.example", qid=0x1111)).reply()
    spoof.add_answer(RR("evil.example", QTYPE.A, rdata=A("192.0.2.66"), ttl=300))
    assert res.receive(bytes(spoof.pack()), src(U1), 0.1) is None
    # Same name, another type: also another question.
    other = answer_to(query(qtype="MX", qid=0x1111))
    assert res.receive(other, src(U1), 0.1) is None
    assert counters["upstream_mismatched"] == 2
    done = res.receive(answer_to(act.data), src(U1), 0.2)  # the real one still gets in
    assert isinstance(done, Done) and done.record is not None
    assert str(done.record.a.rdata) == "192.0.2.10"


def test_reply_with_another_id_or_an_echo_of_the_query_is_dropped() -> None:
    counters: Counter[str] = Counter()
    res, act = start(counters=counters)
    assert isinstance(act, Send)
    wrong_id = b"\x99\x99" + answer_to(act.data)[2:]
    assert res.receive(wrong_id, src(U1), 0.1) is None
    assert res.receive(act.data, src(U1), 0.1) is None  # our query echoed: QR=0
    assert res.receive(b"\x11\x11\x81", src(U1), 0.1) is None  # shorter than a header
    assert counters["upstream_mismatched"] == 3
    assert res.get_timer() == TRY_TIMEOUT  # still waiting for the real one


def test_reply_from_an_address_that_is_not_the_upstream_is_dropped() -> None:
    counters: Counter[str] = Counter()
    res, act = start(counters=counters)
    assert isinstance(act, Send)
    good = answer_to(act.data)
    assert res.receive(good, ("192.0.2.99", 53), 0.1) is None
    assert res.receive(good, (U1.host, 5353), 0.1) is None  # right host, wrong port
    assert res.receive(good, src(U2), 0.1) is None  # another upstream, not asked now
    assert counters["upstream_wrong_source"] == 3
    assert isinstance(res.receive(good, src(U1), 0.2), Done)


def test_ipv6_source_compares_as_an_address() -> None:
    res, act = start(upstreams=(U3,))
    assert isinstance(act, Send)
    assert isinstance(res.receive(answer_to(act.data), ("0:0::1", 53, 0, 0), 0.1), Done)


def test_tc_over_udp_asks_the_same_upstream_over_tcp() -> None:
    counters: Counter[str] = Counter()
    res, act = start(counters=counters)
    assert isinstance(act, Send)
    again = res.receive(answer_to(act.data, tc=1), src(U1), 0.5)
    assert isinstance(again, Send) and again.tcp and again.upstream == U1
    assert again.data == act.data
    assert counters["upstream_tcp"] == 1
    assert res.get_timer() == 0.5 + TRY_TIMEOUT
    # A UDP datagram now (a late copy) is not the TCP answer.
    assert res.receive(answer_to(act.data), src(U1), 0.6, tcp=False) is None
    done = res.receive(answer_to(act.data), src(U1), 0.7, tcp=True)
    assert isinstance(done, Done) and done.record is not None


def test_tcp_reply_that_is_not_the_response_fails_the_upstream() -> None:
    counters: Counter[str] = Counter()
    res, act = start(counters=counters)
    assert isinstance(act, Send)
    tcp = res.receive(answer_to(act.data, tc=1), src(U1), 0.1)
    assert isinstance(tcp, Send) and tcp.tcp
    nxt = res.receive(tcp.data, src(U1), 0.2, tcp=True)  # the query echoed over TCP
    assert isinstance(nxt, Send) and nxt.upstream == U2 and not nxt.tcp
    assert nxt.data[:2] == b"\x22\x22"  # a fresh ID for the next upstream
    assert counters["upstream_mismatched"] == 1 and counters["upstream_failures"] == 1


def test_cut_reply_fails_over_to_the_next_upstream() -> None:
    counters: Counter[str] = Counter()
    res, act = start(counters=counters)
    assert isinstance(act, Send)
    whole = answer_to(act.data)
    nxt = res.receive(whole[:-3], src(U1), 0.1)  # header and question fine, answer cut
    assert isinstance(nxt, Send) and nxt.upstream == U2
    assert counters["upstream_failures"] == 1
    done = res.receive(answer_to(nxt.data), src(U2), 0.2)
    assert isinstance(done, Done) and done.record is not None


@pytest.mark.parametrize("rcode", [SERVFAIL, REFUSED])
def test_servfail_or_refused_upstream_fails_over(rcode: int) -> None:
    picker = UpstreamPicker((U1, U2))
    it = ids(1, 2)
    res = Resolution(query(), picker, 0.0, Counter(), new_id=lambda: next(it))
    act = res.start(0.0)
    assert isinstance(act, Send)
    nxt = res.receive(answer_to(act.data, rcode=rcode), src(U1), 0.1)
    assert isinstance(nxt, Send) and nxt.upstream == U2
    assert picker.order(0.2) == [U2, U1]  # the failed one goes last next time
    done = res.receive(answer_to(nxt.data, rcode=NXDOMAIN), src(U2), 0.2)
    assert isinstance(done, Done) and done.record is not None  # NXDOMAIN is an answer


def test_socket_error_fails_over() -> None:
    res, act = start()
    assert isinstance(act, Send)
    nxt = res.failed(0.1)  # e.g. ICMP port unreachable
    assert isinstance(nxt, Send) and nxt.upstream == U2
    done = res.failed(0.2)
    assert isinstance(done, Done) and done.record is None


def test_all_upstreams_time_out_servfail_within_the_bound() -> None:
    counters: Counter[str] = Counter()
    res, first = start(upstreams=(U1, U2, U3), counters=counters)
    assert isinstance(first, Send) and first.upstream == U1
    assert res.handle_timer(TRY_TIMEOUT - 0.01) is None  # a timer a tick early: not yet
    when = res.get_timer()
    assert when == TRY_TIMEOUT
    act = res.handle_timer(when)
    assert isinstance(act, Send) and act.upstream == U2
    when = res.get_timer()
    assert when == 2 * TRY_TIMEOUT
    act = res.handle_timer(when)
    assert isinstance(act, Send) and act.upstream == U3
    when = res.get_timer()
    assert when == TOTAL_TIMEOUT  # the last try gets only what is left of the total
    done = res.handle_timer(when)
    assert isinstance(done, Done) and done.record is None
    assert res.get_timer() is None and counters["upstream_failures"] == 3
    # The client gets SERVFAIL for its own question and ID.
    fwd = Forward(query(qid=4242), ("example.org", 1, 1), False, 512)
    out = DNSRecord.parse(client_reply(fwd, None, 0, False, counters))
    assert out.header.id == 4242 and out.header.rcode == SERVFAIL and out.header.ra
    assert str(out.q.qname) == "example.org." and counters["servfail"] == 1


def test_a_late_timer_past_the_total_ends_without_another_try() -> None:
    res, act = start(upstreams=(U1, U2, U3))
    assert isinstance(act, Send)
    done = res.handle_timer(TOTAL_TIMEOUT + 5)  # the loop was stalled: no time left
    assert isinstance(done, Done) and done.record is None


def test_no_upstreams_is_servfail_at_once() -> None:
    res, act = start(upstreams=())
    assert isinstance(act, Done) and act.record is None and res.get_timer() is None


def test_client_reply_truncates_with_the_engines_truncation() -> None:
    counters: Counter[str] = Counter()
    data = query("big.example.org", "TXT", qid=7, edns=True)
    record = DNSRecord.parse(data).reply()
    for i in range(30):
        record.add_answer(RR("big.example.org", QTYPE.TXT, rdata=TXT("x" * 60 + str(i)), ttl=60))
    fwd = Forward(data, ("big.example.org", 16, 1), True, 1232)
    whole = client_reply(fwd, record, 0, True, counters)
    assert len(DNSRecord.parse(whole).rr) == 30 and counters["truncated"] == 0
    cut = client_reply(fwd, record, 0, False, counters)
    out = DNSRecord.parse(cut)
    assert out.header.tc and out.header.id == 7 and not out.rr
    assert str(out.q.qname) == "big.example.org." and out.ar[0].rtype == QTYPE.OPT
    assert counters["truncated"] == 1
