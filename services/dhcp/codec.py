"""The DHCPv4 message codec (RFC 2131/2132), hand-written over struct for the hot path.

Parsing handles option overload (52: options continue in `file` and `sname`) and
RFC 3396 long options (one code split over several instances is concatenated).
Encoding writes the options in the order given, splits values over 255 bytes, and
stops at the client's maximum message size.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from ipaddress import IPv4Address

FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # 236 bytes up to the options
MAGIC = b"\x63\x82\x53\x63"
MIN_SIZE = FIXED.size + len(MAGIC)  # 240: a message with no options at all
BOOTREQUEST, BOOTREPLY = 1, 2
BROADCAST_FLAG = 0x8000
ZERO = IPv4Address(0)

# Message types (option 53)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8
MESSAGE_NAMES = {
    DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE",
    ACK: "ACK", NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM",
}  # fmt: skip

# Option codes used by name
OPT_PAD, OPT_END = 0, 255
OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_HOSTNAME, OPT_DOMAIN = 1, 3, 6, 12, 15
OPT_BROADCAST, OPT_NTP, OPT_VENDOR_SPECIFIC = 28, 42, 43
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_OVERLOAD, OPT_MESSAGE_TYPE = 50, 51, 52, 53
OPT_SERVER_ID, OPT_PARAMS, OPT_MESSAGE, OPT_MAX_SIZE = 54, 55, 56, 57
OPT_T1, OPT_T2, OPT_VENDOR_CLASS, OPT_CLIENT_ID = 58, 59, 60, 61
OPT_TFTP_SERVER, OPT_BOOTFILE, OPT_USER_CLASS = 66, 67, 77
OPT_RELAY_AGENT = 82
OPT_CLIENT_ARCH, OPT_CLIENT_NDI, OPT_UUID = 93, 94, 97
OPT_DOMAIN_SEARCH, OPT_IPXE = 119, 175


class DhcpParseError(ValueError):
    """Not a DHCP message we can read; the reason names what is wrong."""


@dataclass(slots=True)
class DhcpMessage:
    op: int = BOOTREPLY
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = ZERO
    yiaddr: IPv4Address = ZERO
    siaddr: IPv4Address = ZERO
    giaddr: IPv4Address = ZERO
    chaddr: bytes = b""
    sname: bytes = b""
    file: bytes = b""
    # Insertion order is wire order on encode; values are raw bytes.
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def message_type(self) -> int | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value and len(value) == 1 else None

    @property
    def mac(self) -> str:
        return self.chaddr[: self.hlen].hex(":")

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    def ip_option(self, code: int) -> IPv4Address | None:
        value = self.options.get(code)
        return IPv4Address(value) if value is not None and len(value) == 4 else None


def _parse_options(data: bytes, start: int, end: int, into: dict[int, bytes]) -> int | None:
    """Read options in data[start:end]; return the overload value if option 52 was seen."""
    overload = None
    pos = start
    while pos < end:
        code = data[pos]
        if code == OPT_PAD:
            pos += 1
            continue
        if code == OPT_END:
            return overload
        if pos + 1 >= end:
            raise DhcpParseError(f"option {code} has no length")
        length = data[pos + 1]
        value_end = pos + 2 + length
        if value_end > end:
            raise DhcpParseError(f"option {code} runs past the end of its field")
        value = data[pos + 2 : value_end]
        into[code] = into[code] + value if code in into else value  # RFC 3396
        if code == OPT_OVERLOAD and length == 1:
            overload = value[0]
        pos = value_end
    return overload


def parse(data: bytes) -> DhcpMessage:
    """Parse one DHCP message; raise DhcpParseError for anything malformed."""
    if len(data) < MIN_SIZE:
        raise DhcpParseError(f"{len(data)} bytes is shorter than a DHCP message ({MIN_SIZE})")
    if data[FIXED.size : MIN_SIZE] != MAGIC:
        raise DhcpParseError("no DHCP magic cookie (a plain BOOTP message?)")
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file) = (
        FIXED.unpack_from(data)
    )
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise DhcpParseError(f"op {op} is neither request nor reply")
    if hlen > 16:
        raise DhcpParseError(f"hardware address length {hlen} is over 16")
    options: dict[int, bytes] = {}
    overload = _parse_options(data, MIN_SIZE, len(data), options)
    if overload is not None:
        if overload not in (1, 2, 3):
            raise DhcpParseError(f"option overload value {overload} is not 1, 2 or 3")
        # RFC 2131 4.1: options, then file, then sname.
        if overload & 1:
            _parse_options(data, 108, 236, options)
        if overload & 2:
            _parse_options(data, 44, 108, options)
    return DhcpMessage(
        op, htype, hlen, hops, xid, secs, flags,
        IPv4Address(ci), IPv4Address(yi), IPv4Address(si), IPv4Address(gi),
        chaddr, b"" if overload and overload & 2 else sname.rstrip(b"\0"),
        b"" if overload and overload & 1 else file.rstrip(b"\0"), options,
    )  # fmt: skip


def encode(msg: DhcpMessage, max_size: int = 576, keep: Collection[int] = ()) -> bytes:
    """Encode with options in insertion order, dropping those that do not fit.

    Options that do not fit in `max_size` (the client's option 57, at least 576) are
    left out rather than truncated. Room is made for the options in `keep` first
    (message type, boot file, relay agent information...): the others fill what is
    left, in order, so a long option the client asked for never pushes them out.
    """
    head = FIXED.pack(
        msg.op, msg.htype, msg.hlen, msg.hops, msg.xid, msg.secs, msg.flags,
        msg.ciaddr.packed, msg.yiaddr.packed, msg.siaddr.packed, msg.giaddr.packed,
        msg.chaddr.ljust(16, b"\0")[:16], msg.sname[:63].ljust(64, b"\0"),
        msg.file[:127].ljust(128, b"\0"),
    )  # fmt: skip
    out = bytearray(head + MAGIC)
    # IP (20) + UDP (8) headers count towards the client's limit (RFC 2132 9.10).
    budget = max(576, max_size) - 28 - 1  # keep room for END
    chunks = []
    for code, value in msg.options.items():
        chunk = bytearray()
        for i in range(0, max(len(value), 1), 255):  # RFC 3396: split long values
            part = value[i : i + 255]
            chunk += bytes((code, len(part))) + part
        chunks.append((code, chunk))
    # What the options outside `keep` may use once every kept one is in.
    spare = budget - len(out) - sum(len(chunk) for code, chunk in chunks if code in keep)
    for code, chunk in chunks:
        if code in keep:
            if len(out) + len(chunk) > budget:
                continue
        elif len(chunk) > spare:
            continue
        else:
            spare -= len(chunk)
        out += chunk
    out.append(OPT_END)
    if len(out) < 300:  # some BOOTP relays and old clients drop shorter messages
        out += b"\0" * (300 - len(out))
    return bytes(out)


# --- option value helpers ------------------------------------------------------------


def ips(*addresses: IPv4Address) -> bytes:
    return b"".join(a.packed for a in addresses)


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def domain_search(*names: str) -> bytes:
    """Option 119 (RFC 3397): DNS wire names, uncompressed."""
    out = bytearray()
    for name in names:
        for label in name.strip(".").split("."):
            out += bytes((len(label),)) + label.encode()
        out.append(0)
    return bytes(out)


def architectures(value: bytes | None) -> list[int]:
    """Option 93: a list of 16-bit client architecture types."""
    if not value or len(value) % 2:
        return []
    return [v for (v,) in struct.iter_unpack("!H", value)]


def user_classes(value: bytes | None) -> list[bytes]:
    """Option 77: RFC 3004 length-prefixed instances, or one raw string (iPXE sends "iPXE")."""
    if not value:
        return []
    out, pos = [], 0
    while pos < len(value):
        length = value[pos]
        if length == 0 or pos + 1 + length > len(value):
            return [value]  # not RFC 3004 framing: the whole thing is one class
        out.append(value[pos + 1 : pos + 1 + length])
        pos += 1 + length
    return out
