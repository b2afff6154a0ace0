"""The dns service: UDP and TCP on `listen.dns`, moving bytes to and from DnsEngine."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections import Counter
from typing import Any

from appliance.pktinfo import Dst, UdpReader, needs_pktinfo
from appliance.plan import Plan
from appliance.ratelog import RateLimitedLog
from appliance.service import ServiceContext, bind_socket
from appliance.tasks import TaskSet
from services.dns import rcode
from services.dns.engine import DnsEngine, Forward, Reply, unsafe_source
from services.dns.forwarder import Forwarder
from services.dns.status import DnsStatus
from services.dns.tcpslots import TcpLimits, TcpSlots

# 256 connections; 64 per client and 10 s idle (RFC 7766 suggests seconds, not minutes)
# while at most half are used, shrinking to 4 per client and 1 s idle at full.
TCP_LIMITS = TcpLimits()
MAX_FORWARDS = 1024  # questions in flight upstream at once; more are refused
ERROR_LOG_EVERY = 10.0  # s: a flood of bad packets must not flood the log
RCODE_NAMES = rcode.NAMES  # status() names replies by their RCODE


class _Udp(asyncio.DatagramProtocol):
    """The UDP listener: an asyncio transport's protocol, or (a wildcard listener) the
    handler of an appliance.pktinfo.UdpReader, whose replies leave from the address
    each question was sent to (`dst`)."""

    def __init__(self, service: DnsService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None
        self.reader: UdpReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def received(self, data: bytes, addr: tuple[Any, ...], dst: Dst | None = None) -> None:
        svc = self.service
        port = addr[1]
        # Two integer tests on the hot path; the rare hit is judged in unsafe_source.
        if (port < 64 or port == svc.port) and svc.unsafe_source(addr):
            return
        try:
            decision = svc.engine.handle(data, addr[0])
        except Exception:  # the service never dies on a packet
            svc.counters["errors"] += 1
            svc.log_error("dns: error on a query from %s", addr[0])
            return
        if decision is None:
            return
        if isinstance(decision, Reply):
            svc.rcodes[decision.data[3] & 15] += 1  # a list index: no cost worth a branch
            reader = self.reader
            if reader is not None:
                reader.sendto(decision.data, addr, dst)
            else:
                assert self.transport is not None
                self.transport.sendto(decision.data, addr)
        elif svc.forwarder.is_own_source(addr):
            # Our own question to an upstream came back to us: the upstream is us.
            self._send(svc.forward_loop(decision), addr, dst)
        else:
            svc.spawn_forward(decision, lambda out: self._send(out, addr, dst))

    datagram_received = received  # the transport's call (dst None): no extra call per query

    def _send(self, data: bytes, addr: tuple[Any, ...], dst: Dst | None = None) -> None:
        if self.reader is not None:
            if not self.reader.is_closing():
                self.service.rcodes[data[3] & 15] += 1
                self.reader.sendto(data, addr, dst)
        elif self.transport is not None and not self.transport.is_closing():
            self.service.rcodes[data[3] & 15] += 1
            self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.service.counters["socket_errors"] += 1


class DnsService:
    name = "dns"

    def __init__(self, ctx: ServiceContext, plan: Plan) -> None:
        self.ctx = ctx
        self.endpoint = plan.listen["dns"]
        self.counters: Counter[str] = Counter()
        self.engine = DnsEngine(plan.dns, self.counters)
        self.forwarder = Forwarder(plan.dns.upstreams, self.counters)
        # Bound in start (a bind error is start's to raise); None until then.
        self.udp: asyncio.DatagramTransport | UdpReader | None = None
        self.tcp: asyncio.Server | None = None
        self.tasks = TaskSet(ctx.log, "dns forward")  # questions being asked upstream
        self.port = -1  # our listener's port; a datagram from it may be from ourselves
        self.host = ""  # our listener's address; "" when it is a wildcard
        self._local: dict[str, bool] = {}  # address -> is it one of this host's
        self.slots = TcpSlots(TCP_LIMITS)
        self._tcp_timer: asyncio.TimerHandle | None = None
        self._tcp_tasks: set[asyncio.Task[Any]] = set()
        self._loop_logged = False
        self.errors_log = RateLimitedLog(ctx.log, every=ERROR_LOG_EVERY)
        self.rcodes = [0] * 16  # replies sent, by the RCODE in their header

    async def start(self) -> None:
        endpoint = self.endpoint
        udp_sock = bind_socket(self.name, endpoint, socket.SOCK_DGRAM)
        try:
            tcp_sock = bind_socket(self.name, endpoint, socket.SOCK_STREAM)
        except Exception:
            udp_sock.close()
            raise
        self._listening_on(udp_sock.getsockname())
        loop = asyncio.get_running_loop()
        if needs_pktinfo(udp_sock):
            # A wildcard listener answers from the address asked (see appliance.pktinfo).
            proto = _Udp(self)
            proto.reader = reader = UdpReader(udp_sock, proto.received, proto.error_received)
            reader.start(loop)
            self.udp = reader
        else:
            self.udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp_sock)
        self.tcp = await asyncio.start_server(self._tcp_client, sock=tcp_sock)

    async def reload(self, plan: Plan) -> None:
        # One assignment: a query sees the old engine or the new, never half of each.
        self.engine = DnsEngine(plan.dns, self.counters)
        self.forwarder.set_upstreams(plan.dns.upstreams)

    async def stop(self) -> None:
        if self._tcp_timer is not None:
            self._tcp_timer.cancel()
            self._tcp_timer = None
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()
            # Open connections end now (an answer being written is cut): stop is a stop.
            for transport in self.slots.connections():
                transport.abort()  # type: ignore[attr-defined]
            handlers = list(self._tcp_tasks)
            if handlers:
                with contextlib.suppress(Exception):
                    await asyncio.wait(handlers, timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.tcp.wait_closed(), 2)
        await self.tasks.close()

    def status(self) -> DnsStatus:
        return DnsStatus(
            counters=dict(self.counters),
            cache_entries=len(self.forwarder.cache),
            tcp_connections=len(self.slots),
            rcodes={
                RCODE_NAMES[i] if i < len(RCODE_NAMES) else str(i): n
                for i, n in enumerate(self.rcodes)
                if n
            },
        )

    def log_error(self, msg: str, *args: Any) -> None:
        """An unexpected error on a packet, with its traceback: one line per ERROR_LOG_EVERY
        (the next says how many were not logged)."""
        self.errors_log.exception("error", msg, *args)

    # --- who not to answer -------------------------------------------------------------

    def _listening_on(self, sockname: tuple[Any, ...]) -> None:
        host = sockname[0]
        self.port = sockname[1]
        self.host = "" if ipaddress.ip_address(host).is_unspecified else host
        self._local.clear()

    def unsafe_source(self, addr: tuple[Any, ...]) -> bool:
        """Drop a datagram whose reply could start a loop: from a port of the UDP
        services that answer anything, or from our own listener (spoofed)."""
        if unsafe_source(addr[1]):
            self.counters["reflector_dropped"] += 1
            self.counters["dropped"] += 1
            return True
        if addr[1] == self.port and self._is_us(addr[0]):
            self.counters["self_dropped"] += 1
            self.counters["dropped"] += 1
            return True
        return False

    def _is_us(self, host: str) -> bool:
        if self.host:
            return host == self.host
        local = self._local.get(host)
        if local is None:
            # A wildcard listener is every local address: an address is local if it can
            # be bound. Only datagrams from our own port number get here; bounded cache.
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.bind((host, 0))
                local = True
            except OSError:
                local = False
            if len(self._local) > 4096:
                self._local.clear()
            self._local[host] = local
        return local

    def forward_loop(self, fwd: Forward) -> bytes:
        """The reply to our own forwarded question: REFUSED, so that the forwarder
        moves on at once (instead of waiting for itself until the timeout)."""
        self.counters["forward_loop"] += 1
        if not self._loop_logged:
            self._loop_logged = True
            self.ctx.log.error(
                "dns: an upstream in network.upstream_dns is this appliance's own DNS "
                "listener (a forwarding loop); its questions are refused"
            )
        return self.engine.refused(fwd.data)

    # --- forwarding -----------------------------------------------------------------

    def spawn_forward(self, fwd: Forward, send: Any, tcp: bool = False) -> None:
        if len(self.tasks) >= MAX_FORWARDS:
            self.counters["forward_overload"] += 1
            return
        self.tasks.spawn(self._forward(fwd, send, tcp))

    async def _forward(self, fwd: Forward, send: Any, tcp: bool) -> None:
        try:
            send(await self.forwarder.resolve(fwd, tcp))
        except Exception:
            self.counters["errors"] += 1
            self.log_error("dns: forwarding failed")

    # --- TCP ------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        transport = writer.transport
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else ""
        admit = self.slots.open(transport, client, loop.time())
        task = asyncio.current_task()
        if task is not None:
            self._tcp_tasks.add(task)
            task.add_done_callback(self._tcp_tasks.discard)
        for victim in admit.evict:
            self.counters["tcp_evicted"] += 1
            victim.close()  # type: ignore[attr-defined]
        if not admit.ok:
            self.counters["tcp_refused_" + admit.reason] += 1
            transport.close()
            return
        self._arm_tcp_timer()
        stalled = False
        try:
            while True:
                # No timeout here: the slot table's timer closes idle connections, with a
                # timeout that shrinks as the table fills.
                try:
                    head = await reader.readexactly(2)
                    (length,) = struct.unpack("!H", head)
                    data = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                idle_since = self.slots.busy(transport, loop.time())
                out = await self._answer_tcp(data, client, peer)
                if out is not None:
                    self.rcodes[out[3] & 15] += 1
                    writer.write(struct.pack("!H", len(out)) + out)
                    try:
                        # A client that does not read its answers holds a slot and our
                        # buffer: it gets as long as an idle one, then it is cut off.
                        async with asyncio.timeout(self.slots.idle_timeout()):
                            await writer.drain()
                    except TimeoutError:
                        self.counters["tcp_write_timeouts"] += 1
                        stalled = True
                        return
                    idle_since = loop.time()
                self.slots.idle(transport, idle_since)
                self._arm_tcp_timer()  # cheap; earlier only when the message got no answer
        except ConnectionError:
            pass
        finally:
            self.slots.close(transport)
            if stalled:
                transport.abort()  # close() would wait to flush what the client won't read
            else:
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _arm_tcp_timer(self) -> None:
        """One timer for all TCP connections, at the slot table's next idle deadline."""
        when = self.slots.deadline()
        timer = self._tcp_timer
        if timer is not None:
            if when is not None and timer.when() <= when:
                return  # already due earlier: it re-arms when it fires
            timer.cancel()
            self._tcp_timer = None
        if when is not None:
            loop = asyncio.get_running_loop()
            self._tcp_timer = loop.call_at(when, self._tcp_timeout, when)

    def _tcp_timeout(self, when: float) -> None:
        self._tcp_timer = None
        # The loop may run a timer a clock tick early: judge at its due time at least.
        now = max(asyncio.get_running_loop().time(), when)
        for transport in self.slots.expired(now):
            self.counters["tcp_idle_closed"] += 1
            transport.close()  # type: ignore[attr-defined]
        self._arm_tcp_timer()

    async def _answer_tcp(self, data: bytes, client: str, peer: Any) -> bytes | None:
        try:
            decision = self.engine.handle(data, client, tcp=True)
            if isinstance(decision, Forward):
                if peer and self.forwarder.is_own_source(peer):
                    return self.forward_loop(decision)
                return await self.forwarder.resolve(decision, tcp=True)
        except Exception:
            self.counters["errors"] += 1
            self.log_error("dns: error on a TCP query from %s", client)
            return None
        return decision.data if decision is not None else None
