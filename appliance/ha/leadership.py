"""Leadership through an etcd lease (sans-IO): who leads, and when the leader must fence.

The asyncio shell (elector.py) runs the etcd calls this core asks for and reports what
came back, with the time each call was SENT and the time it returned; this core decides.
Time is an argument (`now`, the shell's one monotonic clock), never read here.

- Follower: read `<prefix>/leader` every ttl/3. Absent (and the hold-off after a step-down
  over): Grant a lease, then Campaign with it (a txn: create the key only if it does not
  exist). Won: leader. Lost: the holder is known, the unused lease is revoked.
- Leader: KeepAlive every ttl/3. The lease is good until (SEND time of the last keepalive
  that succeeded) + the ttl etcd gave: etcd renews from when the request reached it, which
  is never before it was sent, so this never overestimates. The leader fences (steps
  down) at that deadline minus a margin, before etcd can let anyone else take the key.
  A keepalive answering ttl 0 (the lease is gone) steps down at once. A call that fails,
  or has not answered by the deadline, extends nothing: the fence is a timer, and an
  answer arriving after it does not revive the leadership.
- After stepping down: revoke the old lease (best effort: the others take over at once
  when etcd hears it) and wait at least the old lease's ttl before campaigning again, so
  the old key has surely expired and another member had its chance.

One call is in flight at a time (the shell has one executor for them): `next_action(now)`
hands out the next one when it is due, and every action handed out gets exactly one
report back (an answer or `failed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# --- actions: what the shell runs against etcd ------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    seq: int
    ttl: int


@dataclass(frozen=True, slots=True)
class Campaign:
    seq: int
    lease: int


@dataclass(frozen=True, slots=True)
class KeepAlive:
    seq: int
    lease: int


@dataclass(frozen=True, slots=True)
class ReadLeader:
    seq: int


@dataclass(frozen=True, slots=True)
class Revoke:
    seq: int
    lease: int


Action = Grant | Campaign | KeepAlive | ReadLeader | Revoke

# --- transitions: what the shell acts on (addresses, DHCP, singleton loops) ----------------


@dataclass(frozen=True, slots=True)
class BecameLeader:
    since: float  # `now` of the campaign's answer


@dataclass(frozen=True, slots=True)
class SteppedDown:
    reason: str  # "fenced", "lease lost", "stopping"


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    name: str | None  # None: no leader known


Transition = BecameLeader | SteppedDown | LeaderChanged

Phase = Literal["follower", "leader", "stopped"]


def margin_for(ttl: float) -> float:
    """How long before the lease's deadline the leader fences: room for the shell to drop
    the addresses and for clock rate differences between this host and etcd's."""
    return max(0.2, ttl / 6)


