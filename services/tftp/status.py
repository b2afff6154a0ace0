"""The TFTP service's status: counters and gauges, and the metric families they make."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.status import Family, boot_errors, counter, gauge, malformed

# dropped: stray or spoofed; rate_limited: an ERROR not sent; busy; duplicate request
DROPPED = ("dropped", "rate_limited", "busy", "duplicate")


@dataclass(frozen=True)
class TftpStatus:
    counters: Mapping[str, int] = field(default_factory=dict)
    transfers: int = 0  # in progress
    transfers_to_nodes: int = 0  # of those, to inventory nodes (their reserved slots)
    boot_errors: Mapping[str, int] = field(default_factory=dict)  # cause -> refusals

    def to_json(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "transfers": self.transfers,
            "transfers_to_nodes": self.transfers_to_nodes,
            "boot_errors": dict(self.boot_errors),
        }

    def metrics(self) -> Iterator[Family]:
        c = self.counters
        yield malformed("tftp", c.get("malformed", 0))
        yield counter("tftp_requests", "TFTP read requests", c.get("requests", 0))
        yield counter(
            "tftp_transfers",
            "Finished TFTP transfers, by result",
            labels=("result",),
            samples=[((r,), c.get(r, 0)) for r in ("completed", "failed")],
        )
        yield counter("tftp_bytes", "Bytes sent by finished TFTP transfers", c.get("bytes", 0))
        yield gauge("tftp_transfers_active", "TFTP transfers in progress", self.transfers)
        yield counter(
            "tftp_dropped",
            "TFTP datagrams not answered as asked, by reason",
            labels=("reason",),
            samples=[((r,), c.get(r, 0)) for r in DROPPED],
        )
        yield boot_errors("tftp", self.boot_errors)
