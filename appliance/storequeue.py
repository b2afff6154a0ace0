"""The running daemon's state store: no store call waits for a lock on the event loop.

SQLite lets one connection write at a time, and another process may hold the lock for
minutes: an operator's `sqlite3` shell with `BEGIN EXCLUSIVE;` left open, a backup
tool. A write on the event loop would wait out the busy timeout there, and every
service of the process (DNS first) with it.

Writes are queued in memory, in order, and written by one thread with a connection of
its own: events in batches (one transaction each), the rest one transaction per call.
SQLITE_BUSY is retried with backoff for as long as the lock is held, and counted;
nothing is dropped while the daemon runs. Past QUEUE_SOFT waiting writes the overflow
is counted and logged and memory keeps it; only past QUEUE_HARD do the oldest waiting
*events* go (counted as lost), so a lock held for days cannot exhaust memory. A
graceful stop flushes the queue, waiting a bounded time for the lock.

Reads: what the hot paths and the cluster loop ask for is kept in memory (install
marks, cluster state, node progress). The admin API's reads run in a reader thread on
a connection with a short busy timeout, after waiting (bounded) for the writes queued
before them: a reader sees its own writes, unless the file is locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from appliance.events import Event, EventBus
from appliance.store import Lease, Store, StoreError, _stage_order
from appliance.stores import UNKNOWN_MACHINES_KEEP, DhcpStore, StoreUnavailable, UnknownMachine
from appliance.stores import StoreBusy as StoreBusy

if TYPE_CHECKING:
    from appliance.etcd import EtcdClient
    from appliance.etcdstore import EtcdStore

    Backend = Store | EtcdStore  # the SQLite file, or etcd (the HA pair)

log = logging.getLogger("appliance.store")

WRITE_BUSY_MS = 100  # the writer thread's wait for a lock per attempt (then it backs off)
READ_BUSY_MS = 100  # a read waits this long for a lock at most (WAL readers rarely wait)
START_BUSY_MS = 5000  # opening (and migrating) at start may wait longer: it is before READY
BACKOFF_FIRST = 0.02  # seconds before the first retry of a write refused with SQLITE_BUSY
BACKOFF_MAX = 1.0  # the longest pause between retries
ERROR_GIVE_UP = 300.0  # seconds a write failing with another error (disk full) is retried
BUSY_WARN_AFTER = 2.0  # seconds of lock before the log says so
BUSY_REMIND_EVERY = 60.0  # and then again every this many seconds while it lasts
FAIL_REMIND_EVERY = 60.0  # a burst of writes given up is logged at most this often
QUEUE_SOFT = 100_000  # waiting writes before they count as overflow (kept, logged)
QUEUE_HARD = 2_000_000  # waiting writes before the oldest events are dropped (lost)
EVENT_BATCH = 1000  # events per transaction
READ_SYNC_WAIT = 0.2  # seconds a read waits for the writes queued before it
REFRESH_TRIES = 3  # reads of a refresh before it leaves memory as it is (writes kept coming)
STOP_FLUSH = 5.0  # seconds a graceful stop waits for the queue to reach the file
PERSIST_QUEUE = 100_000  # the persist task's bus subscription (drained at every wake-up)

T = TypeVar("T")


class WriterStore(Protocol):
    """What the writer thread calls itself; every other write is a function of the store
    (an _Op). The SQLite Store, or tests/fakestore.py's FailingStore."""

    @property
    def path(self) -> Path: ...

    def record_events(self, evs: Sequence[Event]) -> object: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=WriterStore)


@dataclass(frozen=True, slots=True)
class _Op(Generic[S]):
    name: str
    fn: Callable[[S], object]


_Item = Event | _Op[S]


