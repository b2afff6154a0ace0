"""What the DHCP core unit tests share: the dgxpod plan, client messages, and a whole
DISCOVER/OFFER/REQUEST/ACK, all without sockets."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

from appliance.inventory import parse_inventory
from appliance.plan import Plan, build_plan
from services.dhcp import codec
from services.dhcp.codec import DhcpMessage
from services.dhcp.leases import LeaseTable
from services.dhcp.policy import DhcpCore, Outcome
from tests.helpers import CONFIG

SERVER = IPv4Address("10.33.3.18")
MASTER0 = "52:54:00:00:03:50"
STRANGER = "de:ad:be:ef:00:01"
CLIENT = ("0.0.0.0", 68)


def dhcp_plan(raw: dict[str, Any], **network: Any) -> Plan:
    """The plan of this inventory with these `network` keys changed."""
    raw["network"].update(network)
    return build_plan(parse_inventory(raw, "x.yaml", CONFIG))


def dhcp_core(raw: dict[str, Any], **network: Any) -> DhcpCore:
    """A core over an in-memory lease table, for the plan of dhcp_plan."""
    return DhcpCore(dhcp_plan(raw, **network).dhcp, LeaseTable(None), 67)


def msg(mac: str, mtype: int, **fields: Any) -> DhcpMessage:
    """A client's message of this type; `options` are added, other fields as given."""
    options: dict[int, bytes] = {codec.OPT_MESSAGE_TYPE: bytes((mtype,))}
    options.update(fields.pop("options", {}))
    return DhcpMessage(
        op=fields.pop("op", codec.BOOTREQUEST),
        xid=fields.pop("xid", 0x1234),
        chaddr=bytes.fromhex(mac.replace(":", "")),
        options=options,
        **fields,
    )


def send(
    core: DhcpCore, m: DhcpMessage, now: float = 1000.0, src: tuple[str, int] = CLIENT
) -> Outcome:
    return core.handle(codec.encode(m), src, now)


def reply(out: Outcome) -> DhcpMessage:
    assert len(out.replies) == 1, out.log
    return codec.parse(out.replies[0].data)


def dora(
    core: DhcpCore, mac: str, now: float = 1000.0, opts: dict[int, bytes] | None = None
) -> DhcpMessage:
    """DISCOVER then REQUEST of the offered address (both with `opts`); the ACK."""
    opts = opts or {}
    offer = reply(send(core, msg(mac, codec.DISCOVER, options=opts), now))
    request = msg(
        mac,
        codec.REQUEST,
        options={
            codec.OPT_SERVER_ID: SERVER.packed,
            codec.OPT_REQUESTED_IP: offer.yiaddr.packed,
            **opts,
        },
    )
    return reply(send(core, request, now + 1))
