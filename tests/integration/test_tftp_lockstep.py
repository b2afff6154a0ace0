"""The lock-step loop in C against the core it stands in for: same packets, same state.

services/tftp/_lockstep.c takes, outside Python, the ACKs `ReadTransfer.on_ack_fast`
takes, and hands back everything else. Here two `ReadTransfer`s on the same file get
the same datagrams: one through `on_ack_fast`/`on_packet` as the Python session loop
calls them, the other through `_lockstep.run` over a connected UDP pair on loopback
(the only way to feed it: it reads a socket), with `lockstep_taken` and `on_packet` for
what it declines. After every batch the packets that came out and the transfers'
states must be the same: rollover past block 65535, duplicates, stale and future ACKs,
runts, over-long ACKs, empty datagrams, client errors, a file that shrinks.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.tftp.transfer import (
    OP_ACK,
    OP_DATA,
    OP_ERROR,
    FileChanged,
    Negotiated,
    ReadTransfer,
)

try:
    from services.tftp import _lockstep
except ImportError:
    _lockstep = None  # type: ignore[assignment]  # mypy types the name as the module

if _lockstep is None:
    if os.environ.get("APPLIANCE_REQUIRE_NATIVE"):
        raise RuntimeError("services.tftp._lockstep was not built, and this run requires it")
    pytest.skip("services.tftp._lockstep is not built (no C compiler)", allow_module_level=True)

HEAD = struct.Struct("!HH")
BATCH = 128  # datagrams queued at once: well inside the pair's receive buffers
# s: the C loop's wait (its timer). A loopback send has normally delivered when it
# returns, so running out mostly means the batch is all read; when the kernel deferred
# delivery, the loop just runs again, for up to BATCH_LIMIT.
DRAINED = 0.001
BATCH_LIMIT = 20.0


def ack(block: int, extra: bytes = b"") -> bytes:
    return HEAD.pack(OP_ACK, block & 0xFFFF) + extra


class Pair:
    """A connected UDP pair on loopback: `server` is what the C loop reads and sends on."""

    def __init__(self) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for sock in (self.server, self.client):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind(("127.0.0.1", 0))
        self.server.connect(self.client.getsockname())
        self.client.connect(self.server.getsockname())
        self.server.settimeout(None)  # blocking: SO_RCVTIMEO is the timer, as in a session
        self.set_wait(self.server, DRAINED)

    @staticmethod
    def set_wait(sock: socket.socket, seconds: float) -> None:
        whole = int(seconds)
        tv = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)

    def received(self) -> list[bytes]:
        """Every datagram the server sent that is waiting at the client."""
        out = []
        self.client.setblocking(False)
        try:
            while True:
                out.append(self.client.recv(70000))
        except BlockingIOError:
            return out
        finally:
            self.client.setblocking(True)

    def close(self) -> None:
        self.server.close()
        self.client.close()


class Both:
    """The same transfer twice: `py` driven as the Python loop does, `c` through C."""

    def __init__(self, path: Path, neg: Negotiated) -> None:
        self.fds = [os.open(path, os.O_RDONLY) for _ in range(2)]
        size = os.fstat(self.fds[0]).st_size
        now = time.monotonic()

        def transfer(fd: int) -> ReadTransfer:
            return ReadTransfer(
                lambda off, n: os.pread(fd, n, off), size, neg, now,
                lambda bufs, off: os.preadv(fd, bufs, off),
            )  # fmt: skip

        self.py, self.c = transfer(self.fds[0]), transfer(self.fds[1])
        self.pair = Pair()
        self.py_out = [bytes(p) for p in self.py.start(now)]
        for p in self.c.start(now):
            self.pair.server.send(p)
        self.py_error: str | None = None
        self.c_error: str | None = None
        self.calls = 0
        self.check()

    def close(self) -> None:
        self.pair.close()
        for fd in self.fds:
            os.close(fd)

    def feed(self, datagrams: list[bytes]) -> None:
        for i in range(0, len(datagrams), BATCH):
            batch = datagrams[i : i + BATCH]
            self._python(batch)
            self._c(batch)
            self.check()

    def _python(self, batch: list[bytes]) -> None:
        for d in batch:
            if self.py.done or self.py_error:
                return
            now = time.monotonic()
            try:
                data = self.py.on_ack_fast(d, len(d), now)
            except FileChanged as exc:
                self.py_error = str(exc)
                return
            if data is not None:
                self.py_out.append(bytes(data))
            else:
                self.py_out.extend(bytes(p) for p in self.py.on_packet(d, now))

    def _c(self, batch: list[bytes]) -> None:
        assert _lockstep is not None
        sock = self.pair.server
        for d in batch:
            self.pair.client.send(d)
        pending = len(batch)
        buf = bytearray(1024)
        deadline = time.monotonic() + BATCH_LIMIT
        while pending and not self.c.done and not self.c_error:
            assert time.monotonic() < deadline, f"{pending} datagrams not read"
            state = self.c.lockstep()
            if state is None:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:  # not delivered yet (softirq deferred): wait on
                    continue
                pending -= 1
                for p in self.c.on_packet(bytes(buf[:n]), time.monotonic()):
                    sock.send(p)
                continue
            sent, below, ahead = state
            self.calls += 1
            status, reached, first, loaded, n, when = _lockstep.run(
                sock.fileno(), self.fds[1], ahead.buffer, ahead.count, ahead.blksize,
                sent, below, ahead.first, ahead.loaded, buf, 0,
            )  # fmt: skip
            assert abs(when - time.monotonic()) < 5 or reached == sent
            self.c.lockstep_taken(reached, first, loaded, when)
            pending -= reached - sent
            if status == _lockstep.SHORT_READ:
                self.c_error = f"block {reached} is no longer in the file: it shrank"
                continue
            if status == _lockstep.TIMED_OUT:
                continue  # all read (the loop ends), or some not delivered yet
            assert status == _lockstep.DECLINED, status
            pending -= 1
            for p in self.c.on_packet(bytes(buf[:n]), time.monotonic()):
                sock.send(p)
        # What is left of the batch came after the end: the Python side ignored it too.
        self.pair.server.setblocking(False)
        try:
            while pending:
                sock.recv(2048)
                pending -= 1
        except BlockingIOError:
            pass
        finally:
            self.pair.server.setblocking(True)

    def check(self) -> None:
        got = self.pair.received()
        want, self.py_out = self.py_out, []
        assert len(got) == len(want), (len(got), len(want))
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"packet {i}: C {g[:8]!r} vs Python {w[:8]!r}"
        a, b = self.py, self.c
        assert (b.acked, b.sent_upto, b.retries, b.done, b.error, b.bytes_sent) == (
            a.acked, a.sent_upto, a.retries, a.done, a.error, a.bytes_sent
        )  # fmt: skip
        la, lb = a.lockstep(), b.lockstep()
        assert lb is None if la is None else lb is not None
        if la is not None and lb is not None:
            pa, pb = la[2], lb[2]
            assert (pb.first, pb.loaded) == (pa.first, pa.loaded)
        assert (a.deadline is None) == (b.deadline is None)
        if a.deadline is not None and b.deadline is not None:
            assert abs(a.deadline - b.deadline) < 5.0  # both: the last ACK's time + timeout
        assert self.c_error == self.py_error


@pytest.fixture
def both(tmp_path: Path) -> Iterator[list[Both]]:
    made: list[Both] = []
    yield made
    for b in made:
        b.close()


def make(made: list[Both], tmp: Path, size: int, blksize: int = 8) -> Both:
    path = tmp / "file.bin"
    path.write_bytes(os.urandom(size))
    neg = Negotiated(blksize, 1, 1.0, {"blksize": str(blksize)})
    b = Both(path, neg)
    made.append(b)
    return b


def test_in_order_past_the_rollover(both: list[Both], tmp_path: Path) -> None:
    """70,001 blocks of 8 bytes: block numbers wrap from 65535 to 0 inside the C loop."""
    b = make(both, tmp_path, 8 * 70000 + 3)
    b.feed([ack(i) for i in range(0, 70002)])
    assert b.py.done and b.py.error is None and b.c.done
    assert b.calls >= 70000 // BATCH  # the C loop did the work


@pytest.mark.parametrize("seed", range(8))
def test_random_conversations(both: list[Both], tmp_path: Path, seed: int) -> None:
    """A client that mixes in duplicates, stale and future ACKs, runts, over-long and
    empty datagrams and DATA; some conversations end with the client's ERROR."""
    rnd = random.Random(seed)
    b = make(both, tmp_path, 8 * 400 + rnd.randrange(8), blksize=8)
    script = [ack(0)]
    k = 0  # the block the client has
    while k < 402 and len(script) < 2000:
        r = rnd.random()
        if r < 0.70:
            k += 1
            script.append(ack(k))
        elif r < 0.78:
            script.append(ack(k))  # duplicate
        elif r < 0.82:
            script.append(ack(max(0, k - rnd.randrange(1, 10))))  # stale
        elif r < 0.86:
            script.append(ack(k + rnd.randrange(2, 5)))  # a block not sent yet
        elif r < 0.89:
            script.append(ack(k + 1, b"x"))  # over-long: the general path takes it
            k += 1
        elif r < 0.92:
            script.append(ack(k + 1)[:3])  # runt
        elif r < 0.95:
            script.append(b"")
        elif r < 0.98:
            script.append(HEAD.pack(OP_ACK | 0x100, k + 1))  # not an ACK opcode
        elif seed % 2:
            script.append(HEAD.pack(OP_ERROR, 0) + b"cancelled\0")
            break
        else:
            script.append(HEAD.pack(OP_DATA, k + 1) + b"data")  # from a client: refused
            break
    b.feed(script)


