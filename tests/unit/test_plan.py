"""The plan of the article's cluster equals the article's records (shared/SEED.md)."""

from __future__ import annotations

import dataclasses
import importlib.util
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from appliance.inventory import load_inventory, parse_inventory
from appliance.plan import (
    ARecord,
    NsRecord,
    Plan,
    PtrRecord,
    SrvRecord,
    build_plan,
    reverse_origin,
    reverse_zones,
)
from tests.helpers import CONFIG, loopback_inventory

D = "dgxpod.nvidia.com"


@pytest.fixture(scope="module")
def plan() -> Plan:
    return build_plan(load_inventory(CONFIG / "dgxpod.yaml"))


def _records(plan: Plan, kind: type) -> list[Any]:
    return [r for z in plan.dns.zones for r in z.records if isinstance(r, kind)]


def test_a_records_are_the_article_hosts_file(plan: Plan) -> None:
    a = {(r.name, str(r.address)) for r in _records(plan, ARecord)}
    assert a == {
        (f"worker-0.{D}", "10.33.3.44"),
        (f"worker-1.{D}", "10.33.3.46"),
        (f"master-0.{D}", "10.33.3.50"),
        (f"etcd-0.{D}", "10.33.3.50"),
        (f"master-1.{D}", "10.33.3.51"),
        (f"etcd-1.{D}", "10.33.3.51"),
        (f"master-2.{D}", "10.33.3.52"),
        (f"etcd-2.{D}", "10.33.3.52"),
        (f"bootstrap.{D}", "10.33.3.53"),
        (f"api-int.{D}", "10.33.3.54"),
        (f"api.{D}", "10.33.3.54"),
        (f"*.apps.{D}", "10.33.3.54"),  # address=/apps.dgxpod.nvidia.com/10.33.3.54
        (f"ns.{D}", "10.33.3.18"),  # the zone's name server: the appliance
    }


def test_ptr_first_name_is_the_node(plan: Plan) -> None:
    ptr = [(r.name, r.target) for r in _records(plan, PtrRecord)]
    assert ("50.3.33.10.in-addr.arpa", f"master-0.{D}") in ptr
    assert [t for n, t in ptr if n == "50.3.33.10.in-addr.arpa"] == [f"master-0.{D}"]
    assert [t for n, t in ptr if n == "54.3.33.10.in-addr.arpa"] == [f"api.{D}", f"api-int.{D}"]
    assert not any("apps" in t for _, t in ptr)  # no PTR for the wildcard
    assert len(ptr) == 8


def test_etcd_srv_records(plan: Plan) -> None:
    srv = [(r.name, r.priority, r.weight, r.port, r.target) for r in _records(plan, SrvRecord)]
    assert srv == [(f"_etcd-server-ssl._tcp.{D}", 0, 10, 2380, f"etcd-{i}.{D}") for i in range(3)]


def test_soa_and_ns_at_each_apex(plan: Plan) -> None:
    assert [z.origin for z in plan.dns.zones] == [D, "3.33.10.in-addr.arpa"]
    for zone in plan.dns.zones:
        assert zone.soa.name == zone.origin and zone.soa.mname == f"ns.{D}"
        assert NsRecord(zone.origin, f"ns.{D}") in zone.records


