"""The DHCP core against hostile input (issue 14): strangers, DECLINEs from anyone,
client host names, and packets that would make us reflect or loop. No sockets."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import IPv4Address
from typing import Any

import pytest

from services.dhcp import codec
from services.dhcp.codec import DhcpMessage
from services.dhcp.policy import ClientInfo, DhcpCore, clean_hostname
from services.dhcp.strangers import Strangers
from tests.unit.dhcp_builders import (
    MASTER0,
    SERVER,
    STRANGER,
    dhcp_core,
    dora,
    msg,
    reply,
    send,
)

POOL = ("10.33.3.100", "10.33.3.199")


@pytest.fixture
def core(dgxpod_raw: dict[str, Any]) -> DhcpCore:
    return dhcp_core(dgxpod_raw)


@pytest.fixture
def pool_core(dgxpod_raw: dict[str, Any]) -> DhcpCore:
    return dhcp_core(dgxpod_raw, dhcp_range=list(POOL))


def random_mac(rng: random.Random) -> str:
    return "02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5))


def decline(mac: str, ip: IPv4Address, server: IPv4Address | None = SERVER) -> DhcpMessage:
    options = {codec.OPT_REQUESTED_IP: ip.packed}
    if server is not None:
        options[codec.OPT_SERVER_ID] = server.packed
    return msg(mac, codec.DECLINE, options=options)


# --- item 6: DECLINE only from the client we offered or leased the address to ---------


def test_decline_from_a_client_without_that_address_is_refused(pool_core: DhcpCore) -> None:
    # 191 DECLINEs from clients holding nothing emptied the pool for 600 s.
    rng = random.Random(6)
    for i in range(100, 200):
        out = send(pool_core, decline(random_mac(rng), IPv4Address(f"10.33.3.{i}")))
        assert not out.commit and not out.replies
    assert not pool_core.table.quarantine
    assert pool_core.counters["decline_refused"] == 100
    assert reply(send(pool_core, msg(STRANGER, codec.DISCOVER), 1001)).message_type == codec.OFFER


def test_decline_of_another_clients_lease_is_refused(pool_core: DhcpCore) -> None:
    ack = dora(pool_core, STRANGER)
    out = send(pool_core, decline("02:00:00:00:00:99", ack.yiaddr), 1010)
    assert not out.commit and not pool_core.table.quarantine
    assert pool_core.table.holder(ack.yiaddr, 1011) == STRANGER


def test_decline_needs_our_server_id(pool_core: DhcpCore) -> None:
    # RFC 2131 4.4.4 / table 5: a DECLINE MUST carry the server identifier.
    ack = dora(pool_core, STRANGER)
    assert not send(pool_core, decline(STRANGER, ack.yiaddr, server=None), 1010).commit
    assert not send(pool_core, decline(STRANGER, ack.yiaddr, IPv4Address("10.33.3.2")), 1010).commit
    assert not pool_core.table.quarantine


def test_decline_of_an_offer_or_lease_is_quarantined(pool_core: DhcpCore) -> None:
    offer = reply(send(pool_core, msg(STRANGER, codec.DISCOVER)))
    out = send(pool_core, decline(STRANGER, offer.yiaddr), 1001)
    assert out.commit[0].state == "declined" and out.warning
    assert offer.yiaddr in pool_core.table.quarantine
    ack = dora(pool_core, "02:00:00:00:00:02", 1002)
    assert ack.yiaddr != offer.yiaddr
    assert send(pool_core, decline("02:00:00:00:00:02", ack.yiaddr), 1010).commit


def test_random_declines_keep_no_state(pool_core: DhcpCore) -> None:
    # 525k random DECLINEs grew the daemon by 67 MB: a refused one leaves nothing behind.
    rng = random.Random(7)
    for _ in range(20_000):
        ip = IPv4Address(rng.getrandbits(32))
        send(pool_core, decline(random_mac(rng), ip))
    assert not pool_core.table.quarantine and not pool_core.table.by_mac


def test_quarantine_is_bounded_by_the_pool(pool_core: DhcpCore) -> None:
    # Even clients that DISCOVER and DECLINE each offer can only quarantine pool addresses.
    rng = random.Random(8)
    for i in range(300):
        mac = random_mac(rng)
        out = send(pool_core, msg(mac, codec.DISCOVER), 1000 + i)
        if out.replies:
            send(pool_core, decline(mac, reply(out).yiaddr), 1000 + i)
    assert len(pool_core.table.quarantine) <= 100
    assert all(pool_core.table.in_pool(ip) for ip in pool_core.table.quarantine)


# --- item 20: a pool client's host name -------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"dgx-07", "dgx-07"),
        (b"dgx-07\x00", "dgx-07"),  # NUL-terminated, as some firmware sends it
        (b"dgx-07.dgxpod.nvidia.com", "dgx-07"),  # our own domain: the host part
        (b"Host-A.lab", "Host-A.lab"),
        (b"a" * 63, "a" * 63),
        (b"a" * 64, None),  # a label is at most 63 octets
        (b"bad\nname", None),
        (b"x; rm -rf /", None),
        (b"-lead", None),
        (b"trail-", None),
        (b"a..b", None),
        (b"\xff\xfe", None),
        (b"", None),
        (b".", None),
        (".".join(["abcdefgh"] * 40).encode(), None),  # over 253 octets
    ],
)
def test_clean_hostname(sent: bytes, kept: str | None) -> None:
    assert clean_hostname(sent, "dgxpod.nvidia.com") == kept


def test_pool_client_hostname_is_stored_and_echoed(pool_core: DhcpCore) -> None:
    hostname = {codec.OPT_HOSTNAME: b"scratch-box"}
    offer = reply(send(pool_core, msg(STRANGER, codec.DISCOVER, options={12: b"scratch-box"})))
    assert offer.options[codec.OPT_HOSTNAME] == b"scratch-box"
    ack = dora(pool_core, STRANGER, 1010, hostname)
    assert ack.options[codec.OPT_HOSTNAME] == b"scratch-box"
    binding = pool_core.table.by_mac[STRANGER]
    assert binding.state == "bound" and binding.hostname == "scratch-box"


def test_hostile_hostname_is_neither_stored_nor_echoed(pool_core: DhcpCore) -> None:
    ack = dora(pool_core, STRANGER, opts={codec.OPT_HOSTNAME: b"evil\r\n<script>"})
    assert codec.OPT_HOSTNAME not in ack.options
    assert pool_core.table.by_mac[STRANGER].hostname is None
    assert pool_core.counters["bad_hostname"] >= 1


def test_pool_client_without_hostname_gets_none(pool_core: DhcpCore) -> None:
    ack = dora(pool_core, STRANGER)
    assert codec.OPT_HOSTNAME not in ack.options
    assert pool_core.table.by_mac[STRANGER].hostname is None


def test_inventory_node_keeps_its_inventory_name(core: DhcpCore) -> None:
    ack = dora(core, MASTER0, opts={codec.OPT_HOSTNAME: b"localhost"})
    assert ack.options[codec.OPT_HOSTNAME] == b"master-0"


def test_unknown_machine_strings_are_printable(core: DhcpCore) -> None:
    # A stranger's vendor class goes to the log and the dashboard: no control characters.
    m = msg(
        STRANGER,
        codec.DISCOVER,
        options={
            codec.OPT_VENDOR_CLASS: b"PXEClient\nFAKE LOG LINE\x1b[31m",
            codec.OPT_HOSTNAME: b"h\x00\x07",
        },
    )
    info = send(core, m).unknown
    assert info is not None
    for text in (info.vendor_class, info.hostname, info.describe()):
        assert text.isprintable(), text


# --- item 1: no reflection, no loops -----------------------------------------------------


def test_a_bootreply_is_never_answered(core: DhcpCore) -> None:
    out = send(core, msg(MASTER0, codec.DISCOVER, op=codec.BOOTREPLY))
    assert not out.replies and core.counters["ignored"] == 1


@pytest.mark.parametrize(
    "src",
    [
        ("10.33.3.18", 68),  # our own address (spoofed, or our own reply looped back)
        ("10.33.3.18", 67),
        ("10.33.3.7", 67),  # another server or relay's port, without giaddr
        ("198.51.100.9", 53),  # a well-known port: a reply there is reflection
        ("198.51.100.9", 7),  # echo: it would send our reply straight back
        ("198.51.100.9", 0),
        ("255.255.255.255", 68),
        ("224.0.0.1", 68),
    ],
)
def test_no_reply_to_our_own_or_a_service_port(core: DhcpCore, src: tuple[str, int]) -> None:
    out = send(core, msg(MASTER0, codec.DISCOVER), src=src)
    assert not out.replies, out.log
    assert core.counters["reflection"] == 1


def test_relay_loops_are_cut(core: DhcpCore) -> None:
    # giaddr naming ourselves: the "relay" is us; a reply would come back to us.
    ours = msg(MASTER0, codec.DISCOVER, giaddr=SERVER)
    assert not send(core, ours, src=("10.33.3.1", 67)).replies
    # RFC 1542 4.1.1: more than 16 relay hops is a loop.
    loop = msg(MASTER0, codec.DISCOVER, giaddr=IPv4Address("10.33.3.1"), hops=17)
    assert not send(core, loop, src=("10.33.3.1", 67)).replies
    fine = msg(MASTER0, codec.DISCOVER, giaddr=IPv4Address("10.33.3.1"), hops=1)
    assert send(core, fine, src=("10.33.3.1", 67)).replies


def test_inform_reply_goes_only_to_our_network(core: DhcpCore) -> None:
    # An INFORM's ACK goes to ciaddr: a forged one would aim it at anyone.
    far = msg(MASTER0, codec.INFORM, ciaddr=IPv4Address("198.51.100.7"))
    assert not send(core, far, src=("10.33.3.50", 68)).replies
    ours = msg(MASTER0, codec.INFORM, ciaddr=SERVER)
    assert not send(core, ours, src=("10.33.3.50", 68)).replies


def test_naks_are_rate_limited_per_source(pool_core: DhcpCore) -> None:
    def bad(mac: str) -> DhcpMessage:
        return msg(mac, codec.REQUEST, options={codec.OPT_REQUESTED_IP: bytes([192, 0, 2, 1])})

    rng = random.Random(1)
    sent = sum(
        len(send(pool_core, bad(random_mac(rng)), 1000 + i / 1000).replies) for i in range(1000)
    )
    assert 0 < sent <= 50  # one second of garbage from 0.0.0.0
    assert pool_core.counters["nak_limited"] == 1000 - sent
    # Another source is not starved by the first; the first recovers later.
    other = send(pool_core, bad(STRANGER), 1001, src=("10.33.3.120", 68))
    assert other.replies
    assert send(pool_core, bad(STRANGER), 1100).replies


def test_nak_limiter_state_is_bounded(pool_core: DhcpCore) -> None:
    rng = random.Random(2)
    for i in range(5000):
        src = (str(IPv4Address(rng.getrandbits(32) | 1)), 68)
        send(
            pool_core,
            msg(random_mac(rng), codec.REQUEST, options={codec.OPT_REQUESTED_IP: b"\xc0\0\2\1"}),
            1000 + i / 100,
            src=src,
        )
    assert len(pool_core.nak_limit) <= 1024


# --- item 5: strangers tracked within bounds ----------------------------------------------


def info(mac: str) -> ClientInfo:
    return ClientInfo(mac, "PXEClient", 7, "", "")


def test_strangers_are_bounded_and_evictions_counted() -> None:
    s = Strangers(capacity=100)
    rng = random.Random(3)
    for i in range(10_000):
        s.seen(info(random_mac(rng)), 1000 + i / 1000)
    assert len(s.last_noted) <= 100 and len(s.pending) <= 100
    assert s.evicted >= 9_900 - 100
    notes, lost = s.take()  # the store missed the rest: they count as evicted there
    assert len(notes) == 100 and lost == 10_000 - 100


def test_stranger_log_lines_are_rate_limited_and_summed_up() -> None:
    s = Strangers(capacity=1000, log_burst=5, log_window=60.0)
    lines = [
        s.seen(info(f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}"), 1000 + i / 100) for i in range(500)
    ]
    logged = [line for line in lines if line]
    assert len(logged) == 5
    assert s.tick(1030) is None  # the window is not over yet
    summary = s.tick(1061)
    assert summary is not None and "495 more unknown machines" in summary
    assert s.tick(1200) is None  # nothing new: no line


def test_stranger_retries_are_one_line_and_one_write_per_minute() -> None:
    s = Strangers(capacity=10)
    assert s.seen(info(STRANGER), 1000)
    assert s.seen(info(STRANGER), 1001) is None
    assert [n.mac for n in s.take()[0]] == [STRANGER]
    s.seen(info(STRANGER), 1030)
    assert s.take() == ([], 0)
    s.seen(info(STRANGER), 1061)
    notes, _ = s.take()
    assert [n.mac for n in notes] == [STRANGER] and notes[0].seen == 3  # 1001, 1030, 1061


def test_stranger_flood_through_the_core_keeps_bounded_counters(core: DhcpCore) -> None:
    rng = random.Random(4)
    s = Strangers(capacity=256)
    for i in range(5000):
        out = send(core, msg(random_mac(rng), codec.DISCOVER), 1000 + i / 1000)
        assert not out.replies and out.unknown is not None
        s.seen(out.unknown, 1000 + i / 1000)
    assert core.counters == Counter(core.counters)  # plain counts, no per-MAC keys
    assert len(core.counters) < 10
    assert len(s.last_noted) <= 256


# --- item 5: the store's table is bounded and paged ---------------------------------------


def test_unknown_machines_table_keeps_the_most_recent(tmp_path: Any) -> None:
    from appliance.store import Store, UnknownMachine

    with Store.open(tmp_path, durable=False) as store:
        batch = [
            UnknownMachine(f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}", i, i, 1) for i in range(50)
        ]
        assert store.note_unknowns(batch, keep=20, lost=3) == 30
        assert store.unknown_machine_counts() == (20, 33)
        page = store.unknown_machines(5, 0)
        assert [m["last_seen"] for m in page] == [49, 48, 47, 46, 45]
        assert [m["last_seen"] for m in store.unknown_machines(5, 18)] == [31, 30]
        # A machine seen again counts its requests and moves to the front.
        store.note_unknowns([UnknownMachine(batch[35].mac, 100, 100, 4)], keep=20)
        again = store.unknown_machines(1, 0)[0]
        assert again["mac"] == batch[35].mac and again["seen"] == 5
        assert again["first_seen"] == 35


# --- next to item 5: a random-MAC flood with a pool set -----------------------------------


def test_an_exhausted_pool_costs_no_scan_per_discover(dgxpod_raw: dict[str, Any]) -> None:
    # Once a flood holds every pool address, each further DISCOVER used to scan the whole
    # pool twice: 17 ms each for 4096 addresses, the event loop of every service gone.
    import time

    raw = dgxpod_raw
    raw["network"]["subnet"] = "10.33.0.0/16"
    core = dhcp_core(raw, dhcp_range=["10.33.100.0", "10.33.115.255"])  # 4096 addresses
    rng = random.Random(9)
    for _ in range(4096):
        assert send(core, msg(random_mac(rng), codec.DISCOVER)).replies
    started = time.perf_counter()
    for i in range(500):
        assert not send(core, msg(random_mac(rng), codec.DISCOVER), 1001 + i / 1000).replies
    assert time.perf_counter() - started < 1.0
    assert core.counters["pool_exhausted"] == 500
    # Still correct: a released address is offered at once, held offers come back
    # when their hold is over.
    held = core.table.by_mac[next(iter(core.table.by_mac))]
    core.table.drop_offer(held.mac)
    assert reply(send(core, msg(STRANGER, codec.DISCOVER), 1002)).yiaddr == held.ip
    late = reply(send(core, msg("02:00:00:00:00:77", codec.DISCOVER), 1000 + 61))
    assert late.yiaddr == IPv4Address("10.33.100.1")  # .0 went to STRANGER at 1002


def test_dropped_requests_are_in_the_metrics() -> None:
    from appliance.metrics import StoreFacts, families
    from appliance.status import ApplianceStatus, ServiceEntry
    from services.dhcp.status import DhcpStatus

    counters = {"reflection": 3, "nak_limited": 2, "decline_refused": 191, "unknown_evicted": 7}
    dhcp = ServiceEntry("running", (), DhcpStatus(counters=counters))
    status = ApplianceStatus(services={"dhcp": dhcp})
    got = {
        (sample.name, sample.labels.get("reason")): sample.value
        for family in families(status, StoreFacts())
        for sample in family.samples
        if family.name == "appliance_dhcp_dropped"
    }
    assert got[("appliance_dhcp_dropped_total", "decline_refused")] == 191
    assert got[("appliance_dhcp_dropped_total", "reflection")] == 3
    assert got[("appliance_dhcp_dropped_total", "bad_hostname")] == 0


def test_inform_answers_are_rate_limited_per_destination(core: DhcpCore) -> None:
    # An INFORM's ACK goes to the ciaddr it names: forged ones must not make us a flood
    # source aimed at one host of the network.
    victim = IPv4Address("10.33.3.77")
    rng = random.Random(10)
    sent = sum(
        len(send(core, msg(random_mac(rng), codec.INFORM, ciaddr=victim), 1000 + i / 1000).replies)
        for i in range(200)
    )
    assert 0 < sent <= 20
    other = msg(MASTER0, codec.INFORM, ciaddr=IPv4Address("10.33.3.50"))
    assert send(core, other, 1000.2, src=("10.33.3.50", 68)).replies


def test_sightings_of_a_failed_write_wait_for_the_next() -> None:
    """The state file was locked: nothing seen is dropped, and the bound holds."""
    from services.dhcp.strangers import Sighting, Strangers

    s = Strangers(capacity=3)
    notes = [Sighting(f"02:00:00:00:00:0{i}", 1.0, 2.0, 1, "", "", "", "") for i in range(3)]
    s.pending["02:00:00:00:00:00"] = Sighting("02:00:00:00:00:00", 5.0, 6.0, 2, "", "", "", "")
    s.put_back(notes, lost=1)
    assert s.lost == 1
    assert s.pending["02:00:00:00:00:00"].first_seen == 1.0
    assert s.pending["02:00:00:00:00:00"].seen == 3
    assert set(s.pending) == {n.mac for n in notes}
    s.put_back([Sighting("02:00:00:00:00:09", 1.0, 2.0, 1, "", "", "", "")], lost=0)
    assert len(s.pending) == 3 and s.evicted == 1


def test_one_host_sending_garbage_does_not_silence_naks_to_rebooting_clients(
    pool_core: DhcpCore,
) -> None:
    """Every client without an address sends from 0.0.0.0: one host broadcasting ~10
    bogus REQUESTs a second must not use up the NAKs of every rebooting client (dhclient
    and udhcpc would wait out their timeout). Keyed by MAC; all together stay bounded."""

    def bad(mac: str) -> DhcpMessage:
        return msg(mac, codec.REQUEST, options={codec.OPT_REQUESTED_IP: bytes([192, 0, 2, 1])})

    noisy = "02:00:00:00:0e:01"
    noisy_naks = sum(  # five seconds of garbage, over the rate
        len(send(pool_core, bad(noisy), 1000 + i / 20).replies) for i in range(100)
    )
    assert noisy_naks <= 10 + 5 * 10 + 1  # its own share: a burst, then 10 a second
    rebooting = [f"02:00:00:00:0f:{i:02x}" for i in range(5)]
    assert all(send(pool_core, bad(mac), 1005.0).replies for mac in rebooting)
    # Made-up MACs by the thousand: the NAKs stay bounded overall.
    rng = random.Random(4)
    sent = sum(
        len(send(pool_core, bad(random_mac(rng)), 2000 + i / 1000).replies) for i in range(1000)
    )
    assert 0 < sent <= 50


def test_one_client_behind_a_relay_does_not_silence_naks_to_the_others(
    pool_core: DhcpCore,
) -> None:
    """The same through a relay: every client behind it was keyed by the relay's
    address. Per MAC there too, the relay's own total bounded."""
    relay = IPv4Address("10.33.3.1")

    def bad(mac: str) -> DhcpMessage:
        opts = {codec.OPT_REQUESTED_IP: bytes([192, 0, 2, 1])}
        return msg(mac, codec.REQUEST, giaddr=relay, hops=1, options=opts)

    for i in range(100):
        send(pool_core, bad("02:00:00:00:0e:02"), 1000 + i / 20, src=("10.33.3.1", 67))
    rebooting = [f"02:00:00:00:0f:{i:02x}" for i in range(5)]
    assert all(send(pool_core, bad(m), 1005.0, src=("10.33.3.1", 67)).replies for m in rebooting)
    rng = random.Random(5)
    sent = sum(
        len(send(pool_core, bad(random_mac(rng)), 2000 + i / 1000, src=("10.33.3.1", 67)).replies)
        for i in range(1000)
    )
    assert 0 < sent <= 50
