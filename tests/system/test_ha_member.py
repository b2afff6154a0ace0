"""Which ha member a host is, from the addresses really on its interfaces: a network
namespace with a veth interface stands for a provisioning host (192.0.2.0/24)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from appliance.hostinfo import local_ipv4_addresses
from appliance.plan import HaMember, HaPlan, MemberError, choose_member
from tests.helpers import in_netns, need_tool

pytestmark = pytest.mark.root

HA = HaPlan(
    members=(HaMember("prov-a", "192.0.2.16"), HaMember("prov-b", "192.0.2.17")),
    endpoints=("http://192.0.2.15:2379",),
    prefix="/appliance/demo",
    ca_file=None,
    cert_file=None,
    key_file=None,
    lease_ttl=3,
    interface="eno1",
    floating=("192.0.2.1",),
    prefixlen=24,
)


@pytest.fixture
def host() -> Iterator[str]:
    need_tool("ip")
    ns = f"h4member-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (
            ["link", "set", "lo", "up"],
            ["link", "add", "eno1", "type", "veth", "peer", "name", "eno1-peer"],
            ["link", "set", "eno1", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True)


def _choose(ns: str) -> HaMember:
    return in_netns(ns, lambda: choose_member(HA, None, {}, local_ipv4_addresses()))


def test_the_member_is_the_one_whose_address_is_here(host: str) -> None:
    with pytest.raises(MemberError, match=r"none of the member addresses .* \(this host has "):
        _choose(host)
    _ip(host, "addr", "add", "192.0.2.1/24", "dev", "eno1")  # the floating one: not a member
    _ip(host, "addr", "add", "192.0.2.17/24", "dev", "eno1")
    assert set(in_netns(host, local_ipv4_addresses)) == {"127.0.0.1", "192.0.2.1", "192.0.2.17"}
    assert _choose(host).name == "prov-b"
    # A member whose link is down is still that host.
    _ip(host, "link", "set", "eno1", "down")
    assert _choose(host).name == "prov-b"
    _ip(host, "link", "set", "eno1", "up")
    _ip(host, "addr", "add", "192.0.2.16/24", "dev", "eno1")
    with pytest.raises(MemberError, match="several member addresses are local"):
        _choose(host)
    # The operator says which: the flag, or the environment.
    chosen = in_netns(host, lambda: choose_member(HA, "prov-a", {}, local_ipv4_addresses()))
    assert chosen.name == "prov-a"
