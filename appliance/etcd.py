"""A small synchronous etcd v3 client over etcd's JSON gateway (grpc-gateway).

etcd 3.4 serves `/v3/...` as JSON on its client URL; this module speaks it with the
standard library's `http.client`: no grpcio or protobuf (memory: issue 20), nothing new
to install. The store Protocols are synchronous and already run in threads, so a
blocking client fits; the asyncio side calls it from its own executor.

Two halves:
- the codec, pure functions over values: `encode_*` build a request body (keys and
  values base64, int64 fields as decimal strings, as grpc-gateway emits them) and
  `parse_*` read an answer (proto3 JSON omits defaults: a missing field is zero/empty);
  `raise_for_error` turns an error body into `EtcdError`.
- the transport, `EtcdClient`: keep-alive connections, one per thread and endpoint,
  TLS from files, every attempt bounded by `timeout`, failover on connection errors.

Failover policy. An attempt that fails before the request reached a member (connect
refused or timed out, a kept-alive connection found closed) moves on to the next
endpoint for every operation. After the request was sent (timeout or reset waiting for
the answer, or etcd answering UNAVAILABLE: no leader, request timed out) a repeatable
operation moves on too; a txn does not, since it may have been applied: it raises
`EtcdUnavailable` saying the outcome is unknown (the caller re-reads). Any other etcd
answer (a failed precondition, a compacted revision, a lease not found) is `EtcdError`
and never fails over. The endpoint that answered last is tried first next time.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "KV",
    "Compare",
    "Delete",
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "Get",
    "Op",
    "Put",
    "RangeResult",
    "TxnResult",
    "prefix_end",
]

log = logging.getLogger("appliance.etcd")

# grpc status codes etcd answers with (the gateway passes them through as "code").
GRPC_NOT_FOUND = 5
GRPC_UNAVAILABLE = 14


class EtcdError(Exception):
    """etcd answered with an error: `code` is the grpc status code, `message` its text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the timeout (all tried), or a txn's outcome is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__(GRPC_UNAVAILABLE, message)


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KV]
    count: int
    revision: int
    more: bool


@dataclass(frozen=True, slots=True)
class Compare:
    """target: VERSION | CREATE | MOD | VALUE | LEASE; result: EQUAL | NOT_EQUAL | GREATER | LESS.
    `value` is bytes for VALUE, an int for the others."""

    key: bytes
    target: str
    result: str
    value: int | bytes


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    range_end: bytes = b""


@dataclass(frozen=True, slots=True)
class Get:
    key: bytes
    range_end: bytes = b""
    limit: int = 0


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    """`responses`: per op of the branch taken, a RangeResult for Get, the deleted count for
    Delete, None for Put."""

    succeeded: bool
    revision: int
    responses: list[RangeResult | int | None]


