"""Moving bytes one way between two TCP sockets: recv/send, then splice() once bulk.

A `Direction` is driven by readiness edges (poller.py): `readable` says the source may
hold bytes, and `pump()` moves what it can until a call would block. It holds at most
one chunk (or one pipe's worth) and reads again only when that is written, so a slow
receiver stops the sender (back-pressure, no unbounded buffers). An EOF is reported
once everything before it is written; the connection passes it on (half-close).

Short exchanges (a TLS handshake, one HTTP request) go through a buffer: a pipe pair
costs more system calls than the bytes do. Past SPLICE_AFTER bytes the direction
switches to splice() socket -> pipe -> socket, between two reads with nothing held,
and the bytes stay in the kernel. Without splice (other systems, out of descriptors,
APPLIANCE_NO_SPLICE) the buffer path goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.proxy.limits import Ledger

CHUNK = 1 << 16  # recv/send buffer
PIPE_SIZE = 1 << 20  # bytes a pipe may hold in flight per direction (splice moves pages)
SPLICE_AFTER = 1 << 18  # bytes through a buffer before a direction switches to splice()
HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = (
    getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0) if HAVE_SPLICE else 0
)

# What pump() ran into; the connection decides what follows.
WAIT = 0  # nothing more to do until the next edge
EOF = 1  # the source ended and everything before it is written
SRC_ERROR = 2  # reading failed (self.error says why)
DST_ERROR = 3  # writing failed


class Direction:
    """src -> dst, edge-driven. `moved` counts bytes written to dst."""

    __slots__ = (
        "buf",
        "done",
        "dst",
        "eof",
        "error",
        "ledger",
        "moved",
        "peer_shut",
        "pending",
        "pipe",
        "readable",
        "splice_wanted",
        "src",
    )

    def __init__(
        self, src: socket.socket, dst: socket.socket, splice: bool, ledger: Ledger | None = None
    ) -> None:
        self.src, self.dst = src, dst
        self.ledger = ledger  # the proxy's descriptors: a pipe is taken from them
        self.buf = b""  # read, not yet written (buffer path)
        self.pending = 0  # bytes in the pipe, not yet written (splice path)
        self.pipe: tuple[int, int] | None = None
        self.readable = False  # an edge said src may hold bytes we have not read
        self.peer_shut = False  # src's peer sent FIN: read on to the EOF past short reads
        self.eof = False
        self.done = False  # EOF passed on, or failed: never pumps again
        self.moved = 0
        self.splice_wanted = splice
        self.error: OSError | None = None

    @property
    def holding(self) -> bool:
        """Bytes read and not yet written: the destination must become writable."""
        return bool(self.buf) or self.pending > 0

    @property
    def wants_read(self) -> bool:
        return not (self.done or self.eof or self.buf or self.pending)

    def pump(self) -> int:
        if self.done:
            return WAIT
        if self.pipe is not None:
            return self._splice()
        while True:
            buf = self.buf
            if buf:
                try:
                    m = self.dst.send(buf)
                except (BlockingIOError, InterruptedError):
                    return WAIT  # the receiver is slow: the next write edge resumes
                except OSError as exc:
                    return self._fail(DST_ERROR, exc)
                self.moved += m
                if m < len(buf):
                    self.buf = buf[m:]
                    return WAIT  # its send buffer is full: wait for the write edge
                self.buf = b""
                if self.splice_wanted and self.moved >= SPLICE_AFTER:
                    self._open_pipe()
                    if self.pipe is not None:
                        return self._splice()
            if self.eof:
                return EOF
            if not self.readable:
                return WAIT
            try:
                data = self.src.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                self.readable = False
                return WAIT
            except OSError as exc:
                return self._fail(SRC_ERROR, exc)
            if not data:
                self.eof = True
                continue
            # A short read emptied the receive queue: new bytes bring a new edge. A FIN
            # seen with the edge is read now (it brings no edge of its own later).
            if len(data) < CHUNK and not self.peer_shut:
                self.readable = False
            self.buf = data

    def _splice(self) -> int:
        assert self.pipe is not None
        r, w = self.pipe
        while True:
            while self.pending:
                try:
                    m = os.splice(r, self.dst.fileno(), self.pending, flags=_SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    return WAIT
                except OSError as exc:
                    return self._fail(DST_ERROR, exc)
                self.pending -= m
                self.moved += m
            if self.eof:
                return EOF
            if not self.readable:
                return WAIT
            try:
                n = os.splice(self.src.fileno(), w, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                # The pipe is empty here, so the socket is: wait for its next edge.
                self.readable = False
                return WAIT
            except OSError as exc:
                return self._fail(SRC_ERROR, exc)
            if n == 0:
                self.eof = True
            self.pending = n

    def _open_pipe(self) -> None:
        self.splice_wanted = False
        ledger = self.ledger
        if ledger is not None and not ledger.take_pipe():
            return  # the proxy's descriptors are mostly spent: stay on recv/send
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            if ledger is not None:
                ledger.give_pipe()
            return  # out of descriptors or pipe memory: stay on recv/send
        with contextlib.suppress(OSError):  # a smaller default pipe still works
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        self.pipe = (r, w)

    def _fail(self, what: int, exc: OSError) -> int:
        self.error = exc
        self.done = True
        return what

    def close(self) -> None:
        """Release the pipe (the sockets belong to the connection)."""
        self.done = True
        if self.pipe is not None:
            for fd in self.pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.pipe = None
            if self.ledger is not None:
                self.ledger.give_pipe()
