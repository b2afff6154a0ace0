"""The admin endpoint (aiohttp): JSON API under /api/v1, events stream, dashboard, /metrics.

Reads are open on loopback and need the bearer token elsewhere; mutations always
need it. The token lives in `<state_dir>/admin.token` (mode 0600). The browser's
EventSource cannot send headers, so GET requests may carry it as `?access_token=`.
Every error is a JSON body `{"error": "..."}`; a failing handler is logged and
answered with 500, it never takes the service down.

The OpenAPI document (appliance/openapi.py) describes every route added in `app()`;
a test keeps the two in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import importlib.resources
import ipaddress
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from appliance import sse, unknown
from appliance.events import STAGES, Event, Subscription
from appliance.metrics import ApplianceCollector, StoreFacts, store_facts
from appliance.openapi import document
from appliance.plan import NodeInfo, Plan
from appliance.progress import NodeFacts, timeline
from appliance.runtime import AdminState, LoadBalancerOff
from appliance.service import ServiceContext, ServiceSpec, start_web
from appliance.status import ApplianceStatus, Family, counter, gauge, malformed
from appliance.stores import StoreBusy, StoreReader

MAX_EVENT_ID = 10**18 - 1  # the largest id `after` and Last-Event-ID take
KEEPALIVE = 15.0  # seconds between comments on an idle events stream
STORE_LAG_RETRY = 0.05  # seconds: the bus rang before the store wrote the event
STORE_LAG_RETRIES = 20  # so look again, up to a second
STREAM_QUEUE = 256  # bus events one stream may hold; it only uses them as a doorbell
DASHBOARD_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
PUBLIC = ("/healthz", "/", "/api/v1/openapi.json")  # never need the token (no cluster data)
BACKEND_ACTIONS: dict[str, AdminState] = {
    "drain": "drain",
    "disable": "disabled",
    "enable": "enabled",
}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """A request the client must change: answered 400 with the message."""


class NotFound(Exception):
    """A node, frontend or backend that does not exist: answered 404 with the message."""


def _dumps(value: Any) -> str:
    # Service status may hold values JSON does not know (a Path, a datetime): say them as text.
    return json.dumps(value, default=str)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _last_event_id(s: StoreReader) -> int:
    return s.last_event_id()


def _events(s: StoreReader, *, node: str | None, after_id: int, limit: int) -> list[Event]:
    return s.events(node=node, after_id=after_id, limit=limit)


@dataclass(frozen=True)
class AdminStatus:
    requests: int = 0
    errors: int = 0  # requests that failed with a bug of ours (500)
    streams: int = 0  # open event streams
    counters: Mapping[str, int] = field(default_factory=dict)  # malformed, slow heads

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "streams": self.streams,
            "counters": dict(self.counters),
        }

    def metrics(self) -> Iterator[Family]:
        yield malformed("admin", self.counters.get("malformed", 0))
        yield counter("admin_requests", "Requests to the admin endpoint", self.requests)
        yield gauge("admin_streams", "Open event streams", self.streams)


class AdminService:
    name = "admin"

    def __init__(self, ctx: ServiceContext, plan: Plan) -> None:
        self.ctx = ctx
        self.plan = plan
        self.runner: web.AppRunner | None = None
        self.requests = 0
        self.errors = 0
        self.loopback_only = _is_loopback(plan.listen["admin"].host)
        self.streams: set[Subscription] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        # The store's counts are read in the store's reader thread before each scrape:
        # collect() runs on the loop and must not wait for the file.
        self._facts = StoreFacts()
        self.registry.register(ApplianceCollector(self._status, lambda: self._facts))
        self._files: dict[str, bytes] = {}
        self._names: tuple[tuple[str, ...], frozenset[str]] | None = None
        self.counters: dict[str, int] = {}  # malformed requests, slow heads (appliance.httpd)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        endpoint = self.plan.listen["admin"]
        self.runner = await start_web(self.name, endpoint, self.app(), self.counters)

    async def reload(self, plan: Plan) -> None:
        self.plan = plan

    async def stop(self) -> None:
        # Open event streams end first, or the runner would wait for them to time out.
        for sub in list(self.streams):
            sub.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def status(self) -> AdminStatus:
        return AdminStatus(self.requests, self.errors, len(self.streams), dict(self.counters))

    def _status(self) -> ApplianceStatus:
        control = self.ctx.control
        return control.status() if control is not None else ApplianceStatus()

    # --- HTTP ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        get, post = app.router.add_get, app.router.add_post
        get("/", self.dashboard)
        get("/dashboard/{file}", self.dashboard_file)
        get("/healthz", self.healthz)
        get("/metrics", self.metrics)
        get("/api/v1/openapi.json", self.openapi)
        get("/api/v1/status", self.get_status)
        get("/api/v1/plan", self.get_plan)
        get("/api/v1/nodes", self.get_nodes)
        get("/api/v1/nodes/{name}", self.get_node)
        post("/api/v1/nodes/{name}/reinstall", self.post_reinstall)
        get("/api/v1/leases", self.get_leases)
        get("/api/v1/unknown-machines", self.get_unknown)
        get("/api/v1/backends", self.get_backends)
        post("/api/v1/frontends/{frontend}/backends/{backend}/{action}", self.post_backend)
        get("/api/v1/csr-decisions", self.get_csr_decisions)
        get("/api/v1/cluster", self.get_cluster)
        get("/api/v1/events", self.get_events)
        post("/api/v1/reload", self.post_reload)
        return app

    def _token_ok(self, request: web.Request) -> bool:
        expected = self.ctx.admin_token
        if not expected:
            return False
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            # EventSource cannot send headers: reads may carry the token in the query.
            token = request.query.get("access_token", "") if request.method == "GET" else ""
        try:
            # Header bytes that are not UTF-8 arrive as surrogates: a wrong token, not a 500.
            given = token.strip().encode()
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(given, expected.encode())

    def _host_ok(self, request: web.Request) -> bool:
        """DNS rebinding: a browser on a hostile page whose name now points at us sends
        that name as Host. Answer only names of this listener: IP literals (no rebinding
        through those), localhost, this machine's names and `admin_hosts`."""
        host = request.headers.get("Host")
        if host is None:
            return True  # HTTP/1.0 without Host: not a browser
        name = host.strip().lower()
        if name.startswith("["):  # [v6]:port
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        name = name.rstrip(".")
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            return True
        return name in self._host_names()

    def _host_names(self) -> frozenset[str]:
        extra = self.plan.admin_hosts
        if self._names is None or self._names[0] != extra:
            # No getfqdn(): a resolver lookup would block the loop; FQDNs go in admin_hosts.
            names = {"localhost", socket.gethostname().lower(), *extra}
            self._names = (extra, frozenset(n.rstrip(".") for n in names if n))
        return self._names[1]

    def _needs_token(self, request: web.Request) -> bool:
        if request.method not in ("GET", "HEAD"):
            return True
        if self.loopback_only:
            return False
        return request.path not in PUBLIC and not request.path.startswith("/dashboard/")

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Token check, and every failure as a JSON error (never a traceback to the client)."""
        self.requests += 1
        # Rebinding matters where reads are open (loopback): elsewhere every read already
        # needs the token, which a rebinding page cannot know, and FQDNs must keep working.
        if self.loopback_only and not self._host_ok(request):
            return _error(421, "this endpoint does not answer to that Host name")
        if self._needs_token(request) and not self._token_ok(request):
            return _error(
                401,
                "a valid bearer token is required (see <state_dir>/admin.token)",
                {"WWW-Authenticate": 'Bearer realm="appliance"'},
            )
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, str(exc))
        except NotFound as exc:
            return _error(404, str(exc))
        except StoreBusy as exc:  # another process holds the file: nothing waits for it here
            return _error(503, str(exc), {"Retry-After": "1"})
        except web.HTTPException as exc:  # the router's 404 and 405
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _error(exc.status, exc.reason, headers)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            self.errors += 1
            self.ctx.log.exception("admin: %s %s failed", request.method, request.path)
            return _error(500, "internal error (logged by the appliance)")

    # --- pages and documents ---------------------------------------------------------

    def _asset(self, name: str) -> web.Response:
        body = self._files.get(name)
        if body is None:
            body = (importlib.resources.files("appliance") / "dashboard" / name).read_bytes()
            self._files[name] = body
        return web.Response(
            body=body,
            content_type=DASHBOARD_FILES[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def dashboard(self, request: web.Request) -> web.Response:
        return self._asset("index.html")

    async def dashboard_file(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in DASHBOARD_FILES or name == "index.html":
            raise NotFound(f"no dashboard file {name!r}")
        return self._asset(name)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(self, request: web.Request) -> web.Response:
        now = time.time()
        self._facts = await self.ctx.store.read(lambda s: store_facts(s, now))
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document())

    # --- reads -----------------------------------------------------------------------

    async def get_status(self, request: web.Request) -> web.Response:
        plan = self.plan
        body = self._status().to_json()
        roles = {
            r: sum(1 for n in plan.nodes if n.role == r) for r in ("bootstrap", "master", "worker")
        }
        body["time"] = time.time()
        body["plan"] = {
            "domain": plan.domain,
            "source": os.path.abspath(plan.source),  # which file: clients warn on a mismatch
            "nodes": len(plan.nodes),
            "roles": roles,
            "gpu_nodes": sum(1 for n in plan.nodes if n.gpu),
            "frontends": [fe.name for fe in plan.frontends if fe.listen is not None],
            "listen": {k: str(v) for k, v in plan.listen.items()},
            "dhcp_mode": plan.dhcp.mode,
            "after_install": plan.boot.after_install,
        }
        return web.json_response(body, dumps=_dumps)

    async def get_plan(self, request: web.Request) -> web.Response:
        return web.json_response(self.plan.to_dict())

    def _node_view(
        self,
        node: NodeInfo,
        progress: Mapping[str, tuple[float, float, str]],
        install: Mapping[str, float | None],
        now: float,
    ) -> dict[str, Any]:
        facts = NodeFacts(
            node.name,
            node.role,
            node.gpu,
            install.get("installed_at"),
            install.get("reinstall_requested"),
            self.plan.boot.after_install,
        )
        return {
            "name": node.name,
            "fqdn": node.fqdn,
            "role": node.role,
            "mac": node.mac,
            "ip": str(node.ip),
            "gpu": node.gpu,
            "stages": {
                stage: {"first": first, "last": last, "detail": detail}
                for stage, (first, last, detail) in progress.items()
            },
            "installed_at": facts.installed_at,
            "reinstall_requested": facts.reinstall_requested,
            **timeline(facts, progress, now),
        }

    async def get_nodes(self, request: web.Request) -> web.Response:
        store, now = self.ctx.store, time.time()
        # Before the reads: a stream from here misses nothing. Progress and install state
        # are in memory (they move on while the file is locked).
        last_id = await store.read(_last_event_id)
        progress, install = store.progress(), store.install_state()
        nodes = [
            self._node_view(n, progress.get(n.name, {}), install.get(n.name, {}), now)
            for n in self.plan.nodes
        ]
        body = {"time": now, "last_event_id": last_id, "stages": list(STAGES), "nodes": nodes}
        return web.json_response(body)

    async def get_node(self, request: web.Request) -> web.Response:
        node = self._node(request.match_info["name"])
        after = _int(request.query, "after", 0, 0, MAX_EVENT_ID)
        limit = _int(request.query, "limit", 500, 1, 5000)
        store, now = self.ctx.store, time.time()
        view = self._node_view(
            node,
            store.progress().get(node.name, {}),
            store.install_state().get(node.name, {}),
            now,
        )
        events = await store.read(lambda s: s.events(node=node.name, after_id=after, limit=limit))
        view["events"] = [e.to_dict() for e in events]
        return web.json_response(view)

    def _node(self, name: str) -> NodeInfo:
        node = self.plan.by_name.get(name)
        if node is None:
            raise NotFound(f"no node {name!r} in the inventory")
        return node

    async def get_leases(self, request: web.Request) -> web.Response:
        everything = _bool(request.query, "all", False)
        now = time.time()
        by_mac = {n.mac: n.name for n in self.plan.nodes}
        leases = await self.ctx.store.read(lambda s: s.leases(None if everything else now))
        body = [
            {
                "mac": lease.mac,
                "ip": lease.ip,
                "hostname": lease.hostname,
                "node": by_mac.get(lease.mac),
                "state": lease.state,
                "expires": lease.expires,
                "expires_in": round(lease.expires - now, 3),
                "updated": lease.updated,
            }
            for lease in leases
        ]
        return web.json_response({"time": now, "leases": body})

    async def get_unknown(self, request: web.Request) -> web.Response:
        """Machines that network-booted here but are not in the inventory, a page at a
        time (the most recently seen first), with how many there are and were evicted."""
        limit = _int(request.query, "limit", 100, 1, 1000)
        offset = _int(request.query, "offset", 0, 0, 10**9)
        store = self.ctx.store
        (total, evicted), machines = await store.read(
            lambda s: (s.unknown_machine_counts(), s.unknown_machines(limit, offset))
        )
        nodes = self.plan.nodes
        for machine in machines:
            # The likely typo in the inventory: a node's MAC a digit or two away.
            machine["arch_name"] = unknown.arch_name(
                str(machine.get("arch") or ""), str(machine.get("vendor_class") or "")
            )
            machine["closest"] = unknown.closest(str(machine["mac"]), nodes)
        body = {
            "total": total,
            "evicted": evicted,
            "limit": limit,
            "offset": offset,
            "machines": machines,
        }
        return web.json_response(body)

    async def get_backends(self, request: web.Request) -> web.Response:
        proxy = self._status().service("proxy")
        if proxy is None:
            return web.json_response({"running": False, "frontends": {}})
        return web.json_response({"running": True, **proxy.to_json()}, dumps=_dumps)

    async def get_csr_decisions(self, request: web.Request) -> web.Response:
        limit = _int(request.query, "limit", 100, 1, 5000)
        counts, decisions = await self.ctx.store.read(
            lambda s: (s.csr_decision_counts(), s.csr_decisions(limit))
        )
        return web.json_response({"counts": counts, "decisions": decisions})

    async def get_cluster(self, request: web.Request) -> web.Response:
        """The cluster loop: GPU bring-up and bootstrap state (kept in the store), its status."""
        cluster = self._status().service("cluster")
        gpu, bootstrap = await self.ctx.store.read(
            lambda s: (s.cluster_state("gpu"), s.cluster_state("bootstrap"))
        )
        return web.json_response(
            {
                "running": cluster is not None,
                "service": cluster.to_json() if cluster is not None else None,
                "gpu": gpu,
                "bootstrap": bootstrap,
            },
            dumps=_dumps,
        )

    # --- the events stream -----------------------------------------------------------

    async def get_events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: stored events (with their ids), then live ones as they come.

        The store is the source (it gives ids, so `Last-Event-ID` resumes exactly); the
        bus only says when to look. The subscription is bounded and drops its oldest,
        so a slow client never holds up the bus, and loses nothing: the store has it.
        """
        query = request.query
        try:
            # EventSource resumes with the header; it wins over the query's `after`.
            resume = sse.parse_event_id(request.headers.get("Last-Event-ID"))
            after = sse.parse_event_id(query.get("after"))
            after = resume if resume is not None else after
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        backlog = _int(query, "backlog", 100, 0, 1000)
        follow = _bool(query, "follow", True)
        keepalive = _float(query, "keepalive", KEEPALIVE, 0.1, 300.0)
        node = query.get("node")
        if node is not None:
            self._node(node)
        if request.method == "HEAD":  # the headers a stream would have, and no stream
            return web.Response(headers={"Content-Type": "text/event-stream"})
        store = self.ctx.store
        sub = self.ctx.bus.subscribe(STREAM_QUEUE)  # before reading: nothing falls in between
        self.streams.add(sub)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            if after is None:  # a new client: the latest `backlog` events first
                after = max(0, await store.read(_last_event_id) - backlog)
            await response.write(sse.retry(2000))
            cursor = await self._send_since(response, after, node)
            retries = 0  # the bus rang but the store had nothing new yet: look again soon
            while follow:
                try:
                    async with asyncio.timeout(STORE_LAG_RETRY if retries else keepalive):
                        await sub.get()  # asyncio.timeout: a stop's cancel is never swallowed
                    sub.drain()
                    rang = True
                except TimeoutError:
                    rang = False
                    if not retries:
                        # Then look anyway: events queued while another process held
                        # the file land later, with no bus event to say so.
                        await response.write(sse.comment("keep-alive"))
                except StopAsyncIteration:
                    break  # the service stops
                sent = await self._send_since(response, cursor, node)
                if sent != cursor:
                    retries = 0
                elif rang:
                    retries = STORE_LAG_RETRIES  # (or an event of another node, when filtered)
                elif retries:
                    retries -= 1
                cursor = sent
        except ConnectionError:
            pass  # the client went away
        finally:
            sub.close()
            self.streams.discard(sub)
        return response

    async def _send_since(self, response: web.StreamResponse, after: int, node: str | None) -> int:
        """Write every stored event after `after` (in pages); return the last id written."""
        for _ in range(1000):  # bounded: a million events per wake-up at most
            events = await self.ctx.store.read(
                functools.partial(_events, node=node, after_id=after, limit=1000)
            )
            if not events:
                break
            chunk = b"".join(
                sse.encode(json.dumps(e.to_dict()), id=e.id, event="stage") for e in events
            )
            await response.write(chunk)
            after = events[-1].id
        return after

    # --- mutations -------------------------------------------------------------------

    async def post_backend(self, request: web.Request) -> web.Response:
        """drain | disable | enable one backend of one frontend."""
        action = request.match_info["action"]
        state = BACKEND_ACTIONS.get(action)
        if state is None:  # an action that does not exist is a path that does not exist
            raise NotFound(f"unknown action {action!r} (drain, disable or enable)")
        try:
            backend = self.ctx.runtime.set_admin_state(
                request.match_info["frontend"], request.match_info["backend"], state
            )
        except LoadBalancerOff as exc:
            raise NotFound(str(exc)) from None
        except KeyError as exc:
            raise NotFound(str(exc.args[0])) from None
        return web.json_response({"ok": True, "backend": backend.status().to_json()}, dumps=_dumps)

    async def post_reinstall(self, request: web.Request) -> web.Response:
        node = self._node(request.match_info["name"])
        self.ctx.runtime.request_reinstall(node.name, time.time())
        return web.json_response({"ok": True, "node": node.name, "next_boot": "install"})

    async def post_reload(self, request: web.Request) -> web.Response:
        control = self.ctx.control
        if control is None:
            return _error(503, "no supervisor")
        result = await control.reload()
        body = {
            "ok": result.ok,
            "errors": list(result.errors),
            "changed": list(result.changed),
            "diff": {"summary": result.diff_summary, "lines": list(result.diff_lines)},
        }
        return web.json_response(body, status=200 if result.ok else 422)


# --- query parameters ------------------------------------------------------------------


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    text = raw.strip()
    # Plain ASCII digits only: int() would also take "1_0", "+3" and other scripts' digits.
    if not (text.removeprefix("-").isascii() and text.removeprefix("-").isdigit()):
        raise BadRequest(f"{name}: {raw!r} is not an integer")
    value = int(text)
    if not low <= value <= high:
        raise BadRequest(f"{name}: {value} is outside {low}..{high}")
    return value


def _float(query: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise BadRequest(f"{name}: {raw!r} is not a number") from None
    if not low <= value <= high:  # also refuses nan
        raise BadRequest(f"{name}: {raw} is outside {low}..{high}")
    return value


def _bool(query: Mapping[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise BadRequest(f"{name}: {raw!r} is not a boolean (true or false)")


def _is_loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return host == "localhost"


SPEC = ServiceSpec("admin", AdminService, listen_keys=("admin",))
