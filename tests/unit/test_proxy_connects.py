"""The proxy's connects in progress without sockets or clocks (services/proxy/connects.py).

Time is `now` arithmetic: deadlines come due in start order per frontend, a retry goes to
the back, a reload that shortens connect_timeout still fires the new connect when due
(and the older ones at theirs), a finished connect never fires. A failure blames the
backend (passive mark-down) and retries on one not yet tried; an error of this host
blames nobody and gives up; a backend disabled meanwhile is no one's fault; when no
backend is left the connect gives up.
"""

from __future__ import annotations

import ast
import errno
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path

from appliance.plan import Backend, Frontend, HealthCheck
from services.proxy import connects
from services.proxy.connects import Attempt, Connects, Outcome
from services.proxy.pool import Pool

MASTERS = tuple(
    Backend(f"master-{i}", IPv4Address(f"10.33.3.{50 + i}"), 6443, "master") for i in range(3)
)
CHECK = HealthCheck("tcp", None, interval=2.0, rise=2, fall=3)


class Client(Attempt):
    """What the shell's connection is to the core, with a name to tell them apart."""

    __slots__ = ("name",)

    def __init__(self, name: str, peer: str = "10.33.3.200") -> None:
        super().__init__(peer)
        self.name = name


def core(timeout: float = 10.0, n: int = 3) -> Connects[Client]:
    frontend = Frontend("api", None, 6443, MASTERS[:n], check=CHECK, connect_timeout=timeout)
    return Connects(Pool(frontend), timeout, Counter())


def begin(c: Connects[Client], name: str, now: float) -> Client:
    """A client arrives at `now`: its first backend is chosen and the connect starts."""
    attempt = Client(name)
    backend = c.choose(attempt)
    assert backend is not None
    c.started(attempt, backend, now)
    return attempt


def owners(outcomes: list[Outcome[Client]]) -> list[str]:
    return [o.attempt.name for o in outcomes]


def fire(c: Connects[Client], now: float) -> list[Outcome[Client]]:
    """The timer at `now`, and the shell's part: each retry's connect starts then."""
    outcomes = c.handle_timer(now)
    for out in outcomes:
        if out.retry is not None:
            c.started(out.attempt, out.retry, now)
    return outcomes


def test_no_timer_while_nothing_connects() -> None:
    c = core()
    assert c.get_timer() is None and c.handle_timer(100.0) == []


def test_deadlines_fire_in_start_order_and_not_before() -> None:
    c = core(timeout=10.0)
    a, b = begin(c, "a", 1.0), begin(c, "b", 2.0)
    assert c.get_timer() == 11.0
    assert c.handle_timer(10.999) == [] and c.get_timer() == 11.0
    fired = fire(c, 11.0)
    assert owners(fired) == ["a"] and c.get_timer() is not None
    # a was retried on another backend: its new deadline is behind b's.
    assert fired[0].retry is not None and a.trying is fired[0].retry
    assert c.get_timer() == 12.0
    assert owners(fire(c, 12.0)) == ["b"] and b.trying is not None
    assert c.get_timer() == 21.0  # a's retry, started at 11


def test_a_finished_connect_never_fires() -> None:
    c = core()
    a, b = begin(c, "a", 0.0), begin(c, "b", 0.0)
    chosen = a.trying
    assert c.established(a) is chosen and a.trying is None
    c.forget(b)  # the client went away while connecting
    assert c.get_timer() is None and c.handle_timer(1e9) == []


def test_timeout_blames_the_backend_and_retries_on_another() -> None:
    c = core(timeout=5.0)
    a = begin(c, "a", 0.0)
    first = a.trying
    [out] = fire(c, 5.0)
    assert out.failed is first and out.blame and out.why == "timed out"
    assert first is not None and first.health == "down" and out.down
    assert out.retry is not None and out.retry is not first and not out.local
    assert c.counters["retries"] == 1 and c.counters["no_backend"] == 0
    assert a.tried == {id(first)}


def test_a_blame_counts_for_the_next_choice_in_the_same_round() -> None:
    """Two connects time out together: the first one's backend is out of the pool before
    the second one's retry is chosen (as if they had timed out one after the other)."""
    c = core(timeout=5.0)
    c.wall_offset = 1000.0  # the history shows wall time; the decisions do not use it
    x, y, z = c.pool.backends
    a, b = Client("a"), Client("b", "10.33.3.201")
    c.started(a, x, 0.0)
    c.started(b, y, 0.0)
    first, second = c.handle_timer(5.0)
    assert first.down and second.down and x.health == y.health == "down"
    assert second.retry is z and first.retry in (y, z)
    assert x.history[-1] == (1005.0, False, "connect: timed out") and x.failures == 1
    assert c.handle_timer(10.0) == []  # the retries are the shell's to start


