"""The cluster loop's status: connection, workers, CSR approver, nodes, bootstrap, GPUs.

The parts are the loops' own reports (kept as their JSON); the cluster loop declares
no metric families of its own (CSR decisions and approvals come from the store)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.status import Family


@dataclass(frozen=True)
class ClusterStatus:
    connection: Mapping[str, Any] = field(default_factory=dict)  # state, detail, since, connects
    workers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # worker -> its view
    kubeconfig: str = ""
    approve_csrs: bool = False
    csr: Mapping[str, Any] = field(default_factory=dict)  # the approver's status
    nodes_seen: int = 0
    nodes_ready: tuple[str, ...] = ()
    bootstrap: Mapping[str, Any] = field(default_factory=dict)  # complete, waiting_for, ...
    gpu: Mapping[str, Any] = field(default_factory=dict)  # the GPU bring-up's status

    def to_json(self) -> dict[str, Any]:
        return {
            "connection": dict(self.connection),
            "workers": {name: dict(view) for name, view in self.workers.items()},
            "kubeconfig": self.kubeconfig,
            "approve_csrs": self.approve_csrs,
            "csr": dict(self.csr),
            "nodes": {"seen": self.nodes_seen, "ready": list(self.nodes_ready)},
            "bootstrap": dict(self.bootstrap),
            "gpu": dict(self.gpu),
        }

    def metrics(self) -> Iterator[Family]:
        return iter(())
