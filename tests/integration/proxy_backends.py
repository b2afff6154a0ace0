"""Backend servers for the load-balancer tests, in a process of their own.

`python -m tests.integration.proxy_backends` reads one JSON command per line on
stdin and answers one JSON line on stdout. The servers run in this process's own
event loop, so the test's client loops do not slow the health checks down (and
the other way round). Commands:

  {"op": "start", "name": ..., "host": ..., "port": ..., "tls": [cert, key] | null,
   "health_port": int | null}    listen (again, after a kill) on host:port
  {"op": "kill", "name": ...}    stop listening; connections in progress finish
  {"op": "health", "name": ..., "code": 200}   what GET /readyz /healthz /healthz/ready answer
  {"op": "stats"}                per backend: connections served per command, open ones
  {"op": "exit"}

Every connection starts with one line, the command:
  GET <path> HTTP/1.1 ...   an HTTP health check: answers the configured code, closes
  WHO                       answers "<name>\\n" and closes
  ECHO                      answers "<name>\\n", then echoes every line until EOF
  SINK                      reads to EOF (the client's half-close), answers
                            "<sha256 hex> <bytes>\\n" and closes
  BLOB <n>                  sends n bytes of blob_bytes() and closes
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

BLOCK = hashlib.shake_256(b"appliance proxy test").digest((1 << 20) + 7)  # odd size on purpose


def blob_chunks(n: int) -> Iterator[bytes]:
    """The bytes of BLOB n: a fixed pseudo-random block, repeated and cut to n."""
    while n > 0:
        chunk = BLOCK[: min(n, len(BLOCK))]
        n -= len(chunk)
        yield chunk


def blob_sha256(n: int) -> str:
    h = hashlib.sha256()
    for chunk in blob_chunks(n):
        h.update(chunk)
    return h.hexdigest()


class Backend:
    def __init__(self, name: str, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.name, self.host, self.port, self.tls = name, host, port, tls
        self.health = 200
        self.servers: list[asyncio.Server] = []
        self.served: Counter[str] = Counter()
        self.open = 0

    async def start(self, health_port: int | None) -> None:
        self.servers.append(
            await asyncio.start_server(
                self.handle, self.host, self.port, ssl=self.tls, backlog=2048, reuse_address=True
            )
        )
        if health_port is not None:
            self.servers.append(
                await asyncio.start_server(
                    self.handle, self.host, health_port, backlog=128, reuse_address=True
                )
            )

    def kill(self) -> None:
        for server in self.servers:
            server.close()  # listening stops; established connections go on
        self.servers.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
            self.served["errors"] += 1
        finally:
            self.open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        words = line.split()
        cmd = words[0].decode() if words else ""
        self.served[cmd or "empty"] += 1
        if cmd == "GET":
            while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                del header
            path = words[1].decode() if len(words) > 1 else ""
            code = self.health if path in ("/readyz", "/healthz", "/healthz/ready") else 404
            body = f"{self.name} {code}\n".encode()
            writer.write(
                f"HTTP/1.1 {code} Status\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
        elif cmd == "WHO":
            writer.write(f"{self.name}\n".encode())
        elif cmd == "ECHO":
            writer.write(f"{self.name}\n".encode())
            while echo := await reader.readline():
                writer.write(echo)
                await writer.drain()
        elif cmd == "SINK":
            h, n = hashlib.sha256(), 0
            while data := await reader.read(1 << 20):
                h.update(data)
                n += len(data)
            writer.write(f"{h.hexdigest()} {n}\n".encode())
        elif cmd == "BLOB":
            for chunk in blob_chunks(int(words[1])):
                writer.write(chunk)
                await writer.drain()
        await writer.drain()


async def main() -> None:
    loop = asyncio.get_running_loop()
    backends: dict[str, Backend] = {}
    contexts: dict[tuple[str, str], ssl.SSLContext] = {}
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(value: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "start":
                b = backends.get(cmd["name"])
                if b is None:
                    tls = None
                    if cmd.get("tls"):
                        cert, key = cmd["tls"]
                        if (cert, key) not in contexts:
                            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                            ctx.load_cert_chain(cert, key)
                            contexts[cert, key] = ctx
                        tls = contexts[cert, key]
                    b = backends[cmd["name"]] = Backend(cmd["name"], cmd["host"], cmd["port"], tls)
                await b.start(cmd.get("health_port"))
            elif op == "kill":
                backends[cmd["name"]].kill()
            elif op == "health":
                backends[cmd["name"]].health = int(cmd["code"])
            elif op == "stats":
                answer(
                    {
                        "ok": True,
                        "stats": {
                            name: {**b.served, "open": b.open} for name, b in backends.items()
                        },
                    }
                )
                continue
            elif op == "exit":
                answer({"ok": True})
                break
            answer({"ok": True})
        except Exception as exc:  # report, keep serving
            answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    asyncio.run(main())
