"""The cluster loop as a service: connect, then run the watchers until the API goes away.

start() returns at once: the loop runs in a task, so a cluster that does not exist
yet (no kubeconfig before `openshift-install create ignition-configs`, no API before
the bootstrap node is up) never holds back the start or READY of the other
services. It waits quietly for the kubeconfig (logged once), connects, and runs the
CSR approver, the Node watcher, the bootstrap watcher and the GPU bring-up side by
side. When the API stops answering, all of them stop, and after a back-off the loop
connects again; each resumes from the API's state and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.plan import Plan
from appliance.service import ServiceContext
from services.cluster.approver import Approver
from services.cluster.bootstrap import BootstrapWatcher
from services.cluster.gpu import Timeouts
from services.cluster.gpuflow import GpuFlow
from services.cluster.kube import Kube, KubeconfigError, KubeError, Unreachable
from services.cluster.nodes import ClusterView, NodeWatcher


@dataclass(frozen=True, slots=True)
class Timing:
    """Intervals of the loop (seconds); tests pass short ones."""

    backoff_first: float = 1.0
    backoff_max: float = 60.0
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

    def __init__(self, ctx: ServiceContext, timing: Timing | None = None) -> None:
        self.ctx = ctx
        self.timing = timing or Timing()
        self.log = ctx.log
        self.plan: Plan
        self.view = ClusterView()
        self.approver: Approver
        self.nodes: NodeWatcher
        self.bootstrap: BootstrapWatcher
        self.gpu: GpuFlow
        self.task: asyncio.Task[None] | None = None
        self.connection: dict[str, Any] = {"state": "starting", "detail": "", "since": time.time()}
        self.connects = 0
        self._said = ""  # the last problem logged: the same one is not logged again
        self._reconnect = asyncio.Event()
        self._backoff = Backoff(self.timing.backoff_first, self.timing.backoff_max)

    def _current(self) -> Plan:
        return self.plan

    async def start(self, plan: Plan) -> None:
        self.plan = plan
        t = self.timing
        self.approver = Approver(self.ctx, self._current, self.view, t.resync, t.watch_timeout)
        self.nodes = NodeWatcher(self.ctx, self._current, self.view, t.watch_timeout)
        self.bootstrap = BootstrapWatcher(self.ctx, self._current, t.resync, t.watch_timeout)
        self.gpu = GpuFlow(self.ctx, self._current, self.view, t.gpu, t.gpu_poll)
        # Retired before this start: drain again and refuse bootstrap.ign without waiting
        # for the API (the proxy starts before us and forgot the drain).
        self.bootstrap.ensure_retired()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="cluster")

    async def reload(self, plan: Plan) -> None:
        old = self.plan
        self.plan = plan
        self.approver.reconfigure(plan)
        before, after = old.kubernetes, plan.kubernetes
        if (before.kubeconfig, before.approve_csrs) != (after.kubeconfig, after.approve_csrs):
            self._reconnect.set()  # start again with the new file, or with(out) the approver

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    def status(self) -> dict[str, Any]:
        return {
            "connection": {**self.connection, "connects": self.connects},
            "kubeconfig": str(self.plan.kubernetes.kubeconfig),
            "approve_csrs": self.plan.kubernetes.approve_csrs,
            "csr": self.approver.status(),
            "nodes": {
                "seen": len(self.view.nodes),
                "ready": sorted(n for n, s in self.view.nodes.items() if s.ready),
            },
            "bootstrap": self.bootstrap.status(),
            "gpu": self.gpu.status(),
        }

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
            self._set("api-error", str(group.exceptions[0]))
            self._say(logging.WARNING, f"API error: {group.exceptions[0]}")
        except* _Reconnect:
            self._set("reconnecting", "kubeconfig changed")
            self._backoff.reset()
        finally:
            await kube.close()

    async def _workers(self, kube: Kube) -> None:
        self.view.synced = False  # the Node list of this connection is not in yet
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.nodes.run(kube), name="cluster-nodes")
            if self.plan.kubernetes.approve_csrs:
                tg.create_task(self.approver.run(kube), name="cluster-csr")
            tg.create_task(self.bootstrap.run(kube), name="cluster-bootstrap")
            tg.create_task(self.gpu.run(kube), name="cluster-gpu")
            tg.create_task(self._watch_reconnect(), name="cluster-reconnect")

    async def _watch_reconnect(self) -> None:
        while True:
            await self._reconnect.wait()
            self._reconnect.clear()
            raise _Reconnect
