"""The dhcp service: UDP sockets, the group committer, and the core's decisions.

An ACK is sent only after its lease is on disk. Leases decided while the disk
was busy are written together in one transaction (one fsync), then their ACKs
leave: the throughput of a batch, the durability of one write per lease.

A pool address is pinged before its first offer when the core asks (Outcome.probe):
the DISCOVER waits meanwhile and is handled again with the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from appliance.inventory import Endpoint
from appliance.plan import Plan
from appliance.service import BindError, ServiceContext, ServiceError, grow_buffers
from appliance.store import Lease, Store
from services.dhcp.arp import ArpCache
from services.dhcp.leases import Binding, LeaseTable
from services.dhcp.ping import Pinger
from services.dhcp.policy import BROADCAST, ClientInfo, DhcpCore, Outcome, Outgoing

PXE_PORT = 4011  # proxyDHCP boot server port
SWEEP_EVERY = 30.0  # seconds between expiry sweeps of offers and quarantines
UNKNOWN_NOTE_EVERY = 60.0  # write an unknown machine to the store at most this often


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

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.counters: Counter[str] = Counter()
        self.table = LeaseTable(None)
        self.core: DhcpCore
        self.transports: list[asyncio.DatagramTransport] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dhcp-leases")
        self.store: Store | None = None  # our own connection, used only in the executor
        self.pending = _Pending()
        self.wake = asyncio.Event()
        self.unknown_seen: dict[str, float] = {}
        self.endpoints: tuple[Endpoint, ...] = ()
        self.pinger: Pinger | None = None
        self.arp: ArpCache | None = None
        self.probing: dict[IPv4Address, _Request] = {}  # address -> the latest request
        self.probe_tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, plan: Plan) -> None:
        loop = asyncio.get_running_loop()
        self.store = await loop.run_in_executor(self.executor, Store.open, plan.state_dir)
        leases = await loop.run_in_executor(self.executor, self.store.leases)
        self.table.load(_lease_to_binding(lease) for lease in leases)
        self._open_pinger(plan)
        if plan.dhcp.mode == "server":  # proxyDHCP replies carry no address to unicast to
            self.arp = ArpCache(plan.dhcp.interface, self.log)
        self.core = DhcpCore(
            plan.dhcp, self.table, plan.listen["dhcp"].port, self.counters, self.pinger is not None
        )
        endpoint = plan.listen["dhcp"]
        eps = [endpoint]
        if plan.dhcp.mode == "proxy":
            eps.append(Endpoint(endpoint.host, PXE_PORT))
        socks = []
        try:
            for ep in eps:
                socks.append(_dhcp_socket(self.name, ep, plan.dhcp.interface))
        except ServiceError:
            for s in socks:
                s.close()
            raise
        for i, sock in enumerate(socks):
            protocol = _Protocol(self, pxe_port=i == 1)
            transport, _ = await loop.create_datagram_endpoint(_returning(protocol), sock=sock)
            self.transports.append(transport)
        self.endpoints = tuple(eps)
        self.tasks.append(loop.create_task(self._committer(), name="dhcp-commit"))
        self.tasks.append(loop.create_task(self._sweeper(), name="dhcp-sweep"))
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
        for probe in list(self.probe_tasks):
            probe.cancel()
        for probe in list(self.probe_tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        if self.pinger is not None:
            self.pinger.close()
            self.pinger = None
        if self.arp is not None:
            self.arp.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()
        await self._flush()  # decided leases still reach the disk (their ACKs are not sent)
        if self.store is not None:
            store, self.store = self.store, None
            await asyncio.get_running_loop().run_in_executor(self.executor, store.close)
        self.executor.shutdown(wait=True)

    def status(self) -> dict[str, Any]:
        now = time.time()
        bound = sum(1 for b in self.table.by_mac.values() if b.state == "bound" and b.expires > now)
        return {
            "counters": dict(self.counters),
            "leases_bound": bound,
            "unknown_machines": len(self.unknown_seen),
        }

    # --- packets ----------------------------------------------------------------------

    def on_datagram(
        self, data: bytes, addr: tuple[Any, ...], transport: asyncio.DatagramTransport, pxe: bool
    ) -> None:
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
            self.log.exception("error handling a packet from %s", addr[0])
            return
        if outcome.log:
            self.log.debug("%s", outcome.log)
        if outcome.warning:
            self.log.warning("%s", outcome.warning)
        if outcome.unknown is not None:
            self._note_unknown(outcome.unknown, now)
        if outcome.probe is not None:
            self._probe(outcome.probe, req)
            return

        def send() -> None:
            self._send(outcome, transport)

        if outcome.commit:
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
        task = asyncio.get_running_loop().create_task(self._ping(ip), name=f"dhcp-ping {ip}")
        self.probe_tasks.add(task)
        task.add_done_callback(self.probe_tasks.discard)

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
            self.log.warning("%s", line)
        else:
            self.log.debug("%s", line)
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
        last = self.unknown_seen.get(info.mac)
        if last is None:
            self.log.warning(
                "unknown machine %s is network-booting (%s): not in the inventory",
                info.mac,
                info.describe(),
            )
        if last is not None and now - last < UNKNOWN_NOTE_EVERY:
            return
        self.unknown_seen[info.mac] = now
        store = self.store
        if store is not None:
            arch = "" if info.arch is None else str(info.arch)
            self.executor.submit(
                store.note_unknown,
                info.mac,
                now,
                vendor_class=info.vendor_class,
                arch=arch,
                user_class=info.user_class,
                hostname=info.hostname,
            )

    # --- group commit -----------------------------------------------------------------

    async def _committer(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        batch, self.pending = self.pending, _Pending()
        if not batch.leases or self.store is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self.store.save_leases, batch.leases)
        except asyncio.CancelledError:
            # stop() cancelled the committer mid-commit: give the batch back, so stop's
            # own flush writes it (the upsert is idempotent if this write went through).
            self.pending.leases[:0] = batch.leases
            self.pending.after[:0] = batch.after
            raise
        except Exception:
            # Not on disk, so not promised: the clients ask again and we try again.
            self.counters["commit_failures"] += 1
            self.log.exception("could not store %d leases; ACKs withheld", len(batch.leases))
            return
        self.counters["commits"] += 1
        self.counters["leases_committed"] += len(batch.leases)
        for send in batch.after:
            send()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            self.table.expire(time.time())
