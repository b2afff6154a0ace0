"""Prometheus metrics, read at scrape time from what the services already count.

Services keep plain counters in their `status()` (a dict increment on their own
paths); nothing here runs until Prometheus scrapes. `families()` is a pure function
from the supervisor's status and a few store counts to metric families, so it is
unit-tested without a daemon.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.events import STAGES
from appliance.store import Store

DHCP_MESSAGES = ("discover", "offer", "request", "decline", "ack", "nak", "release", "inform")
HEALTH_STATES = ("unknown", "up", "down")
ADMIN_STATES = ("enabled", "drain", "disabled")
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


def store_facts(store: Store, now: float) -> StoreFacts:
    reached: Counter[str] = Counter()
    for stages in store.progress().values():
        reached.update(stages.keys())
    return StoreFacts(
        events=store.event_counts(),
        nodes_reached=reached,
        leases=Counter(lease.state for lease in store.leases(now)),
        csr_decisions=store.csr_decision_counts(),
        unknown_machines=len(store.unknown_machines()),
    )


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _counters(service: Mapping[str, Any]) -> Mapping[str, Any]:
    counters = service.get("counters")
    return counters if isinstance(counters, Mapping) else {}


def families(status: Mapping[str, Any], facts: StoreFacts) -> list[Metric]:
    """Every metric family of one scrape."""
    out: list[Metric] = []

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"appliance_{name}", doc, labels=labels)
        out.append(family)
        return family

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
        family = CounterMetricFamily(f"appliance_{name}", doc, labels=labels)
        out.append(family)
        return family

    services: Mapping[str, Any] = status.get("services") or {}
    info = gauge("info", "The appliance build and the cluster it serves", ("version", "cluster"))
    info.add_metric([str(status.get("version", "")), str(status.get("cluster") or "")], 1)
    gauge("uptime_seconds", "Seconds since the appliance started").add_metric(
        [], _num(status.get("uptime"))
    )
    gauge("nodes", "Nodes in the inventory").add_metric([], _num(status.get("nodes")))
    reloads = status.get("reloads") or {}
    family = counter("reloads", "Reloads of the inventory, by result", ("result",))
    for result in ("ok", "failed"):
        family.add_metric([result], _num(reloads.get(result)))
    up = gauge("service_up", "1 when the service runs, 0 when it is off", ("service",))
    for name, svc in services.items():
        up.add_metric([name], 1 if svc.get("state") == "running" else 0)

    # Node progress: events (from the store: they survive restarts) and nodes per stage.
    bus = status.get("events") or {}
    counter("events_published", "Node events published on the bus").add_metric(
        [], _num(bus.get("published"))
    )
    counter("events_dropped", "Bus events a slow subscriber lost").add_metric(
        [], _num(bus.get("dropped"))
    )
    family = counter("events", "Stored node events, by stage", ("stage",))
    for stage in _ordered(STAGES, facts.events):
        family.add_metric([stage], facts.events.get(stage, 0))
    reached = gauge("nodes_reached", "Nodes that have reached each stage", ("stage",))
    for stage in _ordered(STAGES, facts.nodes_reached):
        reached.add_metric([stage], facts.nodes_reached.get(stage, 0))

    malformed = counter("malformed_packets", "Packets that could not be parsed", ("service",))
    for name in ("dns", "dhcp", "tftp"):
        if name in services:
            malformed.add_metric([name], _num(_counters(services[name]).get("malformed")))

    _dns(services.get("dns"), counter, gauge)
    _dhcp(services.get("dhcp"), facts, counter, gauge)
    _tftp(services.get("tftp"), counter, gauge)
    _http(services.get("http"), counter)
    _proxy(services.get("proxy"), counter, gauge)

    family = counter("csr_decisions", "CSR reviews recorded, by decision", ("decision",))
    for decision in _ordered(CSR_DECISIONS, facts.csr_decisions):
        family.add_metric([decision], facts.csr_decisions.get(decision, 0))
    family = counter("csr_approvals", "CSRs approved, by kind (from the node events)", ("kind",))
    for kind in ("client", "serving"):
        family.add_metric([kind], facts.events.get(f"csr-{kind}", 0))
    admin = services.get("admin") or {}
    if admin.get("state") == "running":
        counter("admin_requests", "Requests to the admin endpoint").add_metric(
            [], _num(admin.get("requests"))
        )
        gauge("admin_streams", "Open event streams").add_metric([], _num(admin.get("streams")))
    return out


def _ordered(known: tuple[str, ...], seen: Mapping[str, int]) -> list[str]:
    """The known labels in their order (0 when unseen: the series exists), then the rest."""
    return [*known, *sorted(k for k in seen if k not in known)]


Family = Callable[..., Any]


def _dns(svc: Mapping[str, Any] | None, counter: Family, gauge: Family) -> None:
    if svc is None or svc.get("state") != "running":
        return
    c = _counters(svc)
    counter("dns_queries", "DNS queries received (UDP and TCP)").add_metric(
        [], _num(c.get("queries"))
    )
    family = counter("dns_responses", "DNS responses sent, by RCODE", ("rcode",))
    for rcode, n in sorted((svc.get("rcodes") or {}).items()):
        family.add_metric([rcode], _num(n))
    family = counter("dns_queries_by_path", "How queries were answered", ("path",))
    for path in ("fast", "slow", "forwarded", "refused", "truncated", "dropped"):
        family.add_metric([path], _num(c.get(path)))
    counter("dns_cache_hits", "Forwarded answers served from the cache").add_metric(
        [], _num(c.get("cache_hits"))
    )
    counter("dns_upstream_failures", "Upstream resolver failures").add_metric(
        [], _num(c.get("upstream_failures"))
    )
    gauge("dns_cache_entries", "Forwarding cache entries").add_metric(
        [], _num(svc.get("cache_entries"))
    )
    gauge("dns_tcp_connections", "Open DNS TCP connections").add_metric(
        [], _num(svc.get("tcp_connections"))
    )


def _dhcp(svc: Mapping[str, Any] | None, facts: StoreFacts, counter: Family, gauge: Family) -> None:
    if svc is None or svc.get("state") != "running":
        return
    c = _counters(svc)
    counter("dhcp_packets_received", "DHCP packets received").add_metric(
        [], _num(c.get("received"))
    )
    counter("dhcp_packets_sent", "DHCP replies sent").add_metric([], _num(c.get("sent")))
    family = counter("dhcp_messages", "DHCP messages received, by type", ("type",))
    for kind in DHCP_MESSAGES:
        family.add_metric([kind], _num(c.get(kind)))
    counter("dhcp_leases_committed", "Leases written to the store").add_metric(
        [], _num(c.get("leases_committed"))
    )
    family = counter(
        "dhcp_ping_checks", "Pool addresses pinged before an offer, by result", ("result",)
    )
    for result, key in (("silent", "ping_silent"), ("in_use", "ping_in_use")):
        family.add_metric([result], _num(c.get(key)))
    gauge("dhcp_leases_bound", "Bound, unexpired leases held by the server").add_metric(
        [], _num(svc.get("leases_bound"))
    )
    family = gauge("dhcp_leases", "Unexpired leases in the store, by state", ("state",))
    for state in _ordered(LEASE_STATES, facts.leases):
        family.add_metric([state], facts.leases.get(state, 0))
    gauge("dhcp_unknown_machines", "Machines outside the inventory that asked").add_metric(
        [], facts.unknown_machines
    )


def _tftp(svc: Mapping[str, Any] | None, counter: Family, gauge: Family) -> None:
    if svc is None or svc.get("state") != "running":
        return
    c = _counters(svc)
    counter("tftp_requests", "TFTP read requests").add_metric([], _num(c.get("requests")))
    family = counter("tftp_transfers", "Finished TFTP transfers, by result", ("result",))
    for result in ("completed", "failed"):
        family.add_metric([result], _num(c.get(result)))
    counter("tftp_bytes", "Bytes sent by finished TFTP transfers").add_metric(
        [], _num(c.get("bytes"))
    )
    gauge("tftp_transfers_active", "TFTP transfers in progress").add_metric(
        [], _num(svc.get("transfers"))
    )


def _http(svc: Mapping[str, Any] | None, counter: Family) -> None:
    if svc is None or svc.get("state") != "running":
        return
    c = _counters(svc)
    counter("http_requests", "HTTP requests answered").add_metric([], _num(svc.get("requests")))
    counter("http_bytes", "HTTP response body bytes (as announced)").add_metric(
        [], _num(svc.get("bytes"))
    )
    family = counter("http_ignition", "Ignition requests, by result", ("result",))
    family.add_metric(["served"], _num(c.get("ignition_served")))
    family.add_metric(["refused"], _num(c.get("ignition_refused")))


def _proxy(svc: Mapping[str, Any] | None, counter: Family, gauge: Family) -> None:
    if svc is None or svc.get("state") != "running":
        return
    fe_labels = ("frontend",)
    be_labels = ("frontend", "backend")
    active = gauge("lb_connections_active", "Open client connections", fe_labels)
    accepted = counter("lb_connections", "Client connections accepted", fe_labels)
    no_backend = counter("lb_no_backend", "Clients refused: no eligible backend", fe_labels)
    retries = counter("lb_retries", "Connects retried on another backend", fe_labels)
    be_active = gauge("lb_backend_connections_active", "Open connections", be_labels)
    be_total = counter("lb_backend_connections", "Connections made", be_labels)
    be_failures = counter("lb_backend_failures", "Failed connects", be_labels)
    be_bytes = counter(
        "lb_backend_bytes", "Bytes relayed (in: client to backend)", (*be_labels, "direction")
    )
    health = gauge("lb_backend_health", "1 for the backend's health state", (*be_labels, "state"))
    admin = gauge(
        "lb_backend_admin_state", "1 for the backend's admin state", (*be_labels, "state")
    )
    frontends: Mapping[str, Any] = svc.get("frontends") or {}
    for fe_name, fe in frontends.items():
        c = _counters(fe)
        active.add_metric([fe_name], _num(fe.get("active")))
        accepted.add_metric([fe_name], _num(c.get("accepted")))
        no_backend.add_metric([fe_name], _num(c.get("no_backend")))
        retries.add_metric([fe_name], _num(c.get("retries")))
        for be in fe.get("backends") or []:
            key = [fe_name, str(be.get("name"))]
            be_active.add_metric(key, _num(be.get("active")))
            be_total.add_metric(key, _num(be.get("total")))
            be_failures.add_metric(key, _num(be.get("failures")))
            be_bytes.add_metric([*key, "in"], _num(be.get("bytes_in")))
            be_bytes.add_metric([*key, "out"], _num(be.get("bytes_out")))
            for state in HEALTH_STATES:
                health.add_metric([*key, state], 1 if be.get("health") == state else 0)
            for state in ADMIN_STATES:
                admin.add_metric([*key, state], 1 if be.get("admin") == state else 0)


class ApplianceCollector(Collector):
    """A prometheus-client collector over the supervisor's status and the store."""

    def __init__(self, status: Callable[[], Mapping[str, Any]], store: Store) -> None:
        self.status = status
        self.store = store

    def collect(self) -> Iterator[Metric]:
        yield from families(self.status(), store_facts(self.store, time.time()))
