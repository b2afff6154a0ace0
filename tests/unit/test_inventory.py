"""Inventory validation: every refusal names the key path and the reason, one line each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.inventory import (
    InventoryError,
    load_inventory,
    normalize_mac,
    parse_endpoint,
    parse_inventory,
)
from tests.helpers import CONFIG

Edit = Callable[[dict[str, Any]], None]


def _errors(raw: dict[str, Any], base: Path = CONFIG) -> list[str]:
    with pytest.raises(InventoryError) as info:
        parse_inventory(raw, "inv.yaml", base)
    return info.value.lines()


def _set(path: str, value: Any) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = raw
        for key in parents:
            target = target[int(key)] if key.isdigit() else target.setdefault(key, {})
        if last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value

    return edit


def _drop(path: str) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = raw
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        del target[last]

    return edit


def _append_node(**node: Any) -> Edit:
    return lambda raw: raw["nodes"].append(node)


CASES: list[tuple[str, Edit, list[str]]] = [
    (
        "unknown key",
        _set("network.subnett", "10.33.3.0/24"),
        ["inv.yaml: network.subnett: unknown key"],
    ),
    (
        "bad MAC",
        _set("nodes.1.mac", "52:54:00:00:03:5g"),
        [
            "inv.yaml: nodes[1].mac: '52:54:00:00:03:5g' is not a MAC address "
            "(six hex pairs separated by ':' or '-')"
        ],
    ),
    (
        "duplicate name",
        _set("nodes.2.name", "master-0"),
        ["inv.yaml: nodes[2].name: 'master-0' is already used by nodes[1]"],
    ),
    (
        "duplicate MAC, other spelling",
        _set("nodes.2.mac", "52-54-00-00-03-50"),
        ["inv.yaml: nodes[2].mac: 52:54:00:00:03:50 is already used by nodes[1] (master-0)"],
    ),
    (
        "duplicate IP",
        _set("nodes.5.ip", "10.33.3.44"),
        ["inv.yaml: nodes[5].ip: 10.33.3.44 is already used by nodes[4] (worker-0)"],
    ),
    (
        "IP outside the subnet",
        _set("nodes.4.ip", "10.33.4.44"),
        ["inv.yaml: nodes[4].ip: 10.33.4.44 is outside network.subnet 10.33.3.0/24"],
    ),
    (
        "IP is the load balancer",
        _set("nodes.4.ip", "10.33.3.54"),
        ["inv.yaml: nodes[4].ip: 10.33.3.54 is load_balancer.address"],
    ),
    (
        "no master",
        lambda raw: raw.update(nodes=[n for n in raw["nodes"] if n["role"] != "master"]),
        ["inv.yaml: nodes: no node has role master (at least one is required)"],
    ),
    (
        "two bootstraps",
        _append_node(
            name="bootstrap-2", role="bootstrap", mac="52:54:00:00:03:60", ip="10.33.3.60"
        ),
        ["inv.yaml: nodes[6].role: a second bootstrap node (nodes[0] is one; at most one)"],
    ),
    (
        "unknown role",
        _set("nodes.4.role", "compute"),
        ["inv.yaml: nodes[4].role: 'compute': should be 'bootstrap', 'master' or 'worker'"],
    ),
    (
        "dhcp_range over reserved addresses",
        _set("network.dhcp_range", ["10.33.3.100", "10.33.3.200"]),
        [],  # clear of every reserved address: valid
    ),
    (
        "dhcp_range covers a node",
        _set("network.dhcp_range", ["10.33.3.40", "10.33.3.49"]),
        [
            "inv.yaml: network.dhcp_range: 10.33.3.40-10.33.3.49 contains 10.33.3.44, "
            "reserved for nodes[4] (worker-0)",
            "inv.yaml: network.dhcp_range: 10.33.3.40-10.33.3.49 contains 10.33.3.46, "
            "reserved for nodes[5] (worker-1)",
        ],
    ),
    (
        "dhcp_range outside the subnet",
        _set("network.dhcp_range", ["10.33.3.100", "10.33.4.10"]),
        ["inv.yaml: network.dhcp_range[1]: 10.33.4.10 is outside network.subnet 10.33.3.0/24"],
    ),
    (
        "dhcp_range reversed",
        _set("network.dhcp_range", ["10.33.3.200", "10.33.3.100"]),
        ["inv.yaml: network.dhcp_range: first address 10.33.3.200 is after last 10.33.3.100"],
    ),
    (
        "listen address does not parse",
        _set("listen.dns", "localhost:53"),
        ["inv.yaml: listen.dns: 'localhost:53' is not host:port: 'localhost' is not an IP address"],
    ),
    (
        "listen port missing",
        _set("listen.http", "0.0.0.0"),
        ["inv.yaml: listen.http: '0.0.0.0' is not host:port (the port is missing)"],
    ),
    (
        "two services on one host:port",
        _set("listen.tftp", "10.33.3.18:53"),
        ["inv.yaml: listen.tftp: 10.33.3.18:53 (udp) is already used by listen.dns (0.0.0.0:53)"],
    ),
    (
        "missing address",
        _drop("network.address"),
        ["inv.yaml: network.address: required key is missing"],
    ),
    (
        "subnet with host bits",
        _set("network.subnet", "10.33.3.18/24"),
        [
            "inv.yaml: network.subnet: '10.33.3.18/24' is not an IPv4 network in CIDR form "
            "(host bits are set)"
        ],
    ),
    (
        "name that is not a DNS label",
        _set("nodes.4.name", "Worker_0"),
        [
            "inv.yaml: nodes[4].name: 'Worker_0' is not a lowercase DNS label (a-z, 0-9 and "
            "'-', at most 63 characters, no leading or trailing '-')"
        ],
    ),
    (
        "node named like a derived record",
        _set("nodes.4.name", "api-int"),
        ["inv.yaml: nodes[4].name: 'api-int' clashes with a name the appliance derives"],
    ),
    (
        "gateway outside the subnet",
        _set("network.gateway", "10.33.4.1"),
        ["inv.yaml: network.gateway: 10.33.4.1 is outside network.subnet 10.33.3.0/24"],
    ),
    (
        "wrong type for a flag",
        _set("cluster.etcd_records", "sometimes"),
        [
            "inv.yaml: cluster.etcd_records: 'sometimes': should be a valid boolean, "
            "unable to interpret input"
        ],
    ),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_inventory_lines(
    dgxpod_raw: dict[str, Any], edit: Edit, expected: list[str]
) -> None:
    edit(dgxpod_raw)
    if not expected:
        parse_inventory(dgxpod_raw, "inv.yaml", CONFIG)
        return
    assert _errors(dgxpod_raw) == expected


def test_every_problem_is_reported_at_once(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["nodes"][1]["mac"] = "zz"
    dgxpod_raw["nodes"][2]["ip"] = "10.33.9.9"
    dgxpod_raw["bogus"] = 1
    lines = _errors(dgxpod_raw)
    assert lines == [
        "inv.yaml: nodes[1].mac: 'zz' is not a MAC address (six hex pairs separated by ':' or '-')",
        "inv.yaml: bogus: unknown key",
    ]  # shape errors come first; cross-key checks need a well-formed inventory


def test_the_examples_load() -> None:
    for name in ("dgxpod.yaml", "example.yaml"):
        loaded = load_inventory(CONFIG / name)
        assert loaded.inventory.nodes


def test_unquoted_mac_stays_a_mac(tmp_path: Path) -> None:
    # YAML 1.1 reads 52:54:00:00:00:01 as a base-60 integer; our loader must not.
    text = (CONFIG / "dgxpod.yaml").read_text().replace('"52:54:00:00:03:50"', "52:54:00:00:03:50")
    assert "mac: 52:54:00:00:03:50," in text
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    assert load_inventory(path).inventory.nodes[1].mac == "52:54:00:00:03:50"


def test_duplicate_yaml_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("cluster:\n  name: a\n  name: b\n")
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert info.value.lines() == [
        f"{path}: line 3, column 3: key 'name' appears twice in one mapping"
    ]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("cluster:\n  name: [a\nnetwork: {}\n")
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    (line,) = info.value.lines()
    assert line.startswith(f"{path}: line ") and "YAML syntax error" in line


def test_install_config_supplies_name_domain_and_subnet(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    (tmp_path / "install-config.yaml").write_text(
        "apiVersion: v1\nbaseDomain: nvidia.com\nmetadata: {name: dgxpod}\n"
        "networking:\n  machineNetwork: [{cidr: 10.33.3.0/24}]\n"
        "pullSecret: '{}'\n"
    )
    del dgxpod_raw["cluster"]["name"], dgxpod_raw["cluster"]["base_domain"]
    del dgxpod_raw["network"]["subnet"]
    dgxpod_raw["cluster"]["install_config"] = "install-config.yaml"
    inv = parse_inventory(dgxpod_raw, "inv.yaml", tmp_path).inventory
    assert (inv.cluster.name, inv.cluster.base_domain) == ("dgxpod", "nvidia.com")
    assert str(inv.network.subnet) == "10.33.3.0/24"
    # An explicit key must agree (tests/unit/test_install_config.py: a differing one is refused).
    dgxpod_raw["cluster"]["name"] = "dgxpod"
    assert parse_inventory(dgxpod_raw, "inv.yaml", tmp_path).inventory.cluster.name == "dgxpod"


def test_install_config_legacy_machine_cidr_and_missing_file(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    # The article's own install-config: machineCIDR 10.0.0.0/16 does not hold the nodes.
    (tmp_path / "ic.yaml").write_text(
        "baseDomain: nvidia.com\nmetadata: {name: dgxpod}\nnetworking: {machineCIDR: 10.0.0.0/16}\n"
    )
    del dgxpod_raw["network"]["subnet"]
    dgxpod_raw["cluster"]["install_config"] = "ic.yaml"
    lines = _errors(dgxpod_raw, tmp_path)
    assert lines[0] == (
        "inv.yaml: network.gateway: 10.33.3.1 is outside network.subnet "
        "(from ic.yaml networking.machineCIDR) 10.0.0.0/16"
    )
    dgxpod_raw["cluster"]["install_config"] = "missing.yaml"
    dgxpod_raw["network"]["subnet"] = "10.33.3.0/24"
    assert _errors(dgxpod_raw, tmp_path) == [
        "inv.yaml: cluster.install_config: cannot read "
        f"{tmp_path / 'missing.yaml'}: No such file or directory"
    ]


@pytest.mark.parametrize(
    ("text", "mac"),
    [
        ("52:54:00:AA:bb:01", "52:54:00:aa:bb:01"),
        ("52-54-00-aa-bb-01", "52:54:00:aa:bb:01"),
        ("5254.00aa.bb01", "52:54:00:aa:bb:01"),
        ("525400aabb01", "52:54:00:aa:bb:01"),
    ],
)
def test_mac_spellings(text: str, mac: str) -> None:
    assert normalize_mac(text) == mac


@pytest.mark.parametrize("text", ["52:54:00:aa:bb", "52:54:00:aa:bb:01:02", "5254.00aabb01", 42])
def test_mac_refused(text: Any) -> None:
    with pytest.raises(ValueError):
        normalize_mac(text)


def test_endpoints() -> None:
    assert str(parse_endpoint("[::1]:53")) == "[::1]:53"
    assert parse_endpoint("192.0.2.1", default_port=53).port == 53
    with pytest.raises(ValueError):
        parse_endpoint("192.0.2.1:70000")


def test_defaults_match_the_contract(dgxpod_raw: dict[str, Any]) -> None:
    inv = parse_inventory(dgxpod_raw, "inv.yaml", CONFIG).inventory
    assert inv.network.lease_time == 3600 and inv.network.dhcp_mode == "server"
    assert inv.load_balancer.backend_ports.machine_config == 22623
    assert str(inv.listen.dns) == "0.0.0.0:53" and str(inv.listen.admin) == "127.0.0.1:9000"
    assert inv.boot.after_install == "localboot" and inv.state_dir == "/var/lib/appliance"
    assert inv.kubernetes.kubeconfig is None and inv.kubernetes.approve_csrs is True