def is_busy(exc: sqlite3.Error) -> bool:
    code = int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF  # the primary result code
    if code:
        return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class StoreWriter(Generic[S]):
    """One thread, one connection, one queue: every write of the daemon, in order.

    `submit` never blocks and never fails; `close` flushes (bounded) and stops the
    thread. `on_progress(done)` is called from the writer thread after each batch with
    the number of items finished so far (written, or given up and counted).
    """

    def __init__(self, store: S, on_progress: Callable[[int], None] | None = None) -> None:
        self.store = store  # its connection is used by the writer thread only
        self._on_progress = on_progress
        # The queue, in two parts so that the oldest event can go in O(1): other writes
        # with their sequence number and queue time, and events with their queue times
        # and runs [first seq, count] of consecutive sequence numbers, oldest first.
        self._ops: deque[tuple[int, _Op[S], float]] = deque()
        self._events: deque[Event] = deque()
        self._event_times: deque[float] = deque()
        self._runs: deque[list[int]] = deque()
        self._cond = threading.Condition()
        self._seq = 0  # items accepted
        self._done = 0  # every item up to this seq is finished (written, failed or dropped)
        self._inflight = 0  # items taken by the thread and not finished
        self._closing = False
        self._deadline = 0.0  # monotonic: when a closing writer gives up
        self._overflowing = False
        self._locked_since = 0.0  # monotonic, 0 when not locked
        self._reminded = 0.0
        self.counters: Counter[str] = Counter()
        self._failed_burst = 0  # writes given up since the last one that succeeded
        self._failed_logged = 0.0  # monotonic: when a give-up was last logged
        self.peak = 0
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    # --- the loop's side ------------------------------------------------------------

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def done(self) -> int:
        return self._done

    def submit(self, item: _Item[S]) -> int:
        """Queue one write; returns its sequence number (see `done`)."""
        with self._cond:
            if self._closing and not self._thread.is_alive():
                self.counters["lost"] += 1  # after the stop: nobody is left to write it
                log.error("state store: a write after the stop is not stored (%s)", item)
                return self._seq
            depth = self._queued() + self._inflight
            if depth >= QUEUE_HARD:
                self._drop_oldest_event()
            if depth >= QUEUE_SOFT:
                self.counters["overflow"] += 1
                if not self._overflowing:
                    self._overflowing = True
                    log.warning(
                        "state store %s: more than %d writes wait (locked for %.0f s); "
                        "memory keeps them until the file can be written",
                        self.store.path,
                        QUEUE_SOFT,
                        self._locked_for(),
                    )
            self._seq += 1
            now = time.monotonic()
            if isinstance(item, Event):
                runs = self._runs
                if runs and runs[-1][0] + runs[-1][1] == self._seq:
                    runs[-1][1] += 1
                else:
                    runs.append([self._seq, 1])
                self._events.append(item)
                self._event_times.append(now)
            else:
                self._ops.append((self._seq, item, now))
            self.peak = max(self.peak, self._queued() + self._inflight)
            self._cond.notify()
            return self._seq

    def _queued(self) -> int:
        return len(self._ops) + len(self._events)

    def _next_seq(self) -> int:
        """The sequence number of the oldest item still queued (past the last if none)."""
        first = self._seq + 1
        if self._ops:
            first = self._ops[0][0]
        if self._runs:
            first = min(first, self._runs[0][0])
        return first

    def _drop_oldest_event(self) -> None:
        if not self._events:
            return  # only other writes wait: those are kept
        self._events.popleft()
        self._event_times.popleft()
        run = self._runs[0]
        run[0] += 1
        run[1] -= 1
        if not run[1]:
            self._runs.popleft()
        # `done` is not moved here: it passes the dropped seq once every write before
        # it is finished (_run), so a read never overtakes a write still waiting.
        self.counters["lost"] += 1
        if self.counters["lost"] == 1 or self.counters["lost"] % 10_000 == 0:
            log.error(
                "state store %s: %d writes wait; the oldest events are dropped (%d so far)",
                self.store.path,
                QUEUE_HARD,
                self.counters["lost"],
            )

    def _locked_for(self) -> float:
        since = self._locked_since
        return time.monotonic() - since if since else 0.0

    def stats(self) -> dict[str, Any]:
        with self._cond:
            firsts = [self._event_times[0]] if self._event_times else []
            firsts += [self._ops[0][2]] if self._ops else []
            oldest = time.monotonic() - min(firsts) if firsts else 0.0
            return {
                "queued": self._queued() + self._inflight,
                "queue_peak": self.peak,
                "oldest_wait": round(oldest, 3),
                "locked_for": round(self._locked_for(), 3),
                **{
                    k: self.counters[k]
                    for k in (
                        "written",
                        "commits",
                        "busy",
                        "retries",
                        "errors",
                        "failed",
                        "overflow",
                        "lost",
                    )
                },
            }

    def close(self, timeout: float = STOP_FLUSH) -> bool:
        """Write what is queued (waiting up to `timeout` for a lock), then stop the thread
        and close the connection. True when everything queued reached the file."""
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 2.0)
        flushed = not self._thread.is_alive() and self._done == self._seq
        if not self._thread.is_alive():
            self.store.close()
        return flushed and self.counters["lost"] == 0

    # --- the writer thread ----------------------------------------------------------

    def _take(self) -> list[_Item[S]] | None:
        with self._cond:
            while not self._ops and not self._events:
                if self._closing:
                    return None
                self._cond.wait()
            batch: list[_Item[S]]
            if self._ops and (not self._runs or self._ops[0][0] < self._runs[0][0]):
                batch = [self._ops.popleft()[1]]
            else:
                # Events in a run have consecutive numbers: no other write between them.
                run = self._runs[0]
                n = min(run[1], EVENT_BATCH)
                batch = [self._events.popleft() for _ in range(n)]
                for _ in range(n):
                    self._event_times.popleft()
                run[0] += n
                run[1] -= n
                if not run[1]:
                    self._runs.popleft()
            self._inflight = len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._write(batch)
            with self._cond:
                self._inflight = 0
                # Everything before the oldest item still queued: written, or dropped.
                self._done = self._next_seq() - 1
                if self._overflowing and self._queued() < QUEUE_SOFT // 2:
                    self._overflowing = False
                self._cond.notify_all()
            if self._on_progress is not None:
                self._on_progress(self._done)

    def _apply(self, batch: list[_Item[S]]) -> None:
        if isinstance(batch[0], Event):
            self.store.record_events([e for e in batch if isinstance(e, Event)])
        else:
            op = batch[0]
            assert isinstance(op, _Op)
            op.fn(self.store)

    def _write(self, batch: list[_Item[S]]) -> None:
        """Write `batch`, retrying while the file is locked; never raises."""
        delay = BACKOFF_FIRST
        failing_since = 0.0
        while True:
            try:
                self._apply(batch)
            except (sqlite3.OperationalError, StoreUnavailable) as exc:
                # StoreUnavailable: a network store (etcd) that cannot take it now.
                now = time.monotonic()
                if isinstance(exc, sqlite3.Error) and is_busy(exc):
                    self.counters["busy"] += 1
                    if not self._locked_since:
                        self._locked_since = now
                        self._reminded = now - BUSY_REMIND_EVERY + BUSY_WARN_AFTER
                    if now - self._reminded >= BUSY_REMIND_EVERY:
                        self._reminded = now
                        log.warning(
                            "state store %s is locked by another process (an open sqlite3 "
                            "shell?) for %.0f s: %d writes wait in memory, retrying",
                            self.store.path,
                            now - self._locked_since,
                            self._queued() + len(batch),
                        )
                else:
                    self.counters["errors"] += 1
                    failing_since = failing_since or now
                    if now - failing_since > ERROR_GIVE_UP:
                        self._give_up(batch, exc)
                        return
                    if self.counters["errors"] == 1 or delay >= BACKOFF_MAX:
                        log.warning("state store %s: %s; retrying", self.store.path, exc)
                if self._closing and now >= self._deadline:
                    self._abandon(batch)
                    return
                self.counters["retries"] += 1
                with self._cond:
                    pause = delay
                    if self._closing:
                        pause = min(pause, max(0.0, self._deadline - now))
                    self._cond.wait(pause)  # a stop wakes it to keep its deadline
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            except Exception as exc:  # a write that can never succeed: it alone is lost
                if len(batch) > 1:
                    for item in batch:
                        self._write([item])
                    return
                self._give_up(batch, exc)
                return
            break
        self.counters["written"] += len(batch)
        self.counters["commits"] += 1
        if self._failed_burst:
            log.warning(
                "state store %s: writes succeed again; %d were not stored",
                self.store.path,
                self._failed_burst,
            )
            self._failed_burst = 0
        if self._locked_since:
            locked = time.monotonic() - self._locked_since
            if locked >= BUSY_WARN_AFTER:  # said when it was said that it is locked
                log.info(
                    "state store %s is writable again after %.1f s; %d writes still wait",
                    self.store.path,
                    locked,
                    self._queued(),
                )
            self._locked_since = 0.0

    def _give_up(self, batch: list[_Item[S]], exc: BaseException) -> None:
        self.counters["failed"] += len(batch)  # stats()["failed"]: status and /metrics
        # Logged once per burst (a failing disk must not flood the journal); the write
        # that ends the burst says how many went.
        now = time.monotonic()
        first = not self._failed_burst
        self._failed_burst += len(batch)
        if not first and now - self._failed_logged < FAIL_REMIND_EVERY:
            return
        self._failed_logged = now
        what = batch[0].name if isinstance(batch[0], _Op) else f"{len(batch)} events"
        log.error(
            "state store %s: %s not stored: %s (%d not stored in this burst; counted, "
            "logged again at most every %.0f s)",
            self.store.path,
            what,
            exc,
            self._failed_burst,
            FAIL_REMIND_EVERY,
        )

    def _abandon(self, batch: list[_Item[S]]) -> None:
        """The stop's deadline passed with the file still locked: count what is left."""
        with self._cond:
            left = len(batch) + self._queued()
            self._ops.clear()
            self._events.clear()
            self._event_times.clear()
            self._runs.clear()
        self.counters["lost"] += left
        log.error(
            "state store %s: still locked at the stop: %d writes not stored",
            self.store.path,
            left,
        )


