"""Every admin endpoint against `appliance run` (tests/integration/admin_env.py).

Node stages come from real traffic (curl from a node's address, scapy DHCP packets);
CSR decisions and the GPU state are written into the store by a second connection,
as the cluster loop writes them. Mutations need the token (401 without, 401 with a
wrong one). A property test (schemathesis, bounded) runs every operation of the
OpenAPI document against the daemon: no 500, and every answer matches the document.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.store import Store
from tests.helpers import need_tool
from tests.integration.admin_env import (
    MACS,
    MASTER,
    WORKER,
    AdminEnv,
    dhcp_exchange,
    discover_unknown,
    start,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminEnv]:
    e = start(tmp_path_factory.mktemp("admin-api"))
    yield e
    e.close()


def test_status_and_plan(env: AdminEnv) -> None:
    status = env.get("/api/v1/status")
    assert status["cluster"] == "demo.example.com" and status["uptime"] > 0
    running = {k for k, v in status["services"].items() if v["state"] == "running"}
    assert {"dns", "dhcp", "tftp", "http", "proxy", "admin"} <= running
    assert status["services"]["dns"]["listen"] == [f"127.0.0.1:{env.dns[1]}"]
    assert status["plan"]["roles"] == {"bootstrap": 1, "master": 1, "worker": 1}
    assert status["plan"]["frontends"] == ["ingress_http"]
    assert env.get("/api/v1/plan")["domain"] == "demo.example.com"
    time.sleep(0.05)
    assert env.get("/api/v1/status")["uptime"] > status["uptime"]


def test_nodes_show_real_fetches(env: AdminEnv) -> None:
    before = time.time()
    assert env.fetch("/images/rhcos/installer-kernel", MASTER) == 200
    stages = env.wait(lambda: env.stages("master-0").get("kernel"))
    assert stages["detail"] == "http /images/rhcos/installer-kernel"
    assert before - 1 <= stages["first"] <= time.time()
    nodes = env.get("/api/v1/nodes")
    master = next(n for n in nodes["nodes"] if n["name"] == "master-0")
    assert master["current"] == "kernel" and master["waiting_for"] == "initramfs"
    assert {e["stage"]: e["state"] for e in master["timeline"]}["kernel"] == "done"
    assert nodes["last_event_id"] >= 1
    one = env.get("/api/v1/nodes/master-0")
    assert one["events"][-1]["stage"] == "kernel" and one["events"][-1]["id"] >= 1
    assert one["fqdn"] == "master-0.demo.example.com"


def test_events_stream_live_and_resumed(env: AdminEnv) -> None:
    after = env.get("/api/v1/nodes")["last_event_id"]
    req = urllib.request.Request(f"{env.admin}/api/v1/events?after={after}&keepalive=1")
    with urllib.request.urlopen(req, timeout=10) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        assert env.fetch("/boot/undionly.kpxe", WORKER) == 200
        got: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while "data" not in got and time.monotonic() < deadline:
            line = stream.readline().decode().rstrip("\n")
            if line.startswith("id: "):
                got["id"] = int(line[4:])
            elif line.startswith("data: "):
                got["data"] = json.loads(line[6:])
    assert got["id"] > after
    assert got["data"]["node"] == "worker-0" and got["data"]["stage"] == "bootloader"
    assert got["data"]["detail"] == "http /boot/undionly.kpxe"
    # Reconnecting with Last-Event-ID (as EventSource does) gets exactly what came later.
    curl = need_tool("curl")
    text = subprocess.run(
        [curl, "-sN", "--max-time", "10", "-H", f"Last-Event-ID: {got['id'] - 1}",
         f"{env.admin}/api/v1/events?follow=false"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout  # fmt: skip
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids[0] == got["id"]


def test_dhcp_exchange_gives_a_lease_and_stages(env: AdminEnv) -> None:
    assert dhcp_exchange(env, MACS["worker-0"]) == WORKER
    leases = env.wait(
        lambda: [x for x in env.get("/api/v1/leases")["leases"] if x["mac"] == MACS["worker-0"]]
    )
    assert leases[0]["node"] == "worker-0" and leases[0]["state"] == "bound"
    assert leases[0]["ip"] == WORKER and leases[0]["expires_in"] > 3000
    stages = env.wait(lambda: {"dhcp-offer", "dhcp-ack"} <= set(env.stages("worker-0")))
    assert stages
    # An unknown machine gets no lease and is listed.
    discover_unknown(env, "02:00:00:be:ef:01")
    machines = env.wait(lambda: env.get("/api/v1/unknown-machines")["machines"])
    assert machines[0]["mac"] == "02:00:00:be:ef:01"
    assert "02:00:00:be:ef:01" not in {
        x["mac"] for x in env.get("/api/v1/leases?all=true")["leases"]
    }


def _backend(env: AdminEnv, name: str) -> dict[str, Any]:
    body = env.get("/api/v1/backends")
    fe = body["frontends"]["ingress_http"]
    return dict(next(b for b in fe["backends"] if b["name"] == name))


def test_backends_health_and_admin_actions(env: AdminEnv) -> None:
    assert env.wait(lambda: _backend(env, "worker-0")["health"] == "up")
    backend = _backend(env, "worker-0")
    assert env.backend is not None
    assert backend["address"] == f"{WORKER}:{env.backend.port}" and backend["admin"] == "enabled"
    assert backend["checks"] and backend["checks"][-1]["ok"] is True
    path = "/api/v1/frontends/ingress_http/backends/worker-0"
    token = env.token
    for action, state in (("drain", "drain"), ("disable", "disabled"), ("enable", "enabled")):
        assert env.post(f"{path}/{action}")[0] == 401
        assert env.post(f"{path}/{action}", "wrong")[0] == 401
        status, body = env.post(f"{path}/{action}", token)
        assert status == 200 and body["ok"] is True and body["backend"]["admin"] == state
        assert _backend(env, "worker-0")["admin"] == state
    status, body = env.post("/api/v1/frontends/nope/backends/worker-0/drain", token)
    assert status == 404 and body["error"] == "no frontend 'nope'"
    status, body = env.post("/api/v1/frontends/ingress_http/backends/nobody/drain", token)
    assert status == 404 and body["error"] == "no backend 'nobody' in ingress_http"
    status, body = env.post(f"{path}/explode", token)
    assert status == 404 and body["error"] == "unknown action 'explode' (drain, disable or enable)"


def test_reinstall_and_reload_need_the_token(env: AdminEnv) -> None:
    token = env.token
    mode = (env.base / "state" / "admin.token").stat().st_mode & 0o777
    assert mode == 0o600
    for path in ("/api/v1/nodes/master-0/reinstall", "/api/v1/reload"):
        assert env.post(path)[0] == 401
        assert env.post(path, "wrong")[0] == 401
        assert env.post(path, token + "x")[0] == 401
    status, body = env.post("/api/v1/nodes/master-0/reinstall", token)
    assert (status, body) == (200, {"ok": True, "node": "master-0", "next_boot": "install"})
    master = next(n for n in env.get("/api/v1/nodes")["nodes"] if n["name"] == "master-0")
    assert master["reinstall_requested"] is not None and master["next_boot"] == "install"
    assert env.post("/api/v1/nodes/nobody/reinstall", token)[0] == 404
    status, body = env.post("/api/v1/reload", token)
    assert status == 200 and body["ok"] is True and "admin" in body["changed"]
    assert env.get("/api/v1/status")["reloads"]["ok"] >= 1


def test_csr_decisions_and_gpu_state_from_the_store(env: AdminEnv) -> None:
    now = time.time()
    with Store.open(env.base / "state") as store:  # a second connection, as the cluster loop's
        store.record_csr_decision(
            time=now, csr="csr-abc", kind="client", decision="approve", node="worker-0",
            requestor="system:serviceaccount:openshift-machine-config-operator:node-bootstrapper",
            reason="client CSR of inventory node worker-0",
        )  # fmt: skip
        store.record_csr_decision(
            time=now + 1, csr="csr-evil", kind="other", decision="deny", reason="not a node"
        )
        store.set_cluster_state("gpu", {"step": "operator", "status": "waiting for CSV"}, now)
    body = env.get("/api/v1/csr-decisions")
    assert body["counts"] == {"approve": 1, "deny": 1}
    assert [d["csr"] for d in body["decisions"]] == ["csr-evil", "csr-abc"]
    assert env.get("/api/v1/csr-decisions?limit=1")["decisions"][0]["decision"] == "deny"
    cluster = env.get("/api/v1/cluster")
    assert cluster["gpu"] == {"status": "waiting for CSV", "step": "operator"}
    # The cluster loop's own status when it runs; the store's values either way.
    services = env.get("/api/v1/status")["services"]
    running = services.get("cluster", {}).get("state") == "running"
    assert cluster["running"] is running and (cluster["service"] is not None) is running


def test_errors_are_clear_json(env: AdminEnv) -> None:
    for method, path, status, text in (
        ("GET", "/api/v1/nodes/nobody", 404, "no node 'nobody' in the inventory"),
        ("GET", "/api/v1/nope", 404, "Not Found"),
        ("GET", "/api/v1/reload", 405, "Method Not Allowed"),
        ("GET", "/api/v1/csr-decisions?limit=-5", 400, "limit: -5 is outside 1..5000"),
        (
            "GET",
            "/api/v1/events?follow=perhaps",
            400,
            "follow: 'perhaps' is not a boolean (true or false)",
        ),
    ):
        got, body, headers = env.request(method, path)
        assert (got, body) == (status, {"error": text}), path
        assert headers["Content-Type"].startswith("application/json")


def test_dashboard_openapi_metrics_healthz(env: AdminEnv) -> None:
    status, html, headers = env.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "Install progress" in html
    doc = env.get("/api/v1/openapi.json")
    assert doc["openapi"].startswith("3.") and "/api/v1/events" in doc["paths"]
    status, text, headers = env.request("GET", "/metrics")
    assert status == 200 and "appliance_uptime_seconds" in text
    assert env.request("GET", "/healthz")[:2] == (200, "ok\n")


def test_schemathesis_finds_no_server_error(env: AdminEnv) -> None:
    """Every operation, schema-valid and (where there are parameters) schema-violating
    requests, with the token: never a 500, and each answer conforms to the document
    (status code, content type, headers, body schema, SSE events)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(env.get("/api/v1/openapi.json"))
    headers = {"Authorization": f"Bearer {env.token}"}
    failures: dict[str, str] = {}
    calls = 0
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [GenerationMode.POSITIVE]
        if op.definition.raw.get("parameters"):
            modes.append(GenerationMode.NEGATIVE)
        # The stream would stay open: ask for what is stored only.
        fixed = {"query": {"follow": "false"}} if op.path == "/api/v1/events" else {}
        for mode in modes:

            @given(case=op.as_strategy(mode, **fixed))
            @settings(
                max_examples=40,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                nonlocal calls
                calls += 1
                response = case.call(base_url=env.admin, headers=headers, timeout=20)
                assert response.status_code < 500, response.text
                case.validate_response(response)

            try:
                check()
            except BaseException as exc:  # FailureGroup is an exception group
                failures[f"{op.method.upper()} {op.path} ({mode.value})"] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert calls > 100 and time.monotonic() - t0 < 240
    assert env.daemon is not None and env.daemon.proc.poll() is None
    assert "Traceback" not in env.daemon.output()
