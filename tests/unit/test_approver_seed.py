"""The approver learns what it decided before a restart without a synchronous store
read on the event loop: its constructor touches no store, its run() reads through the
store's reader (off the loop), and what it read is what it will not store again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.events import EventBus
from appliance.inventory import load_inventory
from appliance.plan import Plan, build_plan
from appliance.service import ServiceContext
from services.cluster.approver import Approver
from services.cluster.nodes import ClusterView

T = TypeVar("T")
CONFIG = Path(__file__).resolve().parents[2] / "config" / "example.yaml"


class _Reader:
    """The reader thread's connection."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows

    def csr_decisions(self, limit: int = 500) -> list[dict[str, object]]:
        return self.rows[:limit]


class LoopGuardStore:
    """Stored decisions reachable only through the async reader: a synchronous read on
    the loop fails the test."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows
        self.reads = 0

    def csr_decisions(self, limit: int = 500) -> list[dict[str, object]]:
        raise AssertionError("synchronous store read on the event loop")

    async def read(self, fn: Callable[[Any], T], **_: Any) -> T:
        self.reads += 1
        return fn(_Reader(self.rows))


class _Stop(Exception):
    pass


class NoKube:
    """run() ends at its first call to the API, right after seeding."""

    def __getattr__(self, name: str) -> Any:
        raise _Stop


def _approver(store: LoopGuardStore) -> Approver:
    plan: Plan = build_plan(load_inventory(CONFIG))
    ctx = ServiceContext(
        bus=EventBus(),
        store=store,  # type: ignore[arg-type]  # only read() and csr_decisions, on purpose
        log=logging.getLogger("t"),
        runtime=None,  # type: ignore[arg-type]  # the approver never reaches it here
    )
    return Approver(ctx, lambda: plan, ClusterView(), resync=60.0, watch_timeout=30.0)


async def test_decisions_from_before_a_restart_are_read_off_the_loop() -> None:
    # Newest first, as the store returns them: b was left pending, then denied.
    rows: list[dict[str, object]] = [
        {"uid": "b", "decision": "deny", "reason": "not in the inventory"},
        {"uid": "b", "decision": "pending", "reason": "breaker open"},
        {"uid": "a", "decision": "pending", "reason": "rate limited"},
        {"uid": "", "decision": "deny", "reason": "no uid: not remembered"},
    ]
    store = LoopGuardStore(rows)
    approver = _approver(store)  # no synchronous read here
    assert store.reads == 0
    for _ in range(2):  # run() again (a reconnect): read once, not again
        with pytest.raises(_Stop):
            await asyncio.wait_for(approver.run(NoKube()), 5)  # type: ignore[arg-type]  # a stub API
    assert store.reads == 1
    assert approver.recorded == {
        "b": ("deny", "not in the inventory"),
        "a": ("pending", "rate limited"),
    }
