"""Who may hold a DNS-over-TCP connection, and for how long (sans-IO: `now` is an argument).

RFC 7766 6.2.3 lets a server close idle connections, sooner under load. One client
must not hold every slot: each client (an IPv4 address, or an IPv6 /64) has a cap,
and above half the table both the cap and the idle timeout shrink linearly to their
minimum at full. A full table makes room by closing the longest-idle connection of
the client that holds the most; only when every connection is mid-answer is a new
one refused. A connection is idle from its last complete answer (or from accept),
so a client that trickles a message in byte by byte is not active.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TcpLimits:
    total: int = 256  # connections at once
    per_client: int = 64  # while at most half the table is used
    per_client_min: int = 4  # with the table full
    idle: float = 10.0  # seconds, while at most half the table is used
    idle_min: float = 1.0  # seconds, with the table full


@dataclass(frozen=True, slots=True)
class Admit:
    ok: bool
    evict: list[Hashable] = field(default_factory=list)  # close these first
    reason: str = ""  # why not: "client" (at its cap) or "full" (all busy)


def client_key(address: str) -> str:
    """The unit a cap applies to: an IPv4 address, or the /64 of an IPv6 one."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class TcpSlots:
    def __init__(self, limits: TcpLimits | None = None) -> None:
        self.limits = limits or TcpLimits()
        self._client: dict[Hashable, str] = {}  # connection -> client key
        self._count: Counter[str] = Counter()
        # Idle connections by the time they became idle, oldest first; busy ones are absent.
        self._idle: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._client)

    def connections(self) -> list[Hashable]:
        return list(self._client)

    def _pressure(self) -> float:
        """0 up to half the table, then linearly to 1 at full."""
        half = self.limits.total / 2
        return min(1.0, max(0.0, (len(self._client) - half) / (self.limits.total - half)))

    def client_cap(self) -> int:
        lim = self.limits
        return round(lim.per_client - self._pressure() * (lim.per_client - lim.per_client_min))

    def idle_timeout(self) -> float:
        lim = self.limits
        return lim.idle - self._pressure() * (lim.idle - lim.idle_min)

    def open(self, conn: Hashable, address: str, now: float) -> Admit:
        key = client_key(address)
        if self._count[key] >= self.client_cap():
            return Admit(False, reason="client")
        evict: list[Hashable] = []
        if len(self._client) >= self.limits.total:
            victim = self._victim()
            if victim is None:
                return Admit(False, reason="full")
            self.close(victim)
            evict.append(victim)
        self._client[conn] = key
        self._count[key] += 1
        self._idle[conn] = now
        return Admit(True, evict)

    def _victim(self) -> Hashable | None:
        """The longest-idle connection of the client holding the most (None: all busy)."""
        best: Hashable | None = None
        most = 0
        for conn in self._idle:  # oldest first: the first of each client is its longest idle
            n = self._count[self._client[conn]]
            if n > most:
                best, most = conn, n
        return best

    def busy(self, conn: Hashable, now: float) -> float:
        """A query arrived: the connection is answering, not idle. Returns since when it
        was idle, for `idle` when the message earned no answer (junk keeps no one alive)."""
        return self._idle.pop(conn, now)

    def idle(self, conn: Hashable, since: float) -> None:
        """The answer went out: idle from `since` (now, or as before for no answer)."""
        if conn not in self._client:
            return
        self._idle.pop(conn, None)
        latest = next(reversed(self._idle.values()), since)
        self._idle[conn] = since
        if since < latest:  # kept in order of `since`: an older one goes back to its place
            self._idle = OrderedDict(sorted(self._idle.items(), key=lambda kv: kv[1]))

    def close(self, conn: Hashable) -> None:
        key = self._client.pop(conn, None)
        if key is None:
            return
        self._idle.pop(conn, None)
        self._count[key] -= 1
        if self._count[key] <= 0:
            del self._count[key]

    def deadline(self) -> float | None:
        """When the longest-idle connection times out at today's pressure (None: none idle)."""
        for since in self._idle.values():
            return since + self.idle_timeout()
        return None

    def expired(self, now: float) -> list[Hashable]:
        """Idle connections past the timeout, forgotten here: the caller closes them.

        The timeout is taken once, at the current pressure, for all of them.
        """
        limit = now - self.idle_timeout()
        out: list[Hashable] = []
        for conn, since in self._idle.items():
            if since > limit:
                break
            out.append(conn)
        for conn in out:
            self.close(conn)
        return out
