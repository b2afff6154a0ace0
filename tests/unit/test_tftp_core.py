"""The TFTP core without sockets: transfers, negotiation, the jail, and the boot configs.

`ReadTransfer` is driven with packets and explicit `now` values: RFC 1350 lock-step,
RFC 2347 OACK, RFC 2348/2349/7440 options and their caps, windows with a gap,
duplicate ACKs (Sorcerer's Apprentice), timer backoff and give-up, block-number
rollover. `files.jailed`/`open_source` against a real directory with symlinks.
`bootconfig`: the pxelinux, GRUB and iPXE text for installing, installed and
unknown machines.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.inventory import parse_inventory
from appliance.plan import BootPlan, NodeBoot, Plan, build_plan
from services import bootconfig
from services.tftp import files as files_module
from services.tftp import transfer as tx
from services.tftp.files import Refused, jailed, open_source, to_netascii
from services.tftp.transfer import Negotiated, ReadTransfer, negotiate
from tests.helpers import loopback_inventory

T0 = 1000.0


# --- packet helpers -------------------------------------------------------------------


def ack(block: int) -> bytes:
    return struct.pack("!HH", tx.OP_ACK, block & 0xFFFF)


def opcode(packet: bytes) -> int:
    return int(struct.unpack_from("!H", packet)[0])


def data(packet: bytes) -> tuple[int, bytes]:
    op, block = struct.unpack_from("!HH", packet)
    assert op == tx.OP_DATA, packet[:20]
    return int(block), packet[4:]


def blocks(packets: list[bytes]) -> list[int]:
    return [data(p)[0] for p in packets]


def oack_options(packet: bytes) -> dict[str, str]:
    assert opcode(packet) == tx.OP_OACK
    fields = packet[2:].split(b"\0")
    assert fields[-1] == b""  # every string is NUL-terminated
    fields = fields[:-1]
    return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}


def error(packet: bytes) -> tuple[int, str]:
    op, code = struct.unpack_from("!HH", packet)
    assert op == tx.OP_ERROR and packet.endswith(b"\0")
    return int(code), packet[4:-1].decode()


def pattern(size: int) -> bytes:
    """Generated content: position-dependent, so a block sent for the wrong offset shows."""
    unit = bytes(range(251))  # a prime length: blocks never line up with the pattern
    return (unit * (size // len(unit) + 1))[:size]


def make(
    content: bytes, options: dict[str, str] | None = None, now: float = T0
) -> tuple[ReadTransfer, list[bytes]]:
    neg = negotiate(options or {}, len(content))
    xfer = ReadTransfer(lambda off, n: content[off : off + n], len(content), neg, now)
    return xfer, xfer.start(now)


def lockstep(xfer: ReadTransfer, first: list[bytes], now: float = T0) -> bytes:
    """Play a well-behaved RFC 1350 client to the end; the bytes it received."""
    out = bytearray()
    packets = first
    for _ in range(200_000):
        assert len(packets) == 1
        block, payload = data(packets[0])
        out += payload
        packets = xfer.on_packet(ack(block), now)
        if xfer.done:
            assert packets == []
            return bytes(out)
    raise AssertionError("transfer did not end")


# --- RFC 1350 ---------------------------------------------------------------------------


def test_plain_rfc1350_512_byte_blocks_without_options() -> None:
    content = pattern(1300)
    xfer, first = make(content)
    assert xfer.neg.accepted == {} and not xfer.oack_pending
    assert blocks(first) == [1] and len(data(first[0])[1]) == 512
    assert xfer.deadline == T0 + tx.DEFAULT_TIMEOUT
    second = xfer.on_packet(ack(1), T0)
    assert blocks(second) == [2] and data(second[0])[1] == content[512:1024]
    third = xfer.on_packet(ack(2), T0)
    assert blocks(third) == [3] and data(third[0])[1] == content[1024:]
    assert len(data(third[0])[1]) == 1300 - 1024
    assert xfer.on_packet(ack(3), T0) == []
    assert xfer.done and xfer.error is None and xfer.deadline is None
    assert xfer.bytes_sent == 1300
    # After the end nothing more is ever sent.
    assert xfer.on_packet(ack(3), T0 + 1) == [] and xfer.on_timer(T0 + 100) == []


@pytest.mark.parametrize("size", [0, 512, 1024, 512 * 7])
def test_exact_multiple_of_blksize_ends_with_an_empty_block(size: int) -> None:
    content = pattern(size)
    xfer, first = make(content)
    assert xfer.last_block == size // 512 + 1
    sent: list[tuple[int, bytes]] = []
    packets = first
    while not xfer.done:
        sent.append(data(packets[0]))
        packets = xfer.on_packet(ack(sent[-1][0]), T0)
    assert [b for b, _ in sent] == list(range(1, size // 512 + 2))
    assert sent[-1][1] == b""  # the terminating empty block
    assert all(len(p) == 512 for _, p in sent[:-1])
    assert b"".join(p for _, p in sent) == content


def test_ack_for_a_block_not_sent_yet_is_ignored() -> None:
    xfer, _ = make(pattern(2000))
    assert xfer.on_packet(ack(2), T0) == []  # only block 1 is out
    assert xfer.on_packet(ack(300), T0) == []
    assert not xfer.done and xfer.acked == 0
    assert blocks(xfer.on_packet(ack(1), T0)) == [2]


# --- RFC 2347 option negotiation --------------------------------------------------------


def test_oack_then_ack_0_starts_the_data() -> None:
    content = pattern(3000)
    xfer, first = make(content, {"blksize": "1024", "tsize": "0"})
    assert len(first) == 1
    assert oack_options(first[0]) == {"blksize": "1024", "tsize": "3000"}
    assert xfer.oack_pending and xfer.deadline == T0 + tx.DEFAULT_TIMEOUT
    # Only ACK 0 acknowledges an OACK; anything else waits.
    assert xfer.on_packet(ack(1), T0) == []
    assert xfer.oack_pending
    packets = xfer.on_packet(ack(0), T0 + 0.1)
    assert not xfer.oack_pending
    assert blocks(packets) == [1] and data(packets[0])[1] == content[:1024]
    assert lockstep(xfer, packets) == content


def test_duplicate_ack_0_after_the_oack_sends_nothing() -> None:
    xfer, _ = make(pattern(3000), {"blksize": "1024"})
    assert blocks(xfer.on_packet(ack(0), T0)) == [1]
    assert xfer.on_packet(ack(0), T0) == []


def test_client_error_after_oack_ends_quietly() -> None:
    """A client that only wanted tsize aborts with ERROR after the OACK: a normal end."""
    xfer, first = make(pattern(5000), {"tsize": "0"})
    assert oack_options(first[0]) == {"tsize": "5000"}
    out = xfer.on_packet(tx.error_packet(tx.ERR_UNDEFINED, "just the size"), T0)
    assert out == []  # never answer an ERROR with a packet
    assert xfer.done and xfer.error is not None and xfer.error.startswith("client error 0")
    assert "just the size" in xfer.error
    assert xfer.on_packet(ack(0), T0) == [] and xfer.on_timer(T0 + 60) == []
    assert xfer.bytes_sent == 0


def test_client_error_mid_transfer_ends_it() -> None:
    xfer, _ = make(pattern(5000))
    xfer.on_packet(ack(1), T0)
    assert xfer.on_packet(tx.error_packet(tx.ERR_DISK_FULL, "full"), T0) == []
    assert xfer.done and xfer.error is not None and "client error 3" in xfer.error


def test_unexpected_opcode_from_the_client_is_an_error() -> None:
    xfer, _ = make(pattern(5000))
    out = xfer.on_packet(struct.pack("!HH", tx.OP_DATA, 1) + b"junk", T0)
    assert len(out) == 1 and error(out[0])[0] == tx.ERR_ILLEGAL_OP
    assert xfer.done and xfer.error == "unexpected opcode 3"


def test_runt_packets_are_ignored() -> None:
    xfer, _ = make(pattern(5000))
    assert xfer.on_packet(b"", T0) == [] and xfer.on_packet(b"\0\4\0", T0) == []
    assert not xfer.done


@pytest.mark.parametrize(
    ("requested", "blksize", "windowsize", "timeout", "accepted"),
    [
        ({}, 512, 1, 1.0, {}),
        ({"foo": "bar", "multicast": ""}, 512, 1, 1.0, {}),  # unknown: ignored, no OACK
        ({"blksize": "1468"}, 1468, 1, 1.0, {"blksize": "1468"}),
        ({"BlkSize": "1468"}, 1468, 1, 1.0, {"blksize": "1468"}),  # names are case-blind
        ({"blksize": "8"}, 8, 1, 1.0, {"blksize": "8"}),  # RFC 2348 minimum
        ({"blksize": "7"}, 512, 1, 1.0, {}),  # below the minimum: ignored
        ({"blksize": "65464"}, 65464, 1, 1.0, {"blksize": "65464"}),  # RFC 2348 maximum
        ({"blksize": "70000"}, 65464, 1, 1.0, {"blksize": "65464"}),  # capped
        ({"blksize": "abc"}, 512, 1, 1.0, {}),
        ({"blksize": "-512"}, 512, 1, 1.0, {}),
        ({"blksize": ""}, 512, 1, 1.0, {}),
        ({"blksize": "1e3"}, 512, 1, 1.0, {}),
        ({"blksize": "99999999999"}, 512, 1, 1.0, {}),  # absurdly long: ignored
        ({"tsize": "0"}, 512, 1, 1.0, {"tsize": "4242"}),  # RFC 2349: the real size
        ({"timeout": "1"}, 512, 1, 1.0, {"timeout": "1"}),
        ({"timeout": "255"}, 512, 1, 255.0, {"timeout": "255"}),
        ({"timeout": "0"}, 512, 1, 1.0, {}),  # RFC 2349: 1..255
        ({"timeout": "256"}, 512, 1, 1.0, {}),
        ({"windowsize": "1"}, 512, 1, 1.0, {"windowsize": "1"}),
        ({"windowsize": "8"}, 512, 8, 1.0, {"windowsize": "8"}),
        ({"windowsize": "0"}, 512, 1, 1.0, {}),  # RFC 7440: 1..65535
        ({"windowsize": "65535"}, 512, tx.MAX_WINDOW, 1.0, {"windowsize": str(tx.MAX_WINDOW)}),
        (
            {"blksize": "1468", "tsize": "0", "timeout": "3", "windowsize": "16"},
            1468,
            16,
            3.0,
            {"blksize": "1468", "tsize": "4242", "timeout": "3", "windowsize": "16"},
        ),
    ],
)
def test_negotiation_accepts_within_range_and_caps(
    requested: dict[str, str],
    blksize: int,
    windowsize: int,
    timeout: float,
    accepted: dict[str, str],
) -> None:
    neg = negotiate(requested, 4242)
    assert neg == Negotiated(blksize, windowsize, timeout, accepted)


def test_tsize_is_not_offered_when_the_size_is_unknown() -> None:
    assert negotiate({"tsize": "0"}, None).accepted == {}


def test_negotiated_blksize_shapes_the_blocks() -> None:
    content = pattern(10_000)
    xfer, _ = make(content, {"blksize": "1468"})
    packets = xfer.on_packet(ack(0), T0)
    assert len(data(packets[0])[1]) == 1468
    assert lockstep(xfer, packets) == content
    assert xfer.last_block == 10_000 // 1468 + 1


# --- RFC 7440 windows ---------------------------------------------------------------------


def test_windowsize_4_full_windows_and_a_partial_ack_resends_from_the_gap() -> None:
    content = pattern(10 * 512 + 100)  # 11 blocks
    xfer, first = make(content, {"windowsize": "4"})
    assert oack_options(first[0]) == {"windowsize": "4"}
    w1 = xfer.on_packet(ack(0), T0)
    assert blocks(w1) == [1, 2, 3, 4]
    assert [data(p)[1] for p in w1] == [content[i * 512 : (i + 1) * 512] for i in range(4)]
    w2 = xfer.on_packet(ack(4), T0)
    assert blocks(w2) == [5, 6, 7, 8]
    # The client got 5 and 6 but not 7: it acknowledges 6, the window restarts at 7.
    again = xfer.on_packet(ack(6), T0)
    assert blocks(again) == [7, 8, 9, 10]
    assert [data(p)[1] for p in again] == [content[i * 512 : (i + 1) * 512] for i in range(6, 10)]
    last = xfer.on_packet(ack(10), T0)
    assert blocks(last) == [11] and data(last[0])[1] == content[10 * 512 :]
    assert xfer.on_packet(ack(11), T0) == [] and xfer.done and xfer.error is None


def test_window_ack_beyond_what_was_sent_is_ignored() -> None:
    xfer, _ = make(pattern(20 * 512), {"windowsize": "4"})
    xfer.on_packet(ack(0), T0)
    assert xfer.on_packet(ack(5), T0) == []  # 5 was never sent
    assert xfer.acked == 0
    assert blocks(xfer.on_packet(ack(4), T0)) == [5, 6, 7, 8]


def test_window_is_cut_at_the_last_block() -> None:
    content = pattern(5 * 512)  # blocks 1-5 full, 6 empty
    xfer, _ = make(content, {"windowsize": "16"})
    w = xfer.on_packet(ack(0), T0)
    assert blocks(w) == [1, 2, 3, 4, 5, 6] and data(w[-1])[1] == b""
    assert xfer.on_packet(ack(6), T0) == [] and xfer.done


# --- Sorcerer's Apprentice: duplicate ACKs never send -----------------------------------


def test_duplicate_ack_sends_nothing_lockstep() -> None:
    xfer, _ = make(pattern(5000))
    assert blocks(xfer.on_packet(ack(1), T0)) == [2]
    deadline = xfer.deadline
    for _ in range(5):
        assert xfer.on_packet(ack(1), T0 + 0.5) == []  # the duplicate of what moved us
        assert xfer.on_packet(ack(0), T0 + 0.5) == []  # stale
    assert xfer.deadline == deadline  # duplicates do not re-arm the timer either
    assert blocks(xfer.on_packet(ack(2), T0 + 0.5)) == [3]


def test_duplicate_ack_sends_nothing_windowed() -> None:
    xfer, _ = make(pattern(20 * 512), {"windowsize": "4"})
    xfer.on_packet(ack(0), T0)
    assert blocks(xfer.on_packet(ack(4), T0)) == [5, 6, 7, 8]
    assert xfer.on_packet(ack(4), T0) == []
    assert xfer.on_packet(ack(2), T0) == []
    assert blocks(xfer.on_packet(ack(8), T0)) == [9, 10, 11, 12]


# --- timer: retransmission, backoff, give-up --------------------------------------------


def test_timer_retransmits_with_backoff_and_gives_up_after_max_retries() -> None:
    """A peer that has acknowledged a block, then goes silent."""
    content = pattern(5000)
    xfer, _ = make(content)
    first = xfer.on_packet(ack(1), T0)
    assert blocks(first) == [2]
    assert xfer.deadline == T0 + 1.0
    assert xfer.on_timer(T0 + 0.5) == []  # early ticks do nothing
    now = T0 + 1.0
    delays = []
    for retry in range(1, tx.MAX_RETRIES + 1):
        out = xfer.on_timer(now)
        assert out == first, f"retry {retry} resends block 2 unchanged"
        assert xfer.retries == retry
        assert xfer.deadline is not None
        delays.append(xfer.deadline - now)
        now = xfer.deadline
    # 1 s timeout, doubled per retry, capped at 8x.
    assert delays == [min(8.0, 2.0**r) for r in range(1, tx.MAX_RETRIES + 1)]
    assert xfer.on_timer(now) == []
    assert xfer.done and xfer.error == "timed out" and xfer.deadline is None
    assert xfer.on_packet(ack(2), now) == []


@pytest.mark.parametrize("options", [{}, {"blksize": "1024", "tsize": "0", "timeout": "255"}])
def test_a_peer_that_never_answers_gets_two_resends_within_5_s(options: dict[str, str]) -> None:
    """Reflection (issue 14): a spoofed request must not earn the victim a long series of
    packets, nor hold a slot for minutes, whatever timeout it asked for."""
    xfer, first = make(pattern(5000), options)
    sent, now = [first], T0
    while not xfer.done:
        assert xfer.deadline is not None
        now = xfer.deadline
        if out := xfer.on_timer(now):
            sent.append(out)
    assert len(sent) == 1 + tx.SILENT_RETRIES == 3
    assert all(p == first for p in sent)
    assert now - T0 == 5.0  # sends at 0, 1 and 3 s; given up at 5 s
    assert xfer.error == "timed out: no answer to the first packet"


def test_scarce_slots_give_up_on_silent_peers_sooner() -> None:
    xfer, first = make(pattern(5000))
    assert xfer.on_timer(T0 + 1.0, scarce=True) == first
    assert xfer.on_timer(T0 + 3.0, scarce=True) == []
    assert xfer.done  # one resend, 3 s
    heard, _ = make(pattern(50 * 512), {"timeout": "255"})  # its timeout: not while scarce
    heard.on_packet(ack(0), T0)
    heard.on_packet(ack(1), T0)
    now, resends = T0 + 255.0, 0  # the first wait was armed by an ACK: its timeout
    assert heard.deadline == now
    while not heard.done:
        assert heard.deadline is not None
        now = heard.deadline
        resends += bool(heard.on_timer(now, scarce=True))
    assert resends == tx.SCARCE_RETRIES and now - T0 == 255 + 2 + 4 + 8


def test_progress_resets_the_retries() -> None:
    xfer, _ = make(pattern(5000), {"timeout": "3"})
    assert blocks(xfer.on_packet(ack(0), T0)) == [1]
    assert xfer.deadline == T0 + 3.0
    assert blocks(xfer.on_timer(T0 + 3.0)) == [1]
    assert blocks(xfer.on_timer(T0 + 9.0)) == [1]  # 3 s * 2
    assert xfer.retries == 2 and xfer.deadline == T0 + 9.0 + 12.0  # 3 s * 4
    assert blocks(xfer.on_packet(ack(1), T0 + 10.0)) == [2]
    assert xfer.retries == 0 and xfer.deadline == T0 + 13.0


def test_timer_resends_the_whole_unacknowledged_window() -> None:
    xfer, _ = make(pattern(20 * 512), {"windowsize": "4"})
    xfer.on_packet(ack(0), T0)
    xfer.on_packet(ack(4), T0)
    assert xfer.deadline is not None
    assert blocks(xfer.on_timer(xfer.deadline)) == [5, 6, 7, 8]


def test_lost_oack_is_resent_then_given_up() -> None:
    xfer, first = make(pattern(5000), {"blksize": "1024"})
    now = T0
    for _ in range(tx.SILENT_RETRIES):  # the OACK never acknowledged: a silent peer
        assert xfer.deadline is not None
        now = xfer.deadline
        assert xfer.on_timer(now) == first  # the OACK again
    assert xfer.deadline is not None
    assert xfer.on_timer(xfer.deadline) == []
    assert xfer.done and xfer.error == "timed out: no answer to the first packet"


# --- block-number rollover --------------------------------------------------------------


def test_block_numbers_roll_over_from_65535_to_0() -> None:
    blksize = 8
    nblocks = 70_000  # > 65535 blocks with 8-byte blocks: 560 kB, generated in memory
    content = pattern(blksize * nblocks + 3)
    xfer, _ = make(content, {"blksize": str(blksize)})
    packets = xfer.on_packet(ack(0), T0)
    out = bytearray()
    numbers: list[int] = []
    for _ in range(nblocks + 10):
        block, payload = data(packets[0])
        numbers.append(block)
        out += payload
        if len(numbers) == 65540:
            # A stale ACK from before the wrap (65535 again) maps outside the window.
            assert xfer.on_packet(ack(65535), T0) == []
        packets = xfer.on_packet(ack(block), T0)
        if xfer.done:
            break
    assert xfer.done and xfer.error is None
    assert bytes(out) == content
    assert len(numbers) == nblocks + 1
    assert numbers[65533:65538] == [65534, 65535, 0, 1, 2]
    assert numbers == [n & 0xFFFF for n in range(1, nblocks + 2)]


def test_rollover_with_windows() -> None:
    content = pattern(8 * 66_000)
    xfer, _ = make(content, {"blksize": "8", "windowsize": "64"})
    packets = xfer.on_packet(ack(0), T0)
    out = bytearray()
    for _ in range(5000):
        got = [data(p) for p in packets]
        out += b"".join(p for _, p in got)
        packets = xfer.on_packet(ack(got[-1][0]), T0)
        if xfer.done:
            break
    assert xfer.done and bytes(out) == content


# --- the lock-step fast path (on_ack_fast) ----------------------------------------------


def state(xfer: ReadTransfer) -> tuple[Any, ...]:
    return (
        xfer.acked,
        xfer.sent_upto,
        xfer.retries,
        xfer.deadline,
        xfer.done,
        xfer.error,
        xfer.bytes_sent,
    )


def fast_or_general(xfer: ReadTransfer, packet: bytes, now: float) -> list[bytes]:
    """What the session shell does with a datagram: the fast path, else on_packet."""
    buf = bytearray(packet) + bytearray(16)  # a receive buffer longer than the datagram
    got = xfer.on_ack_fast(buf, len(packet), now)
    return [bytes(got)] if got is not None else xfer.on_packet(packet, now)


def make_fast(
    content: bytes, options: dict[str, str] | None = None, reads: list[int] | None = None
) -> tuple[ReadTransfer, list[bytes]]:
    """A transfer whose fast path reads through `readinto` (each read's offset noted)."""

    def readinto(buffers: list[memoryview], offset: int) -> int:
        if reads is not None:
            reads.append(offset)
        return _fill(content, buffers, offset)

    neg = negotiate(options or {}, len(content))
    xfer = ReadTransfer(
        lambda off, n: content[off : off + n], len(content), neg, T0, readinto=readinto
    )
    return xfer, xfer.start(T0)


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ({}, 512 * 100 + 17),  # no OACK: the fast path opens at once
        ({"blksize": "1468", "tsize": "0"}, 1468 * 200),  # ends with an empty block
        ({"blksize": "8"}, 8 * 70_000 + 3),  # block numbers roll over under the fast path
        ({"blksize": "65464"}, 65464 * 3 + 1),  # one read-ahead slot
    ],
)
def test_fast_path_sends_and_records_exactly_what_on_packet_does(
    options: dict[str, str], size: int
) -> None:
    """Two transfers of the same file, the same ACKs (with duplicates, a stale one, a
    lost one and timer ticks): one through on_ack_fast + on_packet, the other through
    on_packet only. Every packet and every piece of state must be the same."""
    content = pattern(size)
    reads: list[int] = []
    fast, first_f = make_fast(content, options, reads)
    slow, first_s = make(content, options)
    assert first_f == first_s
    packets, now = first_f, T0
    if options:
        packets = fast_or_general(fast, ack(0), now)
        assert packets == slow.on_packet(ack(0), now)
    out = bytearray()
    fast_hits = 0
    for step in range(size // int(options.get("blksize", 512)) + 10):
        block, payload = data(packets[0])
        out += payload
        now += 0.001
        if step % 997 == 5:  # the ACK is lost: the timer resends the same block
            now = fast.deadline or now
            again = fast.on_timer(now)
            assert again == slow.on_timer(now) == packets
        if step % 1009 == 7:  # duplicates and a stale ACK: nothing on either path
            for extra in (ack(block - 1), ack(block - 1), ack(block + 5)):
                assert fast_or_general(fast, extra, now) == []
                assert slow.on_packet(extra, now) == []
        buf = bytearray(ack(block))
        hit = fast.on_ack_fast(buf, 4, now)
        fast_hits += hit is not None
        packets = [bytes(hit)] if hit is not None else fast.on_packet(ack(block), now)
        assert packets == slow.on_packet(ack(block), now), f"block {block + 1}"
        assert state(fast) == state(slow)
        if fast.done:
            break
    assert fast.done and fast.error is None and bytes(out) == content
    assert fast_hits >= size // int(options.get("blksize", 512)) - 10  # the common case
    # One read per slot-full, at block boundaries, not one per block.
    blksize = int(options.get("blksize", 512))
    assert all(off % blksize == 0 for off in reads)
    assert len(reads) <= fast_hits // tx.ReadAhead(lambda b, o: 0, blksize).count + 2


def test_fast_path_declines_everything_but_the_in_order_ack() -> None:
    """Each of these goes to on_packet, with the transfer untouched by on_ack_fast."""
    content = pattern(512 * 10 + 1)
    xfer, _ = make_fast(content, {"blksize": "512"})
    before = state(xfer)
    buf = bytearray(ack(0))
    assert xfer.on_ack_fast(buf, 4, T0) is None  # ACK 0 of the OACK: on_packet
    assert state(xfer) == before
    assert blocks(xfer.on_packet(ack(0), T0)) == [1]
    before = state(xfer)
    declined = [
        ack(0),  # duplicate of the OACK's ACK
        ack(2),  # a block not sent yet
        ack(1) + b"x",  # an ACK with trailing bytes: on_packet takes it, not the fast path
        struct.pack("!HH", tx.OP_ERROR, 0) + b"bye\0",
        struct.pack("!HH", tx.OP_DATA, 1),  # a 4-byte packet that is not an ACK
        struct.pack("!HH", 0x0104, 1),  # opcode with a high byte set
        b"\0\4\0",  # a runt
    ]
    for packet in declined:
        buf = bytearray(packet) + bytearray(8)
        assert xfer.on_ack_fast(buf, len(packet), T0) is None, packet
        assert state(xfer) == before, packet


def test_fast_path_stays_shut_for_windows_and_the_last_block() -> None:
    content = pattern(512 * 8 + 5)  # blocks 1-8 full, 9 short
    windowed, _ = make_fast(content, {"windowsize": "2"})
    windowed.on_packet(ack(0), T0)
    assert windowed.on_ack_fast(bytearray(ack(2)), 4, T0) is None
    assert blocks(windowed.on_packet(ack(2), T0)) == [3, 4]
    xfer, first = make_fast(content)
    packets = first
    for block in range(1, 8):  # ACKs 1-7 send full blocks 2-8 on the fast path
        assert blocks(packets) == [block]
        got = xfer.on_ack_fast(bytearray(ack(block)), 4, T0)
        assert got is not None
        packets = [bytes(got)]
    assert xfer.on_ack_fast(bytearray(ack(8)), 4, T0) is None  # the short block 9: general
    last = xfer.on_packet(ack(8), T0)
    assert blocks(last) == [9] and data(last[0])[1] == content[8 * 512 :]
    assert xfer.on_ack_fast(bytearray(ack(9)), 4, T0) is None
    assert xfer.on_packet(ack(9), T0) == [] and xfer.done
    assert xfer.bytes_sent == len(content)
    assert xfer.on_ack_fast(bytearray(ack(9)), 4, T0) is None  # nothing after the end


def test_fast_path_lost_ack_retransmits_and_times_out() -> None:
    """After fast-path blocks, a lost ACK: the timer resends the same bytes with
    backoff, an in-order ACK resumes the fast path, and silence ends it as timed out."""
    content = pattern(512 * 50)
    xfer, _ = make_fast(content, {"timeout": "2"})
    xfer.on_packet(ack(0), T0)
    sent = {}
    for block in range(1, 10):
        got = xfer.on_ack_fast(bytearray(ack(block)), 4, T0 + block)
        assert got is not None
        sent[block + 1] = bytes(got)
    assert xfer.deadline == T0 + 9 + 2.0  # re-armed by the fast path
    assert xfer.on_timer(T0 + 10.9) == []
    assert xfer.on_timer(T0 + 11.0) == [sent[10]]  # the block whose ACK was lost
    assert xfer.retries == 1 and xfer.deadline == T0 + 11.0 + 4.0
    got = xfer.on_ack_fast(bytearray(ack(10)), 4, T0 + 12)
    assert got is not None and data(bytes(got)) == (11, content[10 * 512 : 11 * 512])
    assert xfer.retries == 0 and xfer.deadline == T0 + 14.0
    now = T0 + 14.0
    for _ in range(tx.MAX_RETRIES):
        assert xfer.on_timer(now) == [bytes(got)]
        assert xfer.deadline is not None
        now = xfer.deadline
    assert xfer.on_timer(now) == []
    assert xfer.done and xfer.error == "timed out" and xfer.deadline is None
    assert xfer.on_ack_fast(bytearray(ack(11)), 4, now) is None


def test_fast_path_duplicate_ack_does_not_double_send() -> None:
    content = pattern(512 * 20)
    xfer, _ = make_fast(content)
    got = xfer.on_ack_fast(bytearray(ack(1)), 4, T0)
    assert got is not None and data(bytes(got))[0] == 2
    deadline = xfer.deadline
    for _ in range(5):
        assert xfer.on_ack_fast(bytearray(ack(1)), 4, T0 + 0.5) is None
        assert xfer.on_packet(ack(1), T0 + 0.5) == []
    assert xfer.deadline == deadline and xfer.sent_upto == 2
    got = xfer.on_ack_fast(bytearray(ack(2)), 4, T0 + 0.6)
    assert got is not None and data(bytes(got))[0] == 3


def test_read_ahead_slots_and_a_file_that_shrinks() -> None:
    reads: list[tuple[int, int]] = []
    content = bytearray(pattern(100 * 1468))

    def readinto(buffers: list[memoryview], offset: int) -> int:
        reads.append((offset, len(buffers)))
        return _fill(content, buffers, offset)

    ahead = tx.ReadAhead(readinto, 1468)
    assert ahead.count == tx.READAHEAD_SLOTS  # 32 x 1472 bytes fit in 64 KiB
    assert tx.ReadAhead(readinto, 65464).count == 1
    first = ahead.load(1)
    assert data(bytes(first)) == (1, bytes(content[:1468]))
    assert reads == [(0, 32)] and ahead.loaded == 32
    assert data(bytes(ahead.slots[31]))[0] == 32
    del content[1468 * 90 :]  # the file shrinks to 90 blocks
    assert ahead.load(80) is ahead.slots[0] and ahead.loaded == 11  # blocks 80-90
    with pytest.raises(tx.FileChanged, match="shrank"):
        ahead.load(91)
    small = pattern(8 * 65_600)
    tiny = tx.ReadAhead(lambda bufs, off: _fill(small, bufs, off), 8)
    tiny.load(65_530)  # block numbers wrap inside one read: 65535, then 0, 1 ...
    assert [data(bytes(p))[0] for p in tiny.slots[4:8]] == [65534, 65535, 0, 1]
    assert data(bytes(tiny.slots[6]))[1] == small[65_535 * 8 : 65_536 * 8]


def test_lockstep_taken_records_what_on_ack_fast_would() -> None:
    """The C loop's report (services/tftp/_lockstep.c) applied with lockstep_taken
    leaves the transfer as the same ACKs through on_ack_fast do; lockstep() is open
    exactly when on_ack_fast could take an ACK."""
    content = pattern(1468 * 100 + 5)
    a, _ = make_fast(content, {"blksize": "1468"})
    b, _ = make_fast(content, {"blksize": "1468"})
    assert a.lockstep() is None  # the OACK is not acknowledged yet
    for x in (a, b):
        x.on_packet(ack(0), T0)
    state = b.lockstep()
    assert state is not None and state[:2] == (1, 100)  # block 1 sent, ACKs of blocks below 100
    for k in range(1, 41):
        assert a.on_ack_fast(bytearray(ack(k)), 4, T0 + k) is not None
    ahead = a.lockstep()
    assert ahead is not None
    b.lockstep_taken(41, ahead[2].first, ahead[2].loaded, T0 + 40)
    for attr in ("acked", "sent_upto", "retries", "deadline", "bytes_sent"):
        assert getattr(b, attr) == getattr(a, attr), attr
    assert (b.acked, b.sent_upto, b.deadline) == (40, 41, T0 + 40 + b.neg.timeout)
    b.lockstep_taken(41, ahead[2].first, ahead[2].loaded, T0 + 99)  # nothing taken: no change
    assert b.deadline == T0 + 40 + b.neg.timeout
    with pytest.raises(ValueError, match="outside the fast path"):
        b.lockstep_taken(40, 1, 0, T0)  # backwards
    with pytest.raises(ValueError, match="outside the fast path"):
        b.lockstep_taken(101, 1, 0, T0)  # the short last block is not the fast path's
    b.lockstep_taken(100, 65, 32, T0 + 50)
    assert b.lockstep() is None  # the ACK of block 100 goes the long way (short block 101)
    windowed, _ = make_fast(content, {"blksize": "1468", "windowsize": "4"})
    windowed.on_packet(ack(0), T0)
    assert windowed.lockstep() is None


def _fill(content: bytes | bytearray, buffers: list[memoryview], offset: int) -> int:
    done = 0
    for buf in buffers:
        chunk = content[offset + done : offset + done + len(buf)]
        buf[: len(chunk)] = chunk
        done += len(chunk)
    return done


def test_abort_ends_with_an_error_packet() -> None:
    xfer, _ = make(pattern(5000))
    packets = xfer.abort("the file shrank")
    assert [error(p) for p in packets] == [(tx.ERR_UNDEFINED, "the file shrank")]
    assert xfer.done and xfer.error == "the file shrank" and xfer.deadline is None
    assert xfer.abort("again") == [] and xfer.error == "the file shrank"


# --- files: the jail ---------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "tftp"
    (root / "sub").mkdir(parents=True)
    (root / "pxelinux.0").write_bytes(b"loader")
    (root / "sub" / "b.bin").write_bytes(b"inner")
    (root / "text.txt").write_bytes(b"line 1\nline 2\r\nend")
    (tmp_path / "secret").write_text("outside\n")
    (tmp_path / "outdir").mkdir()
    (root / "out").symlink_to(tmp_path / "secret")
    (root / "outdir").symlink_to(tmp_path / "outdir")
    (root / "abs-passwd").symlink_to("/etc/passwd")
    (root / "in").symlink_to("sub/b.bin")
    (root / "subdir").symlink_to("sub")
    return root


def test_jailed_plain_names(root: Path) -> None:
    real = root.resolve()
    assert jailed(root, "pxelinux.0") == real / "pxelinux.0"
    assert jailed(root, "sub/b.bin") == real / "sub" / "b.bin"
    assert jailed(root, "./sub//b.bin") == real / "sub" / "b.bin"
    assert jailed(root, "sub\\b.bin") == real / "sub" / "b.bin"  # DOS-style separators


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "../secret",
        "sub/../../secret",
        "sub/../pxelinux.0",  # '..' is refused even when it would stay inside
        "/../secret",
        "..\\secret",
        "sub\\..\\..\\secret",
        "images/../../secret",
    ],
)
def test_jailed_refuses_dot_dot(root: Path, name: str) -> None:
    with pytest.raises(Refused) as exc:
        jailed(root, name)
    assert exc.value.code == tx.ERR_ACCESS


