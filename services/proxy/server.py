"""The proxy service: the TCP load balancer of the api, machine_config and ingress frontends.

Per frontend: a listening socket, a pool (pool.py decides), active health checks
(checks.py probes), and connections (relay.py) whose sockets sit in one edge-triggered
epoll set (poller.py) and whose bytes pump.py moves. A connect that fails is retried
on the next eligible backend, and that backend leaves the pool at once.
Reload keeps every established connection: listeners that move are re-bound,
backends gone from the plan drain. Connections are admitted against caps derived from
the open-files limit (limits.py; the rest of the daemon keeps a reserve), and a
backend that is one of our own listeners is refused (a connect to it would loop).

APPLIANCE_NO_SPLICE=1 in the environment turns the splice() pump off (recv/send
instead), for tests and for comparing the two paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
from collections import Counter
from ipaddress import IPv4Address, ip_address

from appliance.addr import Endpoint
from appliance.fdbudget import FdBudget, budget, nofile_limit, raise_advice
from appliance.logs import fields
from appliance.plan import LB_FRONTENDS, Frontend, HealthCheck, Plan
from appliance.ratelog import RateGate, RateLimitedLog
from appliance.service import BindError, ServiceContext, ServiceError, bind_socket
from appliance.tasks import TaskSet, cancel_and_wait
from services.proxy.checks import probe
from services.proxy.connects import LOCAL_ERRNOS, Connects
from services.proxy.limits import Gate, Ledger, derive, own_endpoint
from services.proxy.listener import Listener
from services.proxy.localaddr import local_ipv4
from services.proxy.poller import Poller, make_poller
from services.proxy.pool import BackendState, Pool
from services.proxy.pump import HAVE_SPLICE
from services.proxy.relay import Connection
from services.proxy.status import BackendStatus, FrontendStatus, ProxyStatus

ACCEPT_BATCH = 64  # connections accepted per wakeup
SWEEP_EVERY = 1.0  # seconds between idle-timeout sweeps
EVENT_EVERY = 30.0  # at most one machine-config event per node this often
ACCEPT_PAUSE = 0.1  # seconds a listener rests after accept() ran out of descriptors
FDS_SPLICED = 6  # a connection spliced both ways: two sockets, two pipes of two
WARN_EVERY = 10.0  # seconds between two warnings of one kind per frontend
SELF_CHECK_EVERY = 5.0  # seconds between looks for backends that became our own address


class FrontendRunner:
    def __init__(self, service: ProxyService, frontend: Frontend) -> None:
        self.service = service
        self.name = frontend.name
        self.frontend = frontend
        self.pool = Pool(frontend)
        self.listener: socket.socket | None = None
        self.endpoint: Endpoint | None = None
        self.connections: set[Connection] = set()
        self.counters: Counter[str] = Counter()
        # One health-check task per backend (by id), spawned in the service's TaskSet.
        self.checks: dict[int, asyncio.Task[None]] = {}
        # At most one machine-config event per node every EVENT_EVERY seconds.
        self.event_gate = RateGate(EVENT_EVERY)
        self.paused: asyncio.TimerHandle | None = None
        # A warning of one kind at most every WARN_EVERY seconds: not a line per client.
        self.warnings = RateLimitedLog(service.ctx.log, WARN_EVERY)
        self.gate: Gate = service.ledger.gate(self.name)  # its caps (limits.py)
        # Connects in progress: their deadlines, retries and blame are the core's
        # (connects.py); its one timer (not one per connect) is armed here.
        self.connects: Connects[Connection] = Connects(
            self.pool, frontend.connect_timeout, self.counters
        )
        self.connects.wall_offset = service.wall_offset
        self.connect_timer: asyncio.TimerHandle | None = None
        self.connect_due = 0.0  # when connect_timer fires (monotonic), if it is set
        # The first verdicts at start are one summary line, not one line per backend.
        self.first_said = False

    # --- listening ----------------------------------------------------------------

    def bind(self, endpoint: Endpoint) -> socket.socket:
        return bind_socket(self.name, endpoint, socket.SOCK_STREAM)

    def listen(self, sock: socket.socket, endpoint: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        self._unpause()
        if self.listener is not None:
            loop.remove_reader(self.listener.fileno())
            self.listener.close()
        sock = Listener(sock)
        self.listener, self.endpoint = sock, endpoint
        loop.add_reader(sock.fileno(), self._accept)
        # The connections' epoll set exists before the first accept (which may already
        # be out of descriptors); if it cannot be made now, _accept tries again.
        with contextlib.suppress(OSError):
            self.service.get_poller()

    def close_listener(self) -> None:
        self._unpause()
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        self.service.release_poller_if_idle()

    def _unpause(self) -> None:
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None

    def _resume(self) -> None:
        self.paused = None
        if self.listener is not None:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        listener = self.listener
        assert listener is not None
        try:
            poller = self.service.get_poller()
        except OSError as exc:  # no descriptor for the epoll set either
            self._accept_failed(exc)
            return
        # The connections' clock (idle times, connect deadlines): read once per batch.
        poller.now = time.monotonic()
        counters, gate = self.counters, self.gate
        for _ in range(ACCEPT_BATCH):
            try:
                # The listener is non-blocking: accept() until the backlog is empty.
                client, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep the listener alive
                self._accept_failed(exc)
                return
            counters["accepted"] += 1
            peer = addr[0]
            refused = gate.admit(peer)
            if refused is not None:  # over a cap: closed at once, the others go on
                counters[refused] += 1
                client.close()
                self._refused(refused, peer)
                continue
            client.setblocking(False)  # accept() does not pass O_NONBLOCK on
            try:  # noqa: SIM105 (per connection: suppress() would cost an object)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # the client may be gone (reset) already: its first read says so
            conn = Connection(self, client, peer)
            self.connections.add(conn)
            conn.start()
            self._event(peer, poller.now)

    def warn(self, kind: str, message: str, *args: object) -> None:
        """A warning of this kind at most every WARN_EVERY seconds: not a line per client."""
        self.warnings.warning(kind, "%s: " + message, self.name, *args)

    def _refused(self, reason: str, peer: str) -> None:
        gate = self.gate
        if reason == "client_limit":
            self.warn(
                reason,
                "refusing connections from %s: it holds %d, the most one client may hold "
                "(more warnings of this kind suppressed for %g s)",
                peer,
                gate.per_client,
                WARN_EVERY,
            )
        elif reason == "over_limit":
            self.warn(reason, "refusing connections: %d open, its cap", gate.active)
        else:
            ledger = gate.ledger
            self.warn(
                reason,
                "refusing connections: the proxy holds %d of its %d descriptors",
                ledger.fds_used,
                ledger.fds,
            )

    def _accept_failed(self, exc: OSError) -> None:
        assert self.listener is not None
        self.counters["accept_errors"] += 1
        self.warn("accept", "accept failed: %s", exc)  # not a line per wakeup
        if exc.errno in LOCAL_ERRNOS and self.paused is None:
            # The connection stays in the backlog and the listener stays readable:
            # without a pause this would spin. Rest until descriptors free up.
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.listener.fileno())
            self.paused = loop.call_later(ACCEPT_PAUSE, self._resume)

    # --- connect timeouts ------------------------------------------------------------

    def connect_started(self, conn: Connection, backend: BackendState, now: float) -> None:
        deadline = self.connects.started(conn, backend, now)
        if self.connect_timer is None or deadline < self.connect_due:
            self._arm_connects(deadline)

    def _arm_connects(self, due: float) -> None:
        if self.connect_timer is not None:
            self.connect_timer.cancel()
        self.connect_due = due
        wait = max(0.0, due - time.monotonic())
        self.connect_timer = asyncio.get_running_loop().call_later(wait, self._check_connects)

    def _check_connects(self) -> None:
        self.connect_timer = None
        now = time.monotonic()
        if self.service.poller is not None:
            self.service.poller.now = now
        for outcome in self.connects.handle_timer(now):
            outcome.attempt.timed_out(outcome)  # may start a retry (at the back)
        due = self.connects.get_timer()
        if due is not None and (self.connect_timer is None or due < self.connect_due):
            self._arm_connects(due)

    def cancel_connect_timer(self) -> None:
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None

    def _event(self, client: str, now: float) -> None:
        if self.name != "machine_config":
            return
        try:
            addr = ip_address(client)
        except ValueError:
            return
        if isinstance(addr, IPv4Address):
            node = self.service.plan.by_ip.get(addr)
            if node is not None and self.event_gate.admit(node.name, now).write:
                self.service.ctx.bus.publish(
                    node.name,
                    "machine-config",
                    f"{client} -> :{self.endpoint.port if self.endpoint else ''}",
                    source="proxy",
                )

    # --- health checks -------------------------------------------------------------

    def sync_checks(self) -> None:
        """One check task per backend in the pool; stop those of backends gone."""
        alive = {id(b): b for b in self.pool.backends if not b.removed}
        for key in list(self.checks):
            if key not in alive:
                self.checks.pop(key).cancel()
        tasks = self.service.tasks
        for key, backend in alive.items():
            if key not in self.checks:
                self.checks[key] = tasks.spawn(
                    self._check_loop(backend), name=f"check-{self.name}-{backend.spec.name}"
                )

    def cancel_checks(self) -> None:
        """Stop the health checks without waiting (a frontend a reload switched off)."""
        for task in self.checks.values():
            task.cancel()
        self.checks.clear()

    async def _check_loop(self, backend: BackendState) -> None:
        log = self.service.ctx.log
        while True:
            check = self.frontend.check
            # A backend that is our own listener is not probed: the proxy would answer.
            if backend.admin != "disabled" and backend.self_loop is None:
                ok, detail = await probe(check, str(backend.spec.address), backend.spec.port)
                if ok is None:  # out of descriptors here: no verdict on the backend
                    self.counters["check_local_errors"] += 1
                    self.warn("check", "health check of %s: %s", backend.spec.name, detail)
                    await asyncio.sleep(check.interval)
                    continue
                first = backend.health == "unknown" and not self.first_said
                change = backend.check_result(ok, self.service.wall(), detail)
                if first:
                    line = first_verdicts(self.name, self.pool.backends, check.interval)
                    if line is not None:
                        self.first_said = True
                        log.info("%s", line)
                elif change is not None:
                    log.info(
                        "%s: backend %s is %s (%s)",
                        self.name,
                        backend.spec.name,
                        change,
                        detail,
                        extra=self.service.node_fields(backend),
                    )
            await asyncio.sleep(check.interval)

    # --- idle timeouts and stats ---------------------------------------------------

    def sweep(self, now: float) -> None:
        limit = self.frontend.idle_timeout
        for conn in list(self.connections):
            if now - conn.last > limit:
                self.counters["idle_closed"] += 1
                conn.close()
        self.pool.forget_idle_removed()

    def status(self) -> FrontendStatus:
        return FrontendStatus(
            listen=str(self.endpoint) if self.endpoint else None,
            active=len(self.connections),
            balance=self.frontend.balance,
            # Where the health check goes: the ingress probes the router's :1936, not :80.
            check={
                "kind": self.frontend.check.kind,
                "port": self.frontend.check.port,
                "path": self.frontend.check.path,
                "interval": self.frontend.check.interval,
            },
            counters=dict(self.counters),
            limits=self.gate.stats(),
            backends=tuple(BackendStatus.of(b) for b in self.pool.backends),
        )

    async def stop(self, drain: float = 0.0) -> int:
        """Close the listener, let open connections finish for up to `drain` seconds,
        then cut the rest; returns how many were cut."""
        self.close_listener()
        await cancel_and_wait(list(self.checks.values()), log=self.service.ctx.log, what="check")
        self.checks.clear()
        await _wait_drained(self, drain)
        cut = list(self.connections)
        for conn in cut:
            conn.close()
        self.cancel_connect_timer()
        return len(cut)


class ProxyService:
    name = "proxy"

    def __init__(self, ctx: ServiceContext, plan: Plan) -> None:
        self.ctx = ctx
        self.plan = plan
        self.frontends: dict[str, FrontendRunner] = {}
        # The sweeper and every backend's health check: stopped together in stop().
        self.tasks = TaskSet(ctx.log, "proxy task")
        # A bug that every connection hits: counted per connection, a traceback per WARN_EVERY.
        self.errors_log = RateLimitedLog(ctx.log, WARN_EVERY)
        self.splice = HAVE_SPLICE and os.environ.get("APPLIANCE_NO_SPLICE", "") in ("", "0")
        # The proxied sockets' epoll set: open while anything listens or is connected.
        self.poller: Poller | None = None
        # Frontends switched off by a reload: no listener, their connections finish.
        self.retired: list[FrontendRunner] = []
        # Descriptors: the limit's split (fdbudget), the caps derived from it, and what
        # every frontend's connections and pipes hold against them (limits.py).
        self.fd_budget = budget(0)
        self.caps = derive(0, {}, 0)
        self.ledger = Ledger(self.caps)
        self.local: frozenset[str] = frozenset()  # this host's addresses (self-loops)
        self.local_known = True  # False once reading them failed (said once)
        self.nofile_said = ""  # the last open-files warning (said once, again if it changes)
        # Decisions run on one monotonic clock. Wall time only stamps what people read
        # (check and connect history): monotonic plus this offset, taken again every
        # sweep, so a stepped wall clock is followed within a second.
        self.wall_offset = time.time() - time.monotonic()

    def wall(self, now: float | None = None) -> float:
        """Wall time of the monotonic `now` (default: the clock now), for display."""
        return (time.monotonic() if now is None else now) + self.wall_offset

    async def start(self) -> None:
        plan = self.plan
        self._raise_nofile(plan)  # first: the caps derive from the limit it leaves
        await self._apply(plan)
        self._retune(plan)
        self._refuse_own_backends()
        # Drains and disables set so far (admin API, cluster loop) apply from now on.
        self.ctx.runtime.attach_load_balancer(self)
        self.tasks.spawn(self._sweep(), name="proxy-sweeper")
        self.ctx.log.info("zero-copy splice(): %s", "on" if self.splice else "off (recv/send)")

    async def reload(self, plan: Plan) -> None:
        self._raise_nofile(plan)
        await self._apply(plan)
        self.plan = plan
        self._retune(plan)
        self._refuse_own_backends()
        self.ctx.runtime.attach_load_balancer(self)  # a backend the plan added gets its state

    def _retune(self, plan: Plan) -> None:
        """Caps from the open-files limit as it is now; said in the log when they change."""
        self.fd_budget = fds = budget(nofile_limit())
        listening = {fe.name: fe.max_connections for fe in plan.frontends if fe.listen}
        checks = sum(len(fe.backends) for fe in plan.frontends if fe.listen)
        caps = derive(fds.spendable, listening, checks)
        self.ledger.retune(caps)
        if caps != self.caps:
            self.caps = caps
            self.ctx.log.info(
                "descriptors: limit %d, %d kept for the other services and the health "
                "checks; the proxy: %s",
                fds.limit,
                fds.reserve,
                caps.describe(),
            )

    def _refuse_own_backends(self) -> None:
        """Refuse backends that are our own listeners (or take back those no longer)."""
        try:
            self.local = local_ipv4()
            self.local_known = True
        except OSError as exc:
            if self.local_known:
                self.ctx.log.warning(
                    "cannot read this host's addresses (%s): only loopback and exact "
                    "listener addresses are recognised as the proxy's own",
                    exc,
                )
            self.local_known = False
        listeners = {
            r.endpoint: name
            for name, r in self.frontends.items()
            if r.endpoint is not None and r.listener is not None
        }
        now = self.wall()
        for runner in self.frontends.values():
            for backend in runner.pool.backends:
                if backend.removed:
                    continue
                reason = _own(backend, runner.frontend.check, listeners, self.local)
                if backend.set_self_loop(reason, now):
                    if reason is not None:
                        self.ctx.log.warning(
                            "%s: backend %s refused: %s",
                            runner.name,
                            backend.spec.name,
                            reason,
                            extra=self.node_fields(backend),
                        )
                    else:
                        self.ctx.log.info(
                            "%s: backend %s is no longer one of the proxy's own listeners",
                            runner.name,
                            backend.spec.name,
                            extra=self.node_fields(backend),
                        )

    def _raise_nofile(self, plan: Plan) -> None:
        """Lift the soft descriptor limit to what max_connections needs (as HAProxy does).

        The usual soft limit is 1024: a few hundred spliced connections would exhaust
        it. The hard limit (systemd: LimitNOFILE=) is the ceiling; never lowered.
        """
        need = 1024 + sum(fe.max_connections * FDS_SPLICED for fe in plan.frontends if fe.listen)
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft == resource.RLIM_INFINITY or soft >= need:
                return
            target = need if hard == resource.RLIM_INFINITY else min(need, hard)
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                self.ctx.log.info("open files limit raised from %d to %d", soft, target)
            if target < need:
                self._say_nofile(
                    f"open files limit {target} is below the {need} that max_connections "
                    f"needs; {raise_advice(os.environ)}"
                )
        except (OSError, ValueError) as exc:
            self._say_nofile(f"cannot raise the open files limit: {exc}")

    def _say_nofile(self, message: str) -> None:
        # Once: a reload that changes nothing says nothing again.
        if message != self.nofile_said:
            self.nofile_said = message
            self.ctx.log.warning("%s", message)

    async def _apply(self, plan: Plan) -> None:
        # Bind every listener that is new or moved first: if one fails, nothing changes.
        wanted = {fe.name: fe for fe in plan.frontends if fe.listen is not None}
        fresh: dict[str, socket.socket] = {}
        released: list[FrontendRunner] = []  # old listeners let go to make room
        try:
            for name, fe in wanted.items():
                runner = self.frontends.get(name)
                assert fe.listen is not None
                if runner is None or runner.endpoint != fe.listen:
                    fresh[name] = self._bind(name, fe.listen, runner, released)
        except ServiceError:
            for sock in fresh.values():
                sock.close()
            self._relisten(released)  # the running plan stays as it was, listeners too
            raise
        for name in list(self.frontends):
            if name not in wanted:
                runner = self.frontends.pop(name)
                runner.close_listener()  # its connections finish; its checks stop
                runner.cancel_checks()
                runner.gate.retired = True  # no new connections count against it
                self.retired.append(runner)  # still swept, closed at stop
        for name, fe in wanted.items():
            runner = self.frontends.get(name)
            if runner is None:
                runner = self.frontends[name] = FrontendRunner(self, fe)
            else:
                runner.frontend = fe
                runner.connects.timeout = fe.connect_timeout  # new connects; older keep theirs
                runner.pool.update(fe)
            if name in fresh:
                assert fe.listen is not None
                runner.listen(fresh[name], fe.listen)
            runner.sync_checks()

    def _bind(
        self,
        name: str,
        endpoint: Endpoint,
        runner: FrontendRunner | None,
        released: list[FrontendRunner],
    ) -> socket.socket:
        try:
            return bind_socket(name, endpoint, socket.SOCK_STREAM)
        except BindError as exc:
            # 0.0.0.0:6443 -> 127.0.0.1:6443 clashes with our own old socket: let it go.
            # Only then: a port some other program holds must not cost the old listener.
            old = runner.endpoint if runner is not None else None
            if (
                runner is None
                or runner.listener is None
                or old is None
                or exc.errno != errno.EADDRINUSE
                or old.port != endpoint.port
                or not (old.is_wildcard or endpoint.is_wildcard)
            ):
                raise
            runner.close_listener()
            released.append(runner)
            return bind_socket(name, endpoint, socket.SOCK_STREAM)

    def _relisten(self, released: list[FrontendRunner]) -> None:
        for runner in released:
            endpoint = runner.endpoint
            assert endpoint is not None
            try:
                runner.listen(bind_socket(runner.name, endpoint, socket.SOCK_STREAM), endpoint)
            except ServiceError as exc:
                self.ctx.log.error("%s: cannot listen on %s again: %s", runner.name, endpoint, exc)

    async def stop(self) -> None:
        # Graceful: every listener closes first (new connections are refused), then the
        # open ones drain together for up to load_balancer.stop_timeout; idle timeouts
        # still apply meanwhile (the sweeper runs until the end).
        self.ctx.runtime.detach_load_balancer(self)
        runners = [*self.frontends.values(), *self.retired]
        for runner in runners:
            runner.close_listener()
        await _drain_all(self, runners)
        await self.tasks.close()  # the sweeper (the checks ended with their frontends)
        self.frontends.clear()
        self.retired.clear()
        self.ledger.gates.clear()  # every connection is closed: a new start counts afresh

    async def _sweep(self) -> None:
        looked = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = time.monotonic()
            self.wall_offset = time.time() - now
            for runner in [*self.frontends.values(), *self.retired]:
                runner.connects.wall_offset = self.wall_offset
                runner.sweep(now)
            for runner in self.retired:
                if not runner.connections:
                    self.ledger.drop(runner.gate)
            self.retired = [r for r in self.retired if r.connections]
            if now - looked >= SELF_CHECK_EVERY:  # an address may have come to this host
                looked = now
                self._refuse_own_backends()

    # --- the poller ----------------------------------------------------------------------

    def get_poller(self) -> Poller:
        if self.poller is None:
            self.poller = make_poller(asyncio.get_running_loop(), self._poller_error)
        return self.poller

    def release_poller_if_idle(self) -> None:
        """Close the epoll set once nothing listens and no connection is left (stop)."""
        poller = self.poller
        if (
            poller is None
            or len(poller)
            or any(r.listener is not None for r in self.frontends.values())
        ):
            return
        if any(r.connections for r in [*self.frontends.values(), *self.retired]):
            return
        poller.close()
        self.poller = None

    def _poller_error(self, exc: BaseException) -> None:
        self.errors_log.log(
            logging.ERROR,
            "connection",
            "proxy: a connection failed unexpectedly: %r",
            exc,
            exc_info=exc,
        )

    # --- operations (admin API, cluster loop) -----------------------------------------

    def set_admin_state(self, frontend: str, backend: str, state: str) -> BackendState:
        """drain: no new connections; disable: none at all (existing ones closed); enable."""
        runner = self.frontends.get(frontend)
        if runner is None:
            raise KeyError(f"no frontend {frontend!r}")
        found = runner.pool.find(backend)
        if found is None:
            raise KeyError(f"no backend {backend!r} in {frontend}")
        if state not in ("enabled", "drain", "disabled"):
            raise ValueError(f"unknown state {state!r}")
        if found.admin == state:
            return found  # applied again (a restart, a reload): nothing changes, nothing said
        found.admin = state  # type: ignore[assignment]
        if state == "disabled":
            for conn in list(runner.connections):
                if conn.backend is found:
                    conn.close()
        self.ctx.log.info(
            "%s: backend %s set to %s", frontend, backend, state, extra=self.node_fields(found)
        )
        return found

    def node_fields(self, backend: BackendState) -> dict[str, str]:
        """The log fields of a backend's node (backends are named after their nodes)."""
        name = backend.spec.name
        node = self.plan.by_name.get(name)
        return fields(node=name, mac=node.mac if node else None, ip=backend.spec.address)

    def status(self) -> ProxyStatus:
        fds: FdBudget = self.fd_budget
        return ProxyStatus(
            splice=self.splice,
            descriptors={"limit": fds.limit, "reserve": fds.reserve, **self.ledger.stats()},
            frontends={name: r.status() for name, r in self.frontends.items()},
        )


