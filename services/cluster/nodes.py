"""Nodes as the cluster sees them: which exist, their labels, Ready; node-ready events.

ClusterView is the cluster loop's shared picture of the Node objects (the CSR
reviewer asks which exist; the GPU flow reads labels and hostnames). NodeWatcher
keeps it current with list+watch and publishes node-ready when a node's Ready
condition turns true (once per transition; not again after a restart when the
store already has the node's node-ready).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.logs import fields
from appliance.plan import Plan
from services.cluster.gpu import GPU_RESOURCE, HOSTNAME_LABEL
from services.cluster.informer import Informer
from services.cluster.kube import NODES, Kube
from services.cluster.review import ClusterFacts, find_node

if TYPE_CHECKING:
    from appliance.service import ServiceContext


def node_ready(obj: Mapping[str, Any]) -> bool:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


@dataclass(frozen=True, slots=True)
class NodeSeen:
    name: str  # the Node object's name (short name or FQDN)
    labels: Mapping[str, str]
    ready: bool
    gpus: int | None = None  # status.allocatable nvidia.com/gpu (None: not advertised)

    @property
    def hostname(self) -> str:
        return self.labels.get(HOSTNAME_LABEL) or self.name

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> NodeSeen | None:
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            return None
        labels = meta.get("labels") or {}
        clean = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
        return cls(name, clean, node_ready(obj), _allocatable_gpus(obj))


def _allocatable_gpus(obj: Mapping[str, Any]) -> int | None:
    # The device plugin advertises a plain integer quantity; anything else is not trusted.
    allocatable = (obj.get("status") or {}).get("allocatable")
    value = allocatable.get(GPU_RESOURCE) if isinstance(allocatable, Mapping) else None
    if isinstance(value, int | str) and str(value).isdigit():
        return int(value)
    return None


def node_fields(plan: Plan, name: str) -> dict[str, str]:
    """The log fields of inventory node `name` (`--log-format json` keys node, mac, ip)."""
    info = plan.by_name.get(name)
    if info is None:
        return fields(node=name)
    return fields(node=info.name, mac=info.mac, ip=info.ip)


@dataclass
class ClusterView:
    nodes: dict[str, NodeSeen] = field(default_factory=dict)  # by Node name
    synced: bool = False  # a list has been seen since the connection began

    def facts(self) -> ClusterFacts:
        return ClusterFacts(frozenset(self.nodes))

    def for_inventory(self, plan: Plan, name: str) -> NodeSeen | None:
        """The Node of inventory node `name` (its Node may be named by short name or FQDN)."""
        info = plan.by_name.get(name)
        if info is None:
            return None
        for key in (info.name, info.fqdn):
            for seen_name, seen in self.nodes.items():
                if seen_name.lower() == key.lower():
                    return seen
        return None


class NodeWatcher:
    def __init__(
        self,
        ctx: ServiceContext,
        plan: Callable[[], Plan],
        view: ClusterView,
        watch_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = ctx
        self.plan = plan
        self.view = view
        self.watch_timeout = watch_timeout
        self.clock = clock
        self.log = logging.getLogger("appliance.cluster.nodes")
        # Inventory nodes whose node-ready is already stored: no repeat after a restart.
        self.announced = {n for n, stages in ctx.store.progress().items() if "node-ready" in stages}
        self.informer: Informer | None = None

    async def run(self, kube: Kube) -> None:
        self.informer = Informer(
            kube, NODES, self._listed, self._event, watch_timeout=self.watch_timeout
        )
        await self.informer.run()

    def _listed(self, items: list[dict[str, Any]]) -> None:
        before = self.view.nodes
        fresh: dict[str, NodeSeen] = {}
        for obj in items:
            seen = NodeSeen.from_object(obj)
            if seen is not None:
                fresh[seen.name] = seen
        self.view.nodes = fresh
        self.view.synced = True
        for seen in fresh.values():
            self._check(before.get(seen.name), seen)

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        seen = NodeSeen.from_object(obj)
        if seen is None:
            return
        old = self.view.nodes.get(seen.name)
        if kind == "DELETED":
            self.view.nodes.pop(seen.name, None)
            return
        self.view.nodes[seen.name] = seen
        self._check(old, seen)

    def _check(self, old: NodeSeen | None, new: NodeSeen) -> None:
        if not new.ready or (old is not None and old.ready):
            return
        plan = self.plan()
        node = find_node(plan, new.name)
        if node is None:
            self.log.info("Node %s is Ready; it is not in the inventory", new.name)
            return
        if old is None and node.name in self.announced:
            return  # known Ready from before this connection or restart
        self.announced.add(node.name)
        self.log.info("%s is Ready", node.name, extra=node_fields(plan, node.name))
        self.ctx.bus.publish(
            node.name, "node-ready", f"Node {new.name} Ready", source="cluster", time=self.clock()
        )
