"""The load balancer's status: frontends, their backends, and the metric families they make."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.status import Family, counter, gauge

if TYPE_CHECKING:  # pool.py builds its backends' status with `of`
    from services.proxy.pool import BackendState

HEALTH_STATES = ("unknown", "up", "down")
ADMIN_STATES = ("enabled", "drain", "disabled")
REFUSALS = ("over_limit", "client_limit", "descriptors")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    address: str = ""
    health: str = "unknown"
    admin: str = "enabled"
    removed: bool = False
    self_loop: str | None = None
    active: int = 0
    total: int = 0
    failures: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    checks: tuple[Mapping[str, Any], ...] = ()  # the last health checks: time, ok, detail

    @classmethod
    def of(cls, b: BackendState) -> BackendStatus:
        """The one place a backend's state becomes its status: the API's JSON in the
        backends list and after drain/disable/enable (BackendState.status)."""
        return cls(
            name=b.spec.name,
            address=f"{b.spec.address}:{b.spec.port}",
            health=b.health,
            admin=b.admin,
            removed=b.removed,
            self_loop=b.self_loop,
            active=b.active,
            total=b.total,
            failures=b.failures,
            bytes_in=b.bytes_in,
            bytes_out=b.bytes_out,
            checks=tuple({"time": t, "ok": ok, "detail": d} for t, ok, d in b.history),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "health": self.health,
            "admin": self.admin,
            "removed": self.removed,
            "self_loop": self.self_loop,
            "active": self.active,
            "total": self.total,
            "failures": self.failures,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "checks": [dict(c) for c in self.checks],
        }


@dataclass(frozen=True)
class FrontendStatus:
    listen: str | None = None
    active: int = 0
    balance: str = ""
    check: Mapping[str, Any] = field(default_factory=dict)  # kind, port, path, interval
    counters: Mapping[str, int] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)  # cap, floor, per_client, clients
    backends: tuple[BackendStatus, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "listen": self.listen,
            "active": self.active,
            "balance": self.balance,
            "check": dict(self.check),
            "counters": dict(self.counters),
            "limits": dict(self.limits),
            "backends": [b.to_json() for b in self.backends],
        }


@dataclass(frozen=True)
class ProxyStatus:
    splice: bool = False
    descriptors: Mapping[str, int] = field(default_factory=dict)  # limit, reserve, budget, ...
    frontends: Mapping[str, FrontendStatus] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "splice": self.splice,
            "descriptors": dict(self.descriptors),
            "frontends": {name: fe.to_json() for name, fe in self.frontends.items()},
        }

    def metrics(self) -> Iterator[Family]:
        fes = self.frontends.items()
        bes = [(name, b) for name, fe in fes for b in fe.backends]
        yield gauge(
            "lb_connections_active",
            "Open client connections",
            labels=("frontend",),
            samples=[((n,), fe.active) for n, fe in fes],
        )
        for key, name, doc in (
            ("accepted", "lb_connections", "Client connections accepted"),
            ("no_backend", "lb_no_backend", "Clients refused: no eligible backend"),
            ("retries", "lb_retries", "Connects retried on another backend"),
        ):
            yield counter(
                name,
                doc,
                labels=("frontend",),
                samples=[((n,), fe.counters.get(key, 0)) for n, fe in fes],
            )
        yield counter(
            "lb_refused",
            "Clients accepted and closed at once: the frontend's, the client's or the "
            "descriptor cap",
            labels=("frontend", "reason"),
            samples=[((n, r), fe.counters.get(r, 0)) for n, fe in fes for r in REFUSALS],
        )
        be_labels = ("frontend", "backend")
        yield gauge(
            "lb_backend_connections_active",
            "Open connections",
            labels=be_labels,
            samples=[((n, b.name), b.active) for n, b in bes],
        )
        yield counter(
            "lb_backend_connections",
            "Connections made",
            labels=be_labels,
            samples=[((n, b.name), b.total) for n, b in bes],
        )
        yield counter(
            "lb_backend_failures",
            "Failed connects",
            labels=be_labels,
            samples=[((n, b.name), b.failures) for n, b in bes],
        )
        yield counter(
            "lb_backend_bytes",
            "Bytes relayed (in: client to backend)",
            labels=(*be_labels, "direction"),
            samples=[
                row
                for n, b in bes
                for row in (((n, b.name, "in"), b.bytes_in), ((n, b.name, "out"), b.bytes_out))
            ],
        )
        yield gauge(
            "lb_backend_health",
            "1 for the backend's health state",
            labels=(*be_labels, "state"),
            samples=[((n, b.name, s), int(b.health == s)) for n, b in bes for s in HEALTH_STATES],
        )
        yield gauge(
            "lb_backend_admin_state",
            "1 for the backend's admin state",
            labels=(*be_labels, "state"),
            samples=[((n, b.name, s), int(b.admin == s)) for n, b in bes for s in ADMIN_STATES],
        )
        yield gauge(
            "lb_descriptors",
            "The proxy's descriptors: its budget and those in use",
            labels=("kind",),
            samples=[
                ((k,), self.descriptors.get(k, 0)) for k in ("limit", "reserve", "budget", "in_use")
            ],
        )
