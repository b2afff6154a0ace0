"""The least a Python asyncio TFTP sender can cost: the floor for the appliance's tftp.

    python bench/tftp/floor.py PORT ROOT [--asyncio]

Listens on 127.0.0.1:PORT (uvloop unless --asyncio). A read request for a file under
ROOT gets an OACK (blksize, windowsize and tsize as asked, nothing else checked), then
from its own connected socket the blocks of the file: for each ACK of block n (the end
of a window), the next window read with os.pread and sent with transport.sendto. No
timers, no retransmission, no option checks, no events, no counters: the same event
loop and the same three system calls per block as the appliance, with as little Python
around them as possible. Used by bench/tftp/run.py --profile to split the appliance's
cost into "the loop and the kernel" and "the rest".
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys

HEAD = struct.Struct("!HH")


class Sender(asyncio.DatagramProtocol):
    def __init__(self, fd: int, size: int, blksize: int, window: int, oack: bytes) -> None:
        self.fd, self.size, self.blksize, self.window, self.oack = fd, size, blksize, window, oack
        self.last = size // blksize + 1
        self.base = 0  # absolute number of the last block acknowledged
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.sendto(self.oack)  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: object) -> None:
        op, n = HEAD.unpack_from(data)
        block = self.base + ((n - self.base) & 0xFFFF)
        if op != 4 or block > self.base + self.window:
            return
        self.base = block
        if block >= self.last:
            os.close(self.fd)
            self.transport.close()  # type: ignore[union-attr]
            return
        bs, fd, send = self.blksize, self.fd, self.transport.sendto  # type: ignore[union-attr]
        for b in range(block + 1, min(block + self.window, self.last) + 1):
            send(HEAD.pack(3, b & 0xFFFF) + os.pread(fd, bs, (b - 1) * bs))


class Listener(asyncio.DatagramProtocol):
    def __init__(self, root: str) -> None:
        self.root = root
        self.tasks: set[asyncio.Task[object]] = set()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        parts = data[2:].split(b"\0")
        name = parts[0].decode().lstrip("/")
        opts = {
            parts[i].decode().lower(): parts[i + 1].decode() for i in range(2, len(parts) - 1, 2)
        }
        fd = os.open(os.path.join(self.root, name), os.O_RDONLY)
        size = os.fstat(fd).st_size
        blksize = int(opts.get("blksize", 512))
        window = int(opts.get("windowsize", 1))
        accepted = {"blksize": str(blksize), "tsize": str(size)}
        if "windowsize" in opts:
            accepted["windowsize"] = str(window)
        oack = b"\0\6" + b"".join(
            k.encode() + b"\0" + v.encode() + b"\0" for k, v in accepted.items()
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.connect(addr)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self.tasks.add(
            task := loop.create_task(
                loop.create_datagram_endpoint(
                    lambda: Sender(fd, size, blksize, window, oack), sock=sock
                )
            )
        )
        task.add_done_callback(self.tasks.discard)


async def main(port: int, root: str) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: Listener(root), local_addr=("127.0.0.1", port))
    await asyncio.Event().wait()


if __name__ == "__main__":
    if "--asyncio" not in sys.argv:
        import uvloop

        uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
