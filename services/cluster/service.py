"""The cluster loop as a service: connect, then run the watchers until the API goes away.

start() returns at once: the loop runs in a task, so a cluster that does not exist
yet (no kubeconfig before `openshift-install create ignition-configs`, no API before
the bootstrap node is up) never holds back the start or READY of the other
services. It waits quietly for the kubeconfig (logged once), connects, and runs the
CSR approver, the Node watcher, the bootstrap watcher and the GPU bring-up side by
side, each on its own: a worker that fails (a 403 on a resource its identity may not
read, an API error, a bug) backs off alone with jitter and says why in status()
(`workers`: ok / backing off / forbidden with the missing rule), while the others go
on. When a worker finds the API unreachable, the loop checks /version itself: if the
API is down it says so, probes with a back-off, and wakes the workers the moment it
answers again; each resumes from the API's state and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.plan import Plan
from appliance.service import ServiceContext
from appliance.tasks import TaskSet
from services.cluster.approver import Approver
from services.cluster.bootstrap import BootstrapWatcher
from services.cluster.gpu import Timeouts
from services.cluster.gpuflow import GpuFlow
from services.cluster.kube import Kube, KubeconfigError, KubeError, Unreachable
from services.cluster.nodes import ClusterView, NodeWatcher
from services.cluster.status import ClusterStatus
from services.cluster.workers import FORBIDDEN, OK, Failure, WorkerState, classify

HINT = "`appliance render --as rbac` prints the role the cluster loop needs"


@dataclass(frozen=True, slots=True)
class Timing:
    """Intervals of the loop (seconds); tests pass short ones."""

    backoff_first: float = 1.0
    backoff_max: float = 60.0
    stable: float = 10.0  # a worker running this long after a failure counts as ok again
    resync: float = 30.0  # CSRs looked at again; etcd condition polled
    watch_timeout: float = 300.0  # server-side end of each watch (resumed at once)
    request_timeout: float = 30.0
    gpu_poll: float = 10.0
    gpu: Timeouts = field(default_factory=Timeouts)


class Backoff:
    """Doubling delays up to a cap; reset after a good connection."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, cap
        self.failures = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * float(1 << min(self.failures, 30)))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class _Reconnect(Exception):
    """The kubeconfig path changed with a reload."""


