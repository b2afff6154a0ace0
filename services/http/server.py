"""The http service (aiohttp): boot images, boot loaders, boot configs and ignition.

Images go out with sendfile, Content-Length, Range (multipart too), HEAD, ETag and
Last-Modified; generated configs and ignition get the same conditionals and ranges
(services/http/ranges.py decides, RFC 9110). Ignition holds cluster secrets
(bootstrap.ign above all), so it is served only to the addresses of the nodes that own
it; anyone else gets 403 and an audit line. A node's first ignition fetch marks it
installed: its next network boot boots from disk (boot once).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from pathlib import Path

from aiohttp import hdrs, web

from appliance.events import BOOT_ERROR
from appliance.logs import fields
from appliance.plan import NodeInfo, Plan
from appliance.service import ServiceContext, start_web
from services import bootconfig
from services.bootconfig import client_ipv4
from services.booterrors import BootErrors
from services.bootfiles import Refused, jailed, served
from services.bootstage import Route, boot_file, boot_stage
from services.http.ignition import Target, ignition_access
from services.http.ranges import Validators, content_range, evaluate, multipart
from services.http.sendfile import SendfileResponse
from services.http.status import HttpStatus

# Who got which ignition, and who was refused: a logger of its own, to route or keep apart.
audit = logging.getLogger("appliance.http.audit")
BIG_CHUNK, SMALL_CHUNK = 4 << 20, 1 << 20
MANY_DOWNLOADS = 32


class HttpService:
    name = "http"

    def __init__(self, ctx: ServiceContext, plan: Plan) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.plan = plan
        self.runner: web.AppRunner | None = None  # while running (bound in start)
        self.counters: dict[str, int] = {}
        self.requests = 0
        self.bytes = 0  # response bodies as announced (Content-Length) when prepared
        self.boot_errors = BootErrors()

    async def start(self) -> None:
        listen = self.plan.listen["http"]
        self.runner = await start_web(self.name, listen, self.app(), self.counters)

    async def reload(self, plan: Plan) -> None:
        self.plan = plan

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def status(self) -> HttpStatus:
        return HttpStatus(
            counters=dict(self.counters),
            requests=self.requests,
            bytes=self.bytes,
            boot_errors=self.boot_errors.status(),
        )

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # --- routes ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(self._prepared)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/images/{path:.+}", self.images)
        app.router.add_get("/boot/{path:.+}", self.loaders)
        app.router.add_get("/ignition/node/{name}.ign", self.node_ignition)
        app.router.add_get("/ignition/{role}.ign", self.role_ignition)
        app.router.add_get("/{path:.*}", self.generated)  # boot.ipxe, pxelinux.cfg/, grub.cfg
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        # Every response passes here once, headers final (a Range's length included):
        # one call per request, nothing per chunk.
        self.requests += 1
        if request.method != "HEAD" and response.content_length:
            self.bytes += response.content_length

    def _file(
        self,
        request: web.Request,
        root: Path,
        rel: str,
        route: Route,
    ) -> SendfileResponse:
        """The file, or 403/404 (a boot error when a node asked for one of its boot files).
        A node's GET of one of its boot files reaches its stage (bootstage.boot_stage)
        once the file opens."""
        try:
            path = served(root, rel, self.plan.boot.private)
        except Refused as exc:
            self._count("refused")
            self._boot_error(request, route, rel, "refused", "403", str(exc))
            raise web.HTTPForbidden(text=f"{exc}\n") from None
        if not path.is_file():
            self._count("not_found")
            self._boot_error(request, route, rel, "missing", "404", str(root))
            raise web.HTTPNotFound(text="not found\n")
        self._count("files")
        # The body goes out with sendfile() (services/http/sendfile.py). The chunk size
        # only matters where that falls back to aiohttp's reads in a thread (TLS,
        # AIOHTTP_NOSENDFILE): big chunks mean fewer hand-offs, small ones bound memory
        # when a boot storm has many downloads open at once. Open connections stand for
        # downloads in flight (aiohttp prepares the response after the handler returns).
        server = self.runner.server if self.runner is not None else None
        busy = len(server.connections) if server is not None else 0
        chunk = BIG_CHUNK if busy < MANY_DOWNLOADS else SMALL_CHUNK

        def opened(status: int) -> None:
            # The stage is reached when the file opens: an unreadable kernel is no kernel.
            if status:
                cause = "unreadable" if status == 403 else "missing"
                self._boot_error(request, route, rel, cause, str(status), str(root))
            elif request.method == "GET" and (node := self._node(request)) is not None:
                boot = self.plan.boot.by_mac.get(node.mac)
                stage = boot_stage(boot, self.plan.dhcp.boot_files, route, rel)
                if stage is not None:
                    self._event(node.name, stage, f"http {request.path}")

        return SendfileResponse(path, chunk_size=chunk, opened=opened)

    async def images(self, request: web.Request) -> SendfileResponse:
        rel = request.match_info["path"]
        return self._file(request, self.plan.boot.images_dir, rel, "images")

    async def loaders(self, request: web.Request) -> SendfileResponse:
        """tftp_root over HTTP: UEFI HTTP boot fetches its loader here."""
        rel = request.match_info["path"]
        return self._file(request, self.plan.boot.tftp_root, rel, "root")

    async def generated(self, request: web.Request) -> web.Response:
        found = bootconfig.virtual_file(
            self.plan.boot, request.path, self.ctx.runtime.installed, request.query_string
        )
        if found is None:
            self._count("not_found")
            raise web.HTTPNotFound(text="not found\n")
        text, _node = found
        self._count("configs")
        return generated_response(request, text.encode(), "text/plain; charset=utf-8")

    # --- ignition -------------------------------------------------------------------

    async def role_ignition(self, request: web.Request) -> web.Response:
        return self._ignition(request, ("role", request.match_info["role"]))

    async def node_ignition(self, request: web.Request) -> web.Response:
        return self._ignition(request, ("node", request.match_info["name"]))

    def _has_ignition(self, name: str) -> bool:
        try:
            return (self.plan.boot.ignition_dir / name).is_file()
        except OSError:
            return False

    def _ignition(self, request: web.Request, target: Target) -> web.Response:
        """services/http/ignition.py decides; here the file is read and the answer said."""
        client = request.remote or ""
        decision = ignition_access(
            client_ipv4(client), target, request.method, self.plan, self.ctx.runtime,
            self._has_ignition,
        )  # fmt: skip
        filename, node = decision.filename, decision.node
        if decision.status == 404:
            raise web.HTTPNotFound(text="not found\n")
        if decision.status == 403:
            self._count("ignition_refused")
            # The audit trail has every refusal; a node of the inventory asking for
            # another's file is also a boot error (one line a minute: firmware retries).
            self._boot_error(request, "ignition", filename, "not_owner", "403")
            audit.warning(
                "ignition: refused %s (%s) to %s: not an address of its node(s)",
                filename,
                decision.what,
                client or "an unknown client",
                extra=self._fields(request),
            )
            raise web.HTTPForbidden(text="this ignition belongs to other nodes\n")
        if decision.status == 410:
            self._count("ignition_refused")
            audit.warning(
                "ignition: refused %s to %s: bootstrap is complete",
                filename,
                client,
                extra=self._fields(request),
            )
            self._boot_error(request, "ignition", filename, "bootstrap_retired", "410")
            raise web.HTTPGone(text="bootstrap is complete: its ignition is no longer served\n")
        assert node is not None  # served only to a node of the inventory
        try:
            data = jailed(self.plan.boot.ignition_dir, filename).read_bytes()
        except (Refused, OSError) as exc:
            self._count("not_found")
            cause = "unreadable" if isinstance(exc, PermissionError) else "missing"
            where = str(self.plan.boot.ignition_dir)
            self._boot_error(request, "ignition", filename, cause, "404", where)
            raise web.HTTPNotFound(text="ignition file not found\n") from None
        self._count("ignition_served")
        audit.info(
            "ignition: served %s to %s (%s)",
            filename,
            client,
            node.name,
            extra=fields(node=node.name, mac=node.mac, ip=client),
        )
        if decision.event:
            self._event(node.name, "ignition", f"http {filename}")
        if decision.mark_installed:
            self.ctx.runtime.mark_installed(node.name, time.time())
        return generated_response(request, data, "application/vnd.coreos.ignition+json")

    # --- helpers ---------------------------------------------------------------------

    def _node(self, request: web.Request) -> NodeInfo | None:
        addr = client_ipv4(request.remote or "")
        return self.plan.by_ip.get(addr) if addr is not None else None

    def _fields(self, request: web.Request) -> dict[str, str]:
        """The log fields of a request's client: its address, and its node if it is one."""
        node = self._node(request)
        if node is None:
            return fields(ip=request.remote)
        return fields(node=node.name, mac=node.mac, ip=request.remote)

    def _event(self, node: str, stage: str, detail: str) -> None:
        self.ctx.bus.publish(node, stage, detail, source="http")

    def _boot_error(
        self,
        request: web.Request,
        route: str,
        rel: str,
        cause: str,
        status: str,
        why: str = "",
    ) -> bool:
        """A known node was refused one of its boot files: a line and an event, once per
        node, path and cause a minute (firmware retries), every one counted. False when
        the client is no node or the file none of its boot files."""
        if request.method not in ("GET", "HEAD"):
            return False
        node = self._node(request)
        if node is None:
            return False  # a stranger's 404 is no node's boot failure
        boot = self.plan.boot.by_mac.get(node.mac)
        what = boot_file(boot, self.plan.dhcp.boot_files, route, rel)
        if what is None:
            return False  # a name firmware probes for: not finding it is normal
        report = self.boot_errors.refused(
            node.name, request.remote or "", what, request.path, cause,
            f"http {status}", time.monotonic(), why,
        )  # fmt: skip
        if report is not None:
            where = fields(node=node.name, mac=node.mac, ip=request.remote)
            self.log.warning("%s", report.line, extra=where)
            self.ctx.bus.publish(node.name, BOOT_ERROR, report.detail, source="http")
        return True


