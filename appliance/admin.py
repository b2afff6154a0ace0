"""The admin endpoint (aiohttp): health, status, nodes and reload under /api/v1.

Reads are open on loopback and need the bearer token elsewhere; mutations always
need it. The token lives in `<state_dir>/admin.token` (mode 0600).
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import Any

from aiohttp import web

from appliance.plan import Plan
from appliance.service import ServiceContext, ServiceSpec, start_web


class AdminService:
    name = "admin"

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.plan: Plan | None = None
        self.runner: web.AppRunner | None = None
        self.requests = 0

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, plan: Plan) -> None:
        endpoint = plan.listen["admin"]
        self.plan = plan
        self.loopback_only = ipaddress.ip_address(endpoint.host).is_loopback
        self.runner = await start_web(self.name, endpoint, self.app())

    async def reload(self, plan: Plan) -> None:
        self.plan = plan

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def status(self) -> dict[str, Any]:
        return {"requests": self.requests}

    # --- HTTP ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/api/v1/status", self.get_status)
        app.router.add_get("/api/v1/nodes", self.get_nodes)
        app.router.add_get("/api/v1/plan", self.get_plan)
        app.router.add_get("/api/v1/unknown-machines", self.get_unknown)
        app.router.add_get("/api/v1/backends", self.get_backends)
        app.router.add_post(
            "/api/v1/frontends/{frontend}/backends/{backend}/{action}", self.post_backend
        )
        app.router.add_post("/api/v1/reload", self.post_reload)
        app.router.add_post("/api/v1/nodes/{name}/reinstall", self.post_reinstall)
        return app

    def _token_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        expected = self.ctx.admin_token
        return bool(
            expected
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), expected.encode())
        )

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        needs_token = request.method not in ("GET", "HEAD") or not self.loopback_only
        if needs_token and request.path != "/healthz" and not self._token_ok(request):
            return web.json_response(
                {"error": "a bearer token is required (see <state_dir>/admin.token)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="appliance"'},
            )
        response: web.StreamResponse = await handler(request)
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def get_status(self, request: web.Request) -> web.Response:
        control = self.ctx.control
        return web.json_response(control.status() if control else {})

    async def get_plan(self, request: web.Request) -> web.Response:
        assert self.plan is not None
        return web.json_response(self.plan.to_dict())

    async def get_nodes(self, request: web.Request) -> web.Response:
        assert self.plan is not None
        progress = self.ctx.store.progress()
        nodes = []
        for node in self.plan.nodes:
            stages = progress.get(node.name, {})
            nodes.append(
                {
                    "name": node.name,
                    "fqdn": node.fqdn,
                    "role": node.role,
                    "mac": node.mac,
                    "ip": str(node.ip),
                    "gpu": node.gpu,
                    "stages": {
                        stage: {"first": first, "last": last, "detail": detail}
                        for stage, (first, last, detail) in stages.items()
                    },
                }
            )
        return web.json_response({"nodes": nodes})

    async def get_unknown(self, request: web.Request) -> web.Response:
        """Machines that network-booted here but are not in the inventory."""
        return web.json_response({"machines": self.ctx.store.unknown_machines()})

    def _proxy(self) -> Any:
        return self.ctx.services.get("proxy")

    async def get_backends(self, request: web.Request) -> web.Response:
        proxy = self._proxy()
        return web.json_response(proxy.status() if proxy is not None else {"frontends": {}})

    async def post_backend(self, request: web.Request) -> web.Response:
        """drain | disable | enable one backend of one frontend."""
        proxy = self._proxy()
        if proxy is None:
            return web.json_response({"error": "the load balancer is not running"}, status=404)
        action = request.match_info["action"]
        state = {"drain": "drain", "disable": "disabled", "enable": "enabled"}.get(action)
        if state is None:
            return web.json_response({"error": f"unknown action {action!r}"}, status=404)
        try:
            backend = proxy.set_admin_state(
                request.match_info["frontend"], request.match_info["backend"], state
            )
        except KeyError as exc:
            return web.json_response({"error": str(exc.args[0])}, status=404)
        return web.json_response({"ok": True, "backend": backend.stats()})

    async def post_reinstall(self, request: web.Request) -> web.Response:
        assert self.plan is not None
        name = request.match_info["name"]
        if name not in self.plan.by_name:
            return web.json_response({"error": f"no node {name!r} in the inventory"}, status=404)
        self.ctx.boot.request_reinstall(name, time.time())
        return web.json_response({"ok": True, "node": name, "next_boot": "install"})

    async def post_reload(self, request: web.Request) -> web.Response:
        control = self.ctx.control
        if control is None:
            return web.json_response({"error": "no supervisor"}, status=503)
        result = await control.reload()
        body = {"ok": result.ok, "errors": list(result.errors), "changed": list(result.changed)}
        return web.json_response(body, status=200 if result.ok else 422)


SPEC = ServiceSpec("admin", AdminService, listen_keys=("admin",))
