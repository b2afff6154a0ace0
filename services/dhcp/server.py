"""The dhcp service: UDP sockets, the group committer, and the core's decisions.

An ACK is sent only after its lease is on disk. Leases decided while the disk
was busy are written together in one transaction (one fsync), then their ACKs
leave: the throughput of a batch, the durability of one write per lease.

While another process holds the state file's lock (an operator's `sqlite3` shell),
the batch waits and is retried with backoff: ACKs are late, never sent unstored, and
the event loop (DNS in the same process) never waits for the lock.

A pool address is pinged before its first offer when the core asks (Outcome.probe):
the DISCOVER waits meanwhile and is handled again with the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from appliance.addr import Endpoint
from appliance.logs import fields
from appliance.plan import Plan
from appliance.ratelog import RateLimitedLog
from appliance.service import BindError, ServiceContext, ServiceError, grow_buffers
from appliance.stores import (
    UNKNOWN_MACHINES_KEEP,
    DhcpStore,
    Lease,
    LeaseConflict,
    StoreBusy,
    StoreUnavailable,
    UnknownMachine,
)
from appliance.tasks import TaskSet
from services.dhcp.arp import ArpCache
from services.dhcp.leases import Binding, LeaseTable
from services.dhcp.ping import Pinger
from services.dhcp.policy import BROADCAST, ClientInfo, DhcpCore, Outcome, Outgoing
from services.dhcp.status import DhcpStatus
from services.dhcp.strangers import Strangers

PXE_PORT = 4011  # proxyDHCP boot server port
LEASE_BUSY_MS = 200  # a lease commit waits this long for a lock, then is retried
COMMIT_RETRY_FIRST = 0.05  # seconds before retrying a commit the lock refused
COMMIT_RETRY_MAX = 1.0
STOP_COMMIT_WAIT = 5.0  # seconds a stop keeps trying to store decided leases
PENDING_MAX = 10_000  # replies waiting for their commit (a locked file) before new ones drop
SWEEP_EVERY = 30.0  # seconds between expiry sweeps of offers and quarantines
UNKNOWN_WRITE_EVERY = 1.0  # seconds between batched writes of unknown machines
UNKNOWN_WRITE_BATCH = 1024  # sightings that make the writer go before its second is up
STRANGER_WARN_EVERY = 60.0  # s between two "state file busy" lines of that writer
ERROR_LOG_EVERY = 10.0  # s: a bug every packet hits must not put a traceback per packet in the log


def _binding_to_lease(b: Binding, now: float) -> Lease:
    state: Any = b.state
    return Lease(b.mac, str(b.ip), b.hostname, b.expires, state, now)


def _lease_to_binding(lease: Lease) -> Binding:
    return Binding(lease.mac, IPv4Address(lease.ip), lease.expires, lease.state, lease.hostname)


def _dhcp_socket(service: str, endpoint: Endpoint, interface: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if interface:
            # Serve exactly one link: broadcasts in and out of that interface only.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind((endpoint.host, endpoint.port))
        grow_buffers(sock)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if interface and exc.errno in (19, 1):  # ENODEV, EPERM
            raise ServiceError(
                f"{service}: cannot use interface {interface}: {exc.strerror}"
            ) from None
        raise BindError(service, endpoint, exc) from None
    return sock


def _fields(outcome: Outcome) -> dict[str, str]:
    """Whom an outcome's lines are about, for `extra=` (keys of their own in JSON logs)."""
    return fields(node=outcome.node, mac=outcome.mac, ip=outcome.ip)


def _returning(protocol: _Protocol) -> Callable[[], _Protocol]:
    return lambda: protocol


@dataclass
class _Request:
    """A datagram waiting for a ping's result, to be handled again."""

    data: bytes
    addr: tuple[Any, ...]
    transport: asyncio.DatagramTransport
    pxe: bool
    probes: int  # pings it has waited for already


@dataclass
class _Pending:
    leases: list[Lease] = field(default_factory=list)
    after: list[Callable[[], None]] = field(default_factory=list)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, service: DhcpService, pxe_port: bool) -> None:
        self.service = service
        self.pxe_port = pxe_port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        assert self.transport is not None
        self.service.on_datagram(data, addr, self.transport, self.pxe_port)

    def error_received(self, exc: Exception) -> None:
        self.service.counters["socket_errors"] += 1


