"""The DHCP server's decisions (sans-IO): a message in, replies and lease changes out.

RFC 2131 states: DISCOVER -> OFFER; REQUEST while selecting (server id present),
init-reboot (requested address, no server id) and renewing/rebinding (ciaddr)
-> ACK or NAK; DECLINE quarantines the address; RELEASE frees it; INFORM gets
configuration only. PXE clients are told their boot loader by architecture
(option 93), iPXE clients the HTTP script. In proxy mode (proxyDHCP) no address
is ever given: PXE clients get boot information only.

Time is an argument; nothing here touches a socket, a clock or the disk.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from appliance.plan import DhcpPlan, DhcpReservation
from appliance.ratelog import RateGate
from services.dhcp import codec
from services.dhcp.codec import (
    ACK,
    BOOTREPLY,
    BOOTREQUEST,
    DECLINE,
    DISCOVER,
    INFORM,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    ZERO,
    DhcpMessage,
    DhcpParseError,
)
from services.dhcp.leases import DECLINE_QUARANTINE, Binding, LeaseTable

BROADCAST = "255.255.255.255"
MAX_PROBES = 3  # pool addresses pinged for one DISCOVER; all answered: no offer this time
MAX_HOPS = 16  # RFC 1542 4.1.1: a request relayed more often than this is in a loop
# NAKs (and INFORM answers) answer whatever a client claims, so garbage could make us a
# flood source: per sender (its address; its MAC without one or behind a relay; for
# INFORM, per destination), a burst then a steady rate; the oldest of at most
# NAK_SOURCES senders is forgotten first.
NAK_BURST, NAK_RATE, NAK_SOURCES = 10.0, 10.0, 1024
# Clients without an address (or behind one relay), keyed by MAC: all of them together
# (a flood of made-up MACs) have this much.
NAK_ANY_BURST, NAK_ANY_RATE, NAK_ANY = 25.0, 25.0, "0.0.0.0"
HOSTNAME_MAX = 253  # a DNS name's longest text form
_PRINTABLE = bytes(b if 0x20 <= b < 0x7F else ord("?") for b in range(256))
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")

# Option 93 (RFC 4578 and the IANA registry) -> which loader
ARCH_NAMES = {
    0: "bios", 6: "uefi-ia32", 7: "uefi-x64", 9: "uefi-x64", 10: "uefi-arm32",
    11: "uefi-arm64", 15: "uefi-ia32-http", 16: "uefi-x64-http", 19: "uefi-arm64-http",
}  # fmt: skip
HTTP_ARCHS = {15, 16, 19}
ARM64_ARCHS = {11, 19}
X64_ARCHS = {7, 9, 16}
X86_ARCHS = {0, 6, 7, 9, 15, 16}  # any x86 firmware: an aarch64 node never sends these
ARCH_WARN_EVERY = 300.0  # s: one warning line per node, not one per retransmission

# What every reply of a kind carries, in wire order; the rest only when asked (option 55).
ALWAYS = (
    codec.OPT_SUBNET_MASK, codec.OPT_ROUTER, codec.OPT_DNS, codec.OPT_HOSTNAME,
    codec.OPT_DOMAIN,
)  # fmt: skip
PXE_DISCOVERY_CONTROL = b"\x06\x01\x08\xff"  # use the boot file in this offer, no menu
# Never left out for a client's maximum message size (option 57) while others can be:
# the lease, the basic configuration, the boot file, and the relay's option 82.
ESSENTIAL = frozenset(
    (
        codec.OPT_MESSAGE_TYPE, codec.OPT_SERVER_ID, codec.OPT_LEASE_TIME, codec.OPT_T1,
        codec.OPT_T2, codec.OPT_MESSAGE, *ALWAYS, codec.OPT_VENDOR_CLASS,
        codec.OPT_VENDOR_SPECIFIC, codec.OPT_TFTP_SERVER, codec.OPT_BOOTFILE,
        codec.OPT_UUID, codec.OPT_RELAY_AGENT,
    )
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outgoing:
    data: bytes
    host: str
    port: int
    # A client without an address that did not ask for broadcast (RFC 2131 4.1): `host`
    # is its new address, reached at this hardware address. The kernel cannot ARP for
    # it (the client does not answer yet), so the shell puts the pair in the ARP cache
    # first, as dnsmasq and ISC dhcpd do; where it may not, it broadcasts instead.
    hwaddr: str | None = None


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What a client told about itself: for logs, events and the unknown-machines list."""

    mac: str
    vendor_class: str
    arch: int | None
    user_class: str
    hostname: str

    def describe(self) -> str:
        arch = ARCH_NAMES.get(self.arch, str(self.arch)) if self.arch is not None else "-"
        return f"arch={arch} vendor={self.vendor_class or '-'} user-class={self.user_class or '-'}"


