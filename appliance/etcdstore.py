"""The state store in etcd (the HA pair): the SQLite Store's methods over etcd's keys.

Everything lives under `<prefix>/state/` (the leader key `<prefix>/leader` is the
elector's). Values are JSON; keys with numeric ids are zero-padded, so etcd's key order
is id order:

    lease/ip/<ip>           {"mac", "ip", "hostname", "expires", "state", "updated"}
    lease/mac/<mac>         "<ip>": an index, checked against the ip key on every read
    event/<id:012d>         {"node", "stage", "detail", "time", "source", "ok"}
    event_seq               the newest event id (advanced by compare-and-swap)
    event_count/<stage>     events ever stored per stage (the metrics' counts)
    stage/<node>/<stage>    {"node", "stage", "first", "last", "detail"}: progress, kept
                            apart from the events, so trimming events loses no progress
    install/<node>          {"installed_at", "reinstall_requested"}
    cluster/<key>           {"value", "updated"}
    csr/<id:012d>           one CSR decision; csr_seq, csr_count/<decision> as for events
    unknown/<mac>           one machine outside the inventory; unknown_evicted: a count

Every write that depends on what is stored reads, decides in plain code, and writes with
a transaction that compares the revisions it read (another member may write meanwhile):
when a compare fails it reads and decides again, a bounded number of times. A lease is
allocated that way, so two members never give one address to two MACs. A write returns
once etcd committed it (a quorum of members has it): an ACK may wait on it.

Errors in the Protocols' terms: etcd unreachable (every endpoint tried) is
StoreUnavailable, the same write may succeed later; another etcd error is StoreError.
The methods block (the client is synchronous): callers run them off the loop, as they
do the SQLite store's (appliance/stores.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from appliance.etcd import (
    KV,
    Compare,
    Delete,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    Get,
    Op,
    Put,
    RangeResult,
    TxnResult,
    prefix_end,
)
from appliance.events import STAGES, Event
from appliance.stores import (
    UNKNOWN_MACHINES_KEEP,
    Lease,
    LeaseConflict,
    LeaseState,
    StoreError,
    StoreUnavailable,
    UnknownMachine,
)

log = logging.getLogger("appliance.ha")

T = TypeVar("T")

LEASE_STATES: frozenset[str] = frozenset(("offered", "bound", "declined", "released"))
TXN_OPS = 128  # etcd's default --max-txn-ops: compares, and ops per branch, each at most this
LEASES_PER_TXN = 32  # a lease takes up to 3 compares and 3 ops
CHUNK_THREADS = 4  # transactions of one big lease batch in flight at once
EVENTS_PER_TXN = 40  # an event: its key, its stage's progress key, its stage's count
UNKNOWN_PER_TXN = 100
CAS_TRIES = 20  # reads and decides again this often when another writer got there first
UNKNOWN_RETRY = 3.0  # s: a write whose outcome is unknown (etcd changed leader) is retried
UNKNOWN_PAUSE = 0.1  # s between those tries (an etcd election takes about a second)
EVENTS_KEEP = 20_000  # the newest events kept; older ones go (their progress stays)
CSR_KEEP = 10_000  # the newest CSR decisions kept
ID_WIDTH = 12
HISTORY_KEEP = 100_000  # revisions of etcd's history kept by compact_history
GRPC_OUT_OF_RANGE = 11  # etcd: "required revision has been compacted"


# --- pure decisions (no etcd): what a write does given what is stored --------------------


def lease_live(holder: Lease, now: float) -> bool:
    """Does `holder` still keep its address from other MACs at `now`? Offered, bound and
    declined (quarantined) leases do until they expire; a released one does not."""
    return holder.state != "released" and holder.expires > now


def lease_refused(want: Lease, holder: Lease | None, *, strict: bool) -> bool:
    """May `want` take its address, held by `holder`? `now` is the lease's own decision
    time (`updated`). `strict` (put_lease): any other MAC's lease refuses it, as SQLite's
    unique address does; else only a live one (save_leases: an expired one is replaced)."""
    if holder is None or holder.mac == want.mac:
        return False
    return strict or lease_live(holder, want.updated)


def merge_stage(old: tuple[float, float, str] | None, ev: Event) -> tuple[float, float, str]:
    """The progress of (node, stage) after `ev`: as SQLite's upsert, the latest event
    (by time, even arriving out of order) decides the detail."""
    if old is None:
        return (ev.time, ev.time, ev.detail)
    first, last, detail = old
    return (min(first, ev.time), max(last, ev.time), ev.detail if ev.time >= last else detail)


def merge_unknown(old: UnknownMachine | None, new: UnknownMachine) -> UnknownMachine:
    """A sighting on top of the stored machine (SQLite's upsert of unknown_machines)."""
    if old is None:
        return new
    return dataclasses.replace(
        new,
        first_seen=old.first_seen,
        last_seen=max(old.last_seen, new.last_seen),
        seen=old.seen + new.seen,
    )


def trim_below(last_id: int, keep: int) -> int:
    """The first id kept when `last_id` is the newest and `keep` are kept (1: all)."""
    return max(1, last_id - keep + 1)


def _stage_order(stage: str) -> int:
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


# --- codecs ---------------------------------------------------------------------------


def _dump(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _load(kv: KV | None) -> Any:
    return None if kv is None else json.loads(kv.value)


def _lease_of(kv: KV | None) -> Lease | None:
    raw = _load(kv)
    if raw is None:
        return None
    return Lease(
        str(raw["mac"]),
        str(raw["ip"]),
        None if raw["hostname"] is None else str(raw["hostname"]),
        float(raw["expires"]),
        cast(LeaseState, raw["state"]),
        float(raw["updated"]),
    )


def _unchanged(key: bytes, kv: KV | None) -> Compare:
    """The compare that holds while `key` is as it was read (absent: still absent)."""
    if kv is None:
        return Compare(key, "CREATE", "EQUAL", 0)
    return Compare(key, "MOD", "EQUAL", kv.mod_revision)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(frozen=True, slots=True)
class _Refusal:
    lease: Lease
    holder: Lease


class EtcdStore:
    """The SQLite `Store`'s methods (those the daemon, the DHCP service, the admin API
    and the metrics call) over etcd. Thread-safe as its client is; `close` closes the
    client only when this store owns it (the daemon's stores share one)."""

    def __init__(self, client: EtcdClient, prefix: str, *, owns_client: bool = False) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.path = Path(f"etcd:{self.prefix}")  # what the store's log lines name
        self._root = f"{self.prefix}/state/".encode()
        self._owns_client = owns_client
        self._closed = False
        self._chunks: concurrent.futures.ThreadPoolExecutor | None = None  # big batches

    def key(self, *parts: str) -> bytes:
        return self._root + "/".join(parts).encode()

    def _chunk_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._chunks is None:
            self._chunks = concurrent.futures.ThreadPoolExecutor(
                CHUNK_THREADS, thread_name_prefix="etcd-leases"
            )
        return self._chunks

    def close(self) -> None:
        if self._chunks is not None:
            self._chunks.shutdown(wait=True)
            self._chunks = None
        if self._owns_client and not self._closed:
            self.client.close()
        self._closed = True

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- etcd, in the store's errors --------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except EtcdUnavailable as exc:
            raise StoreUnavailable(f"state store {self.path}: {what}: {exc}") from exc
        except EtcdError as exc:
            raise StoreError(f"state store {self.path}: {what}: {exc}") from exc

    def _get_many(self, keys: Sequence[bytes]) -> dict[bytes, KV | None]:
        """The keys' current values, each chunk from one revision (one round trip)."""
        found: dict[bytes, KV | None] = {}
        unique = list(dict.fromkeys(keys))
        deadline = time.monotonic() + UNKNOWN_RETRY
        for chunk in _chunks(unique, TXN_OPS):
            result = self._read_txn([Get(k) for k in chunk], deadline)
            for k, resp in zip(chunk, result.responses, strict=True):
                assert isinstance(resp, RangeResult)
                found[k] = resp.kvs[0] if resp.kvs else None
        return found

    def _read_txn(self, gets: list[Op], deadline: float) -> TxnResult:
        # A txn of reads is never failed over by the client (it cannot tell it from a
        # write); repeating it is harmless, so it is, while etcd elects a leader.
        while True:
            try:
                return self.client.txn([], gets)
            except EtcdUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(UNKNOWN_PAUSE)

    def _range(self, prefix: bytes, start: bytes | None = None, limit: int = 0) -> RangeResult:
        return self.client.range(start or prefix, prefix_end(prefix), limit=limit)

    def _try_txn(self, compares: list[Compare], ops: list[Op], deadline: float) -> bool | None:
        """True: committed; False: a compare failed; None: the outcome is unknown (etcd
        changed leader, the answer was lost) and there is time left to read again."""
        try:
            return self.client.txn(compares, ops).succeeded
        except EtcdUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(UNKNOWN_PAUSE)
            return None

    def _update(
        self,
        what: str,
        keys: Sequence[bytes],
        decide: Callable[[dict[bytes, KV | None]], tuple[list[Op], T]],
        applied: Callable[[T], bool] | None = None,
    ) -> T:
        """Read `keys`, decide the ops from them, write the ops if none of the keys
        changed meanwhile; again (bounded) when one did. After a write whose outcome is
        unknown, `applied(result)` says whether it went through (for writes that must
        not be done twice, as an id taken from a counter); else it is decided again."""
        deadline = time.monotonic() + UNKNOWN_RETRY
        unknown: list[T] = []
        with self._errors(what):
            for _ in range(CAS_TRIES):
                found = self._get_many(keys)
                if unknown and applied is not None and applied(unknown[-1]):
                    return unknown[-1]
                ops, result = decide(found)
                if not ops:
                    return result
                compares = [_unchanged(k, found[k]) for k in found]
                done = self._try_txn(compares, ops, deadline)
                if done:
                    return result
                if done is None:
                    unknown.append(result)
        raise StoreUnavailable(
            f"state store {self.path}: {what}: other writers won {CAS_TRIES} times running"
        )

    # --- etcd's history ----------------------------------------------------------------

    def compact_history(self, keep: int = HISTORY_KEEP) -> int:
        """Drop etcd's record of revisions older than the newest `keep` (current values
        stay): etcd keeps every version of every key until compacted, and leases and
        events write many. Cluster-wide: the leader calls it now and then (or etcd runs
        with --auto-compaction-retention). Returns the revision compacted to, 0 if none."""
        with self._errors("compaction"):
            target = self.client.range(self.key("event_seq")).revision - keep
            if target <= 0:
                return 0
            try:
                self.client.compact(target)
            except EtcdError as exc:
                if type(exc) is EtcdError and exc.code == GRPC_OUT_OF_RANGE:
                    return 0  # already compacted that far (the other member did)
                raise
        return target

    # --- leases ---------------------------------------------------------------------

    def _ip_key(self, ip: str) -> bytes:
        return self.key("lease", "ip", ip)

    def _mac_key(self, mac: str) -> bytes:
        return self.key("lease", "mac", mac)

    def save_leases(self, leases: Sequence[Lease]) -> None:
        """Store a batch of leases once etcd committed them; an address that another
        MAC holds live (another member gave it out) is not written: LeaseConflict, with
        the refused leases and their holders, after the rest of the batch is stored."""
        self._save_leases(leases, strict=False)

    def put_lease(self, lease: Lease) -> None:
        """Insert or replace the lease of `lease.mac`; LeaseConflict if another MAC has the IP."""
        self._save_leases([lease], strict=True)

    def _save_leases(self, leases: Sequence[Lease], *, strict: bool) -> None:
        for lease in leases:
            if lease.state not in LEASE_STATES:
                raise ValueError(f"unknown lease state {lease.state!r}")
        # One lease per MAC and per address, the later one winning, as the table meant.
        by_mac: dict[str, Lease] = {}
        for lease in leases:
            by_mac.pop(lease.mac, None)
            by_mac[lease.mac] = lease
        by_ip: dict[str, Lease] = {}
        for lease in by_mac.values():
            by_ip[lease.ip] = lease
        wanted = list(by_ip.values())
        refused: list[_Refusal] = []
        chunks = list(_chunks(wanted, LEASES_PER_TXN))
        with self._errors(f"{len(wanted)} leases"):
            if len(chunks) == 1:
                refused += self._save_chunk(chunks[0], strict)
            else:
                # A backlog (a boot storm): the transactions go out together, each a
                # round trip to a quorum; their compares guard a key two chunks share.
                # Every one is waited for before an error is raised: none is left in flight.
                pool = self._chunk_pool()
                futures = [pool.submit(self._save_chunk, chunk, strict) for chunk in chunks]
                concurrent.futures.wait(futures)
                for future in futures:
                    refused += future.result()
        if refused:
            words = "; ".join(
                f"{r.lease.ip} is leased to {r.holder.mac}, not to {r.lease.mac}" for r in refused
            )
            raise LeaseConflict(
                words,
                refused=tuple(r.lease for r in refused),
                holders=tuple(r.holder for r in refused),
            )

    def _save_chunk(self, chunk: Sequence[Lease], strict: bool) -> list[_Refusal]:
        targets = {self._ip_key(lease.ip) for lease in chunk}
        deadline = time.monotonic() + UNKNOWN_RETRY
        for _ in range(CAS_TRIES):
            keys = [self._ip_key(x.ip) for x in chunk] + [self._mac_key(x.mac) for x in chunk]
            found = self._get_many(keys)
            # Where each MAC was before (its index), when that is another address.
            moved = {
                x.mac: old
                for x in chunk
                if (old := _load(found[self._mac_key(x.mac)])) is not None and old != x.ip
            }
            olds = [self._ip_key(ip) for ip in moved.values() if self._ip_key(ip) not in targets]
            found |= self._get_many(olds)
            refused: list[_Refusal] = []
            compares: list[Compare] = []
            ops: list[Op] = []
            for lease in chunk:
                ip_key, mac_key = self._ip_key(lease.ip), self._mac_key(lease.mac)
                holder = _lease_of(found[ip_key])
                if lease_refused(lease, holder, strict=strict):
                    assert holder is not None
                    refused.append(_Refusal(lease, holder))
                    continue
                compares += [_unchanged(ip_key, found[ip_key]), _unchanged(mac_key, found[mac_key])]
                ops += [
                    Put(ip_key, _dump(dataclasses.asdict(lease))),
                    Put(mac_key, _dump(lease.ip)),
                ]
                old_ip = moved.get(lease.mac)
                if old_ip is None:
                    continue
                old_key = self._ip_key(old_ip)
                old = _lease_of(found.get(old_key))
                # The address it leaves is free again, if it still holds this MAC (an
                # address written in this same transaction is simply overwritten).
                if old is not None and old.mac == lease.mac and old_key not in targets:
                    compares.append(_unchanged(old_key, found[old_key]))
                    ops.append(Delete(old_key))
            # A write whose outcome is unknown is decided again: a lease this MAC holds
            # (ours, if it went through) is simply written again.
            if not ops or self._try_txn(compares, ops, deadline):
                return refused
        raise StoreUnavailable(
            f"state store {self.path}: leases: other writers won {CAS_TRIES} times running"
        )

    def lease_for_ip(self, ip: str) -> Lease | None:
        with self._errors(f"lease of {ip}"):
            return _lease_of(self.client.get(self._ip_key(ip)))

    def lease_for_mac(self, mac: str) -> Lease | None:
        with self._errors(f"lease of {mac}"):
            ip = _load(self.client.get(self._mac_key(mac)))
            if ip is None:
                return None
            lease = _lease_of(self.client.get(self._ip_key(str(ip))))
        # The index may lag (an expired lease of this MAC replaced by another member).
        return lease if lease is not None and lease.mac == mac else None

    def _lease_kvs(self) -> list[tuple[KV, Lease]]:
        result = self._range(self.key("lease", "ip", ""))
        return [(kv, lease) for kv in result.kvs if (lease := _lease_of(kv)) is not None]

    def leases(self, now: float | None = None) -> list[Lease]:
        """All leases by MAC; with `now`, only those not yet expired (expires >= now)."""
        with self._errors("leases"):
            rows = [lease for _, lease in self._lease_kvs()]
        if now is not None:
            rows = [x for x in rows if x.expires >= now]
        return sorted(rows, key=lambda x: (x.mac, x.ip))

    def delete_lease(self, mac: str) -> bool:
        mac_key = self._mac_key(mac)
        with self._errors(f"lease of {mac}"):
            ip = _load(self.client.get(mac_key))
        if ip is None:
            return False
        ip_key = self._ip_key(str(ip))

        def decide(found: dict[bytes, KV | None]) -> tuple[list[Op], bool]:
            lease = _lease_of(found[ip_key])
            ops: list[Op] = [Delete(mac_key)] if found[mac_key] is not None else []
            if lease is not None and lease.mac == mac:
                return [*ops, Delete(ip_key)], True
            return ops, False

        return self._update(f"lease of {mac}", [mac_key, ip_key], decide)

    def expire_leases(self, now: float) -> int:
        """Delete every lease with expires < now (declined ones too: their quarantine is over)."""
        deleted = 0
        with self._errors("expiring leases"):
            expired = [(kv, x) for kv, x in self._lease_kvs() if x.expires < now]
            for chunk in _chunks(expired, LEASES_PER_TXN):
                macs = self._get_many([self._mac_key(x.mac) for _, x in chunk])
                compares: list[Compare] = []
                ops: list[Op] = []
                for kv, lease in chunk:
                    compares.append(Compare(kv.key, "MOD", "EQUAL", kv.mod_revision))
                    ops.append(Delete(kv.key))
                    mac_key = self._mac_key(lease.mac)
                    if _load(macs[mac_key]) == lease.ip:
                        compares.append(_unchanged(mac_key, macs[mac_key]))
                        ops.append(Delete(mac_key))
                if self._try_txn(compares, ops, 0.0):
                    deleted += len(chunk)
                # else: renewed meanwhile by another member; this sweep leaves it
        return deleted

    # --- events and progress ----------------------------------------------------------

    def _event_key(self, id_: int) -> bytes:
        return self.key("event", f"{id_:0{ID_WIDTH}d}")

    def _stage_key(self, node: str, stage: str) -> bytes:
        return self.key("stage", node, stage)

    def record_event(self, ev: Event) -> Event:
        return self.record_events([ev])[0]

    def record_events(self, evs: Sequence[Event]) -> list[Event]:
        stored: list[Event] = []
        for chunk in _chunks(list(evs), EVENTS_PER_TXN):
            stored += self._record_chunk(chunk)
        return stored

    def _record_chunk(self, chunk: Sequence[Event]) -> list[Event]:
        seq_key = self.key("event_seq")
        stage_keys = [self._stage_key(e.node, e.stage) for e in chunk if e.ok]
        count_keys = [self.key("event_count", e.stage) for e in chunk]

        def decide(found: dict[bytes, KV | None]) -> tuple[list[Op], list[Event]]:
            last = int(_load(found[seq_key]) or 0)
            stored = [dataclasses.replace(e, id=last + i) for i, e in enumerate(chunk, 1)]
            ops: list[Op] = [Put(seq_key, _dump(last + len(chunk)))]
            stages: dict[bytes, tuple[Event, tuple[float, float, str]]] = {}
            counts: dict[bytes, int] = {}
            for ev in stored:
                ops.append(Put(self._event_key(ev.id), _dump(_event_json(ev))))
                count_key = self.key("event_count", ev.stage)
                counts[count_key] = counts.get(count_key, int(_load(found[count_key]) or 0)) + 1
                if not ev.ok:
                    continue  # a refused attempt: the node has not reached the stage
                key = self._stage_key(ev.node, ev.stage)
                old = stages[key][1] if key in stages else None
                if old is None and (raw := _load(found[key])) is not None:
                    old = (float(raw["first"]), float(raw["last"]), str(raw["detail"]))
                stages[key] = (ev, merge_stage(old, ev))
            for key, (ev, (first, last_time, detail)) in stages.items():
                value = {"node": ev.node, "stage": ev.stage, "first": first, "last": last_time}
                ops.append(Put(key, _dump({**value, "detail": detail})))
            ops += [Put(k, _dump(n)) for k, n in counts.items()]
            newest = last + len(chunk)
            if newest > EVENTS_KEEP:  # one range delete: everything older than the kept
                cut = self._event_key(trim_below(newest, EVENTS_KEEP))
                ops.append(Delete(self.key("event", ""), cut))
            return ops, stored

        def applied(stored: list[Event]) -> bool:
            kv = self.client.get(self._event_key(stored[0].id))
            return bool(_load(kv) == json.loads(_dump(_event_json(stored[0]))))

        keys = [seq_key, *stage_keys, *count_keys]
        return self._update(f"{len(chunk)} events", keys, decide, applied)

    def events(
        self, *, node: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[Event]:
        """Stored events in id order, those after `after_id` (for paging and tailing)."""
        prefix = self.key("event", "")
        start = self._event_key(after_id + 1)
        found: list[Event] = []
        with self._errors("events"):
            # Pages until `limit` events of the node are found (bounded by what is kept).
            for _ in range(EVENTS_KEEP // 1000 + 2):
                page = self._range(prefix, start, limit=1000 if node else max(limit, 1))
                for kv in page.kvs:
                    ev = _event_of(kv)
                    if node is None or ev.node == node:
                        found.append(ev)
                if len(found) >= limit or not page.more or not page.kvs:
                    break
                start = page.kvs[-1].key + b"\0"
        return found[:limit]

    def last_event_id(self) -> int:
        """The id of the newest stored event (0 when there is none): where a live tail starts."""
        with self._errors("last event id"):
            return int(_load(self.client.get(self.key("event_seq"))) or 0)

    def event_counts(self) -> dict[str, int]:
        """Events per stage, ever stored (the newest EVENTS_KEEP are kept)."""
        prefix = self.key("event_count", "")
        with self._errors("event counts"):
            kvs = self._range(prefix).kvs
        return {kv.key[len(prefix) :].decode(): int(_load(kv)) for kv in kvs}

    def progress(self) -> dict[str, dict[str, tuple[float, float, str]]]:
        """node -> stage -> (first_time, last_time, detail); stages in install order."""
        with self._errors("progress"):
            kvs = self._range(self.key("stage", "")).kvs
        rows = [_load(kv) for kv in kvs]
        rows.sort(key=lambda r: (r["node"], _stage_order(r["stage"])))
        result: dict[str, dict[str, tuple[float, float, str]]] = {}
        for r in rows:
            stage = (float(r["first"]), float(r["last"]), str(r["detail"]))
            result.setdefault(str(r["node"]), {})[str(r["stage"])] = stage
        return result

    # --- machines outside the inventory ------------------------------------------------

    def note_unknown(
        self, mac: str, time: float, *, vendor_class: str = "", arch: str = "",
        user_class: str = "", hostname: str = "",
    ) -> None:  # fmt: skip
        self.note_unknowns(
            [UnknownMachine(mac, time, time, 1, vendor_class, arch, user_class, hostname)]
        )

    def note_unknowns(
        self, machines: Sequence[UnknownMachine], keep: int = UNKNOWN_MACHINES_KEEP, lost: int = 0
    ) -> int:
        """Record sightings; keep at most `keep` machines, the least recently seen go
        first. Returns how many went; their count plus `lost` is kept."""
        for chunk in _chunks(list(machines), UNKNOWN_PER_TXN):
            keys = [self.key("unknown", m.mac) for m in chunk]

            def decide(
                found: dict[bytes, KV | None], chunk: Sequence[UnknownMachine] = chunk
            ) -> tuple[list[Op], None]:
                merged: dict[bytes, UnknownMachine] = {}
                for m in chunk:
                    key = self.key("unknown", m.mac)
                    old = merged.get(key)
                    if old is None and (raw := _load(found[key])) is not None:
                        old = UnknownMachine(**raw)
                    merged[key] = merge_unknown(old, m)
                return [Put(k, _dump(dataclasses.asdict(m))) for k, m in merged.items()], None

            self._update("unknown machines", keys, decide)
        with self._errors("unknown machines"):
            prefix = self.key("unknown", "")
            total = self.client.range(prefix, prefix_end(prefix), keys_only=True).count
            evicted = max(0, total - keep)
            if evicted:
                rows = [_unknown_of(kv) for kv in self._range(prefix).kvs]
                rows.sort(key=lambda m: (m.last_seen, m.mac))
                for chunk_ in _chunks(rows[:evicted], TXN_OPS):
                    self.client.txn([], [Delete(self.key("unknown", m.mac)) for m in chunk_])
        if evicted or lost:
            count_key = self.key("unknown_evicted")
            self._update(
                "unknown machines evicted",
                [count_key],
                lambda f: (
                    [Put(count_key, _dump(int(_load(f[count_key]) or 0) + evicted + lost))],
                    None,
                ),
            )
        return evicted

    def unknown_machines(self, limit: int = -1, offset: int = 0) -> list[dict[str, object]]:
        """Machines outside the inventory, the most recently seen first; a page of
        `limit` (-1: all) after skipping `offset`."""
        with self._errors("unknown machines"):
            rows = [_unknown_of(kv) for kv in self._range(self.key("unknown", "")).kvs]
        rows.sort(key=lambda m: (-m.last_seen, m.mac))
        rows = rows[offset:] if limit < 0 else rows[offset : offset + limit]
        return [dataclasses.asdict(m) for m in rows]

    def unknown_machine_counts(self) -> tuple[int, int]:
        """(machines listed, machines evicted to keep the list bounded, ever)."""
        prefix = self.key("unknown", "")
        with self._errors("unknown machine counts"):
            total = self.client.range(prefix, prefix_end(prefix), keys_only=True).count
            evicted = int(_load(self.client.get(self.key("unknown_evicted"))) or 0)
        return total, evicted

    # --- install state (boot once) ----------------------------------------------------

    def mark_installed(self, node: str, time: float) -> None:
        key = self.key("install", node)

        def decide(found: dict[bytes, KV | None]) -> tuple[list[Op], None]:
            state = _load(found[key]) or {"installed_at": None, "reinstall_requested": None}
            return [Put(key, _dump({**state, "installed_at": time}))], None

        self._update(f"install mark of {node}", [key], decide)

    def is_installed(self, node: str) -> bool:
        with self._errors(f"install mark of {node}"):
            state = _load(self.client.get(self.key("install", node)))
        return state is not None and state["installed_at"] is not None

    def request_reinstall(self, node: str, time: float) -> None:
        """Forget that `node` is installed, so its next PXE boot installs it again."""
        value = {"installed_at": None, "reinstall_requested": time}
        with self._errors(f"reinstall of {node}"):
            self.client.put(self.key("install", node), _dump(value))

    def install_state(self) -> dict[str, dict[str, float | None]]:
        """node -> {"installed_at": time | None, "reinstall_requested": time | None}."""
        prefix = self.key("install", "")
        with self._errors("install state"):
            kvs = self._range(prefix).kvs
        return {kv.key[len(prefix) :].decode(): dict(_load(kv)) for kv in kvs}

    # --- the cluster loop ---------------------------------------------------------------

    def record_csr_decision(
        self, *, time: float, csr: str, kind: str, decision: str, reason: str,
        uid: str = "", node: str = "", requestor: str = "",
    ) -> int:  # fmt: skip
        """Store one review of a CSR (kind "client", "serving" or "other"); returns its id."""
        if decision not in ("approve", "pending", "deny"):
            raise StoreError(f"unknown CSR decision {decision!r}")
        seq_key, count_key = self.key("csr_seq"), self.key("csr_count", decision)
        row = {"time": time, "csr": csr, "uid": uid, "kind": kind, "node": node,
               "requestor": requestor, "decision": decision, "reason": reason}  # fmt: skip

        def decide(found: dict[bytes, KV | None]) -> tuple[list[Op], int]:
            id_ = int(_load(found[seq_key]) or 0) + 1
            ops: list[Op] = [
                Put(seq_key, _dump(id_)),
                Put(self.key("csr", f"{id_:0{ID_WIDTH}d}"), _dump({"id": id_, **row})),
                Put(count_key, _dump(int(_load(found[count_key]) or 0) + 1)),
            ]
            if id_ > CSR_KEEP:
                cut = self.key("csr", f"{trim_below(id_, CSR_KEEP):0{ID_WIDTH}d}")
                ops.append(Delete(self.key("csr", ""), cut))
            return ops, id_

        def applied(id_: int) -> bool:
            kv = self.client.get(self.key("csr", f"{id_:0{ID_WIDTH}d}"))
            return bool(_load(kv) == json.loads(_dump({"id": id_, **row})))

        return self._update(f"CSR decision on {csr}", [seq_key, count_key], decide, applied)

    def csr_decisions(self, limit: int = 500) -> list[dict[str, object]]:
        """The newest `limit` decisions, newest first."""
        names = ("id", "time", "csr", "uid", "kind", "node", "requestor", "decision", "reason")
        prefix = self.key("csr", "")
        with self._errors("CSR decisions"):
            last = int(_load(self.client.get(self.key("csr_seq"))) or 0)
            start = self.key("csr", f"{max(1, last - limit + 1):0{ID_WIDTH}d}")
            kvs = self._range(prefix, start).kvs if limit > 0 else []
        rows = [_load(kv) for kv in reversed(kvs)]
        return [{name: r[name] for name in names} for r in rows[:limit]]

    def csr_decision_counts(self) -> dict[str, int]:
        """CSR decisions per decision (approve, pending, deny), ever stored."""
        prefix = self.key("csr_count", "")
        with self._errors("CSR decision counts"):
            kvs = self._range(prefix).kvs
        return {kv.key[len(prefix) :].decode(): int(_load(kv)) for kv in kvs}

    def set_cluster_state(self, key: str, value: object, time: float) -> None:
        """Keep a JSON-serialisable value under `key` (e.g. "gpu", "bootstrap")."""
        data = _dump({"value": value, "updated": time})
        with self._errors(f"cluster state {key!r}"):
            self.client.put(self.key("cluster", key), data)

    def cluster_states(self) -> dict[str, str]:
        """Every key's value as JSON text (as SQLite keeps it: sorted keys)."""
        prefix = self.key("cluster", "")
        with self._errors("cluster state"):
            kvs = self._range(prefix).kvs
        return {
            kv.key[len(prefix) :].decode(): json.dumps(_load(kv)["value"], sort_keys=True)
            for kv in kvs
        }

    def cluster_state(self, key: str) -> Any:
        """The value kept under `key`, or None."""
        with self._errors(f"cluster state {key!r}"):
            raw = _load(self.client.get(self.key("cluster", key)))
        return None if raw is None else raw["value"]


def _event_json(ev: Event) -> dict[str, object]:
    return {"id": ev.id, "node": ev.node, "stage": ev.stage, "detail": ev.detail,
            "time": ev.time, "source": ev.source, "ok": ev.ok}  # fmt: skip


def _event_of(kv: KV) -> Event:
    r = json.loads(kv.value)
    return Event(
        str(r["node"]), str(r["stage"]), str(r["detail"]), float(r["time"]),
        str(r["source"]), int(r["id"]), bool(r["ok"]),
    )  # fmt: skip


def _unknown_of(kv: KV) -> UnknownMachine:
    return UnknownMachine(**json.loads(kv.value))
