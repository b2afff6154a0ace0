"""The admin application in-process (aiohttp's test server on loopback, real store and bus).

The service is the real AdminService with a real Store, EventBus, BootState and a
real Supervisor (with no services of its own) as its control; only the address it
believes it listens on is set by hand, to test the non-loopback token rules without
binding anything beyond loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from appliance import admin as admin_module
from appliance.admin import AdminService
from appliance.events import EventBus
from appliance.inventory import load_inventory
from appliance.openapi import document
from appliance.plan import Plan, build_plan
from appliance.runtime import RuntimeState
from appliance.service import ServiceContext, ServiceSpec
from appliance.store import Store
from appliance.storequeue import DaemonStore
from appliance.supervisor import Supervisor
from tests.helpers import loopback_inventory, write_inventory

TOKEN = "s3cret-token"


@dataclass
class Admin:
    svc: AdminService
    client: TestClient[Any, Any]
    store: Store  # a second connection: what the test writes, as another writer would
    live: DaemonStore  # the daemon's (queued writes)
    bus: EventBus
    config: Path


async def _admin(tmp_path: Path, loopback: bool) -> AsyncIterator[Admin]:
    config = write_inventory(tmp_path / "inv.yaml", loopback_inventory(tmp_path))
    plan = build_plan(load_inventory(config))
    live = DaemonStore.open(plan.state_dir)
    store = Store.open(plan.state_dir, durable=False)
    bus = EventBus()
    control = Supervisor(config, specs=[])
    control.plan, control.started_at = plan, time.time()
    ctx = ServiceContext(
        bus=bus,
        store=live,
        log=logging.getLogger("admin"),
        runtime=RuntimeState(live),
        control=control,
        admin_token=TOKEN,
    )
    svc = AdminService(ctx, plan)
    svc.loopback_only = loopback
    persist = asyncio.create_task(live.persist(bus))
    client: TestClient[Any, Any] = TestClient(TestServer(svc.app(), host="127.0.0.1"))
    await client.start_server()
    try:
        yield Admin(svc, client, store, live, bus, config)
    finally:
        await svc.stop()
        await client.close()
        persist.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await persist
        await live.aclose()
        store.close()


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    async for a in _admin(tmp_path, loopback=True):
        yield a


@pytest.fixture
async def remote(tmp_path: Path) -> AsyncIterator[Admin]:
    """As if listen.admin were 0.0.0.0:9000: reads need the token too."""
    async for a in _admin(tmp_path, loopback=False):
        yield a


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _json(resp: ClientResponse) -> Any:
    assert resp.content_type == "application/json", await resp.text()
    return await resp.json()


# --- the document and the router ------------------------------------------------------------


async def test_every_route_is_documented_and_every_documented_path_is_a_route(
    admin: Admin,
) -> None:
    routes = set()
    for route in admin.svc.app().router.routes():
        if route.method == "HEAD":
            continue  # aiohttp answers HEAD for every GET: implied by the GET operation
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        routes.add((path, route.method.lower()))
    doc = document()
    documented = {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    }
    assert routes == documented
    # Every path parameter of the router is declared, and the other way round.
    for path, item in doc["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for op in item.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, path
    served = await _json(await admin.client.get("/api/v1/openapi.json"))
    assert served == doc and served["openapi"].startswith("3.")


# --- tokens -----------------------------------------------------------------------------------


async def test_loopback_reads_are_open_mutations_need_the_token(admin: Admin) -> None:
    c = admin.client
    assert (await c.get("/api/v1/status")).status == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        resp = await c.post("/api/v1/nodes/master-0/reinstall", headers=headers)
        assert resp.status == 401
        assert "bearer token" in (await _json(resp))["error"]
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # The query token is for GETs (EventSource) only: never for a mutation.
    resp = await c.post(f"/api/v1/nodes/master-0/reinstall?access_token={TOKEN}")
    assert resp.status == 401
    resp = await c.post("/api/v1/nodes/master-0/reinstall", headers=AUTH)
    assert resp.status == 200
    assert await _json(resp) == {"ok": True, "node": "master-0", "next_boot": "install"}
    assert admin.live.install_state()["master-0"]["reinstall_requested"] is not None


async def test_off_loopback_reads_need_the_token(remote: Admin) -> None:
    c = remote.client
    for path in ("/api/v1/status", "/api/v1/nodes", "/metrics", "/api/v1/events?follow=false"):
        assert (await c.get(path)).status == 401, path
        assert (await c.get(path, headers={"Authorization": "Bearer nope"})).status == 401
        assert (await c.get(path, headers=AUTH)).status == 200, path
    sep = "&" if "?" in path else "?"
    assert (await c.get(f"{path}{sep}access_token={TOKEN}")).status == 200
    assert (await c.get(f"{path}{sep}access_token=nope")).status == 401
    # What holds no cluster data loads without it: the page asks for the token itself.
    for path in ("/", "/dashboard/app.js", "/dashboard/style.css", "/healthz"):
        assert (await c.get(path)).status == 200, path
    assert (await c.get("/api/v1/openapi.json")).status == 200
    # An unknown path does not tell whether it exists.
    assert (await c.get("/api/v1/secret")).status == 401


# --- errors -----------------------------------------------------------------------------------


async def test_errors_are_json(admin: Admin) -> None:
    c = admin.client
    resp = await c.get("/api/v1/nope")
    assert resp.status == 404 and (await _json(resp))["error"] == "Not Found"
    resp = await c.delete("/api/v1/status", headers=AUTH)
    assert resp.status == 405 and "GET" in resp.headers["Allow"]
    assert (await _json(resp))["error"] == "Method Not Allowed"
    resp = await c.get("/api/v1/nodes/nobody")
    assert resp.status == 404 and "no node 'nobody'" in (await _json(resp))["error"]
    resp = await c.post("/api/v1/nodes/nobody/reinstall", headers=AUTH)
    assert resp.status == 404
    for path, text in (
        ("/api/v1/leases?all=maybe", "all: 'maybe' is not a boolean"),
        ("/api/v1/csr-decisions?limit=0", "limit: 0 is outside 1..5000"),
        ("/api/v1/csr-decisions?limit=x", "limit: 'x' is not an integer"),
        ("/api/v1/nodes/master-0?after=-1", "after: -1 is outside"),
        ("/api/v1/events?after=abc", "is not an event id"),
        ("/api/v1/events?keepalive=nan", "keepalive: nan is outside"),
        ("/api/v1/events?backlog=5000", "backlog: 5000 is outside"),
    ):
        resp = await c.get(path)
        assert resp.status == 400, path
        assert text in (await _json(resp))["error"], path
    resp = await c.get("/api/v1/events", headers={"Last-Event-ID": "x1"})
    assert resp.status == 400
    resp = await c.get("/api/v1/events?node=nobody")
    assert resp.status == 404
    resp = await c.get("/dashboard/../../etc/passwd")
    assert resp.status == 404
    resp = await c.get("/dashboard/index.htm")
    assert resp.status == 404 and "no dashboard file" in (await _json(resp))["error"]
    # No load balancer in this process: a backend action says so; so does a bad action.
    resp = await c.post("/api/v1/frontends/api/backends/master-0/drain", headers=AUTH)
    assert resp.status == 404 and "not running" in (await _json(resp))["error"]
    resp = await c.post("/api/v1/frontends/api/backends/master-0/explode", headers=AUTH)
    assert resp.status == 404 and "unknown action" in (await _json(resp))["error"]


async def test_a_failing_handler_is_a_500_and_the_service_goes_on(
    admin: Admin, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Store, now: float | None = None) -> list[Any]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Store, "leases", broken)
    resp = await admin.client.get("/api/v1/leases")
    assert resp.status == 500
    assert (await _json(resp))["error"] == "internal error (logged by the appliance)"
    assert "disk on fire" in caplog.text
    assert (await admin.client.get("/api/v1/status")).status == 200
    assert admin.svc.status().errors == 1


async def test_a_read_that_finds_the_file_locked_is_a_503_at_once(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the state file beyond the reader's short wait: the client is
    told to come back (503, Retry-After), nothing waits on the event loop."""

    def locked(self: Store, now: float | None = None) -> list[Any]:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Store, "leases", locked)
    t0 = time.monotonic()
    resp = await admin.client.get("/api/v1/leases")
    assert time.monotonic() - t0 < 1.0
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert "is locked" in (await _json(resp))["error"]
    assert admin.svc.status().errors == 0  # not a bug of ours