def first_verdicts(frontend: str, backends: list[BackendState], interval: float) -> str | None:
    """One line once every probed backend has its first verdict (None until then):
    "api: 0 of 4 backends up yet; checking every 2 s" (as HAProxy's start is quiet)."""
    probed = [
        b for b in backends if not b.removed and b.admin != "disabled" and b.self_loop is None
    ]
    if any(b.health == "unknown" for b in probed):
        return None
    up = sum(1 for b in probed if b.health == "up")
    if up == len(probed):
        return f"{frontend}: {up} of {len(probed)} backends up"
    return f"{frontend}: {up} of {len(probed)} backends up yet; checking every {interval:g} s"


def _own(
    backend: BackendState,
    check: HealthCheck,
    listeners: dict[Endpoint, str],
    local: frozenset[str],
) -> str | None:
    """Why connecting to the backend (or probing it) would reach our own listener."""
    address = str(backend.spec.address)
    targets = [("", backend.spec.port)]
    if check.port is not None and check.port != backend.spec.port:
        targets.append(("its health check ", check.port))
    for what, port in targets:
        own = own_endpoint(address, port, listeners, local)
        if own is not None:
            return (
                f"{what}{address}:{port} is this proxy's own listener "
                f"({listeners[own]} on {own}): connecting would loop"
            )
    return None


