"""The DNS core: a query's bytes in, a decision out (sans-IO).

`DnsEngine.handle` returns a Reply (bytes to send), a Forward (the name is not
ours and this client may recurse) or None (drop). Answers in the cluster's zones
are encoded once per (name, type, EDNS) and reused: a hit copies the bytes and
patches the ID, flags and the question's case. dnslib does everything else.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from dnslib import EDNS0, QTYPE, RR, DNSError, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from appliance.plan import DnsPlan
from services.dns.authority import Answer, Authority
from services.dns.rcode import BADVERS, FORMERR, NOTIMP, REFUSED, SERVFAIL
from services.dns.wire import (
    CLASS_IN,
    Query,
    find_opt,
    has_opt,
    labels_key,
    options_ok,
    parse_query,
    patch_reply,
    truncate,
)

OUR_UDP_SIZE = 1232  # the DNS flag day 2020 default: no IP fragmentation
# Zone names are plain LDH text (inventory-validated); any other byte in a question's
# label is written as \DDD, so the label keeps its boundaries and never matches by accident.
_PLAIN = b"abcdefghijklmnopqrstuvwxyz0123456789-_*"
TYPE_AXFR, TYPE_IXFR, CLASS_ANY = 252, 251, 255
OPCODE_UPDATE = 5
SEEN_LIMIT = 50_000  # distinct query shapes kept whole (clients differ in flags, cookies)
TEMPLATE_LIMIT = 20_000  # lazily cached answers (wildcard names, NODATA, NXDOMAIN)
# An OPT record for error replies built by hand: root owner, our UDP size, no flags.
_OPT = b"\x00" + struct.pack("!HHIH", 41, OUR_UDP_SIZE, 0, 0)
# UDP services that answer anything (echo, daytime, chargen, time) and port 0: a query
# "from" them is spoofed, and answering would start a reply loop (BIND drops them too).
_REFLECTOR_PORTS = frozenset({0, 7, 13, 17, 19, 37})


def unsafe_source(port: int) -> bool:
    """A UDP source port no real client uses and a reply to which could loop."""
    return port in _REFLECTOR_PORTS


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ours: ask upstream. `key` names the question for the cache."""

    data: bytes
    key: tuple[str, int, int]
    edns: bool
    udp_size: int


Decision = Reply | Forward | None


def lookup_name(labels: tuple[bytes, ...]) -> str:
    """A question's wire labels as the lower-case text name the zones are keyed by.

    Not str(DNSLabel): that leaves a '.' inside a label as a label boundary, and its
    escapes do not survive a round trip (DNSLabel(str) IDNA-encodes them).
    """
    out = []
    for label in labels:
        low = label.lower()
        if low.translate(None, _PLAIN):
            out.append("".join(chr(c) if c in _PLAIN else f"\\{c:03d}" for c in low))
        else:
            out.append(low.decode("ascii"))
    return ".".join(out)


