"""Each worker of the cluster loop fails and backs off alone (sans-IO, `now` passed in).

The CSR approver, the Node watcher, the bootstrap watcher and the GPU bring-up share a
connection but nothing else: an exception in one (a 403 on a resource the identity may
not read, a bug, a resource whose API is down) must not cancel the others. A
WorkerState is one worker's record: what went wrong, how often in a row, when it runs
again. Delays double up to a cap, with jitter (so workers refused together do not
retry in lock-step); an attempt that ran `stable` seconds before failing counts as a
fresh start. `view(now)` is what /api/v1/cluster shows: ok / backing off / forbidden,
with the exact rule a 403 needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.cluster.access import Attributes
from services.cluster.kube import Forbidden, KubeError, Unreachable

OK = "ok"
BACKING_OFF = "backing off"
FORBIDDEN = "forbidden"
OFF = "off"


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt, sorted: what to show, and whether the API itself was away."""

    state: str  # BACKING_OFF or FORBIDDEN
    detail: str
    unreachable: bool = False
    missing: Attributes | None = None
    bug: bool = False  # not an API answer: the traceback goes to the log


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, Forbidden):
        needs = exc.needs
        what = f"needs {needs.describe()}" if needs else "403"
        return Failure(FORBIDDEN, f"{what}: {exc.message or exc.reason}", missing=needs)
    if isinstance(exc, Unreachable):
        return Failure(BACKING_OFF, f"API unreachable: {exc}", unreachable=True)
    if isinstance(exc, KubeError):
        return Failure(BACKING_OFF, f"API error: {exc}")
    return Failure(BACKING_OFF, f"internal error: {type(exc).__name__}: {exc}", bug=True)


class WorkerState:
    def __init__(self, name: str, first: float, cap: float, stable: float, now: float) -> None:
        self.name = name
        self.first, self.cap, self.stable = first, cap, stable
        self.failures = 0  # in a row
        self.last: Failure | None = None
        self.since = now  # of the current state
        self.started: float | None = None  # the running attempt's start; None: waiting
        self.retry_at: float | None = None
        self.off = False

    def start(self, now: float) -> None:
        self.started, self.retry_at = now, None

    def fail(self, failure: Failure, now: float, jitter: float) -> float:
        """Record a failed attempt; returns the delay before the next one.

        `jitter` in [0, 1): the delay is between half and all of the doubled step.
        """
        if self.started is not None and now - self.started >= self.stable:
            self.failures, self.last = 0, None  # it ran well for a while: a new problem
        if self.last is None or (self.last.state, self.last.detail) != (
            failure.state,
            failure.detail,
        ):
            self.since = now
        step = min(self.cap, self.first * float(1 << min(self.failures, 30)))
        delay = step * (0.5 + 0.5 * min(max(jitter, 0.0), 1.0))
        self.failures += 1
        self.last = failure
        self.started, self.retry_at = None, now + delay
        return delay

    def healthy(self, now: float) -> bool:
        """Running, and either never failed or running well for `stable` seconds."""
        if self.started is None:
            return False
        return self.last is None or now - self.started >= self.stable

    def view(self, now: float) -> dict[str, Any]:
        if self.off:
            return {"state": OFF, "detail": "", "failures": 0}
        if self.last is None:
            return {"state": OK, "detail": "", "failures": 0, "since": self.since}
        if self.healthy(now) and self.started is not None:
            return {"state": OK, "detail": "", "failures": 0, "since": self.started}
        out: dict[str, Any] = {
            "state": self.last.state,
            "detail": self.last.detail,
            "failures": self.failures,
            "since": self.since,
            "retry_in": None if self.retry_at is None else round(max(0.0, self.retry_at - now), 3),
        }
        if self.last.missing is not None:
            out["missing"] = self.last.missing.to_json()
        return out
