"""appliance.etcd.EtcdClient against a real three-member etcd (tests/etcdrig.py): the KV,
txn and lease calls, members killed or hung under it, TLS with client certificates, and
threads sharing one client."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.etcd import (
    Compare,
    Delete,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    Get,
    Put,
    RangeResult,
    prefix_end,
)
from tests.etcdrig import EtcdCluster, make_tls

pytestmark = pytest.mark.tool("etcd")

TIMEOUT = 1.0


@pytest.fixture
def client(etcd_cluster: EtcdCluster) -> Iterator[EtcdClient]:
    c = EtcdClient(etcd_cluster.endpoints, timeout=TIMEOUT)
    yield c
    c.close()


def used_member(cluster: EtcdCluster, client: EtcdClient) -> int:
    """The member the client talks to first now (the last one that answered)."""
    return cluster.endpoints.index(client._endpoints[client._preferred].url)


def test_put_get_range_prefix_limit_min_mod_revision(client: EtcdClient) -> None:
    r1 = client.put(b"/t/a", b"1")
    r2 = client.put(b"/t/b", b"\x00\xff binary")
    client.put(b"/t0", b"outside the prefix")
    client.put(b"/s/z", b"outside too")
    assert r2 > r1 > 0
    kv = client.get(b"/t/b")
    assert kv is not None and kv.value == b"\x00\xff binary" and kv.mod_revision == r2
    assert kv.create_revision == r2 and kv.version == 1 and kv.lease == 0
    assert client.get(b"/t/none") is None

    everything = client.range(b"/t/", prefix_end(b"/t/"))
    assert [k.key for k in everything.kvs] == [b"/t/a", b"/t/b"]
    assert everything.count == 2 and not everything.more

    first = client.range(b"/t/", prefix_end(b"/t/"), limit=1)
    assert [k.key for k in first.kvs] == [b"/t/a"] and first.more and first.count == 2

    changed = client.range(b"/t/", prefix_end(b"/t/"), min_mod_revision=r2)
    assert [k.key for k in changed.kvs] == [b"/t/b"]

    keys = client.range(b"/t/", prefix_end(b"/t/"), keys_only=True)
    assert [(k.key, k.value) for k in keys.kvs] == [(b"/t/a", b""), (b"/t/b", b"")]

    r3 = client.put(b"/t/a", b"2")
    kv = client.get(b"/t/a")
    assert kv is not None and kv.version == 2 and kv.create_revision == r1
    assert kv.mod_revision == r3

    assert client.delete(b"/t/", prefix_end(b"/t/")) == 2
    assert client.delete(b"/t/a") == 0
    assert client.range(b"/t/", prefix_end(b"/t/")).kvs == []


def test_txn_create_once_second_gets_the_failure_branch(client: EtcdClient) -> None:
    def campaign(who: bytes) -> tuple[bool, RangeResult | int | None]:
        res = client.txn(
            [Compare(b"/leader", "CREATE", "EQUAL", 0)],
            [Put(b"/leader", who)],
            [Get(b"/leader")],
        )
        return res.succeeded, (res.responses[0] if res.responses else None)

    won, resp = campaign(b"a")
    assert won and resp is None  # a Put answers None
    won, resp = campaign(b"b")
    assert not won
    assert isinstance(resp, RangeResult) and resp.kvs[0].value == b"a"
    kv = client.get(b"/leader")
    assert kv is not None and kv.value == b"a"


def test_txn_compare_mod_revision_refuses_a_stale_writer(client: EtcdClient) -> None:
    rev = client.put(b"/pool/10.0.0.5", b"mac-1")
    # Another member writes in between: our compare on the revision we read fails.
    client.put(b"/pool/10.0.0.5", b"mac-2")
    stale = client.txn(
        [Compare(b"/pool/10.0.0.5", "MOD", "EQUAL", rev)],
        [Put(b"/pool/10.0.0.5", b"mac-1 again"), Delete(b"/other")],
        [Get(b"/pool/10.0.0.5")],
    )
    assert not stale.succeeded
    (got,) = stale.responses
    assert isinstance(got, RangeResult) and got.kvs[0].value == b"mac-2"
    fresh = client.txn(
        [Compare(b"/pool/10.0.0.5", "VALUE", "EQUAL", b"mac-2")],
        [Put(b"/pool/10.0.0.5", b"mac-3"), Delete(b"/other")],
    )
    assert fresh.succeeded and fresh.responses == [None, 0]
    # A txn etcd refuses (one key written twice) is an EtcdError, nothing applied.
    with pytest.raises(EtcdError) as e:
        client.txn([], [Put(b"/pool/a", b"1"), Delete(b"/pool/", prefix_end(b"/pool/"))])
    assert e.value.code == 3 and "duplicate key" in e.value.message
    assert fresh.revision > rev


def test_lease_keepalive_expiry_and_revoke(client: EtcdClient) -> None:
    lease, ttl = client.lease_grant(2)
    assert lease > 0 and ttl == 2
    client.put(b"/leased", b"x", lease=lease)
    kv = client.get(b"/leased")
    assert kv is not None and kv.lease == lease
    assert client.lease_keepalive(lease) == 2

    # Expiry: the key goes about ttl after the last keepalive, not before.
    kept_at = time.monotonic()
    client.lease_keepalive(lease)
    while client.get(b"/leased") is not None:
        assert time.monotonic() - kept_at < 2 + 3, "leased key outlived its lease"
        time.sleep(0.05)
    assert time.monotonic() - kept_at >= 1.5
    assert client.lease_keepalive(lease) == 0  # gone: ttl 0

    # Revoke: the key goes at once.
    lease2, _ = client.lease_grant(30)
    client.put(b"/leased2", b"y", lease=lease2)
    client.lease_revoke(lease2)
    assert client.get(b"/leased2") is None
    assert client.lease_keepalive(lease2) == 0
    client.lease_revoke(lease2)  # already gone: not an error


def test_etcd_errors_are_not_failover(etcd_cluster: EtcdCluster, client: EtcdClient) -> None:
    with pytest.raises(EtcdError) as e:
        client.put(b"/k", b"v", lease=12345)
    assert type(e.value) is EtcdError and e.value.code == 5
    assert "lease not found" in e.value.message
    rev = client.put(b"/k", b"v")
    client.compact(rev)
    with pytest.raises(EtcdError) as e:
        client.compact(rev)
    assert type(e.value) is EtcdError and e.value.code == 11 and "compacted" in e.value.message


def test_killed_member_the_next_call_goes_to_another(
    etcd_cluster: EtcdCluster, client: EtcdClient
) -> None:
    leader = etcd_cluster.leader_index()
    assert leader is not None
    client._preferred = (leader + 1) % 3  # a follower: the raft leader's death is the next test
    client.put(b"/k", b"before")
    victim = used_member(etcd_cluster, client)
    assert victim != leader
    etcd_cluster.kill(victim)
    started = time.monotonic()
    client.put(b"/k", b"after")
    assert time.monotonic() - started < TIMEOUT
    assert used_member(etcd_cluster, client) != victim
    kv = client.get(b"/k")
    assert kv is not None and kv.value == b"after"
    # Back again on its data dir: the client can use it after.
    etcd_cluster.start(victim)
    assert client.health()[etcd_cluster.endpoint(victim)] is None


def test_killed_raft_leader_writes_resume_within_two_timeouts(
    etcd_cluster: EtcdCluster, client: EtcdClient
) -> None:
    """A write sent to a follower while the raft leader is dead waits on that follower for
    the election (etcd drops the forwarded proposal; it answers only after its own request
    timeout): the client's timeout ends that attempt and the next member takes the write."""
    leader = etcd_cluster.leader_index()
    assert leader is not None
    client._preferred = leader
    client.put(b"/k", b"before")
    etcd_cluster.kill(leader)
    started = time.monotonic()
    client.put(b"/k", b"after")
    assert time.monotonic() - started < 2 * TIMEOUT + 0.5
    kv = client.get(b"/k")
    assert kv is not None and kv.value == b"after"


