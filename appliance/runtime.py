"""The daemon's runtime state: one typed object the supervisor owns and every service shares.

What services used to learn by looking each other up by name lives here instead:
- boot once: which nodes have fetched their install ignition (the boot services read it
  on every boot config, HTTP writes it, the admin API asks for a reinstall);
- bootstrap retired: the cluster loop writes it, HTTP stops serving bootstrap.ign;
- backend admin states (drain / disable / enable per frontend and backend): the admin
  API and the cluster loop write them, the load balancer applies them.

Install marks and the bootstrap record are written through to the store, as before;
admin states live in memory (as before): a load balancer that starts (or restarts)
while the daemon runs applies those already set. Plain code: no asyncio, no sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from appliance.bootstate import InstallStore
from appliance.logs import fields

log = logging.getLogger("appliance.boot")

AdminState = Literal["enabled", "drain", "disabled"]
ADMIN_STATES: tuple[AdminState, ...] = ("enabled", "drain", "disabled")


class Reported(Protocol):
    def to_json(self) -> dict[str, Any]: ...


class AdminTarget(Protocol):
    """A backend as the load balancer reports it after a change: its typed status, whose
    JSON is the admin API's body (the same as its entry in the backends list)."""

    def status(self) -> Reported: ...


class LoadBalancer(Protocol):
    """What the runtime state needs of the load balancer: apply one backend's admin state.

    Raises KeyError (with the message for the operator) for an unknown frontend or
    backend; applying the state a backend already has changes nothing."""

    def set_admin_state(self, frontend: str, backend: str, state: AdminState) -> AdminTarget: ...


class LoadBalancerOff(LookupError):
    """No load balancer runs (no frontend listens): there is nothing to apply a state to."""


@dataclass(frozen=True, slots=True)
class BackendKey:
    frontend: str
    backend: str

    def __str__(self) -> str:
        return f"{self.frontend}/{self.backend}"


class RuntimeStore(InstallStore, Protocol):
    """Boot once's store, and where an HA member shares its admin states."""

    def set_cluster_state(self, key: str, value: object, time: float) -> None: ...


ADMIN_KEY = "backend_admin"  # cluster state key of the admin states an HA pair shares


