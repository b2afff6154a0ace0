"""The load balancer's pool without sockets: health with rise/fall, admin state, choice.

services/proxy/pool.py is sans-IO: check results and connect failures come in as
values with a `now`, choices come out. Checked: the first check decides at once,
later changes need `rise` / `fall` results in a row (a result that agrees with the
current health resets the streak); a failed connect takes a backend out at once
(passive check) and the active checks bring it back after `rise` successes;
round-robin spreads evenly; leastconn follows active connections; source-hash is
stable per client and moves a client off a backend that went down; drain and
disabled backends get no new connections; unknown health counts as eligible; a
new plan keeps the state of a backend it still has and drains removed ones until
their connections end. (Connect deadlines, retries and blame: test_proxy_connects.py.)
"""

from __future__ import annotations

import itertools
from collections import Counter
from ipaddress import IPv4Address
from typing import Literal

import pytest

from appliance.plan import Backend, Frontend, HealthCheck
from services.proxy.pool import BackendState, Pool

PORT = 6443
Balance = Literal["roundrobin", "leastconn", "source"]


def backend(name: str, last_octet: int, role: str = "master") -> Backend:
    return Backend(name, IPv4Address(f"10.33.3.{last_octet}"), PORT, role)


MASTERS = (backend("master-0", 50), backend("master-1", 51), backend("master-2", 52))


def frontend(
    backends: tuple[Backend, ...] = MASTERS,
    balance: Balance = "roundrobin",
    rise: int = 2,
    fall: int = 3,
) -> Frontend:
    check = HealthCheck("https", None, "/readyz", interval=2.0, rise=rise, fall=fall)
    return Frontend("api", None, PORT, backends, check=check, balance=balance)


def state(rise: int = 2, fall: int = 3) -> BackendState:
    return BackendState(MASTERS[0], rise, fall)


def names(pool: Pool, count: int, client: str = "10.33.3.200") -> Counter[str]:
    picks: Counter[str] = Counter()
    for _ in range(count):
        chosen = pool.choose(client)
        assert chosen is not None
        picks[chosen.spec.name] += 1
    return picks


def by_name(pool: Pool, name: str) -> BackendState:
    found = pool.find(name)
    assert found is not None
    return found


# --- health ----------------------------------------------------------------------------


@pytest.mark.parametrize(("ok", "health"), [(True, "up"), (False, "down")])
def test_first_check_decides_at_once(ok: bool, health: str) -> None:
    b = state(rise=5, fall=5)
    assert b.health == "unknown" and b.eligible  # traffic flows before the first check
    assert b.check_result(ok, now=10.0, detail="first") == health
    assert b.health == health and b.changed_at == 10.0
    assert b.history[-1] == (10.0, ok, "first")


def test_fall_needs_that_many_failures_in_a_row() -> None:
    b = state(rise=2, fall=3)
    b.check_result(True, 0.0)
    assert b.check_result(False, 1.0) is None
    assert b.check_result(False, 2.0) is None
    assert b.health == "up" and b.eligible
    assert b.check_result(False, 3.0) == "down"
    # As a tuple: mypy would keep `b.health` narrowed to "up" by the assert before.
    assert (b.health, b.eligible, b.changed_at) == ("down", False, 3.0)
    assert b.check_result(False, 4.0) is None  # already down: no change to report


def test_a_success_between_failures_resets_the_fall_streak() -> None:
    b = state(rise=2, fall=3)
    b.check_result(True, 0.0)
    for t, ok in enumerate([False, False, True, False, False], start=1):
        assert b.check_result(ok, float(t)) is None
    assert b.health == "up"
    assert b.check_result(False, 6.0) == "down"


def test_rise_needs_that_many_successes_in_a_row() -> None:
    b = state(rise=3, fall=1)
    b.check_result(False, 0.0)
    assert b.check_result(True, 1.0) is None
    assert b.check_result(False, 2.0) is None  # streak broken
    assert b.check_result(True, 3.0) is None
    assert b.check_result(True, 4.0) is None
    assert b.health == "down" and not b.eligible
    assert b.check_result(True, 5.0) == "up"
    assert (b.health, b.eligible) == ("up", True)  # a tuple, as in the test above


def test_fall_of_one_goes_down_on_the_first_failure() -> None:
    b = state(rise=1, fall=1)
    b.check_result(True, 0.0)
    assert b.check_result(False, 1.0) == "down"
    assert b.check_result(True, 2.0) == "up"