def prefix_end(prefix: bytes) -> bytes:
    """The range_end covering every key that starts with `prefix` (etcd's GetPrefixRangeEnd):
    the prefix with its last byte below 0xff incremented and what follows dropped; b"\\0"
    (every key) when there is no such byte."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"


# ---------------------------------------------------------------------------------------------
# Codec: request bodies and answers as plain values, no I/O.

_TARGETS = {
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "VALUE": "value",
    "LEASE": "lease",
}
_RESULTS = frozenset({"EQUAL", "NOT_EQUAL", "GREATER", "LESS"})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    return base64.b64decode(text) if text else b""


def _int(value: Any) -> int:
    # int64 fields come as strings, int32 ones as numbers; proto3 omits zero.
    return int(value) if value else 0


def encode_range(
    key: bytes,
    range_end: bytes = b"",
    *,
    limit: int = 0,
    keys_only: bool = False,
    min_mod_revision: int = 0,
    sort_by_key: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end:
        body["range_end"] = _b64(range_end)
    if limit:
        body["limit"] = str(limit)
    if keys_only:
        body["keys_only"] = True
    if min_mod_revision:
        body["min_mod_revision"] = str(min_mod_revision)
    if sort_by_key:
        body["sort_order"] = "ASCEND"
        body["sort_target"] = "KEY"
    return body


def encode_put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return body


def encode_delete(key: bytes, range_end: bytes = b"") -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end:
        body["range_end"] = _b64(range_end)
    return body


def encode_compare(c: Compare) -> dict[str, Any]:
    field = _TARGETS.get(c.target)
    if field is None:
        raise ValueError(f"compare target {c.target!r}: one of {', '.join(_TARGETS)}")
    if c.result not in _RESULTS:
        raise ValueError(f"compare result {c.result!r}: one of {', '.join(sorted(_RESULTS))}")
    if c.target == "VALUE":
        if not isinstance(c.value, bytes):
            raise ValueError("a VALUE compare takes bytes")
        value: str = _b64(c.value)
    else:
        if isinstance(c.value, bytes):
            raise ValueError(f"a {c.target} compare takes an int")
        value = str(c.value)
    return {"key": _b64(c.key), "target": c.target, "result": c.result, field: value}


def encode_op(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        return {"request_put": encode_put(op.key, op.value, op.lease)}
    if isinstance(op, Delete):
        return {"request_delete_range": encode_delete(op.key, op.range_end)}
    return {"request_range": encode_range(op.key, op.range_end, limit=op.limit)}


def encode_txn(
    compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if compare:
        body["compare"] = [encode_compare(c) for c in compare]
    if success:
        body["success"] = [encode_op(op) for op in success]
    if failure:
        body["failure"] = [encode_op(op) for op in failure]
    return body


def encode_lease_id(lease_id: int) -> dict[str, Any]:
    return {"ID": str(lease_id)}


def raise_for_error(status: int, body: bytes) -> dict[str, Any]:
    """The answer as a JSON object, or EtcdError for an error answer (or one not JSON)."""
    try:
        obj = json.loads(body) if body.strip() else {}
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        text = body[:200].decode("utf-8", "replace").strip()
        raise EtcdError(-status, f"HTTP {status}: {text or 'no body'}")
    err = obj.get("error")
    if isinstance(err, dict):
        # A streaming endpoint's error: {"error": {"grpc_code":.., "message":..}}.
        raise EtcdError(_int(err.get("grpc_code")), str(err.get("message", "")))
    if err is not None or ("code" in obj and status != 200):
        raise EtcdError(_int(obj.get("code")), str(obj.get("message") or err or ""))
    if status != 200:
        text = body[:200].decode("utf-8", "replace").strip()
        raise EtcdError(-status, f"HTTP {status}: {text or 'no body'}")
    return obj


def _revision(obj: Mapping[str, Any]) -> int:
    header = obj.get("header") or {}
    return _int(header.get("revision"))


def parse_kv(obj: Mapping[str, Any]) -> KV:
    return KV(
        key=_unb64(obj.get("key")),
        value=_unb64(obj.get("value")),
        create_revision=_int(obj.get("create_revision")),
        mod_revision=_int(obj.get("mod_revision")),
        version=_int(obj.get("version")),
        lease=_int(obj.get("lease")),
    )


def parse_range(obj: Mapping[str, Any]) -> RangeResult:
    return RangeResult(
        kvs=[parse_kv(kv) for kv in obj.get("kvs") or ()],
        count=_int(obj.get("count")),
        revision=_revision(obj),
        more=bool(obj.get("more")),
    )


def parse_put(obj: Mapping[str, Any]) -> int:
    return _revision(obj)


def parse_delete(obj: Mapping[str, Any]) -> int:
    return _int(obj.get("deleted"))


def parse_txn(obj: Mapping[str, Any]) -> TxnResult:
    responses: list[RangeResult | int | None] = []
    for item in obj.get("responses") or ():
        if "response_range" in item:
            responses.append(parse_range(item["response_range"] or {}))
        elif "response_delete_range" in item:
            responses.append(parse_delete(item["response_delete_range"] or {}))
        else:
            responses.append(None)
    return TxnResult(
        succeeded=bool(obj.get("succeeded")), revision=_revision(obj), responses=responses
    )


def parse_grant(obj: Mapping[str, Any]) -> tuple[int, int]:
    if obj.get("error"):
        raise EtcdError(0, str(obj["error"]))
    return _int(obj.get("ID")), _int(obj.get("TTL"))


def _parse_keepalive_answer(status: int, body: bytes) -> int:
    if status != 200:
        raise_for_error(status, body)
    return parse_keepalive(body)


def parse_keepalive(body: bytes) -> int:
    """The ttl left from /v3/lease/keepalive's stream ({"result": {...}} per line); 0 when the
    lease is gone (etcd then omits TTL, or says -1)."""
    for line in body.splitlines():
        if not line.strip():
            continue
        obj = raise_for_error(200, line)
        result = obj.get("result") or {}
        return max(0, _int(result.get("TTL")))
    raise EtcdError(0, "lease keepalive: empty answer")


# ---------------------------------------------------------------------------------------------
# Transport.


class _NotSent(Exception):
    """The request did not reach the member: safe to try the next one for any operation."""


class _Unanswered(Exception):
    """The request was sent but no answer came: only a repeatable operation moves on."""


@dataclass(frozen=True, slots=True)
class _Endpoint:
    url: str  # as given, for status(endpoint) and health()
    name: str  # scheme://host:port without userinfo: the only form logged or raised
    tls: bool
    host: str
    port: int


def _parse_endpoint(url: str) -> _Endpoint:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"etcd endpoint {parts.scheme}://{parts.hostname}: http(s)://host:port")
    port = parts.port or 2379
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    if parts.username or parts.password:
        # The JSON gateway takes no basic auth; and a password must not reach logs or status.
        raise ValueError(
            f"etcd endpoint {parts.scheme}://{shown}:{port}: a user or password in the URL is"
            " not supported (use client certificates)"
        )
    return _Endpoint(url, f"{parts.scheme}://{shown}:{port}", parts.scheme == "https", host, port)


class EtcdClient:
    """Thread-safe: each thread keeps its own connection to each endpoint."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float = 2.0,
        observe: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd: no endpoints")
        self._endpoints = [_parse_endpoint(e) for e in endpoints]
        self._timeout = timeout
        self._observe = observe
        self._ssl: ssl.SSLContext | None = None
        if any(e.tls for e in self._endpoints) or ca_file or cert_file:
            self._ssl = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                self._ssl.load_cert_chain(cert_file, key_file)
        self._preferred = 0
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []
        self._closed = False

    # -- operations

    def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        limit: int = 0,
        keys_only: bool = False,
        min_mod_revision: int = 0,
        sort_by_key: bool = True,
    ) -> RangeResult:
        body = encode_range(
            key,
            range_end,
            limit=limit,
            keys_only=keys_only,
            min_mod_revision=min_mod_revision,
            sort_by_key=sort_by_key,
        )
        return parse_range(self._call("range", "/v3/kv/range", body))

    def get(self, key: bytes) -> KV | None:
        result = self.range(key, sort_by_key=False)
        return result.kvs[0] if result.kvs else None

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        return parse_put(self._call("put", "/v3/kv/put", encode_put(key, value, lease)))

    def delete(self, key: bytes, range_end: bytes = b"") -> int:
        body = encode_delete(key, range_end)
        return parse_delete(self._call("delete", "/v3/kv/deleterange", body))

    def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        body = encode_txn(compare, success, failure)
        return parse_txn(self._call("txn", "/v3/kv/txn", body, repeatable=False))

    def lease_grant(self, ttl: int) -> tuple[int, int]:
        # Repeatable: a grant whose answer was lost only leaves a lease that expires unused.
        return parse_grant(self._call("lease_grant", "/v3/lease/grant", {"TTL": str(ttl)}))

    def lease_keepalive(self, lease_id: int) -> int:
        ttl: int = self._call(
            "lease_keepalive",
            "/v3/lease/keepalive",
            encode_lease_id(lease_id),
            parse=_parse_keepalive_answer,
        )
        return ttl

    def lease_revoke(self, lease_id: int) -> None:
        """Revoke; a lease already gone (expired, revoked) is not an error: the goal holds."""
        try:
            self._call("lease_revoke", "/v3/lease/revoke", encode_lease_id(lease_id))
        except EtcdError as e:
            if type(e) is not EtcdError or e.code != GRPC_NOT_FOUND:
                raise

    def compact(self, revision: int) -> None:
        self._call("compact", "/v3/kv/compaction", {"revision": str(revision)})

    def status(self, endpoint: str) -> dict[str, Any]:
        """Maintenance status of one member (no failover): version, dbSize, leader, raftTerm,
        ... with int64 fields as strings, as etcd gives them."""
        target = next((e for e in self._endpoints if endpoint in (e.url, e.name)), None)
        if target is None:
            target = _parse_endpoint(endpoint)
        answer: dict[str, Any] = self._call("status", "/v3/maintenance/status", {}, only=target)
        return answer

    def health(self) -> dict[str, str | None]:
        """Each endpoint (as given) -> None when it answers with a leader and serves a
        linearizable read, else the error as text."""
        out: dict[str, str | None] = {}
        for e in self._endpoints:
            try:
                st = self._call("status", "/v3/maintenance/status", {}, only=e)
                if not _int(st.get("leader")):
                    out[e.url] = "no leader"
                    continue
                if st.get("errors"):
                    out[e.url] = "; ".join(str(x) for x in st["errors"])
                    continue
                # Quorum check, as `etcdctl endpoint health` does: a linearizable read.
                self._call("range", "/v3/kv/range", encode_range(b"health"), only=e)
                out[e.url] = None
            except EtcdUnavailable as err:
                out[e.url] = err.message.removeprefix(f"{e.name}: ")
            except EtcdError as err:
                out[e.url] = str(err)
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for c in conns:
            c.close()

    # -- transport

    def _call(
        self,
        operation: str,
        path: str,
        body: Mapping[str, Any],
        *,
        repeatable: bool = True,
        parse: Callable[[int, bytes], Any] = raise_for_error,
        only: _Endpoint | None = None,
    ) -> Any:
        started = time.monotonic()
        ok = False
        try:
            result = self._failover(path, json.dumps(body).encode(), repeatable, parse, only)
            ok = True
            return result
        finally:
            if self._observe is not None:
                self._observe(operation, time.monotonic() - started, ok)

    def _failover(
        self,
        path: str,
        payload: bytes,
        repeatable: bool,
        parse: Callable[[int, bytes], Any],
        only: _Endpoint | None,
    ) -> Any:
        if self._closed:
            raise EtcdUnavailable("etcd client is closed")
        if only is not None:
            order = [only]
        else:
            first = self._preferred
            n = len(self._endpoints)
            order = [self._endpoints[(first + i) % n] for i in range(n)]
        errors: list[str] = []
        for endpoint in order:
            try:
                status, data = self._attempt(endpoint, path, payload)
            except _NotSent as e:
                errors.append(f"{endpoint.name}: {e}")
                continue
            except _Unanswered as e:
                if not repeatable:
                    raise EtcdUnavailable(
                        f"{endpoint.name}: {e}; the outcome of {path} is unknown"
                    ) from None
                errors.append(f"{endpoint.name}: {e}")
                continue
            try:
                result = parse(status, data)
            except EtcdError as e:
                if e.code < 0:
                    # Not an etcd answer (a proxy's 502, some other HTTP server on that
                    # port): nothing was applied there, so any operation moves on.
                    errors.append(f"{endpoint.name}: not etcd: {e.message}")
                    continue
                if e.code != GRPC_UNAVAILABLE or type(e) is not EtcdError:
                    self._prefer(endpoint)
                    raise
                # The member answered but cannot serve (no leader, request timed out).
                if not repeatable and "no leader" not in e.message:
                    raise EtcdUnavailable(
                        f"{endpoint.name}: {e.message}; the outcome of {path} is unknown"
                    ) from None
                errors.append(f"{endpoint.name}: {e.message}")
                continue
            if errors:
                log.debug("etcd %s answered after: %s", endpoint.name, "; ".join(errors))
            self._prefer(endpoint)
            return result
        if only is not None:
            raise EtcdUnavailable(errors[0])
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    def _prefer(self, endpoint: _Endpoint) -> None:
        if endpoint in self._endpoints:
            self._preferred = self._endpoints.index(endpoint)

    def _connection(self, endpoint: _Endpoint) -> http.client.HTTPConnection:
        conns: dict[str, http.client.HTTPConnection] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(endpoint.name)
        if conn is not None and conn.sock is not None and _dropped(conn.sock):
            # The member closed the kept-alive connection (restart, kill): reconnect.
            conn.close()
        if conn is None:
            if endpoint.tls:
                conn = http.client.HTTPSConnection(
                    endpoint.host, endpoint.port, timeout=self._timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(
                    endpoint.host, endpoint.port, timeout=self._timeout
                )
            conns[endpoint.name] = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _attempt(self, endpoint: _Endpoint, path: str, payload: bytes) -> tuple[int, bytes]:
        """One request to one member within `timeout`: (HTTP status, body)."""
        deadline = time.monotonic() + self._timeout
        conn = self._connection(endpoint)
        try:
            if conn.sock is None:
                conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
            conn.request("POST", path, payload, {"Content-Type": "application/json"})
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _NotSent(_describe(e)) from None
        try:
            conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
            response = conn.getresponse()
            data = response.read()
            if response.will_close:
                conn.close()
            return response.status, data
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _Unanswered(_describe(e)) from None


def _dropped(sock: socket.socket) -> bool:
    """An idle kept-alive socket that is readable has been closed (or sent garbage)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable:
        return False
    if isinstance(sock, ssl.SSLSocket):
        # TLS 1.3 session tickets make an idle socket readable: read them to tell.
        sock.setblocking(False)
        try:
            sock.recv(1)
        except ssl.SSLWantReadError:
            return False
        except OSError:
            return True
        finally:
            sock.setblocking(True)
    return True


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        why = e.verify_message or e.reason
        return f"TLS: the member's certificate is not trusted ({why}): check ca_file"
    if isinstance(e, ssl.SSLEOFError) or (
        isinstance(e, ssl.SSLError) and "ALERT" in str(e.reason or "")
    ):
        # etcd with --client-cert-auth hangs up or alerts when our certificate is missing
        # or not from its CA.
        why = e.reason or "closed during the handshake"
        return f"TLS: the member refused the handshake ({why}): check cert_file and key_file"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, http.client.RemoteDisconnected):
        return "closed the connection"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
