"""Asking upstream resolvers: the asyncio side of forwarding.

Each exchange uses a fresh UDP socket (a random source port) and a random ID,
and accepts only a reply from the upstream's address with that ID and the same
question. A truncated reply is asked again over TCP. Timeouts and failures move
on to the next upstream; identical questions in flight are asked once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
from collections import Counter
from typing import Any

from dnslib import EDNS0, QTYPE, DNSError, DNSHeader, DNSRecord

from appliance.inventory import Endpoint
from services.dns.cache import CacheKey, ForwardCache, UpstreamPicker
from services.dns.engine import OUR_UDP_SIZE, Forward, cache_reply

log = logging.getLogger("dns")

SERVFAIL = 2
TRY_TIMEOUT = 1.5  # per upstream
TOTAL_TIMEOUT = 4.0  # per client question, all upstreams together


class _OneShot(asyncio.DatagramProtocol):
    def __init__(self, expect_id: int, question: bytes) -> None:
        self.expect_id = expect_id
        self.question = question
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        # connect()ed socket: only the upstream's address reaches us. Check that it is a
        # response (QR, opcode QUERY: an echo of our query is not), its ID and question.
        if (
            self.done.done()
            or len(data) < 12
            or data[2] & 0xF8 != 0x80
            or struct.unpack_from("!H", data)[0] != self.expect_id
        ):
            return
        if not same_question(data, self.question):
            return
        self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


def _source(sockname: Any) -> tuple[str, int]:
    return (str(sockname[0]), int(sockname[1])) if sockname else ("", -1)


def _question_bytes(data: bytes) -> bytes:
    """The question section (name, type, class) of a parsed-OK query, lower-cased name."""
    pos = 12
    while data[pos]:
        pos += data[pos] + 1
    pos += 1  # the root label ends the name and belongs to it
    return data[12:pos].lower() + data[pos : pos + 4]


def same_question(reply: bytes, question: bytes) -> bool:
    """Does `reply` answer `question` (from _question_bytes)? The name compares without
    case (0x20 mixing), type and class exactly: lower-casing those too would turn type
    65 (HTTPS, low byte 'A') into 97 and refuse every such answer."""
    end = 12 + len(question)
    return reply[12 : end - 4].lower() == question[:-4] and reply[end - 4 : end] == question[-4:]


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
        self._sources: set[tuple[str, int]] = set()

    def is_own_source(self, addr: tuple[Any, ...]) -> bool:
        return bool(self._sources) and (addr[0], addr[1]) in self._sources

    def set_upstreams(self, upstreams: tuple[Endpoint, ...]) -> None:
        if upstreams != self.picker.upstreams:
            self.picker = UpstreamPicker(upstreams)
            self.cache.clear()  # other resolvers may answer differently

    async def resolve(self, fwd: Forward, tcp: bool) -> bytes:
        """The reply for the client: from the cache, from upstream, or SERVFAIL."""
        now = time.monotonic()
        hit = self.cache.get(fwd.key, now)
        if hit is not None:
            self.counters["cache_hits"] += 1
            out = cache_reply(fwd.data, hit[0], hit[1])
            if out is not None:
                return self._fit(out, fwd, tcp)
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
        if record is None:
            self.counters["servfail"] += 1
            return _servfail(fwd.data)
        out = cache_reply(fwd.data, record, 0)
        return self._fit(out, fwd, tcp) if out is not None else _servfail(fwd.data)

    async def _ask(self, fwd: Forward) -> DNSRecord | None:
        deadline = time.monotonic() + TOTAL_TIMEOUT
        for ep in self.picker.order(time.monotonic()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                raw = await self._exchange(ep, fwd.data, min(TRY_TIMEOUT, left))
                record = DNSRecord.parse(raw)
            except (OSError, TimeoutError, DNSError, ValueError, IndexError, EOFError) as exc:
                self.counters["upstream_failures"] += 1
                log.debug("upstream %s failed: %s", ep, exc or type(exc).__name__)
                self.picker.failed(ep, time.monotonic())
                continue
            if record.header.rcode in (SERVFAIL, 5):  # SERVFAIL, REFUSED: try the next one
                self.counters["upstream_failures"] += 1
                self.picker.failed(ep, time.monotonic())
                continue
            self.picker.succeeded(ep)
            self.cache.put(fwd.key, record, time.monotonic())
            return record
        return None

    async def _exchange(self, ep: Endpoint, query: bytes, timeout: float) -> bytes:
        qid = secrets.randbelow(65536)
        data = struct.pack("!H", qid) + query[2:]
        question = _question_bytes(query)
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _OneShot(qid, question), remote_addr=(ep.host, ep.port)
        )
        source = _source(transport.get_extra_info("sockname"))
        self._sources.add(source)
        try:
            transport.sendto(data)
            reply = await asyncio.wait_for(proto.done, timeout)
        finally:
            self._sources.discard(source)
            transport.close()
        if reply[2] & 0x02:  # TC: the whole answer needs TCP
            self.counters["upstream_tcp"] += 1
            reply = await asyncio.wait_for(self._tcp_exchange(ep, data, question), timeout)
        return reply

    async def _tcp_exchange(self, ep: Endpoint, data: bytes, question: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        source = _source(writer.get_extra_info("sockname"))
        self._sources.add(source)
        try:
            writer.write(struct.pack("!H", len(data)) + data)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = await reader.readexactly(length)
        finally:
            self._sources.discard(source)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        # The same checks as over UDP: a response, to our ID, for our question.
        if len(reply) < 12 or reply[2] & 0xF8 != 0x80 or reply[:2] != data[:2]:
            raise ValueError("upstream TCP reply is not the response to our query")
        if not same_question(reply, question):
            raise ValueError("upstream TCP reply for another question")
        return reply

    def _fit(self, reply: bytes, fwd: Forward, tcp: bool) -> bytes:
        if tcp or len(reply) <= (fwd.udp_size if fwd.edns else 512):
            return reply
        self.counters["truncated"] += 1
        request = DNSRecord.parse(fwd.data)
        out = DNSRecord(
            DNSHeader(id=request.header.id, qr=1, rd=request.header.rd, ra=1, tc=1),
            q=request.questions[0],
        )
        if fwd.edns:
            out.add_ar(EDNS0(udp_len=OUR_UDP_SIZE))
        return bytes(out.pack())


def _servfail(query: bytes) -> bytes:
    request = DNSRecord.parse(query)
    out = DNSRecord(
        DNSHeader(id=request.header.id, qr=1, rd=request.header.rd, ra=1, rcode=SERVFAIL),
        q=request.questions[0],
    )
    if any(rr.rtype == QTYPE.OPT for rr in request.ar):
        out.add_ar(EDNS0(udp_len=OUR_UDP_SIZE))
    return bytes(out.pack())