def test_check_history_is_bounded() -> None:
    b = state()
    for t in range(50):
        b.check_result(True, float(t), f"check {t}")
    assert len(b.history) == 10
    assert b.history[-1] == (49.0, True, "check 49")
    checks = b.status().to_json()["checks"]
    assert isinstance(checks, list)
    assert checks[0] == {"time": 40.0, "ok": True, "detail": "check 40"}


def test_failed_connect_marks_down_at_once_and_checks_bring_it_back() -> None:
    b = state(rise=2, fall=3)
    b.check_result(True, 0.0)
    assert b.connect_failed(1.0, "Connection refused") == "down"
    assert b.health == "down" and not b.eligible and b.failures == 1
    assert b.history[-1] == (1.0, False, "connect: Connection refused")
    assert b.connect_failed(1.5, "Connection refused") is None  # already out
    assert b.failures == 2
    assert b.check_result(True, 2.0) is None  # one success is not `rise`
    assert b.check_result(True, 3.0) == "up"


def test_failed_connect_before_any_check_marks_down() -> None:
    b = state()
    assert b.connect_failed(1.0, "timed out") == "down"
    assert not b.eligible


def test_unknown_health_is_eligible() -> None:
    pool = Pool(frontend())
    assert all(b.health == "unknown" for b in pool.backends)
    assert set(names(pool, 30)) == {"master-0", "master-1", "master-2"}


# --- choice ----------------------------------------------------------------------------


def test_round_robin_spreads_evenly() -> None:
    pool = Pool(frontend())
    for b in pool.backends:
        b.check_result(True, 0.0)
    picks = names(pool, 300)
    assert picks == {"master-0": 100, "master-1": 100, "master-2": 100}
    # Consecutive picks never repeat while all three are up.
    seq = [pool.choose("10.33.3.200") for _ in range(6)]
    assert all(a is not b for a, b in itertools.pairwise(seq))


def test_round_robin_skips_a_down_backend() -> None:
    pool = Pool(frontend())
    for b in pool.backends:
        b.check_result(True, 0.0)
    by_name(pool, "master-1").connect_failed(1.0, "refused")
    picks = names(pool, 100)
    assert set(picks) == {"master-0", "master-2"}
    assert abs(picks["master-0"] - picks["master-2"]) <= 1


def test_no_eligible_backend_gives_none() -> None:
    pool = Pool(frontend())
    for b in pool.backends:
        b.check_result(False, 0.0)
    assert pool.choose("10.33.3.200") is None
    assert Pool(frontend(backends=())).choose("10.33.3.200") is None


def test_exclude_skips_backends_already_tried() -> None:
    pool = Pool(frontend())
    first = pool.choose("10.33.3.200")
    assert first is not None
    tried = {id(first)}
    second = pool.choose("10.33.3.200", tried)
    assert second is not None and second is not first
    tried.add(id(second))
    third = pool.choose("10.33.3.200", tried)
    assert third is not None and third not in (first, second)
    tried.add(id(third))
    assert pool.choose("10.33.3.200", tried) is None


def test_leastconn_picks_the_backend_with_fewest_active() -> None:
    pool = Pool(frontend(balance="leastconn"))
    m0, m1, m2 = (by_name(pool, n) for n in ("master-0", "master-1", "master-2"))
    m0.active, m1.active, m2.active = 5, 2, 7
    assert pool.choose("c") is m1
    m1.active = 9
    assert pool.choose("c") is m0
    # Simulate connections opening: the pool fills up evenly.
    for b in pool.backends:
        b.active = b.total = 0
    for _ in range(30):
        chosen = pool.choose("c")
        assert chosen is not None
        chosen.active += 1
        chosen.total += 1
    assert [b.active for b in pool.backends] == [10, 10, 10]
    m2.admin = "drain"
    assert pool.choose("c") in (m0, m1)


def test_source_hash_is_stable_per_client() -> None:
    pool = Pool(frontend(balance="source"))
    clients = [f"10.33.3.{i}" for i in range(1, 201)]
    first = {c: pool.choose(c) for c in clients}
    for _ in range(3):
        assert {c: pool.choose(c) for c in clients} == first
    spread = Counter(b.spec.name for b in first.values() if b is not None)
    assert set(spread) == {"master-0", "master-1", "master-2"}  # clients do spread
    assert min(spread.values()) > 20


def test_source_hash_moves_clients_off_a_down_backend() -> None:
    pool = Pool(frontend(balance="source"))
    clients = [f"10.33.3.{i}" for i in range(1, 201)]
    before = {c: pool.choose(c) for c in clients}
    victim = by_name(pool, "master-1")
    on_victim = [c for c in clients if before[c] is victim]
    assert on_victim
    victim.connect_failed(1.0, "refused")
    after = {c: pool.choose(c) for c in clients}
    assert all(b is not None and b is not victim for b in after.values())
    assert {after[c] for c in on_victim} <= {by_name(pool, "master-0"), by_name(pool, "master-2")}
    assert {c: pool.choose(c) for c in clients} == after  # stable again with the new set
    victim.check_result(True, 2.0)
    victim.check_result(True, 3.0)
    assert victim.health == "up"
    assert {c: pool.choose(c) for c in clients} == before  # back where they were


