"""The state store by concern: the interfaces services and the admin depend on.

`appliance.store.Store` (SQLite, one file, one schema) implements every Protocol here;
the daemon's `storequeue.DaemonStore` is the `ServiceStore` (ServiceContext.store):
event, install, CSR and cluster writes queued, reads in its reader thread, and the DHCP
service's own lease connection. Tests use `tests/fakestore.py`, whose writes can be told
to fail. The values the Protocols speak in (Lease, UnknownMachine, the errors) live here
too, so a service imports neither the SQLite store nor sqlite3 (import-linter holds it).

Sync or async: the Protocols are synchronous on purpose. Each caller already decides
where a call runs: the DHCP service calls its LeaseStore only in its own executor
thread, the DaemonStore queues writes to its writer thread and serves hot reads from
memory, and admin reads go through `ServiceStore.read` (a reader thread). A network
store (the HA issue: etcd) plugs in at those same seams, which already run off the
loop, so the Protocols need no `async`; a blocking implementation is fine there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from appliance.bootstate import InstallStore
from appliance.events import Event

__all__ = [
    "UNKNOWN_MACHINES_KEEP",
    "ClusterStateStore",
    "CsrDecisionLog",
    "CsrDecisionStore",
    "DhcpStore",
    "EventLog",
    "EventStore",
    "FactsReader",
    "InstallStore",
    "Lease",
    "LeaseConflict",
    "LeaseState",
    "LeaseStore",
    "ServiceStore",
    "StoreBusy",
    "StoreError",
    "StoreReader",
    "StoreUnavailable",
    "UnknownMachine",
    "UnknownMachineStore",
]

T = TypeVar("T")

LeaseState = Literal["offered", "bound", "declined", "released"]
UNKNOWN_MACHINES_KEEP = 4096  # rows of unknown_machines; the least recently seen go first


class StoreError(Exception):
    pass


class StoreUnavailable(StoreError):
    """The store cannot take this write now (locked, disk full, I/O error): the same
    write may succeed later, so a caller that can keep it, keeps it."""


class StoreBusy(StoreUnavailable):
    """Another process holds the lock beyond the caller's short wait: try again shortly."""


class LeaseConflict(StoreError):
    """The address is already leased to another MAC. A shared store (etcd) says which
    leases it refused and who holds their addresses (the rest of the batch is stored):
    the DHCP service forgets its bindings of those and learns the holders."""

    def __init__(
        self, message: str, *, refused: tuple[Lease, ...] = (), holders: tuple[Lease, ...] = ()
    ) -> None:
        super().__init__(message)
        self.refused = refused
        self.holders = holders


@dataclass(frozen=True, slots=True)
class Lease:
    mac: str
    ip: str
    hostname: str | None
    expires: float
    state: LeaseState
    updated: float


@dataclass(frozen=True, slots=True)
class UnknownMachine:
    """A sighting of a machine outside the inventory (`seen`: requests it stands for)."""

    mac: str
    first_seen: float
    last_seen: float
    seen: int
    vendor_class: str = ""
    arch: str = ""
    user_class: str = ""
    hostname: str = ""


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


class EventLog(Protocol):
    """Node progress events as a service on the loop has them: written (queued), and
    the progress per node (kept in memory)."""

    def record_events(self, evs: Sequence[Event]) -> object: ...

    def progress(self) -> dict[str, dict[str, tuple[float, float, str]]]: ...


class EventStore(EventLog, Protocol):
    """Node progress events, with the reads that go to the file."""

    def events(
        self, *, node: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[Event]: ...

    def last_event_id(self) -> int: ...


class CsrDecisionLog(Protocol):
    """The approver's decisions on kubelet CSRs, as it writes them."""

    def record_csr_decision(
        self, *, time: float, csr: str, kind: str, decision: str, reason: str,
        uid: str = "", node: str = "", requestor: str = "",
    ) -> object: ...  # fmt: skip


class CsrDecisionStore(CsrDecisionLog, Protocol):
    """The approver's decisions, with the read that goes to the file."""

    def csr_decisions(self, limit: int = 500) -> list[dict[str, object]]: ...


class ClusterStateStore(Protocol):
    """Small JSON values of the cluster loop (bootstrap done, operator installed...)."""

    def set_cluster_state(self, key: str, value: object, time: float) -> None: ...

    def cluster_state(self, key: str) -> Any: ...


class FactsReader(Protocol):
    """The counts the metrics read from the store (in the store's reader thread)."""

    def progress(self) -> dict[str, dict[str, tuple[float, float, str]]]: ...

    def event_counts(self) -> dict[str, int]: ...

    def leases(self, now: float | None = None) -> list[Lease]: ...

    def csr_decision_counts(self) -> dict[str, int]: ...

    def unknown_machine_counts(self) -> tuple[int, int]: ...  # (rows, evicted so far)


class StoreReader(FactsReader, Protocol):
    """Everything the admin API reads, in the reader thread (`ServiceStore.read`)."""

    def events(
        self, *, node: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[Event]: ...

    def last_event_id(self) -> int: ...

    def csr_decisions(self, limit: int = 500) -> list[dict[str, object]]: ...

    def unknown_machines(self, limit: int = -1, offset: int = 0) -> list[dict[str, object]]: ...

    def cluster_state(self, key: str) -> Any: ...


class ServiceStore(EventLog, CsrDecisionLog, ClusterStateStore, InstallStore, Protocol):
    """The store as the supervisor hands it to every service (ServiceContext.store):
    writes that never block the loop, hot reads from memory, and no read of the file
    but through `read` (off the loop: a lock another process holds stalls nothing)."""

    def read(self, fn: Callable[[StoreReader], T], *, sync_wait: float = ...) -> Awaitable[T]:
        """Run `fn` in the store's reader thread, once the writes queued so far landed
        (at most `sync_wait` seconds); StoreBusy when the file stays locked."""
        ...

    def open_leases(self, state_dir: Path, busy_timeout_ms: int) -> DhcpStore:
        """The DHCP service's own lease connection (a blocking one: it is used only in
        that service's executor). Busy beyond `busy_timeout_ms`: StoreBusy."""
        ...
