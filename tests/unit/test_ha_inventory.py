"""The `ha` inventory block (issue 18): each bad inventory refused with its key path and
reason, the derived HaPlan, DHCP's DNS option order, member choice and `check`'s findings."""

from __future__ import annotations

import os
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from appliance.checks import RunAs, address_findings, ha_findings, preflight
from appliance.cli import _parser
from appliance.hostinfo import HostFacts, LocalRoute, local_ipv4_addresses
from appliance.inventory import InventoryError, load_inventory, parse_inventory
from appliance.plan import HaMember, HaPlan, MemberError, Plan, build_plan, choose_member
from appliance.render import render
from services.dhcp import codec
from services.dhcp.leases import LeaseTable
from services.dhcp.policy import DhcpCore
from tests.helpers import CONFIG
from tests.unit.dhcp_builders import MASTER0, dora

Edit = Callable[[dict[str, Any]], None]

A, B = "10.33.3.16", "10.33.3.17"


def with_ha(raw: dict[str, Any], **ha: Any) -> dict[str, Any]:
    """The article's inventory served by two members (prov-a, prov-b) and three etcd members."""
    raw["network"]["interface"] = "eno1"
    raw["ha"] = {
        "members": [{"name": "prov-a", "address": A}, {"name": "prov-b", "address": B}],
        "etcd": {
            "endpoints": [
                "http://10.33.3.16:2379",
                "http://10.33.3.17:2379",
                "http://10.33.3.15:2379",
            ]
        },
        **ha,
    }
    return raw


