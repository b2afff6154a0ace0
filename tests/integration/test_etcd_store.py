"""The state store in etcd (appliance/etcdstore.py) against a real three-member etcd
(tests/etcdrig.py), broken the way a pair of appliances breaks it: two members giving
out one address at once, an etcd member killed, every member down, another member's
lease already on the address the DHCP service decided to ACK. And the SQLite store's
own behaviour tests, run again over etcd (parity)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from appliance import etcdstore
from appliance.etcd import EtcdClient, EtcdError, prefix_end
from appliance.etcdstore import EtcdStore
from appliance.events import Event, EventBus
from appliance.registry import DHCP
from appliance.storequeue import DaemonStore, LeaseConnection, _Op
from appliance.stores import (
    Lease,
    LeaseConflict,
    StoreBusy,
    StoreUnavailable,
    UnknownMachine,
)
from services.dhcp import server as dhcp_server
from tests.etcdrig import EtcdCluster
from tests.helpers import free_port, loopback_inventory, write_inventory
from tests.unit import test_store as sqlite_cases

pytestmark = pytest.mark.tool("etcd")

TIMEOUT = 1.0
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One cluster for the tests that kill nothing (each gets a prefix of its own)."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def _client(cluster: EtcdCluster, first: int = 0) -> EtcdClient:
    # A member of the pair talks to its own etcd member first.
    order = cluster.endpoints[first:] + cluster.endpoints[:first]
    return EtcdClient(order, timeout=TIMEOUT)


@pytest.fixture
def prefix() -> str:
    return f"/appliance/test{next(_prefixes)}"


@pytest.fixture
def store(shared_etcd: EtcdCluster, prefix: str) -> Iterator[EtcdStore]:
    with EtcdStore(_client(shared_etcd), prefix, owns_client=True) as s:
        yield s


def lease(mac: str, ip: str, expires: float = 100.0, updated: float = 1.0) -> Lease:
    return Lease(mac, ip, None, expires, "bound", updated)


# --- parity: the SQLite store's behaviour tests, over etcd ---------------------------------

PARITY: list[Callable[[Any], None]] = [
    sqlite_cases.test_put_lease_upserts_by_mac,
    sqlite_cases.test_lease_conflict_refused,
    sqlite_cases.test_unknown_lease_state,
    sqlite_cases.test_expiry,
    sqlite_cases.test_delete_lease,
    sqlite_cases.test_install_state,
    sqlite_cases.test_record_events_assigns_ids_and_filters,
    sqlite_cases.test_progress,
]


@pytest.mark.parametrize("case", PARITY, ids=lambda f: f.__name__)
def test_sqlite_store_behaviour_holds_over_etcd(
    case: Callable[[Any], None], store: EtcdStore
) -> None:
    case(store)


def test_csr_decisions_cluster_state_and_unknown_machines_over_etcd(
    shared_etcd: EtcdCluster, prefix: str
) -> None:
    # test_store.py's reopen test, reopened as a new client (another member) is.
    with EtcdStore(_client(shared_etcd), prefix, owns_client=True) as a:
        first = a.record_csr_decision(
            time=1.0, csr="csr-a", kind="client", decision="approve", reason="ok", node="m0"
        )
        a.record_csr_decision(
            time=2.0, csr="csr-b", kind="other", decision="pending", reason="unknown signer"
        )
        a.set_cluster_state("gpu", {"step": "nfd", "since": 1.5}, 2.0)
        a.set_cluster_state("gpu", {"step": "gpu-operator", "since": 3.0}, 3.0)
        a.note_unknown("52:54:00:aa:00:01", 5.0, vendor_class="PXEClient")
        a.note_unknown("52:54:00:aa:00:01", 7.0, vendor_class="PXEClient")
        a.note_unknown("52:54:00:aa:00:02", 6.0)
    with EtcdStore(_client(shared_etcd, 1), prefix, owns_client=True) as b:
        rows = b.csr_decisions()
        assert [r["csr"] for r in rows] == ["csr-b", "csr-a"]
        assert rows[1]["id"] == first and rows[1]["decision"] == "approve"
        assert b.csr_decisions(limit=1)[0]["csr"] == "csr-b"
        assert b.csr_decision_counts() == {"approve": 1, "pending": 1}
        assert b.cluster_state("gpu") == {"step": "gpu-operator", "since": 3.0}
        assert b.cluster_state("missing") is None
        assert b.cluster_states() == {"gpu": '{"since": 3.0, "step": "gpu-operator"}'}
        machines = b.unknown_machines()
        assert [(m["mac"], m["seen"], m["last_seen"]) for m in machines] == [
            ("52:54:00:aa:00:01", 2, 7.0),
            ("52:54:00:aa:00:02", 1, 6.0),
        ]
        assert b.unknown_machine_counts() == (2, 0)
        # Bounded: the least recently seen go first, counted (with the caller's `lost`).
        evicted = b.note_unknowns([UnknownMachine("52:54:00:aa:00:03", 8, 8, 1)], 2, 5)
        assert evicted == 1
        assert [m["mac"] for m in b.unknown_machines()] == [
            "52:54:00:aa:00:03",
            "52:54:00:aa:00:01",
        ]
        assert b.unknown_machine_counts() == (2, 6)


# --- two members allocating at once ---------------------------------------------------------


def test_two_members_never_give_one_address_to_two_macs(
    shared_etcd: EtcdCluster, prefix: str
) -> None:
    rounds = 200
    a = EtcdStore(_client(shared_etcd, 0), prefix, owns_client=True)
    b = EtcdStore(_client(shared_etcd, 1), prefix, owns_client=True)
    barrier = threading.Barrier(2, timeout=10)
    outcome: dict[tuple[int, str], str] = {}

    def ip_of(i: int) -> str:
        return f"10.9.{i // 250}.{i % 250 + 1}"

    def member(store: EtcdStore, side: str) -> None:
        # Each round, a new client of each member asks for the same free address.
        for i in range(rounds):
            mac = f"52:54:00:{side}:{i // 256:02x}:{i % 256:02x}"
            barrier.wait()
            try:
                store.save_leases([lease(mac, ip_of(i), expires=1e10, updated=time.time())])
                outcome[(i, side)] = mac
            except LeaseConflict as exc:
                assert [x.mac for x in exc.refused] == [mac]
                assert [x.mac for x in exc.holders] != [mac]
                outcome[(i, side)] = "conflict"

    threads = [
        threading.Thread(target=member, args=(a, "0a")),
        threading.Thread(target=member, args=(b, "0b")),
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        stored = {x.ip: x.mac for x in a.leases()}
        assert len(stored) == rounds == len(a.leases())  # never one address twice
        for i in range(rounds):
            got = [outcome[(i, "0a")], outcome[(i, "0b")]]
            assert got.count("conflict") == 1, (i, got)  # exactly one refused
            winner = next(r for r in got if r != "conflict")
            assert stored[ip_of(i)] == winner
            assert b.lease_for_ip(ip_of(i)) == a.lease_for_ip(ip_of(i))
    finally:
        a.close()
        b.close()


def test_a_batch_stores_all_but_the_refused_and_a_moving_mac_frees_its_address(
    store: EtcdStore,
) -> None:
    other = "52:54:00:00:00:0b"
    store.save_leases([lease(other, "10.0.0.9", expires=1e10)])
    batch = [
        lease(f"52:54:00:00:01:{i:02x}", f"10.0.1.{i}", updated=time.time()) for i in range(60)
    ]
    batch.append(lease("52:54:00:00:00:0a", "10.0.0.9", updated=time.time()))
    with pytest.raises(LeaseConflict) as caught:
        store.save_leases(batch)  # more than one transaction's worth (chunks)
    assert [x.mac for x in caught.value.refused] == ["52:54:00:00:00:0a"]
    assert [x.mac for x in caught.value.holders] == [other]
    assert len(store.leases()) == 61
    assert store.lease_for_mac("52:54:00:00:00:0a") is None
    # A lease that moved: the old address is free, the MAC index follows.
    store.save_leases([lease("52:54:00:00:01:00", "10.0.2.1")])
    assert store.lease_for_ip("10.0.1.0") is None
    assert store.lease_for_mac("52:54:00:00:01:00") == lease("52:54:00:00:01:00", "10.0.2.1")
    # An expired lease of another MAC is replaced (the table decided so), and its
    # holder's stale index does not make it the holder again.
    store.save_leases([lease(other, "10.0.3.1", expires=5.0)])
    store.save_leases([lease("52:54:00:00:00:0c", "10.0.3.1", updated=6.0)])
    assert store.lease_for_ip("10.0.3.1") == lease("52:54:00:00:00:0c", "10.0.3.1", updated=6.0)
    assert store.lease_for_mac(other) is None


# --- etcd members down --------------------------------------------------------------------


def _state(client: EtcdClient, prefix: str) -> dict[bytes, bytes]:
    root = f"{prefix}/".encode()
    return {kv.key: kv.value for kv in client.range(root, prefix_end(root)).kvs}


def test_writes_survive_a_dead_member_and_wait_for_all_down(
    etcd_cluster: EtcdCluster, prefix: str
) -> None:
    leader = etcd_cluster.leader_index()
    assert leader is not None
    store = EtcdStore(_client(etcd_cluster, leader), prefix, owns_client=True)
    try:
        store.save_leases([lease("52:54:00:00:00:01", "10.0.0.1")])
        etcd_cluster.kill(leader)  # etcd's leader, the member this store talks to first
        store.save_leases([lease("52:54:00:00:00:02", "10.0.0.2")])
        store.mark_installed("m0", 5.0)
        assert [x.ip for x in store.leases()] == ["10.0.0.1", "10.0.0.2"]

        before = _state(store.client, prefix)
        for i in range(3):
            etcd_cluster.kill(i)  # the others (the killed one again: a no-op)
        batch = [lease(f"52:54:00:00:01:{i:02x}", f"10.0.1.{i}") for i in range(40)]
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.save_leases(batch)
        with pytest.raises(StoreUnavailable):
            store.mark_installed("m1", 6.0)
        with pytest.raises(StoreUnavailable):
            store.leases()
        assert time.monotonic() - started < 10 * TIMEOUT  # bounded, not hung

        for i in range(3):
            etcd_cluster.start(i, wait=False)
        etcd_cluster.wait_ready()
        assert _state(store.client, prefix) == before  # nothing half-written
        store.save_leases(batch)  # the same write lands
        assert len(store.leases()) == 42
        assert store.install_state() == {"m0": {"installed_at": 5.0, "reinstall_requested": None}}
    finally:
        store.close()


async def test_the_daemon_writer_keeps_writes_while_etcd_is_down(
    etcd_cluster: EtcdCluster, prefix: str
) -> None:
    daemon = DaemonStore.open_etcd(_client(etcd_cluster), prefix)
    try:
        for i in range(3):
            etcd_cluster.kill(i)
        daemon.mark_installed("m0", 5.0)
        daemon.record_event(Event("m0", "kernel", "vmlinuz", 5.0, "http"))
        # Down longer than the store's own retries (etcdstore.UNKNOWN_RETRY): the writer
        # thread gets StoreUnavailable, and keeps the writes to retry them.
        for _ in range(200):  # bounded: 20 s
            stats = daemon.stats()
            if stats["errors"] + stats["failed"] >= 2:
                break
            await asyncio.sleep(0.1)
        assert not await daemon.synced(0.1)  # queued: retried, not given up
        with pytest.raises(StoreBusy):  # the admin API's 503
            await daemon.read(lambda s: s.events(), sync_wait=0)
        for i in range(3):
            etcd_cluster.start(i, wait=False)
        await asyncio.to_thread(etcd_cluster.wait_ready)
        assert await daemon.synced(10.0)
        assert daemon.stats()["failed"] == 0
        events = await daemon.read(lambda s: s.events())
        assert [(e.node, e.stage) for e in events] == [("m0", "kernel")]
        assert await daemon.read(lambda s: s.install_state()) == {
            "m0": {"installed_at": 5.0, "reinstall_requested": None}
        }
    finally:
        await daemon.aclose()


# --- two daemons on one etcd ----------------------------------------------------------------


async def test_one_member_sees_what_the_other_wrote(shared_etcd: EtcdCluster, prefix: str) -> None:
    a = DaemonStore.open_etcd(_client(shared_etcd, 0), prefix)
    b = DaemonStore.open_etcd(_client(shared_etcd, 1), prefix)
    try:
        a.record_events(
            [Event("m0", "dhcp-ack", "10.0.0.5", 1.0, "dhcp"), Event("m0", "kernel", "", 2.0)]
        )
        a.mark_installed("m0", 3.0)
        a.set_cluster_state("bootstrap", {"retired": True}, 4.0)
        assert await a.synced(5.0)
        events = await b.read(lambda s: s.events(node="m0"))
        assert [e.stage for e in events] == ["dhcp-ack", "kernel"]
        assert await b.read(lambda s: s.last_event_id()) == 2
        assert b.install_state() == {}  # memory, until a refresh
        changed = await b.refresh()
        assert changed == {"install": ["m0"], "cluster": ["bootstrap"], "progress": ["m0"]}
        assert b.install_state()["m0"]["installed_at"] == 3.0
        assert b.cluster_state("bootstrap") == {"retired": True}
        assert list(b.progress()["m0"]) == ["dhcp-ack", "kernel"]
        assert await b.refresh() == {"install": [], "cluster": [], "progress": []}
        # B's own write, then A's reinstall request: each sees the other after a refresh.
        b.mark_installed("w1", 5.0)
        assert await b.synced(5.0)
        a.request_reinstall("m0", 6.0)
        assert await a.synced(5.0)
        assert (await b.refresh())["install"] == ["m0"]
        assert (await a.refresh())["install"] == ["w1"]
        assert a.install_state() == b.install_state()
    finally:
        await a.aclose()
        await b.aclose()


def test_events_are_bounded_and_trimming_loses_no_progress(
    store: EtcdStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(etcdstore, "EVENTS_KEEP", 50)
    store.record_events([Event(f"n{i}", "kernel", str(i), float(i)) for i in range(100)])
    store.record_events([Event("n0", "initrd", "x", 200.0)])
    events = store.events(limit=1000)
    assert [e.id for e in events] == list(range(52, 102))  # the newest 50, in id order
    assert store.events(node="n0") == [events[-1]]
    assert store.last_event_id() == 101
    assert len(store.progress()) == 100  # every node's progress, trimmed or not
    assert list(store.progress()["n0"]) == ["kernel", "initrd"]
    assert store.event_counts() == {"kernel": 100, "initrd": 1}
    assert store.events(after_id=99) == events[-2:]


def test_history_is_compacted_and_the_store_works_on(store: EtcdStore) -> None:
    for i in range(30):
        store.save_leases([lease("52:54:00:00:00:01", "10.0.0.1", updated=float(i))])
    target = store.compact_history(keep=10)
    assert target > 0
    with pytest.raises(EtcdError, match="compacted"):
        store.client.compact(target - 1)  # that history is gone
    assert store.compact_history(keep=10) == 0  # nothing new: nothing to do, no error
    assert store.compact_history(keep=10**9) == 0
    store.save_leases([lease("52:54:00:00:00:01", "10.0.0.2")])  # compares still hold
    assert [x.ip for x in store.leases()] == ["10.0.0.2"]


# --- the DHCP service when another member holds the address ----------------------------------


async def test_dhcp_withholds_the_ack_and_learns_the_holder_on_a_conflict(
    shared_etcd: EtcdCluster, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Imported here: the supervisor's import graph is not needed by the store tests.
    from appliance.supervisor import Supervisor, load_plan
    from tests.integration.test_graceful_stop import _request_message

    mine = LeaseConnection(EtcdStore(_client(shared_etcd, 0), prefix, owns_client=True))
    monkeypatch.setattr(DaemonStore, "open_leases", lambda self, state_dir, busy_ms: mine)
    raw: dict[str, Any] = loopback_inventory(tmp_path)
    raw["listen"]["dhcp"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    config = write_inventory(tmp_path / "inv.yaml", raw)
    node = raw["nodes"][1]
    sup = Supervisor(config, specs=[DHCP])
    await sup.start(load_plan(config))
    other = EtcdStore(_client(shared_etcd, 1), prefix, owns_client=True)
    try:
        dhcp = sup.running["dhcp"]
        assert isinstance(dhcp, dhcp_server.DhcpService)
        # The other member gave this node's address to another MAC (a bad inventory, a
        # split of client traffic) after this one loaded its leases.
        holder = Lease("52:54:00:ee:ee:ee", node["ip"], None, time.time() + 3600, "bound", 1.0)
        other.save_leases([holder])
        message = _request_message(node["mac"], node["ip"], "127.0.0.1")
        dhcp.on_datagram(message, ("0.0.0.0", 68), dhcp.transports[0], False)
        for _ in range(100):  # bounded: 5 s
            if dhcp.counters["lease_conflicts"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert dhcp.counters["lease_conflicts"] == 1
        assert dhcp.counters["sent"] == 0  # no ACK for an address another MAC holds
        assert dhcp.counters["commit_failures"] == 0
        assert other.lease_for_ip(node["ip"]) == holder  # untouched
        learned = dhcp.table.by_ip[IPv4Address(node["ip"])]
        assert learned.mac == holder.mac  # the table knows the holder now
        assert node["mac"] not in dhcp.table.by_mac
    finally:
        await sup.stop()
        other.close()


# --- the daemon's store, the same over SQLite and etcd ----------------------------------------


@pytest.fixture(params=["sqlite", "etcd"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> Iterator[DaemonStore]:
    if request.param == "sqlite":
        store = DaemonStore.open(tmp_path)
    else:
        shared: EtcdCluster = request.getfixturevalue("shared_etcd")
        store = DaemonStore.open_etcd(_client(shared), prefix)
    yield store
    store.close()


async def test_the_daemon_store_behaves_the_same_over_either_backend(
    daemon: DaemonStore,
) -> None:
    def poison(s: object) -> None:
        raise ValueError("never storable")

    bus = EventBus()
    task = asyncio.create_task(daemon.persist(bus))
    await asyncio.sleep(0)
    for i in range(20):
        bus.publish("master-0", "ignition", str(i), time=float(i))
    daemon.writer.submit(_Op("poison", poison))  # dropped alone, counted
    daemon.mark_installed("master-0", 30.0)
    daemon.set_cluster_state("gpu", {"step": "nfd"}, 31.0)
    daemon.record_csr_decision(time=32.0, csr="csr-a", kind="other", decision="deny", reason="x")
    bus.publish("master-0", "node-ready", time=99.0)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await daemon.synced(10.0)
    assert daemon.stats()["failed"] == 1
    events = await daemon.read(lambda s: s.events(limit=100))
    assert [e.detail for e in events[:20]] == [str(i) for i in range(20)]
    assert events[-1].stage == "node-ready"
    assert [r["csr"] for r in await daemon.read(lambda s: s.csr_decisions())] == ["csr-a"]
    assert await daemon.read(lambda s: s.csr_decision_counts()) == {"deny": 1}
    assert await daemon.read(lambda s: s.event_counts()) == {"ignition": 20, "node-ready": 1}
    # What memory answers is what the store has (a refresh changes nothing).
    assert await daemon.read(lambda s: s.progress()) == daemon.progress()
    assert await daemon.read(lambda s: s.install_state()) == daemon.install_state()
    assert await daemon.read(lambda s: s.cluster_state("gpu")) == daemon.cluster_state("gpu")
    assert await daemon.refresh() == {"install": [], "cluster": [], "progress": []}
