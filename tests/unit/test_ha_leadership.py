"""The election core (appliance/ha/leadership.py) with `now` arithmetic, no etcd.

The single-member tests drive the core by hand. The simulation runs two cores against a
small model of etcd's lease semantics (a lease expires `ttl` after the keepalive REACHED
etcd; the leader key goes with its lease; a txn creates the key only when absent) with
random latencies, lost requests, lost answers and outages, and checks after every event
that a member that believes it leads really holds the key on a live lease, so never two.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from appliance.ha.leadership import (
    Action,
    BecameLeader,
    Campaign,
    Grant,
    KeepAlive,
    LeaderChanged,
    Leadership,
    ReadLeader,
    Revoke,
    SteppedDown,
    margin_for,
)

TTL = 3
A = TypeVar("A", Grant, Campaign, KeepAlive, ReadLeader, Revoke)


def take(core: Leadership, now: float, kind: type[A]) -> A:
    """The action due at `now`, which must be a `kind`."""
    action = core.next_action(now)
    assert isinstance(action, kind), f"{action} at {now}, not a {kind.__name__}"
    return action


def lead(core: Leadership, now: float = 0.0, lease: int = 7) -> float:
    """Read (absent), grant, campaign, win: returns the grant's send time."""
    read = take(core, now, ReadLeader)
    assert isinstance(read, ReadLeader)
    core.leader_seen(read, None, now, now + 0.01)
    grant = take(core, now + 0.01, Grant)
    assert isinstance(grant, Grant) and grant.ttl == TTL
    sent = now + 0.01
    core.granted(grant, lease, TTL, sent, now + 0.02)
    campaign = take(core, now + 0.02, Campaign)
    assert isinstance(campaign, Campaign) and campaign.lease == lease
    core.campaign_won(campaign, now + 0.02, now + 0.03)
    assert core.leading
    return sent


def test_absent_key_leads_and_says_so() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    lead(core)
    assert core.transitions() == [BecameLeader(0.03), LeaderChanged("prov-a")]
    assert core.leader == "prov-a" and core.since == 0.03 and core.changes == 1


def test_keepalive_every_third_of_ttl_from_the_send_time() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    sent = lead(core)
    assert core.next_action(0.5) is None
    assert core.get_timer() == pytest.approx(sent + 1.0)
    ka = take(core, sent + 1.0, KeepAlive)
    assert isinstance(ka, KeepAlive) and ka.lease == 7
    assert core.next_action(sent + 1.0) is None  # one call in flight at a time
    assert core.kept(ka, TTL, sent + 1.0, sent + 1.3)
    assert core.good_until == pytest.approx(sent + 1.0 + TTL)
    assert core.fence_at == pytest.approx(sent + 1.0 + TTL - margin_for(TTL))
    assert core.get_timer() == pytest.approx(sent + 2.0)


def test_failed_keepalives_extend_nothing_and_fence_before_expiry() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    sent = lead(core)
    core.transitions()
    now = sent + 1.0
    for _ in range(10):
        action = core.next_action(now)
        if not core.leading:
            break
        assert isinstance(action, KeepAlive)
        now += 0.2
        core.failed(action, "unavailable", now - 0.2, now)
        timer = core.get_timer()
        assert timer is not None
        now = max(now, timer)
        core.handle_timer(now)
    fence = sent + TTL - margin_for(TTL)
    assert not core.leading
    assert core.fence_at == pytest.approx(fence)  # never moved by a failed keepalive
    assert fence <= now <= fence + 0.2
    assert core.transitions() == [SteppedDown("fenced"), LeaderChanged(None)]
    # The old lease is revoked at once (best effort).
    assert isinstance(action, Revoke) and action.lease == 7


def test_hung_keepalive_fences_on_time_and_late_answer_does_not_revive() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    sent = lead(core)
    ka = take(core, sent + 1.0, KeepAlive)
    fence = sent + TTL - margin_for(TTL)
    assert core.get_timer() == pytest.approx(fence)  # the fence, even with a call in flight
    core.handle_timer(fence)
    assert not core.leading
    # The answer comes back after the fence: it was a success at etcd, but too late.
    assert not core.kept(ka, TTL, sent + 1.0, fence + 0.5)
    assert not core.leading
    assert [t for t in core.transitions() if isinstance(t, BecameLeader)] == [BecameLeader(0.03)]


def test_late_answer_reported_before_the_timer_still_fences() -> None:
    """The shell woke late: the answer is handled at a `now` past the fence."""
    core = Leadership("prov-a", TTL, 0.0)
    sent = lead(core)
    ka = take(core, sent + 1.0, KeepAlive)
    assert not core.kept(ka, TTL, sent + 1.0, sent + TTL)
    assert not core.leading


