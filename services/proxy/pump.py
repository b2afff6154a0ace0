"""Moving bytes between two TCP sockets: splice() through a pipe, or recv/send.

One `Direction` per way. It reads only while its pipe (or buffer) is empty, so a
slow receiver stops the sender (back-pressure, no unbounded buffers). An EOF is
passed on as shutdown(SHUT_WR) once everything before it is written (half-close).
On Linux the bytes never enter Python: splice() moves them socket -> pipe ->
socket inside the kernel; elsewhere a fixed buffer is used, and so it is for a
connection that cannot get a pipe (out of descriptors).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Callable

CHUNK = 1 << 16  # recv/send buffer
PIPE_SIZE = 1 << 20  # bytes a pipe may hold in flight per direction (splice moves pages)
SPLICE_AFTER = 1 << 18  # bytes through a buffer before a direction switches to splice()
HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = (
    getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0) if HAVE_SPLICE else 0
)


class Direction:
    """src -> dst. Calls `on_bytes(n)` as bytes are written and `on_done(error)` at the end."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src: socket.socket,
        dst: socket.socket,
        on_bytes: Callable[[int], None],
        on_done: Callable[[Direction, str | None], None],
        splice: bool = HAVE_SPLICE,
    ) -> None:
        self.loop = loop
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.on_bytes = on_bytes
        self.on_done = on_done
        self.pending = 0  # bytes read but not yet written
        self.eof = False
        self.finished = False
        self.reading = False
        self.writing = False
        self.pipe: tuple[int, int] | None = None
        self.buf = memoryview(b"")
        # Short exchanges (a TLS handshake, one HTTP request) go through a buffer: a pipe
        # pair costs more system calls than the bytes do. Past SPLICE_AFTER bytes the
        # direction switches to splice(), between two reads, with nothing held.
        self.splice_wanted = splice
        self.moved = 0

    def start(self) -> None:
        self._want_read()

    # --- readiness -------------------------------------------------------------------

    def _want_read(self) -> None:
        if not self.reading and not self.finished:
            self.loop.add_reader(self.src_fd, self._on_readable)
            self.reading = True

    def _stop_read(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False

    def _want_write(self) -> None:
        if not self.writing and not self.finished:
            self.loop.add_writer(self.dst_fd, self._on_writable)
            self.writing = True

    def _stop_write(self) -> None:
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False

    # --- moving bytes ------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            if self.pipe is not None:
                n = os.splice(self.src_fd, self.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
            else:
                data = self.src.recv(CHUNK)
                n = len(data)
                self.buf = memoryview(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc.strerror or str(exc))
            return
        if n == 0:
            self.eof = True
            self._stop_read()
        else:
            self.pending += n
        self._flush()

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                if self.pipe is not None:
                    m = os.splice(self.pipe[0], self.dst_fd, self.pending, flags=_SPLICE_FLAGS)
                else:
                    m = self.dst.send(self.buf)
                    self.buf = self.buf[m:]
            except (BlockingIOError, InterruptedError):
                # The receiver is slow: stop reading until it takes what we hold.
                self._stop_read()
                self._want_write()
                return
            except OSError as exc:
                self._finish(exc.strerror or str(exc))
                return
            self.pending -= m
            self.moved += m
            self.on_bytes(m)
        self._stop_write()
        if self.splice_wanted and self.pipe is None and self.moved >= SPLICE_AFTER:
            self._open_pipe()
        if self.eof:
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)  # pass the half-close on
            self._finish(None)
        else:
            self._want_read()

    def _open_pipe(self) -> None:
        self.splice_wanted = False
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of descriptors or pipe memory: stay on recv/send
        with contextlib.suppress(OSError):  # a smaller default pipe still works
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        self.pipe = (r, w)

    def _finish(self, error: str | None) -> None:
        if self.finished:
            return
        self._stop_read()
        self._stop_write()
        self.finished = True
        self.on_done(self, error)

    def close(self) -> None:
        """Release the pipe and the loop's watchers (the sockets belong to the caller)."""
        self._stop_read()
        self._stop_write()
        self.finished = True
        if self.pipe is not None:
            for fd in self.pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.pipe = None
