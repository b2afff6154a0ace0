"""The HTTP service's status: counters, and the metric families they make."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.status import Family, boot_errors, counter, malformed


@dataclass(frozen=True)
class HttpStatus:
    counters: Mapping[str, int] = field(default_factory=dict)
    requests: int = 0
    bytes: int = 0  # response body bytes, as announced
    boot_errors: Mapping[str, int] = field(default_factory=dict)  # cause -> refusals

    def to_json(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "requests": self.requests,
            "bytes": self.bytes,
            "boot_errors": dict(self.boot_errors),
        }

    def metrics(self) -> Iterator[Family]:
        c = self.counters
        yield malformed("http", c.get("malformed", 0))
        yield counter("http_requests", "HTTP requests answered", self.requests)
        yield counter("http_bytes", "HTTP response body bytes (as announced)", self.bytes)
        yield counter(
            "http_ignition",
            "Ignition requests, by result",
            labels=("result",),
            samples=[
                (("served",), c.get("ignition_served", 0)),
                (("refused",), c.get("ignition_refused", 0)),
            ],
        )
        yield counter(
            "http_header_timeouts",
            "Connections closed: no complete request head in time",
            c.get("header_timeout", 0),
        )
        yield boot_errors("http", self.boot_errors)