def test_keepalive_answer_slower_than_the_ttl_renews_too_little() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    sent = lead(core)
    ka = take(core, sent + 1.0, KeepAlive)
    fence = sent + TTL - margin_for(TTL)
    # Answered just before the fence, but sent so long ago that it adds less than the margin.
    assert core.kept(ka, TTL, sent + 1.0, fence - 0.01)
    assert core.fence_at == pytest.approx(sent + 1.0 + TTL - margin_for(TTL))


def test_ttl_zero_steps_down_at_once_without_revoking() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    sent = lead(core)
    core.transitions()
    ka = take(core, sent + 1.0, KeepAlive)
    assert not core.kept(ka, 0, sent + 1.0, sent + 1.1)
    assert not core.leading
    assert core.transitions() == [SteppedDown("lease lost"), LeaderChanged(None)]
    assert core.revoke is None  # the lease is gone already


def test_hold_off_after_stepping_down() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    sent = lead(core)
    ka = take(core, sent + 1.0, KeepAlive)
    core.kept(ka, 0, sent + 1.0, 2.0)
    now = 2.0
    campaigned_at = None
    for _ in range(50):
        timer = core.get_timer()
        assert timer is not None
        now = max(now, timer)
        action = core.next_action(now)
        if isinstance(action, Grant):
            campaigned_at = now
            break
        assert isinstance(action, ReadLeader)
        core.leader_seen(action, None, now, now + 0.01)  # the key is absent all along
        now += 0.01
    assert campaigned_at is not None and campaigned_at >= 2.0 + TTL


def test_lost_campaign_revokes_its_lease_and_follows() -> None:
    core = Leadership("prov-b", TTL, 0.0)
    read = take(core, 0.0, ReadLeader)
    core.leader_seen(read, None, 0.0, 0.01)
    grant = take(core, 0.01, Grant)
    core.granted(grant, 9, TTL, 0.01, 0.02)
    campaign = take(core, 0.02, Campaign)
    assert isinstance(campaign, Campaign)
    core.campaign_lost(campaign, "prov-a", 0.02, 0.03)
    assert not core.leading and core.leader == "prov-a"
    assert core.transitions() == [LeaderChanged("prov-a")]
    revoke = take(core, 0.03, Revoke)
    assert isinstance(revoke, Revoke) and revoke.lease == 9
    core.revoked(revoke, 0.03, 0.04)
    assert core.next_action(0.5) is None
    take(core, 0.03 + TTL / 3, ReadLeader)


def test_failed_campaign_revokes_the_lease_in_case_the_txn_was_applied() -> None:
    core = Leadership("prov-b", TTL, 0.0)
    read = take(core, 0.0, ReadLeader)
    core.leader_seen(read, None, 0.0, 0.01)
    grant = take(core, 0.01, Grant)
    core.granted(grant, 9, TTL, 0.01, 0.02)
    campaign = take(core, 0.02, Campaign)
    core.failed(campaign, "timed out", 0.02, 2.02)
    assert core.etcd_error == "timed out"
    revoke = take(core, 2.02, Revoke)
    assert isinstance(revoke, Revoke) and revoke.lease == 9


def test_campaign_won_too_late_is_not_leadership() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    read = take(core, 0.0, ReadLeader)
    core.leader_seen(read, None, 0.0, 0.0)
    grant = take(core, 0.0, Grant)
    core.granted(grant, 5, TTL, 0.0, 0.1)
    campaign = take(core, 0.1, Campaign)
    core.campaign_won(campaign, 0.1, TTL - margin_for(TTL))
    assert not core.leading
    assert not any(isinstance(t, BecameLeader) for t in core.transitions())
    take(core, TTL, Revoke)


def test_follower_polls_and_follows_changes() -> None:
    core = Leadership("prov-b", TTL, 0.0)
    read = take(core, 0.0, ReadLeader)
    core.leader_seen(read, "prov-a", 0.0, 0.01)
    assert core.get_timer() == pytest.approx(0.01 + TTL / 3)
    read = take(core, 1.01, ReadLeader)
    core.leader_seen(read, "prov-a", 1.01, 1.02)
    read = take(core, 2.02, ReadLeader)
    core.leader_seen(read, "prov-c", 2.02, 2.03)
    assert core.transitions() == [LeaderChanged("prov-a"), LeaderChanged("prov-c")]
    assert core.changes == 2


def test_stop_steps_down_then_revokes_then_is_done() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    lead(core)
    core.transitions()
    core.stop(0.5)
    assert core.transitions() == [SteppedDown("stopping"), LeaderChanged(None)]
    assert not core.done
    assert core.get_timer() == -math.inf
    revoke = take(core, 0.5, Revoke)
    assert isinstance(revoke, Revoke) and revoke.lease == 7
    core.revoked(revoke, 0.5, 0.51)
    assert core.done and core.get_timer() is None and core.next_action(9.0) is None