@pytest.mark.parametrize("name", ["pxelinux.0\0", "\0../secret", "sub/\0b.bin"])
def test_jailed_refuses_nul(root: Path, name: str) -> None:
    with pytest.raises(Refused) as exc:
        jailed(root, name)
    assert exc.value.code == tx.ERR_ACCESS


@pytest.mark.parametrize("name", ["", "/", ".", "//./"])
def test_jailed_refuses_empty_names(root: Path, name: str) -> None:
    with pytest.raises(Refused) as exc:
        jailed(root, name)
    assert exc.value.code == tx.ERR_NOT_FOUND


def test_absolute_names_stay_inside_the_root(root: Path) -> None:
    real = root.resolve()
    assert jailed(root, "/etc/passwd") == real / "etc" / "passwd"
    assert jailed(root, "\\etc\\passwd") == real / "etc" / "passwd"
    assert jailed(root, "//pxelinux.0") == real / "pxelinux.0"


@pytest.mark.parametrize("name", ["out", "outdir", "outdir/x", "abs-passwd", "/out"])
def test_symlinks_leaving_the_root_are_refused(root: Path, name: str) -> None:
    with pytest.raises(Refused) as exc:
        jailed(root, name)
    assert exc.value.code == tx.ERR_ACCESS


def test_symlinks_inside_the_root_are_followed(root: Path) -> None:
    real = root.resolve()
    assert jailed(root, "in") == real / "sub" / "b.bin"
    assert jailed(root, "subdir/b.bin") == real / "sub" / "b.bin"


