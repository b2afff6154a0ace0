"""An HA pair's member, as the supervisor runs it: etcd, the shared store, the elector.

With the inventory's `ha` block, every member serves DNS, TFTP, HTTP and the load
balancer's listeners (floating addresses bound with IP_FREEBIND); the elected leader holds
the floating addresses and runs DHCP and the cluster loop. The supervisor owns which
services run; this module owns the parts that only an HA member has:

- the etcd client (one, shared by the store and the elector; each uses its own threads);
- the state store over etcd (`DaemonStore.open_etcd`), re-read on takeover and
  periodically, so one member's install marks and admin states reach the other;
- the elector, which holds or drops the floating addresses and calls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from appliance.etcd import EtcdClient
from appliance.etcdstore import EtcdStore
from appliance.ha.elector import Elector, ElectorStatus
from appliance.ha.floating import Floating, address_lifetime
from appliance.hostinfo import local_ipv4_addresses as local_addresses
from appliance.plan import HaMember, HaPlan, MemberError, choose_member
from appliance.status import Family, ServiceStatus, counter, gauge
from appliance.store import StoreError
from appliance.storequeue import DaemonStore

log = logging.getLogger("appliance.ha")

COMPACT_EVERY = 600.0  # seconds between the leader's compactions of etcd's history
ETCD_TIMEOUT_MAX = 2.0  # seconds per etcd request, at most (a third of the ttl when shorter)


class HaMode:
    def __init__(
        self, ha: HaPlan, member: HaMember, client: EtcdClient, store: DaemonStore
    ) -> None:
        self.plan = ha
        self.member = member
        self.client = client
        self.store = store
        self.elector: Elector | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._health: asyncio.Task[None] | None = None
        self.health: dict[str, str | None] = {ep: None for ep in ha.endpoints}

    @classmethod
    async def open(cls, ha: HaPlan, flag: str | None) -> HaMode:
        """Which member this is, then etcd: it must answer (a clear error when no
        endpoint does), then the shared state is read."""
        try:
            local = await asyncio.to_thread(local_addresses)
            member = choose_member(ha, flag, os.environ, local)
        except MemberError as exc:
            raise StoreError(f"ha: {exc}") from None
        client = EtcdClient(
            ha.endpoints,
            ca_file=ha.ca_file,
            cert_file=ha.cert_file,
            key_file=ha.key_file,
            timeout=min(ETCD_TIMEOUT_MAX, ha.lease_ttl / 3),
            observe=_observe,
        )
        health = await asyncio.to_thread(client.health)
        if all(err is not None for err in health.values()):
            client.close()
            said = "; ".join(f"{ep}: {err}" for ep, err in health.items())
            raise StoreError(f"ha: etcd does not answer at any endpoint ({said})")
        for ep, err in health.items():
            if err is not None:
                log.warning("etcd member %s does not answer: %s", ep, err)
        try:
            store = await asyncio.to_thread(DaemonStore.open_etcd, client, ha.prefix)
        except BaseException:
            client.close()
            raise
        log.info(
            "HA member %s (%s) of %s; etcd %s, prefix %s, lease %d s",
            member.name,
            member.address,
            ", ".join(m.name for m in ha.members),
            ", ".join(ha.endpoints),
            ha.prefix,
            ha.lease_ttl,
        )
        mode = cls(ha, member, client, store)
        mode.health = health
        return mode

    def start(
        self,
        on_lead: Callable[[], Awaitable[None]],
        on_follow: Callable[[str], Awaitable[None]],
        refresh: Callable[[], Awaitable[None]],
    ) -> None:
        ha = self.plan
        # The kernel drops the addresses a little before etcd could hand the lease on.
        lifetime = address_lifetime(ha.lease_ttl)
        floating = Floating(ha.interface, ha.floating, ha.prefixlen, lifetime=lifetime)
        self.elector = Elector(ha, self.member, self.client, floating, on_lead, on_follow, log)
        self.elector.start()
        loop = asyncio.get_running_loop()
        self._refresher = loop.create_task(self._refresh_loop(refresh), name="ha-refresh")
        self._health = loop.create_task(self._health_loop(), name="ha-health")

    async def _refresh_loop(self, refresh: Callable[[], Awaitable[None]]) -> None:
        every = max(1.0, float(self.plan.lease_ttl))
        compacted = time.monotonic()
        while True:
            await asyncio.sleep(every)
            try:
                if self.leading() and time.monotonic() - compacted > COMPACT_EVERY:
                    # etcd keeps every version of every key until compacted: the leader
                    # trims the history (not the values) now and then.
                    compacted = time.monotonic()
                    history = EtcdStore(self.client, self.plan.prefix)
                    await asyncio.to_thread(history.compact_history)
                await refresh()
            except StoreError as exc:  # etcd away: the next round tries again
                log.warning("could not re-read the shared state: %s", exc)
            except Exception:
                log.exception("re-reading the shared state failed")

    def leading(self) -> bool:
        """What the elector says now (a fence flips it before any callback runs)."""
        return self.elector is not None and self.elector.leading

    async def refresh_store(self) -> None:
        await self.store.refresh()  # in the store's reader thread

    async def stop(self) -> None:
        """Step down (addresses dropped, the lease revoked) and stop re-reading."""
        for task in (self._refresher, self._health):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresher = self._health = None
        if self.elector is not None:
            await self.elector.stop()

    async def close(self) -> None:
        await self.stop()
        await asyncio.to_thread(self.client.close)

    def status(self) -> ServiceStatus:
        if self.elector is None:
            raise RuntimeError("the HA member has not started")
        return HaStatus(self.elector.status(), dict(self.health), LATENCY.snapshot())

    async def _health_loop(self) -> None:
        """Each etcd member's health for the status (a status call and a read each)."""
        while True:
            try:
                self.health = await asyncio.to_thread(self.client.health)
            except Exception as exc:  # the status says it; the next round tries again
                self.health = {ep: f"health check failed: {exc}" for ep in self.plan.endpoints}
            await asyncio.sleep(HEALTH_EVERY)