class DnsEngine:
    def __init__(self, plan: DnsPlan, counters: Counter[str] | None = None) -> None:
        self.plan = plan
        self.authority = Authority(plan)
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.forwarding = bool(plan.upstreams)
        self._allowed_cache: dict[str, bool] = {}
        # Answers encoded from the zones up front never leave; lazily added ones
        # (wildcard names, NODATA, NXDOMAIN) are bounded so a name flood cannot grow memory.
        self._static: dict[bytes, bytes] = {}
        # Whole replies by the query's bytes after its ID, per recursion-available flag.
        self._seen: tuple[dict[bytes, bytes], dict[bytes, bytes]] = ({}, {})
        self._templates: dict[bytes, bytes] = {}
        self._precompute()
        self._static = dict(self._templates)

    # --- who may recurse -----------------------------------------------------------

    def may_forward(self, client: str) -> bool:
        allowed = self._allowed_cache.get(client)
        if allowed is None:
            try:
                addr: IPv4Address | IPv6Address = ipaddress.ip_address(client.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            allowed = any(addr in net for net in self.plan.forward_allowed)
            if len(self._allowed_cache) > 65536:
                self._allowed_cache.clear()
            self._allowed_cache[client] = allowed
        return allowed

    # --- the fast path -----------------------------------------------------------------

    def _precompute(self) -> None:
        """Encode every name/type the zones hold, with and without EDNS."""
        for zone in self.authority.zones:
            for name, rrsets in zone.names.items():
                for qtype in rrsets:
                    for edns in (False, True):
                        self._template_for(name, qtype, edns)

    def _template_for(
        self, qname: str, qtype: int, edns: bool, owner: DNSLabel | None = None
    ) -> bytes | None:
        """The answer for (qname, qtype), cached; `owner` is the question's name as sent.

        The question (and a wildcard's owner) is encoded from the wire labels, so a
        patched reply has exactly the question's bytes where the template has its name.
        """
        owner = owner if owner is not None else DNSLabel(qname)
        answer = self.authority.lookup(qname, qtype, owner)
        if answer is None:
            return None
        template = self._encode(0, 0, owner, qtype, CLASS_IN, answer, edns, do=False, ra=False)
        key = labels_key(owner.label, qtype, CLASS_IN, edns)
        if len(self._templates) >= TEMPLATE_LIMIT + len(self._static):
            self._templates = dict(self._static)
        self._templates[key] = template
        return template

    def handle(self, data: bytes, client: str, *, tcp: bool = False) -> Decision:
        """Decide what to do with one query from `client` (an address string)."""
        self.counters["queries"] += 1
        ra = self._ra(client)
        if not tcp:
            # The same query bytes (but the ID) get the same reply bytes: skip parsing.
            hit = self._seen[ra].get(data[2:])
            if hit is not None:
                return Reply(data[:2] + hit)
        query = parse_query(data)
        if query is not None and query.qclass == CLASS_IN:
            template = self._templates.get(query.key(data))
            if template is not None:
                self.counters["fast"] += 1
                reply = self._fit(patch_reply(template, data, query, ra), query, tcp)
                if not tcp:
                    seen = self._seen[ra]
                    if len(seen) >= SEEN_LIMIT:
                        seen.clear()
                    seen[data[2:]] = reply[2:]
                return Reply(reply)
        return self._slow(data, client, query, tcp)

    def _ra(self, client: str) -> bool:
        return self.forwarding and self.may_forward(client)

    def _fit(self, reply: bytes, query: Query, tcp: bool) -> bytes:
        if tcp:
            return reply
        limit = min(query.udp_size, OUR_UDP_SIZE) if query.edns else 512
        if len(reply) <= limit:
            return reply
        self.counters["truncated"] += 1
        return truncate(reply, query.qname_end, query.edns)

    # --- the slow path ----------------------------------------------------------------

    def _slow(self, data: bytes, client: str, query: Query | None, tcp: bool) -> Decision:
        # Byte tests first: no header, or a response (QR): never answered, never parsed.
        # Answering a response is how two servers (or one, spoofed) reply to each other
        # forever; the fast path never gets here for them (it takes QR=0 queries only).
        if len(data) < 12 or data[2] & 0x80:
            self.counters["dropped"] += 1
            if len(data) >= 12:
                self.counters["responses_dropped"] += 1
            return None
        self.counters["slow"] += 1
        try:
            request = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError, KeyError, TypeError, UnicodeError):
            request = None
        if data[2] & 0x78:  # an opcode other than QUERY: NOTIMP, with that opcode echoed
            self.counters["notimp"] += 1
            if request is None or request.header.opcode == OPCODE_UPDATE:
                # An UPDATE's "question" is its zone, which clients check as such (dnspython
                # refuses a reply whose zone is not an SOA question): send the header only.
                return Reply(header_error(data, NOTIMP))
            return Reply(error_reply(request, NOTIMP))
        if request is None:
            return self._formerr_or_drop(data)
        header = request.header
        if len(request.questions) != 1 or request.rr or request.auth:
            return self._formerr_or_drop(data)
        q = request.questions[0]
        opt = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        if len(opt) > 1 or len(request.ar) > len(opt):
            return self._formerr_or_drop(data)
        edns = bool(opt)
        if edns and (opt[0].ttl >> 16) & 0xFF:
            return Reply(self._badvers(request))
        if edns and not _options_ok(data):
            self.counters["malformed"] += 1
            return Reply(error_reply(request, FORMERR))
        if q.qclass not in (CLASS_IN, CLASS_ANY):
            # Well formed, just not a class we serve (CH version.bind, HS): REFUSED, as
            # BIND and dnsmasq do; FORMERR would say the client broke the protocol.
            self.counters["refused"] += 1
            return Reply(error_reply(request, REFUSED))
        qname = lookup_name(tuple(q.qname.label))
        if q.qtype in (TYPE_AXFR, TYPE_IXFR):
            self.counters["refused"] += 1
            return Reply(error_reply(request, REFUSED))
        ra = self._ra(client)
        if not self.authority.is_ours(qname):
            if not ra:
                self.counters["refused"] += 1
                return Reply(error_reply(request, REFUSED))
            if query is None:
                # Only the plain shape goes upstream (one uncompressed question, at most an
                # OPT, nothing after it): the forwarder matches the reply's question bytes.
                return self._formerr_or_drop(data)
            self.counters["forwarded"] += 1
            udp_size = _udp_limit(opt[0].rclass) if edns else 512
            return Forward(data, (qname, q.qtype, q.qclass), edns, udp_size)
        if query is not None and q.qclass == CLASS_IN:
            template = self._template_for(qname, q.qtype, edns, q.qname)
            assert template is not None
            return Reply(self._fit(patch_reply(template, data, query, ra), query, tcp))
        answer = self.authority.lookup(qname, q.qtype, q.qname)
        assert answer is not None
        do = edns and bool(opt[0].ttl & 0x8000)
        reply = self._encode(header.id, header.rd, q.qname, q.qtype, q.qclass, answer, edns, do, ra)
        limit = 65535 if tcp else (_udp_limit(opt[0].rclass) if edns else 512)
        if len(reply) > limit:
            self.counters["truncated"] += 1
            reply = self._encode(
                header.id,
                header.rd,
                q.qname,
                q.qtype,
                q.qclass,
                Answer(answer.rcode),
                edns,
                do,
                ra,
                tc=True,
            )
        return Reply(reply)

    def refused(self, data: bytes) -> bytes:
        """REFUSED for a plain query (one the engine decided to forward)."""
        self.counters["refused"] += 1
        try:
            return error_reply(DNSRecord.parse(data), REFUSED)
        except Exception:  # what the fast path took, dnslib may not: the header will do
            return header_error(data, REFUSED)

    def _formerr_or_drop(self, data: bytes) -> Decision:
        self.counters["malformed"] += 1
        if len(data) < 12 or data[2] & 0x80:
            self.counters["dropped"] += 1
            return None  # no usable header, or a response: say nothing
        # FORMERR with the header only (RFC 1035 4.1.1): we could not read the rest. No
        # bigger than the query (no amplification); QR set, so no peer answers it back.
        return Reply(header_error(data, FORMERR))

    @staticmethod
    def _badvers(request: DNSRecord) -> bytes:
        reply = DNSRecord(
            DNSHeader(id=request.header.id, qr=1, rd=request.header.rd),
            q=request.questions[0],
        )
        # BADVERS (16) = extended rcode 1 in the OPT TTL, low 4 bits 0 in the header.
        reply.add_ar(EDNS0(udp_len=OUR_UDP_SIZE, ext_rcode=BADVERS >> 4))
        return bytes(reply.pack())

    @staticmethod
    def _encode(
        qid: int,
        rd: int,
        qname: str | DNSLabel,
        qtype: int,
        qclass: int,
        answer: Answer,
        edns: bool,
        do: bool,
        ra: bool,
        tc: bool = False,
    ) -> bytes:
        header = DNSHeader(id=qid, qr=1, aa=1, rd=rd, ra=int(ra), rcode=answer.rcode, tc=int(tc))
        reply = DNSRecord(header, q=DNSQuestion(qname, qtype, qclass))
        if not tc:
            for rr in answer.answer:
                reply.add_answer(rr)
            for rr in answer.authority:
                reply.add_auth(rr)
            for rr in answer.additional:
                reply.add_ar(rr)
        if edns:
            # Last on purpose: wire.truncate and the DO patch expect the OPT at the end.
            reply.add_ar(EDNS0(udp_len=OUR_UDP_SIZE, flags="do" if do else ""))
        return bytes(reply.pack())