def test_a_root_reached_through_a_symlink_works(tmp_path: Path, root: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    assert jailed(alias, "sub/b.bin") == root.resolve() / "sub" / "b.bin"
    with pytest.raises(Refused):
        jailed(alias, "out")


# --- files: open_source -------------------------------------------------------------------


def _boot_plan(tmp_path: Path, **boot: Any) -> BootPlan:
    return _plan(tmp_path, **boot).boot


def _plan(tmp_path: Path, **boot: Any) -> Plan:
    raw = loopback_inventory(tmp_path)
    raw["listen"]["http"] = "127.0.0.1:8080"
    raw["boot"].update(
        {
            "kernel_args": ["console=tty0", "console=ttyS0,115200n8"],
            "rootfs": "rhcos/rootfs.img",
            "image": "rhcos/metal.raw.gz",
            "install_device": "/dev/nvme0n1",
        }
    )
    raw["boot"].update(boot)
    raw["nodes"][1]["kernel_args"] = ["ip=enp1s0f0:dhcp", "nvidia-drm.modeset=1"]
    raw["nodes"][2]["install_device"] = "/dev/sdb"
    return build_plan(parse_inventory(raw, "inv.yaml", tmp_path))


def never(_node: str) -> bool:
    return False


def always(_node: str) -> bool:
    return True


@pytest.fixture
def boot_plan(tmp_path: Path, root: Path) -> BootPlan:
    plan = _boot_plan(tmp_path)
    images = plan.images_dir / "rhcos"
    images.mkdir(parents=True)
    (images / "installer-kernel").write_bytes(b"K" * 1000)
    (plan.images_dir.parent / "img-secret").write_bytes(b"no")
    assert plan.tftp_root == root
    return plan


def test_open_source_real_files(boot_plan: BootPlan) -> None:
    src = open_source(boot_plan, "pxelinux.0", never)
    try:
        assert src.size == 6 and src.read(0, 100) == b"loader" and src.read(2, 2) == b"ad"
        assert src.path == "pxelinux.0" and src.node is None
    finally:
        src.close()
    img = open_source(boot_plan, "/images/rhcos/installer-kernel", never)
    try:
        assert img.size == 1000 and img.read(990, 512) == b"K" * 10
        assert img.path == "images/rhcos/installer-kernel"
    finally:
        img.close()


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("missing", tx.ERR_NOT_FOUND),
        ("/etc/passwd", tx.ERR_NOT_FOUND),  # looked up as <root>/etc/passwd
        ("sub", tx.ERR_NOT_FOUND),  # a directory
        ("../secret", tx.ERR_ACCESS),
        ("out", tx.ERR_ACCESS),
        ("images/../img-secret", tx.ERR_ACCESS),
        ("images\\..\\img-secret", tx.ERR_ACCESS),
        ("images/rhcos/../../img-secret", tx.ERR_ACCESS),
        ("//[x/pxelinux.0", tx.ERR_NOT_FOUND),  # a name, not a URL: no ValueError
        ("C:pxelinux.0", tx.ERR_NOT_FOUND),
        ("pxelinux.0#x", tx.ERR_NOT_FOUND),
    ],
)
def test_open_source_refusals(boot_plan: BootPlan, name: str, code: int) -> None:
    with pytest.raises(Refused) as exc:
        open_source(boot_plan, name, never)
    assert exc.value.code == code


