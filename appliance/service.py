"""What a service is to the supervisor, and helpers every service shares.

A service is built from a plan, started, takes new plans while running, and stops.
It binds its sockets in `start` (so bind errors surface before READY) and keeps
them across `reload`. Services declare which listeners they use, so the
supervisor restarts a service only when one of those addresses changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from appliance import httpd
from appliance.inventory import Endpoint
from appliance.plan import Plan

if TYPE_CHECKING:
    from appliance.events import EventBus
    from appliance.runtime import RuntimeState
    from appliance.status import ApplianceStatus, ServiceStatus
    from appliance.stores import ServiceStore


class ServiceError(Exception):
    """A service cannot start or take a plan; the message is one line for the operator."""


class BindError(ServiceError):
    def __init__(
        self, service: str, endpoint: Endpoint, exc: OSError, proto: str | None = None
    ) -> None:
        reason = exc.strerror or str(exc)
        super().__init__(f"{service}: cannot bind {endpoint}: {reason}")
        self.errno = exc.errno
        # The supervisor names who holds it (EADDRINUSE); proto None: tcp or udp.
        self.endpoint = endpoint
        self.proto = proto


class Control(Protocol):
    """The supervisor as the admin API sees it."""

    def status(self) -> ApplianceStatus: ...

    async def reload(self) -> ReloadResult: ...


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    errors: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # services that took the new plan
    diff_summary: str = ""  # plandiff: what the new plan changed, one line
    diff_lines: tuple[str, ...] = ()  # and one line per change


class Service(Protocol):
    """Built from the plan by its spec's factory (everything derivable from the plan exists
    once `__init__` returns); `start` only binds and spawns, so nothing is half-set."""

    name: str

    async def start(self) -> None: ...

    async def reload(self, plan: Plan) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> ServiceStatus: ...


@dataclass
class ServiceContext:
    """What the supervisor hands every service: the event bus, the store, a logger and
    the shared runtime state (boot once, bootstrap retired, backend admin states).
    Services never look each other up: what one writes and another applies is there."""

    bus: EventBus
    store: ServiceStore  # writes are queued, reads never wait for a lock on the loop
    log: logging.Logger
    runtime: RuntimeState
    control: Control | None = None
    admin_token: str = ""


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    factory: Callable[[ServiceContext, Plan], Service]  # the supervisor then awaits start()
    # The plan's listen keys this service binds; `enabled` defaults to "any of them set".
    listen_keys: tuple[str, ...] = ()
    enabled: Callable[[Plan], bool] | None = None
    # True: the service moves its own listeners on reload (keeping its connections),
    # so a changed address is a reload, not a restart.
    rebinds_itself: bool = False
    # True: with an HA pair (plan.ha) only the leader runs it (DHCP, the cluster loop);
    # a member starts it when it takes over and stops it when it steps down.
    leader_only: bool = False

    def is_enabled(self, plan: Plan) -> bool:
        if self.enabled is not None:
            return self.enabled(plan)
        return any(k in plan.listen for k in self.listen_keys)

    def endpoints(self, plan: Plan) -> tuple[Endpoint | None, ...]:
        return tuple(plan.listen.get(k) for k in self.listen_keys)


IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux <linux/in.h>
UDP_BUFFER = 4 << 20  # bytes: a burst (a boot storm) waits in the kernel, not on the floor


def grow_buffers(sock: socket.socket, size: int = UDP_BUFFER) -> None:
    """Ask for big socket buffers; as root past net.core.rmem_max (SO_*BUFFORCE)."""
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
    ):
        try:
            if force is None:
                raise PermissionError
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
        except OSError:
            pass


def _family(endpoint: Endpoint) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET


def bind_socket(service: str, endpoint: Endpoint, kind: socket.SocketKind) -> socket.socket:
    """Bind a UDP or listening TCP socket, or raise BindError with the operator's one line."""
    sock = socket.socket(_family(endpoint), kind)
    try:
        # TCP only: on UDP, SO_REUSEADDR would let two processes share a port silently.
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if endpoint.freebind:  # an HA floating address: bound before this member holds it
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind((endpoint.host, endpoint.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        else:
            grow_buffers(sock)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
        raise BindError(service, endpoint, exc, proto) from None
    return sock


async def start_tcp_server(
    service: str,
    endpoint: Endpoint,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    **kwargs: Any,
) -> asyncio.Server:
    """asyncio.start_server on a socket we bound ourselves, so bind errors read cleanly."""
    sock = bind_socket(service, endpoint, socket.SOCK_STREAM)
    return await asyncio.start_server(handler, sock=sock, **kwargs)


async def start_web(
    service: str,
    endpoint: Endpoint,
    app: web.Application,
    counters: dict[str, int] | None = None,
) -> web.AppRunner:
    """Serve an aiohttp application on a socket we bound (bind errors read cleanly), with
    appliance.httpd's guards: request-head deadline and size bound, keep-alive timeout,
    505 for other HTTP versions, malformed requests counted in `counters` and logged
    quietly."""
    sock = bind_socket(service, endpoint, socket.SOCK_STREAM)
    return await httpd.serve(service, sock, app, counters if counters is not None else {})