def proxy_enabled(plan: Plan) -> bool:
    return any(fe.listen is not None for fe in plan.frontends)


# --- graceful stop -------------------------------------------------------------------

DRAIN_POLL = 0.05  # seconds between looks at the open connections while draining


async def _wait_drained(runner: FrontendRunner, timeout: float) -> None:
    """Until the frontend has no connection left, or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while runner.connections and time.monotonic() < deadline:
        await asyncio.sleep(min(DRAIN_POLL, max(0.0, deadline - time.monotonic())))


async def _drain_all(service: ProxyService, runners: list[FrontendRunner]) -> None:
    log = service.ctx.log
    timeout = max((r.frontend.stop_timeout for r in runners), default=0.0)
    open_before = sum(len(r.connections) for r in runners)
    if open_before:
        log.info("draining %s (up to %.1f s)", _connections(open_before), timeout)
    t0 = time.monotonic()
    cut = sum(await asyncio.gather(*(r.stop(r.frontend.stop_timeout) for r in runners)))
    if open_before:
        took = time.monotonic() - t0
        if cut:
            log.warning("%s still open after %.1f s: cut", _connections(cut), took)
        else:
            log.info("all connections finished in %.2f s", took)


def _connections(n: int) -> str:
    return f"{n} connection" if n == 1 else f"{n} connections"


__all__ = ["LB_FRONTENDS", "ProxyService", "proxy_enabled"]
