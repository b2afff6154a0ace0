"""One backend, one JSON: the admin API's body after drain/disable/enable and the
backend's entry in GET /api/v1/backends both come from BackendStatus.to_json, byte for
byte what the API has always answered."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from typing import Any

from appliance.plan import Backend
from appliance.runtime import AdminState, RuntimeState
from services.proxy.pool import BackendState
from services.proxy.status import BackendStatus, FrontendStatus

# What the API answered before there was a typed status (key order included).
BEFORE = (
    '{"name": "w0", "address": "10.33.3.50:80", "health": "up", "admin": "drain", '
    '"removed": false, "self_loop": null, "active": 2, "total": 7, "failures": 1, '
    '"bytes_in": 100, "bytes_out": 2000, "checks": [{"time": 5.0, "ok": true, '
    '"detail": "200"}, {"time": 7.0, "ok": false, "detail": "refused"}]}'
)


def _backend() -> BackendState:
    b = BackendState(Backend("w0", IPv4Address("10.33.3.50"), 80, "worker"), 2, 3)
    b.check_result(True, 5.0, "200")
    b.check_result(False, 7.0, "refused")
    b.active, b.total, b.failures, b.bytes_in, b.bytes_out = 2, 7, 1, 100, 2000
    return b


class _Store:
    def install_state(self) -> dict[str, dict[str, float | None]]:
        return {}

    def cluster_state(self, key: str) -> Any:
        return None

    def mark_installed(self, node: str, time: float) -> None: ...

    def request_reinstall(self, node: str, time: float) -> None: ...

    def set_cluster_state(self, key: str, value: object, time: float) -> None: ...


class _LB:
    def __init__(self, b: BackendState) -> None:
        self.b = b

    def set_admin_state(self, frontend: str, backend: str, state: AdminState) -> BackendState:
        self.b.admin = state
        return self.b


def test_the_admin_body_and_the_backends_entry_are_one_json() -> None:
    b = _backend()
    rt = RuntimeState(_Store())
    rt.attach_load_balancer(_LB(b))
    target = rt.set_admin_state("ingress_http", "w0", "drain")
    body = target.status().to_json()  # what POST .../drain answers
    assert json.dumps(body) == BEFORE
    listed = FrontendStatus(backends=(BackendStatus.of(b),)).to_json()["backends"][0]
    assert json.dumps(listed) == BEFORE  # what GET /api/v1/backends lists