def errors(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(InventoryError) as info:
        parse_inventory(raw, "inv.yaml", CONFIG)
    return [line.removeprefix("inv.yaml: ") for line in info.value.lines()]


def plan_of(raw: dict[str, Any], base: Path = CONFIG) -> Plan:
    return build_plan(parse_inventory(raw, "inv.yaml", base))


def _ha(edit: Callable[[dict[str, Any]], None]) -> Edit:
    return lambda raw: edit(raw["ha"])


def _etcd(**keys: Any) -> Edit:
    return lambda raw: raw["ha"]["etcd"].update(keys)


def _member(i: int, **keys: Any) -> Edit:
    return lambda raw: raw["ha"]["members"][i].update(keys)


def _network(**keys: Any) -> Edit:
    return lambda raw: raw["network"].update(keys)


CASES: list[tuple[str, Edit, list[str]]] = [
    (
        "one member",
        _ha(lambda ha: ha["members"].pop()),
        ["ha.members: 1 member: at least 2 are needed (one leads, another takes over)"],
    ),
    (
        "no members key",
        _ha(lambda ha: ha.pop("members")),
        ["ha.members: required key is missing"],
    ),
    (
        "member name not a label",
        _member(0, name="Prov_A"),
        [
            "ha.members[0].name: 'Prov_A' is not a lowercase DNS label (a-z, 0-9 and '-', at "
            "most 63 characters, no leading or trailing '-')"
        ],
    ),
    (
        "duplicate member name",
        _member(1, name="prov-a"),
        ["ha.members[1].name: 'prov-a' is already used by ha.members[0]"],
    ),
    (
        "duplicate member address",
        _member(1, address=A),
        ["ha.members[1].address: 10.33.3.16 is already used by ha.members[0] (prov-a)"],
    ),
    (
        "member address not IPv4",
        _member(1, address="prov-b.example.com"),
        ["ha.members[1].address: 'prov-b.example.com' is not an IPv4 address"],
    ),
    (
        "member address outside the subnet",
        _member(1, address="10.33.4.17"),
        ["ha.members[1].address: 10.33.4.17 is outside network.subnet 10.33.3.0/24"],
    ),
    (
        "member address is the broadcast address",
        _member(1, address="10.33.3.255"),
        ["ha.members[1].address: 10.33.3.255 is the broadcast address of 10.33.3.0/24"],
    ),
    (
        "member address is the floating network.address",
        _member(0, address="10.33.3.18"),
        [
            "ha.members[0].address: 10.33.3.18 is network.address, a floating address (the "
            "leader holds it): give each member its own fixed address"
        ],
    ),
    (
        "member address is the floating load_balancer.address",
        _member(1, address="10.33.3.54"),
        [
            "ha.members[1].address: 10.33.3.54 is load_balancer.address, a floating address "
            "(the leader holds it): give each member its own fixed address"
        ],
    ),
    (
        "member address is a node's",
        _member(1, address="10.33.3.50"),
        ["ha.members[1].address: 10.33.3.50 is already used by nodes[1] (master-0)"],
    ),
    (
        "member address is the gateway",
        _member(1, address="10.33.3.1"),
        ["ha.members[1].address: 10.33.3.1 is network.gateway"],
    ),
    (
        "member address in the DHCP pool",
        _network(dhcp_range=["10.33.3.10", "10.33.3.20"]),
        [
            "network.dhcp_range: 10.33.3.10-10.33.3.20 contains 10.33.3.18, reserved for "
            "network.address (the appliance itself)",
            "network.dhcp_range: 10.33.3.10-10.33.3.20 contains 10.33.3.16, reserved for "
            "ha.members[0] (prov-a)",
            "network.dhcp_range: 10.33.3.10-10.33.3.20 contains 10.33.3.17, reserved for "
            "ha.members[1] (prov-b)",
        ],
    ),
    (
        "no endpoints key",
        _ha(lambda ha: ha["etcd"].pop("endpoints")),
        ["ha.etcd.endpoints: required key is missing"],
    ),
    (
        "empty endpoints",
        _etcd(endpoints=[]),
        [
            "ha.etcd.endpoints: empty: list the etcd members' client URLs "
            "(http://HOST:2379 or https://HOST:2379)"
        ],
    ),
    (
        "endpoint without a scheme",
        _etcd(endpoints=["10.33.3.16:2379"]),
        [
            "ha.etcd.endpoints[0]: '10.33.3.16:2379' is not an http:// or https:// URL "
            "(write http://10.33.3.16:2379)"
        ],
    ),
    (
        "endpoint of another scheme",
        _etcd(endpoints=["unix:///run/etcd.sock"]),
        ["ha.etcd.endpoints[0]: 'unix:///run/etcd.sock' is not an http:// or https:// URL"],
    ),
    (
        "endpoint without a port",
        _etcd(endpoints=["http://10.33.3.16"]),
        [
            "ha.etcd.endpoints[0]: 'http://10.33.3.16' has no port: write it "
            "(etcd's client port is 2379 unless configured otherwise)"
        ],
    ),
    (
        "endpoint with a bad port",
        _etcd(endpoints=["http://10.33.3.16:99999"]),
        ["ha.etcd.endpoints[0]: 'http://10.33.3.16:99999': port is not 1-65535"],
    ),
    (
        "endpoint without a host",
        _etcd(endpoints=["http://:2379"]),
        ["ha.etcd.endpoints[0]: 'http://:2379' has no host"],
    ),
    (
        "endpoint with a path",
        _etcd(endpoints=["http://10.33.3.16:2379/v3/kv"]),
        [
            "ha.etcd.endpoints[0]: 'http://10.33.3.16:2379/v3/kv' has a path, query or user: "
            "write only scheme://host:port"
        ],
    ),
    (
        "endpoint not a string",
        _etcd(endpoints=[2379]),
        ["ha.etcd.endpoints[0]: 2379: should be a valid string"],
    ),
    (
        "duplicate endpoint",
        _etcd(
            endpoints=[
                "http://10.33.3.16:2379",
                "http://10.33.3.17:2379",
                "HTTP://10.33.3.16:2379/",
            ]
        ),
        [
            "ha.etcd.endpoints[2]: 'HTTP://10.33.3.16:2379/' is already ha.etcd.endpoints[0]",
        ],
    ),
    (
        "http and https mixed",
        _etcd(endpoints=["http://10.33.3.16:2379", "https://10.33.3.17:2379"]),
        [
            "ha.etcd.endpoints: mixes http:// and https://: one etcd cluster serves its "
            "clients one way; write every endpoint with the same scheme"
        ],
    ),
    (
        "certificate without its key",
        _etcd(
            endpoints=["https://10.33.3.16:2379", "https://10.33.3.17:2379"],
            cert_file="etcd/client.pem",
        ),
        [
            "ha.etcd.key_file: required with ha.etcd.cert_file (a client certificate is "
            "used with its private key)"
        ],
    ),
    (
        "key without its certificate",
        _etcd(
            endpoints=["https://10.33.3.16:2379", "https://10.33.3.17:2379"],
            key_file="etcd/client.key",
        ),
        [
            "ha.etcd.cert_file: required with ha.etcd.key_file (a client certificate is "
            "used with its private key)"
        ],
    ),
    (
        "TLS files with http endpoints",
        _etcd(ca_file="etcd/ca.pem"),
        [
            "ha.etcd.ca_file: set, but every endpoint is http://: TLS is used only with "
            "https:// endpoints (write https://, or remove the key)"
        ],
    ),
    (
        "empty file name",
        _etcd(endpoints=["https://10.33.3.16:2379"], ca_file=""),
        ["ha.etcd.ca_file: empty (write a path, or null for the system's trusted CAs)"],
    ),
    (
        "prefix without a leading slash",
        _etcd(prefix="appliance/dgxpod"),
        ["ha.etcd.prefix: 'appliance/dgxpod' must start with '/'"],
    ),
    (
        "prefix with a trailing slash",
        _etcd(prefix="/appliance/dgxpod/"),
        ["ha.etcd.prefix: '/appliance/dgxpod/' must not end with '/'"],
    ),
    (
        "prefix with a space",
        _etcd(prefix="/appliance/dgx pod"),
        [
            "ha.etcd.prefix: '/appliance/dgx pod' holds ' ': write printable characters "
            "without spaces"
        ],
    ),
    (
        "lease_ttl too short",
        _ha(lambda ha: ha.update(lease_ttl=1)),
        [
            "ha.lease_ttl: 1 is not 2-60 seconds (etcd raises a shorter lease to its minimum, "
            "1.5 x its election timeout; a longer one notices a dead leader late)"
        ],
    ),
    (
        "lease_ttl too long",
        _ha(lambda ha: ha.update(lease_ttl=61)),
        [
            "ha.lease_ttl: 61 is not 2-60 seconds (etcd raises a shorter lease to its minimum, "
            "1.5 x its election timeout; a longer one notices a dead leader late)"
        ],
    ),
    (
        "lease_ttl not an integer",
        _ha(lambda ha: ha.update(lease_ttl=2.5)),
        ["ha.lease_ttl: 2.5: should be a valid integer"],
    ),
    (
        "lease_ttl a string",
        _ha(lambda ha: ha.update(lease_ttl="3")),
        ["ha.lease_ttl: '3': should be a valid integer"],
    ),
    (
        "unknown key",
        _ha(lambda ha: ha.update(lease_tll=3)),
        ["ha.lease_tll: unknown key"],
    ),
    (
        "no interface",
        _network(interface=None),
        [
            "network.interface: required with ha: the leader puts the floating addresses "
            "(network.address, load_balancer.address) on it"
        ],
    ),
    (
        "no subnet",
        lambda raw: raw["network"].pop("subnet"),
        ["network.subnet: required key is missing (or set cluster.install_config)"],
    ),
    (
        "floating load balancer outside the subnet",
        lambda raw: raw["load_balancer"].update(address="10.99.0.54"),
        [
            "load_balancer.address: 10.99.0.54 is outside network.subnet 10.33.3.0/24: with "
            "ha it is a floating address, moved between members by ARP on network.interface's "
            "link"
        ],
    ),
    (
        "an upstream resolver that is a member (forwarding would loop)",
        _network(upstream_dns=["10.33.3.1", f"{B}:53"]),
        [
            "network.upstream_dns[1]: 10.33.3.17:53 is the DNS listener of ha.members[1] "
            "(prov-b), which forwards to network.upstream_dns too: forwarding would loop"
        ],
    ),
    (
        "an etcd endpoint at a floating address",
        _etcd(endpoints=["http://10.33.3.16:2379", "http://10.33.3.54:2379"]),
        [
            "ha.etcd.endpoints[1]: 'http://10.33.3.54:2379' is at load_balancer.address, a "
            "floating address: it moves with the leader, an etcd member listens on its "
            "host's fixed address"
        ],
    ),
    (
        "a listener at one member's own address",
        lambda raw: raw.setdefault("listen", {}).update(dns=f"{B}:53"),
        [
            "listen.dns: 10.33.3.17:53 is the own address of ha.members[1] (prov-b): every "
            "member runs this inventory and the others cannot bind it; use 0.0.0.0:53"
        ],
    ),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_ha_blocks_are_refused_with_key_and_reason(
    dgxpod_raw: dict[str, Any], edit: Edit, expected: list[str]
) -> None:
    raw = with_ha(dgxpod_raw)
    edit(raw)
    assert errors(raw) == expected


def test_the_issue_example_is_valid_and_planned(dgxpod_raw: dict[str, Any]) -> None:
    plan = plan_of(with_ha(dgxpod_raw, lease_ttl=3))
    assert plan.ha == HaPlan(
        members=(HaMember("prov-a", A), HaMember("prov-b", B)),
        endpoints=("http://10.33.3.16:2379", "http://10.33.3.17:2379", "http://10.33.3.15:2379"),
        prefix="/appliance/dgxpod",  # the default: /appliance/<cluster name>
        ca_file=None,
        cert_file=None,
        key_file=None,
        lease_ttl=3,
        interface="eno1",
        floating=("10.33.3.18", "10.33.3.54"),
        prefixlen=24,
    )
    data = plan.to_dict()["ha"]
    assert data["members"][0] == {"name": "prov-a", "address": A}
    assert data["floating"] == ["10.33.3.18", "10.33.3.54"]


def test_defaults_files_and_equal_floating_addresses(
    dgxpod_raw: dict[str, Any], tmp_path: Path
) -> None:
    raw = with_ha(dgxpod_raw)
    raw["load_balancer"]["address"] = raw["network"]["address"]  # "they may be equal"
    raw["ha"]["etcd"] = {
        "endpoints": ["https://etcd-0.example.com:2379/", "https://[::1]:2379"],
        "prefix": "/appliance/pod-7",
        "ca_file": "etcd/ca.pem",
        "cert_file": "/etc/appliance/etcd/client.pem",
        "key_file": "~/client.key",
    }
    ha = plan_of(raw, tmp_path).ha
    assert ha is not None
    assert ha.floating == ("10.33.3.18",)
    assert ha.lease_ttl == 3  # the default
    assert ha.prefix == "/appliance/pod-7"
    assert ha.endpoints == ("https://etcd-0.example.com:2379", "https://[::1]:2379")
    assert ha.ca_file == str(tmp_path / "etcd" / "ca.pem")  # relative to the inventory
    assert ha.cert_file == "/etc/appliance/etcd/client.pem"
    assert ha.key_file == str(Path("~/client.key").expanduser())


def test_few_endpoints_are_a_warning(dgxpod_raw: dict[str, Any]) -> None:
    raw = with_ha(dgxpod_raw)
    raw["ha"]["etcd"]["endpoints"] = ["http://10.33.3.15:2379"]
    loaded = parse_inventory(raw, "inv.yaml", CONFIG)
    assert [str(w) for w in loaded.warnings] == [
        "ha.etcd.endpoints: only 1 endpoint: while it is down the members cannot reach etcd "
        "(no DHCP, no leader) even when the etcd cluster has quorum; list every etcd member "
        "(three: the two provisioning hosts and a witness)"
    ]
    raw["ha"]["etcd"]["endpoints"] = ["http://10.33.3.15:2379", "http://10.33.3.16:2379"]
    assert [w.path for w in parse_inventory(raw, "inv.yaml", CONFIG).warnings] == [
        "ha.etcd.endpoints"
    ]


# --- the single-host default stays as it was ------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG.glob("*.yaml")))
def test_without_ha_the_plan_has_no_ha(name: str) -> None:
    plan = build_plan(load_inventory(CONFIG / name))
    assert plan.ha is None
    assert "ha" not in plan.to_dict()  # `appliance plan` prints what it printed before
    assert plan.dhcp.dns_servers == (plan.dhcp.server_id,)


# --- DHCP's DNS option: floating first, then the members -----------------------------------


def test_dns_servers_floating_first_then_members(dgxpod_raw: dict[str, Any]) -> None:
    plan = plan_of(with_ha(dgxpod_raw))
    want = (IPv4Address("10.33.3.18"), IPv4Address(A), IPv4Address(B))
    assert plan.dhcp.dns_servers == want
    ack = dora(DhcpCore(plan.dhcp, LeaseTable(None), 67), MASTER0)
    assert ack.options[codec.OPT_DNS] == codec.ips(*want)  # in a real answer, in order
    assert "dhcp-option=option:dns-server,10.33.3.18,10.33.3.16,10.33.3.17" in render(
        plan, "dnsmasq"
    )


def test_explicit_dns_servers_still_win(dgxpod_raw: dict[str, Any]) -> None:
    raw = with_ha(dgxpod_raw)
    raw["network"]["dns_servers"] = ["10.33.3.1"]
    assert plan_of(raw).dhcp.dns_servers == (IPv4Address("10.33.3.1"),)


# --- which member is this host ----------------------------------------------------------------


@pytest.fixture
def ha(dgxpod_raw: dict[str, Any]) -> HaPlan:
    plan = plan_of(with_ha(dgxpod_raw))
    assert plan.ha is not None
    return plan.ha


def test_member_by_flag_env_and_local_address(ha: HaPlan) -> None:
    a, b = ha.members
    assert choose_member(ha, "prov-b", {"APPLIANCE_MEMBER": "prov-a"}, [A]) == b  # flag first
    assert choose_member(ha, None, {"APPLIANCE_MEMBER": "prov-b"}, [A]) == b  # then env
    assert choose_member(ha, None, {"APPLIANCE_MEMBER": ""}, ["127.0.0.1", A]) == a  # then local
    assert choose_member(ha, None, {}, iter(["10.33.3.18", B])) == b  # floating: not a member


def test_unknown_member_names_list_the_members(ha: HaPlan) -> None:
    with pytest.raises(MemberError) as info:
        choose_member(ha, "prov-c", {}, [A])
    assert str(info.value) == (
        "--member prov-c: no such member; ha.members names prov-a (10.33.3.16), prov-b (10.33.3.17)"
    )
    with pytest.raises(MemberError) as info:
        choose_member(ha, None, {"APPLIANCE_MEMBER": "prov-c"}, [A])
    assert str(info.value).startswith("APPLIANCE_MEMBER=prov-c: no such member; ha.members names")


def test_no_or_several_local_members_say_what_was_seen(ha: HaPlan) -> None:
    with pytest.raises(MemberError) as info:
        choose_member(ha, None, {}, ["127.0.0.1", "10.33.3.18"])
    assert str(info.value) == (
        "which member is this host? none of the member addresses (prov-a 10.33.3.16, prov-b "
        "10.33.3.17) is on a local interface (this host has 127.0.0.1, 10.33.3.18): add this "
        "member's own address to its interface, or name it with `appliance run --member NAME` "
        "or APPLIANCE_MEMBER=NAME"
    )
    with pytest.raises(MemberError) as info:
        choose_member(ha, None, {}, [A, B])
    assert str(info.value) == (
        "which member is this host? several member addresses are local (prov-a 10.33.3.16, "
        "prov-b 10.33.3.17): name it with `appliance run --member NAME` or "
        "APPLIANCE_MEMBER=NAME"
    )


def test_local_addresses_are_read_from_the_kernel() -> None:
    seen = local_ipv4_addresses()
    assert "127.0.0.1" in seen
    assert all(IPv4Address(a) for a in seen)


def test_run_takes_member() -> None:
    assert _parser().parse_args(["run", "--member", "prov-a"]).member == "prov-a"
    assert _parser().parse_args(["run"]).member is None


# --- check: the host and the etcd files ---------------------------------------------------------


def _host(*routes: tuple[str, str]) -> HostFacts:
    return HostFacts(
        local=tuple(LocalRoute(IPv4Network(n), dev) for n, dev in routes),
        interfaces=frozenset({"lo", "eno1"}),
        cap_eff=(1 << 41) - 1,
        unprivileged_port_start=1024,
        ping_group_range=(1, 0),
        gids=frozenset({0}),
    )


LOOPBACK = (("127.0.0.0/8", "lo"), ("127.0.0.1/32", "lo"))


def test_floating_addresses_elsewhere_are_fine_but_a_member_address_is_wanted(
    dgxpod_raw: dict[str, Any],
) -> None:
    plan = plan_of(with_ha(dgxpod_raw))
    # A follower: network.address and load_balancer.address are held by the leader.
    assert address_findings(plan, _host(*LOOPBACK, (f"{A}/32", "eno1"))) == []
    found = address_findings(plan, _host(*LOOPBACK))
    assert [(f.key, f.error) for f in found] == [("ha.members", False)]
    assert found[0].message == (
        "none of the member addresses (prov-a 10.33.3.16, prov-b 10.33.3.17) is on this host "
        "(it has 127.0.0.0/8, 127.0.0.1): `run` needs --member NAME (or APPLIANCE_MEMBER), and "
        "each member serves DNS, TFTP and HTTP on its own address"
    )
    gone = HostFacts(
        local=(LocalRoute(IPv4Network(f"{A}/32"), "eno1"),),
        interfaces=frozenset({"lo"}),
        cap_eff=0,
        unprivileged_port_start=1024,
        ping_group_range=(1, 0),
        gids=frozenset({0}),
    )
    found = address_findings(plan, gone)
    assert [(f.key, f.error) for f in found] == [("network.interface", True)]
    assert "the floating addresses go on it" in found[0].message


def _me() -> RunAs:
    return RunAs("me", os.geteuid(), frozenset({os.getegid()}), current=True)


def test_etcd_files_missing_are_errors_and_an_open_key_a_warning(
    dgxpod_raw: dict[str, Any], tmp_path: Path
) -> None:
    raw = with_ha(dgxpod_raw)
    raw["ha"]["etcd"].update(
        endpoints=["https://10.33.3.15:2379"],
        ca_file="ca.pem",
        cert_file="client.pem",
        key_file="client.key",
    )
    plan = plan_of(raw, tmp_path)
    found = ha_findings(plan, _me())
    assert [(f.key, f.error) for f in found] == [
        ("ha.etcd.ca_file", True),
        ("ha.etcd.cert_file", True),
        ("ha.etcd.key_file", True),
    ]
    assert found[0].message == f"{tmp_path / 'ca.pem'} is missing"
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o644)
    found = ha_findings(plan, _me())
    assert [(f.key, f.error) for f in found] == [("ha.etcd.key_file", False)]
    assert found[0].message == (
        f"{tmp_path / 'client.key'} is readable by group or others (mode 0644): "
        f"chmod 600 {tmp_path / 'client.key'}"
    )
    (tmp_path / "client.key").chmod(0o600)
    assert ha_findings(plan, _me()) == []
    # run and check both see them: preflight includes them.
    (tmp_path / "ca.pem").unlink()
    assert ("ha.etcd.ca_file", True) in [
        (f.key, f.error) for f in preflight(plan, _host(*LOOPBACK, (f"{A}/32", "eno1")), _me())
    ]


def test_check_summarises_ha_and_runs_anywhere(
    dgxpod_raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from appliance.cli import main

    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(with_ha(dgxpod_raw)))
    status = main(["check", "--config", str(path)])
    out = capsys.readouterr().out
    # Not a member host (a laptop, CI): what `run` would refuse is said as warnings.
    assert status == 0, out
    assert (
        "ha: members prov-a 10.33.3.16, prov-b 10.33.3.17; floating 10.33.3.18, 10.33.3.54 on "
        "eno1; etcd http://10.33.3.16:2379, http://10.33.3.17:2379, http://10.33.3.15:2379 "
        "under /appliance/dgxpod; lease_ttl 3 s"
    ) in out.splitlines()
    assert "warning: ha.members: none of the member addresses" in out
    assert "warning: network.interface: eno1 is not an interface of this host" in out
