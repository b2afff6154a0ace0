"""Prometheus metrics, read at scrape time from what the services already count.

Services keep plain counters in their `status()` (a dict increment on their own
paths); nothing here runs until Prometheus scrapes. `families()` is a pure function
from the supervisor's status and a few store counts to metric families, so it is
unit-tested without a daemon.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.events import STAGES, STATES
from appliance.store import Store

DHCP_MESSAGES = ("discover", "offer", "request", "decline", "ack", "nak", "release", "inform")
HEALTH_STATES = ("unknown", "up", "down")
ADMIN_STATES = ("enabled", "drain", "disabled")
LEASE_STATES = ("offered", "bound", "declined", "released")
CSR_DECISIONS = ("approve", "pending", "deny")
# services.booterrors.CAUSES (appliance/ does not import the services)
BOOT_ERROR_CAUSES = ("missing", "unreadable", "not_owner", "bootstrap_retired", "refused")


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
    _store(status.get("store") or {}, counter, gauge)
    family = counter("events", "Stored node events, by stage", ("stage",))
    for stage in _ordered(STAGES + STATES, facts.events):
        family.add_metric([stage], facts.events.get(stage, 0))
    reached = gauge("nodes_reached", "Nodes that have reached each stage", ("stage",))
    for stage in _ordered(STAGES, facts.nodes_reached):
        reached.add_metric([stage], facts.nodes_reached.get(stage, 0))

    malformed = counter("malformed_packets", "Packets that could not be parsed", ("service",))
    for name in ("dns", "dhcp", "tftp", "http", "admin"):
        if name in services:
            malformed.add_metric([name], _num(_counters(services[name]).get("malformed")))

    _dns(services.get("dns"), counter, gauge)
    _dhcp(services.get("dhcp"), facts, counter, gauge)
    _tftp(services.get("tftp"), counter, gauge)
    _http(services.get("http"), counter)
    _proxy(services.get("proxy"), counter, gauge)
    family = counter(
        "boot_errors",
        "Boot files refused to inventory nodes (403/404, TFTP errors), by service and cause",
        ("service", "cause"),
    )
    for name in ("http", "tftp"):
        svc = services.get(name) or {}
        if svc.get("state") != "running":
            continue
        counts = svc.get("boot_errors") or {}
        for cause in _ordered(BOOT_ERROR_CAUSES, counts):
            family.add_metric([name, cause], _num(counts.get(cause)))

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


def _store(stats: Mapping[str, Any], counter: Family, gauge: Family) -> None:
    """The state store's write queue: a file locked by another process shows here."""
    gauge("store_queue_depth", "Writes waiting for the state store file").add_metric(
        [], _num(stats.get("queued"))
    )
    gauge("store_queue_peak", "The most writes that have waited at once").add_metric(
        [], _num(stats.get("queue_peak"))
    )
    gauge("store_oldest_write_seconds", "How long the oldest waiting write has waited").add_metric(
        [], _num(stats.get("oldest_wait"))
    )
    gauge(
        "store_locked_seconds", "How long the file has been locked by another process"
    ).add_metric([], _num(stats.get("locked_for")))
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
        counter(name, doc).add_metric([], _num(stats.get(key)))


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


# reflection: a request whose answer would bounce off us, a server or a bystander;
# nak_limited, inform_limited: answers over the per-sender rate; decline_refused: a
# DECLINE from a client not holding the address; bad_hostname: an option 12 that is no
# DNS name (not stored); unknown_evicted: machines outside the inventory forgotten to
# keep the list bounded.
DHCP_DROPPED = (
    "reflection", "nak_limited", "inform_limited", "decline_refused", "bad_hostname",
    "unknown_evicted",
)  # fmt: skip


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
    family = counter(
        "dhcp_dropped",
        "DHCP requests not answered as asked (hostile input), by reason",
        ("reason",),
    )
    for reason in DHCP_DROPPED:
        family.add_metric([reason], _num(c.get(reason)))
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
    family = counter(
        "tftp_dropped", "TFTP datagrams not answered as asked, by reason", ("reason",)
    )  # dropped: stray or spoofed; rate_limited: an ERROR not sent; busy; duplicate request
    for reason in ("dropped", "rate_limited", "busy", "duplicate"):
        family.add_metric([reason], _num(c.get(reason)))


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
    counter(
        "http_header_timeouts", "Connections closed: no complete request head in time"
    ).add_metric([], _num(c.get("header_timeout")))


def _proxy(svc: Mapping[str, Any] | None, counter: Family, gauge: Family) -> None:
    if svc is None or svc.get("state") != "running":
        return
    fe_labels = ("frontend",)
    be_labels = ("frontend", "backend")
    active = gauge("lb_connections_active", "Open client connections", fe_labels)
    accepted = counter("lb_connections", "Client connections accepted", fe_labels)
    no_backend = counter("lb_no_backend", "Clients refused: no eligible backend", fe_labels)
    retries = counter("lb_retries", "Connects retried on another backend", fe_labels)
    refused = counter(
        "lb_refused",
        "Clients accepted and closed at once: the frontend's, the client's or the descriptor cap",
        ("frontend", "reason"),
    )
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
    fds: Mapping[str, Any] = svc.get("descriptors") or {}
    descriptors = gauge(
        "lb_descriptors", "The proxy's descriptors: its budget and those in use", ("kind",)
    )
    for kind in ("limit", "reserve", "budget", "in_use"):
        descriptors.add_metric([kind], _num(fds.get(kind)))
    frontends: Mapping[str, Any] = svc.get("frontends") or {}
    for fe_name, fe in frontends.items():
        c = _counters(fe)
        active.add_metric([fe_name], _num(fe.get("active")))
        accepted.add_metric([fe_name], _num(c.get("accepted")))
        no_backend.add_metric([fe_name], _num(c.get("no_backend")))
        retries.add_metric([fe_name], _num(c.get("retries")))
        for reason in ("over_limit", "client_limit", "descriptors"):
            refused.add_metric([fe_name, reason], _num(c.get(reason)))
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
    """A prometheus-client collector over the supervisor's status and the store's facts.

    `facts` returns counts read beforehand (the admin endpoint reads them in the store's
    reader thread): collect() runs on the event loop and must not wait for the file.
    """

    def __init__(
        self, status: Callable[[], Mapping[str, Any]], facts: Callable[[], StoreFacts]
    ) -> None:
        self.status = status
        self.facts = facts

    def collect(self) -> Iterator[Metric]:
        yield from families(self.status(), self.facts())
