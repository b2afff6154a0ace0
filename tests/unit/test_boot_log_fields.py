"""Node-related lines of DHCP and TFTP carry `node`, `mac` and `ip` as fields of their own,
so `--log-format json` lets a log pipeline select one machine's lines (issue 17).

The services are built from the plan and fed datagrams directly: no socket is bound
(nothing is started), the lines are caught with the JSON formatter of `--log-format json`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, cast

import pytest

from appliance.events import EventBus
from appliance.inventory import parse_inventory
from appliance.logs import JsonFormatter
from appliance.plan import Plan, build_plan
from appliance.runtime import RuntimeState
from appliance.service import ServiceContext
from appliance.storequeue import DaemonStore
from services.dhcp import codec
from services.dhcp.server import DhcpService
from services.tftp.server import TftpService, _Listener
from tests.helpers import CONFIG
from tests.unit.dhcp_builders import CLIENT, MASTER0, SERVER, msg, send

MASTER0_IP = "10.33.3.50"


class _Capture(logging.Handler):
    """Each record as the JSON line `--log-format json` would write."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def plan(dgxpod_raw: dict[str, Any], tmp_path: Path) -> Plan:
    dgxpod_raw["state_dir"] = str(tmp_path / "state")
    dgxpod_raw["boot"]["tftp_root"] = str(tmp_path / "tftp")  # empty: every loader missing
    (tmp_path / "tftp").mkdir()
    return build_plan(parse_inventory(dgxpod_raw, "x.yaml", CONFIG))


@pytest.fixture
def ctx(plan: Plan) -> Iterator[ServiceContext]:
    store = DaemonStore.open(plan.state_dir)
    try:
        yield ServiceContext(
            bus=EventBus(),
            store=store,
            log=logging.getLogger("appliance.test-fields"),
            runtime=RuntimeState(store),
        )
    finally:
        store.close()


@pytest.fixture
def lines(ctx: ServiceContext) -> Iterator[list[dict[str, Any]]]:
    capture = _Capture()
    ctx.log.addHandler(capture)
    ctx.log.setLevel(logging.DEBUG)
    try:
        yield capture.lines
    finally:
        ctx.log.removeHandler(capture)
        ctx.log.setLevel(logging.NOTSET)


