"""Floating addresses on a real link (appliance/ha/floating.py): lifetimes, GARP, release.

Two network namespaces joined by a veth pair carry TEST-NET-1 (192.0.2.0/24): the
"leader" side (192.0.2.1) holds the floating addresses, the "peer" side (192.0.2.2)
watches. Floating runs in a thread that entered the leader namespace (tests.helpers.
in_netns): iproute2 children and raw sockets it makes belong there. The peer's raw
socket sees the gratuitous ARP frames (decoded with scapy, an independent decoder), and
the peer's neighbour cache moves to the leader's MAC.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from appliance.ha.floating import ARP_REPLY, ARP_REQUEST, ETH_P_ARP, Floating, FloatingError
from tests.helpers import in_netns, need_tool, wait_until

pytestmark = pytest.mark.root

scapy_l2 = pytest.importorskip("scapy.layers.l2")
ARP, Ether = scapy_l2.ARP, scapy_l2.Ether

FLOATING = ["192.0.2.10", "192.0.2.11"]
_serial = itertools.count()


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


class Pair:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{next(_serial)}"
        self.ns, self.peer_ns = f"aphf-{tag}-l", f"aphf-{tag}-p"
        self.dev, self.peer_dev = f"hfl{tag}", f"hfp{tag}"
        self.made: list[str] = []
        try:
            for ns in (self.ns, self.peer_ns):
                _run("ip", "netns", "add", ns)
                self.made.append(ns)
            _run(
                "ip", "link", "add", self.dev, "netns", self.ns, "type", "veth",
                "peer", "name", self.peer_dev, "netns", self.peer_ns,
            )  # fmt: skip
            _run("ip", "-n", self.ns, "addr", "add", "192.0.2.1/24", "dev", self.dev)
            _run("ip", "-n", self.peer_ns, "addr", "add", "192.0.2.2/24", "dev", self.peer_dev)
            for ns, dev in ((self.ns, self.dev), (self.peer_ns, self.peer_dev)):
                _run("ip", "-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise

    def addresses(self) -> list[str]:
        """Every IPv4 address on the leader's veth (duplicates would show twice)."""
        out = _run("ip", "-n", self.ns, "-j", "-4", "addr", "show", "dev", self.dev).stdout
        return [i["local"] for link in json.loads(out) for i in link["addr_info"]]

    def mac(self) -> str:
        out = _run("ip", "-n", self.ns, "-j", "link", "show", "dev", self.dev).stdout
        return str(json.loads(out)[0]["address"])

    def close(self) -> None:
        for ns in self.made:
            _run("ip", "netns", "del", ns, check=False)  # takes the veth pair with it


@pytest.fixture
def pair() -> Iterator[Pair]:
    need_tool("ip")
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def floating_of(pair: Pair, lifetime: int = 2) -> Floating:
    return Floating(pair.dev, [*FLOATING, FLOATING[0]], 24, lifetime)


def test_hold_twice_holds_each_address_once_and_release_removes_them(pair: Pair) -> None:
    fl = floating_of(pair, lifetime=30)
    assert fl.addresses == tuple(FLOATING)  # duplicates in the plan are folded
    in_netns(pair.ns, fl.hold)
    in_netns(pair.ns, fl.hold)
    assert sorted(pair.addresses()) == ["192.0.2.1", *FLOATING]
    assert sorted(in_netns(pair.ns, fl.held)) == FLOATING
    assert sorted(in_netns(pair.ns, fl.release)) == FLOATING
    assert pair.addresses() == ["192.0.2.1"]  # the member's own address stays
    assert in_netns(pair.ns, fl.release) == []  # absent is fine


def test_release_removes_a_stale_address_whatever_its_prefix(pair: Pair) -> None:
    """A crashed run (or an operator) left one as a /32: it goes at start all the same."""
    _run("ip", "-n", pair.ns, "addr", "add", f"{FLOATING[1]}/32", "dev", pair.dev)
    fl = floating_of(pair)
    assert in_netns(pair.ns, fl.release) == [FLOATING[1]]
    assert pair.addresses() == ["192.0.2.1"]