def test_open_source_refuses_a_fifo_without_hanging(boot_plan: BootPlan) -> None:
    os.mkfifo(boot_plan.tftp_root / "fifo")
    with pytest.raises(Refused) as exc:
        open_source(boot_plan, "fifo", never)
    assert exc.value.code == tx.ERR_NOT_FOUND


def test_split_target_splits_only_at_the_first_question_mark() -> None:
    split = bootconfig.split_target
    assert split("boot.ipxe?mac=52:54:00:00:00:50") == ("boot.ipxe", "mac=52:54:00:00:00:50")
    assert split("a?b?c") == ("a", "b?c")
    assert split("//etc/passwd") == ("//etc/passwd", "")
    assert split("//[x/y") == ("//[x/y", "")
    assert split("c:x#y") == ("c:x#y", "")


@pytest.mark.parametrize(
    ("remote", "expected"),
    [
        ("127.0.0.50", "127.0.0.50"),
        ("::ffff:127.0.0.50", "127.0.0.50"),  # an IPv4 client of a dual-stack socket
        ("::1", None),
        ("fe80::1", None),
        ("", None),
        ("not an address", None),
    ],
)
def test_client_ipv4(remote: str, expected: str | None) -> None:
    got = bootconfig.client_ipv4(remote)
    assert (str(got) if got is not None else None) == expected


