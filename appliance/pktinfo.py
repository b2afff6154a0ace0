"""Answer UDP from the address that was asked, on a wildcard IPv4 listener (IP_PKTINFO).

A socket bound to 0.0.0.0 replies from the address the kernel picks for the route: the
interface's primary one. A client that asked a secondary address (an HA floating
address, or network.address that is not the first on its interface) drops a reply from
another address. As dnsmasq and tftpd-hpa do, the destination of each datagram is read
with IP_PKTINFO and the reply is sent with it as its source. An IPv6 wildcard ([::], which
takes IPv4 too, as v4-mapped addresses) does the same with IPV6_PKTINFO.

asyncio's datagram transport has no ancillary data: UdpReader reads the non-blocking
socket with loop.add_reader and recvmsg, several datagrams per readiness callback (one
per callback is what the transport does, and DNS throughput is benchmarked).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

# struct in_pktinfo { int ipi_ifindex; struct in_addr ipi_spec_dst; struct in_addr ipi_addr; }
_PKTINFO_SIZE = 12
# struct in6_pktinfo { struct in6_addr ipi6_addr; int ipi6_ifindex; }
_PKTINFO6_SIZE = 20
_CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO6_SIZE)  # room for either
_ZERO4 = bytes(4)
_IPPROTO_IP = socket.IPPROTO_IP
_IPPROTO_IPV6 = socket.IPPROTO_IPV6
_IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)  # Linux values
_IPV6_PKTINFO: int = getattr(socket, "IPV6_PKTINFO", 50)
_IPV6_RECVPKTINFO: int = getattr(socket, "IPV6_RECVPKTINFO", 49)
MAX_DATAGRAM = 65535  # the largest a UDP datagram can be (IPv4 payload is 65507)
BATCH = 64  # datagrams read per readiness callback: bounded, so other work is not starved

# The local address a datagram was sent to. IPv4: the 4 bytes of in_pktinfo's ipi_spec_dst
# (for a unicast datagram, the header's destination). IPv6: the whole in6_pktinfo (20
# bytes), sent back as it came: its interface index scopes a link-local address (dnsmasq
# does the same).
Dst = bytes
Handler = Callable[[bytes, tuple[Any, ...], Dst | None], None]


def needs_pktinfo(sock: socket.socket) -> bool:
    """A wildcard UDP listener: the only kind whose replies need a chosen source (one
    bound to an address already answers from it)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_DGRAM:
        return False
    return bool(ipaddress.ip_address(sock.getsockname()[0]).is_unspecified)


def enable(sock: socket.socket) -> None:
    """Ask the kernel for each datagram's destination (ancillary data to recvmsg)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(_IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)  # v4-mapped datagrams too
    else:
        sock.setsockopt(_IPPROTO_IP, _IP_PKTINFO, 1)


def parse(ancdata: list[tuple[int, int, bytes]]) -> Dst | None:
    """The destination out of recvmsg's ancillary data; None if it is not there."""
    for level, kind, data in ancdata:
        if level == _IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= _PKTINFO_SIZE:
            return data[4:8]
        if level == _IPPROTO_IPV6 and kind == _IPV6_PKTINFO and len(data) >= _PKTINFO6_SIZE:
            return data[:_PKTINFO6_SIZE]
    return None


def host(dst: Dst) -> str:
    """The destination as an address string (to bind a transfer's socket to it)."""
    if len(dst) == 4:
        return socket.inet_ntoa(dst)
    return socket.inet_ntop(socket.AF_INET6, dst[:16])  # "::ffff:a.b.c.d" when v4-mapped


def ancillary(dst: Dst) -> list[tuple[int, int, bytes]]:
    """sendmsg's ancillary data to send from `dst`. IPv4: ifindex 0, the route picks the
    interface; only the source address is set."""
    if len(dst) == 4:
        return [(_IPPROTO_IP, _IP_PKTINFO, _ZERO4 + dst + _ZERO4)]
    return [(_IPPROTO_IPV6, _IPV6_PKTINFO, dst)]


def sendto(sock: socket.socket, data: bytes, addr: tuple[Any, ...], dst: Dst | None) -> None:
    """Send `data` to `addr` from the local address `dst` (the kernel's choice if None)."""
    if dst is None:
        sock.sendto(data, addr)
    else:
        sock.sendmsg([data], ancillary(dst), 0, addr)


class UdpReader:
    """A bound, non-blocking UDP socket read on the event loop with IP_PKTINFO.

    `handler(data, addr, dst)` gets each datagram; `on_error(exc)` each socket error
    (as DatagramProtocol.error_received). Replies: `sendto(data, addr, dst)`. The same
    calls a transport offers for the rest: close(), is_closing().
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        on_error: Callable[[OSError], None],
        batch: int = BATCH,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.on_error = on_error
        self.batch = batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # dst -> its ancillary data, built once: a host has few addresses (bounded anyway).
        self._ancillary: dict[Dst, list[tuple[int, int, bytes]]] = {}
        sock.setblocking(False)
        enable(sock)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._ready)

    def _ready(self) -> None:
        recvmsg = self.sock.recvmsg
        handler = self.handler
        for _ in range(self.batch):
            if self._closing:  # a handler may have closed us
                return
            try:
                data, ancdata, _flags, addr = recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.on_error(exc)
                return
            # parse(), its IPv4 case inlined: this is the hot path
            if ancdata and ancdata[0][0] == _IPPROTO_IP and ancdata[0][1] == _IP_PKTINFO:
                handler(data, addr, ancdata[0][2][4:8])
            else:
                handler(data, addr, parse(ancdata))

    def sendto(self, data: bytes, addr: tuple[Any, ...], dst: Dst | None) -> None:
        """Send now, or drop: a UDP socket's buffer is full only under a flood, and a
        reply dropped then is one the client asks again (as a lost one)."""
        if self._closing:
            return
        try:
            if dst is None:
                self.sock.sendto(data, addr)
                return
            anc = self._ancillary.get(dst)
            if anc is None:
                if len(self._ancillary) >= 256:
                    self._ancillary.clear()
                anc = self._ancillary[dst] = ancillary(dst)
            self.sock.sendmsg([data], anc, 0, addr)
        except OSError as exc:  # BlockingIOError included
            self.on_error(exc)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
