"""The elector (appliance/ha/elector.py) against a real three-member etcd (tests/etcdrig.py).

No namespaces: the floating addresses are a fake that records what the elector asked
(hold, release, announce) and when; tests/system/test_ha_floating.py covers the real
ones. Each elector has its own EtcdClient, as each appliance would. A kill -9 of a
member is simulated by cancelling its elector's tasks without revoking anything: its
lease is left to expire, as a dead process's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from appliance.etcd import EtcdClient
from appliance.ha.elector import Elector
from appliance.haplan import HaMember, HaPlan
from tests.etcdrig import EtcdCluster

TTL = 2
MEMBERS = (HaMember("prov-a", "192.0.2.16"), HaMember("prov-b", "192.0.2.17"))
log = logging.getLogger("appliance.ha")


@dataclass
class FakeFloating:
    """Records the elector's calls; `held` is what a kernel would have (no lifetimes)."""

    addresses: tuple[str, ...] = ("192.0.2.10", "192.0.2.54")
    held: bool = False
    calls: list[tuple[str, float]] = field(default_factory=list)
    stale: bool = False  # an earlier run's addresses are on the interface
    broken: bool = False  # hold() raises what no Floating raises: a bug

    def hold(self) -> None:
        if self.broken:
            raise RuntimeError("a bug in hold")
        self.held = True
        self.calls.append(("hold", time.monotonic()))

    def release(self) -> list[str]:
        was = self.held or self.stale
        self.held = self.stale = False
        self.calls.append(("release", time.monotonic()))
        return list(self.addresses) if was else []

    def announce(self, rounds: int = 3, interval: float = 0.1) -> int:
        self.calls.append(("announce", time.monotonic()))
        return rounds * 2 * len(self.addresses)

    def times(self, what: str) -> list[float]:
        return [t for name, t in self.calls if name == what]


@dataclass
class Node:
    elector: Elector
    floating: FakeFloating
    client: EtcdClient
    events: list[tuple[str, str, float]] = field(default_factory=list)  # (lead|follow, reason)
    dead: bool = False

    @property
    def name(self) -> str:
        return self.elector.member.name

    def kill(self) -> None:
        """kill -9: the loop stops, nothing is revoked or released (the kernel's lifetime
        would drop the addresses: the fake's stay, so a dead node is left out of checks)."""
        self.dead = True
        for task in (self.elector._task, self.elector._worker):
            if task is not None:
                task.cancel()


def plan(cluster: EtcdCluster, prefix: str) -> HaPlan:
    return HaPlan(
        members=MEMBERS,
        endpoints=tuple(cluster.endpoints),
        prefix=prefix,
        ca_file=None,
        cert_file=None,
        key_file=None,
        lease_ttl=TTL,
        interface="lo",
        floating=("192.0.2.10", "192.0.2.54"),
        prefixlen=24,
    )


class Pair:
    def __init__(self, cluster: EtcdCluster) -> None:
        self.cluster = cluster
        self.prefix = f"/appliance/test-{uuid.uuid4().hex[:8]}"
        self.ha = plan(cluster, self.prefix)
        self.nodes: list[Node] = []

    def start(self, member: HaMember, floating: FakeFloating | None = None) -> Node:
        client = EtcdClient(self.ha.endpoints, timeout=TTL / 3)
        fl = floating or FakeFloating()
        events: list[tuple[str, str, float]] = []

        async def on_lead() -> None:
            events.append(("lead", "", time.monotonic()))

        async def on_follow(reason: str) -> None:
            events.append(("follow", reason, time.monotonic()))

        elector = Elector(self.ha, member, client, fl, on_lead, on_follow, log)
        node = Node(elector, fl, client, events)
        self.nodes.append(node)
        elector.start()
        return node

    def leaders(self) -> list[Node]:
        return [n for n in self.nodes if n.elector.leading and not n.dead]

    async def close(self) -> None:
        for n in self.nodes:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(n.elector.stop(), 10)
            n.client.close()


@pytest.fixture
async def pair(etcd_cluster: EtcdCluster) -> AsyncIterator[Pair]:
    p = Pair(etcd_cluster)
    try:
        yield p
    finally:
        await p.close()


async def until(check: Callable[[], object], timeout: float, what: str) -> float:
    """Poll every 20 ms; the monotonic time the check first held."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


async def watch_never_two(pair: Pair, seconds: float) -> None:
    """Sample every 20 ms: never two leaders, never two holding the addresses."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert len(pair.leaders()) <= 1
        assert sum(n.floating.held for n in pair.nodes if not n.dead) <= 1
        await asyncio.sleep(0.02)