def test_every_backend_timing_out_gives_up() -> None:
    c = core(timeout=5.0, n=2)
    a = begin(c, "a", 0.0)
    [one] = fire(c, 5.0)
    assert one.retry is not None
    [two] = fire(c, 10.0)
    assert two.blame and two.retry is None and two.gave_up == "no_backend"
    assert c.counters == Counter({"retries": 2, "no_backend": 1})
    assert a.trying is None and c.get_timer() is None


def test_a_local_error_blames_nobody_and_gives_up() -> None:
    c = core()
    a = begin(c, "a", 0.0)
    backend = a.trying
    assert backend is not None
    out = c.failed(a, backend, "Too many open files", errno.EMFILE, 1.0)
    assert out.local and not out.blame and out.retry is None and out.gave_up == "local_errors"
    assert backend.health == "unknown" and backend.failures == 0
    assert c.counters == Counter({"local_errors": 1})
    assert c.get_timer() is None


def test_a_refused_connect_blames_and_retries_at_the_back() -> None:
    c = core(timeout=10.0)
    a, b = begin(c, "a", 0.0), begin(c, "b", 1.0)
    backend = a.trying
    assert backend is not None
    out = c.failed(a, backend, "Connection refused", errno.ECONNREFUSED, 2.0)
    assert out.blame and out.failed is backend and out.retry is not None
    c.started(a, out.retry, 2.0)
    assert c.get_timer() == 11.0  # b first, then a's retry
    assert owners(c.handle_timer(12.0)) == ["b", "a"]
    assert b.tried is not None and a.tried is not None and len(a.tried) == 2


def test_disabled_meanwhile_is_no_ones_fault_but_not_tried_again() -> None:
    c = core()
    a = begin(c, "a", 0.0)
    backend = a.trying
    assert backend is not None
    out = c.failed(a, backend, "disabled", 0, 1.0, blame=False)
    assert not out.blame and out.retry is not None and out.retry is not backend
    assert backend.health == "unknown" and backend.failures == 0 and not out.down
    assert c.counters["retries"] == 0


def test_an_immediate_failure_before_started() -> None:
    """connect() itself failed: the backend was chosen but never started."""
    c = core()
    a = Client("a")
    backend = c.choose(a)
    assert backend is not None
    out = c.failed(a, backend, "Connection refused", errno.ECONNREFUSED, 0.0)
    assert out.blame and out.retry is not None and c.get_timer() is None


def test_no_backend_at_all() -> None:
    c = core()
    for b in c.pool.backends:
        b.admin = "disabled"
    assert c.choose(Client("a")) is None
    assert c.counters == Counter({"no_backend": 1})


def test_connect_timeouts_fire_when_due_even_after_a_reload_shortens_them() -> None:
    """Deadlines need not come in start order: after a reload lowers connect_timeout a new
    connect is due before older ones. It fires when due (here 0.2 s, not the old connects'
    30 s); a connect that finished never fires; nothing fires twice; once the older
    connects are gone, the timer waits for the first one again."""
    c = core(timeout=30.0)
    slow = begin(c, "slow", 100.0)
    c.timeout = 0.2  # the reload
    fast, done = begin(c, "fast", 100.0), begin(c, "done", 100.0)
    c.established(done)
    assert c.get_timer() == 100.2
    assert c.handle_timer(100.19) == []
    fired = c.handle_timer(100.2)
    assert owners(fired) == ["fast"]
    c.forget(fast)  # (its retry is not the point here)
    assert c.get_timer() == 130.0 and c.handle_timer(129.0) == []
    # In order again once the old connects are gone: the timer waits for the first.
    c.forget(slow)
    fresh = [begin(c, f"n{i}", 200.0 + i) for i in range(3)]
    assert not c.unordered and c.get_timer() == 200.2
    fired = c.handle_timer(202.2)
    assert owners(fired) == ["n0", "n1", "n2"]
    for attempt in fresh:
        c.forget(attempt)
    assert c.get_timer() is None


def test_unordered_ends_when_the_older_connects_are_due() -> None:
    c = core(timeout=30.0)
    begin(c, "old", 0.0)
    c.timeout = 1.0
    begin(c, "new", 0.0)
    assert c.unordered
    assert owners(c.handle_timer(1.0)) == ["new"]
    assert owners(c.handle_timer(30.0)) == ["old"]
    assert not c.unordered


def test_the_core_imports_no_io() -> None:
    """Its own imports (the package's: the layers' import-linter contracts)."""
    tree = ast.parse(Path(connects.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names == {"__future__", "errno", "collections", "typing", "services.proxy.pool"}