def test_netascii_conversion() -> None:
    assert to_netascii(b"a\nb\r\nc\rd") == b"a\r\nb\r\0\r\nc\r\0d"
    assert to_netascii(b"") == b""


def test_open_source_netascii(boot_plan: BootPlan) -> None:
    src = open_source(boot_plan, "text.txt", never, netascii=True)
    assert not src.raw  # never preadv or the C loop: the bytes are converted
    src.prepare()  # the count pass (in the transfer's thread)
    assert src.read(0, 1000) == b"line 1\r\nline 2\r\0\r\nend"
    assert src.size == len(b"line 1\r\nline 2\r\0\r\nend")
    gen = open_source(boot_plan, "pxelinux.cfg/01-52-54-00-00-00-50", never, netascii=True)
    raw = open_source(boot_plan, "pxelinux.cfg/01-52-54-00-00-00-50", never)
    assert raw.content is not None and gen.content == to_netascii(raw.content)
    assert b"\r\n" in gen.read(0, gen.size) and b"\r\n" not in raw.read(0, raw.size)


@pytest.mark.parametrize("blksize", [8, 512, 1000, 65464])
def test_netascii_streams_in_chunks_with_the_same_bytes(
    boot_plan: BootPlan, monkeypatch: pytest.MonkeyPatch, blksize: int
) -> None:
    """Small chunks (100 raw bytes) so blocks straddle them; CR and LF at the edges;
    reads in order, again (a resend) and backwards: always to_netascii's bytes."""
    monkeypatch.setattr(files_module, "NETASCII_CHUNK", 100)
    raw = (b"\n" * 99 + b"\r" + b"x\r\n" * 70 + bytes(range(256))) * 7 + b"\r"
    (boot_plan.tftp_root / "chunks.txt").write_bytes(raw)
    want = to_netascii(raw)
    src = open_source(boot_plan, "chunks.txt", never, netascii=True)
    src.prepare()
    assert src.netascii is not None and src.size == len(want)
    assert len(src.netascii.starts) == len(raw) // 100 + 2  # an offset per chunk: small
    got = b"".join(src.read(o, blksize) for o in range(0, src.size + blksize, blksize))
    assert got == want
    for offset in (src.size - 1, 0, 150, 99, 100, 101, src.size, src.size + 5):
        assert src.read(offset, blksize) == want[offset : offset + blksize]
    again = open_source(boot_plan, "chunks.txt", never, netascii=True)
    again.prepare()  # the same file unchanged: its count is reused, not read again
    assert again.netascii is not None and again.netascii.starts is src.netascii.starts
    again.close()
    (boot_plan.tftp_root / "chunks.txt").write_bytes(raw + b"\n")  # changed: counted again
    grown = open_source(boot_plan, "chunks.txt", never, netascii=True)
    grown.prepare()
    assert grown.size == len(want) + 2
    grown.close()
    xfer = ReadTransfer(src.read, src.size, negotiate({}, src.size), T0)
    out, packets = b"", xfer.start(T0)
    while packets:
        out += packets[0][4:]
        packets = xfer.on_packet(ack(data(packets[0])[0]), T0)
    assert out == want and xfer.done and xfer.error is None
    src.close()


