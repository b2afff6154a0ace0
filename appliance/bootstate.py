"""Boot once: which nodes have fetched their install ignition (shared by the boot services).

Kept in memory for the hot path (every boot config consults it) and written
through to the store, so a restart still boots installed nodes from disk. In the
daemon the store is the DaemonStore, whose writes are queued: marking never waits
for the file's lock on the event loop.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger("appliance.boot")


class InstallStore(Protocol):
    """What boot-once needs of a store (Store, or the daemon's queued DaemonStore)."""

    def install_state(self) -> dict[str, dict[str, float | None]]: ...

    def cluster_state(self, key: str) -> Any: ...

    def mark_installed(self, node: str, time: float) -> None: ...

    def request_reinstall(self, node: str, time: float) -> None: ...


class BootState:
    def __init__(self, store: InstallStore) -> None:
        self.store = store
        self._installed = {
            node for node, state in store.install_state().items() if state["installed_at"]
        }
        # Bootstrap complete (the cluster loop): bootstrap.ign is served no more.
        retired = store.cluster_state("bootstrap")
        self.bootstrap_retired = bool(isinstance(retired, dict) and retired.get("complete"))

    def installed(self, node: str) -> bool:
        return node in self._installed

    def mark_installed(self, node: str, now: float) -> bool:
        """Record the install; True when this is news (the first ignition fetch)."""
        if node in self._installed:
            return False
        self._installed.add(node)
        self.store.mark_installed(node, now)
        log.info("%s fetched its install ignition: its next network boot boots from disk", node)
        return True

    def request_reinstall(self, node: str, now: float) -> None:
        self._installed.discard(node)
        self.store.request_reinstall(node, now)
        log.info("%s: reinstall requested: its next network boot installs it again", node)

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        return self.store.install_state()
