"""File responses that go out with the kernel's sendfile(), also under uvloop.

uvloop has no `loop.sendfile`, so aiohttp's FileResponse falls back to reading chunks
in the default thread pool and writing them through the transport: two copies and a
thread hand-off per chunk. In a boot storm (hundreds of nodes fetching kernels and
initramfs images at once) that cost the appliance about three times nginx's CPU and
twice its time (bench/storm). Here the body goes out with os.sendfile() on a dup() of
the connection's socket once aiohttp has sent the headers, waiting for writability
with add_writer on that duplicate (the transport keeps its own descriptor, which the
loop already watches).

What to answer (200, 206 with one range or multipart/byteranges, 304, 412, 416) is
decided by services/http/ranges.py from the request's headers and the file's
validators; this module only opens the file and moves the bytes.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from services.http.ranges import content_range, evaluate, file_validators, http_date, multipart

# One sendfile() call at most this much: the socket buffer bounds it anyway, and a
# bound keeps one fast client from holding the loop while the page cache is copied.
MAX_CALL = 4 << 20
# aiohttp's own switch for platforms where sendfile misbehaves; ours follows it.
DISABLED = bool(os.environ.get("AIOHTTP_NOSENDFILE")) or not hasattr(os, "sendfile")
OCTETS = "application/octet-stream"

# A body: bytes to send as they are, or (offset, count) of the file.
Piece = bytes | tuple[int, int]


def content_type(path: Path) -> str:
    kind, encoding = mimetypes.guess_type(path.name)
    # foo.tar.gz is a gzip file to the client (no Content-Encoding is sent for it).
    return OCTETS if kind is None or encoding is not None else kind


def _open(path: Path) -> tuple[int, os.stat_result]:
    # O_NONBLOCK: a FIFO left in the images folder must not hang a worker thread.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise PermissionError("not a regular file")
    return fd, st


class SendfileResponse(web.StreamResponse):
    """A file with Range, conditionals, HEAD and a zero-copy body on plain TCP."""

    def __init__(
        self,
        path: str | Path,
        chunk_size: int = 256 << 10,
        opened: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self._path = Path(path)
        self._chunk_size = chunk_size
        # Told how the open went: 0 (opened), 403 (unreadable) or 404 (gone meanwhile).
        self._opened = opened

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        loop = asyncio.get_running_loop()
        try:
            fd, st = await loop.run_in_executor(None, _open, self._path)
        except PermissionError:
            self.set_status(403)
            self._tell(403)
            return await super().prepare(request)
        except OSError:
            self.set_status(404)
            self._tell(404)
            return await super().prepare(request)
        self._tell(0)
        try:
            return await self._answer(request, fd, st)
        finally:
            os.close(fd)

    def _tell(self, status: int) -> None:
        if self._opened is not None:
            self._opened(status)

    async def _answer(
        self, request: web.BaseRequest, fd: int, st: os.stat_result
    ) -> AbstractStreamWriter | None:
        size = st.st_size
        validators = file_validators(st.st_mtime_ns, size)
        outcome = evaluate(request.method, request.headers, size, validators)
        assert validators.etag is not None and validators.last_modified is not None
        self.headers[hdrs.ETAG] = validators.etag
        self.headers[hdrs.LAST_MODIFIED] = http_date(validators.last_modified)
        self.headers[hdrs.ACCEPT_RANGES] = "bytes"
        self.set_status(outcome.status)
        ctype = content_type(self._path)
        body: list[Piece]
        if outcome.status in (304, 412, 416):
            if outcome.status == 416:
                self.headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
            if outcome.status != 304:
                self.content_length = 0
            return await super().prepare(request)
        if outcome.status == 200:
            self.content_type, self.content_length = ctype, size
            body = [(0, size)]
        elif len(outcome.ranges) == 1:
            first, last = outcome.ranges[0]
            self.headers[hdrs.CONTENT_RANGE] = content_range(first, last, size)
            self.content_type, self.content_length = ctype, last - first + 1
            body = [(first, last - first + 1)]
        else:
            boundary = secrets.token_hex(12)
            parts, tail, total = multipart(outcome.ranges, size, ctype, boundary)
            self.content_type = "multipart/byteranges"
            self.headers[hdrs.CONTENT_TYPE] = f"multipart/byteranges; boundary={boundary}"
            self.content_length = total
            body = [p for head, a, b in parts for p in (head, (a, b - a + 1))] + [tail]
        if request.method == "HEAD" or size == 0:
            return await super().prepare(request)
        return await self._send_body(request, fd, body)

    async def _send_body(
        self, request: web.BaseRequest, fd: int, body: list[Piece]
    ) -> AbstractStreamWriter:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        writer = await super().prepare(request)  # the headers, through aiohttp
        assert writer is not None
        if DISABLED or sock is None or transport is None:
            return await self._copy_body(writer, fd, body)
        if transport.get_extra_info("sslcontext") is not None:
            return await self._copy_body(writer, fd, body)
        await writer.drain()
        loop = asyncio.get_running_loop()
        for _ in range(1000):  # headers still queued in the transport: let them go first
            if not transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.001)
        else:
            raise ConnectionResetError("the client does not take the response headers")
        out = os.dup(sock.fileno())  # same socket, a descriptor of our own to wait on
        corked = _cork(sock, True)
        try:
            for piece in body:
                if isinstance(piece, bytes):
                    await _write(loop, out, piece)
                else:
                    await _send(loop, out, fd, *piece)
        except OSError as exc:
            # The client went away mid-body: what aiohttp expects a handler to raise.
            raise ConnectionResetError(str(exc)) from exc
        finally:
            if corked:
                _cork(sock, False)  # the last partial segment leaves now
            os.close(out)
        await super().write_eof()
        return writer

    async def _copy_body(
        self, writer: AbstractStreamWriter, fd: int, body: list[Piece]
    ) -> AbstractStreamWriter:
        """No sendfile (TLS, AIOHTTP_NOSENDFILE): chunks read in a thread, written through
        aiohttp. The chunk size bounds memory per download."""
        loop = asyncio.get_running_loop()
        for piece in body:
            if isinstance(piece, bytes):
                await writer.write(piece)
                continue
            offset, count = piece
            while count > 0:
                chunk = await loop.run_in_executor(
                    None, os.pread, fd, min(self._chunk_size, count), offset
                )
                if not chunk:
                    raise ConnectionResetError("file shrank while being sent")
                await writer.write(chunk)
                offset += len(chunk)
                count -= len(chunk)
        await super().write_eof()
        return writer


async def _write(loop: asyncio.AbstractEventLoop, out: int, data: bytes) -> None:
    """A multipart part's head, on the same descriptor as the file bytes around it."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(out, view) :]
        except BlockingIOError:
            await _writable(loop, out)


async def _send(
    loop: asyncio.AbstractEventLoop, out: int, src: int, offset: int, count: int
) -> None:
    while count > 0:
        try:
            sent = os.sendfile(out, src, offset, min(count, MAX_CALL))
        except BlockingIOError:
            await _writable(loop, out)
            continue
        if sent == 0:  # the file is shorter than its Content-Length said: it shrank
            raise ConnectionResetError("file shrank while being sent")
        offset += sent
        count -= sent


def _cork(sock: Any, on: bool) -> bool:
    """TCP_CORK around the body (nginx's tcp_nopush): only full segments go out while
    sendfile() feeds the socket; in bench/http it is most of nginx's lead."""
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, int(on))
    except OSError:
        return False
    return True


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready = loop.create_future()
    loop.add_writer(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