def leader_key(pair: Pair) -> dict[str, object] | None:
    kv = pair.nodes[0].client.get(f"{pair.prefix}/leader".encode())
    return None if kv is None else dict(json.loads(kv.value))


async def both(pair: Pair) -> tuple[Node, Node]:
    a, b = pair.start(MEMBERS[0]), pair.start(MEMBERS[1])
    await until(lambda: len(pair.leaders()) == 1, 3 * TTL, "a leader")
    leader = pair.leaders()[0]
    other = b if leader is a else a
    await until(lambda: other.elector.core.leader == leader.name, 2 * TTL, "the follower knows")
    return leader, other


async def test_exactly_one_leads_and_holds_the_addresses(pair: Pair) -> None:
    leader, other = await both(pair)
    holds = len(leader.floating.times("hold"))
    await watch_never_two(pair, 2 * TTL)
    assert leader.elector.leading and not other.elector.leading
    # The addresses' lifetimes are renewed after each keepalive (every ttl/3).
    assert len(leader.floating.times("hold")) >= holds + 4
    assert leader.floating.held and not other.floating.held
    assert [e[0] for e in leader.events] == ["lead"] and other.events == []
    assert leader.floating.times("announce"), "no gratuitous ARP"
    # The key names the leader; the statuses agree.
    key = leader_key(pair)
    assert key is not None and key["member"] == leader.name
    assert key["address"] == leader.elector.member.address
    st, fo = leader.elector.status(), other.elector.status()
    assert st.leading and st.leader == leader.name and st.etcd_ok and st.since is not None
    assert not fo.leading and fo.leader == leader.name and fo.last_keepalive is None
    assert st.last_keepalive is not None and time.time() - st.last_keepalive < TTL
    body = st.to_json()
    assert body["leader"] == leader.name and body["etcd"] == {"ok": True, "error": None}
    names = {f.name for f in st.metrics()}
    assert {"ha_leader", "ha_leader_changes", "ha_step_downs", "ha_etcd_up"} <= names


async def test_stale_addresses_are_removed_before_the_first_campaign(pair: Pair) -> None:
    fl = FakeFloating(stale=True)
    node = pair.start(MEMBERS[0], fl)
    await until(lambda: node.elector.leading, 3 * TTL, "leads")
    assert [name for name, _ in fl.calls][:2] == ["release", "hold"]


async def test_kill_9_of_the_leader_other_takes_over_within_two_ttl_plus_one(
    pair: Pair,
) -> None:
    leader, other = await both(pair)
    await asyncio.sleep(0.3)
    killed = time.monotonic()
    leader.kill()
    took = await until(lambda: other.elector.leading, 2 * TTL + 1, "takeover") - killed
    log.warning("takeover after kill -9: %.2f s (ttl %d)", took, TTL)
    # Not before the dead leader's lease could have run out (minus its fence margin).
    assert took >= TTL - 1
    assert other.floating.held and [e[0] for e in other.events] == ["lead"]
    key = leader_key(pair)
    assert key is not None and key["member"] == other.name


async def test_restarted_old_leader_joins_as_follower(pair: Pair) -> None:
    leader, other = await both(pair)
    leader.kill()
    await until(lambda: other.elector.leading, 2 * TTL + 1, "takeover")
    again = pair.start(leader.elector.member)
    await until(lambda: again.elector.core.leader == other.name, 2 * TTL, "sees the leader")
    await watch_never_two(pair, TTL)
    assert not again.elector.leading and other.elector.leading
    assert again.floating.calls[0][0] == "release"  # its stale addresses first


async def test_stop_revokes_and_the_other_leads_at_once(pair: Pair) -> None:
    leader, other = await both(pair)
    stopped = time.monotonic()
    await leader.elector.stop()
    assert not leader.floating.held
    assert leader.events == [("lead", "", leader.events[0][2])]  # no on_follow at stop
    took = await until(lambda: other.elector.leading, TTL, "takeover after stop") - stopped
    log.warning("takeover after a clean stop: %.2f s (ttl %d)", took, TTL)
    assert took < TTL / 3 + 0.5  # one follower poll, not a lease expiry
    assert leader.elector.status().step_downs == {"stopping": 1}


async def test_etcd_gone_the_leader_steps_down_within_ttl(pair: Pair) -> None:
    leader, other = await both(pair)
    await asyncio.sleep(0.2)
    gone = time.monotonic()
    for i in range(3):
        pair.cluster.kill(i)
    dropped = await until(lambda: not leader.floating.held, TTL + 0.5, "addresses dropped")
    log.warning("stepped down %.2f s after etcd went away (ttl %d)", dropped - gone, TTL)
    assert dropped - gone <= TTL
    await until(lambda: any(e[0] == "follow" for e in leader.events), 1, "on_follow")
    assert [e[:2] for e in leader.events] == [("lead", ""), ("follow", "fenced")]
    st = leader.elector.status()
    assert not st.leading and not st.etcd_ok and st.etcd_error
    # Nobody leads without etcd.
    await watch_never_two(pair, TTL)
    assert pair.leaders() == [] and not other.floating.held


