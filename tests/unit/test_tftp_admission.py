"""The TFTP listener's decisions without sockets: what is answered, who gets a slot."""

from __future__ import annotations

import struct

import pytest

from services.tftp.admission import (
    Limits,
    Slots,
    TokenBuckets,
    drop_reason,
    is_new_request,
    own_endpoints,
)

LISTEN = 6969
RRQ = struct.pack("!H", 1) + b"pxelinux.0\0octet\0"
WRQ = struct.pack("!H", 2) + b"x\0octet\0"


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!HH", 5, 0) + b"x\0",  # ERROR
        struct.pack("!HH", 4, 1),  # ACK
        struct.pack("!HH", 3, 1) + b"data",  # DATA
        struct.pack("!H", 6) + b"blksize\x00512\0",  # OACK
        struct.pack("!HH", 9, 9),
        b"",
        b"\1",
        b"\1\1junk",
    ],
)
def test_only_requests_are_ever_answered(data: bytes) -> None:
    assert drop_reason(data, "192.0.2.9", 40000, LISTEN) == "not a request"


def test_requests_from_ordinary_ports_go_on() -> None:
    assert drop_reason(RRQ, "192.0.2.9", 40000, LISTEN) is None
    assert drop_reason(WRQ, "192.0.2.9", 1024, LISTEN) is None


@pytest.mark.parametrize("port", [0, 1, 53, 69, 1023])
def test_requests_from_privileged_ports_are_dropped(port: int) -> None:
    assert drop_reason(RRQ, "192.0.2.9", port, LISTEN) == "privileged source port"


def test_requests_from_our_own_port_are_dropped() -> None:
    assert drop_reason(RRQ, "192.0.2.9", LISTEN, LISTEN) == "our own port"


def test_requests_from_our_other_services_are_dropped() -> None:
    own = own_endpoints(
        [("0.0.0.0", 5353), ("192.0.2.1", 8080), ("::", 9000)], ["192.0.2.1", "127.0.0.1"]
    )
    assert own == {
        ("192.0.2.1", 5353),
        ("127.0.0.1", 5353),
        ("192.0.2.1", 8080),
        ("192.0.2.1", 9000),
        ("127.0.0.1", 9000),
    }
    assert drop_reason(RRQ, "127.0.0.1", 5353, LISTEN, own) == "our own address"
    assert drop_reason(RRQ, "192.0.2.1", 8080, LISTEN, own) == "our own address"
    assert drop_reason(RRQ, "127.0.0.1", 8080, LISTEN, own) is None  # a client's port
    assert drop_reason(RRQ, "192.0.2.77", 5353, LISTEN, own) is None


def test_error_rate_per_source_and_overall() -> None:
    lim = Limits(error_rate=2.0, error_burst=5.0, error_rate_total=10.0, error_burst_total=20.0)
    buckets = TokenBuckets(lim)
    t = 100.0
    assert [buckets.allow("a", t) for _ in range(8)] == [True] * 5 + [False] * 3
    assert buckets.allow("b", t)  # another address has its own share
    assert not buckets.allow("a", t + 0.4)
    assert buckets.allow("a", t + 0.5)  # 2 per second come back
    # Overall: 20 at once, then 10 per second, however many addresses ask.
    fresh = TokenBuckets(lim)
    allowed = sum(fresh.allow(f"10.0.{i // 256}.{i % 256}", t) for i in range(100))
    assert allowed == 20
    assert sum(fresh.allow(f"10.1.0.{i}", t + 1.0) for i in range(100)) == 10


def test_the_rate_limit_remembers_a_bounded_number_of_addresses() -> None:
    buckets = TokenBuckets(Limits(tracked=10, error_burst_total=1e9, error_rate_total=1e9))
    for i in range(1000):
        buckets.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(buckets._buckets) == 10


def test_slots_per_client_reservation_and_duplicates() -> None:
    slots = Slots(Limits(max_transfers=10, per_client=3, reserved=4))
    assert slots.refuse_reason(("10.0.0.1", 5000), False) is None
    slots.admit(("10.0.0.1", 5000), False)
    assert slots.refuse_reason(("10.0.0.1", 5000), False) == "duplicate"
    # Once that transfer has heard from the client, the same TID asks for a new one.
    assert slots.refuse_reason(("10.0.0.1", 5000), False, answered=True) is None
    for port in (5001, 5002):
        slots.admit(("10.0.0.1", port), False)
    assert slots.refuse_reason(("10.0.0.1", 5003), False) == "per_client"
    assert not slots.scarce  # 3 of 10: scarce when more than half are taken
    for i in range(3):  # 6 slots for strangers (10 - 4 reserved)
        slots.admit((f"10.0.1.{i}", 5000), False)
    assert slots.refuse_reason(("10.0.2.1", 5000), False) == "reserved"
    assert slots.refuse_reason(("10.0.3.1", 5000), True) is None  # a node: reserved slots
    for i in range(4):
        slots.admit((f"10.0.3.{i}", 5000), True)
    assert slots.scarce and slots.active == 10 and slots.nodes == 4
    assert slots.refuse_reason(("10.0.3.9", 5000), True) == "full"  # all taken
    slots.release(("10.0.3.0", 5000), True)
    slots.release(("10.0.3.0", 5000), True)  # twice: no harm
    assert slots.nodes == 3 and slots.active == 9
    assert slots.refuse_reason(("10.0.2.1", 5000), False) == "reserved"  # strangers' max
    slots.release(("10.0.1.0", 5000), False)
    assert slots.refuse_reason(("10.0.2.1", 5000), False) is None
    for port in (5000, 5001, 5002):
        slots.release(("10.0.0.1", port), False)
    assert "10.0.0.1" not in slots.by_client
    slots.admit(("10.0.9.9", 7000), False)  # a TID twice (see answered): counted twice
    slots.admit(("10.0.9.9", 7000), False)
    slots.release(("10.0.9.9", 7000), False)
    assert ("10.0.9.9", 7000) in slots.tids and slots.by_client["10.0.9.9"] == 1


def test_a_flood_of_strangers_does_not_starve_a_nodes_error_replies() -> None:
    """Spoofed requests for missing files from many addresses spend the overall budget;
    a node's "file not found" (pxelinux and GRUB config probes) must still go out, or
    its loader waits out a timeout per probe. Its own bucket still bounds it."""
    lim = Limits(error_rate=2.0, error_burst=5.0, error_rate_total=10.0, error_burst_total=20.0)
    buckets = TokenBuckets(lim)
    t = 100.0
    assert sum(buckets.allow(f"198.51.100.{i}", t) for i in range(200)) == 20
    assert not buckets.allow("198.51.100.250", t)  # strangers stay bounded
    assert [buckets.allow("10.0.0.5", t, node=True) for _ in range(6)] == [True] * 5 + [False]
    assert buckets.allow("10.0.0.5", t + 0.5, node=True)  # its own rate comes back
    # What the node drew did not come out of the strangers' budget, either.
    assert sum(buckets.allow(f"198.51.101.{i}", t + 1.0) for i in range(50)) == 10


def test_a_request_after_the_client_ended_its_transfer_is_new() -> None:
    # The same request, unanswered, while its transfer runs: a resend (ignored).
    assert not is_new_request(same=True, heard=False, ended=False)
    # A tsize probe ended by the client's ERROR, then the same request again: new.
    assert is_new_request(same=True, heard=False, ended=True)
    # The real request after a probe differs (no tsize, a blksize): new.
    assert is_new_request(same=False, heard=False, ended=False)
    assert is_new_request(same=True, heard=True, ended=False)  # tftp-hpa's next `get`