# --- admin state ------------------------------------------------------------------------


def test_drain_and_disabled_are_excluded() -> None:
    pool = Pool(frontend())
    m0, m1 = by_name(pool, "master-0"), by_name(pool, "master-1")
    m0.admin = "drain"
    m1.admin = "disabled"
    assert not m0.eligible and not m1.eligible
    assert names(pool, 20) == {"master-2": 20}
    m0.admin = m1.admin = "enabled"
    assert set(names(pool, 30)) == {"master-0", "master-1", "master-2"}
    for b in pool.backends:
        b.admin = "drain"
    assert pool.choose("c") is None


def test_drained_backend_that_is_down_stays_out_when_enabled() -> None:
    pool = Pool(frontend())
    m0 = by_name(pool, "master-0")
    m0.admin = "drain"
    m0.check_result(False, 1.0)
    m0.admin = "enabled"
    assert not m0.eligible


# --- a new plan ------------------------------------------------------------------------


def test_update_keeps_state_of_the_same_backend() -> None:
    pool = Pool(frontend())
    m0 = by_name(pool, "master-0")
    m0.check_result(True, 1.0)
    m0.admin = "drain"
    m0.active, m0.total, m0.bytes_in = 3, 40, 1234
    gone = pool.update(frontend(rise=4, fall=5))
    assert gone == []
    kept = by_name(pool, "master-0")
    assert kept is m0
    assert (kept.health, kept.admin, kept.active, kept.total, kept.bytes_in) == (
        "up",
        "drain",
        3,
        40,
        1234,
    )
    assert (kept.rise, kept.fall) == (4, 5)  # the new plan's check settings


def test_update_takes_the_new_spec_of_a_kept_backend() -> None:
    pool = Pool(frontend(backends=(backend("node-a", 60, role="bootstrap"),)))
    state_a = by_name(pool, "node-a")
    pool.update(frontend(backends=(backend("node-a", 60, role="master"),)))
    assert by_name(pool, "node-a") is state_a
    assert state_a.spec.role == "master"


def test_update_with_a_moved_address_is_a_new_backend() -> None:
    pool = Pool(frontend())
    old = by_name(pool, "master-0")
    old.check_result(False, 1.0)
    moved = (backend("master-0", 60), *MASTERS[1:])
    pool.update(frontend(backends=moved))
    new = by_name(pool, "master-0")
    assert new is not old and new.health == "unknown"
    assert old not in pool.backends  # no connections: forgotten at once


def test_update_drains_removed_backends_until_their_connections_end() -> None:
    pool = Pool(frontend())
    m2 = by_name(pool, "master-2")
    m2.active = 2
    m1 = by_name(pool, "master-1")
    gone = pool.update(frontend(backends=MASTERS[:1]))
    assert set(gone) == {m1, m2}
    assert m1.removed and m2.removed
    assert m2 in pool.backends and m1 not in pool.backends  # m1 had no connections
    assert pool.find("master-2") is None  # not addressable by the admin API any more
    assert names(pool, 10) == {"master-0": 10}  # no new connections to m2
    pool.forget_idle_removed()
    assert m2 in pool.backends  # still has connections
    m2.active = 0
    pool.forget_idle_removed()
    assert [b.spec.name for b in pool.backends] == ["master-0"]


def test_update_brings_back_a_removed_backend_with_its_state() -> None:
    pool = Pool(frontend())
    m2 = by_name(pool, "master-2")
    m2.check_result(True, 1.0)
    m2.active = 1
    pool.update(frontend(backends=MASTERS[:2]))
    assert m2.removed and not m2.eligible
    pool.update(frontend())
    assert by_name(pool, "master-2") is m2
    assert not m2.removed and m2.eligible and m2.active == 1
    assert [b.spec.name for b in pool.backends] == ["master-0", "master-1", "master-2"]


def test_stats_shape() -> None:
    b = state()
    b.check_result(True, 5.0, "https :6443 GET /readyz -> 200")
    stats = b.status().to_json()
    assert stats["name"] == "master-0" and stats["address"] == "10.33.3.50:6443"
    assert stats["health"] == "up" and stats["admin"] == "enabled"
    assert stats["removed"] is False and stats["active"] == 0