def test_restarted_member_stale_keepalive_connection_is_replaced(
    etcd_cluster: EtcdCluster, client: EtcdClient
) -> None:
    leader = etcd_cluster.leader_index()
    assert leader is not None
    member = (leader + 1) % 3
    client._preferred = member
    client.put(b"/k", b"1")
    etcd_cluster.stop(member)
    etcd_cluster.start(member)
    # The kept-alive connection died with the old process: detected before sending, so
    # even a txn (never retried once sent) goes through, on the same member.
    res = client.txn([Compare(b"/k", "VALUE", "EQUAL", b"1")], [Put(b"/k", b"2")])
    assert res.succeeded
    assert used_member(etcd_cluster, client) == member


class _NotEtcd(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "10")
        self.end_headers()
        self.wfile.write(b"Not Found\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_endpoint_that_is_not_etcd_is_skipped(etcd_cluster: EtcdCluster) -> None:
    """An operator's inventory naming a wrong port (some other HTTP server, or a port that
    accepts and hangs up): the client moves on to the real members."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotEtcd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hangup = socket.socket()
    hangup.bind(("127.0.0.1", 0))
    hangup.listen()
    try:
        wrong = [
            f"http://127.0.0.1:{server.server_address[1]}",
            f"http://127.0.0.1:{hangup.getsockname()[1]}",
        ]
        client = EtcdClient([wrong[0], *etcd_cluster.endpoints], timeout=TIMEOUT)
        res = client.txn([Compare(b"/n", "CREATE", "EQUAL", 0)], [Put(b"/n", b"1")])
        assert res.succeeded
        assert client._endpoints[client._preferred].url != wrong[0]
        assert "not etcd" in str(client.health()[wrong[0]])
        client.close()
        # Accepts, then never answers: the attempt ends at the timeout and a read moves on.
        client = EtcdClient([wrong[1], *etcd_cluster.endpoints], timeout=TIMEOUT)
        started = time.monotonic()
        assert client.get(b"/n") is not None
        assert time.monotonic() - started < TIMEOUT + 0.5
        client.close()
    finally:
        server.shutdown()
        server.server_close()
        hangup.close()


def test_hung_member_repeatable_moves_on_txn_reports_unknown(
    etcd_cluster: EtcdCluster, client: EtcdClient
) -> None:
    client.put(b"/k", b"v")
    victim = used_member(etcd_cluster, client)
    pid = etcd_cluster.pid(victim)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # accepts connections (kernel backlog), never answers
    try:
        started = time.monotonic()
        kv = client.get(b"/k")
        elapsed = time.monotonic() - started
        assert kv is not None and kv.value == b"v"
        assert TIMEOUT * 0.8 <= elapsed < TIMEOUT + 0.5
        assert used_member(etcd_cluster, client) != victim
        # A txn that was sent and got no answer may have been applied: not retried.
        client._preferred = victim
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable) as e:
            client.txn([Compare(b"/x", "CREATE", "EQUAL", 0)], [Put(b"/x", b"1")])
        assert time.monotonic() - started < TIMEOUT + 0.5
        assert "unknown" in str(e.value)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_all_members_dead_is_unavailable_in_bounded_time(etcd_cluster: EtcdCluster) -> None:
    pids = [etcd_cluster.pid(i) for i in range(3)]
    assert all(pids)
    client = EtcdClient(etcd_cluster.endpoints, timeout=TIMEOUT)
    client.put(b"/k", b"v")
    try:
        for pid in pids:
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable) as e:
            client.get(b"/k")
        elapsed = time.monotonic() - started
        assert elapsed < TIMEOUT * 3 + 1.0
        assert str(e.value).count("timed out") == 3, e.value
    finally:
        for pid in pids:
            assert pid is not None
            os.kill(pid, signal.SIGCONT)
    for i in range(3):
        etcd_cluster.kill(i)
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable) as e:
        client.get(b"/k")
    assert time.monotonic() - started < TIMEOUT
    assert "connection refused" in str(e.value)
    assert set(client.health()) == set(etcd_cluster.endpoints)
    assert all(client.health().values())
    client.close()


def test_lost_quorum_is_unavailable_not_a_hang(etcd_cluster: EtcdCluster) -> None:
    client = EtcdClient(etcd_cluster.endpoints, timeout=TIMEOUT)
    client.put(b"/k", b"v")
    lease, _ = client.lease_grant(5)
    survivor = used_member(etcd_cluster, client)
    for i in range(3):
        if i != survivor:
            etcd_cluster.kill(i)
    for call in (
        lambda: client.get(b"/k"),
        lambda: client.put(b"/k", b"w"),
        lambda: client.txn([Compare(b"/k", "CREATE", "EQUAL", 0)], [Put(b"/k", b"1")]),
        lambda: client.lease_keepalive(lease),
    ):
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            call()
        assert time.monotonic() - started < TIMEOUT * 3 + 1.0
    health = client.health()
    assert all(health.values()), health
    client.close()


def test_status_and_health(etcd_cluster: EtcdCluster, client: EtcdClient) -> None:
    st = client.status(etcd_cluster.endpoint(0))
    assert st["version"] == "3.4.23" or str(st["version"]).startswith("3.")
    assert int(st["leader"]) > 0
    assert client.health() == dict.fromkeys(etcd_cluster.endpoints)
    leader = etcd_cluster.leader_index()
    assert leader is not None
    # A follower: the raft leader's death makes the others say "leader changed" a moment.
    dead = (leader + 1) % 3
    etcd_cluster.kill(dead)
    health = client.health()
    err = health.pop(etcd_cluster.endpoint(dead))
    assert err == "connection refused"
    assert health == dict.fromkeys(health)
    with pytest.raises(EtcdUnavailable):
        client.status(etcd_cluster.endpoint(dead))


def test_observe_gets_each_call(client: EtcdClient, etcd_cluster: EtcdCluster) -> None:
    seen: list[tuple[str, float, bool]] = []
    c = EtcdClient(etcd_cluster.endpoints, timeout=TIMEOUT, observe=lambda *a: seen.append(a))
    c.put(b"/k", b"v")
    c.txn([], [Get(b"/k")])
    with pytest.raises(EtcdError):
        c.put(b"/k", b"v", lease=1)
    assert [(op, ok) for op, _, ok in seen] == [("put", True), ("txn", True), ("put", False)]
    assert all(0 <= s < TIMEOUT for _, s, _ in seen)
    c.close()


def test_threads_share_one_client_without_crossed_answers(client: EtcdClient) -> None:
    threads, per_thread = 8, 200
    revisions: list[list[int]] = [[] for _ in range(threads)]
    problems: list[str] = []

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                key = f"/c/{t}/{i:03d}".encode()
                revisions[t].append(client.put(key, key[::-1]))
                if i % 20 == 0:
                    kv = client.get(key)
                    if kv is None or kv.value != key[::-1]:
                        problems.append(f"{key!r}: {kv}")
        except Exception as e:  # reported by the main thread
            problems.append(repr(e))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in pool)
    assert problems == []
    every = [r for rs in revisions for r in rs]
    assert len(every) == len(set(every)) == threads * per_thread  # one revision per put
    got = client.range(b"/c/", prefix_end(b"/c/"))
    assert got.count == threads * per_thread
    assert all(kv.value == kv.key[::-1] for kv in got.kvs)


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    tls = make_tls(tmp_path / "pki")
    with EtcdCluster(tmp_path / "etcd", tls=tls) as cluster:
        yield cluster


def test_tls_with_client_certificates(tls_cluster: EtcdCluster, tmp_path: Path) -> None:
    tls = tls_cluster.tls
    assert tls is not None
    good = EtcdClient(
        tls_cluster.endpoints,
        ca_file=tls.ca_file,
        cert_file=tls.client_cert,
        key_file=tls.client_key,
        timeout=TIMEOUT,
    )
    good.put(b"/tls", b"ok")
    assert (kv := good.get(b"/tls")) is not None and kv.value == b"ok"
    assert good.lease_keepalive(good.lease_grant(5)[0]) == 5
    assert good.health() == dict.fromkeys(tls_cluster.endpoints)
    for _ in range(20):
        good.get(b"/tls")
    # Kept alive: TLS 1.3 session tickets on an idle socket are not taken for a hang-up.
    assert len(good._all) == len(tls_cluster.endpoints)
    good.close()

    other_ca = make_tls(tmp_path / "other-pki", name="other")
    wrong = EtcdClient(
        tls_cluster.endpoints,
        ca_file=other_ca.ca_file,
        cert_file=tls.client_cert,
        key_file=tls.client_key,
        timeout=TIMEOUT,
    )
    with pytest.raises(EtcdUnavailable) as e:
        wrong.get(b"/tls")
    assert "certificate is not trusted" in str(e.value) and "ca_file" in str(e.value)
    wrong.close()

    no_cert = EtcdClient(tls_cluster.endpoints, ca_file=tls.ca_file, timeout=TIMEOUT)
    with pytest.raises(EtcdUnavailable) as e:
        no_cert.get(b"/tls")
    assert "refused the handshake" in str(e.value) and "cert_file" in str(e.value)
    no_cert.close()
