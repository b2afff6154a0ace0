"""The CSR approver: list+watch CertificateSigningRequests, review each pending one.

The watch only fills a cache; one loop reviews the pending CSRs in it (after each
change, and every `resync` seconds, so CSRs held back by the rate limit or the
breaker, or waiting for an inventory reload, are looked at again). Approval goes
through the approval subresource with the resourceVersion the review saw: if the CSR
changed meanwhile (409), it is read again and reviewed again, so a CSR is never
approved twice nor approved on stale facts. Each decision is stored once per CSR and
reason; every decision about a node is published as its csr-client / csr-serving event (refusals
with ok=False, so the node does not count as having reached the stage).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from appliance.plan import Plan
from appliance.tasks import cancel_and_wait
from services.cluster.access import Attributes
from services.cluster.approval_round import RATE_LIMITED, plan_round
from services.cluster.breaker import RateLimit
from services.cluster.informer import Informer
from services.cluster.kube import CSRS, NODES, Forbidden, Kube, KubeError
from services.cluster.nodes import ClusterView, node_fields
from services.cluster.review import CsrInfo, Decision

if TYPE_CHECKING:
    from appliance.service import ServiceContext

STAGE = {"client": "csr-client", "serving": "csr-serving"}
LAST = 20  # decisions kept for status()
APPROVER = "ApplianceApproved"  # the condition reason the cluster shows


def _rfc3339(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Approver:
    def __init__(
        self,
        ctx: ServiceContext,
        plan: Callable[[], Plan],
        view: ClusterView,
        resync: float,
        watch_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = ctx
        self.plan = plan
        self.view = view
        self.resync = resync
        self.watch_timeout = watch_timeout
        self.clock = clock
        self.log = logging.getLogger("appliance.cluster.csr")
        k8s = plan().kubernetes
        self.limit = RateLimit(k8s.approvals_per_minute, k8s.approval_burst)
        self.objects: dict[str, dict[str, Any]] = {}  # by CSR name, as last seen
        self.first_seen: dict[str, float] = {}  # by uid: for the breaker when no timestamp
        # uid -> (verdict, reason) last stored: one record per CSR and reason, also
        # across restarts (seeded from the store by the first run(), off the loop).
        self.recorded: dict[str, tuple[str, str]] = {}
        self._seeded = False
        self.counts: Counter[str] = Counter()
        self.last: deque[dict[str, Any]] = deque(maxlen=LAST)
        self.breaker = False
        self.held = 0  # approvals waiting for the rate limit right now
        self.approvals = 0
        self.conflicts = 0
        self.informer: Informer | None = None
        # The last round's refusal by the API (e.g. no `approve` on one signer): the CSRs
        # of other signers are still concluded; status() shows the rule that is missing.
        self.refused: Forbidden | None = None
        self._said_refused = ""
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def reconfigure(self, plan: Plan) -> None:
        k8s = plan.kubernetes
        self.limit.reconfigure(k8s.approvals_per_minute, k8s.approval_burst)
        self._wake.set()  # a new inventory may make pending CSRs approvable

    def status(self) -> dict[str, Any]:
        informer = self.informer
        return {
            "decisions": dict(self.counts),
            "approved": self.approvals,
            "pending_csrs": sum(1 for o in self.objects.values() if _pending(o)),
            "breaker_open": self.breaker,
            "rate_limited": self.held,
            "conflicts": self.conflicts,
            "relists": informer.lists if informer else 0,
            "watch_410": informer.gone if informer else 0,
            "last": list(self.last),
        }

    # --- the loop ----------------------------------------------------------------------

    async def _seed(self) -> None:
        """What was stored before this start, read in the store's reader thread."""
        rows = await self.ctx.store.read(lambda s: s.csr_decisions(limit=2000))
        for row in reversed(rows):  # oldest first: the latest decision per uid stays
            if row.get("uid"):
                self.recorded[str(row["uid"])] = (str(row["decision"]), str(row["reason"]))
        self._seeded = True

    async def run(self, kube: Kube) -> None:
        if not self._seeded:  # once: later runs (reconnects) know more than the store
            await self._seed()
        self.informer = Informer(
            kube, CSRS, self._listed, self._event, watch_timeout=self.watch_timeout
        )
        watch = asyncio.create_task(self.informer.run(), name="csr-watch")
        watch.add_done_callback(lambda _: self._wake.set())  # its error surfaces at once
        try:
            while True:
                if watch.done():
                    watch.result()  # Unreachable, KubeError: to the caller
                    raise KubeError(0, "WatchEnded", "the CSR watch ended")
                delay = await self.review_pending(kube)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self.resync, delay)):  # cancel-safe
                        await self._wake.wait()
                self._wake.clear()
        finally:
            # Its error, if it ended first, was raised above; otherwise it is retrieved here.
            await cancel_and_wait(watch, log=self.log, what="watch")

    def _listed(self, items: list[dict[str, Any]]) -> None:
        self.objects = {}
        for obj in items:
            name = (obj.get("metadata") or {}).get("name")
            if isinstance(name, str):
                self.objects[name] = obj
        self._wake.set()

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str):
            return
        if kind == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
        self._wake.set()

    async def review_pending(self, kube: Kube) -> float:
        """One round: approval_round.plan_round decides, this fetches and applies.

        Returns how soon to look again (the rate limit's next token, at the latest resync).
        """
        plan = self.plan()
        now = self.clock()
        # Each CSR with the very object reviewed: the approval carries its resourceVersion,
        # so a CSR changed while we were busy (the watch runs on) gets a 409, not a blind write.
        csrs: list[CsrInfo] = []
        objects: dict[str, dict[str, Any]] = {}
        unreadable: list[tuple[str, ValueError]] = []
        for name, obj in list(self.objects.items()):
            try:
                csr = CsrInfo.from_object(obj)
            except ValueError as err:
                unreadable.append((name, err))
                continue
            csrs.append(csr)
            objects[csr.name] = obj
        facts = self.view.facts()
        synced = self.view.synced
        looked_up: dict[str, str] = {}
        while True:
            # Computed again after the lookups (they await): the bucket it returns is then
            # taken at once, so a reload's reconfigure() in between is not lost.
            rnd = plan_round(
                csrs,
                plan,
                facts,
                now,
                bucket=self.limit,
                first_seen=self.first_seen,
                resync=self.resync,
                synced=synced,
                looked_up=looked_up,
            )
            if not rnd.lookups:
                break
            for node in rnd.lookups:
                looked_up[node] = await self._existing_node(kube, plan, node)
        if not rnd.reviewed:
            return rnd.delay
        for name, problem in unreadable:
            self.log.warning("CSR %s cannot be read: %s", name, problem)
        self.limit, self.first_seen = rnd.bucket, dict(rnd.first_seen)
        was_open, self.breaker = self.breaker, rnd.breaker_open
        if self.breaker and not was_open:
            self.log.warning(
                "circuit breaker open: %d pending CSRs for %d inventory nodes; no approvals",
                rnd.pending,
                len(plan.nodes),
            )
        elif was_open and not self.breaker:
            self.log.info("circuit breaker closed: approving again")
        self.held = rnd.held
        refused: Forbidden | None = None
        for action in rnd.steps:
            if not action.conclude:
                self._record(action.csr, action.decision)
                continue
            try:
                await self._conclude(kube, action.csr, objects[action.csr.name], action.decision)
            except Forbidden as exc:
                # Refused for this CSR's signer (or the approval subresource): leave it
                # pending with the reason, go on with the others, look again next round.
                refused = self._refused(action.csr, action.decision, exc)
        self.refused = refused
        return rnd.delay

    def _refused(self, csr: CsrInfo, decision: Decision, exc: Forbidden) -> Forbidden:
        if "not permitted to approve requests with signerName" in exc.message:
            # The CertificateApproval admission check: `approve` on signers/<signerName>.
            exc.needs = Attributes("approve", "certificates.k8s.io", "signers", name=csr.signer)
        needs = exc.needs.describe() if exc.needs else "a permission"
        self._record(
            csr, Decision("pending", f"forbidden: needs {needs}", decision.kind, decision.node)
        )
        if self._said_refused != needs:
            self._said_refused = needs
            rule = exc.needs.rule_text() if exc.needs else "(unknown rule)"
            self.log.warning(
                "cannot conclude %s: %s; add the %s (`appliance render --as rbac`)",
                csr.name,
                exc.message or exc.reason,
                rule,
            )
        return exc

    async def _existing_node(self, kube: Kube, plan: Plan, node: str) -> str:
        info = plan.by_name.get(node)
        for name in (info.name, info.fqdn) if info else ():
            if await kube.get(NODES, name) is not None:
                return name
        return ""

    async def _conclude(
        self, kube: Kube, csr: CsrInfo, obj: dict[str, Any], decision: Decision
    ) -> None:
        """Approve or deny through the approval subresource, guarded by resourceVersion."""
        body = copy.deepcopy(obj)
        status = body.setdefault("status", {})
        condition = {
            "type": "Approved" if decision.verdict == "approve" else "Denied",
            "status": "True",
            "reason": APPROVER if decision.verdict == "approve" else "ApplianceDenied",
            "message": f"appliance: {decision.reason}",
            "lastUpdateTime": _rfc3339(self.clock()),
        }
        status["conditions"] = [*(status.get("conditions") or []), condition]
        try:
            answer = await kube.replace(CSRS, csr.name, body, sub="approval")
        except KubeError as exc:
            if exc.status == 409:
                # Changed since we looked (approved by someone, or recreated): read it
                # again and review again on the next round.
                self.conflicts += 1
                fresh = await kube.get(CSRS, csr.name)
                if fresh is None:
                    self.objects.pop(csr.name, None)
                else:
                    self.objects[csr.name] = fresh
                self._wake.set()
                return
            if exc.status == 404:
                self.objects.pop(csr.name, None)
                return
            raise
        if answer:
            self.objects[csr.name] = answer  # approved now, even before the watch says so
        self._record(csr, decision, final=True)
        if decision.verdict == "approve":
            self.approvals += 1
            self.log.info(
                "approved %s (%s): %s",
                csr.name,
                csr.username,
                decision.reason,
                extra=self._fields(decision),
            )
            if decision.node and decision.kind in STAGE:
                self.ctx.bus.publish(
                    decision.node,
                    STAGE[decision.kind],
                    f"{csr.name} approved: {decision.reason}",
                    source="cluster",
                    time=self.clock(),
                )
        else:
            self.log.warning(
                "denied %s (%s): %s",
                csr.name,
                csr.username,
                decision.reason,
                extra=self._fields(decision),
            )

    def _record(self, csr: CsrInfo, decision: Decision, final: bool = False) -> None:
        key = csr.uid or csr.name
        entry = (decision.verdict, decision.reason)
        if not final and self.recorded.get(key) == entry:
            return  # already stored with this very reason
        self.recorded[key] = entry
        now = self.clock()
        self.ctx.store.record_csr_decision(
            time=now,
            csr=csr.name,
            uid=csr.uid,
            kind=decision.kind,
            node=decision.node,
            requestor=csr.username,
            decision=decision.verdict,
            reason=decision.reason,
        )
        self.counts[decision.verdict] += 1
        if decision.verdict != "approve" and decision.node and decision.kind in STAGE:
            # Refusals are published too (once per CSR and reason), so the dashboard and
            # watchers see why a node is stuck; ok=False keeps the node short of the stage.
            word = "denied" if decision.verdict == "deny" else "left pending"
            self.ctx.bus.publish(
                decision.node,
                STAGE[decision.kind],
                f"{csr.name} {word}: {decision.reason}",
                source="cluster",
                time=now,
                ok=False,
            )
        self.last.appendleft(
            {
                "time": now,
                "csr": csr.name,
                "kind": decision.kind,
                "node": decision.node,
                "requestor": csr.username,
                "decision": decision.verdict,
                "reason": decision.reason,
            }
        )
        if decision.verdict == "pending" and decision.reason != RATE_LIMITED:
            self.log.warning(
                "left %s (%s, %s) pending: %s",
                csr.name,
                csr.username or "no requestor",
                decision.kind,
                decision.reason,
                extra=self._fields(decision),
            )

    def _fields(self, decision: Decision) -> dict[str, str]:
        """The log fields of the node a decision is for (none when it matched no node)."""
        return node_fields(self.plan(), decision.node) if decision.node else {}


def _pending(obj: dict[str, Any]) -> bool:
    return not ((obj.get("status") or {}).get("conditions"))
