"""An HA member's status: the API's `ha` section, its metrics and `appliance status`."""

from __future__ import annotations

from typing import Any

from appliance.ha.elector import ElectorStatus
from appliance.hamode import EtcdLatency, HaStatus
from appliance.metrics import _render, merge
from appliance.openapi import document
from appliance.status import ApplianceStatus
from appliance.terminal import ha_lines, status_lines


def _election(leading: bool, **kw: Any) -> ElectorStatus:
    base: dict[str, Any] = dict(
        member="prov-b",
        address="192.0.2.17",
        members=("prov-a", "prov-b"),
        leader="prov-b" if leading else "prov-a",
        leading=leading,
        since=1000.0 if leading else None,
        last_keepalive=1090.0 if leading else None,
        etcd_ok=True,
        etcd_error=None,
        changes=2,
        elected=1 if leading else 0,
        floating=("192.0.2.1", "192.0.2.54"),
        lease_ttl=3,
    )
    base.update(kw)
    return ElectorStatus(**base)


def _status(leading: bool, endpoints: dict[str, str | None], **kw: Any) -> HaStatus:
    latency = EtcdLatency()
    latency.observe("txn", 0.002, True)
    latency.observe("txn", 0.004, True)
    latency.observe("lease_keepalive", 0.5, False)
    return HaStatus(_election(leading, **kw), endpoints, latency.snapshot())


def test_json_says_who_leads_and_etcd_health_and_latency() -> None:
    body = _status(False, {"http://192.0.2.15:2379": None, "http://192.0.2.16:2379": "refused"})
    out = body.to_json()
    assert out["leading"] is False and out["leader"] == "prov-a"
    assert out["etcd"]["endpoints"]["http://192.0.2.16:2379"] == {
        "healthy": False,
        "error": "refused",
    }
    assert out["etcd"]["latency_ms"]["txn"] == {"count": 2, "mean": 3.0, "failures": 0}
    assert out["etcd"]["latency_ms"]["lease_keepalive"]["failures"] == 1
    # The OpenAPI document describes every key the API sends.
    schema = document()["components"]["schemas"]["Status"]["properties"]["ha"]
    assert set(out) <= set(schema["properties"])


def test_metrics_families_render() -> None:
    body = _status(True, {"http://192.0.2.15:2379": None, "http://192.0.2.16:2379": "down"})
    text = "\n".join(str(s) for m in (_render(f) for f in merge(body.metrics())) for s in m.samples)
    assert "appliance_ha_leader" in text
    assert "appliance_etcd_requests_total" in text and "'result': 'failed'" in text
    assert "'endpoint': 'http://192.0.2.16:2379'" in text


def test_status_lines_leader_follower_and_unhealthy_etcd() -> None:
    lead = _status(True, {"a": None, "b": None}).to_json()
    lines = ha_lines(lead, now=1060.0)
    assert lines[0].startswith("ha: prov-b is leader for 1m") and "192.0.2.1" in lines[0]
    assert lines[1] == "etcd: 2 of 2 members healthy"
    follow = _status(
        False, {"a": None, "b": "connection refused"}, etcd_ok=False, etcd_error="timed out"
    ).to_json()
    lines = ha_lines(follow, now=1060.0)
    assert "follower (leader: prov-a)" in lines[0]
    assert "last election call failed: timed out" in lines[1]
    assert lines[2] == "etcd: b: connection refused"
    whole = ApplianceStatus(version="0", cluster="c", ha=_status(False, {"a": None}))
    assert any(line.startswith("ha: prov-b is follower") for line in status_lines(whole.to_json()))
