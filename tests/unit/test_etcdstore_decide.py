"""The etcd store's decisions in plain code (no etcd): whether a lease may take its
address from the one stored there, how progress and unknown machines merge, where the
bounded logs cut. The store itself runs against real etcd in
tests/integration/test_etcd_store.py."""

from __future__ import annotations

import pytest

from appliance.etcdstore import (
    lease_live,
    lease_refused,
    merge_stage,
    merge_unknown,
    trim_below,
)
from appliance.events import Event
from appliance.stores import Lease, LeaseConflict, LeaseState, StoreError, UnknownMachine

A, B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"


def lease(
    mac: str, state: LeaseState = "bound", expires: float = 100.0, now: float = 50.0
) -> Lease:
    return Lease(mac, "10.0.0.5", None, expires, state, now)


@pytest.mark.parametrize(
    ("holder", "live"),
    [
        (lease(B, "bound", expires=100.0), True),
        (lease(B, "offered", expires=51.0), True),  # an offer holds the address while it waits
        (lease(B, "declined", expires=60.0), True),  # quarantined: kept out of the pool
        (lease(B, "released", expires=100.0), False),  # given back
        (lease(B, "bound", expires=50.0), False),  # expired at now
        (lease(B, "bound", expires=49.0), False),
    ],
)
def test_an_address_held_live_by_another_mac_is_refused(holder: Lease, live: bool) -> None:
    want = lease(A, now=50.0)
    assert lease_live(holder, 50.0) is live
    assert lease_refused(want, holder, strict=False) is live
    assert lease_refused(want, holder, strict=True)  # put_lease: any other MAC's row


def test_the_same_mac_or_a_free_address_is_never_refused() -> None:
    want = lease(A)
    assert not lease_refused(want, None, strict=True)
    assert not lease_refused(want, lease(A, "declined", expires=1e9), strict=True)


def test_the_decision_time_is_the_lease_own_not_the_writer_clock() -> None:
    # Member B decided at 40 while A's lease (expiring 45) was live: refused, even if the
    # write reaches etcd after 45.
    assert lease_refused(lease(A, now=40.0), lease(B, expires=45.0), strict=False)
    assert not lease_refused(lease(A, now=46.0), lease(B, expires=45.0), strict=False)


def test_merge_stage_keeps_the_latest_detail_like_sqlite() -> None:
    first = merge_stage(None, Event("m0", "dhcp-offer", "a", 5.0))
    assert first == (5.0, 5.0, "a")
    later = merge_stage(first, Event("m0", "dhcp-offer", "b", 7.0))
    assert later == (5.0, 7.0, "b")
    late_arrival = merge_stage(later, Event("m0", "dhcp-offer", "old", 2.0))
    assert late_arrival == (2.0, 7.0, "b")


def test_merge_unknown_counts_sightings() -> None:
    old = UnknownMachine(A, 1.0, 5.0, 3, "PXE", "0", "", "h1")
    new = UnknownMachine(A, 9.0, 9.0, 2, "PXE2", "7", "u", "h2")
    merged = merge_unknown(old, new)
    assert merged == UnknownMachine(A, 1.0, 9.0, 5, "PXE2", "7", "u", "h2")
    assert merge_unknown(None, new) is new
    # An older sighting arriving late does not move last_seen back.
    assert merge_unknown(merged, UnknownMachine(A, 3.0, 3.0, 1)).last_seen == 9.0


@pytest.mark.parametrize(
    ("last", "keep", "first_kept"), [(0, 10, 1), (10, 10, 1), (11, 10, 2), (25_000, 20_000, 5_001)]
)
def test_trim_below(last: int, keep: int, first_kept: int) -> None:
    assert trim_below(last, keep) == first_kept


def test_lease_conflict_is_a_store_error_with_what_was_refused() -> None:
    refused, holder = lease(A), lease(B)
    exc = LeaseConflict("10.0.0.5 is leased to B", refused=(refused,), holders=(holder,))
    assert isinstance(exc, StoreError)
    assert (exc.refused, exc.holders, str(exc)) == (
        (refused,),
        (holder,),
        "10.0.0.5 is leased to B",
    )
    assert LeaseConflict("plain").refused == ()  # as the SQLite store raises it
