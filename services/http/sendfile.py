"""File responses that go out with the kernel's sendfile(), also under uvloop.

uvloop has no `loop.sendfile`, so aiohttp's FileResponse falls back to reading chunks
in the default thread pool and writing them through the transport: two copies and a
thread hand-off per chunk. In a boot storm (hundreds of nodes fetching kernels and
initramfs images at once) that cost the appliance about three times nginx's CPU and
twice its time (bench/storm). Here the body goes out with os.sendfile() on a dup() of
the connection's socket once aiohttp has sent the headers, waiting for writability
with add_writer on that duplicate (the transport keeps its own descriptor, which the
loop already watches). Everything else (Range, HEAD, ETag, If-Modified-Since, 304/416)
stays aiohttp's FileResponse.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

# One sendfile() call at most this much: the socket buffer bounds it anyway, and a
# bound keeps one fast client from holding the loop while the page cache is copied.
MAX_CALL = 4 << 20
# aiohttp's own switch for platforms where sendfile misbehaves; ours follows it.
DISABLED = bool(os.environ.get("AIOHTTP_NOSENDFILE")) or not hasattr(os, "sendfile")


class SendfileResponse(web.FileResponse):
    """aiohttp's FileResponse with a zero-copy body on plain TCP connections."""

    async def _sendfile(
        self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if DISABLED or self.compression or sock is None or transport is None:
            return await super()._sendfile(request, fobj, offset, count)
        if transport.get_extra_info("sslcontext") is not None:
            return await super()._sendfile(request, fobj, offset, count)
        # The headers, through aiohttp (its hooks, its keep-alive bookkeeping).
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
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
            await _send(loop, out, fobj.fileno(), offset, count)
        except OSError as exc:
            # The client went away mid-body: what aiohttp expects a handler to raise.
            raise ConnectionResetError(str(exc)) from exc
        finally:
            if corked:
                _cork(sock, False)  # the last partial segment leaves now
            os.close(out)
        await web.StreamResponse.write_eof(self)
        return writer


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