def header_error(data: bytes, rcode: int) -> bytes:
    """An error reply from the header alone: ID, opcode and RD echoed, OPT if asked."""
    edns = has_opt(data)
    head = data[0:2] + bytes([0x80 | (data[2] & 0x79), rcode])
    return head + (b"\x00\x00\x00\x00\x00\x00\x00\x01" + _OPT if edns else b"\x00" * 8)


def error_reply(request: DNSRecord, rcode: int, *, ra: bool = False) -> bytes:
    """An error reply to a parsed query: its ID, opcode, RD and question, OPT if it had one."""
    reply = DNSRecord(
        DNSHeader(
            id=request.header.id,
            qr=1,
            opcode=request.header.opcode,  # clients match replies by ID and opcode
            rd=request.header.rd,
            ra=int(ra),
            rcode=rcode,
        ),
        q=request.questions[0] if len(request.questions) == 1 else None,
    )
    if any(rr.rtype == QTYPE.OPT for rr in request.ar):
        reply.add_ar(EDNS0(udp_len=OUR_UDP_SIZE))
    return bytes(reply.pack())


def servfail(data: bytes) -> bytes:
    """SERVFAIL for a forwarded query (RA set: we did try to recurse for it)."""
    try:
        return error_reply(DNSRecord.parse(data), SERVFAIL, ra=True)
    except (DNSError, ValueError, IndexError, KeyError, TypeError, UnicodeError):
        return header_error(data, SERVFAIL)


