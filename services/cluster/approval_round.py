"""One round of the CSR approver as a pure function: values in, a plan of actions out.

`plan_round` decides everything the approver loop used to decide between its API calls:
which CSRs are pending, whether the circuit breaker is open, the review of each (oldest
first), which bootstrapper CSRs need the API asked whether their Node exists, and which
approvals the rate limit lets through now. The loop (approver.py) only fetches (the CSR
objects, the Node lookups) and applies (records, approves, denies).

Node lookups take two calls: when the plan lists `lookups`, nothing else in it is to
be applied; the loop asks the API about those nodes and calls again with `looked_up`.
The token bucket and the first-seen times are values too: the plan returns the new
ones, and the caller keeps them only if it applies the plan.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from appliance.plan import Plan
from services.cluster.breaker import MARGIN, RateLimit, breaker_open, parse_time
from services.cluster.review import ClusterFacts, CsrInfo, Decision, is_bootstrapper, review

UNSYNCED_RETRY = 0.1  # seconds: the Node list is about to arrive
MIN_WAIT = 0.05  # never spin on a token that is due "now"
RATE_LIMITED = "rate limited"


@dataclass(frozen=True, slots=True)
class Step:
    """What to do with one pending CSR: conclude it through the API (approve or deny),
    or record it as left pending with the decision's reason."""

    csr: CsrInfo
    decision: Decision

    @property
    def conclude(self) -> bool:
        return self.decision.verdict != "pending"


@dataclass(frozen=True, slots=True)
class RoundPlan:
    steps: tuple[Step, ...]  # in review order: oldest CSR first
    lookups: tuple[str, ...]  # inventory nodes to look up in the API before anything else
    breaker_open: bool
    pending: int  # pending CSRs seen this round
    held: int  # approvals the rate limit held back
    delay: float  # look again after at most this long
    bucket: RateLimit  # the token bucket after this round's approvals
    first_seen: Mapping[str, float]  # by uid (or name): for CSRs without a timestamp
    reviewed: bool = True  # False: approvals off or the Node list not in yet; apply nothing


def plan_round(
    csrs: Sequence[CsrInfo],
    plan: Plan,
    facts: ClusterFacts,
    now: float,
    *,
    bucket: RateLimit,
    first_seen: Mapping[str, float],
    resync: float,
    synced: bool = True,
    looked_up: Mapping[str, str] | None = None,
) -> RoundPlan:
    """The round for `csrs` (any state) at `now`; `looked_up`: node -> the Node name the
    API has for it ("" for none), for the nodes a previous call listed in `lookups`."""
    bucket = copy.copy(bucket)  # the caller's stays as it was until it applies the plan
    if not plan.kubernetes.approve_csrs:
        return RoundPlan((), (), False, 0, 0, resync, bucket, first_seen, reviewed=False)
    if not synced:
        # Which Nodes exist decides bootstrapper CSRs: never review before knowing.
        return RoundPlan(
            (), (), False, 0, 0, min(resync, UNSYNCED_RETRY), bucket, first_seen, reviewed=False
        )
    pending = [csr for csr in csrs if csr.state == "pending"]
    seen = {key: first_seen.get(key, now) for key in (_key(csr) for csr in pending)}
    since = [parse_time(csr.created) or seen[_key(csr)] for csr in pending]
    breaker = breaker_open(since, len(plan.nodes), now)
    looked = looked_up or {}
    found = frozenset(name for name in looked.values() if name)
    if found:
        facts = ClusterFacts(facts.nodes | found)
    ordered = sorted(pending, key=lambda csr: (csr.created, csr.name))
    decisions = [(csr, review(csr, plan, facts)) for csr in ordered]
    if not breaker:
        # The Node watch may lag behind the CSR watch: ask the API itself whether the
        # node exists before a bootstrapper gets its certificate.
        lookups = tuple(
            dict.fromkeys(
                d.node
                for csr, d in decisions
                if d.verdict == "approve" and is_bootstrapper(csr.username) and d.node not in looked
            )
        )
        if lookups:
            return RoundPlan((), lookups, breaker, len(pending), 0, resync, bucket, seen)
    steps: list[Step] = []
    held = 0
    delay = resync
    for csr, decision in decisions:
        if decision.verdict == "approve" and breaker:
            decision = Decision(
                "pending",
                f"circuit breaker open: {len(pending)} pending CSRs exceed "
                f"{len(plan.nodes)} nodes + {MARGIN}",
                decision.kind,
                decision.node,
            )
        elif decision.verdict == "approve" and not bucket.allow(now):
            held += 1
            delay = min(delay, max(bucket.wait(now), MIN_WAIT))
            decision = Decision("pending", RATE_LIMITED, decision.kind, decision.node)
        steps.append(Step(csr, decision))
    return RoundPlan(tuple(steps), (), breaker, len(pending), held, delay, bucket, seen)


def _key(csr: CsrInfo) -> str:
    return csr.uid or csr.name