async def test_etcd_hung_the_leader_steps_down_within_ttl(pair: Pair) -> None:
    """etcd stopped (SIGSTOP: connections accepted, no answers): keepalives hang until the
    client's timeout; the fence is a timer all the same, and the addresses go on time."""
    leader, _other = await both(pair)
    pids = [pid for i in range(3) if (pid := pair.cluster.pid(i)) is not None]
    hung = time.monotonic()
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        dropped = await until(lambda: not leader.floating.held, TTL + 0.5, "addresses dropped")
        log.warning("stepped down %.2f s after etcd hung (ttl %d)", dropped - hung, TTL)
        assert dropped - hung <= TTL
        await watch_never_two(pair, TTL)
        assert pair.leaders() == []
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # etcd back: a leader again (after the old lease's expiry and the hold-off).
    await until(lambda: len(pair.leaders()) == 1, 4 * TTL + 2, "a leader after etcd is back")


async def test_lease_revoked_behind_its_back_steps_down_at_once(pair: Pair) -> None:
    """A lost keepalive in etcd's sense: the lease is gone (an operator, a compaction of
    leases): the next keepalive answers ttl 0 and the leader steps down without waiting
    for its deadline."""
    leader, other = await both(pair)
    lease = leader.elector.core.lease
    assert lease is not None
    revoked = time.monotonic()
    await asyncio.to_thread(other.client.lease_revoke, lease)
    dropped = await until(lambda: not leader.floating.held, TTL, "step down")
    assert dropped - revoked <= TTL / 3 + 0.3  # the next keepalive, not the fence
    assert leader.elector.status().step_downs == {"lease lost": 1}
    # Then one of the two leads again, and only one.
    await until(lambda: len(pair.leaders()) == 1, 3 * TTL + 1, "a new leader")
    await watch_never_two(pair, TTL)


async def test_a_foreign_key_holder_is_waited_for(pair: Pair) -> None:
    """Someone else's write to the leader key (another cluster on the same prefix, an
    operator): nobody here leads while it lives; when its lease goes, one takes over."""
    admin = EtcdClient(pair.ha.endpoints)
    try:
        lease, _ttl = admin.lease_grant(30)
        admin.put(f"{pair.prefix}/leader".encode(), b"not json", lease)
        a, _b = pair.start(MEMBERS[0]), pair.start(MEMBERS[1])
        await until(lambda: a.elector.core.leader == "(unreadable)", 2 * TTL, "a sees it")
        await watch_never_two(pair, TTL)
        assert pair.leaders() == []
        admin.lease_revoke(lease)
        await until(lambda: len(pair.leaders()) == 1, 2 * TTL, "a leader after the revoke")
        await watch_never_two(pair, TTL)
    finally:
        admin.close()


async def test_slow_take_over_callback_does_not_delay_keepalives(pair: Pair) -> None:
    """on_lead may take longer than the lease (reading the shared state): the election
    loop keeps the lease alive meanwhile."""
    release = asyncio.Event()

    async def slow_lead() -> None:
        await release.wait()

    node = pair.start(MEMBERS[0])
    node.elector.on_lead = slow_lead
    await until(lambda: node.elector.leading, 3 * TTL, "leads")
    await asyncio.sleep(2 * TTL)
    try:
        st = node.elector.status()
        assert st.leading, "lost the lease while on_lead ran"
        assert st.last_keepalive is not None and time.time() - st.last_keepalive < TTL / 2
        key = leader_key(pair)  # the lease lives on in etcd: keepalives went on
        assert key is not None and key["member"] == node.name
    finally:
        release.set()


async def test_a_bug_in_the_loop_steps_down_and_lets_the_other_lead(pair: Pair) -> None:
    """An unexpected exception in the election loop: no member is left believing it leads
    with nobody renewing; the lease is revoked so the other takes over soon."""
    a = pair.start(MEMBERS[0], FakeFloating(broken=True))
    await until(lambda: a.elector._task is not None and a.elector._task.done(), 3 * TTL, "ends")
    assert not a.elector.leading and not a.floating.held
    assert [e[:2] for e in a.events] == [("follow", "error")]
    assert a.elector.status().step_downs == {"error": 1}
    b = pair.start(MEMBERS[1])
    await until(lambda: b.elector.leading, TTL, "the other leads (the lease was revoked)")
