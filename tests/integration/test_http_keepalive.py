"""Image downloads on one keep-alive connection, in-process on asyncio's own loop.

aiohttp prepares a returned FileResponse itself; a handler that prepared it too sent
the file twice under uvloop and broke the connection under asyncio. Two downloads in a
row on one connection must both arrive whole, with one file open each.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import aiohttp

from appliance.registry import HTTP
from appliance.supervisor import Supervisor, load_plan
from tests.helpers import free_port, loopback_inventory, write_inventory


async def test_two_downloads_on_one_connection(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "rhcos").mkdir(parents=True)
    data = os.urandom(5 << 20)
    (images / "rhcos" / "big.img").write_bytes(data)
    raw = loopback_inventory(tmp_path)
    port = free_port()
    raw["listen"]["http"] = f"127.0.0.1:{port}"
    raw["boot"]["images_dir"] = str(images)
    config = write_inventory(tmp_path / "inv.yaml", raw)
    sup = Supervisor(config, specs=[HTTP])
    await sup.start(load_plan(config))
    try:
        connector = aiohttp.TCPConnector(limit=1)  # one connection for both requests
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(2):
                url = f"http://127.0.0.1:{port}/images/rhcos/big.img"
                async with session.get(url) as resp:
                    assert resp.status == 200
                    assert resp.content_length == len(data)
                    body = await resp.read()
                assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
            assert sup.running["http"].status().to_json()["counters"]["files"] == 2
        # Pipelined: both requests sent before any answer; both answers must come whole.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"GET /images/rhcos/big.img HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write(request * 2)
        await writer.drain()
        for _ in range(2):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            body = await asyncio.wait_for(reader.readexactly(len(data)), 10)
            assert body == data
        writer.close()
    finally:
        await sup.stop()