def test_a_file_that_shrinks(both: list[Both], tmp_path: Path) -> None:
    b = make(both, tmp_path, 8 * 5000)
    b.feed([ack(i) for i in range(0, 100)])
    os.truncate(tmp_path / "file.bin", 8 * 150)
    b.feed([ack(i) for i in range(100, 400)])
    assert b.py_error and "shrank" in b.py_error


def test_rearm_sets_the_plain_timeout_after_the_first_ack(both: list[Both], tmp_path: Path) -> None:
    """After a resend the socket waits longer (back-off); the first ACK taken sets the
    transfer's own timeout again, as the Python loop does before its send."""
    assert _lockstep is not None
    b = make(both, tmp_path, 8 * 100)
    b.feed([ack(0)])
    sock = b.pair.server
    Pair.set_wait(sock, 3.0)
    state = b.c.lockstep()
    assert state is not None
    sent, below, ahead = state
    b.pair.client.send(ack(sent))
    t0 = time.monotonic()
    status, reached, *_ = _lockstep.run(
        sock.fileno(), b.fds[1], ahead.buffer, ahead.count, ahead.blksize,
        sent, below, ahead.first, ahead.loaded, bytearray(1024), 200_000,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert (status, reached) == (_lockstep.TIMED_OUT, sent + 1)
    assert 0.15 < elapsed < 2.0
    tv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("@ll"))
    assert struct.unpack("@ll", tv) == (0, 200_000)