def test_netascii_too_large_is_refused_before_reading(boot_plan: BootPlan) -> None:
    path = boot_plan.tftp_root / "huge.txt"
    with path.open("wb") as fh:
        fh.truncate(files_module.NETASCII_LIMIT + 1)  # sparse: nothing is read
    with pytest.raises(Refused) as err:
        open_source(boot_plan, "huge.txt", never, netascii=True)
    assert err.value.code == 0


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("A" * 512, 0),  # ENAMETOOLONG: "File name too long", as tftpd-hpa
        ("B" * 5000, 0),
        ("exists.bin/x", 1),  # ENOTDIR
        ("loop1", 0),  # ELOOP
    ],
)
def test_open_source_os_errors_are_refusals(boot_plan: BootPlan, name: str, code: int) -> None:
    (boot_plan.tftp_root / "exists.bin").write_bytes(b"x")
    (boot_plan.tftp_root / "loop1").symlink_to("loop2")
    (boot_plan.tftp_root / "loop2").symlink_to("loop1")
    with pytest.raises(Refused) as err:
        open_source(boot_plan, name, never)
    assert err.value.code == code and str(err.value)


def test_open_source_generated_configs(boot_plan: BootPlan) -> None:
    src = open_source(boot_plan, "pxelinux.cfg/01-52-54-00-00-00-50", never)
    assert src.node is not None and src.node.node == "master-0"
    assert b"KERNEL images/rhcos/installer-kernel" in src.read(0, src.size)
    ipxe = open_source(boot_plan, "boot.ipxe?mac=52:54:00:00:00:44", never)
    assert ipxe.node is not None and ipxe.node.node == "worker-0"
    # A file of the same name in the root never shadows the generated config.
    (boot_plan.tftp_root / "pxelinux.cfg").mkdir()
    (boot_plan.tftp_root / "pxelinux.cfg" / "default").write_text("DEFAULT evil\n")
    default = open_source(boot_plan, "pxelinux.cfg/default", never)
    assert b"LOCALBOOT 0" in default.read(0, default.size)


