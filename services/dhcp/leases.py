"""The lease table in memory (sans-IO): bindings, offers, the pool, quarantine.

Memory decides, the store follows: every binding that an ACK announces is
written (and fsynced) before the ACK leaves. One address is never bound to two
MACs: `holder` answers who may use an address at `now`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

OFFER_HOLD = 60.0  # seconds an offered address stays reserved for the client
DECLINE_QUARANTINE = 600.0  # seconds a declined address is kept out of the pool
# seconds a pool address that did not answer a ping counts as free (dnsmasq's
# PING_CACHE_TIME): a client's retransmitted DISCOVER is not held up again
PROBE_FRESH = 30.0


@dataclass(frozen=True, slots=True)
class Binding:
    mac: str
    ip: IPv4Address
    expires: float
    state: str  # offered | bound | released | declined
    hostname: str | None = None

    def active(self, now: float) -> bool:
        return self.state in ("offered", "bound") and self.expires > now


class LeaseTable:
    def __init__(
        self,
        pool: tuple[IPv4Address, IPv4Address] | None,
        reserved: Iterable[IPv4Address] = (),
    ) -> None:
        self.by_mac: dict[str, Binding] = {}
        self.by_ip: dict[IPv4Address, Binding] = {}
        self.quarantine: dict[IPv4Address, float] = {}
        self.probed_free: dict[IPv4Address, float] = {}  # address -> silent until
        self.set_pool(pool, reserved)

    def set_pool(
        self, pool: tuple[IPv4Address, IPv4Address] | None, reserved: Iterable[IPv4Address]
    ) -> None:
        self.pool = pool
        self.reserved = frozenset(reserved)
        self._first = int(pool[0]) if pool else 0
        self._size = int(pool[1]) - int(pool[0]) + 1 if pool else 0
        self._cursor = 0
        self._full_until = 0.0

    def in_pool(self, ip: IPv4Address) -> bool:
        return self.pool is not None and self.pool[0] <= ip <= self.pool[1]

    def load(self, bindings: Iterable[Binding]) -> None:
        for b in bindings:
            self._put(b)
            if b.state == "declined":  # a stored DECLINE keeps its quarantine over a restart
                self.quarantine[b.ip] = max(self.quarantine.get(b.ip, 0.0), b.expires)

    def _put(self, b: Binding) -> None:
        old = self.by_mac.get(b.mac)
        if old is not None and self.by_ip.get(old.ip) is old:
            del self.by_ip[old.ip]
            if old.ip != b.ip:
                self._full_until = 0.0  # the client moved: its old address is free
        prior = self.by_ip.get(b.ip)
        if prior is not None and prior.mac != b.mac:
            del self.by_mac[prior.mac]  # the address moved on: the old binding is over
        self.by_mac[b.mac] = b
        self.by_ip[b.ip] = b

    def holder(self, ip: IPv4Address, now: float) -> str | None:
        """The MAC that may use `ip` now, if any."""
        b = self.by_ip.get(ip)
        return b.mac if b is not None and b.active(now) else None

    def free_for(self, ip: IPv4Address, mac: str, now: float) -> bool:
        """May `mac` have `ip`? (Pool addresses only; reservations are decided elsewhere.)"""
        if ip in self.reserved or not self.in_pool(ip):
            return False
        if self.quarantine.get(ip, 0.0) > now:
            return False
        holder = self.holder(ip, now)
        return holder is None or holder == mac

    def allocate(self, mac: str, requested: IPv4Address | None, now: float) -> IPv4Address | None:
        """A pool address for `mac`: its previous one, the one it asks for, or the next free."""
        previous = self.by_mac.get(mac)
        if previous is not None and self.free_for(previous.ip, mac, now):
            return previous.ip
        if requested is not None and self.free_for(requested, mac, now):
            return requested
        if now < self._full_until:
            # Full at the last scan, and nothing freed since: a flood of DISCOVERs on an
            # exhausted pool must not cost a scan of the pool each.
            return None
        # Scan from a moving cursor: allocation is O(1) amortised while the pool fills.
        for step in range(self._size):
            offset = (self._cursor + step) % self._size
            ip = IPv4Address(self._first + offset)
            if self.free_for(ip, mac, now):
                b = self.by_ip.get(ip)
                # Prefer addresses no one held: an expired lease may come back to its
                # owner (an offer past its hold binds no one).
                if b is None or b.mac == mac or b.state == "offered":
                    self._cursor = offset + 1
                    return ip
        soonest = float("inf")  # when the next address comes free by time alone
        for step in range(self._size):  # no never-used address left: reuse expired ones
            ip = IPv4Address(self._first + step)
            if self.free_for(ip, mac, now):
                return ip
            if ip not in self.reserved:
                b = self.by_ip.get(ip)
                held = b.expires if b is not None and b.active(now) else now
                soonest = min(soonest, max(held, self.quarantine.get(ip, now)))
        self._full_until = soonest
        return None

    def offer(self, mac: str, ip: IPv4Address, now: float, hostname: str | None) -> Binding:
        current = self.by_mac.get(mac)
        if current is not None and current.ip == ip and current.state == "bound":
            return current  # a bound client asking again keeps its binding as it is
        b = Binding(mac, ip, now + OFFER_HOLD, "offered", hostname)
        self._put(b)
        return b

    def bind(
        self, mac: str, ip: IPv4Address, now: float, lease_time: int, hostname: str | None
    ) -> Binding:
        b = Binding(mac, ip, now + lease_time, "bound", hostname)
        self._put(b)
        if self.quarantine.pop(ip, None) is not None:
            self._full_until = 0.0
        return b

    def release(self, mac: str, now: float) -> Binding | None:
        b = self.by_mac.get(mac)
        if b is None or b.state != "bound":
            return None
        released = replace(b, state="released", expires=now)
        self._put(released)
        self._full_until = 0.0
        return released

    def decline(self, mac: str, ip: IPv4Address, now: float) -> Binding | None:
        """The client found `ip` in use: keep it out of the pool for a while. Only the
        client `ip` was offered or leased to may say so (None, and nothing kept, for
        anyone else): the quarantine holds no more than the addresses we give out."""
        b = self.by_mac.get(mac)
        if b is None or b.ip != ip or not b.active(now):
            return None
        self.quarantine[ip] = now + DECLINE_QUARANTINE
        declined = replace(b, state="declined", expires=now + DECLINE_QUARANTINE)
        self._put(declined)
        return declined

    def needs_probe(self, mac: str, ip: IPv4Address, now: float) -> bool:
        """Should `ip` be pinged before it is offered to `mac`? Not when it did not answer
        lately, nor when it is `mac`'s own (bound or released: that machine itself
        might answer)."""
        if self.probed_free.get(ip, 0.0) > now:
            return False
        b = self.by_mac.get(mac)
        return not (b is not None and b.ip == ip and b.state in ("bound", "released"))

    def probed(self, ip: IPv4Address, answered: bool, now: float) -> str | None:
        """A ping's result. An address that answered is in use by a machine we do not
        know: kept out of the pool like a declined one, and the offer held for the
        client while it was probed is dropped (that client's MAC is returned)."""
        if not answered:
            self.probed_free[ip] = now + PROBE_FRESH
            return None
        self.probed_free.pop(ip, None)
        b = self.by_ip.get(ip)
        if b is not None and b.state == "bound" and b.active(now):
            return None  # bound meanwhile (an INIT-REBOOT while it was pinged): its holder
        self.quarantine[ip] = now + DECLINE_QUARANTINE
        if b is not None and b.state == "offered":
            self.drop_offer(b.mac)
            return b.mac
        return None

    def drop_offer(self, mac: str) -> None:
        """The client took another server's offer: free ours at once."""
        b = self.by_mac.get(mac)
        if b is not None and b.state == "offered":
            del self.by_mac[mac]
            if self.by_ip.get(b.ip) is b:
                del self.by_ip[b.ip]
            self._full_until = 0.0

    def expire(self, now: float) -> list[Binding]:
        """Forget offers past their hold and quarantines past their time; return bindings gone."""
        gone = [b for b in self.by_mac.values() if b.state == "offered" and b.expires <= now]
        for b in gone:
            self.drop_offer(b.mac)
        for ip in [ip for ip, until in self.quarantine.items() if until <= now]:
            del self.quarantine[ip]
        for ip in [ip for ip, until in self.probed_free.items() if until <= now]:
            del self.probed_free[ip]
        return gone
