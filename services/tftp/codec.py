"""The TFTP packet codec (RFC 1350, RFC 2347 options): the only one the service uses.

Hand-written with struct, like the DHCP codec: the hot path (transfer.py's DATA slots,
the C lock-step loop in _lockstep.c) works on raw bytes and never builds packet
objects, and the request parser here reads a request exactly as tftpy does (the
unit tests cross-check it against tftpy on hostile datagrams): a name and a mode,
each NUL-terminated and ASCII, then name/value pairs, each non-empty and
NUL-terminated; anything else is Malformed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_DISK_FULL = 0, 1, 2, 3
ERR_ILLEGAL_OP, ERR_UNKNOWN_TID, ERR_EXISTS, ERR_NO_USER, ERR_OPTIONS = 4, 5, 6, 7, 8

DATA_HEAD = struct.Struct("!HH")  # opcode and block number (DATA, ACK, ERROR)
_OPCODE = struct.Struct("!H")


class Malformed(ValueError):
    """A datagram that is no readable request."""


@dataclass(frozen=True, slots=True)
class Request:
    opcode: int  # OP_RRQ or OP_WRQ
    filename: str
    mode: str  # lower case
    options: dict[str, str] = field(default_factory=dict)  # as sent (names not folded)


def parse_request(data: bytes) -> Request:
    """A RRQ or WRQ, or Malformed."""
    if len(data) <= 2:
        raise Malformed("too short")
    (opcode,) = _OPCODE.unpack_from(data)
    if opcode not in (OP_RRQ, OP_WRQ):
        raise Malformed(f"opcode {opcode} is no request")
    body = data[2:]
    end_name = body.find(b"\0")
    end_mode = body.find(b"\0", end_name + 1) if end_name >= 0 else -1
    if end_mode < 0:
        raise Malformed("the name and the mode must each end with a NUL")
    try:
        filename = body[:end_name].decode("ascii")
        mode = body[end_name + 1 : end_mode].decode("ascii").lower()
        options = _options(body[end_mode + 1 :])
    except UnicodeDecodeError:
        raise Malformed("not ASCII") from None
    return Request(opcode, filename, mode, options)


def _options(rest: bytes) -> dict[str, str]:
    if not rest:
        return {}
    if not rest.endswith(b"\0"):
        raise Malformed("an option must end with a NUL")
    fields = rest[:-1].split(b"\0")
    if any(not f for f in fields):
        raise Malformed("an empty option name or value")
    if len(fields) % 2:
        raise Malformed("an option without a value")
    # A name sent twice: the last one counts (as tftpy reads it).
    return {
        fields[i].decode("ascii"): fields[i + 1].decode("ascii") for i in range(0, len(fields), 2)
    }


def error_packet(code: int, message: str) -> bytes:
    return DATA_HEAD.pack(OP_ERROR, code) + message.encode("ascii", "replace") + b"\0"


def oack_packet(options: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
    return _OPCODE.pack(OP_OACK) + body
