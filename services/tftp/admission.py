"""What the TFTP listener answers, and which requests get a transfer (sans-IO, `now` given).

The listener's port is well known and its replies come from that port, so anything it
says to a stranger can be made to land on another TFTP server's port (or its own) and
be answered again: a packet loop. Hence, as an experienced operator expects of a
production daemon:
- only requests (RRQ, WRQ) are ever answered on the listener; every other opcode is
  dropped and counted (it belongs to a transfer's own port, or to no one);
- nothing is sent to port 0, to a privileged port (no TFTP client uses one; a request
  "from" port 53 or 69 is spoofed, aimed at a server), to our own listener port (from
  any address: another appliance's listener, too) or to any of our own services;
- ERROR replies are rate-limited per source address and overall; an inventory node's
  draw on its own bucket only, so a spoofed flood cannot starve its "file not found"
  (the answers to pxelinux and GRUB config probes) into timeouts.

Transfers hold a thread and a socket each, so slots are shared out: a duplicate
request from a TID that already has a transfer is ignored (the client re-sent it), one
address gets at most `per_client` transfers, and `reserved` of the slots are kept for
inventory nodes. While more than half the slots are taken they are "scarce": a silent
peer is given up sooner (ReadTransfer.on_timer).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.bootfiles import Refused
from services.tftp.codec import (
    ERR_ACCESS,
    ERR_ILLEGAL_OP,
    ERR_UNDEFINED,
    OP_RRQ,
    OP_WRQ,
    Malformed,
    Request,
    parse_request,
)

PRIVILEGED_BELOW = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    max_transfers: int = 512  # concurrent transfers (threads); a boot storm of hundreds fits
    per_client: int = 16  # one PXE client fetches one file at a time; a few stale ones too
    reserved: int = 128  # slots only inventory nodes may take
    # ERROR replies per second to one address, after a burst: generous, since a loader
    # probes a dozen config names that mostly do not exist (pxelinux: 01-<mac>, <uuid>,
    # C0A80A05, C0A80A0, ... default) and each unanswered one costs it seconds.
    error_rate: float = 20.0
    error_burst: float = 50.0
    error_rate_total: float = 500.0  # ERROR replies per second to everyone together
    error_burst_total: float = 1000.0
    tracked: int = 4096  # addresses the rate limit remembers (least recent forgotten)


def own_endpoints(
    listen: Iterable[tuple[str, int]], addresses: Iterable[str]
) -> frozenset[tuple[str, int]]:
    """Where our own services listen, as (address, port): a wildcard listener at each of
    `addresses` (the appliance's own: network.address, the LB address, loopback)."""
    own: set[tuple[str, int]] = set()
    addresses = tuple(addresses)
    for host, port in listen:
        wildcard = host in ("0.0.0.0", "::", "")
        own.update((a, port) for a in (addresses if wildcard else (host,)))
    return frozenset(own)


def drop_reason(
    data: bytes,
    host: str,
    port: int,
    listen_port: int,
    own: frozenset[tuple[str, int]] = frozenset(),
) -> str | None:
    """Why a datagram on the listener gets no answer at all, or None to go on."""
    if port < PRIVILEGED_BELOW:  # port 0 too
        return "privileged source port"
    if port == listen_port:
        return "our own port"  # ourselves, or another TFTP server's listener
    if (host, port) in own:
        return "our own address"  # another of our services, which might answer back
    if len(data) < 2 or data[0] != 0 or data[1] not in (OP_RRQ, OP_WRQ):
        return "not a request"
    return None


MODES = ("octet", "netascii")


@dataclass(frozen=True, slots=True)
class Drop:
    """No answer at all (see drop_reason); counted as "dropped"."""

    reason: str


@dataclass(frozen=True, slots=True)
class Answer:
    """An ERROR to send (rate-limited: TokenBuckets), and the counter it adds to."""

    code: int
    message: str
    counter: str | None


def examine(
    data: bytes,
    host: str,
    port: int,
    listen_port: int,
    own: frozenset[tuple[str, int]] = frozenset(),
) -> Drop | Answer | Request:
    """What the listener makes of one datagram: nothing, an ERROR, or a read request
    (octet or netascii) to look up and admit."""
    if (why := drop_reason(data, host, port, listen_port, own)) is not None:
        # Not a request, or from a port no client uses: an answer could start a loop
        # (our own port, another server's) or hit a victim. Nothing goes back.
        return Drop(why)
    try:
        request = parse_request(data)
    except Malformed:
        # A request we cannot read (a NUL inside the name shifts the fields, a non-ASCII
        # name, an odd option list): say so, as tftpd-hpa does, rather than leave the
        # client waiting for its timeout.
        return Answer(ERR_ILLEGAL_OP, "malformed request", "malformed")
    if request.opcode == OP_WRQ:
        return Answer(ERR_ACCESS, "read-only server: no writes", "refused")
    if request.mode not in MODES:
        return Answer(ERR_ILLEGAL_OP, "mode is not supported", None)
    return request


def busy(why: str) -> Answer:
    """The ERROR for a request Slots.refuse_reason turned away ("per_client", "full",
    "reserved"): the client may try again later."""
    message = "too many transfers to you" if why == "per_client" else "server busy"
    return Answer(ERR_UNDEFINED, f"{message}, try again", "busy")


def refusal(exc: Refused) -> Answer:
    """The ERROR for a name the jail or the file system refused: its own code."""
    return Answer(exc.code, str(exc), "refused" if exc.code == ERR_ACCESS else "not_found")


class TokenBuckets:
    """A token bucket per key, and one for all strangers' keys together."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._total = (limits.error_burst_total, float("-inf"))

    def allow(self, key: str, now: float, node: bool = False) -> bool:
        """`node`: an inventory node's address, which never draws on the shared budget
        (strangers could spend it all); its own bucket still bounds it."""
        lim = self.limits
        tokens, last = self._buckets.pop(key, (lim.error_burst, now))
        tokens = min(lim.error_burst, tokens + (now - last) * lim.error_rate)
        total, total_last = self._total
        total = min(lim.error_burst_total, total + (now - total_last) * lim.error_rate_total)
        ok = tokens >= 1.0 and (node or total >= 1.0)
        if ok:
            tokens -= 1.0
            total -= 0.0 if node else 1.0
        self._buckets[key] = (tokens, now)  # most recent last
        self._total = (total, now)
        while len(self._buckets) > lim.tracked:
            self._buckets.popitem(last=False)
        return ok


def is_new_request(same: bool, heard: bool, ended: bool) -> bool:
    """Whether a request from a TID that has a transfer running asks for a new one.

    `same`: it is byte for byte the request that started that transfer; `heard`: the
    client acknowledged something of it; `ended`: it is over (the client's ERROR ended
    it: a PXE ROM's tsize probe, then its real request from the same port). Only the
    same request, unanswered, to a transfer still running is a resend to ignore."""
    return not same or heard or ended


class Slots:
    """Transfers in progress, by client address and TID."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.tids: Counter[tuple[Any, ...]] = Counter()
        self.by_client: Counter[str] = Counter()
        self.nodes = 0  # transfers to inventory nodes
        self.active = 0

    @property
    def scarce(self) -> bool:
        return self.active * 2 > self.limits.max_transfers

    def refuse_reason(
        self, tid: tuple[Any, ...], is_node: bool, answered: bool = False
    ) -> str | None:
        """None: `admit` it; "duplicate": ignore it; "per_client", "full" or "reserved"
        (what is left is for inventory nodes): say busy.

        `answered`: the client has acknowledged something of its transfer from this TID
        already. If not, the request is the same one again (our first packet was lost or
        is late): ignored, as dnsmasq does. If so, it is a new request (tftp-hpa reuses
        its port for the next `get`), maybe while the old transfer winds down."""
        lim = self.limits
        if tid in self.tids and not answered:
            return "duplicate"
        if self.by_client[tid[0]] >= lim.per_client:
            return "per_client"
        if self.active >= lim.max_transfers:
            return "full"
        if not is_node and self.active - self.nodes >= lim.max_transfers - lim.reserved:
            return "reserved"  # the rest is kept for the inventory's nodes
        return None

    def admit(self, tid: tuple[Any, ...], is_node: bool) -> None:
        self.tids[tid] += 1
        self.by_client[tid[0]] += 1
        self.nodes += is_node
        self.active += 1

    def release(self, tid: tuple[Any, ...], is_node: bool) -> None:
        if tid not in self.tids:
            return
        self.tids[tid] -= 1
        if self.tids[tid] <= 0:
            del self.tids[tid]
        self.active -= 1
        self.by_client[tid[0]] -= 1
        if self.by_client[tid[0]] <= 0:
            del self.by_client[tid[0]]
        self.nodes -= is_node