# --- reads ------------------------------------------------------------------------------------


async def test_status_nodes_leases_and_store_backed_reads(admin: Admin) -> None:
    c, store = admin.client, admin.store
    status = await _json(await c.get("/api/v1/status"))
    assert status["cluster"] == "demo.example.com" and status["plan"]["nodes"] == 3
    assert status["plan"]["roles"] == {"bootstrap": 1, "master": 1, "worker": 1}
    assert status["uptime"] >= 0 and status["time"] > 0
    admin.bus.publish("master-0", "kernel", "tftp k", source="tftp", time=1000.0)
    await asyncio.sleep(0.05)  # the persist task writes it
    body = await _json(await c.get("/api/v1/nodes"))
    assert body["last_event_id"] == 1 and body["stages"][0] == "dhcp-offer"
    master = next(n for n in body["nodes"] if n["name"] == "master-0")
    assert master["stages"]["kernel"] == {"first": 1000.0, "last": 1000.0, "detail": "tftp k"}
    assert master["current"] == "kernel" and master["waiting_for"] == "initramfs"
    one = await _json(await c.get("/api/v1/nodes/master-0"))
    assert [e["stage"] for e in one["events"]] == ["kernel"] and one["events"][0]["id"] == 1
    assert (await _json(await c.get("/api/v1/nodes/master-0?after=1")))["events"] == []

    from appliance.store import Lease

    now = time.time()
    store.put_lease(Lease("52:54:00:00:00:50", "127.0.0.50", "master-0", now + 60, "bound", now))
    store.put_lease(Lease("02:00:00:00:00:09", "127.0.0.9", None, now - 60, "bound", now - 120))
    leases = (await _json(await c.get("/api/v1/leases")))["leases"]
    assert [(x["mac"], x["node"]) for x in leases] == [("52:54:00:00:00:50", "master-0")]
    assert 0 < leases[0]["expires_in"] <= 60
    every = (await _json(await c.get("/api/v1/leases?all=true")))["leases"]
    assert {x["ip"] for x in every} == {"127.0.0.50", "127.0.0.9"}

    store.record_csr_decision(
        time=now, csr="csr-1", kind="client", decision="approve", reason="matches", node="master-0"
    )
    store.record_csr_decision(time=now, csr="csr-2", kind="other", decision="deny", reason="no")
    csr = await _json(await c.get("/api/v1/csr-decisions?limit=1"))
    assert csr["counts"] == {"approve": 1, "deny": 1}
    assert [d["csr"] for d in csr["decisions"]] == ["csr-2"]

    cluster = await _json(await c.get("/api/v1/cluster"))
    assert cluster == {"running": False, "service": None, "gpu": None, "bootstrap": None}
    store.set_cluster_state("gpu", {"step": "operator", "status": "waiting for CSV"}, now)
    cluster = await _json(await c.get("/api/v1/cluster"))
    assert cluster["gpu"] == {"status": "waiting for CSV", "step": "operator"}

    backends = await _json(await c.get("/api/v1/backends"))
    assert backends == {"running": False, "frontends": {}}
    unknown = await _json(await c.get("/api/v1/unknown-machines"))
    assert unknown == {"total": 0, "evicted": 0, "limit": 100, "offset": 0, "machines": []}


