"""The CSR approver's round policy as a pure function: values in, a plan of actions out.

Breaker, rate limit, order and node lookups are decided by `plan_round` alone; these
tests call it directly with real PKCS#10 requests and `now`, no API, no loop, no clock.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable

import pytest

from appliance.inventory import load_inventory
from appliance.plan import Plan, build_plan
from services.cluster.approval_round import RoundPlan, plan_round
from services.cluster.breaker import MARGIN, RateLimit
from services.cluster.review import BOOTSTRAPPER, CLIENT_SIGNER, ClusterFacts, CsrInfo
from tests.fakekube import kubelet_csr
from tests.helpers import CONFIG

NOW = 1_000_000.0
RESYNC = 30.0
_PEMS: dict[str, bytes] = {}
NO_NODES = ClusterFacts()


@pytest.fixture(scope="module")
def plan() -> Plan:
    return build_plan(load_inventory(CONFIG / "dgxpod.yaml"))


def _pem(cn: str) -> bytes:
    if cn not in _PEMS:  # EC keys are cheap, but a flood of 100+ is not: one per name
        _PEMS[cn] = kubelet_csr(cn)
    return _PEMS[cn]


def client(
    name: str,
    node: str = "master-0",
    *,
    created: str = "",
    username: str = BOOTSTRAPPER,
    signer: str = CLIENT_SIGNER,
    conditions: Iterable[str] = (),
) -> CsrInfo:
    groups = [
        "system:serviceaccounts",
        "system:serviceaccounts:openshift-machine-config-operator",
        "system:authenticated",
    ]
    if username.startswith("system:node:"):
        groups = ["system:nodes", "system:authenticated"]
    return CsrInfo.from_object(
        {
            "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created},
            "spec": {
                "request": base64.b64encode(_pem(f"system:node:{node}")).decode(),
                "signerName": signer,
                "username": username,
                "groups": groups,
                "usages": ["digital signature", "client auth"],
            },
            "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]},
        }
    )


def junk(i: int) -> CsrInfo:
    return client(f"junk-{i}", "nobody", signer="example.com/spam", username="mallory")


def run(
    plan: Plan,
    csrs: list[CsrInfo],
    *,
    now: float = NOW,
    bucket: RateLimit | None = None,
    facts: ClusterFacts = NO_NODES,
    first_seen: dict[str, float] | None = None,
    looked_up: dict[str, str] | None = None,
    synced: bool = True,
) -> RoundPlan:
    return plan_round(
        csrs,
        plan,
        facts,
        now,
        bucket=bucket if bucket is not None else RateLimit(60, 100),
        first_seen=first_seen or {},
        resync=RESYNC,
        synced=synced,
        looked_up=looked_up,
    )


def verdicts(p: RoundPlan) -> list[tuple[str, str, bool]]:
    return [(s.csr.name, s.decision.verdict, s.conclude) for s in p.steps]


def renewal(name: str, node: str) -> CsrInfo:
    return client(name, node, username=f"system:node:{node}")


def test_breaker_trips_above_nodes_plus_margin(plan: Plan) -> None:
    nodes = len(plan.nodes)
    flood = [junk(i) for i in range(nodes + MARGIN - 1)]
    good = renewal("csr-master-0", "master-0")
    facts = ClusterFacts(frozenset({"master-0"}))
    # nodes + MARGIN pending (the good one included): still closed, approved.
    closed = run(plan, [*flood, good], facts=facts)
    assert not closed.breaker_open and closed.pending == nodes + MARGIN
    assert ("csr-master-0", "approve", True) in verdicts(closed)
    # One more: open, and nothing is approved; the reason names the numbers.
    opened = run(plan, [*flood, junk(999), good], facts=facts)
    assert opened.breaker_open and opened.pending == nodes + MARGIN + 1
    step = next(s for s in opened.steps if s.csr.name == "csr-master-0")
    assert not step.conclude and step.decision.verdict == "pending"
    assert step.decision.reason == (
        f"circuit breaker open: {nodes + MARGIN + 1} pending CSRs exceed {nodes} nodes + {MARGIN}"
    )
    assert not any(s.conclude and s.decision.verdict == "approve" for s in opened.steps)
    assert opened.lookups == ()  # no API lookups for CSRs the breaker holds anyway


def test_breaker_ignores_concluded_and_old_csrs(plan: Plan) -> None:
    flood = [junk(i) for i in range(len(plan.nodes) + MARGIN + 5)]
    approved = [client(f"done-{i}", conditions=["Approved"]) for i in range(3)]
    # Seen (without a creationTimestamp) more than an hour ago: the flood is over.
    old = {f"uid-junk-{i}": NOW - 7200 for i in range(len(flood))}
    p = run(plan, [*flood, *approved], first_seen=old)
    assert not p.breaker_open and p.pending == len(flood)
    assert all(s.csr.name.startswith("junk-") for s in p.steps)
    # first_seen keeps only pending CSRs; new ones are stamped with `now`.
    fresh = run(plan, [junk(0), client("new")], first_seen={"uid-gone": 5.0, **old})
    assert dict(fresh.first_seen) == {"uid-junk-0": NOW - 7200, "uid-new": NOW}


def test_rate_limit_holds_back_beyond_the_burst_and_says_when(plan: Plan) -> None:
    bucket = RateLimit(per_minute=60, burst=2)
    facts = ClusterFacts(frozenset({"master-0", "master-1", "master-2"}))
    csrs = [renewal(f"csr-{n}", n) for n in ("master-0", "master-1", "master-2")]
    p = run(plan, csrs, bucket=bucket, facts=facts)
    assert verdicts(p) == [
        ("csr-master-0", "approve", True),
        ("csr-master-1", "approve", True),
        ("csr-master-2", "pending", False),
    ]
    assert p.steps[2].decision.reason == "rate limited" and p.held == 1
    assert p.delay == pytest.approx(1.0)  # one token a second
    assert bucket.tokens == 2 and bucket.last is None  # the input is not touched
    assert p.bucket.tokens == pytest.approx(0.0)
    # The next round, a second later, with the bucket the plan returned: the third goes.
    later = run(plan, csrs[2:], bucket=p.bucket, facts=facts, now=NOW + 1.0)
    assert verdicts(later) == [("csr-master-2", "approve", True)] and later.held == 0
    assert later.delay == RESYNC


def test_oldest_first_by_creation_then_name(plan: Plan) -> None:
    facts = ClusterFacts(frozenset({"master-0", "master-1", "master-2"}))
    csrs = [
        client("c", "master-2", username="system:node:master-2", created="2026-01-01T00:00:03Z"),
        client("b", "master-1", username="system:node:master-1", created="2026-01-01T00:00:01Z"),
        client("a", "master-0", username="system:node:master-0", created="2026-01-01T00:00:03Z"),
    ]
    p = run(plan, csrs, bucket=RateLimit(60, 1), facts=facts)
    assert verdicts(p) == [("b", "approve", True), ("a", "pending", False), ("c", "pending", False)]


def test_bootstrapper_csr_asks_for_a_node_lookup_first(plan: Plan) -> None:
    csr = client("csr-boot", "worker-0")  # the bootstrapper, for a node the view lacks
    first = run(plan, [csr])
    assert first.lookups == ("worker-0",) and first.steps == ()
    # The API has no such Node: approved.
    absent = run(plan, [csr], looked_up={"worker-0": ""})
    assert absent.lookups == () and verdicts(absent) == [("csr-boot", "approve", True)]
    # The Node exists after all (the watch lagged): the bootstrapper may not have it.
    present = run(plan, [csr], looked_up={"worker-0": "worker-0"})
    assert present.lookups == ()
    assert [s.decision.verdict for s in present.steps] == ["pending"]
    assert "already exists" in present.steps[0].decision.reason


def test_nothing_is_reviewed_before_the_node_list_or_when_approvals_are_off(plan: Plan) -> None:
    csrs = [client("csr-boot", "worker-0")]
    unsynced = run(plan, csrs, synced=False)
    assert unsynced.steps == () and unsynced.lookups == () and unsynced.delay == 0.1
    assert not unsynced.reviewed
    off = dataclasses.replace(
        plan, kubernetes=dataclasses.replace(plan.kubernetes, approve_csrs=False)
    )
    p = run(off, csrs)
    assert p.steps == () and p.delay == RESYNC and not p.breaker_open and not p.reviewed


def test_refused_and_other_signers_are_left_pending_not_concluded(plan: Plan) -> None:
    p = run(plan, [junk(1)])
    assert verdicts(p) == [("junk-1", "pending", False)]
    assert p.bucket.tokens == 100  # a CSR not approved takes no token
