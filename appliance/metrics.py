"""Prometheus metrics, read at scrape time from what the services already count.

Each running service's typed status declares its own metric families
(appliance.status.Family); this module adds the appliance's frame (build, uptime,
reloads, the event bus, the store's queue and facts), merges families that several
services share (malformed packets, boot errors) and renders them. Nothing here runs
until Prometheus scrapes; `families()` is a pure function of the supervisor's status
and a few store counts, so it is unit-tested without a daemon.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.events import STAGES, STATES
from appliance.status import (
    BOOT_ERRORS,
    MALFORMED,
    ApplianceStatus,
    Family,
    counter,
    gauge,
    ordered,
)
from appliance.stores import FactsReader

LEASE_STATES = ("offered", "bound", "declined", "released")
CSR_DECISIONS = ("approve", "pending", "deny")


@dataclass
class StoreFacts:
    """The counts that live in the store rather than in a service."""

    events: Mapping[str, int] = field(default_factory=dict)  # stage -> stored events
    nodes_reached: Mapping[str, int] = field(default_factory=dict)  # stage -> nodes
    leases: Mapping[str, int] = field(default_factory=dict)  # state -> unexpired leases
    csr_decisions: Mapping[str, int] = field(default_factory=dict)  # decision -> count
    unknown_machines: int = 0


def store_facts(store: FactsReader, now: float) -> StoreFacts:
    reached: Counter[str] = Counter()
    for stages in store.progress().values():
        reached.update(s for s in stages if s not in STATES)  # a boot error is not reached
    return StoreFacts(
        events=store.event_counts(),
        nodes_reached=reached,
        leases=Counter(lease.state for lease in store.leases(now)),
        csr_decisions=store.csr_decision_counts(),
        unknown_machines=store.unknown_machine_counts()[0],
    )


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def families(status: ApplianceStatus, facts: StoreFacts) -> list[Metric]:
    """Every metric family of one scrape."""
    return [_render(f) for f in merge(_declared(status, facts))]


def _declared(status: ApplianceStatus, facts: StoreFacts) -> Iterator[Family]:
    """The appliance's own families, then each running service's, in a stable order."""
    yield gauge(
        "info",
        "The appliance build and the cluster it serves",
        labels=("version", "cluster"),
        samples=[((status.version, status.cluster or ""), 1)],
    )
    yield gauge("uptime_seconds", "Seconds since the appliance started", status.uptime)
    yield gauge("nodes", "Nodes in the inventory", status.nodes)
    yield counter(
        "reloads",
        "Reloads of the inventory, by result",
        labels=("result",),
        samples=[((r,), _num(status.reloads.get(r))) for r in ("ok", "failed")],
    )
    yield gauge(
        "service_up",
        "1 when the service runs, 0 when it is off",
        labels=("service",),
        samples=[((n,), 1 if e.state == "running" else 0) for n, e in status.services.items()],
    )
    # Node progress: events (from the store: they survive restarts) and nodes per stage.
    yield counter("events_published", "Node events published on the bus", status.events_published)
    yield counter("events_dropped", "Bus events a slow subscriber lost", status.events_dropped)
    yield from _store(status.store)
    if status.ha is not None:  # an HA member: leadership and etcd latency
        yield from status.ha.metrics()
    yield counter(
        "events",
        "Stored node events, by stage",
        labels=("stage",),
        samples=[((s,), facts.events.get(s, 0)) for s in ordered(STAGES + STATES, facts.events)],
    )
    yield gauge(
        "nodes_reached",
        "Nodes that have reached each stage",
        labels=("stage",),
        samples=[
            ((s,), facts.nodes_reached.get(s, 0)) for s in ordered(STAGES, facts.nodes_reached)
        ],
    )
    # Shared by several services: declared here (the series' order), filled by each.
    yield counter(MALFORMED[0], MALFORMED[1], labels=MALFORMED[2])
    for entry in status.services.values():
        if entry.detail is not None:
            yield from entry.detail.metrics()
    yield counter(BOOT_ERRORS[0], BOOT_ERRORS[1], labels=BOOT_ERRORS[2])
    # Store facts that belong to a service's story, shown only while it runs.
    if status.service("dhcp") is not None:
        yield gauge(
            "dhcp_leases",
            "Unexpired leases in the store, by state",
            labels=("state",),
            samples=[((s,), facts.leases.get(s, 0)) for s in ordered(LEASE_STATES, facts.leases)],
        )
        yield gauge(
            "dhcp_unknown_machines",
            "Machines outside the inventory that asked",
            facts.unknown_machines,
        )
    yield counter(
        "csr_decisions",
        "CSR reviews recorded, by decision",
        labels=("decision",),
        samples=[
            ((d,), facts.csr_decisions.get(d, 0))
            for d in ordered(CSR_DECISIONS, facts.csr_decisions)
        ],
    )
    yield counter(
        "csr_approvals",
        "CSRs approved, by kind (from the node events)",
        labels=("kind",),
        samples=[((k,), facts.events.get(f"csr-{k}", 0)) for k in ("client", "serving")],
    )


def merge(declared: Iterable[Family]) -> list[Family]:
    """One family per name (first place kept), samples of every declarer in order.

    Two declarations of one name must agree on kind, help and labels: a service that
    got a shared family wrong is a bug found by the unit tests, not a silent mix."""
    out: dict[str, Family] = {}
    for family in declared:
        seen = out.get(family.name)
        if seen is None:
            out[family.name] = family
            continue
        if seen.spec() != family.spec():
            raise ValueError(f"metric family {family.name} declared twice, differently")
        out[family.name] = Family(*seen.spec(), samples=seen.samples + family.samples)
    return list(out.values())


def _render(family: Family) -> Metric:
    cls = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    metric: CounterMetricFamily | GaugeMetricFamily = cls(
        f"appliance_{family.name}", family.doc, labels=family.labels
    )
    for key, value in family.samples:
        metric.add_metric(list(key), value)
    return metric


def _store(stats: Mapping[str, Any]) -> Iterator[Family]:
    """The state store's write queue: a file locked by another process shows here."""
    yield gauge(
        "store_queue_depth", "Writes waiting for the state store file", _num(stats.get("queued"))
    )
    yield gauge(
        "store_queue_peak",
        "The most writes that have waited at once",
        _num(stats.get("queue_peak")),
    )
    yield gauge(
        "store_oldest_write_seconds",
        "How long the oldest waiting write has waited",
        _num(stats.get("oldest_wait")),
    )
    yield gauge(
        "store_locked_seconds",
        "How long the file has been locked by another process",
        _num(stats.get("locked_for")),
    )
    for key, name, doc in (
        ("written", "store_writes", "Writes that reached the state store file"),
        ("commits", "store_commits", "Transactions of the store's writer"),
        ("busy", "store_busy", "Write attempts refused because another process held the lock"),
        ("retries", "store_retries", "Write attempts retried"),
        ("errors", "store_errors", "Write attempts failed with an error other than busy"),
        ("failed", "store_failed", "Writes given up after errors (not stored)"),
        ("overflow", "store_overflow", "Writes queued beyond the queue's size (kept in memory)"),
        ("lost", "store_lost", "Writes dropped: memory bound reached, or locked at the stop"),
    ):
        yield counter(name, doc, _num(stats.get(key)))


class ApplianceCollector(Collector):
    """A prometheus-client collector over the supervisor's status and the store's facts.

    `facts` returns counts read beforehand (the admin endpoint reads them in the store's
    reader thread): collect() runs on the event loop and must not wait for the file.
    """

    def __init__(
        self, status: Callable[[], ApplianceStatus], facts: Callable[[], StoreFacts]
    ) -> None:
        self.status = status
        self.facts = facts

    def collect(self) -> Iterator[Metric]:
        yield from families(self.status(), self.facts())