async def test_dashboard_is_self_contained(admin: Admin) -> None:
    resp = await admin.client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    assert 'src="/dashboard/app.js"' in html and 'href="/dashboard/style.css"' in html
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        resp = await admin.client.get(f"/dashboard/{name}")
        assert resp.status == 200 and resp.content_type == kind
        text = await resp.text()
        assert not re.search(r"https?://", text), f"{name} loads something from elsewhere"
    assert not re.search(r"(src|href)=\"https?://", html)


async def test_reload_through_the_api(admin: Admin) -> None:
    resp = await admin.client.post("/api/v1/reload", headers=AUTH)
    assert resp.status == 200 and (await _json(resp))["ok"] is True
    admin.config.write_text("nodes: [")
    resp = await admin.client.post("/api/v1/reload", headers=AUTH)
    body = await _json(resp)
    assert resp.status == 422 and body["ok"] is False and body["errors"]


# --- the events stream ------------------------------------------------------------------------


async def _read_events(resp: ClientResponse, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Read `n` SSE messages (id and data) from an open stream."""
    got: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with asyncio.timeout(timeout):
        while len(got) < n:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and "data" in current:
                got.append(current)
                current = {}
    return got


async def test_events_backlog_live_and_resume(admin: Admin) -> None:
    c, bus = admin.client, admin.bus
    for i in range(5):
        bus.publish("master-0", "bootloader", f"try {i}", time=1000.0 + i)
    await asyncio.sleep(0.05)
    # A new client gets the newest `backlog` events, with their ids, then live ones.
    resp = await c.get("/api/v1/events?backlog=2")
    assert resp.headers["Content-Type"] == "text/event-stream"
    backlog = await _read_events(resp, 2)
    assert [e["id"] for e in backlog] == [4, 5]
    assert backlog[1]["data"]["detail"] == "try 4"
    bus.publish("worker-0", "dhcp-ack", "127.0.0.44", source="dhcp")
    live = await _read_events(resp, 1)
    assert live[0]["id"] == 6 and live[0]["data"]["node"] == "worker-0"
    resp.close()
    # Last-Event-ID resumes exactly after what the client had.
    resp = await c.get("/api/v1/events", headers={"Last-Event-ID": "3"})
    assert [e["id"] for e in await _read_events(resp, 3)] == [4, 5, 6]
    resp.close()
    # follow=false: what is stored, then the stream ends; a node filter.
    resp = await c.get("/api/v1/events?after=0&follow=false&node=worker-0")
    text = await resp.text()
    assert text.count("event: stage") == 1 and "id: 6" in text


async def test_events_keepalive_comments(admin: Admin) -> None:
    resp = await admin.client.get("/api/v1/events?keepalive=0.1")
    async with asyncio.timeout(5):
        while (await resp.content.readline()) != b": keep-alive\n":
            pass
    resp.close()


async def test_events_that_land_after_a_lock_reach_an_open_stream(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the state file when an event is published: the stream looks
    and finds nothing stored yet; the event is written once the lock goes, with no bus
    event to say so, and the stream sends it within a keep-alive interval."""
    monkeypatch.setattr(admin_module, "STORE_LAG_RETRIES", 1)  # its quick re-looks: 0.3 s
    resp = await admin.client.get("/api/v1/events?backlog=0&keepalive=0.2")
    await asyncio.sleep(0.05)
    lock = sqlite3.connect(admin.store.path, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        admin.bus.publish("master-0", "ignition", "while locked", time=5.0)
        await asyncio.sleep(0.8)  # the stream's quick re-looks after the bus rang are over
        assert admin.live.stats()["queued"] == 1
        lock.execute("COMMIT")
    finally:
        lock.close()
    (got,) = await _read_events(resp, 1, timeout=3.0)
    assert got["data"]["detail"] == "while locked"
    resp.close()


async def test_a_slow_stream_never_blocks_the_bus_and_loses_nothing(admin: Admin) -> None:
    c, bus = admin.client, admin.bus
    resp = await c.get("/api/v1/events?backlog=0")  # opened, then not read for a while
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    for i in range(3000):
        bus.publish("master-0", "kernel", f"{i}", time=float(i))
    assert time.perf_counter() - t0 < 2.0  # publish is synchronous and cheap
    await asyncio.sleep(0.2)
    got = await _read_events(resp, 3000, timeout=20)
    assert [e["id"] for e in got] == list(range(1, 3001))
    resp.close()


async def test_stop_ends_open_streams(admin: Admin) -> None:
    resp = await admin.client.get("/api/v1/events")
    await asyncio.sleep(0.05)
    assert admin.svc.status().streams == 1
    t0 = time.perf_counter()
    await admin.svc.stop()
    assert time.perf_counter() - t0 < 2.0
    async with asyncio.timeout(5):
        while await resp.content.readline():
            pass
    assert admin.svc.status().streams == 0


async def test_head_of_the_stream_does_not_hang(admin: Admin) -> None:
    async with asyncio.timeout(5):
        resp = await admin.client.head("/api/v1/events")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"


async def test_odd_values_in_a_service_status_are_text(admin: Admin) -> None:
    class OddStatus:
        def to_json(self) -> dict[str, Any]:
            return {"kubeconfig": Path("/etc/kubeconfig"), "when": object.__new__(OddStatus)}

        def metrics(self) -> list[Any]:
            return []

    class Odd:  # a service that only answers status(), as the admin reads it
        name = "cluster"

        async def start(self) -> None: ...

        async def reload(self, plan: Plan) -> None: ...

        async def stop(self) -> None: ...

        def status(self) -> OddStatus:
            return OddStatus()

    sup = admin.svc.ctx.control
    assert isinstance(sup, Supervisor)
    sup.specs.append(ServiceSpec("cluster", lambda ctx, plan: Odd()))
    sup.running["cluster"] = Odd()
    body = await _json(await admin.client.get("/api/v1/cluster"))
    assert body["running"] is True and body["service"]["kubeconfig"] == "/etc/kubeconfig"


async def test_host_names_are_checked_only_where_reads_are_open(
    admin: Admin, remote: Admin
) -> None:
    """Loopback (reads open): a rebound name gets 421. Elsewhere every read needs the
    token, which a rebinding page cannot know: an FQDN (a Prometheus scrape) is served."""
    host = {"Host": "evil.example:9000"}
    resp = await admin.client.get("/api/v1/status", headers=host)
    assert resp.status == 421
    resp = await remote.client.get("/api/v1/status", headers={**host, **AUTH})
    assert resp.status == 200
    resp = await remote.client.get("/api/v1/status", headers=host)
    assert resp.status == 401
