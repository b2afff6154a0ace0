"""One TFTP read transfer as a state machine (sans-IO).

RFC 1350 lock-step, RFC 2347 option negotiation (OACK), RFC 2348 blksize, RFC 2349
tsize and timeout, RFC 7440 windowsize. Packets in, packets out, `now` given:
the asyncio side only moves bytes and calls `on_timer` at `deadline`.

Sorcerer's Apprentice (RFC 1123 4.2.3.1): only an ACK that moves the window sends
data; a duplicate ACK sends nothing, and lost packets are resent by the timer.
Block numbers roll over from 65535 to 0 (as tftp-hpa does), so files of any size
go through with small blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_DISK_FULL = 0, 1, 2, 3
ERR_ILLEGAL_OP, ERR_UNKNOWN_TID, ERR_EXISTS, ERR_NO_USER, ERR_OPTIONS = 4, 5, 6, 7, 8

DEFAULT_BLKSIZE = 512
MAX_BLKSIZE = 65464  # RFC 2348
MAX_WINDOW = 64  # our cap on RFC 7440 windowsize: enough to fill a fast link
DEFAULT_TIMEOUT = 1.0
MAX_RETRIES = 6

_DATA_HEAD = struct.Struct("!HH")


def error_packet(code: int, message: str) -> bytes:
    return struct.pack("!HH", OP_ERROR, code) + message.encode("ascii", "replace") + b"\0"


def oack_packet(options: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
    return struct.pack("!H", OP_OACK) + body


@dataclass(frozen=True, slots=True)
class Negotiated:
    blksize: int
    windowsize: int
    timeout: float
    accepted: dict[str, str]  # what goes into the OACK (empty: no OACK, plain RFC 1350)


def negotiate(requested: dict[str, str], size: int | None) -> Negotiated:
    """Accept what we support, within range; unknown or malformed options are ignored."""
    accepted: dict[str, str] = {}
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, DEFAULT_TIMEOUT
    opts = {k.lower(): v for k, v in requested.items()}
    if (v := _int(opts.get("blksize"))) is not None and v >= 8:
        blksize = min(v, MAX_BLKSIZE)
        accepted["blksize"] = str(blksize)
    if "tsize" in opts and size is not None:
        accepted["tsize"] = str(size)
    if (v := _int(opts.get("timeout"))) is not None and 1 <= v <= 255:
        timeout = float(v)
        accepted["timeout"] = str(v)
    if (v := _int(opts.get("windowsize"))) is not None and v >= 1:
        windowsize = min(v, MAX_WINDOW)
        accepted["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, accepted)


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() and len(value) < 10 else None


class ReadTransfer:
    """Sends one file. Feed it the client's packets and timer ticks; send what it returns."""

    def __init__(
        self, read: Callable[[int, int], bytes], size: int, neg: Negotiated, now: float
    ) -> None:
        self.read = read  # (offset, length) -> bytes
        self.size = size
        self.neg = neg
        self.last_block = size // neg.blksize + 1  # the last block is short (maybe empty)
        self.acked = 0  # absolute number of the highest block the client has
        self.sent_upto = 0  # absolute number of the highest block sent in this window
        self.oack_pending = bool(neg.accepted)
        self.retries = 0
        self.deadline: float | None = None
        self.done = False
        self.error: str | None = None  # why it ended early, if it did
        self.bytes_sent = 0
        self._now = now

    # --- events --------------------------------------------------------------------

    def start(self, now: float) -> list[bytes]:
        if self.oack_pending:
            self._arm(now)
            return [oack_packet(self.neg.accepted)]
        return self._window(now)

    def on_packet(self, data: bytes, now: float) -> list[bytes]:
        if self.done or len(data) < 4:
            return []
        opcode, number = _DATA_HEAD.unpack_from(data)
        if opcode == OP_ERROR:
            # A client may abort after learning tsize from the OACK: a normal end.
            self.done = True
            self.error = f"client error {number}: {data[4:-1].decode('ascii', 'replace')}"
            return []
        if opcode != OP_ACK:
            self.done = True
            self.error = f"unexpected opcode {opcode}"
            return [error_packet(ERR_ILLEGAL_OP, "expected an ACK")]
        if self.oack_pending:
            if number != 0:
                return []  # the OACK must be acknowledged with block 0
            self.oack_pending = False
            return self._window(now)
        # Map the 16-bit number into the window we have sent: (acked, sent_upto].
        block = self.acked + ((number - self.acked) & 0xFFFF)
        if block <= self.acked or block > self.sent_upto:
            return []  # duplicate or stale ACK: never resend on it (Sorcerer's Apprentice)
        self.acked = block
        self.retries = 0
        if self.acked >= self.last_block:
            self.done = True
            self.deadline = None
            return []
        # A full window acknowledged: the next one. A partial one (RFC 7440: the client
        # missed a block): everything after the last block it has, again.
        return self._window(now)

    def on_timer(self, now: float) -> list[bytes]:
        if self.done or self.deadline is None or now < self.deadline:
            return []
        self.retries += 1
        if self.retries > MAX_RETRIES:
            self.done = True
            self.error = "timed out"
            self.deadline = None
            return []
        if self.oack_pending:
            self._arm(now)
            return [oack_packet(self.neg.accepted)]
        return self._window(now)  # resend everything not acknowledged

    # --- sending -------------------------------------------------------------------

    def _window(self, now: float) -> list[bytes]:
        first = self.acked + 1
        last = min(self.acked + self.neg.windowsize, self.last_block)
        out = [self._data(block) for block in range(first, last + 1)]
        self.sent_upto = last
        self._arm(now)
        return out

    def _data(self, block: int) -> bytes:
        bs = self.neg.blksize
        payload = self.read((block - 1) * bs, bs) if (block - 1) * bs < self.size else b""
        self.bytes_sent += len(payload)
        return _DATA_HEAD.pack(OP_DATA, block & 0xFFFF) + payload

    def _arm(self, now: float) -> None:
        # Back off on retries so a slow client is not flooded: 1x, 2x, 4x ... capped at 8x.
        self.deadline = now + self.neg.timeout * min(8, 2**self.retries)
