"""Asking upstream resolvers: the asyncio shell around resolution.Resolution.

The decisions (which upstream, which reply counts, timeouts, TC -> TCP, SERVFAIL) are
the core's; this file opens a fresh UDP socket per try (a random source port), or a
TCP connection for a truncated answer, hands back what arrives, and arms one timer at
the core's deadline. Answers are cached; identical questions in flight are asked once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import Counter
from typing import Any

from dnslib import DNSRecord

from appliance.addr import Endpoint
from appliance.tasks import cancel_and_wait
from services.dns.cache import CacheKey, ForwardCache, UpstreamPicker
from services.dns.engine import Forward
from services.dns.resolution import Action, Resolution, Send, client_reply

log = logging.getLogger("appliance.dns")


def _source(sockname: Any) -> tuple[str, int]:
    return (str(sockname[0]), int(sockname[1])) if sockname else ("", -1)


class _Try(asyncio.DatagramProtocol):
    """The UDP socket of one try: every datagram and error goes to the core."""

    def __init__(self, run: _Run, send: Send) -> None:
        self.run = run
        self.send = send

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.run.res.current is self.send:  # not a socket the core has moved on from
            self.run.deliver(self.run.res.receive(data, addr, self.run.now()))

    def error_received(self, exc: Exception) -> None:
        if self.run.res.current is self.send:
            log.debug("upstream %s: %s", self.send.upstream, exc)
            self.run.deliver(self.run.res.failed(self.run.now()))


class _Run:
    """Drives one Resolution: sends what it says, one timer at get_timer()."""

    def __init__(self, forwarder: Forwarder, res: Resolution) -> None:
        self.forwarder = forwarder
        self.res = res
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.step: asyncio.Future[Action] = self.loop.create_future()

    def now(self) -> float:
        return self.loop.time()

    def deliver(self, action: Action | None) -> None:
        """What the core says after an event: a new step ends the current one."""
        if action is not None and not self.step.done():
            self.step.set_result(action)
        else:
            self._arm()

    def _arm(self) -> None:
        when = self.res.get_timer()
        if self.timer is not None:
            if when is not None and self.timer.when() == when:
                return
            self.timer.cancel()
            self.timer = None
        if when is not None:
            self.timer = self.loop.call_at(when, self._fire, when)

    def _fire(self, when: float) -> None:
        self.timer = None
        # The loop may run a timer a clock tick early: judge at its due time at least.
        self.deliver(self.res.handle_timer(max(self.now(), when)))

    async def run(self) -> DNSRecord | None:
        action: Action = self.res.start(self.now())
        try:
            while isinstance(action, Send):
                self.step = self.loop.create_future()
                self._arm()
                if action.tcp:
                    action = await self._tcp(action)
                else:
                    action = await self._udp(action)
        finally:
            if self.timer is not None:
                self.timer.cancel()
        return action.record

    async def _udp(self, send: Send) -> Action:
        ep = send.upstream
        try:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Try(self, send), remote_addr=(ep.host, ep.port)
            )
        except OSError as exc:
            log.debug("upstream %s: %s", ep, exc)
            self.deliver(self.res.failed(self.now()))
            return await self.step
        # connect()ed: the kernel passes only the upstream's datagrams; the core checks too.
        source = _source(transport.get_extra_info("sockname"))
        self.forwarder.sources.add(source)
        try:
            transport.sendto(send.data)
            return await self.step
        finally:
            self.forwarder.sources.discard(source)
            transport.close()

    async def _tcp(self, send: Send) -> Action:
        task = self.loop.create_task(self._tcp_exchange(send))

        def reap(t: asyncio.Task[bytes]) -> None:
            if t.cancelled() or self.res.current is not send:
                return
            exc = t.exception()
            if exc is not None:
                log.debug("upstream %s over TCP: %s", send.upstream, exc)
                self.deliver(self.res.failed(self.now()))
            else:
                addr = (send.upstream.host, send.upstream.port)
                self.deliver(self.res.receive(t.result(), addr, self.now(), tcp=True))

        task.add_done_callback(reap)
        try:
            return await self.step  # the answer, a failure, or the core's timer
        finally:
            await cancel_and_wait(task, log=log, what="upstream TCP exchange")

    async def _tcp_exchange(self, send: Send) -> bytes:
        ep = send.upstream
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        source = _source(writer.get_extra_info("sockname"))
        self.forwarder.sources.add(source)
        try:
            writer.write(struct.pack("!H", len(send.data)) + send.data)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            self.forwarder.sources.discard(source)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class Forwarder:
    def __init__(
        self,
        upstreams: tuple[Endpoint, ...],
        counters: Counter[str],
        cache: ForwardCache | None = None,
    ) -> None:
        self.picker = UpstreamPicker(upstreams)
        self.cache = cache or ForwardCache()
        self.counters = counters
        self._inflight: dict[CacheKey, asyncio.Future[DNSRecord | None]] = {}
        # The local (address, port) of each exchange in progress: a query from one of
        # them reaching our listener means the upstream is ourselves.
        self.sources: set[tuple[str, int]] = set()

    def is_own_source(self, addr: tuple[Any, ...]) -> bool:
        return bool(self.sources) and (addr[0], addr[1]) in self.sources

    def set_upstreams(self, upstreams: tuple[Endpoint, ...]) -> None:
        if upstreams != self.picker.upstreams:
            self.picker = UpstreamPicker(upstreams)
            self.cache.clear()  # other resolvers may answer differently

    async def resolve(self, fwd: Forward, tcp: bool) -> bytes:
        """The reply for the client: from the cache, from upstream, or SERVFAIL."""
        now = asyncio.get_running_loop().time()
        hit = self.cache.get(fwd.key, now)
        if hit is not None:
            self.counters["cache_hits"] += 1
            return client_reply(fwd, hit[0], hit[1], tcp, self.counters)
        pending = self._inflight.get(fwd.key)
        if pending is not None:
            record = await asyncio.shield(pending)
        else:
            future: asyncio.Future[DNSRecord | None] = asyncio.get_running_loop().create_future()
            self._inflight[fwd.key] = future
            try:
                record = await self._ask(fwd)
                future.set_result(record)
            except BaseException:
                future.set_result(None)
                raise
            finally:
                del self._inflight[fwd.key]
        return client_reply(fwd, record, 0, tcp, self.counters)

    async def _ask(self, fwd: Forward) -> DNSRecord | None:
        loop = asyncio.get_running_loop()
        res = Resolution(fwd.data, self.picker, loop.time(), self.counters)
        record = await _Run(self, res).run()
        if record is not None:
            self.cache.put(fwd.key, record, loop.time())
        return record