HEALTH_EVERY = 10.0  # seconds between health reads of every etcd member


@dataclass(frozen=True)
class HaStatus:
    """The API's `ha` section and its metrics: the election, etcd's members, latency."""

    election: ElectorStatus
    endpoints: dict[str, str | None]  # endpoint -> None (healthy) or why not
    latency: dict[str, tuple[int, float, int]]  # operation -> (count, seconds, failures)

    def to_json(self) -> dict[str, Any]:
        out = self.election.to_json()
        out["etcd"]["endpoints"] = {
            ep: {"healthy": err is None, "error": err} for ep, err in self.endpoints.items()
        }
        out["etcd"]["latency_ms"] = {
            op: {"count": n, "mean": round(1000 * total / n, 3) if n else None, "failures": bad}
            for op, (n, total, bad) in sorted(self.latency.items())
        }
        return out

    def metrics(self) -> Iterator[Family]:
        yield from self.election.metrics()
        yield gauge(
            "ha_etcd_endpoint_up",
            "1 when the etcd member answered its last health read",
            labels=("endpoint",),
            samples=[((ep,), int(err is None)) for ep, err in sorted(self.endpoints.items())],
        )
        ops = sorted(self.latency)
        yield counter(
            "etcd_request_seconds",
            "Seconds spent in etcd requests that succeeded, by operation (with etcd_requests: "
            "the mean latency)",
            labels=("operation",),
            samples=[((op,), self.latency[op][1]) for op in ops],
        )
        yield counter(
            "etcd_requests",
            "etcd requests by operation and result",
            labels=("operation", "result"),
            samples=[((op, "ok"), self.latency[op][0]) for op in ops]
            + [((op, "failed"), self.latency[op][2]) for op in ops],
        )


# --- etcd latency, for the metrics -------------------------------------------------------

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EtcdLatency:
    """A histogram of etcd request times by operation, and failures (thread-safe enough:
    each bump is one dict update under the GIL)."""

    def __init__(self) -> None:
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.last_failure: float | None = None

    def snapshot(self) -> dict[str, tuple[int, float, int]]:
        ops = set(self.counts) | set(self.failures)
        return {
            op: (self.counts.get(op, 0), self.sums.get(op, 0.0), self.failures.get(op, 0))
            for op in ops
        }

    def observe(self, op: str, seconds: float, ok: bool) -> None:
        if not ok:
            self.failures[op] = self.failures.get(op, 0) + 1
            self.last_failure = time.time()
            return
        row = self.buckets.setdefault(op, [0] * (len(LATENCY_BUCKETS) + 1))
        i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
        row[i] += 1
        self.sums[op] = self.sums.get(op, 0.0) + seconds
        self.counts[op] = self.counts.get(op, 0) + 1


LATENCY = EtcdLatency()


def _observe(op: str, seconds: float, ok: bool) -> None:
    LATENCY.observe(op, seconds, ok)
