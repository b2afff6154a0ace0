"""What the load balancer refuses (sans-IO): connections over its caps, and backends
that are its own frontends.

Caps. The proxy spends the descriptors appliance/fdbudget.py leaves it (the limit
less the reserve of the rest of the daemon), less one per backend for the health
checks. A proxied connection costs two (the client's socket and the upstream one); a
direction that switches to splice() costs two more for its pipe, taken only while the
proxy holds less than PIPE_PERCENT of its descriptors (past that, the direction stays
on recv/send: slower, but the last part is kept for connections). Each listening
frontend is guaranteed `floor` connections (half the connections, shared evenly);
the other half is a pool any frontend may draw from, up to its `cap` (its
max_connections, when lower). One client address may hold `per_client` connections
of a frontend: a quarter of its cap, but never fewer than CLIENT_MIN (or the cap).
A connection over a cap is accepted and closed at once, counted by its reason; the
established ones are not touched. Every check is a few integer comparisons and one
dictionary lookup per connection.

Self-connections. A backend whose address and port are one of the proxy's own
listening endpoints (the same address, or any local address under a wildcard
listener) would be connected to by the proxy itself: every such connection is
accepted again and connects again, until descriptors run out, and its health check
is answered by the proxy and calls the backend healthy. Such a backend is refused.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address

from appliance.addr import Endpoint

FDS_PER_CONNECTION = 2  # the client's socket and the upstream one
FDS_PER_PIPE = 2  # a splice pipe per direction that turned bulk
FDS_PER_CHECK = 1  # a health check in flight, one per backend
PIPE_PERCENT = 75  # pipes only while the proxy holds less than this share of its budget
CLIENT_SHARE = 4  # one client address: a quarter of a frontend's cap ...
CLIENT_MIN = 64  # ... but at least this many (or the whole cap, when smaller)

# Why a connection was refused: the frontend's counter names.
OVER_LIMIT = "over_limit"  # the frontend's cap
CLIENT_LIMIT = "client_limit"  # the client address's cap
DESCRIPTORS = "descriptors"  # the proxy's descriptors (the shared pool, or pipes)
REFUSALS = (OVER_LIMIT, CLIENT_LIMIT, DESCRIPTORS)


@dataclass(frozen=True, slots=True)
class FrontendCaps:
    cap: int  # connections at most
    floor: int  # connections guaranteed (not drawn from the shared pool)
    per_client: int  # connections per client address at most


@dataclass(frozen=True, slots=True)
class Caps:
    fds: int  # descriptors the proxy may hold for connections and pipes
    connections: int  # fds // FDS_PER_CONNECTION
    shared: int  # connections beyond the floors, for any frontend
    frontends: Mapping[str, FrontendCaps]

    def describe(self) -> str:
        per = ", ".join(
            f"{name} {c.floor}-{c.cap} ({c.per_client} per client)"
            for name, c in self.frontends.items()
        )
        return (
            f"{self.connections} proxied connections ({FDS_PER_CONNECTION} descriptors each, "
            f"{FDS_PER_PIPE} more per splice pipe) in {self.fds} descriptors; {per}"
        )


def derive(spendable: int, max_connections: Mapping[str, int], backends: int) -> Caps:
    """Caps from the descriptors the proxy may spend, per listening frontend (its
    max_connections), with `backends` health checks that may be in flight."""
    fds = max(FDS_PER_CONNECTION, spendable - backends * FDS_PER_CHECK)
    connections = fds // FDS_PER_CONNECTION
    even = connections // (2 * max(1, len(max_connections)))
    floors = {name: min(even, most) for name, most in max_connections.items()}
    shared = connections - sum(floors.values())
    frontends = {}
    for name, most in max_connections.items():
        cap = max(1, min(most, floors[name] + shared))
        per_client = min(cap, max(CLIENT_MIN, cap // CLIENT_SHARE))
        frontends[name] = FrontendCaps(cap, floors[name], per_client)
    return Caps(fds, connections, shared, frontends)


class Ledger:
    """The descriptors and the shared connections of all frontends together."""

    __slots__ = ("fds", "fds_used", "gates", "pipe_limit", "pipes", "shared", "shared_used")

    def __init__(self, caps: Caps) -> None:
        self.fds_used = 0
        self.shared_used = 0
        self.pipes = 0
        self.gates: list[Gate] = []
        self.fds = self.shared = self.pipe_limit = 0
        self.retune(caps)

    def retune(self, caps: Caps) -> None:
        """New caps (a reload): the counts stay, what they are measured against changes."""
        self.fds, self.shared = caps.fds, caps.shared
        self.pipe_limit = caps.fds * PIPE_PERCENT // 100
        for gate in self.gates:
            fe = None if gate.retired else caps.frontends.get(gate.name)
            if fe is None:  # not listening any more: its connections finish, none are new
                gate.cap, gate.floor, gate.per_client = 0, 0, 0
            else:
                gate.cap, gate.floor, gate.per_client = fe.cap, fe.floor, fe.per_client
        self.shared_used = sum(max(0, g.active - g.floor) for g in self.gates)

    def gate(self, name: str) -> Gate:
        gate = Gate(self, name)
        self.gates.append(gate)
        return gate

    def drop(self, gate: Gate) -> None:
        """A frontend gone with its last connection."""
        if gate in self.gates:
            self.gates.remove(gate)

    def take_pipe(self) -> bool:
        if self.fds_used + FDS_PER_PIPE > self.pipe_limit:
            return False
        self.fds_used += FDS_PER_PIPE
        self.pipes += 1
        return True

    def give_pipe(self) -> None:
        self.fds_used -= FDS_PER_PIPE
        self.pipes -= 1

    def stats(self) -> dict[str, int]:
        return {
            "budget": self.fds,
            "in_use": self.fds_used,
            "pipes": self.pipes,
            "shared": self.shared,
            "shared_in_use": self.shared_used,
        }


class Gate:
    """One frontend's admission: its cap, its floor, its clients' connections."""

    __slots__ = ("active", "cap", "clients", "floor", "ledger", "name", "per_client", "retired")

    def __init__(self, ledger: Ledger, name: str) -> None:
        self.ledger = ledger
        self.name = name
        self.retired = False  # its frontend was switched off: caps 0 from the next retune
        self.cap = self.floor = self.per_client = 0
        self.active = 0
        self.clients: dict[str, int] = {}  # client address -> its open connections

    def admit(self, client: str) -> str | None:
        """None: admitted (and counted); else why not (a REFUSALS name)."""
        active = self.active
        if active >= self.cap:
            return OVER_LIMIT
        held = self.clients.get(client, 0)
        if held >= self.per_client:
            return CLIENT_LIMIT
        ledger = self.ledger
        if ledger.fds_used + FDS_PER_CONNECTION > ledger.fds:
            return DESCRIPTORS
        if active >= self.floor:
            if ledger.shared_used >= ledger.shared:
                return DESCRIPTORS
            ledger.shared_used += 1
        ledger.fds_used += FDS_PER_CONNECTION
        self.active = active + 1
        self.clients[client] = held + 1
        return None

    def release(self, client: str) -> None:
        """An admitted connection closed."""
        ledger = self.ledger
        if self.active > self.floor:
            ledger.shared_used -= 1
        self.active -= 1
        ledger.fds_used -= FDS_PER_CONNECTION
        held = self.clients.get(client, 0) - 1
        if held > 0:
            self.clients[client] = held
        else:
            self.clients.pop(client, None)

    def stats(self) -> dict[str, int]:
        return {
            "cap": self.cap,
            "floor": self.floor,
            "per_client": self.per_client,
            "clients": len(self.clients),
        }


# --- self-connections ---------------------------------------------------------------------


def is_local(address: str, local: Collection[str]) -> bool:
    """Whether connecting to `address` reaches this host: loopback, 0.0.0.0, or one of
    its own addresses (`local`, from the system)."""
    ip = ip_address(address)
    return ip.is_loopback or ip.is_unspecified or address in local


def own_endpoint(
    address: str, port: int, listeners: Iterable[Endpoint], local: Collection[str]
) -> Endpoint | None:
    """The listening endpoint of ours that a connect to address:port would reach."""
    for listener in listeners:
        if listener.port != port:
            continue
        if listener.host == address:
            return listener
        if listener.is_wildcard and is_local(address, local):
            return listener
    return None


__all__ = [
    "CLIENT_LIMIT",
    "DESCRIPTORS",
    "OVER_LIMIT",
    "REFUSALS",
    "Caps",
    "FrontendCaps",
    "Gate",
    "Ledger",
    "derive",
    "is_local",
    "own_endpoint",
]