def test_not_renewed_the_kernel_removes_them(pair: Pair) -> None:
    """The dead-man switch: IPv4 valid_lft expiry really happens on this kernel."""
    fl = floating_of(pair, lifetime=2)
    in_netns(pair.ns, fl.hold)
    held_at = time.monotonic()
    assert sorted(in_netns(pair.ns, fl.held)) == FLOATING
    wait_until(lambda: pair.addresses() == ["192.0.2.1"], timeout=6, what="expiry", step=0.05)
    took = time.monotonic() - held_at
    assert 1.5 <= took <= 2 + 1.5, f"gone after {took:.2f} s with a 2 s lifetime"


def test_renewed_they_stay_past_their_lifetime(pair: Pair) -> None:
    fl = floating_of(pair, lifetime=2)
    start = time.monotonic()
    for _ in range(6):  # 4.5 s: more than twice the lifetime
        in_netns(pair.ns, fl.hold)
        assert sorted(in_netns(pair.ns, fl.held)) == FLOATING
        time.sleep(0.75)
    assert time.monotonic() - start > 4
    assert sorted(pair.addresses()) == ["192.0.2.1", *FLOATING]


def test_gratuitous_arp_reaches_the_peer_and_moves_its_neighbour_entry(pair: Pair) -> None:
    fl = floating_of(pair, lifetime=30)
    mac = pair.mac()
    # The peer believes the floating address is elsewhere (the old leader's MAC).
    _run(
        "ip", "-n", pair.peer_ns, "neigh", "replace", FLOATING[0],
        "lladdr", "02:00:00:00:00:99", "dev", pair.peer_dev, "nud", "stale",
    )  # fmt: skip

    def listen() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        s.bind((pair.peer_dev, ETH_P_ARP))
        s.settimeout(0.2)
        return s

    sniffer = in_netns(pair.peer_ns, listen)
    try:
        in_netns(pair.ns, fl.hold)
        sent = in_netns(pair.ns, lambda: fl.announce(rounds=3, interval=0.05))
        assert sent == 3 * 2 * len(FLOATING)
        frames: list[bytes] = []
        deadline = time.monotonic() + 3
        while len(frames) < sent and time.monotonic() < deadline:
            try:
                frames.append(sniffer.recv(2048))
            except TimeoutError:
                continue
    finally:
        sniffer.close()
    seen = []
    for raw in frames:
        eth = Ether(raw)
        arp = eth[ARP]
        if arp.psrc not in FLOATING:
            continue  # the peer's own ARP traffic, if any
        assert eth.dst == "ff:ff:ff:ff:ff:ff" and eth.src == mac
        assert arp.hwsrc == mac and arp.psrc == arp.pdst
        assert arp.hwtype == 1 and arp.ptype == 0x0800 and arp.hwlen == 6 and arp.plen == 4
        assert arp.hwdst == ("00:00:00:00:00:00" if arp.op == ARP_REQUEST else mac)
        seen.append((arp.op, arp.psrc))
    assert sorted(seen) == sorted(
        [(op, a) for a in FLOATING for op in (ARP_REQUEST, ARP_REPLY)] * 3
    )

    def neighbour() -> bool:
        out = _run("ip", "-n", pair.peer_ns, "-j", "neigh", "show", FLOATING[0]).stdout
        return any(n.get("lladdr") == mac for n in json.loads(out or "[]"))

    wait_until(neighbour, timeout=3, what="peer's neighbour entry moved to the leader's MAC")


def test_an_interface_that_does_not_exist_is_a_clear_error(pair: Pair) -> None:
    fl = Floating("nosuchdev0", FLOATING, 24, 3)
    with pytest.raises(FloatingError, match="nosuchdev0"):
        in_netns(pair.ns, fl.hold)
    with pytest.raises(FloatingError, match="nosuchdev0"):
        in_netns(pair.ns, fl.held)
