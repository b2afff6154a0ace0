"""Bootstrap retirement: once the cluster runs without the bootstrap node, take it out.

Done means what `openshift-install wait-for bootstrap-complete` waits for: the
ConfigMap kube-system/bootstrap has status "complete" and, where the cluster has the
etcd operator (operator.openshift.io/v1 etcds "cluster"), its condition
EtcdBootstrapMemberRemoved is True. Then the bootstrap backend is drained from the
api and machine_config pools of the load balancer, bootstrap.ign is no longer served,
the store remembers it (key "bootstrap") and a bootstrap-complete event is published.
Both go through the supervisor's runtime state: the load balancer applies the drain
(now, or when it starts), HTTP reads "bootstrap retired"; no service is looked up here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from appliance.plan import Plan
from appliance.tasks import cancel_and_wait
from services.cluster.informer import Informer
from services.cluster.kube import CONFIGMAPS, ETCDS, Kube
from services.cluster.nodes import node_fields

if TYPE_CHECKING:
    from appliance.service import ServiceContext

CONFIGMAP_NAMESPACE = "kube-system"
CONFIGMAP_NAME = "bootstrap"
ETCD_CONDITION = "EtcdBootstrapMemberRemoved"
POOLS = ("api", "machine_config")  # the bootstrap node serves only these two


def configmap_complete(configmap: Mapping[str, Any] | None) -> bool:
    return ((configmap or {}).get("data") or {}).get("status") == "complete"


def etcd_removed(etcd: Mapping[str, Any] | None) -> tuple[bool, str]:
    """(done, why): no etcd operator counts as done; otherwise its condition must be True."""
    if etcd is None:
        return True, "no etcd operator in this cluster"
    for cond in (etcd.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == ETCD_CONDITION:
            if cond.get("status") == "True":
                return True, "etcd bootstrap member removed"
            return (
                False,
                f"etcd {ETCD_CONDITION} is {cond.get('status')}: {cond.get('message', '')}",
            )
    return False, f"etcd operator has no {ETCD_CONDITION} condition yet"


class BootstrapWatcher:
    def __init__(
        self,
        ctx: ServiceContext,
        plan: Callable[[], Plan],
        poll: float,
        watch_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = ctx
        self.plan = plan
        self.poll = poll
        self.watch_timeout = watch_timeout
        self.clock = clock
        self.log = logging.getLogger("appliance.cluster.bootstrap")
        stored = ctx.store.cluster_state("bootstrap")
        self.state: dict[str, Any] = stored if isinstance(stored, dict) else {"complete": False}
        self.waiting = "" if self.complete else "ConfigMap kube-system/bootstrap status complete"
        self.configmap: dict[str, Any] | None = None
        self._wake = asyncio.Event()
        self._drained = False  # the drain is in the runtime state (once per watcher)

    @property
    def complete(self) -> bool:
        return bool(self.state.get("complete"))

    def status(self) -> dict[str, Any]:
        return {**self.state, "waiting_for": None if self.complete else self.waiting}

    async def run(self, kube: Kube) -> None:
        if not self.complete:
            await self._watch(kube)
        while True:  # nothing left to watch (the runtime state re-applies to a new proxy)
            self.ensure_retired()
            await asyncio.sleep(self.poll)

    async def _watch(self, kube: Kube) -> None:
        informer = Informer(
            kube,
            CONFIGMAPS,
            self._listed,
            self._event,
            namespace=CONFIGMAP_NAMESPACE,
            field_selector=f"metadata.name={CONFIGMAP_NAME}",
            watch_timeout=self.watch_timeout,
        )
        watch = asyncio.create_task(informer.run(), name="bootstrap-watch")
        watch.add_done_callback(lambda _: self._wake.set())  # its error surfaces at once
        try:
            while not self.complete:
                if watch.done():
                    watch.result()  # its error (Unreachable, ...) goes to the caller
                if configmap_complete(self.configmap):
                    etcd = await kube.get(ETCDS, "cluster")
                    done, why = etcd_removed(etcd)
                    if done:
                        self.retire(why)
                        continue
                    self.waiting = why
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll):  # a cancel is never swallowed
                        await self._wake.wait()
                self._wake.clear()
        finally:
            # Its error, if it ended first, was raised above; otherwise it is retrieved here.
            await cancel_and_wait(watch, log=self.log, what="watch")

    def _listed(self, items: list[dict[str, Any]]) -> None:
        self.configmap = next(
            (i for i in items if (i.get("metadata") or {}).get("name") == CONFIGMAP_NAME), None
        )
        self._wake.set()

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") != CONFIGMAP_NAME:
            return
        self.configmap = None if kind == "DELETED" else obj
        self._wake.set()

    def wake(self) -> None:
        """Look again now (a watch task ended or the test wants a fast answer)."""
        self._wake.set()

    def retire(self, why: str) -> None:
        now = self.clock()
        plan = self.plan()
        nodes = [n.name for n in plan.nodes if n.role == "bootstrap"]
        self.ctx.runtime.retire_bootstrap()
        drained = self._drain(plan)
        self.state = {"complete": True, "time": now, "why": why, "drained": drained}
        self.ctx.store.set_cluster_state("bootstrap", self.state, now)
        self.waiting = ""
        self.log.info(
            "bootstrap complete (%s): drained %s; bootstrap.ign no longer served",
            why,
            ", ".join(drained) or "nothing (no load balancer here)",
            # The bootstrap node (the usual one) as fields; several: the line names them.
            extra=node_fields(plan, nodes[0]) if len(nodes) == 1 else None,
        )
        for node in nodes:
            detail = f"{why}; drained from {', '.join(POOLS)}; bootstrap.ign no longer served"
            self.ctx.bus.publish(node, "bootstrap-complete", detail, source="cluster", time=now)

    def ensure_retired(self) -> None:
        """After a restart of the daemon: drain again, refuse bootstrap.ign.

        Put in the runtime state once per watcher (a proxy restarted later gets it from
        there), so an operator who re-enables the backend on purpose (admin API) is not
        overruled.
        """
        if not self.complete:
            return
        self.ctx.runtime.retire_bootstrap()
        if not self._drained:
            self._drain(self.plan())

    def _drain(self, plan: Plan) -> list[str]:
        """Drain the bootstrap nodes from POOLS; the ones applied now ("api/bootstrap")."""
        self._drained = True
        drained: list[str] = []
        for node in (n.name for n in plan.nodes if n.role == "bootstrap"):
            for pool in POOLS:
                # False: no load balancer here, or that frontend is off or lacks the node.
                if self.ctx.runtime.want_admin_state(pool, node, "drain"):
                    drained.append(f"{pool}/{node}")
        return drained
