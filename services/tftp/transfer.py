"""One TFTP read transfer as a state machine (sans-IO).

RFC 1350 lock-step, RFC 2347 option negotiation (OACK), RFC 2348 blksize, RFC 2349
tsize and timeout, RFC 7440 windowsize. Packets in, packets out, `now` given:
the asyncio side only moves bytes and calls `on_timer` at `deadline`.

Sorcerer's Apprentice (RFC 1123 4.2.3.1): only an ACK that moves the window sends
data; a duplicate ACK sends nothing, and lost packets are resent by the timer.
Block numbers roll over from 65535 to 0 (as tftp-hpa does), so files of any size
go through with small blocks.

Two ways in for an ACK, one set of rules: `on_ack_fast` takes the common case (in
lock-step, the ACK of the block just sent, a full block to follow) with a few integer
compares and returns the next DATA packet from a read-ahead buffer (ReadAhead: no new
objects per block, one read per 32 blocks); it declines everything else, changing
nothing, and `on_packet` decides. The short last block and every resend are built
by `_data` as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The one codec (codec.py); its names are re-exported here for the transfer's users.
from services.tftp.codec import (
    DATA_HEAD,
    ERR_ACCESS,
    ERR_DISK_FULL,
    ERR_EXISTS,
    ERR_ILLEGAL_OP,
    ERR_NO_USER,
    ERR_NOT_FOUND,
    ERR_OPTIONS,
    ERR_UNDEFINED,
    ERR_UNKNOWN_TID,
    OP_ACK,
    OP_DATA,
    OP_ERROR,
    OP_OACK,
    OP_RRQ,
    OP_WRQ,
    error_packet,
    oack_packet,
)

__all__ = [
    "DATA_HEAD", "DEFAULT_BLKSIZE", "DEFAULT_TIMEOUT", "ERR_ACCESS", "ERR_DISK_FULL",
    "ERR_EXISTS", "ERR_ILLEGAL_OP", "ERR_NOT_FOUND", "ERR_NO_USER", "ERR_OPTIONS",
    "ERR_UNDEFINED", "ERR_UNKNOWN_TID", "MAX_BLKSIZE", "MAX_RETRIES", "MAX_WINDOW",
    "OP_ACK", "OP_DATA", "OP_ERROR", "OP_OACK", "OP_RRQ", "OP_WRQ", "READAHEAD_BYTES",
    "READAHEAD_SLOTS", "SCARCE_RETRIES", "SCARCE_SILENT_RETRIES", "SILENT_BACKOFF",
    "SILENT_RETRIES", "FileChanged", "Negotiated", "ReadAhead", "ReadInto", "ReadTransfer",
    "error_packet", "negotiate", "oack_packet",
]  # fmt: skip

DEFAULT_BLKSIZE = 512
MAX_BLKSIZE = 65464  # RFC 2348
MAX_WINDOW = 64  # our cap on RFC 7440 windowsize: enough to fill a fast link
DEFAULT_TIMEOUT = 1.0
MAX_RETRIES = 6
# A peer that has acknowledged nothing yet may never have asked (a spoofed request aims
# our packets at a victim): 2 resends of the first packet, 1 s then 2 s apart, whatever
# timeout it asked for, and it is given up 5 s after the request.
SILENT_RETRIES = 2
SILENT_BACKOFF = 2  # the cap on the doubling, as a factor of the timeout
# While transfer slots are scarce (the server says so at each timer tick): fewer resends.
# And the waits count from 1 s, whatever timeout the client asked for (up to 255 s).
SCARCE_RETRIES = 3  # a peer that went silent mid-transfer: given up after 15 s, not 39
SCARCE_SILENT_RETRIES = 1  # a silent peer: one resend, given up after 3 s

READAHEAD_BYTES = 64 * 1024  # per lock-step transfer: 512 of them hold 32 MiB at most
READAHEAD_SLOTS = 32

_DATA_HEAD = DATA_HEAD

ReadInto = Callable[[list[memoryview], int], int]  # (buffers, offset) -> bytes, like preadv


class FileChanged(Exception):
    """The file no longer holds a block it had when the transfer began."""


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


class ReadAhead:
    """Full DATA packets of consecutive blocks in preallocated slots.

    A slot is one packet: the opcode written once, the block number when the slot is
    read, the payload read straight behind it; one `readinto` fills every slot.
    """

    __slots__ = ("_payloads", "blksize", "buffer", "count", "first", "loaded", "readinto", "slots")

    def __init__(self, readinto: ReadInto, blksize: int) -> None:
        self.readinto = readinto
        self.blksize = blksize
        slot = blksize + 4
        self.count = max(1, min(READAHEAD_SLOTS, READAHEAD_BYTES // slot))
        self.buffer = view = memoryview(bytearray(slot * self.count))  # every slot, in order
        self.slots = [view[i * slot : (i + 1) * slot] for i in range(self.count)]
        self._payloads = [s[4:] for s in self.slots]
        for s in self.slots:
            s[1] = OP_DATA
        self.first = 0  # absolute number of the block in slot 0
        self.loaded = 0  # full blocks in the slots now

    def load(self, block: int) -> memoryview:
        """Read `block` and the ones after it; the packet of `block`."""
        got = self.readinto(self._payloads, (block - 1) * self.blksize)
        self.first = block
        self.loaded = loaded = min(got // self.blksize, self.count)
        if loaded == 0:
            raise FileChanged(f"block {block} is no longer in the file: it shrank")
        for i, slot in enumerate(self.slots[:loaded]):
            n = block + i
            slot[2] = n >> 8 & 0xFF
            slot[3] = n & 0xFF
        return self.slots[0]


class ReadTransfer:
    """Sends one file. Feed it the client's packets and timer ticks; send what it returns.

    `read(offset, length)` gives the bytes of the file; `readinto(buffers, offset)`,
    if given, fills buffers in one go (os.preadv) for the lock-step fast path.
    """

    # Slots: the fast path reads and writes a handful of attributes per block.
    __slots__ = (
        "_ahead",
        "_bytes_resent",
        "_fast_below",
        "_hurry",
        "_readinto",
        "acked",
        "deadline",
        "done",
        "error",
        "last_block",
        "neg",
        "oack_pending",
        "read",
        "retries",
        "sent_upto",
        "size",
    )

    def __init__(
        self,
        read: Callable[[int, int], bytes],
        size: int,
        neg: Negotiated,
        now: float,
        readinto: ReadInto | None = None,
    ) -> None:
        self.read = read  # (offset, length) -> bytes
        self._readinto = readinto or self._readinto_by_read
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
        self._bytes_resent = 0  # payload sent again (first sends follow from sent_upto)
        self._hurry = False  # the last timer tick came while slots were scarce
        # on_ack_fast applies while sent_upto is below this: lock-step, past the OACK,
        # not done, and the next block a full one (the short last block goes the long way).
        self._fast_below = 0
        self._ahead: ReadAhead | None = None  # made when the fast path opens

    # --- events --------------------------------------------------------------------

    def start(self, now: float) -> list[bytes]:
        if self.oack_pending:
            self._arm(now)
            return [oack_packet(self.neg.accepted)]
        self._open_fast_path()
        return self._window(now)

    def on_ack_fast(self, packet: bytes | bytearray, length: int, now: float) -> memoryview | None:
        """The common case of `on_packet`, cheaply; `packet[:length]` is the datagram.

        In lock-step, a 4-byte ACK of the block just sent, with a full block next:
        recorded exactly as `on_packet` would (acknowledged, retries reset, timer
        re-armed) and the DATA packet of the next block is returned, valid until the
        next call. Anything else returns None and changes nothing: pass it to
        `on_packet`. Raises FileChanged if the file shrank meanwhile.
        """
        sent = self.sent_upto
        if (
            length != 4
            or sent >= self._fast_below
            or packet[1] != OP_ACK
            or packet[0]
            or (packet[2] << 8 | packet[3]) != sent & 0xFFFF
        ):
            return None
        # Lock-step keeps sent_upto == acked + 1, so this ACK moves the window by one.
        self.acked = sent
        self.retries = 0
        self.sent_upto = sent = sent + 1
        self.deadline = now + self.neg.timeout  # _arm with no retries
        ahead = self._ahead
        assert ahead is not None  # made with _fast_below
        i = sent - ahead.first
        return ahead.slots[i] if 0 <= i < ahead.loaded else ahead.load(sent)

    def lockstep(self) -> tuple[int, int, ReadAhead] | None:
        """For a loop that takes the fast path's ACKs itself (services/tftp/_lockstep.c):
        (the block sent last, the bound below which its ACK may be taken, the
        read-ahead buffer), or None while `on_ack_fast` would decline every packet."""
        if self.sent_upto >= self._fast_below or self._ahead is None:
            return None
        return self.sent_upto, self._fast_below, self._ahead

    def lockstep_taken(self, sent: int, first: int, loaded: int, when: float) -> None:
        """Record what such a loop did: it took, in order, the ACK of every block from
        the one sent last up to `sent - 1` exactly as `on_ack_fast` takes them (the
        last at `when`), sent up to block `sent`, and left `loaded` blocks from `first`
        in the read-ahead buffer."""
        ahead = self._ahead
        if ahead is None or not self.sent_upto <= sent <= self._fast_below:
            raise ValueError(f"lock-step loop reached block {sent} outside the fast path")
        ahead.first, ahead.loaded = first, loaded
        if sent == self.sent_upto:
            return
        self.acked = sent - 1
        self.retries = 0
        self.sent_upto = sent
        self.deadline = when + self.neg.timeout

    def abort(self, message: str) -> list[bytes]:
        """End the transfer from our side (the file cannot be read): the ERROR to send."""
        if self.done:
            return []
        self._finish(message)
        return [error_packet(ERR_UNDEFINED, message)]

    def on_packet(self, data: bytes, now: float) -> list[bytes]:
        if self.done or len(data) < 4:
            return []
        opcode, number = _DATA_HEAD.unpack_from(data)
        if opcode == OP_ERROR:
            # A client may abort after learning tsize from the OACK: a normal end.
            self._finish(f"client error {number}: {data[4:-1].decode('ascii', 'replace')}")
            return []
        if opcode != OP_ACK:
            self._finish(f"unexpected opcode {opcode}")
            return [error_packet(ERR_ILLEGAL_OP, "expected an ACK")]
        if self.oack_pending:
            if number != 0:
                return []  # the OACK must be acknowledged with block 0
            self.oack_pending = False
            self._open_fast_path()
            return self._window(now)
        # Map the 16-bit number into the window we have sent: (acked, sent_upto].
        block = self.acked + ((number - self.acked) & 0xFFFF)
        if block <= self.acked or block > self.sent_upto:
            return []  # duplicate or stale ACK: never resend on it (Sorcerer's Apprentice)
        self.acked = block
        self.retries = 0
        if self.acked >= self.last_block:
            self._finish(None)
            return []
        # A full window acknowledged: the next one. A partial one (RFC 7440: the client
        # missed a block): everything after the last block it has, again.
        return self._window(now)

    @property
    def heard(self) -> bool:
        """The peer has acknowledged something (the OACK, or a block): it really asked."""
        return self.acked > 0 or (bool(self.neg.accepted) and not self.oack_pending)

    def on_timer(self, now: float, scarce: bool = False) -> list[bytes]:
        """A timer tick; `scarce`: the server is short of transfer slots."""
        if self.done or self.deadline is None or now < self.deadline:
            return []
        self.retries += 1
        heard = self.heard
        self._hurry = scarce
        if scarce:
            limit = SCARCE_RETRIES if heard else SCARCE_SILENT_RETRIES
        else:
            limit = MAX_RETRIES if heard else SILENT_RETRIES
        if self.retries > limit:
            self._finish("timed out" if heard else "timed out: no answer to the first packet")
            return []
        if self.oack_pending:
            self._arm(now)
            return [oack_packet(self.neg.accepted)]
        return self._window(now)  # resend everything not acknowledged

    @property
    def bytes_sent(self) -> int:
        """Payload bytes sent, resends included (blocks go out in order, so the first
        sends are every byte up to the highest block sent)."""
        return min(self.size, self.sent_upto * self.neg.blksize) + self._bytes_resent

    # --- state ---------------------------------------------------------------------

    def _open_fast_path(self) -> None:
        # Files of one full block or less never reach it: no read-ahead buffer for them.
        if self.neg.windowsize == 1 and self.last_block > 2:
            self._fast_below = self.last_block - 1
            self._ahead = ReadAhead(self._readinto, self.neg.blksize)

    def _readinto_by_read(self, buffers: list[memoryview], offset: int) -> int:
        done = 0
        for buf in buffers:
            chunk = self.read(offset + done, len(buf))
            buf[: len(chunk)] = chunk
            done += len(chunk)
            if len(chunk) < len(buf):
                break
        return done

    def _finish(self, error: str | None) -> None:
        self.done = True
        self.error = error
        self.deadline = None
        self._fast_below = 0

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
        if block <= self.sent_upto:
            self._bytes_resent += len(payload)
        return _DATA_HEAD.pack(OP_DATA, block & 0xFFFF) + payload

    def _arm(self, now: float) -> None:
        # Back off on retries so a slow client is not flooded: 1x, 2x, 4x ... capped at 8x.
        if self.heard and not (self.retries and self._hurry):
            self.deadline = now + self.neg.timeout * min(8, 2**self.retries)
        elif self.heard:  # a resend while slots are scarce: see SCARCE_RETRIES
            self.deadline = now + min(self.neg.timeout, DEFAULT_TIMEOUT) * min(8, 2**self.retries)
        else:  # see SILENT_RETRIES: a resend before the client's own timeout is harmless
            base = min(self.neg.timeout, DEFAULT_TIMEOUT)
            self.deadline = now + base * min(SILENT_BACKOFF, 2**self.retries)
