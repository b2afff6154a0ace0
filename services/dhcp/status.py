"""The DHCP service's status: counters and gauges, and the metric families they make."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.status import Family, counter, gauge, malformed

MESSAGES = ("discover", "offer", "request", "decline", "ack", "nak", "release", "inform")
# reflection: a request whose answer would bounce off us, a server or a bystander;
# nak_limited, inform_limited: answers over the per-sender rate; decline_refused: a
# DECLINE from a client not holding the address; bad_hostname: an option 12 that is no
# DNS name (not stored); unknown_evicted: machines outside the inventory forgotten to
# keep the list bounded.
DROPPED = (
    "reflection", "nak_limited", "inform_limited", "decline_refused", "bad_hostname",
    "unknown_evicted",
)  # fmt: skip


@dataclass(frozen=True)
class DhcpStatus:
    counters: Mapping[str, int] = field(default_factory=dict)
    leases_bound: int = 0  # bound, unexpired leases held by the server
    unknown_machines: int = 0  # machines outside the inventory noted recently

    def to_json(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "leases_bound": self.leases_bound,
            "unknown_machines": self.unknown_machines,
        }

    def metrics(self) -> Iterator[Family]:
        c = self.counters
        yield malformed("dhcp", c.get("malformed", 0))
        yield counter("dhcp_packets_received", "DHCP packets received", c.get("received", 0))
        yield counter("dhcp_packets_sent", "DHCP replies sent", c.get("sent", 0))
        yield counter(
            "dhcp_messages",
            "DHCP messages received, by type",
            labels=("type",),
            samples=[((kind,), c.get(kind, 0)) for kind in MESSAGES],
        )
        yield counter(
            "dhcp_leases_committed", "Leases written to the store", c.get("leases_committed", 0)
        )
        yield counter(
            "dhcp_ping_checks",
            "Pool addresses pinged before an offer, by result",
            labels=("result",),
            samples=[
                (("silent",), c.get("ping_silent", 0)),
                (("in_use",), c.get("ping_in_use", 0)),
            ],
        )
        yield counter(
            "dhcp_dropped",
            "DHCP requests not answered as asked (hostile input), by reason",
            labels=("reason",),
            samples=[((reason,), c.get(reason, 0)) for reason in DROPPED],
        )
        yield gauge(
            "dhcp_leases_bound", "Bound, unexpired leases held by the server", self.leases_bound
        )
