"""The aiohttp server under both HTTP ports (boot http, admin), hardened for outside clients.

aiohttp reads a request head for as long as the client cares to send it (a slowloris
holds a connection with a byte now and then), answers any HTTP-version its parser takes
with that version in the status line (a request with HTTP/2.0 got "HTTP/2.0 200 OK"), and
logs every malformed request with a traceback at ERROR. Here, for every connection:

- header deadline: a request head must be complete HEADER_TIMEOUT (10 s) after the
  connection opens, or after the first byte of a later request on a keep-alive
  connection; else 408 and close. Apache's RequestReadTimeout is 20 s, nginx's
  client_header_timeout 60 s; a boot client sends a head of a few hundred bytes at once,
  so 10 s is generous and frees a slot six times sooner than nginx. The head is also
  bounded to HEADER_BYTES in all (nginx: 4 buffers of 8 KiB): 431 past it. aiohttp's own
  limits stay: 8190 bytes a line, 128 fields.
- keep-alive: an idle connection closes after KEEPALIVE_TIMEOUT (aiohttp's default is an
  hour; nginx's keepalive_timeout is 75 s).
- version: HTTP/1.0 and 1.1 only; any other (2.0, 3.0, 0.9) gets 505 with an HTTP/1.1
  status line, and the connection closes (nginx answers the same).
- malformed requests: 400 (or 505 for an unknown version) and a counter; one INFO line
  per LOG_EVERY seconds says how many, the last one's reason, no traceback. A handler's
  own bug (500) still logs its traceback at ERROR.

The decisions (deadline, byte budget, log rate) are in plain classes with `now` passed
in (HeadClock, and appliance.ratelog's RateGate); the shell below only moves them through
aiohttp's hooks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import HttpVersion11
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from appliance.ratelog import RateGate

HEADER_TIMEOUT = 10.0  # seconds for a whole request head
HEADER_BYTES = 32 << 10  # bytes of one request head, request line included
KEEPALIVE_TIMEOUT = 30.0  # seconds an idle keep-alive connection is kept
LOG_EVERY = 10.0  # seconds between two lines about malformed requests on one port
LINGER = 2.0  # seconds a refused connection is still read (and dropped) before closing
BACKLOG = 1024  # as bind_socket's listen(): aiohttp's site would shrink it to 128

log = logging.getLogger("appliance.httpd")

# aiohttp internals leaned on below: the count of request heads a connection has parsed,
# and the handler arguments the server was made with. An aiohttp that renames them must
# fail here, at import, not run with a deadline that never sees a head complete.
if "_request_count" not in getattr(RequestHandler, "__slots__", ()):
    raise ImportError("aiohttp's RequestHandler has no _request_count: appliance.httpd needs it")


# --- pure decisions --------------------------------------------------------------------


@dataclass
class HeadClock:
    """When a connection's request head is due, from what the connection has seen.

    `parsed` is how many request heads the parser has completed on this connection and
    `answered` how many responses are done: while a request is in flight, bytes are its
    body (or pipelined heads, which the parser counts as they complete), so no deadline
    runs. Once idle, the first byte starts the clock (a keep-alive wait has its own
    timeout); a new connection's clock starts when it opens, as nginx's does.
    """

    timeout: float = HEADER_TIMEOUT
    limit: int = HEADER_BYTES
    parsed: int = 0
    answered: int = 0
    due: float | None = None  # None: no head is being waited for
    pending: int = 0  # bytes of the head not complete yet

    def opened(self, now: float) -> float:
        self.due = now + self.timeout
        return self.due

    def received(self, now: float, nbytes: int, parsed: int, body: bool = False) -> str | None:
        """After the parser took `nbytes`: None, or "too large" (answer 431, close).

        `body`: they went to the body of the request answered last, still incomplete
        when they came (answered early, a 401 or 405, before its body was read: aiohttp
        reads the rest, and it is no head: neither budget nor deadline)."""
        if parsed > self.parsed:
            self.parsed, self.due, self.pending = parsed, None, 0
            return None
        if self.parsed > self.answered or nbytes == 0 or body:
            return None
        if self.due is None:
            self.due = now + self.timeout
        self.pending += nbytes
        return "too large" if self.pending > self.limit else None

    def done(self) -> None:
        """A response is complete; the connection is idle unless heads are queued."""
        self.answered += 1

    def expired(self, now: float) -> bool:
        return self.due is not None and self.parsed <= self.answered and now >= self.due


# --- the shell ---------------------------------------------------------------------------


class Guard:
    """One port's shared state: its counters and its rate-limited log."""

    def __init__(self, service: str, counters: dict[str, int]) -> None:
        self.service = service
        self.counters = counters
        # A line per LOG_EVERY s for each of "timeout" and "malformed"; it counts the rest.
        self.gate = RateGate(LOG_EVERY)

    def count(self, kind: str, peer: str, reason: str) -> None:
        self.counters[kind] = self.counters.get(kind, 0) + 1
        timeout = kind == "header_timeout"
        verdict = self.gate.admit("timeout" if timeout else "malformed", time.monotonic())
        if verdict.write:
            log.info(
                "%s: %d %s since the last such line, the latest from %s: %s "
                "(one line per %g s at most)",
                self.service,
                verdict.held + 1,  # the events held back, and this one
                "slow request head(s) cut" if timeout else "malformed request(s)",
                peer,
                reason,
                LOG_EVERY,
            )


