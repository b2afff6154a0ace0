"""Backend pools (sans-IO): health state with rise/fall, admin state, and backend choice.

A backend is eligible for new connections when it is enabled (not draining, not
disabled) and healthy. Health starts unknown and counts as eligible, so traffic
flows before the first check completes; the first check result decides at once,
later ones need `rise` successes or `fall` failures in a row (as HAProxy does).
A failed connect marks the backend down at once (a passive check): the next client
does not meet the same dead backend while the active checks catch up.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from appliance.plan import Backend, Frontend
from services.proxy.status import BackendStatus

Health = Literal["unknown", "up", "down"]
AdminState = Literal["enabled", "drain", "disabled"]
HISTORY = 10  # check results kept per backend, for the stats


@dataclass(eq=False)  # an identity: two backends with equal counters are not the same one
class BackendState:
    spec: Backend
    rise: int
    fall: int
    health: Health = "unknown"
    admin: AdminState = "enabled"
    removed: bool = False  # gone from the plan: drains, then is forgotten
    streak: int = 0  # consecutive results against the current health
    active: int = 0
    total: int = 0
    failures: int = 0  # failed connects
    bytes_in: int = 0  # client -> backend
    bytes_out: int = 0  # backend -> client
    history: deque[tuple[float, bool, str]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    changed_at: float = 0.0
    # Why this backend is refused as one of the proxy's own listeners (limits.py): it
    # stays down and unprobed while this is set.
    self_loop: str | None = None
    # connect()'s argument, made once: a backend keeps its address (pool.update matches on it)
    sockaddr: tuple[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.sockaddr = (str(self.spec.address), self.spec.port)

    @property
    def key(self) -> tuple[str, int]:
        return self.sockaddr

    @property
    def eligible(self) -> bool:
        return self.admin == "enabled" and not self.removed and self.health != "down"

    def check_result(self, ok: bool, now: float, detail: str = "") -> Health | None:
        """Record an active check; return the new health when it changes."""
        self.history.append((now, ok, detail))
        if self.self_loop is not None:  # a check that was in flight when it was refused
            return None
        if self.health == "unknown":
            return self._set("up" if ok else "down", now)
        if ok == (self.health == "up"):
            self.streak = 0
            return None
        self.streak += 1
        if ok and self.streak >= self.rise:
            return self._set("up", now)
        if not ok and self.streak >= self.fall:
            return self._set("down", now)
        return None

    def connect_failed(self, now: float, detail: str) -> Health | None:
        """A client's connect failed: out of the pool now, the checks bring it back."""
        self.failures += 1
        self.history.append((now, False, f"connect: {detail}"))
        return self._set("down", now) if self.health != "down" else None

    def set_self_loop(self, reason: str | None, now: float) -> bool:
        """Refuse the backend as our own listener (`reason`), or take it back (None):
        down while refused; back to unknown, so its next check decides at once."""
        if reason == self.self_loop:
            return False
        self.self_loop = reason
        if reason is not None:
            self.history.append((now, False, reason))
            self._set("down", now)
        else:
            self._set("unknown", now)
        return True

    def _set(self, health: Health, now: float) -> Health:
        self.health = health
        self.streak = 0
        self.changed_at = now
        return health

    def status(self) -> BackendStatus:
        """As the admin API shows it (after drain/disable/enable, and in the list)."""
        return BackendStatus.of(self)


class Pool:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.backends: list[BackendState] = []
        self._rr = 0
        self.update(frontend)

    def update(self, frontend: Frontend) -> list[BackendState]:
        """Take a new plan's frontend: keep state of known backends, drain removed ones."""
        self.frontend = frontend
        check = frontend.check
        known = {(b.spec.name, b.key): b for b in self.backends}
        fresh: list[BackendState] = []
        for spec in frontend.backends:
            key = (spec.name, (str(spec.address), spec.port))
            state = known.pop(key, None)
            if state is None:
                state = BackendState(spec, check.rise, check.fall)
            # The same node at the same address: keep its health and counters, take
            # the new spec (its role may have changed) and the new check settings.
            state.spec = spec
            state.rise, state.fall, state.removed = check.rise, check.fall, False
            fresh.append(state)
        gone = list(known.values())
        for state in gone:
            state.removed = True  # existing connections finish; no new ones
        self.backends = fresh + [b for b in gone if b.active > 0]
        return gone

    def forget_idle_removed(self) -> None:
        self.backends = [b for b in self.backends if not (b.removed and b.active == 0)]

    def find(self, name: str) -> BackendState | None:
        return next((b for b in self.backends if b.spec.name == name and not b.removed), None)

    def choose(self, client: str, exclude: set[int] | None = None) -> BackendState | None:
        """The backend for a new connection from `client`, skipping ids in `exclude`."""
        candidates = [b for b in self.backends if b.eligible and id(b) not in (exclude or ())]
        if not candidates:
            return None
        algorithm = self.frontend.balance
        if algorithm == "leastconn":
            return min(candidates, key=lambda b: (b.active, b.total))
        if algorithm == "source":
            # Stable per client address while the eligible set is the same.
            return candidates[zlib.crc32(client.encode()) % len(candidates)]
        self._rr += 1
        return candidates[self._rr % len(candidates)]