def truncate_reply(reply: bytes, edns: bool) -> bytes:
    """One of our replies cut to header and question with TC set (wire.truncate), for a
    reply whose question end is not known from a parsed query. Its OPT, if any, must be
    its last record, as cache_reply and _encode put it."""
    pos = 12
    while reply[pos]:  # our own encoding: plain labels, no pointer in the question
        pos += reply[pos] + 1
    return truncate(reply, pos + 1, edns)


def _udp_limit(client_size: int) -> int:
    """The largest UDP reply for a client's EDNS size: never below 512, never above ours.

    Ours (1232) caps it even when the client offers 4096: a bigger datagram fragments
    on a 1500-byte path, and fragments get lost; TC sends the client to TCP instead.
    """
    return min(max(512, client_size), OUR_UDP_SIZE)


def _options_ok(data: bytes) -> bool:
    """The OPT's options are whole, with at most one COOKIE of a length RFC 7873 allows
    (else FORMERR, 5.2.2). On the bytes: dnslib drops empty options when it parses."""
    span = find_opt(data)
    return span is None or (span[1] <= len(data) and options_ok(data, *span))


def cache_reply(request: bytes, cached: DNSRecord, age: int) -> bytes | None:
    """A cached upstream answer for a new query: its ID and question, TTLs aged."""
    try:
        q = DNSRecord.parse(request)
    except (DNSError, ValueError, IndexError, KeyError, TypeError, UnicodeError):
        return None
    reply = DNSRecord(
        DNSHeader(id=q.header.id, qr=1, rd=q.header.rd, ra=1, rcode=cached.header.rcode),
        q=q.questions[0],
    )
    for section, add in ((cached.rr, reply.add_answer), (cached.auth, reply.add_auth)):
        for rr in section:
            add(RR(rr.rname, rr.rtype, rr.rclass, max(0, rr.ttl - age), rr.rdata))
    for rr in cached.ar:
        if rr.rtype != QTYPE.OPT:
            reply.add_ar(RR(rr.rname, rr.rtype, rr.rclass, max(0, rr.ttl - age), rr.rdata))
    if any(rr.rtype == QTYPE.OPT for rr in q.ar):
        reply.add_ar(EDNS0(udp_len=OUR_UDP_SIZE))
    return bytes(reply.pack())