class _Transport:
    """What the DHCP shell sends through, kept (the two methods it calls)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def is_closing(self) -> bool:
        return False

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def _about(lines: list[dict[str, Any]], word: str) -> dict[str, Any]:
    found = [line for line in lines if word in line["msg"]]
    assert found, [line["msg"] for line in lines]
    return found[-1]


# --- the DHCP core says whom each outcome is about -----------------------------------------


def test_dhcp_outcomes_name_node_mac_and_ip(plan: Plan) -> None:
    from services.dhcp.leases import LeaseTable
    from services.dhcp.policy import DhcpCore

    core = DhcpCore(plan.dhcp, LeaseTable(None), 67)
    offer = send(core, msg(MASTER0, codec.DISCOVER))
    assert (offer.node, offer.mac, offer.ip) == ("master-0", MASTER0, IPv4Address(MASTER0_IP))
    assert offer.ip is not None
    requested = {codec.OPT_SERVER_ID: SERVER.packed, codec.OPT_REQUESTED_IP: offer.ip.packed}
    ack = send(core, msg(MASTER0, codec.REQUEST, options=requested), 1001.0)
    assert (ack.node, ack.mac, ack.ip) == ("master-0", MASTER0, IPv4Address(MASTER0_IP))
    wrong = {codec.OPT_REQUESTED_IP: IPv4Address("10.33.3.99").packed}
    nak = send(core, msg(MASTER0, codec.REQUEST, options=wrong), 1002.0)
    assert "NAK" in nak.log
    assert (nak.node, nak.mac, nak.ip) == ("master-0", MASTER0, IPv4Address("10.33.3.99"))
    bound = IPv4Address(MASTER0_IP)
    release = send(core, msg(MASTER0, codec.RELEASE, ciaddr=bound), 1003.0)
    assert "released" in release.log
    assert (release.node, release.mac, release.ip) == ("master-0", MASTER0, bound)


# --- ... and the shell's lines carry it ------------------------------------------------------


async def test_dhcp_lines_carry_node_fields_in_json(
    ctx: ServiceContext, plan: Plan, lines: list[dict[str, Any]]
) -> None:
    svc = DhcpService(ctx, plan)  # built from the plan: nothing started, nothing bound
    try:
        transport = _Transport()
        data = codec.encode(msg(MASTER0, codec.DISCOVER))
        svc.on_datagram(data, CLIENT, cast(asyncio.DatagramTransport, transport), False)
        assert transport.sent, "no OFFER"
        line = _about(lines, "OFFER")
        assert line["logger"] == "appliance.test-fields"
        assert (line["node"], line["mac"], line["ip"]) == ("master-0", MASTER0, MASTER0_IP)
    finally:
        await svc.stop()


async def test_dhcp_unknown_machine_line_carries_its_mac(
    ctx: ServiceContext, plan: Plan, lines: list[dict[str, Any]]
) -> None:
    svc = DhcpService(ctx, plan)
    try:
        stranger = "de:ad:be:ef:00:07"
        data = codec.encode(msg(stranger, codec.DISCOVER))
        svc.on_datagram(data, CLIENT, cast(asyncio.DatagramTransport, _Transport()), False)
        line = _about(lines, "is network-booting")
        assert line["mac"] == stranger and "node" not in line
    finally:
        await svc.stop()


# --- TFTP: a node's boot file refused --------------------------------------------------------


def test_tftp_boot_error_line_carries_node_fields(
    ctx: ServiceContext, plan: Plan, lines: list[dict[str, Any]]
) -> None:
    svc = TftpService(ctx, plan)  # built from the plan: nothing started, nothing bound
    rrq = b"\x00\x01undionly.kpxe\x00octet\x00"
    svc.on_request(rrq, (MASTER0_IP, 2070), _Listener(svc))
    line = _about(lines, "boot error")
    assert line["level"] == "warning"
    assert (line["node"], line["mac"], line["ip"]) == ("master-0", MASTER0, MASTER0_IP)


# --- a bug hit by every packet costs packets, not the journal ------------------------------


def _explode(*args: object, **kwargs: object) -> object:
    raise RuntimeError("bug in the core")


async def test_dhcp_error_per_packet_is_rate_limited(
    ctx: ServiceContext, plan: Plan, lines: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of packets that each hit a bug: every one is counted, few tracebacks are logged."""
    svc = DhcpService(ctx, plan)
    monkeypatch.setattr(svc.core, "handle", _explode)
    transport = cast(asyncio.DatagramTransport, _Transport())
    for _ in range(200):
        packet = codec.encode(msg(MASTER0, codec.DISCOVER))
        svc.on_datagram(packet, ("198.51.100.7", 68), transport, False)
    assert svc.counters["errors"] == 200
    errors = [line for line in lines if line["level"] == "error"]
    assert 1 <= len(errors) <= 2, [e["msg"] for e in errors]
    assert "exc" in errors[0] and "bug in the core" in errors[0]["exc"]


def test_tftp_error_per_request_is_rate_limited(
    ctx: ServiceContext, plan: Plan, lines: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = TftpService(ctx, plan)
    monkeypatch.setattr(svc, "on_request", _explode)
    listener = _Listener(svc)
    for i in range(200):
        listener.datagram_received(b"\x00\x01x\x00octet\x00", ("198.51.100.7", 1024 + i))
    assert svc.counters["errors"] == 200
    errors = [line for line in lines if line["level"] == "error"]
    assert 1 <= len(errors) <= 2, [e["msg"] for e in errors]


def test_tftp_refusals_from_a_flood_of_sources_are_rate_limited(
    ctx: ServiceContext, plan: Plan, lines: list[dict[str, Any]]
) -> None:
    """Spoofed requests for a file outside the root, each from a new address: every one is
    refused, the log does not get a warning per datagram."""
    svc = TftpService(ctx, plan)
    listener = _Listener(svc)
    for i in range(200):
        listener.datagram_received(
            b"\x00\x01../../etc/shadow\x00octet\x00", (f"198.51.100.{i % 250 + 1}", 2000 + i)
        )
    refused = [line for line in lines if line["msg"].startswith("refused")]
    assert 1 <= len(refused) <= 2, [r["msg"] for r in refused]
