"""Preflight decisions over made-up hosts (appliance.checks), and the kernel-text parsers
they read (appliance.hostinfo): no sockets, no /proc of this machine."""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any

import pytest

from appliance.checks import (
    Finding,
    RunAs,
    access_problem,
    address_findings,
    capability_findings,
    file_warnings,
    for_check,
    port_findings,
    preflight,
    upstream_findings,
)
from appliance.hostinfo import (
    CAP_NET_ADMIN,
    CAP_NET_BIND_SERVICE,
    CAP_NET_RAW,
    HostFacts,
    LocalRoute,
    SocketRow,
    is_appliance_run,
    parse_cap_eff,
    parse_local_routes,
    parse_proc_net,
)
from appliance.inventory import load_inventory, parse_inventory
from appliance.plan import Plan, build_plan
from tests.helpers import CONFIG, loopback_inventory

ALL_CAPS = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_RAW) | (1 << CAP_NET_ADMIN)


def host(*routes: tuple[str, str], caps: int = ALL_CAPS, **kw: Any) -> HostFacts:
    local = tuple(LocalRoute(IPv4Network(net), dev) for net, dev in routes)
    defaults: dict[str, Any] = {
        "interfaces": frozenset({dev for _, dev in routes}),
        "cap_eff": caps,
        "unprivileged_port_start": 1024,
        "ping_group_range": (1, 0),
        "gids": frozenset({1000}),
    }
    return HostFacts(local=local, **{**defaults, **kw})


LOOPBACK = (("127.0.0.0/8", "lo"), ("127.0.0.1/32", "lo"))
PROVISIONING = (*LOOPBACK, ("10.33.3.18/32", "eno1"), ("10.33.3.54/32", "eno1"))


def dgxpod(**network: Any) -> Plan:
    plan = build_plan(load_inventory(CONFIG / "dgxpod.yaml"))
    if not network:
        return plan
    import yaml

    raw = yaml.safe_load((CONFIG / "dgxpod.yaml").read_text())
    raw["network"].update(network)
    return build_plan(parse_inventory(raw, "test.yaml", CONFIG))


def example() -> Plan:
    return build_plan(load_inventory(CONFIG / "example.yaml"))


def keys(findings: list[Finding]) -> list[tuple[str, bool]]:
    return [(f.key, f.error) for f in findings]


# --- parsers ------------------------------------------------------------------------------


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 812 1
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 900 1
   2: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 901 1
   3: garbage
"""
_TAIL = "07 00000000:00000000 00:00000000 00000000 0 0"  # st ... uid timeout
PROC_NET_UDP6 = f"""\
  sl  local_address                         remote_address                        st tx_queue
   0: {"0" * 32}:0035 {"0" * 32}:0000 {_TAIL} 77 2 0
   1: {"0" * 24}01000000:0045 {"0" * 32}:0000 {_TAIL} 78 2 0
