"""The least a Python TFTP sender can cost, per shell: floors for the appliance's tftp.

    python bench/tftp/floor.py PORT ROOT [--shell thread|reader|protocol] [--asyncio]

Listens on 127.0.0.1:PORT (uvloop unless --asyncio). A read request for a file under
ROOT gets an OACK (blksize, windowsize and tsize as asked, nothing else checked), then
from its own connected socket the blocks of the file: for each ACK of block n (the end
of a window), the next window. No timers, no retransmission, no option checks, no
events, no counters. The shells are the ways a Python server can move the blocks,
each with as little Python as it allows:

  protocol  an asyncio DatagramProtocol per transfer: os.pread and transport.sendto
            per block (the appliance's tftp before the worker threads);
  reader    loop.add_reader on the connected socket: sock.recv_into a preallocated
            buffer, os.preadv behind a DATA header already in place, sock.send of it;
  thread    a worker thread per transfer, blocked in recv on the connected socket:
            recv_into, one os.preadv per 32 blocks into packet slots, send (the shape
            of the appliance's tftp now).

Used by bench/tftp/run.py --profile to split the appliance's cost into "the shell and
the kernel" and "the rest", and to compare the shells.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import threading
from typing import Any

HEAD = struct.Struct("!HH")
SLOTS = 32


class Transfer:
    """What every shell needs: the file, the block size, the window, the OACK."""

    def __init__(self, fd: int, size: int, blksize: int, window: int, oack: bytes) -> None:
        self.fd, self.size, self.blksize, self.window, self.oack = fd, size, blksize, window, oack
        self.last = size // blksize + 1
        self.base = 0  # absolute number of the last block acknowledged

    def acked(self, data: bytes | bytearray, n: int) -> int:
        """The block an ACK moves the window to, or -1 (not an ACK of this window)."""
        op, number = HEAD.unpack_from(data)
        block: int = self.base + ((number - self.base) & 0xFFFF)
        if n < 4 or op != 4 or block > self.base + self.window:
            return -1
        self.base = block
        return block


# --- protocol: asyncio DatagramProtocol --------------------------------------------------


class ProtocolSender(asyncio.DatagramProtocol):
    def __init__(self, t: Transfer) -> None:
        self.t = t
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.sendto(self.t.oack)  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: object) -> None:
        t = self.t
        block = t.acked(data, len(data))
        if block < 0:
            return
        assert self.transport is not None
        if block >= t.last:
            os.close(t.fd)
            self.transport.close()
            return
        bs, fd, send = t.blksize, t.fd, self.transport.sendto
        for b in range(block + 1, min(block + t.window, t.last) + 1):
            send(HEAD.pack(3, b & 0xFFFF) + os.pread(fd, bs, (b - 1) * bs))


# --- reader: add_reader, recv_into, preadv behind a header, send ------------------------


class ReaderSender:
    def __init__(self, t: Transfer, sock: socket.socket) -> None:
        self.t, self.sock = t, sock
        self.packet = bytearray(4 + t.blksize)
        self.packet[1] = 3
        self.view = memoryview(self.packet)
        self.payload = [self.view[4:]]
        self.ack = bytearray(516)
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self.on_readable)
        sock.send(t.oack)

    def on_readable(self) -> None:
        t, sock = self.t, self.sock
        try:
            n = sock.recv_into(self.ack)
        except BlockingIOError:
            return
        block = t.acked(self.ack, n)
        if block < 0:
            return
        if block >= t.last:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            os.close(t.fd)
            return
        bs, packet, view = t.blksize, self.packet, self.view
        for b in range(block + 1, min(block + t.window, t.last) + 1):
            packet[2], packet[3] = b >> 8 & 0xFF, b & 0xFF
            got = os.preadv(t.fd, self.payload, (b - 1) * bs)
            sock.send(view if got == bs else view[: 4 + got])


# --- thread: a blocking worker thread per transfer --------------------------------------


class Slots:
    """SLOTS DATA packets with their headers in place, filled by one os.preadv."""

    def __init__(self, t: Transfer) -> None:
        self.t, self.bs = t, t.blksize
        slot = self.bs + 4
        view = memoryview(bytearray(slot * SLOTS))
        self.slots = [view[i * slot : (i + 1) * slot] for i in range(SLOTS)]
        self.payloads = [s[4:] for s in self.slots]
        for s in self.slots:
            s[1] = 3
        self.first, self.loaded = 0, 0  # the block in slots[0], blocks in the slots

    def packet(self, b: int) -> memoryview:
        i = b - self.first
        if not 0 <= i < self.loaded:
            got = os.preadv(self.t.fd, self.payloads, (b - 1) * self.bs)
            self.first, self.loaded, i = b, max(1, -(-got // self.bs)), 0
            for k in range(self.loaded):
                self.slots[k][2], self.slots[k][3] = (b + k) >> 8 & 0xFF, (b + k) & 0xFF
        tail = self.t.size - (b - 1) * self.bs
        return self.slots[i] if tail >= self.bs else self.slots[i][: 4 + tail]


def thread_sender(t: Transfer, sock: socket.socket) -> None:
    slots = Slots(t)
    ack = bytearray(516)
    recv_into, send = sock.recv_into, sock.send
    send(t.oack)
    try:
        if t.window == 1:
            # Lock-step, inline: the ACK of `sent` sends the next full block from a slot.
            bs, first, loaded, last, sent = t.blksize, 0, 0, t.last, 0
            full = t.size // bs  # blocks 1..full are full ones
            while True:
                n = recv_into(ack)
                if n != 4 or ack[1] != 4 or (ack[2] << 8 | ack[3]) != sent & 0xFFFF:
                    continue
                if sent >= last:
                    return
                sent += 1
                i = sent - first
                if sent > full:  # the short last block
                    send(slots.packet(sent))
                    continue
                if i >= loaded:
                    slots.packet(sent)
                    first, loaded, i = slots.first, slots.loaded, 0
                send(slots.slots[i])
        while True:
            block = t.acked(ack, recv_into(ack))
            if block < 0:
                continue
            if block >= t.last:
                return
            for b in range(block + 1, min(block + t.window, t.last) + 1):
                send(slots.packet(b))
    finally:
        sock.close()
        os.close(t.fd)


# --- requests --------------------------------------------------------------------------


class Listener(asyncio.DatagramProtocol):
    def __init__(self, root: str, shell: str) -> None:
        self.root, self.shell = root, shell
        self.tasks: set[asyncio.Task[Any]] = set()

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
        t = Transfer(fd, size, blksize, window, oack)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.connect(addr)
        if self.shell == "thread":
            threading.Thread(target=thread_sender, args=(t, sock), daemon=True).start()
        elif self.shell == "reader":
            ReaderSender(t, sock)
        else:
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            task = loop.create_task(
                loop.create_datagram_endpoint(lambda: ProtocolSender(t), sock=sock)
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


async def main(port: int, root: str, shell: str) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(
        lambda: Listener(root, shell), local_addr=("127.0.0.1", port)
    )
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("port", type=int)
    p.add_argument("root")
    p.add_argument("--shell", choices=("thread", "reader", "protocol"), default="thread")
    p.add_argument("--asyncio", action="store_true", help="the stock event loop, not uvloop")
    args = p.parse_args()
    if not args.asyncio:
        import uvloop

        uvloop.install()
    asyncio.run(main(args.port, args.root, args.shell))