class ClusterService:
    name = "cluster"

    def __init__(self, ctx: ServiceContext, plan: Plan, timing: Timing | None = None) -> None:
        self.ctx = ctx
        self.timing = t = timing or Timing()
        self.log = ctx.log
        self.plan = plan
        self.view = ClusterView()
        self.approver = Approver(ctx, self._current, self.view, t.resync, t.watch_timeout)
        self.nodes = NodeWatcher(ctx, self._current, self.view, t.watch_timeout)
        self.bootstrap = BootstrapWatcher(ctx, self._current, t.resync, t.watch_timeout)
        self.gpu = GpuFlow(ctx, self._current, self.view, t.gpu, t.gpu_poll)
        self.tasks = TaskSet(ctx.log, "cluster task")  # the loop (its workers are its own)
        self.connection: dict[str, Any] = {"state": "starting", "detail": "", "since": time.time()}
        self.connects = 0
        self._said = ""  # the last problem logged: the same one is not logged again
        self._reconnect = asyncio.Event()
        self._backoff = Backoff(self.timing.backoff_first, self.timing.backoff_max)
        self.workers = self._fresh_workers()
        self._wakes = {name: asyncio.Event() for name in self.workers}
        self._said_by: dict[str, str] = {}  # worker -> the last problem it logged
        self._trouble = asyncio.Event()  # a worker found the API unreachable
        self._down = False  # the monitor's probe failed: the API itself is away
        self._random = random.Random()

    def _fresh_workers(self) -> dict[str, WorkerState]:
        t, now = self.timing, time.time()
        return {
            name: WorkerState(name, t.backoff_first, t.backoff_max, t.stable, now)
            for name in ("csr", "nodes", "bootstrap", "gpu")
        }

    def _current(self) -> Plan:
        return self.plan

    async def start(self) -> None:
        # Retired before this start: drain again and refuse bootstrap.ign without waiting
        # for the API (admin states are not stored: the runtime state starts without it).
        self.bootstrap.ensure_retired()
        self.tasks.spawn(self._run(), name="cluster")

    async def reload(self, plan: Plan) -> None:
        old = self.plan
        self.plan = plan
        self.approver.reconfigure(plan)
        before, after = old.kubernetes, plan.kubernetes
        if (before.kubeconfig, before.approve_csrs) != (after.kubeconfig, after.approve_csrs):
            self._reconnect.set()  # start again with the new file, or with(out) the approver

    async def stop(self) -> None:
        await self.tasks.close()

    def status(self) -> ClusterStatus:
        return ClusterStatus(
            connection={**self.connection, "connects": self.connects},
            workers=self._worker_views(time.time()),
            kubeconfig=str(self.plan.kubernetes.kubeconfig),
            approve_csrs=self.plan.kubernetes.approve_csrs,
            csr=self.approver.status(),
            nodes_seen=len(self.view.nodes),
            nodes_ready=tuple(sorted(n for n, s in self.view.nodes.items() if s.ready)),
            bootstrap=self.bootstrap.status(),
            gpu=self.gpu.status(),
        )

    def _worker_views(self, now: float) -> dict[str, dict[str, Any]]:
        views = {name: w.view(now) for name, w in self.workers.items()}
        refused = self.approver.refused
        if views["csr"]["state"] == OK and not self.view.synced and views["nodes"]["state"] != OK:
            # Bootstrapper CSRs are reviewed only knowing which Nodes exist.
            why = f"the Node list (the nodes worker is {views['nodes']['state']})"
            views["csr"] = {**views["csr"], "state": "waiting", "detail": why}
        elif refused is not None and views["csr"]["state"] == OK:
            # Running, but the API refused some approvals (one signer): say which rule.
            failure = classify(refused)
            views["csr"] = {**views["csr"], "state": FORBIDDEN, "detail": failure.detail}
            if failure.missing is not None:
                views["csr"]["missing"] = failure.missing.to_json()
        return views

    # --- the loop ----------------------------------------------------------------------

    def _set(self, state: str, detail: str = "") -> None:
        if self.connection.get("state") != state or self.connection.get("detail") != detail:
            self.connection = {"state": state, "detail": detail, "since": time.time()}

    def _say(self, level: int, message: str) -> None:
        # Once per distinct problem: a cluster that is not there yet is no news every minute.
        if message != self._said:
            self.log.log(level, "%s", message)
            self._said = message

    async def _run(self) -> None:
        while True:
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the loop: log it, back off, go on
                self.log.exception("cluster loop error")
                self._set("error", "internal error (see the log)")
            self.bootstrap.ensure_retired()
            delay = self._backoff.next()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: see services/proxy/checks.py
                    await self._reconnect.wait()
            self._reconnect.clear()

    async def _connect_once(self) -> None:
        path: Path = self.plan.kubernetes.kubeconfig
        if not path.is_file():
            self._set("waiting-for-kubeconfig", str(path))
            self._say(
                logging.INFO, f"waiting for the kubeconfig {path} (the cluster loop starts then)"
            )
            return
        try:
            kube = await Kube.from_kubeconfig(path, self.timing.request_timeout)
        except KubeconfigError as exc:
            self._set("kubeconfig-error", str(exc))
            self._say(logging.WARNING, f"cannot use the kubeconfig: {exc}")
            return
        try:
            self._set("connecting", str(kube.api.configuration.host))
            version = await kube.version()
            self.connects += 1
            self._backoff.reset()
            self._said = ""
            self._set("connected", f"{kube.api.configuration.host} {version.get('gitVersion', '')}")
            self.log.info("connected to the API at %s", self.connection["detail"])
            await self._workers(kube)
        except* Unreachable as group:
            self._set("unreachable", str(group.exceptions[0]))
            self._say(logging.WARNING, f"API unreachable: {group.exceptions[0]}")
        except* KubeError as group:
            error = group.exceptions[0]
            refused = isinstance(error, KubeError) and error.status == 401
            self._set("unauthorized" if refused else "api-error", str(error))
            self._say(logging.WARNING, f"API error: {error}")
        except* _Reconnect:
            if self.connection.get("state") == "unauthorized":
                self._say(logging.WARNING, "credentials refused: reading the kubeconfig again")
            else:
                self._set("reconnecting", "kubeconfig changed")
                self._backoff.reset()
        finally:
            await kube.close()

    async def _workers(self, kube: Kube) -> None:
        self.view.synced = False  # the Node list of this connection is not in yet
        runs: dict[str, Callable[[Kube], Awaitable[None]]] = {
            "nodes": self.nodes.run,
            "csr": self.approver.run,
            "bootstrap": self.bootstrap.run,
            "gpu": self.gpu.run,
        }
        # A new connection (perhaps another identity, after a reload): a clean slate.
        self.workers, self._said_by = self._fresh_workers(), {}
        self.workers["csr"].off = not self.plan.kubernetes.approve_csrs
        self._trouble.clear()
        self._down = False
        # Only _watch_reconnect ends this group (kubeconfig changed) and a cancel (stop):
        # _supervise never lets a worker's exception out, so none cancels the others.
        async with asyncio.TaskGroup() as tg:
            for name, run in runs.items():
                if not self.workers[name].off:
                    tg.create_task(self._supervise(name, run, kube), name=f"cluster-{name}")
            tg.create_task(self._monitor(kube), name="cluster-monitor")
            tg.create_task(self._watch_reconnect(), name="cluster-reconnect")

    async def _supervise(
        self, name: str, run: Callable[[Kube], Awaitable[None]], kube: Kube
    ) -> None:
        """Run one worker again and again; its failures back it off alone."""
        state, wake = self.workers[name], self._wakes[name]
        log = logging.getLogger(f"appliance.cluster.{name}")
        while True:
            state.start(time.time())
            try:
                await run(kube)
                raise KubeError(0, "Ended", f"the {name} worker stopped by itself")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is this worker's alone
                failure = classify(exc)
                delay = state.fail(failure, time.time(), self._random.random())
                self._report(name, log, failure, exc)
                if failure.unreachable:
                    self._trouble.set()  # the monitor finds out whether the API is away
                if isinstance(exc, KubeError) and exc.status == 401:
                    # The credentials are refused (token revoked or rotated): connect again,
                    # reading the kubeconfig anew; the connection's back-off paces that.
                    self._set("unauthorized", str(exc))
                    self._reconnect.set()
            wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # cancel-safe, unlike wait_for
                    await wake.wait()  # set when the API answers again after an outage
            while self._down and not wake.is_set():
                # While the API is away only the monitor probes it (one request per
                # back-off, not one per worker); it wakes everyone when it answers.
                await wake.wait()

    def _report(self, name: str, log: logging.Logger, failure: Failure, exc: Exception) -> None:
        """Log a worker's problem once (not once per retry); outages are the monitor's."""
        if failure.unreachable:
            log.debug("%s", failure.detail)
            return
        if self._said_by.get(name) == failure.detail:
            return
        self._said_by[name] = failure.detail
        if failure.state == FORBIDDEN:
            rule = failure.missing.rule_text() if failure.missing else "(unknown rule)"
            log.warning(
                "%s worker forbidden, backing off (the others go on): %s; add the %s (%s)",
                name,
                failure.detail,
                rule,
                HINT,
            )
        elif failure.bug:
            log.error("%s worker failed, backing off: %s", name, failure.detail, exc_info=exc)
        else:
            log.warning("%s worker backing off: %s", name, failure.detail)

    async def _monitor(self, kube: Kube) -> None:
        """When a worker finds the API unreachable: is it down? Then wait for it to return."""
        backoff = Backoff(self.timing.backoff_first, self.timing.backoff_max)
        while True:
            await self._trouble.wait()
            self._trouble.clear()
            down = False
            while True:
                try:
                    version = await kube.version()
                    break
                except KubeError:
                    version = {}  # it answers (if only with an error): not an outage
                    break
                except Unreachable as exc:
                    down = self._down = True
                    self._set("unreachable", str(exc))
                    self._say(logging.WARNING, f"API unreachable: {exc}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff.next()):
                        await self._reconnect.wait()  # a reload ends this connection anyway
            backoff.reset()
            self._down = False
            if not down:
                continue  # one worker's resource is in trouble, not the API: its own back-off
            self.connects += 1
            self._said = ""
            self._set("connected", f"{kube.api.configuration.host} {version.get('gitVersion', '')}")
            self.log.info("the API answers again at %s", self.connection["detail"])
            for name, state in self.workers.items():
                if state.started is None:  # backing off: try now
                    self._wakes[name].set()

    async def _watch_reconnect(self) -> None:
        while True:
            await self._reconnect.wait()
            self._reconnect.clear()
            raise _Reconnect
