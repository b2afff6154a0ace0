"""What Python itself can do sending one file over HTTP here: a floor for the appliance.

    python bench/http/floor.py PORT FILE MODE

Listens on 127.0.0.1:PORT and answers every connection (one at a time, blocking, no
parsing beyond reading the request) with `200 OK`, Content-Length and the bytes of
FILE, then closes it. MODE says how the body goes out:
  sendfile-cork   os.sendfile in 2 MiB pieces with TCP_CORK set (what nginx does with
                  `sendfile on; tcp_nopush on`)
  sendfile        os.sendfile in 2 MiB pieces, TCP_NODELAY set (aiohttp sets it)
  copy            read 1 MiB into a bytes object, sendall it, repeat; TCP_NODELAY set
                  (what aiohttp's fallback does, without its thread pool and event loop)
Used by bench/http/run.py --profile for the large file only (curl, one at a time).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys


def main(port: int, path: str, mode: str) -> None:
    size = os.path.getsize(path)
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(16)
    while True:
        conn, _ = ls.accept()
        with conn, contextlib.suppress(OSError):  # a client that went away: the next one
            if not conn.recv(65536):
                continue  # a readiness probe
            if mode == "sendfile-cork":
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            else:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(head)
            with open(path, "rb", buffering=0) as f:
                if mode.startswith("sendfile"):
                    offset = 0
                    while offset < size:
                        offset += os.sendfile(conn.fileno(), f.fileno(), offset, 2 << 20)
                else:
                    while chunk := f.read(1 << 20):
                        conn.sendall(chunk)
            if mode == "sendfile-cork":
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
