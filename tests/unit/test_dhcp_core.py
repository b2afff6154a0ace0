"""The DHCP core without sockets: codec, lease table and every RFC 2131 path."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from appliance.inventory import InventoryError, parse_inventory
from appliance.plan import build_plan
from services.dhcp import arp, codec, ping
from services.dhcp.codec import DhcpMessage
from services.dhcp.leases import LeaseTable
from services.dhcp.policy import DhcpCore
from tests.helpers import CONFIG, loopback_inventory
from tests.unit.dhcp_builders import (
    CLIENT,
    MASTER0,
    SERVER,
    STRANGER,
    dhcp_core,
    dhcp_plan,
    dora,
    msg,
    reply,
    send,
)

WORKER0 = "02:00:00:00:03:44"


@pytest.fixture
def core(dgxpod_raw: dict[str, Any]) -> DhcpCore:
    return dhcp_core(dgxpod_raw)


@pytest.fixture
def pool_core(dgxpod_raw: dict[str, Any]) -> DhcpCore:
    return dhcp_core(dgxpod_raw, dhcp_range=["10.33.3.100", "10.33.3.102"])


def arch(value: int) -> dict[int, bytes]:
    return {
        codec.OPT_CLIENT_ARCH: codec.u16(value),
        codec.OPT_VENDOR_CLASS: b"PXEClient:Arch:00000",
    }


# --- codec -----------------------------------------------------------------------------


def test_codec_round_trip_and_long_options() -> None:
    m = msg(MASTER0, codec.DISCOVER, options={codec.OPT_DOMAIN_SEARCH: b"x" * 600})
    parsed = codec.parse(codec.encode(m, 1500))
    assert parsed.mac == MASTER0 and parsed.message_type == codec.DISCOVER
    assert parsed.options[codec.OPT_DOMAIN_SEARCH] == b"x" * 600  # RFC 3396 split and joined


def test_codec_overload_and_limits() -> None:
    data = bytearray(codec.encode(msg(MASTER0, codec.DISCOVER)))
    # Put option 52 = 1 (options continue in `file`) and a hostname option inside file.
    end = data.index(b"\xff", 240)
    data[end : end + 4] = b"\x34\x01\x01\xff"
    data[108:114] = b"\x0c\x04node"
    data[114] = 0xFF
    parsed = codec.parse(bytes(data))
    assert parsed.options[codec.OPT_HOSTNAME] == b"node" and parsed.file == b""
    with pytest.raises(codec.DhcpParseError):
        codec.parse(bytes(data[:200]))
    with pytest.raises(codec.DhcpParseError):
        codec.parse(bytes(data[:236]) + b"\x00\x00\x00\x00")  # no magic cookie
    runaway = bytes(data[:240]) + b"\x0c\xff" + b"a" * 10
    with pytest.raises(codec.DhcpParseError):
        codec.parse(runaway)


def test_encode_respects_max_size() -> None:
    m = DhcpMessage(options={codec.OPT_MESSAGE_TYPE: b"\x02", 200: b"a" * 250, 201: b"b" * 250})
    assert len(codec.encode(m, 576)) <= 576 - 28
    assert 201 in codec.parse(codec.encode(m, 1500)).options


def test_user_class_forms() -> None:
    assert codec.user_classes(b"iPXE") == [b"iPXE"]
    assert codec.user_classes(b"\x04iPXE\x03foo") == [b"iPXE", b"foo"]


# --- reservations and PXE ------------------------------------------------------------------


def test_reserved_node_gets_its_address_and_options(core: DhcpCore) -> None:
    offer = reply(send(core, msg(MASTER0, codec.DISCOVER, options=arch(0))))
    assert offer.message_type == codec.OFFER and offer.yiaddr == IPv4Address("10.33.3.50")
    assert offer.options[codec.OPT_HOSTNAME] == b"master-0"
    assert offer.options[codec.OPT_DOMAIN] == b"dgxpod.nvidia.com"
    assert offer.options[codec.OPT_ROUTER] == IPv4Address("10.33.3.1").packed
    assert offer.options[codec.OPT_DNS] == SERVER.packed
    assert offer.options[codec.OPT_SERVER_ID] == SERVER.packed
    assert offer.siaddr == SERVER and offer.file == b"undionly.kpxe"
    assert next(iter(offer.options)) == codec.OPT_MESSAGE_TYPE
    ack = dora(core, MASTER0, opts=arch(0))
    assert ack.message_type == codec.ACK and ack.yiaddr == IPv4Address("10.33.3.50")
    assert int.from_bytes(ack.options[codec.OPT_LEASE_TIME], "big") == 3600
    assert int.from_bytes(ack.options[codec.OPT_T1], "big") == 1800


@pytest.mark.parametrize(
    ("arch_code", "node_mac", "expected"),
    [
        (0, STRANGER, "undionly.kpxe"),
        (7, STRANGER, "ipxe.efi"),
        (9, STRANGER, "ipxe.efi"),
        (11, STRANGER, "ipxe-arm64.efi"),
        (0, WORKER0, "ipxe.efi"),  # firmware: uefi overrides a BIOS report
        (7, MASTER0, "undionly.kpxe"),  # firmware: bios overrides a UEFI report
    ],
)
def test_loader_by_architecture(
    dgxpod_raw: dict[str, Any], arch_code: int, node_mac: str, expected: str
) -> None:
    core = dhcp_core(dgxpod_raw, dhcp_range=["10.33.3.100", "10.33.3.120"])
    offer = reply(send(core, msg(node_mac, codec.DISCOVER, options=arch(arch_code))))
    assert offer.file.decode() == expected
    assert offer.options[codec.OPT_BOOTFILE].decode() == expected


def test_http_boot_and_ipxe(core: DhcpCore) -> None:
    http = {codec.OPT_CLIENT_ARCH: codec.u16(16), codec.OPT_VENDOR_CLASS: b"HTTPClient:Arch:00016"}
    offer = reply(send(core, msg(WORKER0, codec.DISCOVER, options=http)))
    assert offer.file == b"http://10.33.3.18:8080/boot/ipxe.efi"
    assert offer.options[codec.OPT_VENDOR_CLASS] == b"HTTPClient"
    ipxe = {**arch(7), codec.OPT_USER_CLASS: b"iPXE"}
    offer = reply(send(core, msg(WORKER0, codec.DISCOVER, options=ipxe)))
    assert offer.file == b"http://10.33.3.18:8080/boot.ipxe"
    offer = reply(
        send(core, msg(WORKER0, codec.DISCOVER, options={codec.OPT_IPXE: b"\x13\x01\x01"}))
    )
    assert offer.file == b"http://10.33.3.18:8080/boot.ipxe"
    plain = reply(send(core, msg(WORKER0, codec.DISCOVER)))
    assert plain.file == b"" and codec.OPT_BOOTFILE not in plain.options  # an installed OS


def test_unknown_machine_without_pool_gets_nothing(core: DhcpCore) -> None:
    out = send(core, msg(STRANGER, codec.DISCOVER, options=arch(7)))
    assert not out.replies and out.unknown is not None
    assert out.unknown.arch == 7 and out.unknown.vendor_class.startswith("PXEClient")
    assert "uefi-x64" in out.unknown.describe()


def test_events_for_inventory_nodes(core: DhcpCore) -> None:
    out = send(core, msg(MASTER0, codec.DISCOVER, options=arch(0)))
    assert out.events == [("master-0", "dhcp-offer", "10.33.3.50 bios undionly.kpxe")]
    request = msg(
        MASTER0,
        codec.REQUEST,
        options={
            codec.OPT_SERVER_ID: SERVER.packed,
            codec.OPT_REQUESTED_IP: bytes([10, 33, 3, 50]),
        },
    )
    out = send(core, request)
    assert out.events[0][:2] == ("master-0", "dhcp-ack") and out.commit[0].state == "bound"


# --- request states ----------------------------------------------------------------------


def test_selecting_another_server_drops_our_offer(pool_core: DhcpCore) -> None:
    offer = reply(send(pool_core, msg(STRANGER, codec.DISCOVER)))
    other = msg(
        STRANGER,
        codec.REQUEST,
        options={
            codec.OPT_SERVER_ID: bytes([10, 33, 3, 2]),
            codec.OPT_REQUESTED_IP: offer.yiaddr.packed,
        },
    )
    assert not send(pool_core, other).replies
    assert pool_core.table.holder(offer.yiaddr, 1001) is None


def test_init_reboot_renew_rebind(core: DhcpCore) -> None:
    good = msg(MASTER0, codec.REQUEST, options={codec.OPT_REQUESTED_IP: bytes([10, 33, 3, 50])})
    assert reply(send(core, good)).message_type == codec.ACK  # init-reboot
    wrong = msg(MASTER0, codec.REQUEST, options={codec.OPT_REQUESTED_IP: bytes([10, 33, 3, 77])})
    nak = reply(send(core, wrong))
    assert nak.message_type == codec.NAK and nak.yiaddr == IPv4Address(0)
    assert b"reserved" in nak.options[codec.OPT_MESSAGE]
    assert send(core, wrong).replies[0].host == "255.255.255.255"  # NAK is broadcast
    renew = msg(MASTER0, codec.REQUEST, ciaddr=IPv4Address("10.33.3.50"))
    out = send(core, renew, src=("10.33.3.50", 68))
    ack = reply(out)
    assert ack.message_type == codec.ACK and ack.ciaddr == IPv4Address("10.33.3.50")
    assert (out.replies[0].host, out.replies[0].port) == ("10.33.3.50", 68)
    foreign = msg(MASTER0, codec.REQUEST, options={codec.OPT_REQUESTED_IP: bytes([192, 0, 2, 5])})
    assert b"not on this network" in reply(send(core, foreign)).options[codec.OPT_MESSAGE]


def test_pool_allocation_expiry_and_no_double_lease(pool_core: DhcpCore) -> None:
    macs = [f"de:ad:be:ef:00:{i:02x}" for i in range(4)]
    got = [dora(pool_core, mac, now=1000.0).yiaddr for mac in macs[:3]]
    assert sorted(got) == [IPv4Address(f"10.33.3.{i}") for i in (100, 101, 102)]
    assert not send(pool_core, msg(macs[3], codec.DISCOVER), 1002).replies  # exhausted
    later = 1000.0 + 3600 + 10
    # A returning client gets its old address back while it is free...
    assert dora(pool_core, macs[0], now=later).yiaddr == got[0]
    # ...and an expired lease's address goes to the next client, never to two at once.
    taken = dora(pool_core, macs[3], now=later).yiaddr
    assert taken in got[1:]
    assert pool_core.table.holder(taken, later + 2) == macs[3]


def test_requested_address_in_pool_is_honoured(pool_core: DhcpCore) -> None:
    want = {codec.OPT_REQUESTED_IP: bytes([10, 33, 3, 102])}
    assert reply(
        send(pool_core, msg(STRANGER, codec.DISCOVER, options=want))
    ).yiaddr == IPv4Address("10.33.3.102")


def test_decline_quarantines(pool_core: DhcpCore) -> None:
    ack = dora(pool_core, STRANGER)
    decline = msg(
        STRANGER,
        codec.DECLINE,
        options={codec.OPT_REQUESTED_IP: ack.yiaddr.packed, codec.OPT_SERVER_ID: SERVER.packed},
    )
    out = send(pool_core, decline, 1010)
    assert out.commit[0].state == "declined" and not out.replies
    offer = reply(send(pool_core, msg(STRANGER, codec.DISCOVER), 1011))
    assert offer.yiaddr != ack.yiaddr


def test_release_frees_the_address(pool_core: DhcpCore) -> None:
    ack = dora(pool_core, STRANGER)
    out = send(pool_core, msg(STRANGER, codec.RELEASE, ciaddr=ack.yiaddr), 1010)
    assert out.commit[0].state == "released" and not out.replies
    assert pool_core.table.holder(ack.yiaddr, 1011) is None


def test_inform_configuration_only(core: DhcpCore) -> None:
    inform = msg(MASTER0, codec.INFORM, ciaddr=IPv4Address("10.33.3.50"))
    out = send(core, inform, src=("10.33.3.50", 68))
    ack = reply(out)
    assert ack.message_type == codec.ACK and ack.yiaddr == IPv4Address(0)
    assert codec.OPT_LEASE_TIME not in ack.options and out.replies[0].host == "10.33.3.50"


def test_relay_reply_goes_to_giaddr_with_option_82(core: DhcpCore) -> None:
    relay82 = b"\x01\x04port\x02\x03abc"
    m = msg(
        MASTER0,
        codec.DISCOVER,
        giaddr=IPv4Address("10.33.3.1"),
        options={codec.OPT_RELAY_AGENT: relay82},
    )
    out = send(core, m, src=("10.33.3.1", 67))
    assert (out.replies[0].host, out.replies[0].port) == ("10.33.3.1", 67)
    offer = reply(out)
    assert offer.giaddr == IPv4Address("10.33.3.1")
    assert list(offer.options)[-1] == codec.OPT_RELAY_AGENT
    assert offer.options[codec.OPT_RELAY_AGENT] == relay82
    far = msg(MASTER0, codec.DISCOVER, giaddr=IPv4Address("198.51.100.1"))
    assert not send(core, far).replies and core.counters["foreign_relay"] == 1


def test_param_request_list_and_max_size(dgxpod_raw: dict[str, Any]) -> None:
    core = dhcp_core(dgxpod_raw, ntp_servers=["10.33.3.1"])
    params = bytes([42, 28, 119, 1])
    offer = reply(send(core, msg(MASTER0, codec.DISCOVER, options={codec.OPT_PARAMS: params})))
    order = list(offer.options)
    assert order[:2] == [codec.OPT_MESSAGE_TYPE, codec.OPT_SERVER_ID]
    assert [c for c in order if c in params] == list(params)  # the client's order
    assert offer.options[codec.OPT_DOMAIN_SEARCH] == b"\x06dgxpod\x06nvidia\x03com\x00"
    no_ntp = reply(send(core, msg(MASTER0, codec.DISCOVER)))
    assert codec.OPT_NTP not in no_ntp.options  # not asked for, not sent


def test_proxy_mode_gives_boot_info_only(dgxpod_raw: dict[str, Any]) -> None:
    core = dhcp_core(dgxpod_raw, dhcp_mode="proxy")
    offer = reply(send(core, msg(STRANGER, codec.DISCOVER, options=arch(7))))
    assert offer.yiaddr == IPv4Address(0) and offer.file == b"ipxe.efi"
    assert offer.options[codec.OPT_VENDOR_CLASS] == b"PXEClient"
    assert offer.options[codec.OPT_VENDOR_SPECIFIC] == b"\x06\x01\x08\xff"
    assert codec.OPT_LEASE_TIME not in offer.options
    assert not send(core, msg(STRANGER, codec.DISCOVER)).replies  # not a PXE client
    req = msg(STRANGER, codec.REQUEST, ciaddr=IPv4Address("10.33.3.77"), options=arch(7))
    out = core.handle(codec.encode(req), ("10.33.3.77", 68), 1000.0, pxe_port=True)
    ack = reply(out)
    assert ack.message_type == codec.ACK and (out.replies[0].host, out.replies[0].port) == (
        "10.33.3.77",
        68,
    )


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01" * 100, b"\x00" * 300, codec.encode(msg(MASTER0, codec.DISCOVER))[:239]],
)
def test_garbage_is_counted_not_raised(core: DhcpCore, data: bytes) -> None:
    out = core.handle(data, CLIENT, 1000.0)
    assert not out.replies
    assert core.counters["malformed"] + core.counters["ignored"] == 1


def test_wrong_op_is_ignored(core: DhcpCore) -> None:
    m = msg(MASTER0, codec.DISCOVER)
    m.op = codec.BOOTREPLY
    assert not send(core, m).replies and core.counters["ignored"] == 1


# --- the ping check before a pool address's first offer ---------------------------------


@pytest.fixture
def probing_core(dgxpod_raw: dict[str, Any]) -> DhcpCore:
    plan = dhcp_plan(dgxpod_raw, dhcp_range=["10.33.3.100", "10.33.3.102"])
    assert plan.dhcp.ping_wait == 0.5  # the default
    return DhcpCore(plan.dhcp, LeaseTable(None), 67, probing=True)


def test_ping_check_holds_the_offer_until_the_address_stays_silent(
    probing_core: DhcpCore,
) -> None:
    discover = msg(STRANGER, codec.DISCOVER)
    first = send(probing_core, discover, 1000.0)
    assert first.probe == IPv4Address("10.33.3.100") and not first.replies
    # Held for this client meanwhile: another client's DISCOVER is pinged elsewhere.
    other = send(probing_core, msg("de:ad:be:ef:00:02", codec.DISCOVER), 1000.1)
    assert other.probe == IPv4Address("10.33.3.101")
    # A retransmission asks for the same address again (the shell pings it once).
    assert send(probing_core, discover, 1000.2).probe == first.probe
    assert "did not answer" in probing_core.probed(first.probe, False, 1000.5)
    again = probing_core.handle(codec.encode(discover), CLIENT, 1000.5, probes=1)
    offer = reply(again)
    assert offer.yiaddr == first.probe and again.probe is None
    assert probing_core.counters["discover"] == 3  # the datagram handled again: not counted
    assert probing_core.counters["ping_silent"] == 1
    # Within PROBE_FRESH the address is not pinged again; the DORA completes.
    assert reply(send(probing_core, discover, 1010.0)).yiaddr == first.probe
    request = msg(
        STRANGER,
        codec.REQUEST,
        options={codec.OPT_SERVER_ID: SERVER.packed, codec.OPT_REQUESTED_IP: offer.yiaddr.packed},
    )
    assert reply(send(probing_core, request, 1011.0)).message_type == codec.ACK
    # A bound client's own address is never pinged (it might answer itself).
    assert reply(send(probing_core, discover, 5000.0)).yiaddr == first.probe


def test_an_address_that_answers_is_skipped_and_quarantined(probing_core: DhcpCore) -> None:
    discover = msg(STRANGER, codec.DISCOVER)
    first = send(probing_core, discover, 1000.0)
    assert first.probe == IPv4Address("10.33.3.100")
    line = probing_core.probed(first.probe, True, 1000.5)
    assert "answered a ping" in line and STRANGER in line
    assert probing_core.table.holder(first.probe, 1000.5) is None  # the held offer dropped
    second = probing_core.handle(codec.encode(discover), CLIENT, 1000.5, probes=1)
    assert second.probe == IPv4Address("10.33.3.101")
    probing_core.probed(second.probe, False, 1001.0)
    offer = reply(probing_core.handle(codec.encode(discover), CLIENT, 1001.0, probes=1))
    assert offer.yiaddr == IPv4Address("10.33.3.101")
    # The squatted address stays out of the pool, even when asked for by name...
    want = {codec.OPT_REQUESTED_IP: first.probe.packed}
    out = send(probing_core, msg("de:ad:be:ef:00:03", codec.DISCOVER, options=want), 1100.0)
    assert out.probe == IPv4Address("10.33.3.102")
    assert probing_core.counters["ping_in_use"] == 1
    # ...until its quarantine is over: then it is pinged again before any offer.
    later = 1000.5 + 600 + 1
    probing_core.table.expire(later)
    out = send(probing_core, msg("de:ad:be:ef:00:04", codec.DISCOVER), later)
    assert out.probe == first.probe


def test_reservations_and_a_core_without_pinger_never_probe(
    dgxpod_raw: dict[str, Any], probing_core: DhcpCore
) -> None:
    assert not probing_core.handle(codec.encode(msg(WORKER0, codec.DISCOVER)), CLIENT, 1000.0).probe
    plan = dhcp_plan(dgxpod_raw, dhcp_range=["10.33.3.100", "10.33.3.102"])
    unprobed = DhcpCore(plan.dhcp, LeaseTable(None), 67, probing=False)
    assert reply(send(unprobed, msg(STRANGER, codec.DISCOVER))).yiaddr == IPv4Address("10.33.3.100")


@pytest.mark.parametrize(
    ("network", "wait"),
    [
        ({"dhcp_range": ["10.33.3.100", "10.33.3.102"]}, 0.5),
        ({"dhcp_range": ["10.33.3.100", "10.33.3.102"], "dhcp_ping_wait": 2}, 2.0),
        ({"dhcp_range": ["10.33.3.100", "10.33.3.102"], "dhcp_ping_wait": 0}, 0.0),
        ({}, 0.0),  # no pool: nothing to ping
        ({"dhcp_range": ["10.33.3.100", "10.33.3.102"], "dhcp_mode": "proxy"}, 0.0),
    ],
)
def test_ping_wait_in_thedhcp_plan(
    dgxpod_raw: dict[str, Any], network: dict[str, Any], wait: float
) -> None:
    plan = dhcp_plan(dgxpod_raw, **network)
    assert plan.dhcp.ping_wait == wait
    assert DhcpCore(plan.dhcp, LeaseTable(None), 67, probing=True).probing is (wait > 0)


def test_loopback_subnets_are_never_pinged(tmp_path: Path) -> None:
    """Every 127/8 address is this host: each would answer."""
    raw = loopback_inventory(tmp_path)
    raw["network"]["dhcp_range"] = ["127.0.0.100", "127.0.0.120"]
    plan = build_plan(parse_inventory(raw, "x.yaml", tmp_path))
    assert plan.dhcp.ping_wait == 0.0


@pytest.mark.parametrize("bad", [-1, 11, "soon"])
def test_ping_wait_is_checked(dgxpod_raw: dict[str, Any], bad: object) -> None:
    dgxpod_raw["network"]["dhcp_ping_wait"] = bad
    with pytest.raises(InventoryError, match=r"network\.dhcp_ping_wait"):
        parse_inventory(dgxpod_raw, "x.yaml", CONFIG)


# --- ICMP echo codec ---------------------------------------------------------------------


def test_icmp_checksum_and_echo_request() -> None:
    # RFC 1071's example: the one's complement sum of these words is 0xddf2.
    assert ping.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2
    packet = ping.echo_request(0x1234, 7, b"abc")  # odd length: padded for the sum
    assert packet[0] == ping.ECHO_REQUEST and packet[4:8] == bytes.fromhex("12340007")
    assert ping.checksum(packet) == 0  # a valid checksum sums to all ones


def test_echo_reply_from_both_socket_kinds() -> None:
    reply_icmp = bytes([ping.ECHO_REPLY, 0]) + bytes(2) + bytes.fromhex("beef0007") + b"x"
    assert ping.echo_reply(reply_icmp, raw=False) == (0xBEEF, 7)
    ip_header = bytes([0x45]) + bytes(19)  # IPv4, IHL 5: 20 bytes
    assert ping.echo_reply(ip_header + reply_icmp, raw=True) == (0xBEEF, 7)
    options = bytes([0x46]) + bytes(23)  # IHL 6: 24 bytes with options
    assert ping.echo_reply(options + reply_icmp, raw=True) == (0xBEEF, 7)
    unreachable = bytes([3, 1]) + bytes(6)
    assert ping.echo_reply(unreachable, raw=False) is None
    assert ping.echo_reply(ping.echo_request(1, 1), raw=False) is None  # a request
    assert ping.echo_reply(b"\x00\x00", raw=False) is None
    assert ping.echo_reply(bytes([0x60]) + bytes(40), raw=True) is None  # not IPv4


# --- where replies go (RFC 2131 4.1) ------------------------------------------------------


def test_offer_to_a_client_without_an_address_is_unicast_unless_it_asks(core: DhcpCore) -> None:
    out = send(core, msg(MASTER0, codec.DISCOVER)).replies[0]
    assert (out.host, out.port, out.hwaddr) == ("10.33.3.50", 68, MASTER0)
    asked = send(core, msg(MASTER0, codec.DISCOVER, flags=codec.BROADCAST_FLAG)).replies[0]
    assert (asked.host, asked.port, asked.hwaddr) == ("255.255.255.255", 68, None)
    relayed = send(core, msg(MASTER0, codec.DISCOVER, giaddr=IPv4Address("10.33.3.1")))
    assert (relayed.replies[0].host, relayed.replies[0].hwaddr) == ("10.33.3.1", None)
    renew = send(core, msg(MASTER0, codec.REQUEST, ciaddr=IPv4Address("10.33.3.50")))
    assert (renew.replies[0].host, renew.replies[0].hwaddr) == ("10.33.3.50", None)
    wrong = msg(MASTER0, codec.REQUEST, options={codec.OPT_REQUESTED_IP: bytes([10, 33, 3, 9])})
    nak = send(core, wrong).replies[0]
    assert (nak.host, nak.hwaddr) == ("255.255.255.255", None)  # a NAK is never unicast


def test_arpreq_layout() -> None:
    req = arp.arpreq(IPv4Address("192.0.2.50"), "52:54:00:00:03:50", "eth0")
    assert len(req) == 68  # sizeof(struct arpreq) on Linux
    assert req[:8] == bytes([2, 0, 0, 0, 192, 0, 2, 50])  # sockaddr_in, AF_INET in host order
    assert req[16:24] == bytes([1, 0, 0x52, 0x54, 0, 0, 3, 0x50])  # ARPHRD_ETHER, the MAC
    assert req[32:36] == bytes([arp.ATF_COM, 0, 0, 0])
    assert req[52:] == b"eth0".ljust(16, b"\0")
    with pytest.raises(ValueError, match="Ethernet"):
        arp.arpreq(IPv4Address("192.0.2.50"), "52:54:00", "")
    with pytest.raises(ValueError, match="too long"):
        arp.arpreq(IPv4Address("192.0.2.50"), "52:54:00:00:03:50", "x" * 16)


def test_an_answer_for_an_address_bound_meanwhile_is_not_a_squatter(
    probing_core: DhcpCore,
) -> None:
    """While 10.33.3.100 is pinged for a DISCOVER, its client INIT-REBOOTs into it: the
    echo reply is from the holder itself, so the address is not put in quarantine."""
    first = send(probing_core, msg(STRANGER, codec.DISCOVER), 1000.0)
    assert first.probe is not None
    request = msg(STRANGER, codec.REQUEST, options={codec.OPT_REQUESTED_IP: first.probe.packed})
    assert reply(send(probing_core, request, 1000.1)).message_type == codec.ACK
    probing_core.probed(first.probe, True, 1000.4)
    assert first.probe not in probing_core.table.quarantine
    assert probing_core.table.holder(first.probe, 1000.5) == STRANGER


def test_a_given_up_probe_frees_the_address_it_held(dgxpod_raw: dict[str, Any]) -> None:
    """Three pool addresses in a row answer: the DISCOVER gets no offer, and the fourth
    address, not pinged, is not held for the client either."""
    plan = dhcp_plan(dgxpod_raw, dhcp_range=["10.33.3.100", "10.33.3.110"])
    core = DhcpCore(plan.dhcp, LeaseTable(None), 67, probing=True)
    data = codec.encode(msg(STRANGER, codec.DISCOVER))
    out = core.handle(data, CLIENT, 1000.0)
    for probes in range(1, 4):
        assert out.probe is not None
        core.probed(out.probe, True, 1000.0)
        out = core.handle(data, CLIENT, 1000.0, probes=probes)
    assert out.probe is None and not out.replies and "answered a ping" in out.warning
    assert core.counters["ping_gave_up"] == 1
    fourth = IPv4Address("10.33.3.103")
    assert core.table.holder(fourth, 1000.0) is None
    assert core.table.free_for(fourth, "de:ad:be:ef:00:09", 1001.0)


def test_arch_mismatch_warned_once_per_node_per_window(core: DhcpCore) -> None:
    """Firmware that contradicts the inventory's arch: a warning line per node at most every
    ARCH_WARN_EVERY s (retransmissions are counted only), again once the window is over or
    the wall clock was stepped back."""
    from services.dhcp.policy import ARCH_WARN_EVERY

    def warned(now: float) -> bool:
        out = send(core, msg(WORKER0, codec.DISCOVER, options=arch(11)), now)
        assert out.replies
        return "nodes[" in out.warning and ".arch" in out.warning

    assert warned(1000.0)
    assert not warned(1001.0) and not warned(1000.0 + ARCH_WARN_EVERY - 1)
    assert warned(1000.0 + ARCH_WARN_EVERY)
    assert warned(500.0)  # stepped back
    assert core.counters["arch_mismatch"] == 5