def test_stop_with_a_grant_in_flight_revokes_what_comes_back() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    read = take(core, 0.0, ReadLeader)
    core.leader_seen(read, None, 0.0, 0.0)
    grant = take(core, 0.0, Grant)
    core.stop(0.1)
    core.granted(grant, 11, TTL, 0.0, 0.2)
    revoke = take(core, 0.2, Revoke)
    assert isinstance(revoke, Revoke) and revoke.lease == 11


def test_report_for_a_call_not_in_flight_is_refused() -> None:
    core = Leadership("prov-a", TTL, 0.0)
    read = take(core, 0.0, ReadLeader)
    with pytest.raises(ValueError):
        core.leader_seen(ReadLeader(read.seq + 1), None, 0.0, 0.0)


def test_ttl_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Leadership("prov-a", 0, 0.0)


# --- the simulation ------------------------------------------------------------------------


class ModelEtcd:
    """etcd's lease and txn semantics, as far as the election uses them. `tick`: etcd's
    lessor looks for expired leases every 500 ms (0: exactly at expiry, the strict case)."""

    def __init__(self, tick: float = 0.0) -> None:
        self.tick = tick
        self.leases: dict[int, tuple[float, int]] = {}  # id -> (expiry, ttl)
        self.key: tuple[str, int] | None = None  # (holder, lease)
        self.next_id = 100

    def expire(self, t: float) -> None:
        if self.tick:
            t = math.floor(t / self.tick) * self.tick
        for lease, (expiry, _ttl) in list(self.leases.items()):
            if expiry <= t:
                self._drop(lease)

    def _drop(self, lease: int) -> None:
        self.leases.pop(lease, None)
        if self.key is not None and self.key[1] == lease:
            self.key = None

    def apply(self, member: str, action: Action, t: float) -> tuple[object, ...]:
        self.expire(t)
        if isinstance(action, Grant):
            self.next_id += 1
            self.leases[self.next_id] = (t + action.ttl, action.ttl)
            return ("granted", self.next_id, action.ttl)
        if isinstance(action, Campaign):
            if self.key is None:
                if action.lease not in self.leases:
                    return ("failed", "lease not found")
                self.key = (member, action.lease)
                return ("won",)
            return ("lost", self.key[0])
        if isinstance(action, ReadLeader):
            return ("seen", None if self.key is None else self.key[0])
        if isinstance(action, KeepAlive):
            if action.lease not in self.leases:
                return ("kept", 0)
            ttl = self.leases[action.lease][1]
            self.leases[action.lease] = (t + ttl, ttl)
            return ("kept", ttl)
        self._drop(action.lease)
        return ("revoked",)

    def holds(self, member: str, t: float) -> bool:
        """The key is this member's, on a lease alive at t."""
        if self.key is None or self.key[0] != member:
            return False
        expiry = self.leases.get(self.key[1], (0.0, 0))[0]
        return expiry > t


@dataclass
class Call:
    action: Action
    sent: float
    arrive: float | None  # None: the request never reaches etcd (or already did)
    back: float
    answer_lost: bool
    result: tuple[object, ...] = ("failed", "timed out")


@dataclass
class Member:
    name: str
    core: Leadership
    dead_at: float = math.inf  # kill -9: stops calling and answering from then on
    call: Call | None = None
    led_at: list[float] = field(default_factory=list)  # when it became leader


def report(core: Leadership, call: Call, now: float) -> None:
    kind, *rest = call.result
    a, sent = call.action, call.sent
    holder = rest[0] if rest and isinstance(rest[0], str) else None
    if kind == "failed":
        core.failed(a, str(rest[0]), sent, now)
    elif kind == "granted":
        assert isinstance(a, Grant)
        core.granted(a, int(str(rest[0])), int(str(rest[1])), sent, now)
    elif kind == "won":
        assert isinstance(a, Campaign)
        core.campaign_won(a, sent, now)
    elif kind == "lost":
        assert isinstance(a, Campaign)
        core.campaign_lost(a, holder, sent, now)
    elif kind == "seen":
        assert isinstance(a, ReadLeader)
        core.leader_seen(a, holder, sent, now)
    elif kind == "kept":
        assert isinstance(a, KeepAlive)
        core.kept(a, int(str(rest[0])), sent, now)
    else:
        assert isinstance(a, Revoke)
        core.revoked(a, sent, now)


