"""Typed status: what a service reports, and the metric families it declares.

Each service's `status()` returns a frozen dataclass with `to_json()` (the admin API's
body, unchanged) and `metrics()` (its Prometheus families, as plain values). The
metrics module only merges and renders them: it knows no service's keys. Families
several services share (malformed packets, boot errors) are built by one helper here,
so their name, help and labels agree.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Kind = Literal["counter", "gauge"]

# services.booterrors.CAUSES (appliance/ does not import the services)
BOOT_ERROR_CAUSES = ("missing", "unreadable", "not_owner", "bootstrap_retired", "refused")


@dataclass(frozen=True)
class Family:
    """One metric family: its name without the `appliance_` prefix, and its samples."""

    name: str
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()
    samples: tuple[tuple[tuple[str, ...], float], ...] = ()

    def spec(self) -> tuple[str, Kind, str, tuple[str, ...]]:
        return self.name, self.kind, self.doc, self.labels


def family(
    kind: Kind,
    name: str,
    doc: str,
    value: float | None = None,
    *,
    labels: tuple[str, ...] = (),
    samples: Iterable[tuple[Sequence[str], float]] = (),
) -> Family:
    """A family of one unlabelled `value`, or of labelled `samples` (or both)."""
    rows: list[tuple[tuple[str, ...], float]] = [] if value is None else [((), float(value))]
    rows += [(tuple(key), float(v)) for key, v in samples]
    return Family(name, kind, doc, labels, tuple(rows))


# The call sites name the kind first: counter("dns_queries", ...), gauge("..._entries", ...).
counter = functools.partial(family, "counter")
gauge = functools.partial(family, "gauge")


def ordered(known: Sequence[str], seen: Mapping[str, Any]) -> list[str]:
    """The known labels in their order (0 when unseen: the series exists), then the rest."""
    return [*known, *sorted(k for k in seen if k not in known)]


MALFORMED = ("malformed_packets", "Packets that could not be parsed", ("service",))
BOOT_ERRORS = (
    "boot_errors",
    "Boot files refused to inventory nodes (403/404, TFTP errors), by service and cause",
    ("service", "cause"),
)


def malformed(service: str, count: float) -> Family:
    name, doc, labels = MALFORMED
    return counter(name, doc, labels=labels, samples=[((service,), count)])


def boot_errors(service: str, counts: Mapping[str, int]) -> Family:
    name, doc, labels = BOOT_ERRORS
    rows = [((service, c), float(counts.get(c, 0))) for c in ordered(BOOT_ERROR_CAUSES, counts)]
    return counter(name, doc, labels=labels, samples=rows)


class ServiceStatus(Protocol):
    """What every service's status() returns."""

    def to_json(self) -> dict[str, Any]: ...

    def metrics(self) -> Iterable[Family]: ...


@dataclass(frozen=True)
class ServiceEntry:
    """One service as the supervisor sees it: on or off, where, and its own status."""

    state: Literal["running", "off", "standby"]  # standby: an HA follower's leader-only service
    listen: tuple[str, ...] = ()
    detail: ServiceStatus | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "listen": list(self.listen)}
        if self.detail is not None:
            out.update(self.detail.to_json())
        return out


@dataclass(frozen=True)
class ApplianceStatus:
    """The supervisor's status: /api/v1/status (to_json) and the /metrics frame."""

    version: str = ""
    config: str = ""
    uptime: float = 0.0
    cluster: str | None = None
    nodes: int = 0
    services: Mapping[str, ServiceEntry] = field(default_factory=dict)
    reloads: Mapping[str, Any] = field(default_factory=dict)  # ok, failed, last_error, last_at
    events_published: int = 0
    events_dropped: int = 0
    store: Mapping[str, Any] = field(default_factory=dict)  # the store queue's stats()
    ha: ServiceStatus | None = None  # an HA pair's member: the elector's status

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "config": self.config,
            "uptime": self.uptime,
            "cluster": self.cluster,
            "nodes": self.nodes,
            "services": {name: entry.to_json() for name, entry in self.services.items()},
            "reloads": dict(self.reloads),
            "events": {"published": self.events_published, "dropped": self.events_dropped},
            "store": dict(self.store),
        }
        if self.ha is not None:
            out["ha"] = self.ha.to_json()
        return out

    def service(self, name: str) -> ServiceStatus | None:
        """The status of a running service (None when it is off or does not exist)."""
        entry = self.services.get(name)
        return entry.detail if entry is not None else None
