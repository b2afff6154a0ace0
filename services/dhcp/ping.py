"""ICMP echo for the DHCP ping check: the codec (sans-IO) and a small asyncio pinger.

Before a pool address is offered for the first time it is pinged (RFC 2131 3.1: "the
server SHOULD probe the reserved address before allocating the address"; dnsmasq does
so by default): a machine that answers holds the address without a lease from us, so
the pool skips it. Only echo replies are looked at: silence until the wait ends, or any
ICMP error, means "free".

The socket is an unprivileged ICMP datagram socket where net.ipv4.ping_group_range
allows one (the kernel then fills in the identifier and hands back only our replies),
else a raw ICMP socket (CAP_NET_RAW, which the systemd unit grants). Without either
there is no ping check, said once in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from ipaddress import IPv4Address

ECHO_REPLY, ECHO_REQUEST = 0, 8
SOL_RAW, ICMP_FILTER = 255, 1  # linux/icmp.h: a raw ICMP socket's type filter
_HEAD = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
PAYLOAD = b"appliance dhcp ping check"


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = PAYLOAD) -> bytes:
    body = _HEAD.pack(ECHO_REQUEST, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + payload
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def echo_reply(data: bytes, raw: bool) -> tuple[int, int] | None:
    """(identifier, sequence) of an ICMP echo reply, or None for anything else. `raw`:
    the datagram starts with its IP header (raw sockets), else with the ICMP header."""
    if raw:
        if len(data) < 20 or data[0] >> 4 != 4:
            return None
        data = data[(data[0] & 0x0F) * 4 :]
    if len(data) < _HEAD.size:
        return None
    kind, code, _, ident, seq = _HEAD.unpack_from(data)
    if kind != ECHO_REPLY or code != 0:
        return None
    return int(ident), int(seq)


class Pinger:
    """Pings addresses and says whether they answered within a wait."""

    def __init__(self, sock: socket.socket, raw: bool) -> None:
        self.sock = sock
        self.raw = raw
        # A datagram socket's identifier is its "port", set by the kernel; a raw one's
        # is ours to choose: the process id, as ping(8) does.
        self.ident = sock.getsockname()[1] if not raw else os.getpid() & 0xFFFF
        self.seq = 0
        self.waiting: dict[IPv4Address, tuple[int, asyncio.Future[bool]]] = {}  # seq, answer
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    def open(cls, interface: str | None, log: logging.Logger) -> Pinger | None:
        """A pinger, or None (logged) when this process may open no ICMP socket."""
        errors = []
        for kind, raw in ((socket.SOCK_DGRAM, False), (socket.SOCK_RAW, True)):
            try:
                sock = socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
            except OSError as exc:
                errors.append(f"{'raw' if raw else 'datagram'}: {exc.strerror}")
                continue
            try:
                sock.setblocking(False)
                if interface:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
                if not raw:
                    sock.bind(("0.0.0.0", 0))
                return cls(sock, raw)
            except OSError as exc:
                sock.close()
                errors.append(f"{'raw' if raw else 'datagram'}: {exc.strerror}")
        log.warning(
            "no ICMP socket (%s): pool addresses are offered without a ping check "
            "(needs CAP_NET_RAW or net.ipv4.ping_group_range)",
            "; ".join(errors),
        )
        return None

    async def probe(self, ip: IPv4Address, wait: float) -> bool:
        """True if `ip` answered an echo request within `wait` seconds. A second probe
        of an address already being pinged shares the first one's request."""
        waiting = self.waiting.get(ip)
        mine = waiting is None
        if waiting is None:
            self.seq = (self.seq + 1) & 0xFFFF
            fut: asyncio.Future[bool] = self.loop.create_future()
            waiting = self.waiting[ip] = (self.seq, fut)
            try:
                self.sock.sendto(echo_request(self.ident, self.seq), (str(ip), 0))
            except OSError:
                # No route, or the neighbour is unreachable at once: nobody to answer.
                del self.waiting[ip]
                fut.set_result(False)
        fut = waiting[1]
        try:
            async with asyncio.timeout(wait):
                return await asyncio.shield(fut)
        except TimeoutError:
            return False
        finally:
            if mine:
                if self.waiting.get(ip) is waiting:
                    del self.waiting[ip]
                if not fut.done():
                    fut.set_result(False)  # anyone still sharing it: no answer

    def _readable(self) -> None:
        for _ in range(64):  # bounded per wake-up: other work gets its turn
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued on the socket: not an answer
            reply = echo_reply(data, self.raw)
            if reply is None or reply[0] != self.ident:
                continue
            with contextlib.suppress(ValueError):
                ip = IPv4Address(addr[0])
                waiting = self.waiting.get(ip)
                # The reply to this probe, not a late one to an earlier probe of it.
                if waiting is not None and waiting[0] == reply[1]:
                    del self.waiting[ip]
                    if not waiting[1].done():
                        waiting[1].set_result(True)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for _, fut in self.waiting.values():
            if not fut.done():
                fut.set_result(False)
        self.waiting.clear()
