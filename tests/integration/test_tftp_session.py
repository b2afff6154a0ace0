"""The tftp session shell (a worker thread per transfer) over real UDP sockets on loopback.

Each test runs one `Session` in this process: a real file (a `Source` on its fd),
a real connected socket for the server side, and a raw-UDP client socket playing the
client. The transfer's timeout is set to a few tens of milliseconds (a `Negotiated`
made directly: the wire minimum is 1 s) so retransmission, backoff and giving up are
seen in well under two seconds. Both ACK paths are exercised: lock-step (on_ack_fast,
then the general path for the last block, duplicates and timer ticks) and windowed
transfers (the general path only). Every test runs twice: with the lock-step loop in C
(services/tftp/_lockstep.c, counted, so a silent fall-back to Python fails) and with
the Python loop it replaces where no compiler was at hand. The daemon-level tests with
curl and tftp-hpa are in test_tftp_http_real.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from services.tftp import session as session_module
from services.tftp.files import Netascii, Source
from services.tftp.session import Session
from services.tftp.transfer import (
    MAX_RETRIES,
    OP_ACK,
    OP_DATA,
    OP_ERROR,
    Negotiated,
    ReadTransfer,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer  # as services/tftp/_lockstep.pyi has it (3.12: abc)

OP_HEAD = struct.Struct("!HH")
RECV_TIMEOUT = 5.0  # one datagram; generous for a loaded machine
LOG = logging.getLogger("test-tftp-session")


class Peer:
    """The client end: a UDP socket connected to the session's socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(RECV_TIMEOUT)

    def recv(self, timeout: float = RECV_TIMEOUT) -> bytes | None:
        """The next datagram, or None if none comes (or the session's socket is closed:
        an ACK sent after the end is answered by ICMP port unreachable)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(70000)
        except (TimeoutError, ConnectionRefusedError):
            return None

    def ack(self, block: int) -> None:
        self.sock.send(OP_HEAD.pack(OP_ACK, block & 0xFFFF))


class Run:
    """One session: started in its thread, with what `on_done` reported."""

    def __init__(self, tmp: Path, content: bytes, neg: Negotiated) -> None:
        path = tmp / "file.bin"
        path.write_bytes(content)
        self.source = _open(tmp, path.name)
        self.xfer = ReadTransfer(
            self.source.read, self.source.size, neg, time.monotonic(), self.source.readinto
        )
        server, self.peer = _pair()
        self.ended = threading.Event()
        self.session = Session(
            server, self.xfer, self.source, self.peer.sock.getsockname(), self._done, LOG
        )
        self.session.start()

    def _done(self, session: Session) -> None:
        self.ended.set()

    def close(self) -> None:
        self.session.stop()
        self.session.thread.join(5)
        self.session.close()
        self.peer.sock.close()
        self.source.close()


def _open(root: Path, name: str) -> Source:
    """The file as open_source opens a real file: its fd, read with pread/preadv."""
    fd = os.open(root / name, os.O_RDONLY | os.O_CLOEXEC)
    return Source(os.fstat(fd).st_size, fd=fd, path=name)


try:
    from services.tftp import _lockstep
except ImportError:  # not built: no C compiler at install
    _lockstep = None  # type: ignore[assignment]  # mypy types the name as the module


class CountingNative:
    """services.tftp._lockstep, counting its calls and the blocks they took."""

    DECLINED, TIMED_OUT, SHORT_READ = 0, 1, 2

    def __init__(self) -> None:
        assert _lockstep is not None
        assert (_lockstep.DECLINED, _lockstep.TIMED_OUT, _lockstep.SHORT_READ) == (0, 1, 2)
        self.calls = 0
        self.taken = 0

    def run(
        self, sock: int, fd: int, slots: Buffer, count: int, blksize: int, sent: int,
        below: int, first: int, loaded: int, ack: Buffer, rearm_us: int, /,
    ) -> tuple[int, int, int, int, int, float]:  # fmt: skip
        assert _lockstep is not None
        self.calls += 1
        out = _lockstep.run(
            sock, fd, slots, count, blksize, sent, below, first, loaded, ack, rearm_us
        )
        self.taken += out[1] - sent
        return out


def native_required() -> None:
    """CI builds the C loop (.ci/run sets APPLIANCE_REQUIRE_NATIVE): there a missing
    module fails instead of skipping."""
    if _lockstep is None:
        if os.environ.get("APPLIANCE_REQUIRE_NATIVE"):
            pytest.fail("services.tftp._lockstep was not built, and this run requires it")
        pytest.skip("services.tftp._lockstep is not built (no C compiler at install)")


@pytest.fixture(params=["c", "python"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> CountingNative | None:
    """Which lock-step loop the sessions run: the C one (counted) or the Python one."""
    if request.param == "python":
        monkeypatch.setattr(session_module, "NATIVE", None)
        return None
    native_required()
    counting = CountingNative()
    monkeypatch.setattr(session_module, "NATIVE", counting)
    return counting


@pytest.fixture
def runs(tmp_path: Path, loop: CountingNative | None) -> Iterator[list[Run]]:
    made: list[Run] = []
    yield made
    for run in made:
        run.close()


def start(
    runs: list[Run], tmp: Path, content: bytes, *, windowsize: int = 1, timeout: float = 5.0
) -> Run:
    run = Run(tmp, content, Negotiated(512, windowsize, timeout, {}))
    runs.append(run)
    return run


def data(packet: bytes | None) -> tuple[int, bytes]:
    assert packet is not None, "no DATA came"
    op, block = OP_HEAD.unpack_from(packet)
    assert op == OP_DATA, packet[:40]
    return block, packet[4:]


def test_lockstep_transfer_same_bytes(
    runs: list[Run], tmp_path: Path, loop: CountingNative | None
) -> None:
    content = os.urandom(512 * 300 + 99)  # many read-ahead refills, a short last block
    run = start(runs, tmp_path, content)
    out = bytearray()
    for expected in range(1, 302):
        block, payload = data(run.peer.recv())
        assert block == expected
        out += payload
        run.peer.ack(block)
    assert bytes(out) == content
    assert run.ended.wait(5) and run.xfer.done and run.xfer.error is None
    assert run.xfer.bytes_sent == len(content)
    assert run.peer.recv(0.2) is None
    if loop is not None:
        # Blocks 2..300 go out from C (ACKs 1..299), in one call: it hands back the ACK
        # of block 300, and Python sends the short block 301.
        assert (loop.calls, loop.taken) == (1, 299)


def test_lost_ack_retransmits_the_same_block(runs: list[Run], tmp_path: Path) -> None:
    """The ACK of block 40 (well inside the fast path) is withheld: after the timeout
    block 40 comes again, the same bytes, then nothing new before it is acknowledged."""
    content = os.urandom(512 * 80 + 1)
    run = start(runs, tmp_path, content, timeout=0.05)
    out = bytearray()
    expected = 1
    resent = 0
    started = time.monotonic()
    while expected <= 81 and time.monotonic() - started < 30:
        block, payload = data(run.peer.recv())
        if block < expected:
            continue  # a resend on a slow machine: already acknowledged
        assert block == expected
        if block == 40 and not resent:
            withheld = payload
            t0 = time.monotonic()
            again_block, again = data(run.peer.recv())
            assert (again_block, again) == (40, withheld)
            assert time.monotonic() - t0 >= 0.03  # the timer, not an eager resend
            resent += 1
        out += payload
        run.peer.ack(block)
        expected += 1
    assert bytes(out) == content
    assert run.ended.wait(5) and run.xfer.error is None


def test_duplicate_acks_never_double_send(runs: list[Run], tmp_path: Path) -> None:
    """Each ACK is repeated four times (lock-step, Sorcerer's Apprentice): every
    block arrives exactly once, in order; the 5 s timeout keeps the timer out of it."""
    content = os.urandom(512 * 60 + 7)
    run = start(runs, tmp_path, content)
    seen: list[int] = []
    out = bytearray()
    for _ in range(61):
        block, payload = data(run.peer.recv())
        seen.append(block)
        out += payload
        for _ in range(4):
            run.peer.ack(block)
    assert seen == list(range(1, 62))
    assert bytes(out) == content
    assert run.peer.recv(0.3) is None  # nothing after the end either
    assert run.ended.wait(5) and run.xfer.error is None


def test_timeout_backs_off_then_gives_up(runs: list[Run], tmp_path: Path) -> None:
    """The client goes silent after block 10: block 11 is resent MAX_RETRIES times,
    each wait longer than the one before (1x, 2x, 4x, 8x ...), then the session ends."""
    content = os.urandom(512 * 40)
    run = start(runs, tmp_path, content, timeout=0.03)
    for expected in range(1, 11):
        block, _ = data(run.peer.recv())
        assert block == expected
        run.peer.ack(block)
    first, payload = data(run.peer.recv())
    assert first == 11
    times = [time.monotonic()]
    for _ in range(MAX_RETRIES):
        assert data(run.peer.recv()) == (11, payload)
        times.append(time.monotonic())
    assert run.peer.recv(0.6) is None  # given up: no seventh resend
    assert run.ended.wait(5)
    assert run.xfer.done and run.xfer.error == "timed out"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.03 s, then doubled per retry and capped at 8x: 0.03, 0.06, 0.12, 0.24, 0.24, 0.24.
    # Only lower bounds (less 20% for this end's own delays in seeing each packet): a
    # timer never fires early, but a loaded machine may run it late.
    lows = [0.8 * 0.03 * min(8, 2**i) for i in range(MAX_RETRIES)]
    assert all(gap >= low for gap, low in zip(gaps, lows, strict=True)), gaps


def test_windowed_transfer_goes_the_general_path(runs: list[Run], tmp_path: Path) -> None:
    """windowsize 8: windows of 8, duplicates ignored, a lost window end resent whole."""
    content = os.urandom(512 * 40 + 3)
    run = start(runs, tmp_path, content, windowsize=8, timeout=0.05)
    out = bytearray()
    dropped = False
    expected = 1
    for _ in range(200):
        window = [data(run.peer.recv()) for _ in range(min(8, 41 - expected + 1))]
        assert [b for b, _ in window] == list(range(expected, expected + len(window)))
        if expected == 17 and not dropped:
            dropped = True  # this window's ACK is lost: the whole window comes again
            continue
        out += b"".join(p for _, p in window)
        run.peer.ack(window[-1][0])
        run.peer.ack(window[-1][0])  # a duplicate: must not send the next window twice
        expected += len(window)
        if expected > 41:
            break
    assert bytes(out) == content
    assert run.peer.recv(0.3) is None
    assert run.ended.wait(5) and run.xfer.error is None


def test_windowed_timeout_resends_the_window_then_gives_up(runs: list[Run], tmp_path: Path) -> None:
    """windowsize 4 and a client that goes silent after the first window: the second
    window comes again whole MAX_RETRIES times, then the session ends as timed out."""
    run = start(runs, tmp_path, os.urandom(512 * 40), windowsize=4, timeout=0.02)
    assert [data(run.peer.recv())[0] for _ in range(4)] == [1, 2, 3, 4]
    run.peer.ack(4)
    window = [run.peer.recv() for _ in range(4)]
    assert [data(p)[0] for p in window] == [5, 6, 7, 8]
    for _ in range(MAX_RETRIES):
        assert [run.peer.recv() for _ in range(4)] == window
    assert run.peer.recv(0.5) is None
    assert run.ended.wait(5) and run.xfer.error == "timed out"


def test_client_gone_ends_the_session(runs: list[Run], tmp_path: Path) -> None:
    """The client's socket closes: ICMP port unreachable ends the transfer early."""
    run = start(runs, tmp_path, os.urandom(512 * 100), timeout=0.05)
    block, _ = data(run.peer.recv())
    run.peer.ack(block)
    data(run.peer.recv())
    run.peer.sock.close()
    assert run.ended.wait(5)
    assert run.xfer.done and (run.xfer.error or "").startswith("client unreachable")


def test_stop_wakes_a_waiting_session(runs: list[Run], tmp_path: Path) -> None:
    run = start(runs, tmp_path, os.urandom(512 * 100), timeout=30.0)
    data(run.peer.recv())
    t0 = time.monotonic()
    run.session.stop()
    assert run.ended.wait(5) and time.monotonic() - t0 < 2.0
    assert run.xfer.done and run.xfer.error == "stopped"


def test_file_that_shrinks_ends_with_an_error(runs: list[Run], tmp_path: Path) -> None:
    content = os.urandom(512 * 200)
    run = start(runs, tmp_path, content)
    block, _ = data(run.peer.recv())
    os.truncate(tmp_path / "file.bin", 512 * 3)  # as `cp` over a file being served does
    packet: bytes | None = None
    for _ in range(200):
        run.peer.ack(block)
        packet = run.peer.recv()
        assert packet is not None
        if OP_HEAD.unpack_from(packet)[0] == OP_ERROR:
            break
        block, payload = data(packet)
        assert payload == content[(block - 1) * 512 : block * 512]  # never stale bytes
    assert packet is not None and b"shrank" in packet
    assert run.ended.wait(5) and "shrank" in (run.xfer.error or "")


def _pair() -> tuple[socket.socket, Peer]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client.bind(("127.0.0.1", 0))
    server.connect(client.getsockname())
    client.connect(server.getsockname())
    return server, Peer(client)


def test_netascii_is_counted_in_the_session_thread_and_streamed(
    tmp_path: Path, loop: CountingNative | None
) -> None:
    """A netascii source: its size counted by `prepare()` in the thread, the transfer made
    there, never the C loop or preadv (the bytes are converted), same bytes as converted
    in one go."""
    text = b"a\nb\r\n" * 20000 + b"\r"
    (tmp_path / "t.txt").write_bytes(text)
    fd = os.open(tmp_path / "t.txt", os.O_RDONLY)
    source = Source(0, fd=fd, path="t.txt", netascii=Netascii(fd, len(text)))
    server, peer = _pair()
    ended = threading.Event()
    made: list[ReadTransfer] = []

    def make() -> ReadTransfer:
        neg = Negotiated(512, 1, 5.0, {})
        made.append(ReadTransfer(source.read, source.size, neg, time.monotonic()))
        return made[0]

    session = Session(server, make, source, peer.sock.getsockname(), lambda s: ended.set(), LOG)
    assert session.xfer is None
    session.start()
    out = bytearray()
    while True:
        block, payload = data(peer.recv())
        out += payload
        peer.ack(block)
        if len(payload) < 512:
            break
    assert ended.wait(5) and session.xfer is made[0] and made[0].error is None
    assert bytes(out) == text.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    assert loop is None or loop.calls == 0  # never the C loop: it reads the raw file
    session.close()
    peer.sock.close()
    source.close()


def test_a_file_that_cannot_be_prepared_is_an_error_to_the_client(tmp_path: Path) -> None:
    source = Source(0, fd=-1, path="gone.txt", netascii=Netascii(-1, 1000))  # EBADF
    server, peer = _pair()
    ended = threading.Event()

    def make() -> ReadTransfer:
        raise AssertionError("no transfer without a size")

    session = Session(server, make, source, peer.sock.getsockname(), lambda s: ended.set(), LOG)
    session.start()
    packet = peer.recv()
    assert packet is not None and OP_HEAD.unpack_from(packet)[0] == OP_ERROR
    assert ended.wait(5) and session.xfer is None and not session.crashed
    assert "cannot read the file" in (session.error or "")
    session.close()
    peer.sock.close()