class DhcpService:
    name = "dhcp"

    def __init__(self, ctx: ServiceContext, plan: Plan) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.plan = plan  # the running plan (its dhcp part is the core's)
        self.counters: Counter[str] = Counter()
        self.table = LeaseTable(None)  # the stored leases are loaded in start
        # Pings when the plan wants them; start turns them off if this process may open
        # no ICMP socket (the core then offers unchecked, as the pinger's line says).
        self.core = DhcpCore(
            plan.dhcp, self.table, plan.listen["dhcp"].port, self.counters, plan.dhcp.ping_wait > 0
        )
        endpoint = plan.listen["dhcp"]
        # proxyDHCP listens on the PXE port too.
        self.endpoints: tuple[Endpoint, ...] = (endpoint,) + (
            (Endpoint(endpoint.host, PXE_PORT),) if plan.dhcp.mode == "proxy" else ()
        )
        self.transports: list[asyncio.DatagramTransport] = []
        self.tasks = TaskSet(self.log, "dhcp task")  # committer, sweeper, stranger writer
        self.probes = TaskSet(self.log, "dhcp ping")  # pool addresses being pinged
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dhcp-leases")
        # Our own connection while running (start opens it), used only in the executor.
        self.store: DhcpStore | None = None
        self.pending = _Pending()
        self.wake = asyncio.Event()
        self._locked_since: float | None = None  # monotonic: since a commit found a lock
        self.strangers = Strangers()
        self.busy_log = RateLimitedLog(self.log, every=STRANGER_WARN_EVERY)
        self.errors_log = RateLimitedLog(self.log, every=ERROR_LOG_EVERY)
        self.stranger_wake = asyncio.Event()
        # Sockets of their own, opened in start (a reload turns the pinger on or off).
        self.pinger: Pinger | None = None
        self.arp: ArpCache | None = None
        self.probing: dict[IPv4Address, _Request] = {}  # address -> the latest request

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        plan = self.plan
        loop = asyncio.get_running_loop()
        # Our own connection, from the daemon's store (the seam a test or another store
        # plugs into): used only in our executor.
        self.store = await loop.run_in_executor(
            self.executor, self.ctx.store.open_leases, plan.state_dir, LEASE_BUSY_MS
        )
        leases = await loop.run_in_executor(self.executor, self.store.leases)
        self.table.load(_lease_to_binding(lease) for lease in leases)
        self._open_pinger(plan)
        self.core.probing = self.core.probing and self.pinger is not None
        if plan.dhcp.mode == "server":  # proxyDHCP replies carry no address to unicast to
            self.arp = ArpCache(plan.dhcp.interface, self.log)
        socks = []
        try:
            for ep in self.endpoints:
                socks.append(_dhcp_socket(self.name, ep, plan.dhcp.interface))
        except ServiceError:
            for s in socks:
                s.close()
            raise
        for i, sock in enumerate(socks):
            protocol = _Protocol(self, pxe_port=i == 1)
            transport, _ = await loop.create_datagram_endpoint(_returning(protocol), sock=sock)
            self.transports.append(transport)
        self.tasks.spawn(self._committer(), name="dhcp-commit")
        self.tasks.spawn(self._sweeper(), name="dhcp-sweep")
        self.tasks.spawn(self._stranger_writer(), name="dhcp-strangers")
        self.log.info(
            "%s mode, %d reservations, %s, %d leases loaded",
            plan.dhcp.mode,
            len(plan.dhcp.reservations),
            f"pool {plan.dhcp.pool[0]}-{plan.dhcp.pool[1]}" if plan.dhcp.pool else "no pool",
            len(leases),
        )

    async def reload(self, plan: Plan) -> None:
        if plan.dhcp.mode != self.core.plan.mode or plan.dhcp.interface != self.core.plan.interface:
            raise ServiceError("dhcp: changing dhcp_mode or interface needs a restart")
        self._open_pinger(plan)
        self.core = DhcpCore(
            plan.dhcp, self.table, self.core.server_port, self.counters, self.pinger is not None
        )
        self.plan = plan

    def _open_pinger(self, plan: Plan) -> None:
        if plan.dhcp.ping_wait > 0 and self.pinger is None:
            self.pinger = Pinger.open(plan.dhcp.interface, self.log)
        elif plan.dhcp.ping_wait == 0 and self.pinger is not None and not self.probing:
            self.pinger.close()  # turned off by a reload (probes in flight keep it open)
            self.pinger = None

    async def stop(self) -> None:
        for transport in self.transports:
            transport.close()
        self.transports.clear()
        await self.probes.close()
        if self.pinger is not None:
            self.pinger.close()
            self.pinger = None
        if self.arp is not None:
            self.arp.close()
        await self.tasks.close()
        # Decided leases still reach the disk (their ACKs are not sent), waiting a bounded
        # time for a lock another process holds.
        deadline = time.monotonic() + STOP_COMMIT_WAIT
        while not await self._flush() and time.monotonic() < deadline:
            await asyncio.sleep(COMMIT_RETRY_FIRST)
        if self.pending.leases:
            self.log.error(
                "%d decided leases not stored at the stop: the state file stayed locked",
                len(self.pending.leases),
            )
        sightings, lost = self.strangers.take()
        notes = [UnknownMachine(*dataclasses.astuple(n)) for n in sightings]
        if (notes or lost) and self.store is not None:
            with contextlib.suppress(Exception):  # a record only: stopping goes on
                await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.store.note_unknowns, notes, UNKNOWN_MACHINES_KEEP, lost
                )
        if self.store is not None:
            store, self.store = self.store, None
            await asyncio.get_running_loop().run_in_executor(self.executor, store.close)
        self.executor.shutdown(wait=True)

    def status(self) -> DhcpStatus:
        now = time.time()
        bound = sum(1 for b in self.table.by_mac.values() if b.state == "bound" and b.expires > now)
        return DhcpStatus(
            counters=dict(self.counters),
            leases_bound=bound,
            unknown_machines=len(self.strangers.last_noted),
        )

    # --- packets ----------------------------------------------------------------------

    def on_datagram(
        self, data: bytes, addr: tuple[Any, ...], transport: asyncio.DatagramTransport, pxe: bool
    ) -> None:
        if not self.ctx.runtime.leading:
            # An HA member that just stepped down, its stop under way: the new leader
            # answers; two servers offering from one pool is what HA must never do.
            self.counters["not_leader"] += 1
            return
        self._handle(_Request(data, addr, transport, pxe, 0))

    def _handle(self, req: _Request) -> None:
        now = time.time()
        addr, transport = req.addr, req.transport
        try:
            outcome = self.core.handle(
                req.data, (addr[0], addr[1]), now, pxe_port=req.pxe, probes=req.probes
            )
        except Exception:  # a bug must cost one packet, never the service
            self.counters["errors"] += 1
            self.errors_log.exception("packet", "error handling a packet from %s", addr[0])
            return
        if outcome.log and self.log.isEnabledFor(logging.DEBUG):  # no fields built for nothing
            self.log.debug("%s", outcome.log, extra=_fields(outcome))
        if outcome.warning:
            self.log.warning("%s", outcome.warning, extra=_fields(outcome))
        if outcome.unknown is not None:
            self._note_unknown(outcome.unknown, now)
        if outcome.probe is not None:
            self._probe(outcome.probe, req)
            return

        def send() -> None:
            self._send(outcome, transport)

        if outcome.commit:
            if len(self.pending.after) >= PENDING_MAX:
                # The file has been locked for long, and a flood of REQUESTs must not grow
                # memory: this reply is dropped (nothing was promised; the client asks again).
                self.counters["commit_backlog_full"] += 1
                return
            self.pending.leases.extend(_binding_to_lease(b, now) for b in outcome.commit)
            self.pending.after.append(send)
            self.wake.set()
        else:
            send()

    def _probe(self, ip: IPv4Address, req: _Request) -> None:
        if self.pinger is None:  # cannot happen: a core without a pinger never asks
            return
        busy = ip in self.probing
        self.probing[ip] = req  # a retransmitted DISCOVER: the newest one is answered
        if busy:
            return
        self.probes.spawn(self._ping(ip), name=f"dhcp-ping {ip}")

    async def _ping(self, ip: IPv4Address) -> None:
        assert self.pinger is not None
        self.counters["ping_checks"] += 1
        try:
            answered = await self.pinger.probe(ip, self.core.plan.ping_wait)
        except Exception:
            self.log.exception("ping check of %s failed: offering it unchecked", ip)
            answered = False
        finally:
            req = self.probing.pop(ip, None)
        if req is None:
            return
        line = self.core.probed(ip, answered, time.time())
        if answered:
            self.log.warning("%s", line, extra=fields(ip=ip))
        else:
            self.log.debug("%s", line, extra=fields(ip=ip))
        req.probes += 1
        self._handle(req)

    def _send(self, outcome: Outcome, transport: asyncio.DatagramTransport) -> None:
        for out in outcome.replies:
            self._sendto(transport, out)
        for node, stage, detail in outcome.events:
            self.ctx.bus.publish(node, stage, detail, source="dhcp")

    def _sendto(self, transport: asyncio.DatagramTransport, out: Outgoing) -> None:
        if transport.is_closing():
            return
        host = out.host
        if out.hwaddr is not None:  # unicast to a client without an address (RFC 2131 4.1)
            if self.arp is not None and self.arp.teach(IPv4Address(host), out.hwaddr):
                self.counters["unicast_arp"] += 1
            else:
                host = BROADCAST
                self.counters["unicast_as_broadcast"] += 1
        try:
            transport.sendto(out.data, (host, out.port))
            self.counters["sent"] += 1
        except OSError:
            self.counters["send_errors"] += 1

    def _note_unknown(self, info: ClientInfo, now: float) -> None:
        evicted = self.strangers.evicted
        line = self.strangers.seen(info, now)
        if len(self.strangers.pending) >= UNKNOWN_WRITE_BATCH:
            self.stranger_wake.set()  # a flood: write now rather than drop sightings
        self.counters["unknown_evicted"] += self.strangers.evicted - evicted
        if line:
            self.log.warning("%s", line, extra=fields(mac=info.mac))

    async def _stranger_writer(self) -> None:
        """Unknown machines reach the store in one transaction a second, never one
        write per packet (a random-MAC flood must not queue work behind the leases)."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(UNKNOWN_WRITE_EVERY):
                    await self.stranger_wake.wait()
            self.stranger_wake.clear()
            line = self.strangers.tick(time.time())
            if line:
                self.log.warning("%s", line)
            sightings, lost = self.strangers.take()
            notes = [UnknownMachine(*dataclasses.astuple(n)) for n in sightings]
            if not (notes or lost) or self.store is None:
                continue
            try:
                evicted = await loop.run_in_executor(
                    self.executor, self.store.note_unknowns, notes, UNKNOWN_MACHINES_KEEP, lost
                )
            except StoreUnavailable as exc:  # locked (an operator's sqlite3 shell), disk full
                self.counters["unknown_write_failures"] += 1
                self.strangers.put_back(sightings, lost)  # they wait for the next round
                self.busy_log.warning(
                    "busy", "unknown machines wait in memory: the state file is busy (%s)", exc
                )
                continue
            except Exception:  # a record, not state: the next sightings try again
                self.counters["unknown_write_failures"] += 1
                self.log.exception("could not store %d unknown machines", len(notes))
                continue
            self.counters["unknown_rows_evicted"] += evicted

    # --- group commit -----------------------------------------------------------------

    async def _committer(self) -> None:
        delay = COMMIT_RETRY_FIRST
        while True:
            await self.wake.wait()
            self.wake.clear()
            if await self._flush():
                delay = COMMIT_RETRY_FIRST
                continue
            # Locked: the batch is back in pending (new leases join it); try again soon.
            await asyncio.sleep(delay)
            delay = min(delay * 2, COMMIT_RETRY_MAX)
            self.wake.set()

    def _give_back(self, batch: _Pending) -> None:
        self.pending.leases[:0] = batch.leases
        self.pending.after[:0] = batch.after

    async def _flush(self) -> bool:
        """Store the pending leases, then send their replies; False when the file was
        locked (the batch waits in pending for the next try)."""
        batch, self.pending = self.pending, _Pending()
        if not batch.leases or self.store is None:
            return True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self.store.save_leases, batch.leases)
        except asyncio.CancelledError:
            # stop() cancelled the committer mid-commit: give the batch back, so stop's
            # own flush writes it (the upsert is idempotent if this write went through).
            self._give_back(batch)
            raise
        except StoreBusy:  # locked: anything else is a failed commit (below)
            self._give_back(batch)
            self.counters["commit_busy"] += 1
            if self._locked_since is None:
                self._locked_since = time.monotonic()
                self.log.warning(
                    "the state file is locked by another process: %d leases wait, their "
                    "ACKs leave once they are on disk",
                    len(self.pending.leases),
                )
            return False
        except LeaseConflict as exc:
            return self._conflict(batch, exc)
        except Exception:
            return self._commit_failed(batch)
        if self._locked_since is not None:
            self.log.info(
                "the state file is writable again after %.1f s: %d leases stored",
                time.monotonic() - self._locked_since,
                len(batch.leases),
            )
            self._locked_since = None
        self.counters["commits"] += 1
        self.counters["leases_committed"] += len(batch.leases)
        for send in batch.after:
            send()
        return True

    def _commit_failed(self, batch: _Pending) -> bool:
        # Not on disk, so not promised: the clients ask again and we try again.
        self.counters["commit_failures"] += 1
        self.errors_log.exception(
            "commit", "could not store %d leases; ACKs withheld", len(batch.leases)
        )
        return True

    def _conflict(self, batch: _Pending, exc: LeaseConflict) -> bool:
        # A shared store (etcd) refused addresses another member holds: not stored, so
        # not promised. The batch's ACKs are withheld (the rest of it is stored: those
        # clients are ACKed when they ask again); the table forgets its bindings of the
        # refused addresses and learns their holders, so they are not offered again.
        self.counters["lease_conflicts"] += max(1, len(exc.refused))
        self.table.load(_lease_to_binding(holder) for holder in exc.holders)
        self.errors_log.warning(
            "conflict", "%s: %d ACKs withheld (the clients ask again)", exc, len(batch.leases)
        )
        return True

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            self.table.expire(time.time())