"""


def test_proc_net_rows_are_read_like_ss() -> None:
    rows = parse_proc_net(PROC_NET_TCP, "tcp")
    assert [(str(r.address), r.port, r.state, r.inode) for r in rows] == [
        ("127.0.0.1", 53, 0x0A, 812),
        ("0.0.0.0", 8080, 0x0A, 900),
        ("127.0.0.1", 0xA1B2, 0x01, 901),
    ]  # the malformed row is skipped
    six = parse_proc_net(PROC_NET_UDP6, "udp")
    assert [(str(r.address), r.port, r.inode) for r in six] == [("::", 53, 77), ("::1", 69, 78)]


def _nlmsg(kind: int, body: bytes) -> bytes:
    head = struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0)
    msg = head + body
    return msg + b"\0" * (-len(msg) % 4)


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _route(dst: str, dst_len: int, kind: int, table: int, oif: int) -> bytes:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, dst_len, 0, 0, table, 2, 254, kind, 0)
    body += _attr(1, socket.inet_aton(dst)) + _attr(4, struct.pack("=I", oif))
    return _nlmsg(24, body + _attr(15, struct.pack("=I", table)))


def test_local_routes_from_a_netlink_dump() -> None:
    data = (
        _route("127.0.0.0", 8, 2, 255, 1)  # local 127.0.0.0/8 dev lo
        + _route("10.33.3.18", 32, 2, 255, 2)  # local 10.33.3.18 dev eno1
        + _route("10.33.3.255", 32, 3, 255, 2)  # broadcast: not an address of ours
        + _route("10.33.3.0", 24, 1, 254, 2)  # main table unicast: a route, not ours
    )
    names = {1: "lo", 2: "eno1"}
    routes, done = parse_local_routes(data, names)
    assert not done
    assert routes == [
        LocalRoute(IPv4Network("127.0.0.0/8"), "lo"),
        LocalRoute(IPv4Network("10.33.3.18/32"), "eno1"),
    ]
    assert parse_local_routes(_nlmsg(3, b"\0" * 4), names) == ([], True)
    # A truncated message is not read past its end.
    assert parse_local_routes(data[:-3], names)[0] == routes
    with pytest.raises(OSError):
        parse_local_routes(_nlmsg(2, b"\0" * 20), names)


def test_cap_eff_and_the_most_specific_local_route() -> None:
    assert parse_cap_eff("Name:\tx\nCapEff:\t0000000000003400\n") == ALL_CAPS
    assert parse_cap_eff("Name:\tx\n") == 0
    facts = host(*PROVISIONING, ("10.33.3.0/24", "lo"))  # AnyIP on lo, and one /32 on eno1
    assert facts.local_interface(IPv4Address("10.33.3.18")) == "eno1"
    assert facts.local_interface(IPv4Address("10.33.3.77")) == "lo"
    assert facts.local_interface(IPv4Address("127.0.0.54")) == "lo"
    assert facts.local_interface(IPv4Address("192.0.2.1")) is None


# --- addresses and interface ----------------------------------------------------------------


def test_the_example_on_loopback_is_at_home_anywhere() -> None:
    assert address_findings(example(), host(*LOOPBACK)) == []
    assert capability_findings(example(), host(*LOOPBACK, caps=0)) == []  # ports >= 1024
    assert upstream_findings(example()) == []  # loopback nodes pull nothing


def test_a_foreign_service_address_is_an_error_with_dhcp_on() -> None:
    found = address_findings(dgxpod(), host(*LOOPBACK))
    assert keys(found) == [("network.address", True), ("load_balancer.address", False)]
    assert "10.33.3.18 is not an address of this host (it has 127.0.0.0/8, 127.0.0.1)" in str(
        found[0]
    )
    assert "ip addr add 10.33.3.18/24 dev <interface>" in found[0].message
    assert address_findings(dgxpod(), host(*PROVISIONING)) == []


def test_without_dhcp_the_address_is_a_warning(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["listen"] = {"dhcp": None}  # the rest: the defaults (0.0.0.0, every port)
    plan = build_plan(parse_inventory(dgxpod_raw, "t.yaml", CONFIG))
    assert keys(address_findings(plan, host(*LOOPBACK))) == [
        ("network.address", False),
        ("load_balancer.address", False),
    ]
    for name in ("api", "machine_config", "ingress_http", "ingress_https"):
        dgxpod_raw["listen"][name] = None
    plan = build_plan(parse_inventory(dgxpod_raw, "t.yaml", CONFIG))
    # No frontend: nothing listens for the load-balancer address here.
    assert keys(address_findings(plan, host(*LOOPBACK))) == [("network.address", False)]


def test_the_dhcp_interface_must_exist_and_hold_the_address() -> None:
    plan = dgxpod(interface="eno2")
    found = address_findings(plan, host(*PROVISIONING))
    assert keys(found) == [("network.interface", True)]
    assert found[0].message.startswith("eno2 is not an interface of this host (it has eno1, lo)")
    found = address_findings(
        plan, host(*PROVISIONING, interfaces=frozenset({"lo", "eno1", "eno2"}))
    )
    assert keys(found) == [("network.interface", False)]
    assert "network.address 10.33.3.18 is on eno1, not on eno2" in found[0].message
    assert address_findings(dgxpod(interface="eno1"), host(*PROVISIONING)) == []


def test_check_elsewhere_says_run_errors_as_warnings() -> None:
    plan = dgxpod(interface="eno2")
    here = preflight(plan, host(*PROVISIONING), _me())
    assert for_check(here) == here  # the provisioning host: errors stay errors
    away = for_check(preflight(plan, host(*LOOPBACK), _me()))
    assert not any(f.error for f in away) and {"network.address", "network.interface"} <= {
        f.key for f in away
    }


# --- ports -----------------------------------------------------------------------------------


def _row(proto: str, addr: str, port: int, inode: int, state: int = 0x0A) -> SocketRow:
    return SocketRow(proto, ip_address(addr), port, state if proto == "tcp" else 7, inode)


def test_who_holds_a_port() -> None:
    plan = dgxpod()  # dns, dhcp, tftp, ... on 0.0.0.0
    rows = [
        _row("udp", "127.0.0.53", 53, 1),  # systemd-resolved's stub: clashes with 0.0.0.0:53
        _row("tcp", "10.33.3.99", 8080, 2),  # any address clashes with our wildcard
        _row("tcp", "0.0.0.0", 22623, 3, state=0x01),  # a connection, not a listener
        _row("tcp", "0.0.0.0", 69, 4),  # TFTP is UDP: a TCP socket on 69 is no clash
        _row("udp", "::", 67, 5),  # an IPv6 wildcard takes IPv4 as well
    ]
    owners = {1: (812, "systemd-resolve"), 5: (99, "dhcpd")}
    found = port_findings(plan, rows, owners)
    assert [str(f) for f in found] == [
        "listen.dns: port 53/udp is held by systemd-resolve (pid 812): stop it, or move "
        "listen.dns elsewhere",
        "listen.dhcp: port 67/udp is held by dhcpd (pid 99): stop it, or move listen.dhcp "
        "elsewhere",
        "listen.http: port 8080/tcp is held by a process this user cannot see: stop it, or "
        "move listen.http elsewhere",
    ]
    assert not any(f.error for f in found)  # at run, the bind decides


def test_specific_addresses_do_not_clash() -> None:
    plan = example()  # dns on 127.0.0.1:5353, api on 127.0.0.54:6443
    rows = [_row("udp", "127.0.0.2", 5353, 1), _row("tcp", "127.0.0.1", 6443, 2)]
    assert port_findings(plan, rows, {}) == []
    rows = [_row("udp", "::ffff:127.0.0.1", 5353, 1)]  # an IPv4-mapped socket does clash
    assert [f.key for f in port_findings(plan, rows, {})] == ["listen.dns"]


# --- capabilities --------------------------------------------------------------------------


def test_low_ports_need_cap_net_bind_service() -> None:
    plan = dgxpod()
    found = capability_findings(plan, host(*PROVISIONING, caps=ALL_CAPS & ~(1 << 10)))
    assert keys(found) == [("listen.dns", True)]
    assert str(found[0]) == (
        "listen.dns: ports below 1024 need CAP_NET_BIND_SERVICE, which this process lacks: "
        "53 (listen.dns), 67 (listen.dhcp), 69 (listen.tftp), 80 (listen.ingress_http), "
        "443 (listen.ingress_https); systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE; "
        "podman: --cap-add NET_BIND_SERVICE"
    )
    # net.ipv4.ip_unprivileged_port_start=0 (rootless containers set it): nothing needed.
    no_caps = host(*PROVISIONING, caps=0, unprivileged_port_start=0)
    assert [f.key for f in capability_findings(plan, no_caps)] == ["listen.dhcp"]  # ARP only


def test_ping_check_and_arp_need_their_capabilities() -> None:
    plan = dgxpod(dhcp_range=["10.33.3.100", "10.33.3.120"])
    assert plan.dhcp.ping_wait > 0
    bare = host(*PROVISIONING, caps=1 << CAP_NET_BIND_SERVICE)
    found = capability_findings(plan, bare)
    assert keys(found) == [("network.dhcp_ping_wait", False), ("listen.dhcp", False)]
    assert "systemd: AmbientCapabilities=CAP_NET_RAW; podman: --cap-add NET_RAW" in str(found[0])
    assert "AmbientCapabilities=CAP_NET_ADMIN" in str(found[1]) and "broadcast" in str(found[1])
    # A group inside net.ipv4.ping_group_range may ping without CAP_NET_RAW.
    grouped = host(*PROVISIONING, caps=1 << CAP_NET_BIND_SERVICE, ping_group_range=(0, 2000))
    assert keys(capability_findings(plan, grouped)) == [("listen.dhcp", False)]
    # proxyDHCP hands out no address: no ARP entry to write.
    proxy = dgxpod(dhcp_mode="proxy")
    assert capability_findings(proxy, host(*PROVISIONING, caps=1 << CAP_NET_BIND_SERVICE)) == []


def test_capabilities_are_judged_only_for_this_process() -> None:
    plan = dgxpod()
    facts = host(*PROVISIONING, caps=0)
    assert any("CAP_" in f.message for f in preflight(plan, facts, _me()))
    other = RunAs("appliance", 990, frozenset({990}))  # check --user: systemd grants those
    assert not any("CAP_" in f.message for f in preflight(plan, facts, other))


# --- upstream DNS ---------------------------------------------------------------------------


def test_nodes_that_resolve_through_us_need_upstreams() -> None:
    assert dgxpod().dns.upstreams  # the shipped example forwards to its site resolver
    [finding] = upstream_findings(dgxpod(upstream_dns=[]))
    assert finding.key == "network.upstream_dns" and not finding.error
    assert "quay.io" in finding.message
    # Nodes told to use another resolver do not need ours to forward.
    assert upstream_findings(dgxpod(upstream_dns=[], dns_servers=["10.33.3.1"])) == []


# --- files as the daemon's user -------------------------------------------------------------


def _me() -> RunAs:
    from appliance.checks import current_user

    return current_user()


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder any user may enter (pytest's tmp_path may be its owner's alone)."""
    base = Path(tempfile.mkdtemp(prefix="appliance-unit-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


STRANGER = RunAs("stranger", 54321, frozenset({54321}))


def test_access_for_another_user(folder: Path) -> None:
    secret = folder / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    problem = access_problem(secret, STRANGER)
    assert problem is not None and problem.startswith(f"{secret} is not readable by user stranger")
    assert "mode 0600" in problem
    secret.chmod(0o644)
    assert access_problem(secret, STRANGER) is None
    folder.chmod(0o700)
    problem = access_problem(secret, STRANGER)
    assert problem is not None and f"it cannot enter {folder} (" in problem
    root = RunAs("root", 0, frozenset({0}))
    assert access_problem(secret, root) is None  # root reads past modes


def test_file_warnings_say_missing_empty_and_unreadable(folder: Path) -> None:
    raw = loopback_inventory(folder)
    raw["cluster"]["ignition_dir"] = str(folder / "ign")
    raw["boot"] = {
        "tftp_root": str(folder / "tftp"),
        "images_dir": str(folder / "img"),
        "kernel": "k",
        "initramfs": "i",
        "image": "m",
    }
    for sub in ("ign", "tftp", "img"):
        (folder / sub).mkdir()
        (folder / sub).chmod(0o755)
    (folder / "img/k").write_bytes(b"k")
    (folder / "img/k").chmod(0o600)
    (folder / "img/i").write_bytes(b"")
    plan = build_plan(parse_inventory(raw, "t.yaml", folder))
    got = {str(p) for p in file_warnings(plan, STRANGER)}
    assert f"boot.initramfs: {folder / 'img/i'} is empty (0 bytes): copy or download it again" in (
        got
    )
    assert f"boot.image: {folder / 'img/m'} is missing" in got
    assert any(
        g.startswith(f"boot.kernel: {folder / 'img/k'} is not readable by user stranger")
        for g in got
    )
    assert any("undionly.kpxe is missing (Debian's ipxe package" in g for g in got)


def test_a_running_appliance_is_told_apart() -> None:
    assert is_appliance_run(["/usr/bin/python3", "-m", "appliance", "run", "-c", "x"])
    assert is_appliance_run(["/opt/venv/bin/appliance", "--log-format", "json", "run"])
    assert not is_appliance_run(["/opt/venv/bin/appliance", "status"])
    assert not is_appliance_run(["dnsmasq", "-k"])
    assert not is_appliance_run([])
    plan = example()
    rows = [_row("udp", "127.0.0.1", 5353, 1), _row("tcp", "127.0.0.1", 5353, 2)]
    found = port_findings(plan, rows, {1: (40, "appliance"), 2: (41, "dnsmasq")})
    assert [str(f) for f in found] == [
        "listen.dns: port 5353/udp is held by appliance (pid 40): a running appliance: "
        "`appliance reload` hands it this inventory",
        "listen.dns: port 5353/tcp is held by dnsmasq (pid 41): stop it, or move listen.dns "
        "elsewhere",
    ]


def test_floating_addresses_and_an_unreadable_route_table() -> None:
    # keepalived-style: ip_nonlocal_bind=1, the VIP is on the other node now.
    found = address_findings(dgxpod(), host(*LOOPBACK, nonlocal_bind=True))
    assert keys(found) == [("network.address", False), ("load_balancer.address", False)]
    assert "ip_nonlocal_bind=1" in found[0].message
    # No local route read at all (netlink refused): unknown, not "missing".
    assert address_findings(dgxpod(), host()) == []
