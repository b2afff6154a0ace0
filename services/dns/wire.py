"""The hot-path DNS query parser: struct over bytes, no objects per query.

It accepts only the common shape (one question, no compression in it, at most
an OPT record); anything else returns None and goes to the dnslib slow path,
which decides between an answer, FORMERR and a drop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
TYPE_CLASS = struct.Struct("!HH")
OPT_FIXED = struct.Struct(
    "!HHIH"
)  # type, class (= UDP size), ttl (= ext-rcode/version/flags), rdlen

OPTION = struct.Struct("!HH")  # EDNS option code, length

TYPE_OPT = 41
CLASS_IN = 1
FLAG_QR = 0x8000
OPCODE_MASK = 0x7800
DO_BIT = 0x8000  # in the low 16 bits of the OPT TTL
OPTION_COOKIE = 10


@dataclass(frozen=True, slots=True)
class Query:
    qid: int
    flags: int
    qname_end: int  # offset just past the question name
    qtype: int
    qclass: int
    edns: bool
    udp_size: int  # the client's buffer size (512 without EDNS)
    do: bool

    def key(self, data: bytes) -> bytes:
        """Fast-path key: the case-folded name, the raw type and class, and EDNS or not.

        bytes.lower() only touches A-Z; label lengths are < 64 and never letters.
        """
        end = self.qname_end
        return data[12:end].lower() + data[end : end + 4] + (b"\x01" if self.edns else b"\x00")


def encode_name(name: str) -> bytes:
    """A name in wire form (no compression), e.g. for fast-path keys."""
    out = b"".join(bytes([len(label)]) + label for label in name.encode().split(b".") if label)
    return out + b"\x00"


def template_key(qname: str, qtype: int, qclass: int, edns: bool) -> bytes:
    """The fast-path key of a question: Query.key gives the same for the same question."""
    return (
        encode_name(qname).lower() + TYPE_CLASS.pack(qtype, qclass) + (b"\x01" if edns else b"\x00")
    )


def labels_key(labels: tuple[bytes, ...], qtype: int, qclass: int, edns: bool) -> bytes:
    """template_key for a name given as its wire labels (any bytes, kept exactly)."""
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return name.lower() + TYPE_CLASS.pack(qtype, qclass) + (b"\x01" if edns else b"\x00")


def parse_query(data: bytes) -> Query | None:
    """Parse a plain query; None for anything unusual (let the slow path judge it)."""
    if len(data) < 17:
        return None
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & (FLAG_QR | OPCODE_MASK) or qd != 1 or an or ns or ar > 1:
        return None
    pos, size = 12, len(data)
    while True:
        if pos >= size:
            return None
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:  # a compression pointer or a reserved label type
            return None
        pos += length + 1
    if pos - 12 > 255 or pos + 4 > size:
        return None
    qtype, qclass = TYPE_CLASS.unpack_from(data, pos)
    qname_end = pos
    pos += 4
    edns, udp_size, do = False, 512, False
    if ar:
        if pos + 11 > size or data[pos] != 0:
            return None
        rtype, rclass, ttl, rdlen = OPT_FIXED.unpack_from(data, pos + 1)
        # EDNS version other than 0 must get BADVERS: the slow path does that.
        if rtype != TYPE_OPT or (ttl >> 16) & 0xFF:
            return None
        end = pos + 11 + rdlen
        if end != size or (rdlen and not options_ok(data, pos + 11, end)):
            return None
        pos += 11 + rdlen
        edns, udp_size, do = True, max(512, rclass), bool(ttl & DO_BIT)
    if pos != size:
        return None
    return Query(qid, flags, qname_end, qtype, qclass, edns, udp_size, do)


def cookie_ok(size: int) -> bool:
    """RFC 7873 5.2.2: a client cookie (8 bytes), alone or with a server cookie (8-32)."""
    return size == 8 or 16 <= size <= 40


def options_ok(data: bytes, pos: int, end: int) -> bool:
    """The OPT rdata in data[pos:end] is whole options, with at most one well-formed COOKIE.

    Only queries that carry options pay for this (dig sends a COOKIE by default).
    """
    if end > len(data):
        return False
    cookies = 0
    while pos < end:
        if pos + 4 > end:
            return False
        code, size = OPTION.unpack_from(data, pos)
        pos += 4 + size
        if code == OPTION_COOKIE:
            cookies += 1
            if cookies > 1 or not cookie_ok(size):
                return False
    return pos == end


def _skip_name(data: bytes, pos: int) -> int:
    """The offset after the name at pos (labels, then a root or a pointer); -1 if cut."""
    size = len(data)
    while pos < size:
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2 if pos + 2 <= size else -1
        if length > 63:
            return -1
        pos += length + 1
    return -1


def find_opt(data: bytes) -> tuple[int, int] | None:
    """Where the first OPT record's rdata is (start, end), read leniently; None: no OPT.

    For messages dnslib cannot parse or whose options it drops (empty ones): the error
    reply to an EDNS query needs the OPT (RFC 6891 7: a FORMERR without it reads as "no
    EDNS here"), and a COOKIE is checked on the bytes. An OPT found in any section counts,
    even when the counts lie; `end` may lie past the data when the record is cut.
    """
    if len(data) < 12:
        return None
    qd, an, ns, ar = struct.unpack_from("!HHHH", data, 4)
    pos = 12
    for _ in range(qd):
        pos = _skip_name(data, pos)
        if pos < 0 or pos + 4 > len(data):
            return None
        pos += 4
    for _ in range(an + ns + ar):
        name_at = pos
        pos = _skip_name(data, pos)
        if pos < 0 or pos + 10 > len(data):
            return None
        rtype, _, _, rdlen = OPT_FIXED.unpack_from(data, pos)
        if rtype == TYPE_OPT and data[name_at] == 0:
            return pos + 10, pos + 10 + rdlen
        pos += 10 + rdlen
    return None


def has_opt(data: bytes) -> bool:
    return find_opt(data) is not None


def patch_reply(template: bytes, data: bytes, query: Query, ra: bool) -> bytes:
    """A pre-encoded answer made the client's: its ID, RD/CD bits, question case, DO bit."""
    out = bytearray(template)
    out[0:2] = data[0:2]
    out[2] = (out[2] & 0xFE) | (data[2] & 0x01)  # RD echoed
    out[3] = (out[3] & 0x6F) | (data[3] & 0x10) | (0x80 if ra else 0)  # CD echoed, RA ours
    out[12 : query.qname_end] = data[12 : query.qname_end]  # the question's own case
    if query.edns and query.do:
        out[-4] |= 0x80  # DO is copied into the reply's OPT (RFC 3225)
    return bytes(out)


def truncate(reply: bytes, qname_end: int, edns: bool) -> bytes:
    """Header and question only, TC set, OPT kept: the client retries over TCP."""
    out = bytearray(reply[: qname_end + 4])
    out[2] |= 0x02
    out[6:12] = b"\x00\x00\x00\x00\x00\x01" if edns else b"\x00" * 6
    if edns:
        out += reply[-11:]  # templates end with their OPT record
    return bytes(out)
