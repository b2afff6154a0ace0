"""The SQLite state store: node events and progress, DHCP leases, install state.

One file, `<state_dir>/appliance.db`, in WAL mode with synchronous=FULL: a lease the
DHCP server handed out must still be there after kill -9 or a power cut, or two
machines could end up on one address. Every write method is one transaction.

The schema is versioned with `PRAGMA user_version`; MIGRATIONS[i] takes the database
from version i to i + 1. Add new migrations at the end, never edit a released one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from appliance.events import STAGES, Event, EventBus

# The values and errors of the store's Protocols, defined there (no sqlite3) and
# re-exported here, where they always were.
from appliance.stores import UNKNOWN_MACHINES_KEEP as UNKNOWN_MACHINES_KEEP
from appliance.stores import Lease as Lease
from appliance.stores import LeaseConflict as LeaseConflict
from appliance.stores import LeaseState as LeaseState
from appliance.stores import StoreError as StoreError
from appliance.stores import UnknownMachine as UnknownMachine

log = logging.getLogger(__name__)

DB_NAME = "appliance.db"
BUSY_TIMEOUT_MS = 5000  # another process (e.g. an operator's sqlite3 shell) may hold a lock

LEASE_STATES: frozenset[str] = frozenset(("offered", "bound", "declined", "released"))

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the initial schema
    (
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            time REAL NOT NULL,
            node TEXT NOT NULL,
            stage TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX events_node ON events (node, id)",
        """CREATE TABLE node_stage (
            node TEXT NOT NULL,
            stage TEXT NOT NULL,
            first_time REAL NOT NULL,
            last_time REAL NOT NULL,
            detail TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (node, stage))""",
        """CREATE TABLE leases (
            mac TEXT PRIMARY KEY,
            ip TEXT UNIQUE NOT NULL,
            hostname TEXT,
            expires REAL NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('offered', 'bound', 'declined', 'released')),
            updated REAL NOT NULL)""",
        "CREATE INDEX leases_expires ON leases (expires)",
        """CREATE TABLE install_state (
            node TEXT PRIMARY KEY,
            installed_at REAL,
            reinstall_requested REAL)""",
    ),
    # 2: machines that network-boot but are not in the inventory
    (
        """CREATE TABLE unknown_machines (
            mac TEXT PRIMARY KEY,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            seen INTEGER NOT NULL DEFAULT 1,
            vendor_class TEXT NOT NULL DEFAULT '',
            arch TEXT NOT NULL DEFAULT '',
            user_class TEXT NOT NULL DEFAULT '',
            hostname TEXT NOT NULL DEFAULT '')""",
    ),
    # 3: the cluster loop: CSR decisions and its resumable state (GPU bring-up, bootstrap)
    (
        """CREATE TABLE csr_decisions (
            id INTEGER PRIMARY KEY,
            time REAL NOT NULL,
            csr TEXT NOT NULL,
            uid TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL,
            node TEXT NOT NULL DEFAULT '',
            requestor TEXT NOT NULL DEFAULT '',
            decision TEXT NOT NULL CHECK (decision IN ('approve', 'pending', 'deny')),
            reason TEXT NOT NULL)""",
        "CREATE INDEX csr_decisions_csr ON csr_decisions (csr, id)",
        """CREATE TABLE cluster_state (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated REAL NOT NULL)""",
    ),
    # 4: refused attempts (ok = 0) are recorded as events without reaching the stage
    ("ALTER TABLE events ADD COLUMN ok INTEGER NOT NULL DEFAULT 1",),
    # 5: unknown machines are a bounded table (the least recently seen go first, counted)
    (
        "CREATE INDEX unknown_machines_last_seen ON unknown_machines (last_seen, mac)",
        """CREATE TABLE unknown_machines_evicted (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            count INTEGER NOT NULL)""",
        "INSERT INTO unknown_machines_evicted (id, count) VALUES (1, 0)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


_LEASE_COLUMNS = "mac, ip, hostname, expires, state, updated"


def _lease(row: tuple[object, ...]) -> Lease:
    mac, ip, hostname, expires, state, updated = row
    return Lease(
        str(mac),
        str(ip),
        None if hostname is None else str(hostname),
        float(cast(float, expires)),
        cast(LeaseState, state),
        float(cast(float, updated)),
    )


def _stage_order(stage: str) -> int:
    # Stages this version does not know (a newer writer) sort last instead of failing.
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


class Store:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        durable: bool = True,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        check_same_thread: bool = True,
    ) -> Store:
        """Open (and migrate) the store; `durable=False` trades power-loss safety for speed.

        WAL with synchronous=NORMAL still survives kill -9; only a power cut may lose
        the last commits. The DHCP leases always use a durable connection of their own.
        The daemon's connections wait briefly for a lock (`busy_timeout_ms`) and retry
        on their own schedule (appliance/storequeue.py); `check_same_thread=False` lets
        a connection opened here be used by one other thread.
        """
        path = Path(state_dir) / DB_NAME
        try:
            Path(state_dir).mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open state store {path}: {exc.strerror or exc}") from exc
        conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: no implicit transactions; _transaction() decides.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"cannot open state store {path}: WAL mode refused ({mode})")
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            store = cls(conn, path)
            store._migrate()
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreError(f"cannot open state store {path}: {exc}") from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return store

    def _migrate(self) -> None:
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"cannot open state store {self.path}: schema version {version} is newer "
                f"than this appliance supports ({SCHEMA_VERSION})"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction() as cur:
                for statement in MIGRATIONS[target - 1]:
                    cur.execute(statement)
                cur.execute(f"PRAGMA user_version={target}")
            log.info("state store %s migrated to schema version %d", self.path, target)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        # IMMEDIATE takes the write lock up front, so a transaction never fails halfway
        # on SQLITE_BUSY after having read.
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # also when COMMIT itself failed
                self._conn.execute("ROLLBACK")
            raise
        finally:
            cur.close()

    def set_busy_timeout(self, ms: int) -> None:
        """How long a statement waits for another connection's lock before SQLITE_BUSY."""
        self._conn.execute(f"PRAGMA busy_timeout={int(ms)}")

    def close(self) -> None:
        self._conn.close()  # idempotent in sqlite3

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- events and progress ----------------------------------------------------------

    def record_event(self, ev: Event) -> Event:
        return self.record_events([ev])[0]

    def record_events(self, evs: Sequence[Event]) -> list[Event]:
        stored: list[Event] = []
        with self._transaction() as cur:
            for ev in evs:
                cur.execute(
                    """INSERT INTO events (time, node, stage, detail, source, ok)
                    VALUES (?, ?, ?, ?, ?, ?)""",
                    (ev.time, ev.node, ev.stage, ev.detail, ev.source, int(ev.ok)),
                )
                assert cur.lastrowid is not None
                stored.append(dataclasses.replace(ev, id=cur.lastrowid))
                if not ev.ok:
                    continue  # a refused attempt: the node has not reached the stage
                # The latest event decides the detail, even if events arrive out of order.
                cur.execute(
                    """INSERT INTO node_stage (node, stage, first_time, last_time, detail)
                    VALUES (?, ?, ?, ?, ?)
                    ON CONFLICT (node, stage) DO UPDATE SET
                        first_time = min(first_time, excluded.first_time),
                        detail = CASE WHEN excluded.last_time >= last_time
                                 THEN excluded.detail ELSE detail END,
                        last_time = max(last_time, excluded.last_time)""",
                    (ev.node, ev.stage, ev.time, ev.time, ev.detail),
                )
        return stored

    def events(
        self, *, node: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[Event]:
        """Stored events in id order, those after `after_id` (for paging and tailing)."""
        sql = "SELECT node, stage, detail, time, source, id, ok FROM events WHERE id > ?"
        args: list[object] = [after_id]
        if node is not None:
            sql += " AND node = ?"
            args.append(node)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        return [
            Event(node_, stage, detail, time, source, id_, bool(ok))
            for node_, stage, detail, time, source, id_, ok in self._conn.execute(sql, args)
        ]

    def last_event_id(self) -> int:
        """The id of the newest stored event (0 when there is none): where a live tail starts."""
        return int(self._conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

    def event_counts(self) -> dict[str, int]:
        """Stored events per stage (for metrics)."""
        rows = self._conn.execute("SELECT stage, count(*) FROM events GROUP BY stage")
        return {str(stage): int(n) for stage, n in rows}

    def progress(self) -> dict[str, dict[str, tuple[float, float, str]]]:
        """node -> stage -> (first_time, last_time, detail); stages in install order."""
        rows = self._conn.execute(
            "SELECT node, stage, first_time, last_time, detail FROM node_stage ORDER BY node"
        ).fetchall()
        rows.sort(key=lambda r: (r[0], _stage_order(r[1])))
        result: dict[str, dict[str, tuple[float, float, str]]] = {}
        for node, stage, first, last, detail in rows:
            result.setdefault(node, {})[stage] = (first, last, detail)
        return result

    async def persist(self, bus: EventBus) -> None:
        """Write the bus's events in batches until cancelled, on the caller's loop.

        The daemon uses DaemonStore.persist (appliance/storequeue.py), which queues to
        a writer thread: a lock held by another process must not stall the loop.
        Subscribes when the task first runs: start it before the services publish.
        On cancellation, whatever is already queued is written before exiting.
        """
        with bus.subscribe() as sub:
            try:
                while True:
                    first = await sub.get()
                    self._persist_batch([first, *sub.drain()])
            except asyncio.CancelledError:
                self._persist_batch(sub.drain())
                raise

    def _persist_batch(self, batch: list[Event]) -> None:
        if not batch:
            return
        try:
            self.record_events(batch)
        except sqlite3.Error:
            # Events are a record, not state: losing a batch must not stop the daemon.
            log.exception("state store %s: lost %d events", self.path, len(batch))

    # --- leases ---------------------------------------------------------------------

    def put_lease(self, lease: Lease) -> None:
        """Insert or replace the lease of `lease.mac`; LeaseConflict if another MAC has the IP."""
        if lease.state not in LEASE_STATES:
            raise ValueError(f"unknown lease state {lease.state!r}")
        try:
            with self._transaction() as cur:
                cur.execute(
                    f"""INSERT INTO leases ({_LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)
                    ON CONFLICT (mac) DO UPDATE SET
                        ip = excluded.ip, hostname = excluded.hostname,
                        expires = excluded.expires, state = excluded.state,
                        updated = excluded.updated""",
                    dataclasses.astuple(lease),
                )
        except sqlite3.IntegrityError as exc:
            holder = self.lease_for_ip(lease.ip)
            if holder is not None and holder.mac != lease.mac:
                raise LeaseConflict(
                    f"{lease.ip} is leased to {holder.mac}, not to {lease.mac}"
                ) from exc
            raise StoreError(f"cannot store lease for {lease.mac}: {exc}") from exc

    def save_leases(self, leases: Sequence[Lease]) -> None:
        """Write a batch of leases in one transaction (one fsync: group commit).

        The caller's lease table is the authority: a stored row that holds one of
        these addresses under another MAC is an expired binding, and is replaced.
        """
        for lease in leases:
            if lease.state not in LEASE_STATES:
                raise ValueError(f"unknown lease state {lease.state!r}")
        rows = [
            (lease.mac, lease.ip, lease.hostname, lease.expires, lease.state, lease.updated)
            for lease in leases
        ]
        with self._transaction() as cur:
            cur.executemany(
                "DELETE FROM leases WHERE ip = ? AND mac != ?", [(r[1], r[0]) for r in rows]
            )
            cur.executemany(
                f"""INSERT INTO leases ({_LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (mac) DO UPDATE SET
                    ip = excluded.ip, hostname = excluded.hostname,
                    expires = excluded.expires, state = excluded.state,
                    updated = excluded.updated""",
                rows,
            )

    def lease_for_mac(self, mac: str) -> Lease | None:
        row = self._conn.execute(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE mac = ?", (mac,)
        ).fetchone()
        return None if row is None else _lease(row)

    def lease_for_ip(self, ip: str) -> Lease | None:
        row = self._conn.execute(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE ip = ?", (ip,)
        ).fetchone()
        return None if row is None else _lease(row)

    def leases(self, now: float | None = None) -> list[Lease]:
        """All leases by MAC; with `now`, only those not yet expired (expires >= now)."""
        if now is None:
            rows = self._conn.execute(f"SELECT {_LEASE_COLUMNS} FROM leases ORDER BY mac")
        else:
            rows = self._conn.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE expires >= ? ORDER BY mac", (now,)
            )
        return [_lease(row) for row in rows]

    def delete_lease(self, mac: str) -> bool:
        with self._transaction() as cur:
            cur.execute("DELETE FROM leases WHERE mac = ?", (mac,))
            return cur.rowcount > 0

    def expire_leases(self, now: float) -> int:
        """Delete every lease with expires < now (declined ones too: their quarantine is over)."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM leases WHERE expires < ?", (now,))
            return cur.rowcount

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
        """Record sightings in one transaction (`seen`: requests since the last note);
        keep at most `keep` machines, the least recently seen go first. Returns how many
        went; their count, plus `lost` (machines the caller could not keep until this
        write), is kept: unknown_machine_counts."""
        with self._transaction() as cur:
            cur.executemany(
                """INSERT INTO unknown_machines (mac, first_seen, last_seen, seen,
                    vendor_class, arch, user_class, hostname)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (mac) DO UPDATE SET
                    last_seen = max(last_seen, excluded.last_seen),
                    seen = seen + excluded.seen,
                    vendor_class = excluded.vendor_class, arch = excluded.arch,
                    user_class = excluded.user_class, hostname = excluded.hostname""",
                [dataclasses.astuple(m) for m in machines],
            )
            total = int(cur.execute("SELECT count(*) FROM unknown_machines").fetchone()[0])
            evicted = max(0, total - keep)
            if evicted:
                cur.execute(
                    """DELETE FROM unknown_machines WHERE mac IN (SELECT mac FROM
                    unknown_machines ORDER BY last_seen, mac LIMIT ?)""",
                    (evicted,),
                )
            if evicted or lost:
                cur.execute(
                    "UPDATE unknown_machines_evicted SET count = count + ? WHERE id = 1",
                    (evicted + lost,),
                )
        return evicted

    def unknown_machines(self, limit: int = -1, offset: int = 0) -> list[dict[str, object]]:
        """Machines outside the inventory, the most recently seen first; a page of
        `limit` (-1: all) after skipping `offset`."""
        cur = self._conn.execute(
            """SELECT mac, first_seen, last_seen, seen, vendor_class, arch, user_class, hostname
            FROM unknown_machines ORDER BY last_seen DESC, mac LIMIT ? OFFSET ?""",
            (limit, offset),
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]

    def unknown_machine_counts(self) -> tuple[int, int]:
        """(machines listed, machines evicted to keep the list bounded, ever)."""
        total = self._conn.execute("SELECT count(*) FROM unknown_machines").fetchone()[0]
        row = self._conn.execute("SELECT count FROM unknown_machines_evicted").fetchone()
        return int(total), int(row[0]) if row else 0

    # --- install state (boot once) ----------------------------------------------------

    def mark_installed(self, node: str, time: float) -> None:
        with self._transaction() as cur:
            cur.execute(
                """INSERT INTO install_state (node, installed_at) VALUES (?, ?)
                ON CONFLICT (node) DO UPDATE SET installed_at = excluded.installed_at""",
                (node, time),
            )

    def is_installed(self, node: str) -> bool:
        row = self._conn.execute(
            "SELECT installed_at FROM install_state WHERE node = ?", (node,)
        ).fetchone()
        return row is not None and row[0] is not None

    def request_reinstall(self, node: str, time: float) -> None:
        """Forget that `node` is installed, so its next PXE boot installs it again."""
        with self._transaction() as cur:
            cur.execute(
                """INSERT INTO install_state (node, installed_at, reinstall_requested)
                VALUES (?, NULL, ?)
                ON CONFLICT (node) DO UPDATE SET
                    installed_at = NULL, reinstall_requested = excluded.reinstall_requested""",
                (node, time),
            )

    def install_state(self) -> dict[str, dict[str, float | None]]:
        """node -> {"installed_at": time | None, "reinstall_requested": time | None}."""
        rows = self._conn.execute(
            "SELECT node, installed_at, reinstall_requested FROM install_state ORDER BY node"
        )
        return {
            node: {"installed_at": installed, "reinstall_requested": requested}
            for node, installed, requested in rows
        }

    # --- the cluster loop ---------------------------------------------------------------

    def record_csr_decision(
        self, *, time: float, csr: str, kind: str, decision: str, reason: str,
        uid: str = "", node: str = "", requestor: str = "",
    ) -> int:  # fmt: skip
        """Store one review of a CSR (kind "client", "serving" or "other"); returns its id."""
        with self._transaction() as cur:
            cur.execute(
                """INSERT INTO csr_decisions
                    (time, csr, uid, kind, node, requestor, decision, reason)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (time, csr, uid, kind, node, requestor, decision, reason),
            )
            return int(cur.lastrowid or 0)

    def csr_decisions(self, limit: int = 500) -> list[dict[str, object]]:
        """The newest `limit` decisions, newest first."""
        cur = self._conn.execute(
            """SELECT id, time, csr, uid, kind, node, requestor, decision, reason
            FROM csr_decisions ORDER BY id DESC LIMIT ?""",
            (limit,),
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]

    def csr_decision_counts(self) -> dict[str, int]:
        """Stored CSR decisions per decision (approve, pending, deny), for metrics."""
        rows = self._conn.execute("SELECT decision, count(*) FROM csr_decisions GROUP BY decision")
        return {str(decision): int(n) for decision, n in rows}

    def set_cluster_state(self, key: str, value: object, time: float) -> None:
        """Keep a JSON-serialisable value under `key` (e.g. "gpu", "bootstrap")."""
        with self._transaction() as cur:
            cur.execute(
                """INSERT INTO cluster_state (key, value, updated) VALUES (?, ?, ?)
                ON CONFLICT (key) DO UPDATE SET
                    value = excluded.value, updated = excluded.updated""",
                (key, json.dumps(value, sort_keys=True), time),
            )

    def cluster_states(self) -> dict[str, str]:
        """Every key's value as its stored JSON text (the daemon keeps them in memory)."""
        rows = self._conn.execute("SELECT key, value FROM cluster_state")
        return {str(key): str(value) for key, value in rows}

    def cluster_state(self, key: str) -> Any:
        """The value kept under `key`, or None."""
        row = self._conn.execute("SELECT value FROM cluster_state WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])