class Leadership:
    def __init__(self, member: str, ttl: int, now: float) -> None:
        if ttl < 1:
            raise ValueError(f"lease ttl must be at least 1 s, not {ttl}")
        self.member = member
        self.ttl = ttl  # asked for; etcd may grant another (its minimum is about 2 s)
        self.phase: Phase = "follower"
        self.leader: str | None = None  # as last seen (this member when leading)
        self.since: float | None = None  # when this member became leader
        self.changes = 0  # leader changes seen (LeaderChanged transitions)
        self.etcd_error: str | None = None  # the last call's error; None after a success
        self.last_keepalive: float | None = None  # `now` of the last successful keepalive
        # The lease this member holds or campaigns with.
        self.lease: int | None = None
        self.lease_ttl = ttl  # as granted
        self.lease_sent = 0.0  # send time of the grant
        self.good_until = 0.0  # leader: the lease surely lives until then
        self.fence_at = 0.0  # leader: good_until - margin
        self.step: Literal["read", "grant", "campaign"] = "read"  # follower's next call
        self.revoke: int | None = None  # a lease to revoke before anything else
        self.holdoff_until = now  # no campaign before (after a step-down)
        self.due = now  # when the next call may go
        self.in_flight: Action | None = None
        self._seq = 0
        self._transitions: list[Transition] = []

    # --- what the shell reads -------------------------------------------------------------

    @property
    def interval(self) -> float:
        """Keepalives and leader reads: every ttl/3."""
        return self.lease_ttl / 3

    @property
    def leading(self) -> bool:
        return self.phase == "leader"

    @property
    def done(self) -> bool:
        """Stopped, with nothing in flight and nothing left to revoke: the shell may exit."""
        return self.phase == "stopped" and self.in_flight is None and self.revoke is None

    def transitions(self) -> list[Transition]:
        """Transitions since the last call, in order (the shell acts on each)."""
        out, self._transitions = self._transitions, []
        return out

    def get_timer(self) -> float | None:
        """When handle_timer / next_action must run next; None: only a report can help."""
        times = []
        if self.phase == "leader":
            times.append(self.fence_at)
        if self.in_flight is None:
            if self.revoke is not None:
                times.append(-math.inf)  # at once
            elif self.phase != "stopped":
                times.append(self.due)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._check_fence(now)

    def next_action(self, now: float) -> Action | None:
        """The call to run now (marked in flight), or None: one is in flight or none is due."""
        self._check_fence(now)
        if self.in_flight is not None:
            return None
        action: Action | None
        if self.revoke is not None:  # an old lease goes first, at once
            action, self.revoke = Revoke(self._next_seq(), self.revoke), None
        elif self.phase == "stopped" or now < self.due:
            action = None
        elif self.phase == "leader":
            assert self.lease is not None
            action = KeepAlive(self._next_seq(), self.lease)
        elif self.step == "campaign":
            assert self.lease is not None
            action = Campaign(self._next_seq(), self.lease)
        elif self.step == "grant":
            action = Grant(self._next_seq(), self.ttl)
        else:
            action = ReadLeader(self._next_seq())
        self.in_flight = action
        return action

    # --- reports: the answer to the call in flight ---------------------------------------

    def granted(self, action: Grant, lease: int, ttl: int, sent: float, now: float) -> None:
        self._finish(action, now)
        if self.phase == "stopped":
            self.revoke = lease
            return
        self.lease, self.lease_ttl, self.lease_sent = lease, ttl, sent
        self.step, self.due = "campaign", now

    def campaign_won(self, action: Campaign, sent: float, now: float) -> None:
        self._finish(action, now)
        if self.phase == "stopped":
            self.revoke, self.lease = action.lease, None
            return
        self.good_until = self.lease_sent + self.lease_ttl
        self.fence_at = self.good_until - margin_for(self.lease_ttl)
        if now >= self.fence_at:
            # Won, but the answer came so late that the lease may be about to expire: not
            # worth leading for a moment. Revoke and read again.
            self.revoke, self.lease = action.lease, None
            self.step, self.due = "read", now
            return
        self.phase, self.since = "leader", now
        self.due = self.lease_sent + self.interval  # keepalives count from the grant
        self._transitions.append(BecameLeader(now))
        self._set_leader(self.member)

    def campaign_lost(self, action: Campaign, holder: str | None, sent: float, now: float) -> None:
        self._finish(action, now)
        self.revoke, self.lease = action.lease, None  # unused: do not leave it to expire
        if self.phase == "stopped":
            return
        self._set_leader(holder)
        # Deleted between the compare and the read (holder None): read again soon.
        self.step, self.due = "read", now + (self.interval if holder else self.interval / 2)

    def leader_seen(self, action: ReadLeader, holder: str | None, sent: float, now: float) -> None:
        self._finish(action, now)
        if self.phase != "follower":
            return
        self._set_leader(holder)
        if holder is None and now >= self.holdoff_until:
            self.step, self.due = "grant", now
        else:
            # Someone leads (perhaps this member's previous life, until its lease expires),
            # or the hold-off after a step-down is not over: poll.
            due = now + self.interval
            if holder is None:
                due = min(due, max(now, self.holdoff_until))
            self.step, self.due = "read", due

    def kept(self, action: KeepAlive, ttl_left: int, sent: float, now: float) -> bool:
        """A keepalive answered; True when it renewed the leadership (the shell renews the
        addresses' lifetimes then)."""
        self._finish(action, now)  # fences first if the deadline passed: no revival
        if self.phase != "leader" or action.lease != self.lease:
            return False
        if ttl_left <= 0:
            self.lease = None  # gone: nothing to revoke
            self._step_down("lease lost", now)
            return False
        self.last_keepalive = now
        self.good_until = max(self.good_until, sent + ttl_left)
        self.fence_at = self.good_until - margin_for(self.lease_ttl)
        self.due = sent + self.interval
        self._check_fence(now)  # an answer slower than the whole ttl renews too little
        return self.phase == "leader"

    def revoked(self, action: Revoke, sent: float, now: float) -> None:
        self._finish(action, now)

    def failed(self, action: Action, error: str, sent: float, now: float) -> None:
        """The call failed (etcd answered an error, or none answered in time)."""
        self._finish(action, now, error)
        retry = now + self.interval / 2
        if isinstance(action, Revoke):
            return  # it expires by itself
        if self.phase == "stopped":
            if isinstance(action, Campaign):
                self.revoke, self.lease = action.lease, None
            return
        if isinstance(action, KeepAlive):
            if self.phase == "leader":
                self.due = min(retry, self.fence_at)
            return
        if isinstance(action, Campaign):
            # The txn may have been applied: revoking the lease deletes the key if it was.
            self.revoke, self.lease = action.lease, None
        self.step, self.due = "read", retry

    # --- the shell's own decisions --------------------------------------------------------

    def stop(self, now: float) -> None:
        """Step down for good (SIGTERM): the lease is revoked so another takes over at once."""
        if self.phase == "leader":
            self._step_down("stopping", now)
        elif self.lease is not None:
            self.revoke, self.lease = self.lease, None
        self.phase = "stopped"

    # --- inside ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _finish(self, action: Action, now: float, error: str | None = None) -> None:
        if action is not self.in_flight:
            raise ValueError(f"{action} is not the call in flight ({self.in_flight})")
        self.in_flight = None
        self.etcd_error = error
        self._check_fence(now)

    def _check_fence(self, now: float) -> None:
        if self.phase == "leader" and now >= self.fence_at:
            self._step_down("fenced", now)

    def _step_down(self, reason: str, now: float) -> None:
        self.phase, self.since = "follower", None
        if self.lease is not None:
            self.revoke, self.lease = self.lease, None
        self.holdoff_until = now + self.lease_ttl
        self.step, self.due = "read", now + self.interval
        self._transitions.append(SteppedDown(reason))
        self._set_leader(None)

    def _set_leader(self, name: str | None) -> None:
        if name != self.leader:
            self.leader = name
            self.changes += 1
            self._transitions.append(LeaderChanged(name))
