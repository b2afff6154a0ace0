"""Property tests (hypothesis) of the DHCP codec and of the core's decisions.

Codec: encode/parse round trips, parse never fails but with DhcpParseError, the
maximum message size never pushes out the options that must be there. Core: random
and mutated datagrams never raise; random client conversations (many MACs, a tiny
pool, renewals, releases, declines, clock jumps, restarts that keep only what was
committed, as after kill -9) never give one address to two clients at once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any, Protocol, TypeVar

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from appliance.inventory import parse_inventory
from appliance.plan import DhcpPlan, build_plan
from services.dhcp import codec
from services.dhcp.codec import DhcpMessage, DhcpParseError
from services.dhcp.leases import DECLINE_QUARANTINE, Binding, LeaseTable
from services.dhcp.policy import MAX_PROBES, DhcpCore, Outcome
from tests.helpers import CONFIG

T = TypeVar("T")


class Draw(Protocol):
    """What a step draws with: `DataObject.draw`. (`st.DrawFn` is for @composite functions;
    it also declares a `__signature__` that a bound method lacks.)"""

    def __call__(self, strategy: st.SearchStrategy[T], label: Any = None) -> T: ...


FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

_RAW = yaml.safe_load((CONFIG / "dgxpod.yaml").read_text())


def _plan(**network: Any) -> DhcpPlan:
    raw = copy.deepcopy(_RAW)
    raw["network"].update(network)
    return build_plan(parse_inventory(raw, "dgxpod.yaml", CONFIG)).dhcp


SERVER = IPv4Address("10.33.3.18")
POOL = [IPv4Address(f"10.33.3.{i}") for i in (100, 101, 102)]
PLAN = _plan(dhcp_range=[str(POOL[0]), str(POOL[-1])], ntp_servers=["10.33.3.1"])
NO_POOL = _plan()
PROXY = _plan(dhcp_mode="proxy")
RESERVED = {r.mac: r.ip for r in PLAN.reservations}
NODE_MACS = ["52:54:00:00:03:50", "02:00:00:00:03:44"]  # master-0 (bios), worker-0 (uefi)
STRANGERS = [f"de:ad:be:ef:00:{i:02x}" for i in range(4)]  # more clients than addresses
MACS = NODE_MACS + STRANGERS
CANDIDATES = [
    *POOL,
    *RESERVED.values(),
    SERVER,
    IPv4Address("10.33.3.1"),  # the gateway
    IPv4Address("10.33.3.200"),  # in the subnet, outside the pool
    IPv4Address("192.0.2.9"),  # another network
]

# --- strategies -------------------------------------------------------------------------

ipv4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
option_codes = st.integers(1, 254).filter(lambda c: c != codec.OPT_OVERLOAD)


def _no_trailing_nul(limit: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=limit).filter(lambda b: not b.endswith(b"\0"))


messages = st.builds(
    DhcpMessage,
    op=st.sampled_from([codec.BOOTREQUEST, codec.BOOTREPLY]),
    htype=st.integers(0, 255),
    hlen=st.integers(0, 16),
    hops=st.integers(0, 255),
    xid=st.integers(0, 2**32 - 1),
    secs=st.integers(0, 2**16 - 1),
    flags=st.integers(0, 2**16 - 1),
    ciaddr=ipv4,
    yiaddr=ipv4,
    siaddr=ipv4,
    giaddr=ipv4,
    chaddr=st.binary(min_size=16, max_size=16),
    sname=_no_trailing_nul(63),
    file=_no_trailing_nul(127),
    options=st.dictionaries(option_codes, st.binary(max_size=600), max_size=12),
)


def _request_options() -> st.SearchStrategy[dict[int, bytes]]:
    """Options a client might send, PXE and relay ones included, in any order."""
    value = {
        codec.OPT_MESSAGE_TYPE: st.integers(0, 10).map(lambda t: bytes((t,))),
        codec.OPT_REQUESTED_IP: st.sampled_from(CANDIDATES).map(lambda a: a.packed),
        codec.OPT_SERVER_ID: st.sampled_from([SERVER, IPv4Address("10.33.3.2")]).map(
            lambda a: a.packed
        ),
        codec.OPT_PARAMS: st.binary(max_size=40),
        codec.OPT_MAX_SIZE: st.integers(0, 2000).map(codec.u16),
        codec.OPT_VENDOR_CLASS: st.sampled_from([b"PXEClient:Arch:00007", b"HTTPClient", b"x"]),
        codec.OPT_CLIENT_ARCH: st.sampled_from([0, 6, 7, 9, 11, 16, 19, 255]).map(codec.u16),
        codec.OPT_USER_CLASS: st.sampled_from([b"iPXE", b"\x04iPXE", b"\x00", b""]),
        codec.OPT_RELAY_AGENT: st.binary(max_size=255),
        codec.OPT_UUID: st.binary(max_size=17),
        codec.OPT_IPXE: st.binary(max_size=8),
        codec.OPT_HOSTNAME: st.binary(max_size=64),
    }
    return st.lists(st.sampled_from(sorted(value)), unique=True, max_size=8).flatmap(
        lambda codes: st.fixed_dictionaries({c: value[c] for c in codes})
    )


requests = st.builds(
    DhcpMessage,
    op=st.just(codec.BOOTREQUEST),
    xid=st.integers(0, 2**32 - 1),
    flags=st.sampled_from([0, codec.BROADCAST_FLAG]),
    ciaddr=st.sampled_from([IPv4Address(0), *CANDIDATES]),
    giaddr=st.sampled_from([IPv4Address(0), IPv4Address("10.33.3.1"), IPv4Address("192.0.2.1")]),
    chaddr=st.sampled_from(MACS).map(lambda m: bytes.fromhex(m.replace(":", ""))),
    options=_request_options(),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request's bytes with some bytes changed, cut, or inserted."""
    data = bytearray(codec.encode(draw(requests), 1500))
    for _ in range(draw(st.integers(1, 6))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        at = draw(st.integers(0, len(data) - 1))
        if how == "flip":
            data[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:  # an option length byte, somewhere past the cookie
            if len(data) > 241:
                data[draw(st.integers(241, len(data) - 1))] = draw(st.integers(0, 255))
        if not data:
            break
    return bytes(data)


# --- codec -------------------------------------------------------------------------------


@FAST
@given(messages)
def test_encode_parse_round_trip(m: DhcpMessage) -> None:
    parsed = codec.parse(codec.encode(m, 65535))
    assert parsed == m
    assert list(parsed.options) == list(m.options)  # wire order kept


@FAST
@given(st.one_of(st.binary(max_size=700), mutated()))
def test_parse_fails_only_with_parse_error(data: bytes) -> None:
    try:
        parsed = codec.parse(data)
    except DhcpParseError:
        return
    # Whatever parses re-encodes to something that parses to the same options.
    again = codec.parse(codec.encode(parsed, 65535))
    assert again.options == parsed.options and again.chaddr == parsed.chaddr


@FAST
@given(
    st.dictionaries(option_codes, st.binary(max_size=300), max_size=10),
    st.sets(option_codes, max_size=4),
    st.integers(0, 1500),
)
def test_max_size_keeps_the_kept_options(
    options: dict[int, bytes], keep: set[int], max_size: int
) -> None:
    m = DhcpMessage(options=options)
    data = codec.encode(m, max_size, keep)
    limit = max(576, max_size) - 28
    assert len(data) <= max(limit, 300)
    parsed = codec.parse(data)
    assert list(parsed.options) == [c for c in options if c in parsed.options]  # order kept
    size = codec.MIN_SIZE + 1 + sum(len(v) + 2 * (len(v) // 255 + 1) for v in options.values())
    if size <= limit:
        assert parsed.options == options  # room for everything: nothing left out
    kept = sum(len(options[c]) + 2 * (len(options[c]) // 255 + 1) for c in keep if c in options)
    if codec.MIN_SIZE + 1 + kept <= limit:
        assert all(parsed.options[c] == options[c] for c in keep if c in options)


# --- the core on hostile input -----------------------------------------------------------


def _check_replies(request: bytes, out: Outcome) -> None:
    try:
        asked = codec.parse(request)
    except DhcpParseError:
        assert not out.replies
        return
    size = asked.options.get(codec.OPT_MAX_SIZE)
    limit = max(576, int.from_bytes(size, "big") if size and len(size) == 2 else 576) - 28
    for sent in out.replies:
        reply = codec.parse(sent.data)
        assert reply.op == codec.BOOTREPLY and reply.xid == asked.xid
        assert reply.chaddr == asked.chaddr and len(sent.data) <= max(limit, 300)
        assert reply.options[codec.OPT_SERVER_ID] == SERVER.packed  # never dropped
        relay = asked.options.get(codec.OPT_RELAY_AGENT)
        if relay is not None:
            assert list(reply.options)[-1] == codec.OPT_RELAY_AGENT
            assert reply.options[codec.OPT_RELAY_AGENT] == relay
        assert 0 < sent.port < 65536 and IPv4Address(sent.host)


@FAST
@given(
    st.one_of(st.binary(max_size=700), mutated(), requests.map(codec.encode)),
    st.sampled_from([PLAN, NO_POOL, PROXY]),
    st.booleans(),
    st.sampled_from([("0.0.0.0", 68), ("10.33.3.1", 67), ("127.0.0.1", 40000)]),
)
def test_core_never_raises(
    data: bytes, plan: DhcpPlan, pxe_port: bool, src: tuple[str, int]
) -> None:
    core = DhcpCore(plan, LeaseTable(None), 67)
    out = core.handle(data, src, 1000.0, pxe_port=pxe_port)
    _check_replies(data, out)


# --- conversations: one address, one client ---------------------------------------------


class World:
    """The core, a store that keeps only what was committed, and what clients were told."""

    def __init__(self, probing: bool = False) -> None:
        self.probing = probing
        self.store: dict[str, Binding] = {}
        self.core = DhcpCore(PLAN, LeaseTable(None), 67, probing=probing)
        self.now = 1000.0
        self.promises: dict[str, tuple[IPv4Address, float]] = {}  # MAC -> address, until
        self.offered: dict[str, IPv4Address] = {}
        self.quarantined: dict[IPv4Address, float] = {}  # committed DECLINEs: address, until
        self.squatted: dict[IPv4Address, float] = {}  # answered a ping: address, until
        self.draw: Draw | None = None  # decides whether a pinged address answers
        self.xid = 0

    def restart(self) -> None:
        """kill -9 and start again: offers are lost, committed leases are loaded."""
        table = LeaseTable(None)
        table.load(self.store.values())
        self.core = DhcpCore(PLAN, table, 67, probing=self.probing)
        self.squatted.clear()  # kept in memory only: after a restart it is pinged again
        # The store keeps one row per MAC: a quarantine outlives a restart only while
        # the declining client has had no lease since (its row still says declined).
        declined = {b.ip for b in self.store.values() if b.state == "declined"}
        self.quarantined = {ip: t for ip, t in self.quarantined.items() if ip in declined}

    def send(self, mac: str, mtype: int, **fields: Any) -> Outcome:
        self.xid += 1
        options = {codec.OPT_MESSAGE_TYPE: bytes((mtype,)), **fields.pop("options", {})}
        m = DhcpMessage(
            op=codec.BOOTREQUEST,
            xid=self.xid,
            chaddr=bytes.fromhex(mac.replace(":", "")),
            options=options,
            **fields,
        )
        data = codec.encode(m)
        src = ("0.0.0.0", 68) if m.ciaddr == IPv4Address(0) else (str(m.ciaddr), 68)
        if m.giaddr != IPv4Address(0):
            src = (str(m.giaddr), 67)
        out = self.core.handle(data, src, self.now)
        out = self.ping_checks(mac, data, src, out)
        _check_replies(data, out)
        self.observe(mac, mtype, m, out)
        return out

    def ping_checks(self, mac: str, data: bytes, src: tuple[str, int], out: Outcome) -> Outcome:
        """What the service does with Outcome.probe: ping (here: the drawn answer), tell
        the core, handle the datagram again; at most MAX_PROBES pings per datagram."""
        for probes in range(1, MAX_PROBES + 2):
            if out.probe is None:
                return out
            assert probes <= MAX_PROBES, "pinged past the cap"
            assert self.probing and not out.replies and not out.commit
            assert out.probe in POOL and mac not in RESERVED
            assert self.squatted.get(out.probe, 0.0) <= self.now, "pinged while quarantined"
            answered = self.draw is not None and self.draw(st.booleans(), label="answers")
            self.core.probed(out.probe, answered, self.now)
            event("ping answered" if answered else "ping silent")  # --hypothesis-show-statistics
            if answered:
                self.squatted[out.probe] = self.now + DECLINE_QUARANTINE
            out = self.core.handle(data, src, self.now, probes=probes)
        raise AssertionError("unreachable")

    def others_holding(self, ip: IPv4Address, mac: str) -> list[str]:
        return [
            other
            for other, (held, until) in self.promises.items()
            if other != mac and held == ip and until > self.now
        ]

    def observe(self, mac: str, mtype: int, m: DhcpMessage, out: Outcome) -> None:
        server_id = m.ip_option(codec.OPT_SERVER_ID)
        if mtype == codec.DISCOVER or (mtype == codec.REQUEST and server_id not in (None, SERVER)):
            self.promises.pop(mac, None)  # INIT or SELECTING: the client holds nothing
        for b in out.commit:
            previous = self.store.get(b.mac)
            for other in [o for o, s in self.store.items() if s.ip == b.ip and o != b.mac]:
                del self.store[other]  # save_leases: the table's word wins
            self.store[b.mac] = b
            if b.state == "declined":
                self.quarantined[b.ip] = b.expires
            if b.state in ("released", "declined"):
                held = self.promises.get(b.mac)
                if held is not None and held[0] == b.ip:
                    del self.promises[b.mac]
            assert previous is None or previous.mac == b.mac
        for sent in out.replies:
            reply = codec.parse(sent.data)
            kind = reply.message_type
            if kind == codec.NAK:
                self.promises.pop(mac, None)  # the client must stop using its address
                continue
            if kind not in (codec.OFFER, codec.ACK) or reply.yiaddr == IPv4Address(0):
                continue
            ip = reply.yiaddr
            holders = self.others_holding(ip, mac)
            assert not holders, f"{ip} given to {mac} while {holders} hold it"
            if mac in RESERVED:
                assert ip == RESERVED[mac]
            else:
                assert ip in POOL
                # A declined address stays out of the pool for its quarantine, restarts too.
                assert self.quarantined.get(ip, 0.0) <= self.now, f"{ip} is quarantined"
                # One that answered a ping stays out while its quarantine lasts.
                assert self.squatted.get(ip, 0.0) <= self.now, f"{ip} answered a ping"
            if kind == codec.OFFER:
                self.offered[mac] = ip
            else:
                # An ACK leaves only with its lease in the same outcome's commit.
                assert any(b.mac == mac and b.ip == ip and b.state == "bound" for b in out.commit)
                self.promises[mac] = (ip, self.now + PLAN.lease_time)

    def check_table(self) -> None:
        table = self.core.table
        for mac, b in table.by_mac.items():
            assert b.mac == mac and table.by_ip.get(b.ip) is b
        for ip, b in table.by_ip.items():
            assert b.ip == ip and table.by_mac.get(b.mac) is b
        active = [b.ip for b in table.by_mac.values() if b.active(self.now)]
        assert len(active) == len(set(active))
        for mac, (ip, until) in self.promises.items():
            if until > self.now:  # what a client was promised, the table still knows
                assert table.holder(ip, self.now) in (mac, None)


Step = Callable[[World, Draw], None]


def _discover(w: World, draw: Draw) -> None:
    w.send(draw(st.sampled_from(MACS)), codec.DISCOVER)


def _select(w: World, draw: Draw) -> None:
    mac = draw(st.sampled_from(MACS))
    offered = w.offered.get(mac)
    ip = draw(st.sampled_from(CANDIDATES)) if offered is None or draw(st.booleans()) else offered
    server = draw(st.sampled_from([SERVER, SERVER, IPv4Address("10.33.3.2")]))
    options = {codec.OPT_SERVER_ID: server.packed, codec.OPT_REQUESTED_IP: ip.packed}
    w.send(mac, codec.REQUEST, options=options)


def _dora(w: World, draw: Draw) -> None:
    mac = draw(st.sampled_from(MACS))
    relay = draw(st.sampled_from([IPv4Address(0), IPv4Address("10.33.3.1")]))
    options = {codec.OPT_RELAY_AGENT: b"\x01\x02ab"} if relay != IPv4Address(0) else {}
    out = w.send(mac, codec.DISCOVER, giaddr=relay, options=options)
    if out.replies:
        offer = codec.parse(out.replies[0].data)
        options = {
            **options,
            codec.OPT_SERVER_ID: SERVER.packed,
            codec.OPT_REQUESTED_IP: offer.yiaddr.packed,
        }
        w.send(mac, codec.REQUEST, giaddr=relay, options=options)


def _init_reboot(w: World, draw: Draw) -> None:
    ip = draw(st.sampled_from(CANDIDATES))
    w.send(draw(st.sampled_from(MACS)), codec.REQUEST, options={codec.OPT_REQUESTED_IP: ip.packed})


def _renew(w: World, draw: Draw) -> None:
    mac = draw(st.sampled_from(MACS))
    held = w.promises.get(mac)
    ip = held[0] if held is not None and draw(st.booleans()) else draw(st.sampled_from(CANDIDATES))
    w.send(mac, codec.REQUEST, ciaddr=ip)


def _release(w: World, draw: Draw) -> None:
    mac = draw(st.sampled_from(MACS))
    held = w.promises.get(mac)
    ip = held[0] if held is not None else draw(st.sampled_from(CANDIDATES))
    w.send(mac, codec.RELEASE, ciaddr=ip, options={codec.OPT_SERVER_ID: SERVER.packed})


def _decline(w: World, draw: Draw) -> None:
    mac = draw(st.sampled_from(MACS))
    held = w.promises.get(mac)
    ip = held[0] if held is not None and draw(st.booleans()) else draw(st.sampled_from(CANDIDATES))
    options = {codec.OPT_REQUESTED_IP: ip.packed, codec.OPT_SERVER_ID: SERVER.packed}
    w.send(mac, codec.DECLINE, options=options)


def _inform(w: World, draw: Draw) -> None:
    w.send(draw(st.sampled_from(MACS)), codec.INFORM, ciaddr=draw(st.sampled_from(CANDIDATES)))


def _time(w: World, draw: Draw) -> None:
    w.now += draw(st.sampled_from([0.5, 30, 61, 600, 1801, 3599, 3601, 7200]))
    if draw(st.booleans()):
        w.core.table.expire(w.now)  # the sweeper


def _restart(w: World, draw: Draw) -> None:
    w.restart()


STEPS: list[Step] = [
    _discover, _select, _dora, _dora, _init_reboot, _renew, _release, _decline, _inform,
    _time, _time, _restart,
]  # fmt: skip


@settings(max_examples=200, deadline=None, database=None)
@given(st.data())
def test_conversations_never_share_an_address(data: st.DataObject) -> None:
    w = World()
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        step = data.draw(st.sampled_from(STEPS))
        step(w, data.draw)
        w.check_table()


@settings(max_examples=200, deadline=None, database=None)
@given(st.data())
def test_conversations_with_ping_checks(data: st.DataObject) -> None:
    """The same, with every pool address pinged before its first offer and the drawn
    answer deciding whether some machine squats on it: never pinged or offered while
    it is kept out, never a reservation pinged, never one address for two clients."""
    w = World(probing=True)
    w.draw = data.draw
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        step = data.draw(st.sampled_from(STEPS))
        step(w, data.draw)
        w.check_table()


# --- what the properties above found, kept as plain examples ------------------------------


def test_a_long_requested_option_does_not_push_out_the_boot_file() -> None:
    plan = _plan(ntp_servers=[f"10.33.3.{i}" for i in range(100, 160)])  # 242 bytes
    core = DhcpCore(plan, LeaseTable(None), 67)
    w = World()
    w.core = core
    options = {
        codec.OPT_PARAMS: bytes([codec.OPT_NTP, 1, 3, 6]),  # the long one first
        codec.OPT_CLIENT_ARCH: codec.u16(16),
        codec.OPT_VENDOR_CLASS: b"HTTPClient:Arch:00016",
        codec.OPT_RELAY_AGENT: b"\x01\x04port",
    }
    out = w.send(NODE_MACS[1], codec.DISCOVER, giaddr=IPv4Address("10.33.3.1"), options=options)
    offer = codec.parse(out.replies[0].data)
    assert offer.options[codec.OPT_BOOTFILE] == b"http://10.33.3.18:8080/boot/ipxe.efi"
    assert offer.options[codec.OPT_VENDOR_CLASS] == b"HTTPClient"
    assert list(offer.options)[-1] == codec.OPT_RELAY_AGENT
    assert codec.OPT_NTP not in offer.options  # what did not fit in 576 bytes


def test_a_stored_decline_keeps_its_quarantine_after_a_restart() -> None:
    w = World()
    stranger = STRANGERS[0]
    offer = codec.parse(w.send(stranger, codec.DISCOVER).replies[0].data)
    declined = {codec.OPT_REQUESTED_IP: offer.yiaddr.packed, codec.OPT_SERVER_ID: SERVER.packed}
    assert w.send(stranger, codec.DECLINE, options=declined).commit[0].state == "declined"
    w.restart()
    given = [
        codec.parse(w.send(mac, codec.DISCOVER).replies[0].data).yiaddr for mac in STRANGERS[1:3]
    ]
    assert offer.yiaddr not in given
    assert not w.send(STRANGERS[3], codec.DISCOVER).replies  # the rest of the pool is quarantined
