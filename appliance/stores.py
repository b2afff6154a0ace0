"""The state store by concern: the interfaces services and the admin depend on.

`appliance.store.Store` (SQLite, one file, one schema) implements every Protocol here;
the daemon's `storequeue.DaemonStore` implements the event, install, CSR and cluster
ones with queued writes. Tests use `tests/fakestore.py`, whose writes can be told to fail.

Sync or async: the Protocols are synchronous on purpose. Each caller already decides
where a call runs: the DHCP service calls its LeaseStore only in its own executor
thread, the DaemonStore queues writes to its writer thread and serves hot reads from
memory, and admin reads go through `DaemonStore.read` (a reader thread). A network
store (the HA issue: etcd) plugs in at those same seams, which already run off the
loop, so the Protocols need no `async`; a blocking implementation is fine there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from appliance.bootstate import InstallStore
from appliance.events import Event
from appliance.store import Lease, UnknownMachine

__all__ = [
    "ClusterStateStore",
    "CsrDecisionStore",
    "DhcpStore",
    "EventStore",
    "InstallStore",
    "LeaseStore",
    "UnknownMachineStore",
]


class LeaseStore(Protocol):
    """DHCP leases. `save_leases` returns only once they are durable: an ACK waits on it."""

    def save_leases(self, leases: Sequence[Lease]) -> None: ...

    def leases(self, now: float | None = None) -> list[Lease]: ...

    def close(self) -> None: ...


class UnknownMachineStore(Protocol):
    """Machines that asked for DHCP and are not in the inventory."""

    def note_unknowns(
        self, machines: Sequence[UnknownMachine], keep: int = ..., lost: int = 0
    ) -> int: ...  # how many were evicted to keep `keep`

    def unknown_machines(self, limit: int = -1, offset: int = 0) -> list[dict[str, object]]: ...


class DhcpStore(LeaseStore, UnknownMachineStore, Protocol):
    """What the DHCP service writes: its leases and the machines it does not know."""


class EventStore(Protocol):
    """Node progress events."""

    def record_events(self, evs: Sequence[Event]) -> object: ...

    def events(
        self, *, node: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[Event]: ...

    def last_event_id(self) -> int: ...

    def progress(self) -> dict[str, dict[str, tuple[float, float, str]]]: ...


class CsrDecisionStore(Protocol):
    """The approver's decisions on kubelet CSRs."""

    def record_csr_decision(
        self, *, time: float, csr: str, kind: str, decision: str, reason: str,
        uid: str = "", node: str = "", requestor: str = "",
    ) -> object: ...  # fmt: skip

    def csr_decisions(self, limit: int = 500) -> list[dict[str, object]]: ...


class ClusterStateStore(Protocol):
    """Small JSON values of the cluster loop (bootstrap done, operator installed...)."""

    def set_cluster_state(self, key: str, value: object, time: float) -> None: ...

    def cluster_state(self, key: str) -> Any: ...


if TYPE_CHECKING:  # mypy checks the implementations against the Protocols
    from appliance.store import Store
    from appliance.storequeue import DaemonStore

    def _sqlite(s: Store) -> tuple[
        DhcpStore, EventStore, CsrDecisionStore, ClusterStateStore, InstallStore,
    ]:  # fmt: skip
        return s, s, s, s, s

    def _daemon(s: DaemonStore) -> tuple[
        EventStore, CsrDecisionStore, ClusterStateStore, InstallStore,
    ]:  # fmt: skip
        return s, s, s, s
