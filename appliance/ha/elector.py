"""The election's asyncio shell: runs the core's etcd calls, holds or drops the addresses.

The decisions are appliance/ha/leadership.py's; this module moves them to the world:
- etcd calls on a thread of their OWN (one, so one call at a time, in order): traffic of
  the shared store never delays a keepalive. Each call's send time is read on that thread
  just before the request goes, and its return time on the loop when the answer lands.
- one timer: the core's (the next call, or the fence while leading).
- the floating addresses on another thread of their own, so a hung etcd call never
  delays dropping them. Elected: the addresses are added, announced (gratuitous ARP,
  three rounds 0.2 s apart), then `on_lead()`. Stepping down: the addresses go first,
  then `on_follow(reason)`; the old lease is revoked only after they are gone, so the
  next leader cannot add them while they are still here. After every keepalive that
  renews the lease the addresses' kernel lifetimes are renewed as well.
- at start, floating addresses left on the interface by an earlier run are removed
  before the first campaign.
- `on_lead`/`on_follow` run one after the other on a task of their own, in the order of
  the transitions: a slow take-over never holds up a keepalive or a fence.
- `stop()`: step down (addresses dropped, lease revoked: the other member takes over at
  once); `on_follow` is not called (the caller is stopping everything anyway).
- a bug in the loop steps down as a fence would (addresses, `on_follow("error")`, a
  best-effort revoke) rather than leave a leader nobody renews.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.etcd import KV, Compare, EtcdClient, EtcdError, Get, Put, RangeResult
from appliance.ha.floating import FloatingError
from appliance.ha.leadership import (
    Action,
    BecameLeader,
    Campaign,
    Grant,
    KeepAlive,
    LeaderChanged,
    Leadership,
    ReadLeader,
    SteppedDown,
)
from appliance.haplan import HaMember, HaPlan
from appliance.status import Family, counter, gauge, ordered

GARP_ROUNDS = 3
GARP_INTERVAL = 0.2
STOP_TIMEOUT = 5.0  # stop(): at most this long for the revoke and a running callback
REASONS = ("fenced", "lease lost", "stopping")  # SteppedDown reasons
UNREADABLE = "(unreadable)"  # the leader key holds something that is not ours


class Addresses(Protocol):
    """What the elector needs of appliance.ha.floating.Floating (blocking calls)."""

    addresses: tuple[str, ...]

    def hold(self) -> None: ...
    def release(self) -> list[str]: ...
    def announce(self, rounds: int = 3, interval: float = 0.1) -> int: ...


@dataclass(frozen=True)
class ElectorStatus:
    """The member's view of the election: the API's `ha` section and its metrics."""

    member: str
    address: str
    members: tuple[str, ...]
    leader: str | None
    leading: bool
    since: float | None  # unix time this member became leader
    last_keepalive: float | None  # unix time of the last keepalive that renewed the lease
    etcd_ok: bool
    etcd_error: str | None
    changes: int  # leader changes seen by this member
    elected: int  # times this member became leader
    step_downs: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    floating: tuple[str, ...] = ()
    floating_error: str | None = None
    lease_ttl: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "address": self.address,
            "members": list(self.members),
            "leader": self.leader,
            "leading": self.leading,
            "since": self.since,
            "last_keepalive": self.last_keepalive,
            "etcd": {"ok": self.etcd_ok, "error": self.etcd_error},
            "leader_changes": self.changes,
            "elected": self.elected,
            "step_downs": dict(self.step_downs),
            "floating": list(self.floating),
            "floating_error": self.floating_error,
            "lease_ttl": self.lease_ttl,
        }

    def metrics(self) -> Iterator[Family]:
        yield gauge("ha_leader", "1 while this member leads the HA pair", int(self.leading))
        yield counter(
            "ha_leader_changes", "Leader changes this member has seen (etcd's key)", self.changes
        )
        yield counter("ha_elected", "Times this member became the leader", self.elected)
        yield counter(
            "ha_step_downs",
            "Times this member stopped leading, by reason",
            labels=("reason",),
            samples=[((r,), self.step_downs.get(r, 0)) for r in ordered(REASONS, self.step_downs)],
        )
        yield gauge(
            "ha_etcd_up", "1 when the last etcd call of the election succeeded", int(self.etcd_ok)
        )


async def _call(callback: Callable[[], Awaitable[None]]) -> None:
    await callback()


def _holder(kv: KV | None) -> str | None:
    if kv is None:
        return None
    try:
        value = json.loads(kv.value)
        member = value.get("member") if isinstance(value, dict) else None
    except ValueError:
        member = None
    # Someone else's value holds the key all the same: wait for it like for a leader.
    return member if isinstance(member, str) and member else UNREADABLE


class Elector:
    def __init__(
        self,
        ha: HaPlan,
        member: HaMember,
        client: EtcdClient,
        floating: Addresses,
        on_lead: Callable[[], Awaitable[None]],
        on_follow: Callable[[str], Awaitable[None]],
        log: logging.Logger,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ha = ha
        self.member = member
        self.client = client
        self.floating = floating
        self.on_lead = on_lead
        self.on_follow = on_follow
        self.log = log
        self.clock = clock
        self.key = f"{ha.prefix}/leader".encode()
        self.core = Leadership(member.name, ha.lease_ttl, clock())
        self.wall_offset = time.time() - clock()  # for the times people read
        self.elected = 0
        self.step_downs: Counter[str] = Counter()
        self.floating_error: str | None = None
        self._etcd = ThreadPoolExecutor(1, thread_name_prefix="ha-etcd")
        self._addr = ThreadPoolExecutor(1, thread_name_prefix="ha-addr")
        self._wake = asyncio.Event()
        self._call: asyncio.Future[tuple[float, object]] | None = None
        self._action: Action | None = None  # what _call runs
        self._task: asyncio.Task[None] | None = None
        self._garp: asyncio.Task[None] | None = None
        self._callbacks: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._current: asyncio.Task[None] | None = None  # the callback running
        self._last_error: str | None = None  # logged once per change
        self._stopping = False

    # --- the caller's side ----------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.core.leading

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="ha-elector")
        self._worker = loop.create_task(self._run_callbacks(), name="ha-callbacks")

    async def stop(self) -> None:
        """Step down for good: addresses dropped, then the lease revoked; bounded."""
        if self._stopping:
            return
        self._stopping = True
        self.core.stop(self.clock())
        self._wake.set()
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT)
            except TimeoutError:
                # An etcd call hangs (etcd away): the lease then expires by itself.
                self.log.warning("etcd did not answer the revoke in time; the lease expires")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await self._release()  # in case the loop was cancelled before it ran
        # Callbacks not started are dropped (the caller stops everything); one running (a
        # take-over half done) is let finish, bounded, so no service is left half started.
        while not self._callbacks.empty():
            self._callbacks.get_nowait()
        if self._current is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._current), STOP_TIMEOUT)
        for t in (self._garp, self._worker):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        self._etcd.shutdown(wait=False, cancel_futures=True)
        self._addr.shutdown(wait=False, cancel_futures=True)

    def status(self) -> ElectorStatus:
        core = self.core
        return ElectorStatus(
            member=self.member.name,
            address=self.member.address,
            members=tuple(m.name for m in self.ha.members),
            leader=core.leader,
            leading=core.leading,
            since=None if core.since is None else core.since + self.wall_offset,
            last_keepalive=(
                None if core.last_keepalive is None else core.last_keepalive + self.wall_offset
            ),
            etcd_ok=core.etcd_error is None,
            etcd_error=core.etcd_error,
            changes=core.changes,
            elected=self.elected,
            step_downs=dict(self.step_downs),
            floating=self.floating.addresses,
            floating_error=self.floating_error,
            lease_ttl=self.ha.lease_ttl,
        )

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # Addresses left by a crashed run (its kernel lifetime may not be over yet).
        try:
            removed = await loop.run_in_executor(self._addr, self.floating.release)
            if removed:
                self.log.warning(
                    "removed floating addresses left by an earlier run: %s", ", ".join(removed)
                )
        except FloatingError as exc:
            self.floating_error = str(exc)
            self.log.error("floating addresses: %s", exc)
        core = self.core
        try:
            while not core.done:
                core.handle_timer(self.clock())
                await self._transitions()
                if self._call is None:
                    action = core.next_action(self.clock())
                    if action is not None:
                        call = loop.run_in_executor(self._etcd, self._perform, action)
                        call.add_done_callback(lambda _f: self._wake.set())
                        self._call, self._action = call, action
                if self._call is not None and self._call.done():
                    assert self._action is not None
                    outcome, action = self._call.result(), self._action
                    self._call = self._action = None
                    await self._report(outcome, action)
                    continue
                timer = core.get_timer()
                delay = None if timer is None else max(0.0, timer - self.clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                self._wake.clear()
        except Exception:
            # A bug here must not leave this member serving as the leader with nobody
            # renewing: drop the addresses and tell the caller, as for a fence.
            self.log.exception("the election loop failed; stepping down")
            was_leading = core.leading
            lease = core.lease
            core.stop(self.clock())
            core.transitions()
            await self._release()
            if was_leading:
                self.step_downs["error"] += 1
                self._callbacks.put_nowait(functools.partial(self.on_follow, "error"))
            if lease is not None:  # best effort: the other member need not wait for expiry
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(self._etcd, self.client.lease_revoke, lease)
        finally:
            if self._call is not None:
                self._call.cancel()  # a thread already running it finishes on its own

    async def _report(self, outcome: tuple[float, object], action: Action) -> None:
        sent, result = outcome
        core, now = self.core, self.clock()
        if isinstance(result, Exception):
            error = result.message if isinstance(result, EtcdError) else repr(result)
            core.failed(action, error, sent, now)
            if error != self._last_error:
                self.log.warning("etcd: %s failed: %s", type(action).__name__, error)
        elif isinstance(action, Grant):
            assert isinstance(result, tuple)
            lease, ttl = result
            core.granted(action, int(lease), int(ttl), sent, now)
        elif isinstance(action, Campaign):
            assert isinstance(result, tuple)
            won, holder = result
            if won:
                core.campaign_won(action, sent, now)
            else:
                core.campaign_lost(action, holder if isinstance(holder, str) else None, sent, now)
        elif isinstance(action, ReadLeader):
            core.leader_seen(action, result if isinstance(result, str) else None, sent, now)
        elif isinstance(action, KeepAlive):
            assert isinstance(result, int)
            if core.kept(action, result, sent, now):
                self._addresses(self.floating.hold, "renew")
        else:
            core.revoked(action, sent, now)
        if core.etcd_error is None and self._last_error is not None:
            self.log.info("etcd answers again")
        self._last_error = core.etcd_error

    def _perform(self, action: Action) -> tuple[float, object]:
        """On the etcd thread: run one call; (send time, result or the exception)."""
        sent = self.clock()
        client = self.client
        try:
            if isinstance(action, Grant):
                return sent, client.lease_grant(action.ttl)
            if isinstance(action, Campaign):
                value = json.dumps(
                    {
                        "member": self.member.name,
                        "address": self.member.address,
                        "since": time.time(),
                    }
                ).encode()
                txn = client.txn(
                    [Compare(self.key, "CREATE", "EQUAL", 0)],
                    [Put(self.key, value, action.lease)],
                    [Get(self.key)],
                )
                holder = None
                if not txn.succeeded and txn.responses:
                    got = txn.responses[0]
                    if isinstance(got, RangeResult) and got.kvs:
                        holder = _holder(got.kvs[0])
                return sent, (txn.succeeded, holder)
            if isinstance(action, ReadLeader):
                return sent, _holder(client.get(self.key))
            if isinstance(action, KeepAlive):
                ttl = client.lease_keepalive(action.lease)
                if ttl > 0:
                    # A raft leader cut off from its peers still renews leases for a while
                    # (renewal is not replicated). A linearizable read needs a quorum:
                    # only with it does this renewal count, and the key must still be ours.
                    kv = client.get(self.key)
                    if kv is None or kv.lease != action.lease:
                        return sent, 0  # gone or another's: step down now
                return sent, ttl
            client.lease_revoke(action.lease)
            return sent, None
        except Exception as exc:  # every call gets a report: the core waits for one
            return sent, exc

    async def _transitions(self) -> None:
        for t in self.core.transitions():
            if isinstance(t, BecameLeader):
                self.elected += 1
                self.log.warning(
                    "%s leads: holding %s on %s",
                    self.member.name,
                    ", ".join(self.floating.addresses),
                    self.ha.interface,
                )
                await self._hold()
                self._garp = asyncio.get_running_loop().create_task(self._announce())
                self._callbacks.put_nowait(self.on_lead)
            elif isinstance(t, SteppedDown):
                self.step_downs[t.reason] += 1
                if self._garp is not None:
                    self._garp.cancel()
                await self._release()
                self.log.warning("%s stepped down (%s)", self.member.name, t.reason)
                if t.reason != "stopping":
                    self._callbacks.put_nowait(functools.partial(self.on_follow, t.reason))
            elif isinstance(t, LeaderChanged):
                self.log.info("leader: %s", t.name or "none")

    # --- addresses ------------------------------------------------------------------------

    async def _hold(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._addr, self.floating.hold)
            self.floating_error = None
        except FloatingError as exc:
            self.floating_error = str(exc)
            self.log.error("could not add the floating addresses: %s", exc)

    async def _release(self) -> None:
        """Drop the addresses; awaited: the revoke (and the next leader) comes after."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._addr, self.floating.release)
        except FloatingError as exc:
            self.floating_error = str(exc)
            self.log.error("could not remove the floating addresses: %s", exc)
        except RuntimeError:  # the executor is shut down (stop() ran): nothing queued
            pass

    def _addresses(self, fn: Callable[[], object], what: str) -> None:
        """Run fn on the addresses' thread without waiting (a renewal after a keepalive)."""

        def done(f: asyncio.Future[object]) -> None:
            exc = None if f.cancelled() else f.exception()
            if exc is not None:
                if str(exc) != self.floating_error:
                    self.log.error("could not %s the floating addresses: %s", what, exc)
                self.floating_error = str(exc)
            elif not f.cancelled():
                self.floating_error = None

        fut = asyncio.get_running_loop().run_in_executor(self._addr, fn)
        fut.add_done_callback(done)

    async def _announce(self) -> None:
        loop = asyncio.get_running_loop()
        for i in range(GARP_ROUNDS):
            if i:
                await asyncio.sleep(GARP_INTERVAL)
            if not self.core.leading:
                return
            try:
                await loop.run_in_executor(self._addr, lambda: self.floating.announce(1, 0.0))
            except Exception as exc:  # no CAP_NET_RAW, an interface without ARP, ...
                self.log.warning("gratuitous ARP on %s failed: %s", self.ha.interface, exc)
                return

    async def _run_callbacks(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            callback = await self._callbacks.get()
            self._current = loop.create_task(_call(callback), name="ha-callback")
            try:
                await asyncio.shield(self._current)
            except Exception:
                self.log.exception("leadership callback failed")
            self._current = None
