"""An HA member's runtime state (`shared=True`): backend admin states written through to
the shared store, taken by the other member's load balancer at its refresh; install marks
and bootstrap retirement written by the other member reach this one; leadership is the
elector's word on every read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.runtime import ADMIN_KEY, RuntimeState
from appliance.store import Store
from tests.unit.test_runtime_state import FakeLB


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path, durable=False)  # one store both members share (etcd's stand-in)
    yield s
    s.close()


def test_admin_state_reaches_the_other_member_and_is_undone_there(store: Store) -> None:
    a, b = RuntimeState(store, shared=True), RuntimeState(store, shared=True)
    lb_a, lb_b = FakeLB(), FakeLB()
    a.attach_load_balancer(lb_a)
    b.attach_load_balancer(lb_b)
    a.set_admin_state("api", "m0", "drain")
    assert lb_a.states["api", "m0"] == "drain"
    assert lb_b.states["api", "m0"] == "enabled"  # not yet: b has not re-read
    b.refresh()
    assert lb_b.states["api", "m0"] == "drain"
    assert b.admin_state("api", "m0") == "drain"
    a.set_admin_state("api", "m0", "enabled")
    b.refresh()
    assert lb_b.states["api", "m0"] == "enabled" and list(b.admin_states()) == []


def test_a_malformed_shared_record_is_left_out(store: Store) -> None:
    store.set_cluster_state(ADMIN_KEY, {"api/m0": "sideways", "nofrontend": "drain"}, 1.0)
    b = RuntimeState(store, shared=True)
    assert list(b.admin_states()) == []
    store.set_cluster_state(ADMIN_KEY, ["not", "a", "mapping"], 2.0)
    b.refresh()
    assert list(b.admin_states()) == []


def test_install_marks_and_bootstrap_from_the_other_member(store: Store) -> None:
    a, b = RuntimeState(store, shared=True), RuntimeState(store, shared=True)
    a.mark_installed("master-0", 10.0)
    store.set_cluster_state("bootstrap", {"complete": True}, 11.0)
    assert not b.installed("master-0") and not b.bootstrap_retired
    b.refresh()
    assert b.installed("master-0") and b.bootstrap_retired


def test_leading_is_the_elector_word_on_every_read(store: Store) -> None:
    single = RuntimeState(store)
    assert single.leading  # one host: always
    member = RuntimeState(store, shared=True)
    assert not member.leading  # until it took over
    elected = [True]
    member.elected = lambda: elected[0]
    member.leading = True
    assert member.leading
    elected[0] = False  # fenced: before any step-down callback ran
    assert not member.leading
