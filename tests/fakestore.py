"""A store whose writes can be told to fail: wraps a real one (or keeps leases and
events in memory) and raises `StoreError` from a write while `fail_writes` is set."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.events import Event
from appliance.store import Lease, StoreError, UnknownMachine


class FailingStore:
    """The DHCP service's store (a DhcpStore) and the event writer's (a WriterStore), in
    memory; `fail_writes = True` makes writes raise."""

    def __init__(self, path: Path = Path("fake.db")) -> None:
        self.path = path
        self.fail_writes = False
        self.write_attempts = 0
        self.saved: dict[str, Lease] = {}
        self.recorded: list[Event] = []

    def _write(self) -> None:
        self.write_attempts += 1
        if self.fail_writes:
            raise StoreError("fake store: the disk said no")

    def save_leases(self, leases: Sequence[Lease]) -> None:
        self._write()
        for lease in leases:
            self.saved[lease.mac] = lease

    def leases(self, now: float | None = None) -> list[Lease]:
        return list(self.saved.values())

    def record_events(self, evs: Sequence[Event]) -> list[Event]:
        self._write()
        self.recorded.extend(evs)
        return list(evs)

    def close(self) -> None:
        pass

    def note_unknowns(
        self, machines: Sequence[UnknownMachine], keep: int = 0, lost: int = 0
    ) -> int:
        self._write()
        return 0

    def unknown_machines(self, limit: int = -1, offset: int = 0) -> list[dict[str, object]]:
        return []


if TYPE_CHECKING:  # mypy checks the fake against the Protocols it stands in for
    from appliance.storequeue import WriterStore
    from appliance.stores import DhcpStore

    def _stands_in(s: FailingStore) -> tuple[DhcpStore, WriterStore]:
        return s, s