class RuntimeState:
    def __init__(self, store: RuntimeStore, shared: bool = False) -> None:
        """`shared`: an HA pair's member (plan.ha): admin states are written through to
        the shared store too, and `refresh` takes what the other member wrote."""
        self.store = store
        self.shared = shared
        # Single host: always the leader. An HA member: set once it took over (the shared
        # state read), and only while its elector still leads (`elected`, checked on
        # every read: a fence takes effect before the step-down callback runs).
        self._leading = not shared
        self.elected: Callable[[], bool] | None = None
        self._installed: set[str] = set()
        self._bootstrap_retired = False
        self._admin: dict[BackendKey, AdminState] = {}
        self._lb: LoadBalancer | None = None
        self.refresh()

    @property
    def leading(self) -> bool:
        return self._leading and (self.elected is None or self.elected())

    @leading.setter
    def leading(self, value: bool) -> None:
        self._leading = value

    def refresh(self) -> None:
        """Take the install marks, the bootstrap record and (shared) the admin states from
        the store's view: at start, and on an HA member when the store was re-read."""
        store = self.store
        self._installed = {
            node for node, state in store.install_state().items() if state["installed_at"]
        }
        # Bootstrap complete (the cluster loop): bootstrap.ign is served no more.
        retired = store.cluster_state("bootstrap")
        self._bootstrap_retired = bool(isinstance(retired, dict) and retired.get("complete"))
        if self.shared:
            wanted = _admin_states(store.cluster_state(ADMIN_KEY))
            for key in set(self._admin) - set(wanted):
                self._admin.pop(key)
                self._apply(key, "enabled")
            for key, state in wanted.items():
                if self._admin.get(key) != state:
                    self._admin[key] = state
                    self._apply(key, state)

    # --- boot once ---------------------------------------------------------------------

    def installed(self, node: str) -> bool:
        return node in self._installed

    def mark_installed(self, node: str, now: float) -> bool:
        """Record the install; True when this is news (the first ignition fetch)."""
        if node in self._installed:
            return False
        self._installed.add(node)
        self.store.mark_installed(node, now)
        log.info(
            "%s fetched its install ignition: its next network boot boots from disk",
            node,
            extra=fields(node=node),
        )
        return True

    def request_reinstall(self, node: str, now: float) -> None:
        self._installed.discard(node)
        self.store.request_reinstall(node, now)
        log.info(
            "%s: reinstall requested: its next network boot installs it again",
            node,
            extra=fields(node=node),
        )

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        return self.store.install_state()

    # --- bootstrap ---------------------------------------------------------------------

    @property
    def bootstrap_retired(self) -> bool:
        return self._bootstrap_retired

    def retire_bootstrap(self) -> None:
        """From now on bootstrap.ign is refused (the cluster loop stores the record)."""
        self._bootstrap_retired = True

    # --- backend admin states ----------------------------------------------------------

    def admin_state(self, frontend: str, backend: str) -> AdminState:
        return self._admin.get(BackendKey(frontend, backend), "enabled")

    def admin_states(self) -> Iterator[tuple[BackendKey, AdminState]]:
        return iter(list(self._admin.items()))

    @property
    def load_balancer_running(self) -> bool:
        return self._lb is not None

    def set_admin_state(self, frontend: str, backend: str, state: AdminState) -> AdminTarget:
        """The admin API: apply now or fail (LoadBalancerOff, KeyError for an unknown
        frontend or backend, ValueError for an unknown state); kept once applied."""
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown state {state!r}")
        lb = self._lb
        if lb is None:
            raise LoadBalancerOff("the load balancer is not running (no frontend listens)")
        target = lb.set_admin_state(frontend, backend, state)
        self._remember(BackendKey(frontend, backend), state)
        return target

    def want_admin_state(self, frontend: str, backend: str, state: AdminState) -> bool:
        """The cluster loop: keep the state, apply it where it can be; True when applied
        now (False: no load balancer, or that frontend or backend is not there yet; a
        load balancer that starts later, or a reload that adds it, applies it)."""
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown state {state!r}")
        self._remember(BackendKey(frontend, backend), state)
        return self._apply(BackendKey(frontend, backend), state)

    def _remember(self, key: BackendKey, state: AdminState) -> None:
        if state == "enabled":
            self._admin.pop(key, None)  # the default: nothing to re-apply
        else:
            self._admin[key] = state
        if self.shared:  # the other member's load balancer takes it at its next refresh
            value = {str(k): v for k, v in self._admin.items()}
            self.store.set_cluster_state(ADMIN_KEY, value, time.time())

    def _apply(self, key: BackendKey, state: AdminState) -> bool:
        lb = self._lb
        if lb is None:
            return False
        try:
            lb.set_admin_state(key.frontend, key.backend, state)
        except (KeyError, ValueError):
            return False  # that frontend is off here, or the backend left its pool
        return True

    def attach_load_balancer(self, lb: LoadBalancer) -> None:
        """The load balancer started or took a new plan: it gets every state kept so far."""
        self._lb = lb
        for key, state in self.admin_states():
            self._apply(key, state)

    def detach_load_balancer(self, lb: LoadBalancer) -> None:
        """The load balancer stopped; a newer one that already attached stays attached."""
        if self._lb is lb:
            self._lb = None


def _admin_states(value: Any) -> dict[BackendKey, AdminState]:
    """The shared record {"frontend/backend": state}; anything malformed is left out."""
    out: dict[BackendKey, AdminState] = {}
    if not isinstance(value, dict):
        return out
    for name, state in value.items():
        frontend, sep, backend = str(name).partition("/")
        if sep and state in ADMIN_STATES and state != "enabled":
            out[BackendKey(frontend, backend)] = state
    return out
