"""The dns service: UDP and TCP on `listen.dns`, moving bytes to and from DnsEngine."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import Counter
from typing import Any

from appliance.plan import Plan
from appliance.service import ServiceContext, bind_socket
from services.dns.engine import DnsEngine, Forward, Reply
from services.dns.forwarder import Forwarder

TCP_IDLE = 10.0  # seconds a TCP client may stay silent (RFC 7766 suggests seconds, not minutes)
TCP_MAX_CONNECTIONS = 256
MAX_FORWARDS = 1024  # questions in flight upstream at once; more are refused
RCODE_NAMES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, service: DnsService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        svc = self.service
        try:
            decision = svc.engine.handle(data, addr[0])
        except Exception:  # the service never dies on a packet
            svc.counters["errors"] += 1
            svc.log_error("dns: error on a query from %s", addr[0])
            return
        if decision is None:
            return
        assert self.transport is not None
        if isinstance(decision, Reply):
            svc.rcodes[decision.data[3] & 15] += 1  # a list index: no cost worth a branch
            self.transport.sendto(decision.data, addr)
        else:
            svc.spawn_forward(decision, lambda out: self._send(out, addr))

    def _send(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.service.rcodes[data[3] & 15] += 1
            self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.service.counters["socket_errors"] += 1


class DnsService:
    name = "dns"

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.counters: Counter[str] = Counter()
        self.engine: DnsEngine
        self.forwarder: Forwarder
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self._last_error_log = 0.0
        self.rcodes = [0] * 16  # replies sent, by the RCODE in their header

    async def start(self, plan: Plan) -> None:
        endpoint = plan.listen["dns"]
        self.engine = DnsEngine(plan.dns, self.counters)
        self.forwarder = Forwarder(plan.dns.upstreams, self.counters)
        udp_sock = bind_socket(self.name, endpoint, socket.SOCK_DGRAM)
        try:
            tcp_sock = bind_socket(self.name, endpoint, socket.SOCK_STREAM)
        except Exception:
            udp_sock.close()
            raise
        loop = asyncio.get_running_loop()
        self.udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp_sock)
        self.tcp = await asyncio.start_server(self._tcp_client, sock=tcp_sock)

    async def reload(self, plan: Plan) -> None:
        # One assignment: a query sees the old engine or the new, never half of each.
        self.engine = DnsEngine(plan.dns, self.counters)
        self.forwarder.set_upstreams(plan.dns.upstreams)

    async def stop(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.tcp.wait_closed(), 2)
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task

    def status(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "cache_entries": len(self.forwarder.cache) if hasattr(self, "forwarder") else 0,
            "tcp_connections": self.connections,
            "rcodes": {
                RCODE_NAMES[i] if i < len(RCODE_NAMES) else str(i): n
                for i, n in enumerate(self.rcodes)
                if n
            },
        }

    def log_error(self, msg: str, *args: Any) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last_error_log > 10:  # a flood of bad packets must not flood the log
            self._last_error_log = now
            self.ctx.log.exception(msg, *args)

    # --- forwarding -----------------------------------------------------------------

    def spawn_forward(self, fwd: Forward, send: Any, tcp: bool = False) -> None:
        if len(self.tasks) >= MAX_FORWARDS:
            self.counters["forward_overload"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._forward(fwd, send, tcp))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _forward(self, fwd: Forward, send: Any, tcp: bool) -> None:
        try:
            send(await self.forwarder.resolve(fwd, tcp))
        except Exception:
            self.counters["errors"] += 1
            self.log_error("dns: forwarding failed")

    # --- TCP ------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= TCP_MAX_CONNECTIONS:
            self.counters["tcp_refused"] += 1
            writer.close()
            return
        self.connections += 1
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else ""
        try:
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE):
                        head = await reader.readexactly(2)
                    (length,) = struct.unpack("!H", head)
                    async with asyncio.timeout(TCP_IDLE):
                        data = await reader.readexactly(length)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                out = await self._answer_tcp(data, client)
                if out is None:
                    continue
                self.rcodes[out[3] & 15] += 1
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer_tcp(self, data: bytes, client: str) -> bytes | None:
        try:
            decision = self.engine.handle(data, client, tcp=True)
            if isinstance(decision, Forward):
                return await self.forwarder.resolve(decision, tcp=True)
        except Exception:
            self.counters["errors"] += 1
            self.log_error("dns: error on a TCP query from %s", client)
            return None
        return decision.data if decision is not None else None
