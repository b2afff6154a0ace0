"""The forwarder's cache and upstream choice (sans-IO: `now` is always an argument)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from dnslib import QTYPE, DNSRecord

from appliance.addr import Endpoint
from services.dns.rcode import NOERROR, NXDOMAIN, REFUSED, SERVFAIL

CacheKey = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class _Entry:
    record: DNSRecord
    stored: float
    expires: float


class ForwardCache:
    """Answers from upstream, kept for their TTL; negative ones for the SOA's (RFC 2308)."""

    def __init__(self, max_entries: int = 10_000, max_ttl: int = 86_400, max_negative: int = 3600):
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_negative = max_negative
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, now: float) -> tuple[DNSRecord, int] | None:
        """The cached record and its age in whole seconds, if still fresh."""
        entry = self._entries.get(key)
        if entry is None or entry.expires <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.record, int(now - entry.stored)

    def put(self, key: CacheKey, record: DNSRecord, now: float) -> None:
        ttl = self.ttl_of(record)
        if ttl is None or ttl <= 0:
            return
        self._entries[key] = _Entry(record, now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def ttl_of(self, record: DNSRecord) -> int | None:
        """How long a response may be cached; None: not at all."""
        rcode = record.header.rcode
        if record.header.tc or rcode in (SERVFAIL, REFUSED) or rcode not in (NOERROR, NXDOMAIN):
            return None
        if rcode == NOERROR and record.rr:
            return min(min(int(rr.ttl) for rr in record.rr), self.max_ttl)
        # NXDOMAIN or NODATA: cacheable only with the zone's SOA in the authority section.
        for rr in record.auth:
            if rr.rtype == QTYPE.SOA:
                return min(int(rr.ttl), int(rr.rdata.times[-1]), self.max_negative)
        return None

    def clear(self) -> None:
        self._entries.clear()


class UpstreamPicker:
    """Upstreams in order of preference: the configured order, recent failures last."""

    def __init__(self, upstreams: tuple[Endpoint, ...], penalty: float = 30.0) -> None:
        self.upstreams = upstreams
        self.penalty = penalty
        self._failed_at: dict[Endpoint, float] = {}

    def order(self, now: float) -> list[Endpoint]:
        def rank(ep: Endpoint) -> int:
            failed = self._failed_at.get(ep)
            return 1 if failed is not None and now - failed < self.penalty else 0

        return sorted(self.upstreams, key=rank)  # stable: configured order within a rank

    def failed(self, ep: Endpoint, now: float) -> None:
        self._failed_at[ep] = now

    def succeeded(self, ep: Endpoint) -> None:
        self._failed_at.pop(ep, None)