def test_errors_come_back_as_negative_errno(both: list[Both], tmp_path: Path) -> None:
    """The client's port closes: the next recv reports ECONNREFUSED (ICMP)."""
    assert _lockstep is not None
    b = make(both, tmp_path, 8 * 100)
    b.feed([ack(0)])
    state = b.c.lockstep()
    assert state is not None
    sent, below, ahead = state
    b.pair.client.close()
    b.pair.server.send(b"\0\3\0\1")  # answered by port unreachable
    time.sleep(0.05)
    status, reached, *_ = _lockstep.run(
        b.pair.server.fileno(), b.fds[1], ahead.buffer, ahead.count, ahead.blksize,
        sent, below, ahead.first, ahead.loaded, bytearray(1024), 0,
    )  # fmt: skip
    assert (status, reached) == (-errno.ECONNREFUSED, sent)


@pytest.mark.parametrize(
    ("count", "blksize", "loaded", "ack_len"),
    [(0, 8, 0, 16), (65, 8, 0, 16), (4, 4, 0, 16), (4, 8, 5, 16), (4, 8, 0, 2), (4, 9000, 0, 16)],
)
def test_inconsistent_arguments_are_refused(
    count: int, blksize: int, loaded: int, ack_len: int
) -> None:
    assert _lockstep is not None
    with pytest.raises(ValueError, match="inconsistent"):
        _lockstep.run(0, 0, bytearray(4 * 12), count, blksize, 0, 1, 0, loaded,
                      bytearray(ack_len), 0)  # fmt: skip