class LeaseConnection:
    """The DHCP service's own connection (a DhcpStore), used only in its executor: a
    commit waits for the lock at most its busy timeout, then says StoreBusy; another
    operational error (disk full, I/O) is StoreUnavailable. sqlite3 stays in here."""

    def __init__(self, store: Backend) -> None:
        self.store = store

    def save_leases(self, leases: Sequence[Lease]) -> None:
        with _unavailable():
            self.store.save_leases(leases)

    def leases(self, now: float | None = None) -> list[Lease]:
        with _unavailable():
            return self.store.leases(now)

    def note_unknowns(
        self, machines: Sequence[UnknownMachine], keep: int = UNKNOWN_MACHINES_KEEP, lost: int = 0
    ) -> int:
        with _unavailable():
            return self.store.note_unknowns(machines, keep, lost)

    def unknown_machines(self, limit: int = -1, offset: int = 0) -> list[dict[str, object]]:
        with _unavailable():
            return self.store.unknown_machines(limit, offset)

    def close(self) -> None:
        self.store.close()


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            raise StoreBusy(str(exc)) from exc  # sqlite3's words: the log lines stay
        raise StoreUnavailable(str(exc)) from exc


class DaemonStore:
    """The store as the running daemon's services see it (ServiceContext.store)."""

    def __init__(
        self, writer: Backend, db: Backend, reader: Backend, client: EtcdClient | None = None
    ) -> None:
        self.path = db.path
        self._client = client  # etcd mode: the stores' shared client, closed with them
        self._db = db  # the loop thread's reads: start-up and tests (short busy timeout)
        self._reader = reader  # used in the reader thread only
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        # What is kept in memory (and written through).
        self._install = db.install_state()
        self._cluster = db.cluster_states()
        self._progress = db.progress()
        self.writer = StoreWriter(writer, self._progressed)

    @classmethod
    def open(cls, state_dir: Path) -> DaemonStore:
        """Open three connections: the writer's (migrates), the loop's and the reader's."""
        writer = Store.open(
            state_dir, durable=False, busy_timeout_ms=START_BUSY_MS, check_same_thread=False
        )
        opened = [writer]
        try:
            writer.set_busy_timeout(WRITE_BUSY_MS)
            db = Store.open(state_dir, durable=False, busy_timeout_ms=READ_BUSY_MS)
            opened.append(db)
            reader = Store.open(
                state_dir, durable=False, busy_timeout_ms=READ_BUSY_MS, check_same_thread=False
            )
            opened.append(reader)
            return cls(writer, db, reader)
        except sqlite3.Error as exc:
            for store in opened:
                store.close()
            raise StoreError(f"cannot open state store {writer.path}: {exc}") from exc
        except BaseException:
            for store in opened:
                store.close()
            raise

    @classmethod
    def open_etcd(cls, client: EtcdClient, prefix: str) -> DaemonStore:
        """The HA pair's store: the same queue, memory and reader over etcd (three stores
        on `client`, one HTTP connection per thread; closed with this store). Reads the
        state first: etcd unreachable is StoreUnavailable (the caller keeps the client)."""
        from appliance.etcdstore import EtcdStore  # the SQLite default never loads it

        return cls(
            EtcdStore(client, prefix), EtcdStore(client, prefix), EtcdStore(client, prefix), client
        )

    # --- the writer's progress, on the loop -------------------------------------------

    def _bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    def _progressed(self, done: int) -> None:
        loop = self._loop
        if loop is None or not self._waiters:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(self._wake, done)

    def _wake(self, done: int) -> None:
        keep = []
        for target, fut in self._waiters:
            if target <= done:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def synced(self, timeout: float = READ_SYNC_WAIT) -> bool:
        """Wait (at most `timeout`) for every write queued so far; True when they landed."""
        self._bind_loop()
        target = self.writer.seq
        if self.writer.done >= target:
            return True
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((target, fut))
        if self.writer.done >= target:  # it landed between the check and the append
            fut.set_result(None)
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters = [(t, f) for t, f in self._waiters if f is not fut]

    # --- reads ----------------------------------------------------------------------

    async def read(self, fn: Callable[[Backend], T], *, sync_wait: float = READ_SYNC_WAIT) -> T:
        """Run `fn` on the reader's connection in its thread; StoreBusy when locked (or,
        in etcd mode, when etcd does not answer)."""
        await self.synced(sync_wait)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, self._reader)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise StoreBusy(f"state store {self.path} is locked: {exc}") from None
            raise
        except StoreUnavailable as exc:
            if isinstance(exc, StoreBusy):
                raise
            raise StoreBusy(str(exc)) from exc

    async def refresh(self, sync_wait: float = READ_SYNC_WAIT) -> dict[str, list[str]]:
        """Read install marks, cluster state and progress again (in the reader thread):
        in etcd mode, what another member wrote. Returns what changed: the nodes
        ("install", "progress") and keys ("cluster"). Memory is replaced only when no
        write of ours was queued during the read (else it would be undone in memory):
        tried a few times, then left for the next call (an empty answer)."""
        loop = asyncio.get_running_loop()
        for _ in range(REFRESH_TRIES):
            await self.synced(sync_wait)
            seq = self.writer.seq
            snap = await loop.run_in_executor(self._pool, _snapshot, self._reader)
            if self.writer.seq != seq or self.writer.done < seq:
                continue  # we wrote meanwhile: read again once it landed
            install, cluster, progress = snap
            changed = {
                "install": _changed(self._install, install),
                "cluster": _changed(self._cluster, cluster),
                "progress": _changed(self._progress, progress),
            }
            self._install, self._cluster, self._progress = install, cluster, progress
            return changed
        return {"install": [], "cluster": [], "progress": []}

    def install_state(self) -> dict[str, dict[str, float | None]]:
        return {node: dict(state) for node, state in sorted(self._install.items())}

    def cluster_state(self, key: str) -> Any:
        raw = self._cluster.get(key)
        return None if raw is None else json.loads(raw)

    def progress(self) -> dict[str, dict[str, tuple[float, float, str]]]:
        return {
            node: dict(sorted(stages.items(), key=lambda kv: _stage_order(kv[0])))
            for node, stages in sorted(self._progress.items())
        }

    # From the file, on the loop's connection (start-up and tests: the admin API and the
    # metrics use `read`).

    def events(
        self, *, node: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[Event]:
        return self._db.events(node=node, after_id=after_id, limit=limit)

    def last_event_id(self) -> int:
        return self._db.last_event_id()

    def csr_decisions(self, limit: int = 500) -> list[dict[str, object]]:
        return self._db.csr_decisions(limit)

    def leases(self, now: float | None = None) -> list[Lease]:
        return self._db.leases(now)

    def open_leases(self, state_dir: Path, busy_timeout_ms: int) -> DhcpStore:
        """The DHCP service's own connection: its lease commits must be durable before
        an ACK, so they do not queue behind the events; it waits at most its own busy
        timeout for a lock (StoreBusy, and the service retries). In etcd mode: a store
        on the shared client (its executor thread gets a connection of its own)."""
        if self._client is not None:
            from appliance.etcdstore import EtcdStore

            assert isinstance(self._db, EtcdStore)
            return LeaseConnection(EtcdStore(self._client, self._db.prefix))
        return LeaseConnection(Store.open(state_dir, busy_timeout_ms=busy_timeout_ms))

    # --- writes (queued; they never block and never raise) ----------------------------

    def _submit(self, name: str, fn: Callable[[Backend], object]) -> None:
        self.writer.submit(_Op(name, fn))

    def record_events(self, evs: Sequence[Event]) -> None:
        for ev in evs:
            if ev.ok:
                stages = self._progress.setdefault(ev.node, {})
                old = stages.get(ev.stage)
                if old is None:
                    stages[ev.stage] = (ev.time, ev.time, ev.detail)
                else:  # as the store does: the latest event decides the detail
                    first, last, detail = old
                    stages[ev.stage] = (
                        min(first, ev.time),
                        max(last, ev.time),
                        ev.detail if ev.time >= last else detail,
                    )
            self.writer.submit(ev)

    def record_event(self, ev: Event) -> None:
        self.record_events([ev])

    def mark_installed(self, node: str, time: float) -> None:
        self._install.setdefault(node, {"installed_at": None, "reinstall_requested": None})
        self._install[node]["installed_at"] = time
        self._submit(f"install mark of {node}", lambda s: s.mark_installed(node, time))

    def request_reinstall(self, node: str, time: float) -> None:
        self._install[node] = {"installed_at": None, "reinstall_requested": time}
        self._submit(f"reinstall of {node}", lambda s: s.request_reinstall(node, time))

    def set_cluster_state(self, key: str, value: object, time: float) -> None:
        self._cluster[key] = json.dumps(value, sort_keys=True)  # fails here, not in the thread
        self._submit(f"cluster state {key!r}", lambda s: s.set_cluster_state(key, value, time))

    def record_csr_decision(
        self, *, time: float, csr: str, kind: str, decision: str, reason: str,
        uid: str = "", node: str = "", requestor: str = "",
    ) -> None:  # fmt: skip
        def write(s: Backend) -> None:
            s.record_csr_decision(
                time=time, csr=csr, kind=kind, decision=decision, reason=reason,
                uid=uid, node=node, requestor=requestor,
            )  # fmt: skip

        self._submit(f"CSR decision on {csr}", write)

    async def persist(self, bus: EventBus) -> None:
        """Queue the bus's events until cancelled (then what the bus still holds).

        Subscribes when the task first runs: start it before the services publish.
        """
        self._bind_loop()
        with bus.subscribe(PERSIST_QUEUE) as sub:
            try:
                while True:
                    first = await sub.get()
                    self.record_events([first, *sub.drain()])
            except asyncio.CancelledError:
                self.record_events(sub.drain())
                raise

    # --- status and stop --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self.writer.stats()

    async def aclose(self, timeout: float = STOP_FLUSH) -> bool:
        """Flush the queue (waiting up to `timeout` for a lock) and close; True if flushed."""
        flushed = await asyncio.to_thread(self.writer.close, timeout)
        self._pool.shutdown(wait=True)
        self._reader.close()
        self._db.close()
        if self._client is not None:
            self._client.close()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
        return flushed

    def close(self) -> None:
        """Synchronous close (tests outside a loop): flush with the default wait."""
        self.writer.close()
        self._pool.shutdown(wait=True)
        self._reader.close()
        self._db.close()
        if self._client is not None:
            self._client.close()


if TYPE_CHECKING:  # mypy checks the implementations against the Protocols
    from appliance.stores import (
        ClusterStateStore,
        CsrDecisionStore,
        EventStore,
        InstallStore,
        ServiceStore,
        StoreReader,
    )

    def _sqlite(s: Store) -> tuple[
        DhcpStore, EventStore, CsrDecisionStore, ClusterStateStore, InstallStore, StoreReader
    ]:  # fmt: skip
        return s, s, s, s, s, s

    def _daemon(s: DaemonStore, lc: LeaseConnection) -> tuple[ServiceStore, DhcpStore]:
        return s, lc

    def _etcd(s: EtcdStore) -> tuple[
        DhcpStore, EventStore, CsrDecisionStore, ClusterStateStore, InstallStore, StoreReader,
        WriterStore,
    ]:  # fmt: skip
        return s, s, s, s, s, s, s


_Progress = dict[str, dict[str, tuple[float, float, str]]]


def _snapshot(
    store: Backend,
) -> tuple[dict[str, dict[str, float | None]], dict[str, str], _Progress]:
    return store.install_state(), store.cluster_states(), store.progress()


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
