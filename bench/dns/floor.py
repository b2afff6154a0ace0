"""The floor under the appliance's dns service: a UDP server on the same loop that does nothing.

It answers every datagram with the datagram itself, QR set (a NOERROR reply without
records, which dnsperf counts as an answer). Its queries/s is what an asyncio
DatagramProtocol on this loop, one process, one core, can move at all: the gap to
the appliance is the cost of the engine and the service shell, the gap to dnsmasq
the cost of Python and the event loop.

    python bench/dns/floor.py PORT    (127.0.0.1 only; uvloop when installed)
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) >= 12 and not data[2] & 0x80:
            self.transport.sendto(data[:2] + bytes([data[2] | 0x80]) + data[3:], addr)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", port))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    transport.close()


def main() -> None:
    port = int(sys.argv[1])
    try:
        import uvloop

        uvloop.run(serve(port))
    except ImportError:
        asyncio.run(serve(port))


if __name__ == "__main__":
    main()
