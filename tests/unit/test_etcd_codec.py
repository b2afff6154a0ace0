"""The etcd JSON-gateway codec, no sockets: bodies built per operation, answers captured
from a real etcd 3.4.23 parsed, error bodies, prefix_end."""

from __future__ import annotations

import json

import pytest

from appliance import etcd
from appliance.etcd import (
    KV,
    Compare,
    Delete,
    EtcdError,
    Get,
    Put,
    RangeResult,
    prefix_end,
)

# Answers of etcd 3.4.23 (curl against /v3/...), pasted as etcd sent them.
HEADER = '"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952",'
RANGE_HIT = (
    "{" + HEADER + '"revision":"2","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2",'
    '"mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}'
)
RANGE_MISS = "{" + HEADER + '"revision":"2","raft_term":"2"}}'
PUT = "{" + HEADER + '"revision":"2","raft_term":"2"}}'
DELETE = "{" + HEADER + '"revision":"3","raft_term":"2"},"deleted":"1"}'
GRANT = "{" + HEADER + '"revision":"3","raft_term":"2"},"ID":"2324035830016243209","TTL":"5"}'
KEEPALIVE_LIVE = (
    '{"result":{' + HEADER + '"revision":"6","raft_term":"2"},"ID":"2324035830016243224",'
    '"TTL":"30"}}\n'
)
KEEPALIVE_GONE = '{"result":{' + HEADER + '"revision":"3","raft_term":"2"},"ID":"999"}}\n'
TXN_WON = (
    "{" + HEADER + '"revision":"5","raft_term":"2"},"succeeded":true,"responses":['
    '{"response_put":{"header":{"revision":"5"}}},'
    '{"response_delete_range":{"header":{"revision":"5"},"deleted":"1"}},'
    '{"response_range":{"header":{"revision":"5"},"kvs":[{"key":"YQ==","create_revision":"5",'
    '"mod_revision":"5","version":"1","value":"eA=="}],"count":"1"}}]}'
)
TXN_LOST = (
    "{" + HEADER + '"revision":"8","raft_term":"2"},"responses":[{"response_range":{"header":'
    '{"revision":"8"},"kvs":[{"key":"azE=","create_revision":"8","mod_revision":"8",'
    '"version":"1","value":"djE="}],"count":"1"}}]}'
)
KEYS_ONLY_WITH_LEASE = (
    "{" + HEADER + '"revision":"213","raft_term":"2"},"kvs":[{"key":"azI=",'
    '"create_revision":"211","mod_revision":"211","version":"1","lease":"2324035830016243441"}],'
    '"more":true,"count":"3"}'
)
LEASE_NOT_FOUND = (
    '{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease'
    ' not found","code":5}'
)
COMPACTED = (
    '{"error":"etcdserver: mvcc: required revision has been compacted","message":"etcdserver:'
    ' mvcc: required revision has been compacted","code":11}'
)
STATUS = (
    "{" + HEADER + '"revision":"5","raft_term":"2"},"version":"3.4.23","dbSize":"20480",'
    '"leader":"3319814642761637952","raftIndex":"13","raftTerm":"2","raftAppliedIndex":"13",'
    '"dbSizeInUse":"16384"}'
)


def test_range_body_base64_and_int64_as_strings() -> None:
    body = etcd.encode_range(
        b"/a/", prefix_end(b"/a/"), limit=10, keys_only=True, min_mod_revision=7
    )
    assert body == {
        "key": "L2Ev",
        "range_end": "L2Ew",
        "limit": "10",
        "keys_only": True,
        "min_mod_revision": "7",
        "sort_order": "ASCEND",
        "sort_target": "KEY",
    }


def test_defaults_are_omitted() -> None:
    assert etcd.encode_range(b"k", sort_by_key=False) == {"key": "aw=="}
    assert etcd.encode_put(b"k", b"") == {"key": "aw==", "value": ""}
    assert etcd.encode_delete(b"k") == {"key": "aw=="}
    assert etcd.encode_txn([], []) == {}


def test_binary_keys_and_values_round_trip() -> None:
    raw = bytes(range(256))
    body = etcd.encode_put(raw, raw, lease=2**62 + 1)
    assert body["lease"] == str(2**62 + 1)  # beyond a JSON double's 2**53: a string
    answer = {"kvs": [{"key": body["key"], "value": body["value"], "lease": body["lease"]}]}
    (kv,) = etcd.parse_range(answer).kvs
    assert (kv.key, kv.value, kv.lease) == (raw, raw, 2**62 + 1)


