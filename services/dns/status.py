"""The DNS service's status: counters and gauges, and the metric families they make."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.status import Family, counter, gauge, malformed

PATHS = ("fast", "slow", "forwarded", "refused", "truncated", "dropped")


@dataclass(frozen=True)
class DnsStatus:
    counters: Mapping[str, int] = field(default_factory=dict)
    cache_entries: int = 0
    tcp_connections: int = 0
    rcodes: Mapping[str, int] = field(default_factory=dict)  # RCODE name -> responses

    def to_json(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "cache_entries": self.cache_entries,
            "tcp_connections": self.tcp_connections,
            "rcodes": dict(self.rcodes),
        }

    def metrics(self) -> Iterator[Family]:
        c = self.counters
        yield malformed("dns", c.get("malformed", 0))
        yield counter("dns_queries", "DNS queries received (UDP and TCP)", c.get("queries", 0))
        yield counter(
            "dns_responses",
            "DNS responses sent, by RCODE",
            labels=("rcode",),
            samples=[((rcode,), n) for rcode, n in sorted(self.rcodes.items())],
        )
        yield counter(
            "dns_queries_by_path",
            "How queries were answered",
            labels=("path",),
            samples=[((p,), c.get(p, 0)) for p in PATHS],
        )
        yield counter(
            "dns_cache_hits", "Forwarded answers served from the cache", c.get("cache_hits", 0)
        )
        yield counter(
            "dns_upstream_failures", "Upstream resolver failures", c.get("upstream_failures", 0)
        )
        # Replies dropped before they could answer anything: a spoofing attempt shows here.
        yield counter(
            "dns_upstream_wrong_source",
            "Upstream replies dropped: from an address or port other than the upstream asked",
            c.get("upstream_wrong_source", 0),
        )
        yield counter(
            "dns_upstream_mismatched",
            "Upstream replies dropped: ID or question not the query's (or not a reply)",
            c.get("upstream_mismatched", 0),
        )
        yield gauge("dns_cache_entries", "Forwarding cache entries", self.cache_entries)
        yield gauge("dns_tcp_connections", "Open DNS TCP connections", self.tcp_connections)
