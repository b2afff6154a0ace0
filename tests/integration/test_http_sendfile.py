"""The zero-copy file body (services/http/sendfile.py) on real loopback connections.

aiohttp's own server and client; os.sendfile is wrapped to count its calls, so a
silent fall-back to aiohttp's chunked copy fails these tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from services.http.sendfile import SendfileResponse

SIZE = 24 << 20


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "initramfs.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    seen = {"sendfile": 0, "would_block": 0}
    real: Callable[[int, int, int, int], int] = os.sendfile

    def counting(out: int, src: int, offset: int, count: int) -> int:
        seen["sendfile"] += 1
        try:
            return real(out, src, offset, count)
        except BlockingIOError:
            seen["would_block"] += 1
            raise

    monkeypatch.setattr(os, "sendfile", counting)  # the module services.http.sendfile calls
    return seen


@pytest.fixture
async def base(blob: Path) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return SendfileResponse(blob)

    app = web.Application()
    app.router.add_get("/blob", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/blob"
    await runner.cleanup()


async def test_slow_reader_gets_every_byte_through_sendfile(
    base: str, blob: Path, calls: dict[str, int]
) -> None:
    digest = hashlib.sha256()
    async with aiohttp.ClientSession() as session, session.get(base) as resp:
        assert resp.status == 200 and resp.content_length == SIZE
        got = 0
        async for chunk in resp.content.iter_chunked(256 << 10):
            digest.update(chunk)
            got += len(chunk)
            if got < 4 << 20:
                await asyncio.sleep(0.002)  # slow at first: the socket fills, sendfile waits
    assert got == SIZE
    assert digest.hexdigest() == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert calls["sendfile"] >= 2 and calls["would_block"] >= 1, calls


async def test_range_head_and_keep_alive(base: str, blob: Path, calls: dict[str, int]) -> None:
    data = blob.read_bytes()
    connector = aiohttp.TCPConnector(limit=1)  # one connection: keep-alive is exercised
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(base, headers={"Range": "bytes=1000-1999"}) as resp:
            assert resp.status == 206
            assert await resp.read() == data[1000:2000]
        async with session.head(base) as resp:
            assert resp.status == 200 and resp.content_length == SIZE
        async with session.get(base, headers={"Range": f"bytes={SIZE - 10}-"}) as resp:
            assert await resp.read() == data[-10:]
        async with session.get(base) as resp:
            assert hashlib.sha256(await resp.read()).digest() == hashlib.sha256(data).digest()
    assert calls["sendfile"] >= 3


async def test_client_gone_mid_body_leaves_the_server_serving(
    base: str, blob: Path, calls: dict[str, int]
) -> None:
    host, port = base.split("//")[1].split("/")[0].split(":")
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(64 << 10)
        writer.transport.abort()  # RST mid-body
    async with aiohttp.ClientSession() as session, session.get(base) as resp:
        assert len(await resp.read()) == SIZE
    assert calls["sendfile"] >= 4
