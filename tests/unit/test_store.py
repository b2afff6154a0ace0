"""The SQLite state store: schema, durability settings, leases, install state, events."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.events import Event, EventBus
from appliance.store import (
    DB_NAME,
    SCHEMA_VERSION,
    Lease,
    LeaseConflict,
    LeaseState,
    Store,
    StoreError,
)

MAC_A = "52:54:00:00:00:0a"
MAC_B = "52:54:00:00:00:0b"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as s:
        yield s


def lease(mac: str, ip: str, expires: float = 100.0, state: LeaseState = "bound") -> Lease:
    return Lease(mac, ip, "m0", expires, state, 1.0)


# --- open, schema, pragmas -------------------------------------------------------------


def test_open_creates_dir_and_schema(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "b"
    with Store.open(state_dir) as s:
        assert s.path == state_dir / DB_NAME
    assert state_dir.stat().st_mode & 0o027 == 0  # 0o750 (or tighter, by umask)
    conn = sqlite3.connect(state_dir / DB_NAME)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"events", "node_stage", "leases", "install_state"} <= tables
        columns = [r[1] for r in conn.execute("PRAGMA table_info(leases)")]
        assert columns == ["mac", "ip", "hostname", "expires", "state", "updated"]
    finally:
        conn.close()


def test_connection_pragmas(store: Store) -> None:
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_reopen_keeps_data_and_does_not_migrate_again(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        s.put_lease(lease(MAC_A, "10.0.0.5"))
        s.mark_installed("m0", 5.0)
        s.record_event(Event("m0", "kernel", "vmlinuz", 3.0, "tftp"))
    with Store.open(tmp_path) as s:
        assert s.lease_for_mac(MAC_A) == lease(MAC_A, "10.0.0.5")
        assert s.is_installed("m0")
        assert [e.detail for e in s.events()] == ["vmlinuz"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this appliance supports"):
        Store.open(tmp_path)


def test_unwritable_state_dir(tmp_path: Path) -> None:
    # A directory under a regular file cannot be created, even by root.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=r"cannot open state store .*state.*appliance\.db: "):
        Store.open(blocker / "state")


def test_garbage_db_file(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"this is not an sqlite database\n" * 100)
    with pytest.raises(
        StoreError, match=r"cannot open state store .*appliance\.db: .*not a database"
    ):
        Store.open(tmp_path)


# --- leases ----------------------------------------------------------------------------


def test_put_lease_upserts_by_mac(store: Store) -> None:
    store.put_lease(lease(MAC_A, "10.0.0.5", state="offered"))
    store.put_lease(lease(MAC_A, "10.0.0.6", expires=200.0))
    assert store.lease_for_mac(MAC_A) == lease(MAC_A, "10.0.0.6", expires=200.0)
    assert store.lease_for_ip("10.0.0.5") is None  # the old address is free again
    assert store.leases() == [lease(MAC_A, "10.0.0.6", expires=200.0)]


def test_lease_conflict_refused(store: Store) -> None:
    store.put_lease(lease(MAC_A, "10.0.0.5"))
    with pytest.raises(LeaseConflict, match=f"10.0.0.5 is leased to {MAC_A}"):
        store.put_lease(lease(MAC_B, "10.0.0.5"))
    assert store.lease_for_mac(MAC_B) is None
    assert store.lease_for_ip("10.0.0.5") == lease(MAC_A, "10.0.0.5")
    store.put_lease(lease(MAC_B, "10.0.0.7"))  # the store is still usable after a conflict
    with pytest.raises(LeaseConflict):
        store.put_lease(lease(MAC_B, "10.0.0.5"))  # an update to a taken address too
    assert store.lease_for_mac(MAC_B) == lease(MAC_B, "10.0.0.7")


def test_unknown_lease_state(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown lease state"):
        # Not a LeaseState, on purpose: what the store does with a value mypy would refuse.
        store.put_lease(lease(MAC_A, "10.0.0.5", state="stolen"))  # type: ignore[arg-type]


def test_expiry(store: Store) -> None:
    store.put_lease(lease(MAC_A, "10.0.0.5", expires=100.0))
    store.put_lease(lease(MAC_B, "10.0.0.6", expires=50.0, state="declined"))
    assert [x.mac for x in store.leases(now=60.0)] == [MAC_A]
    assert [x.mac for x in store.leases(now=100.0)] == [MAC_A]  # expires at, not before
    assert len(store.leases()) == 2
    assert store.expire_leases(60.0) == 1
    assert store.lease_for_mac(MAC_B) is None
    assert store.expire_leases(60.0) == 0
    assert store.expire_leases(101.0) == 1
    assert store.leases() == []


def test_delete_lease(store: Store) -> None:
    store.put_lease(lease(MAC_A, "10.0.0.5"))
    assert store.delete_lease(MAC_A)
    assert not store.delete_lease(MAC_A)
    store.put_lease(lease(MAC_B, "10.0.0.5"))  # the address can go to someone else now


# --- install state ---------------------------------------------------------------------


def test_install_state(store: Store) -> None:
    assert not store.is_installed("m0")
    store.mark_installed("m0", 10.0)
    assert store.is_installed("m0")
    store.request_reinstall("m0", 20.0)
    assert not store.is_installed("m0")
    store.request_reinstall("w1", 21.0)  # a node never seen before
    store.mark_installed("m0", 30.0)
    assert store.install_state() == {
        "m0": {"installed_at": 30.0, "reinstall_requested": 20.0},
        "w1": {"installed_at": None, "reinstall_requested": 21.0},
    }


# --- events and progress ---------------------------------------------------------------


def test_record_events_assigns_ids_and_filters(store: Store) -> None:
    first = store.record_event(Event("m0", "dhcp-offer", "", 1.0, "dhcp"))
    assert first.id > 0
    rest = store.record_events(
        [Event("m1", "dhcp-offer", "", 2.0, "dhcp"), Event("m0", "dhcp-ack", "10.0.0.5", 3.0)]
    )
    assert [e.id for e in rest] == [first.id + 1, first.id + 2]
    assert store.events() == [first, *rest]
    assert store.events(node="m0") == [first, rest[1]]
    assert store.events(after_id=first.id) == rest
    assert store.events(limit=1) == [first]
    assert store.record_events([]) == []


def test_progress(store: Store) -> None:
    store.record_events(
        [
            Event("m0", "kernel", "vmlinuz", 5.0),
            Event("m0", "dhcp-offer", "10.0.0.5", 1.0),
            Event("m0", "dhcp-offer", "10.0.0.5 again", 4.0),
            Event("m0", "dhcp-offer", "late arrival", 2.0),  # older: keeps the newer detail
            Event("w1", "dhcp-offer", "10.0.0.7", 3.0),
        ]
    )
    progress = store.progress()
    assert list(progress) == ["m0", "w1"]
    assert list(progress["m0"]) == ["dhcp-offer", "kernel"]  # install order, not time order
    assert progress["m0"]["dhcp-offer"] == (1.0, 4.0, "10.0.0.5 again")
    assert progress["m0"]["kernel"] == (5.0, 5.0, "vmlinuz")
    assert progress["w1"] == {"dhcp-offer": (3.0, 3.0, "10.0.0.7")}


async def test_persist_from_bus(store: Store) -> None:
    bus = EventBus()
    task = asyncio.create_task(store.persist(bus))
    await asyncio.sleep(0)  # let it subscribe
    assert bus.subscribers == 1
    for i in range(50):
        bus.publish(f"n{i % 5}", "ignition", str(i), source="http", time=float(i))
    for _ in range(100):  # bounded wait for the batch to land
        if len(store.events(limit=100)) == 50:
            break
        await asyncio.sleep(0.01)
    assert [e.detail for e in store.events(limit=100)] == [str(i) for i in range(50)]
    # Published right before cancellation: still written on the way out.
    bus.publish("n0", "node-ready", time=99.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.events(limit=100)[-1].stage == "node-ready"
    assert bus.subscribers == 0
    assert store.progress()["n0"]["node-ready"] == (99.0, 99.0, "")


def test_csr_decisions_and_cluster_state_survive_reopen(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        first = store.record_csr_decision(
            time=1.0, csr="csr-a", kind="client", decision="approve", reason="ok", node="m0"
        )
        store.record_csr_decision(
            time=2.0, csr="csr-b", kind="other", decision="pending", reason="unknown signer"
        )
        store.set_cluster_state("gpu", {"step": "nfd", "since": 1.5}, 2.0)
        store.set_cluster_state("gpu", {"step": "gpu-operator", "since": 3.0}, 3.0)
    with Store.open(tmp_path) as store:
        rows = store.csr_decisions()
        assert [r["csr"] for r in rows] == ["csr-b", "csr-a"]
        assert rows[1]["id"] == first and rows[1]["decision"] == "approve"
        assert store.cluster_state("gpu") == {"step": "gpu-operator", "since": 3.0}
        assert store.cluster_state("missing") is None


def test_refused_attempts_are_recorded_but_do_not_reach_the_stage(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.record_events(
            [
                Event("m0", "csr-client", "csr-1 pending: unknown node", 1.0, "cluster", ok=False),
                Event("m0", "ignition", "http master.ign", 2.0, "http"),
            ]
        )
        assert "csr-client" not in store.progress()["m0"]
        assert "ignition" in store.progress()["m0"]
        refused, reached = store.events(node="m0")
        assert (refused.ok, reached.ok) == (False, True)
        assert refused.to_dict()["ok"] is False