def make_call(
    rng: random.Random, action: Action, now: float, outages: list[tuple[float, float]], chaos: bool
) -> Call:
    timeout = 2.0
    if any(a <= now < b for a, b in outages):  # etcd unreachable: refused, or a timeout
        return Call(action, now, None, now + rng.choice([0.001, timeout]), False)
    if not chaos:
        latency = rng.uniform(0.001, 0.02)
        return Call(action, now, now + latency, now + 2 * latency, False)
    roll = rng.random()
    if roll < 0.08:  # lost on the way: the client times out
        return Call(action, now, None, now + timeout, False)
    if roll < 0.16:  # applied, but the answer is lost: reported as a timeout
        return Call(action, now, now + rng.uniform(0, 0.5), now + timeout, True)
    arrive = now + rng.expovariate(1 / 0.05)
    back = arrive + rng.expovariate(1 / 0.05)
    if rng.random() < 0.05:  # a very slow answer
        back += rng.uniform(0, 2 * timeout)
    return Call(action, now, arrive, back, False)


def simulate(
    rng: random.Random,
    etcd: ModelEtcd,
    members: list[Member],
    start: float,
    until: float,
    *,
    chaos: bool,
    outages: list[tuple[float, float]] | None = None,
) -> float:
    """Run the members against etcd from `start` to `until`, checking after every event;
    returns the time reached."""
    outages = outages or []
    now = start
    for _ in range(50_000):
        alive = [m for m in members if now < m.dead_at]
        candidates = [until] + [m.dead_at for m in alive]
        if etcd.tick:
            candidates.append((math.floor(now / etcd.tick) + 1) * etcd.tick)
        for m in alive:
            if m.call is not None:
                if m.call.arrive is not None:
                    candidates.append(m.call.arrive)
                candidates.append(m.call.back)
            timer = m.core.get_timer()
            if timer is not None:
                candidates.append(max(now, timer))
        now = max(now, min(candidates))
        if now >= until:
            return until
        for m in members:
            if now >= m.dead_at:
                continue
            call = m.call
            if call is not None and call.arrive is not None and call.arrive <= now:
                result = etcd.apply(m.name, call.action, call.arrive)
                call.arrive = None
                if not call.answer_lost:
                    call.result = result
            if call is not None and call.back <= now:
                m.call = None
                report(m.core, call, now)
            m.core.handle_timer(now)
            if m.call is None:
                action = m.core.next_action(now)
                if action is not None:
                    m.call = make_call(rng, action, now, outages, chaos)
            if any(isinstance(t, BecameLeader) for t in m.core.transitions()):
                m.led_at.append(now)
        etcd.expire(now)
        leaders = [m for m in members if m.core.leading and now < m.dead_at]
        assert len(leaders) <= 1, f"two leaders at {now}"
        for m in leaders:
            assert etcd.holds(m.name, now), f"{m.name} leads at {now} without the key"
            assert now < m.core.fence_at
    raise AssertionError("simulation did not reach its end")


@pytest.mark.parametrize("seed", range(300))
def test_never_two_leaders_never_leading_without_the_key(seed: int) -> None:
    rng = random.Random(seed)
    ttl = rng.choice([2, 3, 5])
    outages = []
    for _ in range(rng.randrange(4)):
        begin = rng.uniform(0, 60)
        outages.append((begin, begin + rng.uniform(0.1, 3 * ttl)))
    members = [Member(n, Leadership(n, ttl, 0.0)) for n in ("prov-a", "prov-b")]
    simulate(rng, ModelEtcd(), members, 0.0, 60.0, chaos=True, outages=outages)


def test_the_simulation_sees_leaders_change() -> None:
    """The property above is not vacuous: under chaos, leadership moves and comes back."""
    rng = random.Random(1)
    members = [Member(n, Leadership(n, 3, 0.0)) for n in ("prov-a", "prov-b")]
    simulate(rng, ModelEtcd(), members, 0.0, 300.0, chaos=True, outages=[(100.0, 105.0)])
    assert sum(len(m.led_at) for m in members) >= 3


@pytest.mark.parametrize("ttl", [2, 3, 5])
@pytest.mark.parametrize("kill_after", [0.0, 0.3, 0.7, 1.1, 1.6])
def test_takeover_after_kill_within_two_ttl_plus_one(ttl: int, kill_after: float) -> None:
    rng = random.Random(ttl * 100 + int(kill_after * 10))
    etcd = ModelEtcd(tick=0.5)
    members = [
        Member("prov-a", Leadership("prov-a", ttl, 0.0)),
        Member("prov-b", Leadership("prov-b", ttl, 0.0)),
    ]
    now = simulate(rng, etcd, members, 0.0, 5.0, chaos=False)
    (leader,) = [m for m in members if m.core.leading]
    (other,) = [m for m in members if m is not leader]
    kill_at = now + kill_after
    leader.dead_at = kill_at
    simulate(rng, etcd, members, now, kill_at + 2 * ttl + 1.5, chaos=False)
    assert other.led_at, "no takeover"
    assert other.led_at[0] - kill_at <= 2 * ttl + 1
    assert other.led_at[0] - kill_at >= ttl - 2 * margin_for(ttl)  # not before the lease ends
