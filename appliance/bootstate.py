"""Boot once: what the install marks need of a store.

The marks themselves are kept by the runtime state (appliance.runtime.RuntimeState):
in memory for the hot path (every boot config consults it) and written through to
the store, so a restart still boots installed nodes from disk. In the daemon the
store is the DaemonStore, whose writes are queued: marking never waits for the
file's lock on the event loop.
"""

from __future__ import annotations

from typing import Any, Protocol


class InstallStore(Protocol):
    """What boot-once needs of a store (Store, or the daemon's queued DaemonStore)."""

    def install_state(self) -> dict[str, dict[str, float | None]]: ...

    def cluster_state(self, key: str) -> Any: ...

    def mark_installed(self, node: str, time: float) -> None: ...

    def request_reinstall(self, node: str, time: float) -> None: ...