def test_etcd_records_switch(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["cluster"]["etcd_records"] = False
    plan = build_plan(parse_inventory(dgxpod_raw, "x.yaml", CONFIG))
    assert not _records(plan, SrvRecord)
    assert not [r for r in _records(plan, ARecord) if r.name.startswith("etcd-")]


def test_load_balancer_frontends(plan: Plan) -> None:
    pools = {
        fe.name: [(b.name, str(b.address), b.port) for b in fe.backends] for fe in plan.frontends
    }
    control = ["bootstrap", "master-0", "master-1", "master-2"]
    ips = {
        "bootstrap": "10.33.3.53",
        "master-0": "10.33.3.50",
        "master-1": "10.33.3.51",
        "master-2": "10.33.3.52",
        "worker-0": "10.33.3.44",
        "worker-1": "10.33.3.46",
    }
    assert pools == {
        "api": [(n, ips[n], 6443) for n in control],
        "machine_config": [(n, ips[n], 22623) for n in control],
        "ingress_http": [(n, ips[n], 80) for n in ("worker-0", "worker-1")],
        "ingress_https": [(n, ips[n], 443) for n in ("worker-0", "worker-1")],
    }
    assert [str(fe.listen) for fe in plan.frontends] == [
        "0.0.0.0:6443",
        "0.0.0.0:22623",
        "0.0.0.0:80",
        "0.0.0.0:443",
    ]


def test_ingress_falls_back_to_masters(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["nodes"] = [n for n in dgxpod_raw["nodes"] if n["role"] != "worker"]
    plan = build_plan(parse_inventory(dgxpod_raw, "x.yaml", CONFIG))
    assert [b.name for b in plan.frontend("ingress_https").backends] == [
        "master-0",
        "master-1",
        "master-2",
    ]


def test_boot_parameters(plan: Plan) -> None:
    worker = plan.boot.by_mac["02:00:00:00:03:44"]
    assert worker.ignition_url == "http://10.33.3.18:8080/ignition/worker.ign"
    assert worker.install_device == "/dev/sda"  # node override
    assert plan.boot.by_mac["52:54:00:00:03:53"].ignition_file == "bootstrap.ign"
    master = plan.boot.by_mac["52:54:00:00:03:50"]
    assert master.kernel_args == (
        "ip=dhcp",
        "rd.neednet=1",
        "console=tty0",
        "console=ttyS0",
        "coreos.inst=yes",
        "coreos.inst.install_dev=vda",
        "coreos.inst.image_url=http://10.33.3.18:8080/images/rhcos/"
        "rhcos-410.8.20190412.1-metal-bios.raw",
        "coreos.inst.ignition_url=http://10.33.3.18:8080/ignition/master.ign",
    )


def test_node_kernel_args_and_rootfs(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["nodes"][4]["kernel_args"] = ["ip=enp1s0f0:dhcp"]
    dgxpod_raw["boot"]["rootfs"] = "rhcos/rootfs.img"
    dgxpod_raw["boot"]["image"] = None
    dgxpod_raw["listen"] = {"http": "0.0.0.0:80", "ingress_http": None}
    plan = build_plan(parse_inventory(dgxpod_raw, "x.yaml", CONFIG))
    args = plan.boot.by_mac["02:00:00:00:03:44"].kernel_args
    assert args[0] == "ip=enp1s0f0:dhcp"  # in the place of the derived ip=dhcp
    assert [a for a in args if a.startswith("ip=")] == ["ip=enp1s0f0:dhcp"]
    assert "coreos.live.rootfs_url=http://10.33.3.18/images/rhcos/rootfs.img" in args
    assert not any(a.startswith("coreos.inst.image_url") for a in args)


def test_dhcp_plan(plan: Plan) -> None:
    dhcp = plan.dhcp
    assert dhcp.server_id == dhcp.next_server == IPv4Address("10.33.3.18")
    assert dhcp.dns_servers == (IPv4Address("10.33.3.18"),)  # empty list = [address]
    assert dhcp.router == IPv4Address("10.33.3.1") and dhcp.domain == D
    assert dhcp.by_mac["52:54:00:00:03:51"].hostname == "master-1"
    assert dhcp.boot_files.ipxe_script_url == "http://10.33.3.18:8080/boot.ipxe"


def test_csr_allow_list_and_forwarding_defaults(plan: Plan) -> None:
    first = plan.csr_allow[0]
    assert (first.name, first.fqdn, str(first.ip)) == (
        "bootstrap",
        f"bootstrap.{D}",
        "10.33.3.53",
    )
    assert [str(n) for n in plan.dns.forward_allowed] == ["10.33.3.0/24", "127.0.0.0/8", "::1/128"]
    assert plan.kubernetes.kubeconfig == CONFIG / "ignition" / "auth" / "kubeconfig"


def test_plan_is_immutable_and_plain(plan: Plan) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.cluster = "x"  # type: ignore[misc]  # frozen: mypy refuses it too
    data = plan.to_dict()
    assert data["domain"] == D and data["frontends"][0]["listen"] == "0.0.0.0:6443"
    assert data["dns"]["zones"][0]["records"][0] == {"type": "NS", "name": D, "target": f"ns.{D}"}


@pytest.mark.parametrize(
    ("subnet", "origins"),
    [
        ("10.33.3.0/24", ["3.33.10.in-addr.arpa"]),
        ("10.33.3.64/26", ["3.33.10.in-addr.arpa"]),
        ("10.32.0.0/15", ["32.10.in-addr.arpa", "33.10.in-addr.arpa"]),
        ("10.33.0.0/22", [f"{i}.33.10.in-addr.arpa" for i in range(4)]),
    ],
)
def test_reverse_zones(subnet: str, origins: list[str]) -> None:
    from ipaddress import IPv4Network

    assert [reverse_origin(z) for z in reverse_zones(IPv4Network(subnet))] == origins


def test_same_inventory_same_serial() -> None:
    a = build_plan(load_inventory(CONFIG / "dgxpod.yaml"))
    b = build_plan(load_inventory(CONFIG / "dgxpod.yaml"))
    assert a.dns.zones[0].soa.serial == b.dns.zones[0].soa.serial


def test_check_warns_when_the_tftp_loop_in_c_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`appliance check` says when services.tftp._lockstep was not built (no compiler)."""
    from appliance import checks

    plan = build_plan(load_inventory(CONFIG / "dgxpod.yaml"))
    built: dict[str, object] = {}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: built.get(name))
    no_tftp = build_plan(parse_inventory(loopback_inventory(tmp_path), "inv.yaml", tmp_path))
    assert "tftp" not in no_tftp.listen and checks.install_warnings(no_tftp) == []
    [problem] = checks.install_warnings(plan)
    assert problem.path == "listen.tftp" and "runs in Python" in problem.message
    built["services.tftp._lockstep"] = object()
    assert checks.install_warnings(plan) == []
