"""Connects in progress of one frontend (sans-IO): deadlines, retry and blame.

The asyncio shell (relay.py, server.py) makes the sockets and reports what happened;
this core decides. Time is an argument (`now`, the shell's one monotonic clock):
`get_timer()` is the next deadline, `handle_timer(now)` times out the connects due and
says for each what to do next. A failed connect blames its backend, which leaves the
pool at once (a passive check; before the next client's choice, even within one timer
round), unless the error is this host's own (out of descriptors or ports: nobody's
fault, the client is given up) or the backend was disabled meanwhile; it is then
retried on a backend this client has not tried yet, or given up.

One frontend has one connect_timeout, so deadlines come in start order (a retry goes
to the back) and the first is due first. A reload that shortens the timeout breaks
that order until the connects started before it are all due: `unordered` says so.
"""

from __future__ import annotations

import errno
from collections import Counter
from typing import Generic, TypeVar

from services.proxy.pool import BackendState, Pool

# Errors of this host, not of the backend: no passive mark-down for these.
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)


class Attempt:
    """One client's way to a backend: what it tries, what failed it. The shell's
    connection is one (a subclass): no second object per connection."""

    __slots__ = ("peer", "tried", "trying")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.trying: BackendState | None = None  # while a connect is in progress
        self.tried: set[int] | None = None  # ids of backends that failed it (made on demand)


A = TypeVar("A", bound=Attempt)


class Outcome(Generic[A]):
    """What to do after a failed connect: connect to `retry`, or give the client up."""

    __slots__ = ("attempt", "blame", "down", "err", "failed", "local", "retry", "why")

    def __init__(
        self,
        attempt: A,
        failed: BackendState,
        why: str,
        err: int,
        blame: bool,
        local: bool,
        retry: BackendState | None,
        down: bool = False,
    ) -> None:
        self.attempt = attempt
        self.failed = failed  # the backend whose connect failed
        self.why, self.err = why, err
        self.blame = blame  # counted against `failed` (its history has the failure)
        self.down = down  # ... and that took it out of the pool just now: worth a log line
        self.local = local  # this host's error: the shell closes the client and warns
        self.retry = retry  # the next backend, or None: give up

    @property
    def gave_up(self) -> str | None:
        """The counter the give-up went to, or None for a retry."""
        if self.retry is not None:
            return None
        return "local_errors" if self.local else "no_backend"

    def __repr__(self) -> str:
        return f"Outcome({self.attempt.peer}, {self.why!r}, retry={self.retry is not None})"


class Connects(Generic[A]):
    def __init__(self, pool: Pool, timeout: float, counters: Counter[str]) -> None:
        self.pool = pool
        self.timeout = timeout  # connect_timeout; a reload sets it
        self.counters = counters  # the frontend's (shown in its status)
        # Added to `now` for the times people read (a backend's history shows wall time);
        # the shell keeps it current. Decisions use `now` alone.
        self.wall_offset = 0.0
        self.live: dict[A, float] = {}  # connects in progress -> deadline
        self.last_deadline = 0.0  # the latest deadline given so far
        self.unordered = False
        self.unordered_until = 0.0  # by then every connect started before the reload is due

    def __len__(self) -> int:
        return len(self.live)

    def choose(self, attempt: A) -> BackendState | None:
        """The backend to connect to next; None (counted) when none is left."""
        backend = self.pool.choose(attempt.peer, attempt.tried)
        if backend is None:
            self.counters["no_backend"] += 1
        return backend

    def started(self, attempt: A, backend: BackendState, now: float) -> float:
        """A connect to `backend` is in progress from `now`; returns its deadline."""
        deadline = now + self.timeout
        live = self.live
        if not live:  # nothing older to be out of order with
            self.unordered, self.last_deadline = False, 0.0
        elif deadline < self.last_deadline:
            self.unordered = True
            self.unordered_until = self.last_deadline
        if deadline > self.last_deadline:
            self.last_deadline = deadline
        live.pop(attempt, None)  # a retry goes to the back
        live[attempt] = deadline
        attempt.trying = backend
        return deadline

    def established(self, attempt: A) -> BackendState:
        """The connect succeeded: the backend it reached."""
        backend = attempt.trying
        assert backend is not None
        attempt.trying = None
        self.live.pop(attempt, None)
        return backend

    def forget(self, attempt: A) -> None:
        """The client went away (or was closed) while connecting."""
        attempt.trying = None
        self.live.pop(attempt, None)

    def failed(
        self,
        attempt: A,
        backend: BackendState,
        why: str,
        err: int,
        now: float,
        blame: bool = True,
    ) -> Outcome[A]:
        """The connect to `backend` failed (`err` 0 when not an errno): what next."""
        attempt.trying = None
        self.live.pop(attempt, None)
        if err in LOCAL_ERRNOS:
            self.counters["local_errors"] += 1
            return Outcome(attempt, backend, why, err, False, True, None)
        down = False
        if blame:
            self.counters["retries"] += 1
            down = backend.connect_failed(now + self.wall_offset, why) == "down"
        if attempt.tried is None:  # made only when a connect fails: most never do
            attempt.tried = set()
        attempt.tried.add(id(backend))
        return Outcome(attempt, backend, why, err, blame, False, self.choose(attempt), down)

    def get_timer(self) -> float | None:
        live = self.live
        if not live:
            return None
        if self.unordered:
            return min(live.values())
        return next(iter(live.values()))

    def handle_timer(self, now: float) -> list[Outcome[A]]:
        """Time out the connects due by `now`, in start order (retries at the back)."""
        live = self.live
        if self.unordered and now >= self.unordered_until:
            self.unordered = False  # the older connects are all due by now: in order again
        if self.unordered:
            due = [a for a, deadline in live.items() if deadline <= now]
        else:
            due = []
            for attempt, deadline in live.items():
                if deadline > now:
                    break
                due.append(attempt)
        outcomes = []
        for attempt in due:
            backend = attempt.trying
            assert backend is not None
            outcomes.append(self.failed(attempt, backend, "timed out", 0, now))
        return outcomes
