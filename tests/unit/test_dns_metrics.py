"""The forwarder's drop counters reach /metrics: what the resolution core counts (a
spoofed or mismatched reply) is scraped as a family of its own, not lost in a dict."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest

from appliance.metrics import ApplianceCollector, StoreFacts
from appliance.status import ApplianceStatus, ServiceEntry
from services.dns.resolution import Send
from services.dns.status import DnsStatus
from tests.unit.test_dns_resolution import U1, U2, answer_to, src, start


def _scrape(counters: Counter[str]) -> str:
    status = ApplianceStatus(
        services={"dns": ServiceEntry("running", (), DnsStatus(counters=dict(counters)))}
    )
    registry = CollectorRegistry()
    registry.register(ApplianceCollector(lambda: status, StoreFacts))
    return generate_latest(registry).decode()


def test_spoofed_and_mismatched_upstream_replies_are_scraped() -> None:
    counters: Counter[str] = Counter()
    res, act = start(counters=counters)
    assert isinstance(act, Send)
    good = answer_to(act.data)
    assert res.receive(good, ("192.0.2.99", 53), 0.1) is None  # not the upstream asked
    assert res.receive(good, src(U2), 0.1) is None
    assert res.receive(b"\x99\x99" + good[2:], src(U1), 0.1) is None  # another ID
    text = _scrape(counters)
    assert "# TYPE appliance_dns_upstream_wrong_source_total counter" in text
    assert "\nappliance_dns_upstream_wrong_source_total 2.0\n" in text
    assert "# TYPE appliance_dns_upstream_mismatched_total counter" in text
    assert "\nappliance_dns_upstream_mismatched_total 1.0\n" in text


def test_the_drop_counters_exist_before_any_drop() -> None:
    text = _scrape(Counter())
    assert "\nappliance_dns_upstream_wrong_source_total 0.0\n" in text
    assert "\nappliance_dns_upstream_mismatched_total 0.0\n" in text