# --- bootconfig ---------------------------------------------------------------------------

MASTER_MAC = "52:54:00:00:00:50"
PXE_NAME = "01-52-54-00-00-00-50"


@pytest.fixture
def plan(tmp_path: Path) -> BootPlan:
    return _boot_plan(tmp_path)


def master(plan: BootPlan) -> NodeBoot:
    return plan.by_mac[MASTER_MAC]


def test_kernel_args_are_complete_and_in_order(plan: BootPlan) -> None:
    args = master(plan).kernel_args
    base = "http://127.0.0.1:8080"
    # Live PXE with an image written explicitly; the node's ip= replaces the derived one.
    assert args == (
        "ip=enp1s0f0:dhcp",
        "rd.neednet=1",
        "console=tty0",
        "console=ttyS0,115200n8",
        f"coreos.live.rootfs_url={base}/images/rhcos/rootfs.img",
        "coreos.inst.install_dev=/dev/nvme0n1",
        f"coreos.inst.image_url={base}/images/rhcos/metal.raw.gz",
        f"coreos.inst.ignition_url={base}/ignition/master.ign",
        "nvidia-drm.modeset=1",
    )
    worker = plan.by_mac["52:54:00:00:00:44"]
    assert "coreos.inst.install_dev=/dev/sdb" in worker.kernel_args
    assert f"coreos.inst.ignition_url={base}/ignition/worker.ign" in worker.kernel_args
    assert "ip=enp1s0f0:dhcp" not in worker.kernel_args


def _line(text: str, start: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(start)]
    assert len(lines) == 1, text
    return lines[0]