class GuardedHandler(RequestHandler):
    """aiohttp's connection protocol with the head deadline, head budget and quiet errors."""

    def __init__(self, manager: web.Server, guard: Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._clock = HeadClock(timeout=HEADER_TIMEOUT, limit=HEADER_BYTES)
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "?"
        self._refused = False
        self._body: StreamReader | None = None  # the body of the request answered last

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "?"
        self._arm(self._clock.opened(self._loop.time()))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: what still comes is dropped
        body = self._body is not None and not self._body.is_eof()  # before these bytes
        super().data_received(data)
        # The parser's count of complete request heads (aiohttp keeps it per connection).
        parsed = self._request_count
        verdict = self._clock.received(self._loop.time(), len(data), parsed, body)
        if verdict == "too large":
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        elif self._clock.due is None:
            self._disarm()
        elif self._timer is None:
            self._arm(self._clock.due)

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse, time: Any) -> None:
        # Called once per finished response (whatever the outcome): the connection is idle.
        self._body = request.content
        self._clock.done()
        if self._clock.due is None:
            self._disarm()
        super().log_access(request, response, time)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)  # a bug: traceback
        reason = (exc.message or type(exc).__name__).split("\n", 1)[0].strip(" :")
        if "HTTP version" in (exc.message or ""):
            status = HTTPStatus.HTTP_VERSION_NOT_SUPPORTED
        elif status == HTTPStatus.INTERNAL_SERVER_ERROR:
            status = HTTPStatus.BAD_REQUEST  # a body the parser refused, read by a handler
        self._guard.count("malformed", request.remote or self._peer, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("the response was under way: nothing more to send")
        text = f"{status} {HTTPStatus(status).phrase}\n"
        resp = web.Response(status=status, text=text)
        resp.force_close()
        return resp

    def _arm(self, due: float) -> None:
        self._disarm()
        self._timer = self._loop.call_at(due, self._check)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self._clock.expired(now):
            self._guard.count("header_timeout", self._peer, f"{HEADER_TIMEOUT:g} s")
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, "")
        elif self._clock.due is not None and self._clock.parsed <= self._clock.answered:
            self._arm(self._clock.due)

    def _refuse(self, status: HTTPStatus, reason: str) -> None:
        """Answer straight on the transport (no request exists to answer to) and close.
        The close lingers for LINGER s, reading and dropping what still comes: closing with
        unread bytes would send a reset that can overtake the answer (nginx lingers too)."""
        if reason:
            self._guard.count("malformed", self._peer, reason)
        self._disarm()
        transport = self.transport
        if self._refused or transport is None or transport.is_closing():
            self.force_close()
            return
        self._refused = True
        body = f"{status.value} {status.phrase}\n".encode()
        transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status.value, status.phrase.encode(), len(body), body)
        )
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER, self.force_close)


BAD_VERSION = web.RequestKey("appliance.bad_version", bool)


@web.middleware
async def _versions(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.get(BAD_VERSION):
        resp = web.Response(status=505, text="505 HTTP Version Not Supported: use HTTP/1.1\n")
        resp.force_close()
        return resp
    return await handler(request)


class GuardedSite(web.BaseSite):
    """SockSite with GuardedHandler connections."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, guard: Guard) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._sock = sock
        self._guard = guard
        host, port = sock.getsockname()[:2]
        self._name = f"http://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        kwargs = getattr(server, "_kwargs", None)  # what AppRunner gives the standard handler
        if not isinstance(kwargs, dict):
            raise RuntimeError("aiohttp's Server has no _kwargs: appliance.httpd needs them")
        kwargs = dict(kwargs)
        guard = self._guard
        inner = server.request_factory

        def request_factory(message: Any, *rest: Any) -> web.BaseRequest:
            # The status line of a response repeats the request's version: answer an
            # HTTP/2.0 (or 0.9) request line as HTTP/1.1, and refuse it in the middleware.
            bad = message.version.major != 1
            if bad:
                message = message._replace(version=HttpVersion11)
            request = inner(message, *rest)
            if bad:
                request[BAD_VERSION] = True
                guard.count("malformed", request.remote or "?", "HTTP version not supported")
            return request

        server.request_factory = request_factory

        def factory() -> GuardedHandler:
            return GuardedHandler(server, guard, loop=loop, **kwargs)

        self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)


async def serve(
    service: str, sock: socket.socket, app: web.Application, counters: dict[str, int]
) -> web.AppRunner:
    """Run `app` on the bound, listening `sock` with the guards above."""
    app.middlewares.insert(0, _versions)  # outermost: before any auth or routing
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE_TIMEOUT
    )
    await runner.setup()
    await GuardedSite(runner, sock, Guard(service, counters)).start()
    return runner
