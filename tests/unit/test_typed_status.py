"""Typed status: every service's status() is a frozen dataclass that declares its metric
families; the metrics module knows no service's keys, only merges and renders."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.admin import AdminStatus
from appliance.metrics import StoreFacts, families
from appliance.status import ApplianceStatus, Family, ServiceEntry, counter, malformed
from services.cluster.status import ClusterStatus
from services.dhcp.status import DhcpStatus
from services.dns.status import DnsStatus
from services.http.status import HttpStatus
from services.proxy.status import BackendStatus, FrontendStatus, ProxyStatus
from services.tftp.status import TftpStatus


def _scrape(status: ApplianceStatus) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in families(status, StoreFacts())
        for s in fam.samples
    }


def _with(**services: Any) -> ApplianceStatus:
    return ApplianceStatus(
        services={name: ServiceEntry("running", (), detail) for name, detail in services.items()}
    )


@dataclasses.dataclass(frozen=True)
class MadeUpStatus:
    """A service metrics.py has never heard of: its families still show."""

    widgets: int

    def to_json(self) -> dict[str, Any]:
        return {"widgets": self.widgets}

    def metrics(self) -> Iterator[Family]:
        yield counter("widgets", "Widgets made", self.widgets)
        yield malformed("madeup", 4)


def test_families_come_from_the_statuses_not_from_known_keys() -> None:
    got = _scrape(_with(madeup=MadeUpStatus(7), dns=DnsStatus(counters={"malformed": 2})))
    assert got[("appliance_widgets_total", ())] == 7
    # One shared family, a series per declaring service.
    assert got[("appliance_malformed_packets_total", (("service", "madeup"),))] == 4
    assert got[("appliance_malformed_packets_total", (("service", "dns"),))] == 2


def test_a_shared_family_declared_differently_is_a_bug() -> None:
    @dataclasses.dataclass(frozen=True)
    class Wrong(MadeUpStatus):
        def metrics(self) -> Iterator[Family]:
            yield counter("malformed_packets", "other words", labels=("service",))

    with pytest.raises(ValueError, match="malformed_packets"):
        families(_with(wrong=Wrong(1)), StoreFacts())


def test_statuses_are_frozen() -> None:
    for status in (DnsStatus(), DhcpStatus(), TftpStatus(), HttpStatus(), ProxyStatus()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            status.counters = {}  # type: ignore[misc,union-attr]  # refused: the test


def test_the_api_keys_stay_as_they_were() -> None:
    """/api/v1/status and the dashboard read these keys: to_json() keeps every one."""
    assert DnsStatus().to_json().keys() == {
        "counters",
        "cache_entries",
        "tcp_connections",
        "rcodes",
    }
    assert DhcpStatus().to_json().keys() == {"counters", "leases_bound", "unknown_machines"}
    assert TftpStatus().to_json().keys() == {
        "counters",
        "transfers",
        "transfers_to_nodes",
        "boot_errors",
    }
    assert HttpStatus().to_json().keys() == {"counters", "requests", "bytes", "boot_errors"}
    assert AdminStatus().to_json().keys() == {"requests", "errors", "streams", "counters"}
    assert ClusterStatus().to_json().keys() == {
        "connection",
        "workers",
        "kubeconfig",
        "approve_csrs",
        "csr",
        "nodes",
        "bootstrap",
        "gpu",
    }
    assert ClusterStatus(nodes_seen=2, nodes_ready=("m0",)).to_json()["nodes"] == {
        "seen": 2,
        "ready": ["m0"],
    }
    backend = BackendStatus("m0", checks=({"time": 1.0, "ok": True, "detail": "x"},))
    fe = FrontendStatus(listen="127.0.0.54:6443", backends=(backend,))
    body = ProxyStatus(splice=True, frontends={"api": fe}).to_json()
    assert body.keys() == {"splice", "descriptors", "frontends"}
    assert body["frontends"]["api"].keys() == {
        "listen", "active", "balance", "check", "counters", "limits", "backends"
    }  # fmt: skip
    assert body["frontends"]["api"]["backends"][0].keys() == {
        "name", "address", "health", "admin", "removed", "self_loop", "active", "total",
        "failures", "bytes_in", "bytes_out", "checks",
    }  # fmt: skip
    entry = ServiceEntry("running", ("127.0.0.1:53",), DnsStatus(cache_entries=3)).to_json()
    assert entry["state"] == "running" and entry["listen"] == ["127.0.0.1:53"]
    assert entry["cache_entries"] == 3
    assert ServiceEntry("off").to_json() == {"state": "off", "listen": []}


def test_an_off_service_has_no_series_of_its_own() -> None:
    status = ApplianceStatus(services={"tftp": ServiceEntry("off"), "dns": ServiceEntry("off")})
    got = _scrape(status)
    assert got[("appliance_service_up", (("service", "tftp"),))] == 0
    assert not any(name.startswith(("appliance_tftp_", "appliance_dns_")) for name, _ in got)