def test_pxelinux_installs_a_node(plan: BootPlan) -> None:
    text, node = bootconfig.virtual_file(plan, f"pxelinux.cfg/{PXE_NAME}", never) or ("", None)
    assert node == master(plan)
    assert "DEFAULT install" in text and "LOCALBOOT" not in text
    assert _line(text, "KERNEL") == "KERNEL images/rhcos/installer-kernel"
    assert _line(text, "INITRD") == "INITRD images/rhcos/installer-initramfs.img"
    assert _line(text, "APPEND") == "APPEND " + " ".join(master(plan).kernel_args)


def test_grub_installs_a_node(plan: BootPlan) -> None:
    text, node = bootconfig.virtual_file(plan, f"grub.cfg-{PXE_NAME}", never) or ("", None)
    assert node == master(plan)
    assert "exit" not in text and "menuentry 'Install master-0 (master)'" in text
    linux = _line(text, "linux ")
    assert linux == "linux /images/rhcos/installer-kernel " + " ".join(master(plan).kernel_args)
    assert _line(text, "initrd ") == "initrd /images/rhcos/installer-initramfs.img"


def test_ipxe_installs_a_node(plan: BootPlan) -> None:
    text, node = bootconfig.virtual_file(plan, "boot.ipxe", never, f"mac={MASTER_MAC}") or (
        "",
        None,
    )
    assert node == master(plan)
    assert text.startswith("#!ipxe\n") and text.rstrip().endswith("boot")
    kernel = _line(text, "kernel ")
    words = kernel.split()
    assert words[1] == "http://127.0.0.1:8080/images/rhcos/installer-kernel"
    assert words[2] == "initrd=initrd"  # UEFI kernels find the initrd by this name
    assert tuple(words[3:]) == master(plan).kernel_args
    assert _line(text, "initrd ") == (
        "initrd --name initrd http://127.0.0.1:8080/images/rhcos/installer-initramfs.img"
    )
    assert "exit" not in text


@pytest.mark.parametrize(
    ("path", "query"),
    [
        (f"pxelinux.cfg/{PXE_NAME}", ""),
        (f"/pxelinux.cfg/{PXE_NAME}", ""),
        (f"pxelinux.cfg/{PXE_NAME.upper()}", ""),
        (f"boot/pxelinux.cfg/{PXE_NAME}", ""),  # pxelinux asks relative to its own folder
        (f"grub.cfg-{PXE_NAME}", ""),
        (f"/grub.cfg-{PXE_NAME}", ""),
        ("boot.ipxe", f"mac={MASTER_MAC}"),
        ("/boot.ipxe", "mac=52-54-00-00-00-50"),
        ("/boot.ipxe", "mac=52%3A54%3A00%3A00%3A00%3A50"),
    ],
)
def test_every_spelling_finds_the_node(plan: BootPlan, path: str, query: str) -> None:
    found = bootconfig.virtual_file(plan, path, never, query)
    assert found is not None and found[1] == master(plan)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def _local(kind: str, text: str) -> bool:
    """Whether one config boots from disk; it must say exactly one of install and local."""
    lines = _lines(text)
    install = {"pxelinux": "KERNEL ", "grub": "linux ", "ipxe": "kernel "}[kind]
    local = {"pxelinux": "LOCALBOOT 0", "grub": "exit", "ipxe": "exit"}[kind]
    installs = any(line.startswith(install) for line in lines)
    assert installs != (local in lines), text
    return not installs


def _three(plan: BootPlan, installed: Callable[[str], bool], mac: str) -> dict[str, str]:
    pxe = "01-" + mac.replace(":", "-")
    out = {}
    for kind, (path, query) in {
        "pxelinux": (f"pxelinux.cfg/{pxe}", ""),
        "grub": (f"grub.cfg-{pxe}", ""),
        "ipxe": ("boot.ipxe", f"mac={mac}"),
    }.items():
        found = bootconfig.virtual_file(plan, path, installed, query)
        assert found is not None
        out[kind] = found[0]
    return out


def _says_local(configs: dict[str, str]) -> bool:
    verdicts = {kind: _local(kind, text) for kind, text in configs.items()}
    assert len(set(verdicts.values())) == 1, configs  # the three always agree
    return next(iter(verdicts.values()))


def test_installed_nodes_boot_from_local_disk(plan: BootPlan) -> None:
    def installed(node: str) -> bool:
        return node == "master-0"

    assert _says_local(_three(plan, installed, MASTER_MAC))
    assert not _says_local(_three(plan, installed, "52:54:00:00:00:44"))  # worker-0 installs
    assert not _says_local(_three(plan, never, MASTER_MAC))
    texts = _three(plan, installed, MASTER_MAC)
    assert "master-0 is installed" in texts["pxelinux"]
    assert "DEFAULT local" in texts["pxelinux"]


def test_unknown_machines_always_boot_locally(plan: BootPlan) -> None:
    for installed in (never, always):
        assert _says_local(_three(plan, installed, "de:ad:be:ef:00:01"))
    text, node = bootconfig.virtual_file(plan, "boot.ipxe", never, "mac=not-a-mac") or ("", 1)
    assert node is None and text.splitlines()[-1] == "exit"


def test_pxelinux_default_and_plain_grub_cfg_boot_locally(plan: BootPlan) -> None:
    for path in ("pxelinux.cfg/default", "/pxelinux.cfg/default", "grub.cfg", "/grub.cfg"):
        found = bootconfig.virtual_file(plan, path, never)
        assert found is not None and found[1] is None
        assert _local("pxelinux" if "pxelinux" in path else "grub", found[0])


def test_ipxe_chain_asks_again_with_the_booting_nic(plan: BootPlan) -> None:
    text, node = bootconfig.virtual_file(plan, "boot.ipxe", never, "") or ("", 1)
    assert node is None
    assert text == "#!ipxe\nchain http://127.0.0.1:8080/boot.ipxe?mac=${netX/mac}\n"


def test_after_install_reinstall_always_installs(tmp_path: Path) -> None:
    plan = _boot_plan(tmp_path, after_install="reinstall")
    assert plan.after_install == "reinstall"
    assert not _says_local(_three(plan, always, MASTER_MAC))
    # ...but never an unknown machine.
    assert _says_local(_three(plan, always, "de:ad:be:ef:00:01"))


@pytest.mark.parametrize(
    "path",
    [
        "undionly.kpxe",
        "pxelinux.cfg",
        "pxelinux.cfg/01-52-54-00-00-00",  # too short
        "pxelinux.cfg/C0A80001",  # pxelinux's IP-hex names fall through to files
        "pxelinux.cfg/default.bak",
        "grub.cfg-52-54-00-00-00-50",
        "boot.ipxe.bak",
        "sub/boot.ipxe",
    ],
)
def test_other_names_are_not_generated(plan: BootPlan, path: str) -> None:
    assert bootconfig.virtual_file(plan, path, never) is None
