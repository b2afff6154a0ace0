"""TFTP request acceptance without sockets: one codec (services.tftp.codec) and the
listener's verdict on a datagram (services.tftp.admission.examine).

tftpy is the independent decoder here (as scapy is for DHCP): for every datagram below
the hand-written codec accepts what tftpy accepts, with the same fields, and refuses
what it refuses.
"""

from __future__ import annotations

import struct

import pytest
from tftpy.TftpPacketFactory import TftpPacketFactory

from services.bootfiles import Refused
from services.tftp.admission import Answer, Drop, busy, examine, refusal
from services.tftp.codec import (
    ERR_ACCESS,
    ERR_ILLEGAL_OP,
    ERR_NOT_FOUND,
    ERR_UNDEFINED,
    OP_RRQ,
    OP_WRQ,
    Malformed,
    Request,
    parse_request,
)

LISTEN = 6969


def rrq(body: bytes, opcode: int = OP_RRQ) -> bytes:
    return struct.pack("!H", opcode) + body


DATAGRAMS = [
    rrq(b"pxelinux.0\0octet\0"),
    rrq(b"pxelinux.0\0OCTET\0"),
    rrq(b"a\0netascii\0"),
    rrq(b"x\0octet\0blksize\x001468\0tsize\x000\0"),
    rrq(b"x\0octet\0BlkSize\x001468\0windowsize\x0016\0timeout\x003\0"),
    rrq(b"x\0octet\0blksize\x00512\0blksize\x001024\0"),  # the last one wins
    rrq(b"x\0octet\0blksize\x00" + b"9" * 300 + b"\0"),  # oversize value: parsed
    rrq(b"x\0octet\0" + b"k" * 2000 + b"\0v\0"),  # oversize option name: parsed
    rrq(b"new.bin\0octet\0", OP_WRQ),
    rrq(b"\0octet\0"),  # an empty name
    rrq(b"x\0\0"),  # an empty mode
    rrq(b"x\0octet"),  # no NUL after the mode
    rrq(b"x"),
    rrq(b""),
    rrq(b"x\0octet\0blksize\0"),  # an odd option list
    rrq(b"x\0octet\0blksize\x00512"),  # no NUL after the value
    rrq(b"x\0octet\0blksize\0\0"),  # an empty value
    rrq(b"x\0octet\0\0"),  # an empty option name
    rrq(b"\xff\xfe\0octet\0"),  # not ASCII
    rrq(b"x\0oct\xe9t\0"),
    rrq(b"x\0octet\0bl\xffksize\x00512\0"),
    rrq(b"../secret.txt\0.bin\0octet\0"),  # a NUL in the name shifts the fields
    rrq(b"\x1b[2J\r\nfake\0octet\0"),  # control characters are ASCII
]


def _tftpy(data: bytes) -> Request | None:
    try:
        p = TftpPacketFactory().parse(data)
    except Exception:
        return None
    return Request(p.opcode, p.filename, p.mode, dict(p.options))


def _ours(data: bytes) -> Request | None:
    try:
        return parse_request(data)
    except Malformed:
        return None


@pytest.mark.parametrize("data", DATAGRAMS)
def test_codec_reads_requests_as_tftpy_does(data: bytes) -> None:
    assert _ours(data) == _tftpy(data)


def test_codec_fields() -> None:
    req = parse_request(rrq(b"Images/K\0NetASCII\0tsize\x000\0"))
    assert req == Request(OP_RRQ, "Images/K", "netascii", {"tsize": "0"})


@pytest.mark.parametrize("data", [b"", b"\0", b"\0\1", struct.pack("!HH", 4, 1)])
def test_codec_refuses_what_is_no_request(data: bytes) -> None:
    with pytest.raises(Malformed):
        parse_request(data)


# --- the listener's verdict ----------------------------------------------------------------


def _examine(data: bytes, port: int = 40000) -> Drop | Answer | Request:
    return examine(data, "192.0.2.9", port, LISTEN, frozenset())


def test_a_good_request_is_accepted() -> None:
    got = _examine(rrq(b"pxelinux.0\0octet\0blksize\x001468\0"))
    assert got == Request(OP_RRQ, "pxelinux.0", "octet", {"blksize": "1468"})


@pytest.mark.parametrize(
    "data",
    [struct.pack("!HH", 4, 1), struct.pack("!HH", 9, 9), b"", b"\1", rrq(b"x\0octet\0")[:1]],
)
def test_no_request_is_dropped(data: bytes) -> None:
    assert _examine(data) == Drop("not a request")


@pytest.mark.parametrize("port", [0, 53, 69, 1023, LISTEN])
def test_spoofed_sources_are_dropped(port: int) -> None:
    assert isinstance(_examine(rrq(b"x\0octet\0"), port), Drop)


def test_a_write_is_refused_with_access_violation() -> None:
    got = _examine(rrq(b"small.bin\0octet\0", OP_WRQ))
    assert got == Answer(ERR_ACCESS, "read-only server: no writes", "refused")


@pytest.mark.parametrize(
    "body", [b"x\0octet", b"\xff\xfe\0octet\0", b"x\0octet\0blksize\0", b"../x\0.bin\0octet\0"]
)
def test_malformed_requests_get_illegal_operation(body: bytes) -> None:
    got = _examine(rrq(body))
    assert got == Answer(ERR_ILLEGAL_OP, "malformed request", "malformed")


def test_a_mode_other_than_octet_or_netascii_is_refused_uncounted() -> None:
    assert _examine(rrq(b"x\0mail\0")) == Answer(ERR_ILLEGAL_OP, "mode is not supported", None)


@pytest.mark.parametrize(
    ("why", "message"),
    [
        ("per_client", "too many transfers to you, try again"),
        ("full", "server busy, try again"),
        ("reserved", "server busy, try again"),
    ],
)
def test_a_refused_slot_is_said_busy(why: str, message: str) -> None:
    assert busy(why) == Answer(ERR_UNDEFINED, message, "busy")


def test_a_jail_refusal_is_answered_with_its_own_code() -> None:
    assert refusal(Refused(ERR_ACCESS, "'..' is not allowed")) == Answer(
        ERR_ACCESS, "'..' is not allowed", "refused"
    )
    assert refusal(Refused(ERR_NOT_FOUND, "file not found")) == Answer(
        ERR_NOT_FOUND, "file not found", "not_found"
    )
    assert refusal(Refused(ERR_UNDEFINED, "file name too long")).counter == "not_found"
