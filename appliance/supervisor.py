"""The supervisor: runs every enabled service in one asyncio process.

Start binds every listener before READY (a bind error stops the start with one
clear line). Reload re-reads the inventory, builds a new plan and applies it in
two phases: first every service that needs new sockets is started on the new
plan (if any fails, nothing changes); then the old instances are stopped and the
others take the new plan. An invalid inventory leaves the running plan alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import secrets
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.admintoken import TOKEN_FILE
from appliance.checks import current_user, name_holders, preflight
from appliance.events import EventBus
from appliance.hamode import HaMode
from appliance.hostinfo import read_host
from appliance.inventory import InventoryError, load_inventory
from appliance.notify import notify, reloading_message, watchdog_interval, watchdog_loop
from appliance.plan import Plan, build_plan
from appliance.plandiff import diff_plans
from appliance.runtime import RuntimeState
from appliance.service import (
    BindError,
    ReloadResult,
    Service,
    ServiceContext,
    ServiceError,
    ServiceSpec,
)
from appliance.status import ApplianceStatus, ServiceEntry
from appliance.store import StoreError
from appliance.storequeue import DaemonStore
from appliance.tasks import TaskSet

log = logging.getLogger("appliance")

TAKEOVER_RETRY = 0.5  # seconds between reads of the shared state when a takeover's fails
STOP_TIMEOUT = 10.0  # seconds a service gets to stop before it is abandoned (plus LB drain)


def default_specs() -> list[ServiceSpec]:
    """Every service this build has, in start order (admin last: it reports on the rest)."""
    from appliance import registry  # the composition root; imported late: it loads every shell

    return registry.specs()


def load_plan(config: Path) -> Plan:
    """Load and derive; raises InventoryError with every problem. Warnings (install-config
    disagreements) are logged: at start and at every reload."""
    loaded = load_inventory(config)
    for warning in loaded.warnings:
        log.warning("%s: %s", config, warning)
    return build_plan(loaded)


def ensure_token(state_dir: Path) -> str:
    """The admin bearer token: generated at first start, mode 0600, kept across restarts."""
    path = state_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


class Supervisor:
    def __init__(
        self,
        config: Path,
        specs: Sequence[ServiceSpec] | None = None,
        member: str | None = None,
    ) -> None:
        """`member`: with an HA pair (the inventory's `ha`), which member this is
        (`run --member`, else APPLIANCE_MEMBER, else the member address found here)."""
        self.config = config
        self.member_flag = member
        self.ha: HaMode | None = None  # an HA pair's member: the elector and its store
        self.specs = list(specs) if specs is not None else default_specs()
        self.bus = EventBus()
        self.running: dict[str, Service] = {}
        self.plan: Plan | None = None
        self.store: DaemonStore | None = None
        self._runtime: RuntimeState | None = None  # exists once the store is open (start)
        self.token = ""
        self.started_at = 0.0
        self.reloads: dict[str, Any] = {"ok": 0, "failed": 0, "last_error": None, "last_at": None}
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._tasks = TaskSet(log, "supervisor task")  # the store's persist, the watchdog

    @property
    def runtime(self) -> RuntimeState:
        """Shared by the services: boot once, drains, bootstrap retired (from start on)."""
        if self._runtime is None:
            raise RuntimeError("the supervisor has not started: no runtime state yet")
        return self._runtime

    # --- lifecycle -------------------------------------------------------------------

    def _context(self, name: str) -> ServiceContext:
        assert self.store is not None
        return ServiceContext(
            bus=self.bus,
            store=self.store,
            log=logging.getLogger(f"appliance.{name}"),
            runtime=self.runtime,
            control=self,
            admin_token=self.token,
        )

    async def _start_one(self, spec: ServiceSpec, plan: Plan) -> Service:
        service: Service | None = None  # built from the plan, then started (binds)
        try:
            service = spec.factory(self._context(spec.name), plan)
            await service.start()
        except Exception as exc:
            bug = not isinstance(exc, ServiceError | OSError)
            if bug:  # a bug in one service: say which, keep the rest sane
                log.exception("%s: failed to start", spec.name)
            if service is not None:  # nothing to stop when building it failed
                await self._stop_one(spec.name, service)
            if isinstance(exc, ServiceError):
                raise
            if isinstance(exc, OSError):
                raise ServiceError(f"{spec.name}: {exc.strerror or exc}") from None
            raise ServiceError(f"{spec.name}: failed to start: {exc}") from None
        return service

    def _stop_budget(self) -> float:
        # The proxy may let its connections drain for load_balancer.stop_timeout first.
        plan = self.plan
        drain = max((fe.stop_timeout for fe in plan.frontends), default=0.0) if plan else 0.0
        return STOP_TIMEOUT + drain

    async def _stop_one(self, name: str, service: Service) -> None:
        budget = self._stop_budget()
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(service.stop(), budget)
        except TimeoutError:
            log.warning("%s: did not stop within %.0f s; abandoning it", name, budget)
            return
        except Exception:  # a failing stop must not keep the others running
            log.exception("%s: error while stopping", name)
        took = time.monotonic() - t0
        if took > 1.0:  # a slow stop says which service held the exit up
            log.info("%s: stopped in %.1f s", name, took)

    async def start(self, plan: Plan) -> None:
        """Open the store and start every enabled service; raise ServiceError on failure."""
        try:
            # Events, install state and cluster decisions: queued, and written by one
            # thread (no write waits for a lock on the event loop), without an fsync
            # per write (a boot storm publishes thousands). A kill -9 loses only what is
            # still queued: nothing in normal running (the writer keeps up within
            # milliseconds), the backlog while another process holds the file's lock.
            if plan.ha is None:
                self.store = DaemonStore.open(plan.state_dir)
                self._runtime = RuntimeState(self.store)
            else:
                # An HA member: the shared state lives in etcd, and only the leader runs
                # DHCP and the cluster loop (started when it takes over).
                # The state directory still holds the admin token (no SQLite file).
                plan.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
                self.ha = await HaMode.open(plan.ha, self.member_flag)
                self.store = self.ha.store
                self._runtime = RuntimeState(self.store, shared=True)
            self.token = ensure_token(plan.state_dir)
        except (StoreError, OSError) as exc:
            if self.ha is not None:
                await self.ha.close()
                self.ha = None
            raise ServiceError(str(exc)) from None
        self.plan = plan
        self.started_at = time.time()
        self._tasks.spawn(self.store.persist(self.bus), name="persist")
        known = {k for s in self.specs for k in s.listen_keys}
        for key in plan.listen:
            if key not in known:
                log.warning("listen.%s is set, but this build has no %s service yet", key, key)
        for spec in self.specs:
            if not spec.is_enabled(plan) or not self._may_run(spec):
                continue
            try:
                self.running[spec.name] = await self._start_one(spec, plan)
            except ServiceError:
                await self.stop()
                raise
            log.info("%s: started %s", spec.name, _where(spec, plan))
        if self.ha is not None:
            # Every listener is bound (floating ones with IP_FREEBIND): now campaign.
            self.ha.start(self._take_over, self._step_down, self._refresh)
            self.runtime.elected = self.ha.leading
        log.info(
            "appliance %s serving %s: %d nodes, services %s",
            __version__,
            plan.domain,
            len(plan.nodes),
            ", ".join(self.running) or "none",
        )
        interval = watchdog_interval()
        if interval:
            # A task on this very loop: if the loop hangs, the pings stop and systemd acts.
            self._tasks.spawn(watchdog_loop(interval), name="watchdog")
            log.info("systemd watchdog: a ping every %.1f s", interval)
        # What exists now (plans, zones, templates) lives as long as the process: keep the
        # cyclic collector from scanning it again and again on busy paths.
        gc.freeze()
        # Every listener is bound by now (each service binds in start): only now READY.
        notify(f"READY=1\nSTATUS={self._status_line()}\nMAINPID={os.getpid()}")

    def _status_line(self) -> str:
        """The one line `systemctl status` shows (STATUS=)."""
        plan = self.plan
        if plan is None:
            return "starting"
        line = f"serving {plan.domain}: {len(plan.nodes)} nodes, {', '.join(self.running)}"
        if self.reloads["last_error"]:
            line += f"; last reload refused: {self.reloads['last_error']}"
        return line

    async def stop(self) -> None:
        """Graceful stop: listeners close, LB connections drain, the store is flushed."""
        t0 = time.monotonic()
        names = list(self.running)
        notify(f"STOPPING=1\nSTATUS=stopping {', '.join(names) or '(nothing running)'}")
        if names:
            log.info("stopping %s", ", ".join(reversed(names)))
        # Every service at once: each closes its listeners first thing, so nothing accepts
        # new work anywhere while the proxy lets its open connections finish.
        if self.ha is not None:
            # Step down first (addresses dropped, lease revoked): the other member takes
            # over at once instead of after the lease runs out.
            await self.ha.stop()
            self.runtime.leading = False
        services = [(name, self.running.pop(name)) for name in reversed(names)]
        await asyncio.gather(*(self._stop_one(name, svc) for name, svc in services))
        # The persist task writes what is still queued when cancelled: events published
        # while the services stopped (the dhcp flush of pending leases) reach the store.
        await self._tasks.close()
        if self.store is not None:
            # Bounded: a file locked by another process must not keep the daemon up.
            flushed = await self.store.aclose()
            log.info(
                "state store %s %s and closed (%d events this run)",
                self.store.path,
                "flushed" if flushed else "NOT fully flushed (see above)",
                self.bus.published,
            )
            self.store = None
        if self.ha is not None:
            await self.ha.close()
            self.ha = None
        if names:
            log.info("services stopped in %.2f s", time.monotonic() - t0)

    # --- an HA pair's member -------------------------------------------------------------

    def _may_run(self, spec: ServiceSpec) -> bool:
        """Leader-only services (DHCP, the cluster loop) run on the leader only."""
        return not spec.leader_only or self._runtime is None or self._runtime.leading

    async def _take_over(self) -> None:
        """Elected: read the shared state first (leases, install marks, admin states),
        then start the leader-only services on it."""
        async with self._lock:
            assert self.ha is not None and self.plan is not None
            # No DHCP before the shared state is read: a read that fails is tried again
            # for as long as this member leads (an etcd that stays away fences it).
            while True:
                if not self.ha.leading():
                    return  # fenced meanwhile: the step-down follows
                try:
                    await self.ha.refresh_store()
                    break
                except StoreError as exc:
                    log.warning("took over, but cannot read the shared state yet: %s", exc)
                    await asyncio.sleep(TAKEOVER_RETRY)
            self.runtime.refresh()
            if not self.ha.leading():
                return
            self.runtime.leading = True
            plan = self.plan
            for spec in self.specs:
                if not spec.leader_only or spec.name in self.running:
                    continue
                if not self.ha.leading():
                    break
                if not spec.is_enabled(plan):
                    continue
                try:
                    self.running[spec.name] = await self._start_one(spec, plan)
                except ServiceError as exc:
                    log.error("%s: could not start as the leader: %s", spec.name, exc)
                    continue
                log.info("%s: started %s (leader)", spec.name, _where(spec, plan))
            self._reorder()

    async def _step_down(self, reason: str) -> None:
        """No longer the leader (the addresses are gone already): stop DHCP and the
        cluster loop at once, so nothing here answers for the pair any more."""
        self.runtime.leading = False  # at once: DHCP drops what arrives while it stops
        async with self._lock:
            leader_only = [s.name for s in self.specs if s.leader_only and s.name in self.running]
            if leader_only:
                log.warning("stepping down (%s): stopping %s", reason, ", ".join(leader_only))
            await asyncio.gather(
                *(self._stop_one(name, self.running.pop(name)) for name in leader_only)
            )

    async def _refresh(self) -> None:
        """Periodically, on every member: what the other wrote (install marks, bootstrap
        retired, admin states) reaches this member's boot services and load balancer."""
        assert self.ha is not None
        await self.ha.refresh_store()
        self.runtime.refresh()

    def _reorder(self) -> None:
        """Keep the registry in spec order so stop runs in reverse start order."""
        merged = dict(self.running)
        self.running.clear()
        self.running.update({s.name: merged[s.name] for s in self.specs if s.name in merged})

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    # --- reload ----------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Re-read the inventory and swap the plan; on any error keep the running plan."""
        async with self._lock:
            notify(reloading_message(f"reloading {self.config}"))
            result = ReloadResult(False, ("reload failed",))
            try:
                result = await self._reload()
            except Exception as exc:  # a bug must not leave an unretrieved task behind
                log.exception("reload failed: keeping the running plan")
                result = ReloadResult(False, (f"internal error: {type(exc).__name__}: {exc}",))
            finally:
                key = "ok" if result.ok else "failed"
                self.reloads[key] += 1
                self.reloads["last_at"] = time.time()
                self.reloads["last_error"] = None if result.ok else "; ".join(result.errors)
                notify(f"READY=1\nSTATUS={self._status_line()}")
            return result

    async def _reload(self) -> ReloadResult:
        old = self.plan
        assert old is not None
        try:
            new = load_plan(self.config)
        except InventoryError as exc:
            for line in exc.lines():
                log.error("reload: %s", line)
            log.error("reload refused: keeping the running plan")
            return ReloadResult(False, tuple(exc.lines()))
        if new.state_dir != old.state_dir:
            log.warning("reload: state_dir changes take effect at the next start")
        if new.ha != old.ha:
            # Members, etcd, the lease or the floating addresses: the election and the
            # store were built on them. A half-moved pair is worse than the old one.
            line = "ha: a change to the ha block (or the floating addresses) needs a restart"
            log.error("reload refused: %s; keeping the running plan", line)
            return ReloadResult(False, (line,))

        # Phase 1: bind what must be bound anew. Nothing running changes yet.
        fresh: dict[str, Service] = {}
        replaced: list[str] = []
        try:
            for spec in self.specs:
                was, want = spec.name in self.running, spec.is_enabled(new)
                want = want and self._may_run(spec)
                moved = (
                    was and not spec.rebinds_itself and spec.endpoints(old) != spec.endpoints(new)
                )
                if want and (moved or not was):
                    fresh[spec.name] = await self._start_fresh(spec, new, replaced)
        except ServiceError as exc:
            for name, service in fresh.items():
                await self._stop_one(name, service)
            await self._restore(replaced, old)
            line = await _with_holder(exc)
            log.error("reload refused: %s; keeping the running plan", line)
            return ReloadResult(False, (line,))

        # Phase 2: retire what was replaced or switched off, hand the plan to the rest.
        reloaded: list[str] = []
        switched_off: list[str] = []
        for spec in self.specs:
            name = spec.name
            if name in fresh:
                if name in self.running:
                    await self._stop_one(name, self.running.pop(name))
                continue
            if name in self.running and not (spec.is_enabled(new) and self._may_run(spec)):
                await self._stop_one(name, self.running.pop(name))
                switched_off.append(name)
                log.info("%s: stopped (switched off)", name)
            elif name in self.running:
                try:
                    await self.running[name].reload(new)
                    reloaded.append(name)
                except (ServiceError, OSError) as exc:
                    # Put everything back: a half-applied plan is worse than the old one.
                    for back in reloaded:
                        await self.running[back].reload(old)
                    for fname, service in fresh.items():
                        await self._stop_one(fname, service)
                    log.error("reload refused: %s: %s; keeping the running plan", name, exc)
                    return ReloadResult(False, (f"{name}: {exc}",))
        # Keep the registry in spec order so stop runs in reverse start order.
        merged = {**self.running, **fresh}
        self.running.clear()
        self.running.update({s.name: merged[s.name] for s in self.specs if s.name in merged})
        self.plan = new
        for name in fresh:
            log.info("%s: started %s", name, _where(self._spec(name), new))
        diff = diff_plans(old, new)
        log.info("reload: new plan in force (%d nodes): %s", len(new.nodes), diff.summary())
        for line in diff.lines():
            log.info("reload: %s", line)
        if diff.changes or fresh or switched_off:  # a reload that changed nothing: one line
            log.info(
                "reload: took the new plan: %s; started on new listeners: %s; switched off: %s",
                ", ".join(reloaded) or "none",
                ", ".join(fresh) or "none",
                ", ".join(switched_off) or "none",
            )
        return ReloadResult(
            True,
            changed=tuple(reloaded) + tuple(fresh),
            diff_summary=diff.summary(),
            diff_lines=tuple(diff.lines()),
        )

    async def _start_fresh(self, spec: ServiceSpec, plan: Plan, replaced: list[str]) -> Service:
        try:
            return await self._start_one(spec, plan)
        except ServiceError as exc:
            # 0.0.0.0:53 -> 127.0.0.1:53 clashes with our own old socket: free it, try again.
            if getattr(exc, "errno", None) != errno.EADDRINUSE or spec.name not in self.running:
                raise
        await self._stop_one(spec.name, self.running.pop(spec.name))
        replaced.append(spec.name)
        return await self._start_one(spec, plan)

    async def _restore(self, names: list[str], plan: Plan) -> None:
        for name in names:
            try:
                self.running[name] = await self._start_one(self._spec(name), plan)
            except ServiceError as exc:
                log.error("%s: could not be restored on the old plan: %s", name, exc)

    def _spec(self, name: str) -> ServiceSpec:
        return next(s for s in self.specs if s.name == name)

    # --- status ----------------------------------------------------------------------

    def status(self) -> ApplianceStatus:
        plan = self.plan
        services = {}
        for spec in self.specs:
            svc = self.running.get(spec.name)
            standby = svc is None and self.ha is not None and spec.leader_only
            standby = standby and plan is not None and spec.is_enabled(plan)
            services[spec.name] = ServiceEntry(
                "running" if svc else "standby" if standby else "off",
                tuple(str(ep) for ep in spec.endpoints(plan) if ep) if plan else (),
                svc.status() if svc is not None else None,
            )
        return ApplianceStatus(
            version=__version__,
            config=str(self.config),
            uptime=round(time.time() - self.started_at, 3) if self.started_at else 0,
            cluster=plan.domain if plan else None,
            nodes=len(plan.nodes) if plan else 0,
            services=services,
            reloads=dict(self.reloads),
            events_published=self.bus.published,
            events_dropped=self.bus.dropped,
            store=self.store.stats() if self.store is not None else {},
            ha=self.ha.status() if self.ha is not None else None,
        )


def _where(spec: ServiceSpec, plan: Plan) -> str:
    eps = [str(ep) for ep in spec.endpoints(plan) if ep]
    return f"on {', '.join(eps)}" if eps else ""


async def _with_holder(exc: ServiceError) -> str:
    """The error line; for an address in use, with who holds it (read off the loop:
    it walks /proc)."""
    if isinstance(exc, BindError) and exc.errno == errno.EADDRINUSE:
        held = await asyncio.to_thread(name_holders, exc.endpoint, exc.proto)
        if held:
            return f"{exc}; {held}"
    return str(exc)


def _preflight(plan: Plan) -> bool:
    """Log what this host lacks for the plan; False when `run` must not start.

    Ports are not looked at here: the bind decides, and its error names the holder."""
    findings = preflight(plan, read_host(), current_user())
    for finding in findings:
        (log.error if finding.error else log.warning)("preflight: %s", finding)
    if any(f.error for f in findings):
        log.error("preflight: refusing to start (see the errors above)")
        return False
    return True


async def run(
    config: Path, specs: Sequence[ServiceSpec] | None = None, member: str | None = None
) -> int:
    """`appliance run`: start, serve until SIGTERM/SIGINT, reload on SIGHUP."""
    try:
        plan = load_plan(config)
    except InventoryError as exc:
        for line in exc.lines():
            log.error("%s", line)
        return 2
    if not _preflight(plan):
        return 1
    sup = Supervisor(config, specs, member)
    try:
        await sup.start(plan)
    except ServiceError as exc:
        log.error("%s", await _with_holder(exc))  # after the stop: only others hold it now
        return 1
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[ReloadResult]] = set()

    def on_hup() -> None:
        log.info("SIGHUP: reloading %s", config)
        task = loop.create_task(sup.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sup.request_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await sup.wait_stopped()
        log.info("stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in reloads:
            with contextlib.suppress(Exception):
                await task
        await sup.stop()
    log.info("stopped")
    return 0
