"""The daemon's descriptor budget: what RLIMIT_NOFILE allows, and what is kept back.

Every service lives in one process and so shares one open-files limit. A service whose
descriptors grow with its clients (the load balancer: two sockets per proxied
connection, two more per splice pipe) could otherwise take them all, and then the
other services' accept(), open() and socket() fail with EMFILE: the admin endpoint,
DNS over TCP, TFTP transfers, the HTTP service, the health checks, the store.

So the limit is split once at start: a reserve that such a service never spends (the
rest of the daemon: its baseline descriptors, other services' connections and files,
health checks), and the rest, which it may spend. Pure arithmetic; `nofile_limit` is
the one read of the process's state.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass

RESERVE_MIN = 1024  # kept back at least: the baseline, DNS/TCP, TFTP, HTTP, admin, store
RESERVE_PERCENT = 10  # of the limit, when that is more
UNLIMITED = 1 << 20  # what RLIM_INFINITY counts as (the kernel's default nr_open)


@dataclass(frozen=True, slots=True)
class FdBudget:
    limit: int  # the soft RLIMIT_NOFILE
    reserve: int  # kept back for everything but the spender

    @property
    def spendable(self) -> int:
        return self.limit - self.reserve


def budget(limit: int) -> FdBudget:
    """Split `limit`: the reserve is RESERVE_MIN or RESERVE_PERCENT of it, whichever is
    more, but never more than half (a tiny limit still leaves the spender something)."""
    limit = max(0, limit)
    reserve = min(max(RESERVE_MIN, limit * RESERVE_PERCENT // 100), limit // 2)
    return FdBudget(limit, reserve)


def raise_advice(env: Mapping[str, str]) -> str:
    """How to raise the limit where the daemon runs: systemd sets INVOCATION_ID (and
    NOTIFY_SOCKET for Type=notify) in a unit's environment; otherwise a shell started it."""
    if env.get("INVOCATION_ID") or env.get("NOTIFY_SOCKET"):
        return "raise LimitNOFILE= in the unit (systemctl edit appliance)"
    return "raise it with `ulimit -n` in the shell that starts the daemon"


def nofile_limit() -> int:
    """The process's soft open-files limit now (unlimited counts as UNLIMITED)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED if soft == resource.RLIM_INFINITY else int(soft)


__all__ = ["RESERVE_MIN", "FdBudget", "budget", "nofile_limit", "raise_advice"]
