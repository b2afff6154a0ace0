"""Safety valves of the CSR approver (sans-IO, `now` passed in).

- The circuit breaker: while the recent pending CSRs outnumber the inventory's nodes
  by more than MARGIN, nothing is approved. A flood of CSRs means something is wrong
  (a leaked bootstrap credential, a kubelet in a loop); approving into it would only
  hand out more certificates. It closes again by itself once the flood is gone.
- The rate limit: a token bucket, so even valid-looking CSRs are approved at most
  `per_minute` a minute after a burst of `burst`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

MARGIN = 100  # pending CSRs allowed beyond one per inventory node
RECENT = 3600.0  # seconds: a pending CSR older than this no longer counts


def parse_time(text: str) -> float | None:
    """An RFC 3339 timestamp (metadata.creationTimestamp) as epoch seconds, or None."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def breaker_open(
    pending_since: Iterable[float], nodes: int, now: float, window: float = RECENT
) -> bool:
    """True (no approvals) while recent pending CSRs exceed nodes + MARGIN."""
    recent = sum(1 for t in pending_since if now - t <= window)
    return recent > nodes + MARGIN


@dataclass
class RateLimit:
    """A token bucket: `burst` approvals at once, refilled at `per_minute`."""

    per_minute: float
    burst: int
    tokens: float = field(default=-1.0)
    last: float | None = None

    def __post_init__(self) -> None:
        if self.per_minute <= 0 or self.burst < 1:
            raise ValueError("per_minute must be positive and burst at least 1")
        if self.tokens < 0:
            self.tokens = float(self.burst)

    def _refill(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_minute / 60)
        self.last = now if self.last is None else max(self.last, now)

    def allow(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until the next token (0 when one is there)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) * 60 / self.per_minute

    def reconfigure(self, per_minute: float, burst: int) -> None:
        """A new plan's limits; the tokens already earned stay (capped at the new burst)."""
        if per_minute <= 0 or burst < 1:
            raise ValueError("per_minute must be positive and burst at least 1")
        self.per_minute, self.burst = per_minute, burst
        self.tokens = min(self.tokens, float(burst))
