"""The daemon's queued store (appliance/storequeue.py) against a lock held by another
connection: calls return at once, memory answers at once, SQLITE_BUSY is retried and
counted, nothing is lost, overflow is counted, a poison write goes alone, a stop is
bounded. The lock is a second sqlite3 connection with `BEGIN EXCLUSIVE` open, as an
operator's shell holds it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance import storequeue
from appliance.events import Event, EventBus
from appliance.store import DB_NAME, Store
from appliance.storequeue import DaemonStore, StoreBusy, _Op


@contextmanager
def locked(state: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(state / DB_NAME, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield conn
        if conn.in_transaction:
            conn.execute("COMMIT")
    finally:
        conn.close()


def wait_for(check: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.005)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[DaemonStore]:
    store = DaemonStore.open(tmp_path)
    yield store
    store.close()


def test_writes_wait_out_a_held_lock_in_order_and_memory_answers_meanwhile(
    live: DaemonStore, tmp_path: Path
) -> None:
    with locked(tmp_path):
        t0 = time.monotonic()
        for i in range(50):
            live.record_event(Event("master-0", "kernel", f"k{i}", 100.0 + i, "http"))
        live.mark_installed("master-0", 200.0)
        live.set_cluster_state("gpu", {"step": "nfd"}, 201.0)
        live.record_csr_decision(time=202.0, csr="csr-1", kind="client", decision="approve",
                                 reason="ok", node="master-0")  # fmt: skip
        assert time.monotonic() - t0 < 0.05  # no call waited for the lock
        # What the hot paths read is in memory, up to date.
        assert live.install_state()["master-0"]["installed_at"] == 200.0
        assert live.cluster_state("gpu") == {"step": "nfd"}
        assert live.progress()["master-0"]["kernel"] == (100.0, 149.0, "k49")
        wait_for(lambda: live.stats()["busy"] >= 2)
        stats = live.stats()
        assert stats["queued"] == 53 and stats["written"] == 0 and stats["retries"] >= 2
    wait_for(lambda: live.stats()["queued"] == 0)
    stats = live.stats()
    assert stats["written"] == 53 and stats["lost"] == stats["failed"] == 0
    with Store.open(tmp_path) as s:
        assert [e.detail for e in s.events(limit=100)] == [f"k{i}" for i in range(50)]
        assert s.install_state()["master-0"]["installed_at"] == 200.0
        assert s.cluster_state("gpu") == {"step": "nfd"}
        assert [d["csr"] for d in s.csr_decisions()] == ["csr-1"]
        assert s.progress()["master-0"]["kernel"] == (100.0, 149.0, "k49")


def test_a_stop_flushes_and_a_locked_stop_is_bounded_and_counts_what_is_lost(
    tmp_path: Path,
) -> None:
    live = DaemonStore.open(tmp_path)
    for i in range(10):
        live.record_event(Event("n", "kernel", str(i), float(i)))
    live.close()  # no lock: everything is written
    with Store.open(tmp_path) as s:
        assert len(s.events()) == 10

    live = DaemonStore.open(tmp_path)
    with locked(tmp_path):
        for i in range(5):
            live.record_event(Event("n", "initramfs", str(i), float(i)))
        live.request_reinstall("n", 9.0)
        t0 = time.monotonic()
        assert live.writer.close(timeout=0.2) is False
        assert time.monotonic() - t0 < 1.0
    assert live.stats()["lost"] == 6
    live.close()
    with Store.open(tmp_path) as s:
        assert len(s.events()) == 10


def test_a_stop_waits_for_a_lock_released_in_time(tmp_path: Path) -> None:
    live = DaemonStore.open(tmp_path)
    with locked(tmp_path) as conn:
        live.record_event(Event("n", "kernel", "late", 1.0))
        loop_free = asyncio.new_event_loop()
        try:
            closing = loop_free.create_task(live.aclose(timeout=5.0))
            loop_free.run_until_complete(asyncio.sleep(0.2))
            assert not closing.done()
            conn.execute("COMMIT")  # the operator quits the shell
            assert loop_free.run_until_complete(closing) is True
        finally:
            loop_free.close()
    with Store.open(tmp_path) as s:
        assert [e.detail for e in s.events()] == ["late"]


def test_overflow_is_counted_and_kept_and_only_the_hard_bound_drops_events(
    live: DaemonStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storequeue, "QUEUE_SOFT", 10)
    monkeypatch.setattr(storequeue, "QUEUE_HARD", 40)
    with locked(tmp_path):
        live.mark_installed("keep-me", 1.0)  # not an event: never dropped
        for i in range(50):
            live.record_event(Event("n", "kernel", str(i), float(i)))
        stats = live.stats()
        assert stats["overflow"] == 51 - 10 and stats["lost"] == 11
        assert stats["queued"] == 40 and stats["queue_peak"] == 40
    wait_for(lambda: live.stats()["queued"] == 0)
    with Store.open(tmp_path) as s:
        # The oldest events went; the newest are all there, in order.
        assert [e.detail for e in s.events(limit=100)] == [str(i) for i in range(11, 50)]
        assert s.install_state()["keep-me"]["installed_at"] == 1.0


def test_a_poison_write_is_dropped_alone(live: DaemonStore, tmp_path: Path) -> None:
    def poison(s: object) -> None:
        raise ValueError("never storable")

    live.record_event(Event("n", "kernel", "before", 1.0))
    live.writer.submit(_Op("poison", poison))
    live.record_event(Event("n", "kernel", "after", 2.0))
    wait_for(lambda: live.stats()["queued"] == 0)
    assert live.stats()["failed"] == 1 and live.stats()["written"] == 2
    with Store.open(tmp_path) as s:
        assert [e.detail for e in s.events()] == ["before", "after"]


async def test_reads_see_their_writes_and_do_not_wait_for_a_lock(
    live: DaemonStore, tmp_path: Path
) -> None:
    live.record_csr_decision(time=1.0, csr="csr-a", kind="other", decision="deny", reason="x")
    rows = await live.read(lambda s: s.csr_decisions())
    assert [r["csr"] for r in rows] == ["csr-a"]  # the queued write landed first
    with locked(tmp_path):
        live.record_csr_decision(time=2.0, csr="csr-b", kind="other", decision="deny", reason="y")
        t0 = time.monotonic()
        assert await live.synced(0.1) is False
        rows = await live.read(lambda s: s.csr_decisions(), sync_wait=0.1)
        assert time.monotonic() - t0 < 0.5
        assert [r["csr"] for r in rows] == ["csr-a"]  # WAL: the last committed state
    assert await live.synced(5.0) is True
    assert len(await live.read(lambda s: s.csr_decisions())) == 2


async def test_a_read_that_finds_the_file_locked_says_busy(live: DaemonStore) -> None:
    def locked_read(s: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(StoreBusy, match="is locked"):
        await live.read(locked_read)


async def test_persist_queues_the_bus_and_drains_it_when_cancelled(
    live: DaemonStore, tmp_path: Path
) -> None:
    bus = EventBus()
    task = asyncio.create_task(live.persist(bus))
    await asyncio.sleep(0)
    with locked(tmp_path):
        for i in range(20):
            bus.publish("master-0", "ignition", str(i), time=float(i))
        await asyncio.sleep(0.05)
        bus.publish("master-0", "node-ready", time=99.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bus.subscribers == 0 and bus.dropped == 0
        assert live.stats()["queued"] == 21
        assert "node-ready" in live.progress()["master-0"]
    assert await live.synced(5.0)
    with Store.open(tmp_path) as s:
        assert len(s.events(limit=100)) == 21


def test_dropped_events_never_let_done_pass_a_write_still_waiting(
    live: DaemonStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the hard bound events are dropped; `done` (what a read's `synced` waits on)
    must still stay below a write that waits, whatever the drops (it was bumped per
    drop, so reads reported up to date with the install mark unwritten)."""
    monkeypatch.setattr(storequeue, "QUEUE_SOFT", 10)
    monkeypatch.setattr(storequeue, "QUEUE_HARD", 40)
    with locked(tmp_path):
        live.record_event(Event("n", "kernel", "first", 0.0))
        wait_for(lambda: live.stats()["busy"] >= 1)  # the writer holds it, waiting
        live.mark_installed("m", 1.0)
        mark = live.writer.seq
        for i in range(200):
            live.record_event(Event("n", "kernel", str(i), float(i)))
        assert live.stats()["lost"] > mark
        assert live.writer.done < mark  # the mark waits: no read may pass it
    wait_for(lambda: live.stats()["queued"] == 0)
    assert live.writer.done == live.writer.seq
    with Store.open(tmp_path) as s:
        assert s.install_state()["m"]["installed_at"] == 1.0


def test_dropping_past_the_hard_bound_is_cheap_whatever_waits_before_the_events(
    live: DaemonStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each drop ran over the queue from its head to the first event, on the event loop
    and under the lock: with many other writes ahead of the events, every submit paid."""
    monkeypatch.setattr(storequeue, "QUEUE_SOFT", 100_000)
    monkeypatch.setattr(storequeue, "QUEUE_HARD", 20_000)
    held = True

    def op(s: object) -> None:  # a write that finds the file locked while `held`
        if held:
            raise sqlite3.OperationalError("database is locked")

    for _ in range(19_990):
        live.writer.submit(_Op("op", op))
    for i in range(10):
        live.record_event(Event("n", "kernel", str(i), float(i)))
    t0 = time.monotonic()
    for i in range(2000):
        live.record_event(Event("n", "kernel", f"late{i}", float(i)))
    assert time.monotonic() - t0 < 0.3
    assert live.stats()["lost"] == 2000
    held = False
    wait_for(lambda: live.stats()["queued"] == 0)
    with Store.open(tmp_path) as s:  # the newest events, in order
        assert [e.detail for e in s.events(limit=3000)] == [f"late{i}" for i in range(1990, 2000)]