@dataclass
class Outcome:
    replies: list[Outgoing] = field(default_factory=list)
    commit: list[Binding] = field(default_factory=list)  # persist before the replies leave
    events: list[tuple[str, str, str]] = field(default_factory=list)  # node, stage, detail
    unknown: ClientInfo | None = None
    log: str = ""
    # Ping this pool address first (nothing is sent now): then `DhcpCore.probed` with
    # the result, and the same datagram handled again.
    probe: IPv4Address | None = None
    warning: str = ""  # for the operator's log (`log` is the debug line)
    # Whom the lines are about, as structured log fields (node "" for a stranger): the
    # shell passes them with `extra=` so `--log-format json` can select one machine.
    node: str = ""
    mac: str = ""
    ip: IPv4Address | None = None


@dataclass(frozen=True, slots=True)
class BootChoice:
    file: str  # a TFTP file name or an http URL
    http: bool
    detail: str
    # The client's option 93 contradicts its node's `arch` (the kernel it gets is for
    # the other architecture): the operator's line naming the key, else "".
    mismatch: str = ""


class DhcpCore:
    def __init__(
        self,
        plan: DhcpPlan,
        table: LeaseTable,
        server_port: int,
        counters: Counter[str] | None = None,
        probing: bool = False,
    ) -> None:
        self.plan = plan
        self.table = table
        # Ping pool addresses before their first offer (the shell has an ICMP socket).
        self.probing = probing and plan.ping_wait > 0
        self.server_port = server_port
        self.client_port = server_port + 1  # 67 -> 68; an alternate port pair in tests
        self.counters: Counter[str] = counters if counters is not None else Counter()
        # Senders we never answer: ourselves (a reply would come back to us). On a
        # loopback subnet (tests, the embedded default) clients share our addresses.
        self.own_addresses: frozenset[IPv4Address] = (
            frozenset() if plan.subnet.is_loopback else frozenset({plan.server_id})
        )
        self._own_text = frozenset(str(a) for a in self.own_addresses)
        self._broadcast_text = frozenset({BROADCAST, str(plan.subnet.broadcast_address)})
        self.nak_limit: OrderedDict[str, tuple[float, float]] = OrderedDict()
        # Apart, so that no flood of senders evicts (and refills) the overall bucket.
        self.nak_any: OrderedDict[str, tuple[float, float]] = OrderedDict()
        # A line per node at most every ARCH_WARN_EVERY s; keys bounded by the inventory.
        self.arch_warned = RateGate(ARCH_WARN_EVERY)
        reserved = {r.ip for r in plan.reservations} | {plan.server_id}
        if plan.router is not None:
            reserved.add(plan.router)
        table.set_pool(plan.pool, reserved)
        # The options every client may get, encoded once per plan, not per packet.
        self.config_options: dict[int, bytes] = {
            codec.OPT_SUBNET_MASK: plan.subnet.netmask.packed,
            codec.OPT_DNS: codec.ips(*plan.dns_servers),
            codec.OPT_DOMAIN: plan.domain.encode(),
            codec.OPT_BROADCAST: plan.subnet.broadcast_address.packed,
            codec.OPT_DOMAIN_SEARCH: codec.domain_search(plan.domain),
        }
        if plan.router is not None:
            self.config_options[codec.OPT_ROUTER] = plan.router.packed
        if plan.ntp_servers:
            self.config_options[codec.OPT_NTP] = codec.ips(*plan.ntp_servers)

    # --- entry point ------------------------------------------------------------------

    def handle(
        self,
        data: bytes,
        src: tuple[str, int],
        now: float,
        *,
        pxe_port: bool = False,
        probes: int = 0,
    ) -> Outcome:
        """Everything to do about one datagram from `src`; never raises on bad input.
        `probes`: how many pings this datagram has waited for already (handled again
        after each; counted once)."""
        counters = self.counters if not probes else Counter[str]()
        counters["received"] += 1
        try:
            msg = codec.parse(data)
        except DhcpParseError as exc:
            counters["malformed"] += 1
            return Outcome(log=f"malformed from {src[0]}: {exc}")
        mtype = msg.message_type
        if msg.op != BOOTREQUEST or mtype is None or msg.htype != 1 or msg.hlen != 6:
            counters["ignored"] += 1
            return Outcome(log=f"ignored from {src[0]}: not an Ethernet DHCP request")
        if msg.giaddr != ZERO and msg.giaddr not in self.plan.subnet:
            counters["foreign_relay"] += 1
            return Outcome(log=f"relay {msg.giaddr} is outside {self.plan.subnet}: ignored")
        looped = self._reflection(msg, src)
        if looped:
            counters["reflection"] += 1
            return Outcome(log=f"{msg.mac} from {src[0]}:{src[1]}: {looped}: ignored", mac=msg.mac)
        counters[codec.MESSAGE_NAMES.get(mtype, f"type{mtype}").lower()] += 1
        if self.plan.mode == "proxy":
            out = self._proxy(msg, src, pxe_port, now)
            out.mac = msg.mac
            return out
        handler = {
            DISCOVER: self._discover,
            REQUEST: self._request,
            DECLINE: self._decline,
            RELEASE: self._release,
            INFORM: self._inform,
        }.get(mtype)
        if handler is None:
            counters["ignored"] += 1
            return Outcome(log=f"{msg.mac}: message type {mtype} is not for a server", mac=msg.mac)
        out = self._discover(msg, src, now, probes) if mtype == DISCOVER else handler(msg, src, now)
        out.mac = msg.mac
        return out

    def _reflection(self, msg: DhcpMessage, src: tuple[str, int]) -> str:
        """Why answering this request could bounce off ourselves, another server or a
        bystander ("" when it cannot). A reply goes to giaddr at the server port, to
        ciaddr or the broadcast address at the client port, or back to the sender."""
        # Text, not IPv4Address: this runs for every datagram of a flood.
        host, port = src
        own = self.own_addresses
        if host in self._own_text:
            return "sent from our own address"
        first = host.partition(".")[0]
        if host in self._broadcast_text or (first.isdigit() and 224 <= int(first) <= 239):
            return "a broadcast or multicast sender address"
        if msg.hops > MAX_HOPS:
            return f"relayed {msg.hops} times (a relay loop)"
        if msg.giaddr != ZERO:
            return "the relay address is ours" if msg.giaddr in own else ""
        if port == self.server_port:
            return "from a server port without a relay address (another server or a loop)"
        if host != "0.0.0.0" and port not in (self.client_port, 68) and port < 1024:
            # Clients send from port 68; a reply to another well-known port (echo, DNS,
            # TFTP...) is what a spoofed request wants from us.
            return f"from service port {port}"
        if msg.ciaddr in own:
            return "its client address is ours"
        return ""

    def _nak_allowed(self, msg: DhcpMessage, src: tuple[str, int], now: float) -> bool:
        """A token bucket per sender, bounded in senders. Clients without an address
        (0.0.0.0: every rebooting client) and the clients behind one relay are told
        apart by their MAC, or one host sending garbage would silence the NAKs to all of
        them (which then wait out their timeout); together they have NAK_ANY_* at most."""
        relayed = msg.giaddr != ZERO
        if not relayed and src[0] != "0.0.0.0":
            return self._allowed(src[0], now)
        group = str(msg.giaddr) if relayed else NAK_ANY
        key = f"{group} {msg.mac}"
        if not self._allowed(key, now, peek=True):
            return False
        if not self._allowed(group, now, NAK_ANY_BURST, NAK_ANY_RATE, table=self.nak_any):
            return False
        return self._allowed(key, now)

    def _allowed(
        self,
        key: str,
        now: float,
        burst: float = NAK_BURST,
        rate: float = NAK_RATE,
        peek: bool = False,
        table: OrderedDict[str, tuple[float, float]] | None = None,
    ) -> bool:
        """Take a token from `key`'s bucket (`peek`: only say whether one is there)."""
        buckets = self.nak_limit if table is None else table
        tokens, then = buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - then) * rate)
        allowed = tokens >= 1.0
        buckets[key] = (tokens - 1.0 if allowed and not peek else tokens, now)
        while len(buckets) > NAK_SOURCES:
            buckets.popitem(last=False)
        return allowed

    # --- server mode ------------------------------------------------------------------

    def _discover(
        self, msg: DhcpMessage, src: tuple[str, int], now: float, probes: int = 0
    ) -> Outcome:
        mac = msg.mac
        node = self.plan.by_mac.get(mac)
        if node is not None:
            holder = self.table.holder(node.ip, now)
            if holder not in (None, mac):
                self.counters["conflicts"] += 1
                return Outcome(
                    log=f"{mac} ({node.node}): {node.ip} is still leased to {holder}",
                    node=node.node,
                    ip=node.ip,
                )
            ip = node.ip
        elif self.plan.pool is not None:
            allocated = self.table.allocate(mac, msg.ip_option(codec.OPT_REQUESTED_IP), now)
            if allocated is None:
                self.counters["pool_exhausted"] += 1
                return Outcome(log=f"{mac}: no free address in the pool")
            ip = allocated
            if self.probing and self.table.needs_probe(mac, ip, now):
                if probes >= MAX_PROBES:
                    self.counters["ping_gave_up"] += 1
                    return Outcome(
                        warning=f"{MAX_PROBES} pool addresses in a row answered a ping: no "
                        f"offer to {mac} this time (its next DISCOVER tries further ones)"
                    )
                self.table.offer(mac, ip, now, None)  # held for this client meanwhile
                return Outcome(probe=ip, log=f"{mac}: pinging {ip} before offering it", ip=ip)
        else:
            return self._unknown(msg)
        hostname = node.hostname if node else self._client_hostname(msg)
        self.table.offer(mac, ip, now, hostname)
        reply, boot = self._lease_reply(msg, OFFER, ip, node, hostname)
        out = Outcome(replies=[self._to_client(reply, msg, src)], log=f"OFFER {ip} to {mac}", ip=ip)
        if node is not None:
            out.node = node.node
            out.events.append((node.node, "dhcp-offer", _detail(ip, boot)))
            self._warn_mismatch(out, node, boot, now)
        return out

    def probed(self, ip: IPv4Address, answered: bool, now: float) -> str:
        """Record a ping's result (see Outcome.probe); a line for the log."""
        if not answered:
            self.counters["ping_silent"] += 1
            self.table.probed(ip, False, now)
            return f"{ip} did not answer a ping: free to offer"
        self.counters["ping_in_use"] += 1
        mac = self.table.probed(ip, True, now)
        held = f"; the offer held for {mac} is dropped" if mac else ""
        return (
            f"pool address {ip} answered a ping: in use by a machine without a lease, "
            f"kept out of the pool for {DECLINE_QUARANTINE:.0f} s{held}"
        )

    def _request(self, msg: DhcpMessage, src: tuple[str, int], now: float) -> Outcome:
        mac = msg.mac
        server_id = msg.ip_option(codec.OPT_SERVER_ID)
        requested = msg.ip_option(codec.OPT_REQUESTED_IP)
        if server_id is not None and server_id != self.plan.server_id:
            self.table.drop_offer(mac)  # it chose another server
            self.counters["other_server"] += 1
            return Outcome(log=f"{mac} chose server {server_id}")
        if server_id is not None or requested is not None:
            ip = requested  # selecting or init-reboot
        else:
            ip = msg.ciaddr if msg.ciaddr != ZERO else None  # renewing or rebinding
        node = self.plan.by_mac.get(mac)
        if node is None and self.plan.pool is None:
            return self._unknown(msg)
        if ip is None:
            return self._nak(msg, src, now, "no address requested")
        if ip not in self.plan.subnet:
            return self._nak(msg, src, now, f"{ip} is not on this network", ip)
        if node is not None:
            holder = self.table.holder(ip, now)
            if ip != node.ip:
                return self._nak(msg, src, now, f"{mac} is reserved {node.ip}, not {ip}", ip)
            if holder not in (None, mac):
                self.counters["conflicts"] += 1
                return self._nak(msg, src, now, f"{ip} is still leased to {holder}", ip)
        elif not self.table.free_for(ip, mac, now):
            return self._nak(msg, src, now, f"{ip} is not available to {mac}", ip)
        if node is not None:
            hostname: str | None = node.hostname
        else:
            hostname = self._client_hostname(msg)
            held = self.table.by_mac.get(mac)
            if hostname is None and held is not None and held.ip == ip:
                hostname = held.hostname  # told in its DISCOVER, not repeated now
        binding = self.table.bind(mac, ip, now, self.plan.lease_time, hostname)
        reply, boot = self._lease_reply(msg, ACK, ip, node, hostname)
        out = Outcome(
            replies=[self._to_client(reply, msg, src)],
            commit=[binding],
            log=f"ACK {ip} to {mac}",
            ip=ip,
        )
        if node is not None:
            out.node = node.node
            out.events.append((node.node, "dhcp-ack", _detail(ip, boot)))
            self._warn_mismatch(out, node, boot, now)
        return out

    def _decline(self, msg: DhcpMessage, src: tuple[str, int], now: float) -> Outcome:
        server_id = msg.ip_option(codec.OPT_SERVER_ID)
        ip = msg.ip_option(codec.OPT_REQUESTED_IP)
        # RFC 2131 4.3.3 and table 5: a DECLINE names our server id and the address we
        # offered or leased to that client. Anything else would let anyone empty the
        # pool; it is dropped and leaves no state behind.
        node = self._node_name(msg.mac)
        if ip is None or server_id != self.plan.server_id:
            self.counters["decline_refused"] += 1
            return Outcome(log=f"{msg.mac}: DECLINE not for us", node=node, ip=ip)
        declined = self.table.decline(msg.mac, ip, now)
        if declined is None:
            self.counters["decline_refused"] += 1
            return Outcome(
                log=f"{msg.mac}: DECLINE of {ip}, which we did not give it: ignored",
                node=node,
                ip=ip,
            )
        self.counters["declined"] += 1
        return Outcome(
            node=node,
            ip=ip,
            commit=[declined],
            log=f"{msg.mac} DECLINEd {ip}",
            warning=f"{msg.mac} found {ip} in use on the network (DHCPDECLINE): a machine "
            f"holds it without a lease from us; kept out of the pool for "
            f"{DECLINE_QUARANTINE:.0f} s",
        )

    def _release(self, msg: DhcpMessage, src: tuple[str, int], now: float) -> Outcome:
        binding = self.table.by_mac.get(msg.mac)
        node = self._node_name(msg.mac)
        if binding is None or binding.ip != msg.ciaddr:
            return Outcome(
                log=f"{msg.mac}: RELEASE of {msg.ciaddr}, which it does not hold",
                node=node,
                ip=msg.ciaddr,
            )
        released = self.table.release(msg.mac, now)
        return Outcome(
            commit=[released] if released else [],
            log=f"{msg.mac} released {msg.ciaddr}",
            node=node,
            ip=msg.ciaddr,
        )

    def _inform(self, msg: DhcpMessage, src: tuple[str, int], now: float) -> Outcome:
        node = self.plan.by_mac.get(msg.mac)
        dest = msg.ciaddr if msg.ciaddr != ZERO else IPv4Address(src[0])
        if msg.giaddr == ZERO and dest not in self.plan.subnet:
            # The ACK goes to ciaddr: a forged INFORM would aim it anywhere.
            self.counters["ignored"] += 1
            return Outcome(log=f"{msg.mac}: INFORM from {dest}, outside {self.plan.subnet}")
        if not self._allowed(f"inform {dest}", now):  # one bucket per destination
            self.counters["inform_limited"] += 1
            return Outcome(log=f"{msg.mac}: INFORM answer to {dest} not sent (too many)")
        reply = self._base(msg, ACK)
        self._add_config(reply, msg, node)
        host, port = self._dest(msg, src, unicast=dest)
        return Outcome(replies=[Outgoing(self._encode(reply, msg), host, port)])

    def _client_hostname(self, msg: DhcpMessage) -> str | None:
        raw = msg.options.get(codec.OPT_HOSTNAME)
        hostname = clean_hostname(raw, self.plan.domain)
        if raw is not None and hostname is None:
            self.counters["bad_hostname"] += 1
        return hostname

    def _unknown(self, msg: DhcpMessage) -> Outcome:
        self.counters["unknown"] += 1
        info = client_info(msg)
        return Outcome(unknown=info, log=f"unknown machine {msg.mac} ({info.describe()})")

    def _node_name(self, mac: str) -> str:
        node = self.plan.by_mac.get(mac)
        return node.node if node is not None else ""

    def _nak(
        self,
        msg: DhcpMessage,
        src: tuple[str, int],
        now: float,
        why: str,
        ip: IPv4Address | None = None,
    ) -> Outcome:
        """`ip`: the address the client asked for (a log field)."""
        node = self._node_name(msg.mac)
        if not self._nak_allowed(msg, src, now):
            self.counters["nak_limited"] += 1
            return Outcome(
                log=f"NAK {msg.mac} not sent (too many to {src[0]}): {why}", node=node, ip=ip
            )
        self.counters["nak"] += 1
        reply = self._base(msg, NAK)
        reply.options[codec.OPT_MESSAGE] = why.encode()[:255]
        reply.flags |= codec.BROADCAST_FLAG if msg.giaddr != ZERO else 0
        host, port = self._dest(msg, src, nak=True)
        return Outcome(
            replies=[Outgoing(self._encode(reply, msg), host, port)],
            log=f"NAK {msg.mac}: {why}",
            node=node,
            ip=ip,
        )

    # --- proxyDHCP ---------------------------------------------------------------------

    def _proxy(self, msg: DhcpMessage, src: tuple[str, int], pxe_port: bool, now: float) -> Outcome:
        mtype = msg.message_type
        boot = self.boot_choice(msg, self.plan.by_mac.get(msg.mac))
        if boot is None or mtype not in ((REQUEST, INFORM) if pxe_port else (DISCOVER, REQUEST)):
            self.counters["ignored"] += 1
            return Outcome(log=f"{msg.mac}: not a PXE request for the proxy")
        reply = self._base(msg, ACK if pxe_port or mtype == REQUEST else OFFER)
        self._add_boot(reply, msg, boot)
        if not boot.http:
            reply.options[codec.OPT_VENDOR_CLASS] = b"PXEClient"
        reply.options[codec.OPT_VENDOR_SPECIFIC] = PXE_DISCOVERY_CONTROL
        if codec.OPT_UUID in msg.options:
            reply.options[codec.OPT_UUID] = msg.options[codec.OPT_UUID]
        if pxe_port:  # port 4011: the client has its address and talks to us directly
            out = Outgoing(self._encode(reply, msg), src[0], src[1])
        else:
            host, port = self._dest(msg, src)
            out = Outgoing(self._encode(reply, msg), host, port)
        node = self.plan.by_mac.get(msg.mac)
        outcome = Outcome(replies=[out], log=f"proxy boot info to {msg.mac}: {boot.file}")
        if node is not None:
            outcome.node = node.node
            outcome.events.append((node.node, "dhcp-offer", f"proxy {_detail(None, boot)}"))
            self._warn_mismatch(outcome, node, boot, now)
        return outcome

    def _warn_mismatch(
        self, out: Outcome, node: DhcpReservation, boot: BootChoice | None, now: float
    ) -> None:
        """Counted every time; the warning line at most every ARCH_WARN_EVERY s per node
        (the event detail carries it every time)."""
        if boot is None or not boot.mismatch:
            return
        self.counters["arch_mismatch"] += 1
        if self.arch_warned.admit(node.node, now).write:
            out.warning = boot.mismatch

    # --- replies ----------------------------------------------------------------------

    def _base(self, msg: DhcpMessage, mtype: int) -> DhcpMessage:
        reply = DhcpMessage(
            op=BOOTREPLY,
            htype=msg.htype,
            hlen=msg.hlen,
            xid=msg.xid,
            flags=msg.flags,
            giaddr=msg.giaddr,
            chaddr=msg.chaddr,
        )
        reply.options[codec.OPT_MESSAGE_TYPE] = bytes((mtype,))
        reply.options[codec.OPT_SERVER_ID] = self.plan.server_id.packed
        return reply

    def _lease_reply(
        self,
        msg: DhcpMessage,
        mtype: int,
        ip: IPv4Address,
        node: DhcpReservation | None,
        hostname: str | None = None,
    ) -> tuple[DhcpMessage, BootChoice | None]:
        reply = self._base(msg, mtype)
        reply.yiaddr = ip
        if mtype == ACK and msg.ciaddr != ZERO:
            reply.ciaddr = msg.ciaddr
        lease = self.plan.lease_time
        reply.options[codec.OPT_LEASE_TIME] = codec.u32(lease)
        reply.options[codec.OPT_T1] = codec.u32(lease // 2)
        reply.options[codec.OPT_T2] = codec.u32(lease * 7 // 8)
        self._add_config(reply, msg, node, hostname)
        boot = self.boot_choice(msg, node)
        if boot is not None:
            self._add_boot(reply, msg, boot)
        return reply, boot

    def _add_config(
        self,
        reply: DhcpMessage,
        msg: DhcpMessage,
        node: DhcpReservation | None,
        hostname: str | None = None,
    ) -> None:
        available = self.config_options
        if node is not None:
            available = {**available, codec.OPT_HOSTNAME: node.hostname.encode()}
        elif hostname is not None and codec.OPT_HOSTNAME in msg.options:
            # A pool client's own name, echoed when it sent one (as dnsmasq does).
            available = {**available, codec.OPT_HOSTNAME: hostname.encode()}
        requested = list(msg.options.get(codec.OPT_PARAMS, b""))
        # The client's order first (RFC 2132 9.8), then what every client gets.
        for code in [*requested, *ALWAYS]:
            if code in available and code not in reply.options:
                reply.options[code] = available[code]

    def _add_boot(self, reply: DhcpMessage, msg: DhcpMessage, boot: BootChoice) -> None:
        reply.siaddr = self.plan.next_server
        reply.file = boot.file.encode()
        if boot.http:
            reply.options[codec.OPT_VENDOR_CLASS] = b"HTTPClient"  # UEFI HTTP boot needs it
        else:
            reply.options[codec.OPT_TFTP_SERVER] = str(self.plan.next_server).encode()
        reply.options[codec.OPT_BOOTFILE] = boot.file.encode()

    def _encode(self, reply: DhcpMessage, msg: DhcpMessage) -> bytes:
        relay = msg.options.get(codec.OPT_RELAY_AGENT)
        if relay is not None:
            reply.options.pop(codec.OPT_RELAY_AGENT, None)
            reply.options[codec.OPT_RELAY_AGENT] = relay  # echoed, last (RFC 3046 2.2)
        max_size = msg.options.get(codec.OPT_MAX_SIZE)
        limit = int.from_bytes(max_size, "big") if max_size and len(max_size) == 2 else 576
        return codec.encode(reply, limit, ESSENTIAL)

    def _to_client(self, reply: DhcpMessage, msg: DhcpMessage, src: tuple[str, int]) -> Outgoing:
        host, port = self._dest(msg, src)
        if host == BROADCAST and not msg.broadcast and reply.yiaddr != ZERO:
            # RFC 2131 4.1: broadcast bit clear, no giaddr, no ciaddr: unicast to
            # chaddr and yiaddr.
            return Outgoing(self._encode(reply, msg), str(reply.yiaddr), port, hwaddr=msg.mac)
        return Outgoing(self._encode(reply, msg), host, port)

    def _dest(
        self,
        msg: DhcpMessage,
        src: tuple[str, int],
        *,
        nak: bool = False,
        unicast: IPv4Address | None = None,
    ) -> tuple[str, int]:
        """Where a reply goes (RFC 2131 4.1)."""
        if msg.giaddr != ZERO:
            return str(msg.giaddr), self.server_port  # through the relay
        if unicast is not None:
            return str(unicast), self.client_port
        if not nak and msg.ciaddr != ZERO:
            return str(msg.ciaddr), self.client_port  # renewing: the client has its address
        if src[0] != "0.0.0.0":
            # A sender with an address of its own (a test client on loopback): answer it there.
            return src[0], src[1]
        # A client without an address: broadcast (or, for an OFFER or ACK it did not ask
        # to be broadcast, a unicast to its new address: _to_client).
        return BROADCAST, self.client_port

    # --- PXE --------------------------------------------------------------------------

    def boot_choice(self, msg: DhcpMessage, node: DhcpReservation | None) -> BootChoice | None:
        """The loader or script for a network-booting client; None for a plain DHCP client."""
        files = self.plan.boot_files
        vendor = msg.options.get(codec.OPT_VENDOR_CLASS, b"")
        archs = codec.architectures(msg.options.get(codec.OPT_CLIENT_ARCH))
        arch = archs[0] if archs else None
        mismatch = arch_mismatch(node, arch)
        classes = codec.user_classes(msg.options.get(codec.OPT_USER_CLASS))
        if b"iPXE" in classes or codec.OPT_IPXE in msg.options:
            return BootChoice(files.ipxe_script_url, True, "ipxe script", mismatch)
        http = vendor.startswith(b"HTTPClient") or arch in HTTP_ARCHS
        if not (http or vendor.startswith(b"PXEClient") or arch is not None):
            return None
        firmware = node.firmware if node is not None else "auto"
        arm_node = node is not None and node.arch == "aarch64"
        # The client's own report decides between arm64 and x86 (a loader it cannot run
        # gets it nowhere; a contradiction is warned instead); the node's arch fills in
        # when the report is silent, or says BIOS on a node pinned to UEFI.
        if firmware == "bios":
            loader = files.bios
        elif arch in ARM64_ARCHS:
            loader = files.uefi_arm64
        elif arch in X64_ARCHS:
            loader = files.uefi_x64
        elif arm_node and (arch is None or firmware == "uefi"):
            loader = files.uefi_arm64
        elif firmware == "uefi":
            loader = files.uefi_x64
        elif arch is None or arch == 0:
            loader = files.bios  # a PXE ROM that does not send option 93 is a BIOS one
        else:
            self.counters["unsupported_arch"] += 1
            return None
        if arch is not None:
            name = ARCH_NAMES.get(arch, f"arch {arch}")
        else:  # no report: name what the node's keys chose
            kinds = {files.uefi_arm64: "uefi-arm64", files.uefi_x64: "uefi-x64"}
            name = kinds.get(loader, "bios")
        if http:
            return BootChoice(files.http_url(loader), True, f"{name} {loader}", mismatch)
        return BootChoice(loader, False, f"{name} {loader}", mismatch)


def client_info(msg: DhcpMessage) -> ClientInfo:
    archs = codec.architectures(msg.options.get(codec.OPT_CLIENT_ARCH))
    classes = codec.user_classes(msg.options.get(codec.OPT_USER_CLASS))
    return ClientInfo(
        mac=msg.mac,
        vendor_class=_text(msg.options.get(codec.OPT_VENDOR_CLASS)),
        arch=archs[0] if archs else None,
        user_class=",".join(_text(c) for c in classes),
        hostname=_text(msg.options.get(codec.OPT_HOSTNAME)),
    )


def _text(value: bytes | None) -> str:
    """A client's string for logs and the admin API: printable ASCII only (no line
    breaks or terminal escapes from a stranger), at most 64 characters."""
    if not value:
        return ""
    return value[:64].rstrip(b"\0").translate(_PRINTABLE).decode("ascii")


def clean_hostname(raw: bytes | None, domain: str) -> str | None:
    """A client's host name (option 12) if it is a valid DNS name, else None.

    Attacker-controlled: only letters, digits and inner hyphens in labels of 1-63
    octets, at most 253 in all, pass. A trailing NUL (some firmware sends one) and our
    own domain (a client that sends its FQDN) are taken off, as dnsmasq does.
    """
    if not raw:
        return None
    try:
        name = raw.rstrip(b"\0").decode("ascii").removesuffix(".")
    except UnicodeDecodeError:
        return None
    suffix = f".{domain}"
    if domain and name.lower().endswith(suffix.lower()):
        name = name[: -len(suffix)]
    if not name or len(name) > HOSTNAME_MAX:
        return None
    if not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return name


def arch_mismatch(node: DhcpReservation | None, arch: int | None) -> str:
    """A line naming the key when a node's option 93 contradicts its `arch`, else ""."""
    if node is None or arch is None:
        return ""
    if arch in ARM64_ARCHS and node.arch != "aarch64":
        want = "aarch64"
    elif arch in X86_ARCHS and node.arch == "aarch64":
        want = "x86_64"
    else:
        return ""
    key = f"nodes[{node.index}].arch"
    return (
        f"{node.node} ({node.mac}) network-boots as {ARCH_NAMES[arch]} (DHCP option 93 = "
        f"{arch}) but {key} is {node.arch}: it gets the {node.arch} kernel, which cannot "
        f"boot there; set {key}: {want} if that is the machine"
    )


def _detail(ip: IPv4Address | None, boot: BootChoice | None) -> str:
    text = " ".join(x for x in (str(ip) if ip else "", boot.detail if boot else "") if x)
    if boot is not None and boot.mismatch:
        text += f" (warning: {boot.mismatch})"
    return text