def generated_response(request: web.Request, body: bytes, content_type: str) -> web.Response:
    """A body made in memory, with the same conditionals and ranges as a file: its ETag is
    a digest of the content (no Last-Modified: the content has no file time)."""
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    outcome = evaluate(request.method, request.headers, len(body), Validators(etag))
    headers = {hdrs.ETAG: etag, hdrs.ACCEPT_RANGES: "bytes"}
    if outcome.status in (304, 412, 416):
        if outcome.status == 416:
            headers[hdrs.CONTENT_RANGE] = f"bytes */{len(body)}"
        return web.Response(status=outcome.status, headers=headers)
    if outcome.status == 200:
        return web.Response(body=body, headers={**headers, hdrs.CONTENT_TYPE: content_type})
    if len(outcome.ranges) == 1:
        first, last = outcome.ranges[0]
        headers[hdrs.CONTENT_RANGE] = content_range(first, last, len(body))
        headers[hdrs.CONTENT_TYPE] = content_type
        return web.Response(status=206, body=body[first : last + 1], headers=headers)
    boundary = secrets.token_hex(12)
    parts, tail, _total = multipart(outcome.ranges, len(body), content_type, boundary)
    data = b"".join(head + body[a : b + 1] for head, a, b in parts) + tail
    headers[hdrs.CONTENT_TYPE] = f"multipart/byteranges; boundary={boundary}"
    return web.Response(status=206, body=data, headers=headers)