def test_txn_body_every_compare_target_and_op() -> None:
    body = etcd.encode_txn(
        [
            Compare(b"l", "CREATE", "EQUAL", 0),
            Compare(b"l", "MOD", "LESS", 100),
            Compare(b"l", "VERSION", "GREATER", 1),
            Compare(b"l", "VALUE", "NOT_EQUAL", b"x"),
            Compare(b"l", "LEASE", "EQUAL", 12),
        ],
        [Put(b"l", b"v", lease=12), Delete(b"a", b"b"), Get(b"g", limit=1)],
        [Get(b"l")],
    )
    assert body["compare"] == [
        {"key": "bA==", "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
        {"key": "bA==", "target": "MOD", "result": "LESS", "mod_revision": "100"},
        {"key": "bA==", "target": "VERSION", "result": "GREATER", "version": "1"},
        {"key": "bA==", "target": "VALUE", "result": "NOT_EQUAL", "value": "eA=="},
        {"key": "bA==", "target": "LEASE", "result": "EQUAL", "lease": "12"},
    ]
    assert body["success"] == [
        {"request_put": {"key": "bA==", "value": "dg==", "lease": "12"}},
        {"request_delete_range": {"key": "YQ==", "range_end": "Yg=="}},
        {
            "request_range": {
                "key": "Zw==",
                "limit": "1",
                "sort_order": "ASCEND",
                "sort_target": "KEY",
            }
        },
    ]
    assert body["failure"] == [
        {"request_range": {"key": "bA==", "sort_order": "ASCEND", "sort_target": "KEY"}}
    ]
    json.dumps(body)  # all plain JSON


@pytest.mark.parametrize(
    "bad",
    [
        Compare(b"k", "CREATED", "EQUAL", 0),
        Compare(b"k", "MOD", "EQUALS", 0),
        Compare(b"k", "VALUE", "EQUAL", 3),
        Compare(b"k", "MOD", "EQUAL", b"3"),
    ],
)
def test_bad_compare_is_refused_before_sending(bad: Compare) -> None:
    with pytest.raises(ValueError):
        etcd.encode_compare(bad)


def test_parse_range_captured() -> None:
    hit = etcd.parse_range(json.loads(RANGE_HIT))
    assert hit == RangeResult(kvs=[KV(b"foo", b"bar", 2, 2, 1, 0)], count=1, revision=2, more=False)
    assert etcd.parse_range(json.loads(RANGE_MISS)) == RangeResult([], 0, 2, False)


def test_parse_keys_only_more_and_lease() -> None:
    r = etcd.parse_range(json.loads(KEYS_ONLY_WITH_LEASE))
    assert r.more and r.count == 3 and r.revision == 213
    assert r.kvs == [KV(b"k2", b"", 211, 211, 1, 2324035830016243441)]


def test_parse_put_delete_grant_status() -> None:
    assert etcd.parse_put(json.loads(PUT)) == 2
    assert etcd.parse_delete(json.loads(DELETE)) == 1
    assert etcd.parse_delete({"header": {"revision": "3"}}) == 0
    assert etcd.parse_grant(json.loads(GRANT)) == (2324035830016243209, 5)
    assert etcd.raise_for_error(200, STATUS.encode())["version"] == "3.4.23"


def test_parse_txn_captured() -> None:
    won = etcd.parse_txn(json.loads(TXN_WON))
    assert won.succeeded and won.revision == 5
    assert won.responses == [None, 1, RangeResult([KV(b"a", b"x", 5, 5, 1, 0)], 1, 5, False)]
    lost = etcd.parse_txn(json.loads(TXN_LOST))
    assert not lost.succeeded and lost.revision == 8  # "succeeded": false is omitted
    assert lost.responses == [RangeResult([KV(b"k1", b"v1", 8, 8, 1, 0)], 1, 8, False)]


def test_keepalive_stream() -> None:
    assert etcd.parse_keepalive(KEEPALIVE_LIVE.encode()) == 30
    # A lease that expired or was revoked: etcd answers without TTL (0): gone.
    assert etcd.parse_keepalive(KEEPALIVE_GONE.encode()) == 0
    assert etcd.parse_keepalive(b'{"result":{"ID":"1","TTL":"-1"}}') == 0
    with pytest.raises(EtcdError) as e:
        etcd.parse_keepalive(b'{"error":{"grpc_code":14,"http_code":503,"message":"no leader"}}')
    assert (e.value.code, e.value.message) == (14, "no leader")
    with pytest.raises(EtcdError):
        etcd.parse_keepalive(b"\n")


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (404, LEASE_NOT_FOUND, 5, "etcdserver: requested lease not found"),
        (400, COMPACTED, 11, "etcdserver: mvcc: required revision has been compacted"),
        (404, "Not Found\n", -404, "HTTP 404: Not Found"),
        (502, "", -502, "HTTP 502: no body"),
        (200, "[1, 2]", -200, "HTTP 200: [1, 2]"),
    ],
)
def test_error_bodies(status: int, body: str, code: int, message: str) -> None:
    with pytest.raises(EtcdError) as e:
        etcd.raise_for_error(status, body.encode())
    assert (e.value.code, e.value.message) == (code, message)
    assert str(code) in str(e.value)


def test_unavailable_is_an_etcd_error() -> None:
    e = etcd.EtcdUnavailable("no etcd endpoint answered")
    assert isinstance(e, EtcdError) and e.code == 14


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"/appliance/demo/", b"/appliance/demo0"),
        (b"a", b"b"),
        (b"a\xff", b"b"),
        (b"a\xfe\xff\xff", b"a\xff"),
        (b"\xff", b"\0"),
        (b"\xff\xff", b"\0"),
        (b"", b"\0"),
    ],
)
def test_prefix_end(prefix: bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


def test_prefix_end_covers_exactly_the_prefix() -> None:
    prefix = b"p\xff"
    end = prefix_end(prefix)
    inside = [b"p\xff", b"p\xff\x00", b"p\xff\xff\xff"]
    outside = [b"p", b"p\xfe\xff", b"q", b"q\x00"]
    assert all(prefix <= k < end for k in inside)
    assert not any(prefix <= k < end for k in outside)


def test_endpoint_with_credentials_is_refused_without_showing_them() -> None:
    for url in ("https://user:secret@10.0.0.1:2379", "ftp://user:secret@10.0.0.1"):
        with pytest.raises(ValueError) as e:
            etcd.EtcdClient([url])
        assert "secret" not in str(e.value) and "10.0.0.1" in str(e.value)
    ep = etcd._parse_endpoint("https://10.0.0.1:2379")
    assert ep.name == "https://10.0.0.1:2379" and ep.tls
    assert etcd._parse_endpoint("10.0.0.2").name == "http://10.0.0.2:2379"
    assert etcd._parse_endpoint("http://[fd00::1]:2380").name == "http://[fd00::1]:2380"


def test_client_needs_an_endpoint() -> None:
    with pytest.raises(ValueError):
        etcd.EtcdClient([])
