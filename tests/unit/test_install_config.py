"""install-config.yaml cross-check: the inventory and the file openshift-install consumed
must describe the same cluster.

The ignition files carry certificates for `<metadata.name>.<baseDomain>`, so a different
name or domain in the inventory is an error; counts and node addresses that disagree are
warnings (shown by `check`, logged by `run`); IPv6 anywhere is refused for now. Every line
about a value read from install-config.yaml says where it came from.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.inventory import InventoryError, load_inventory, parse_inventory
from appliance.supervisor import load_plan
from tests.helpers import write_inventory

PULL_SECRET = '{"auths":{"cloud.openshift.com":{"auth":"c2VjcmV0","email":"ops@example.com"}}}'


def current_ic(
    *,
    name: str = "dgxpod",
    base_domain: str = "nvidia.com",
    masters: int | None = 3,
    workers: int | None = 2,
    machine_network: str = "  machineNetwork:\n  - cidr: 10.33.3.0/24\n",
    cluster_network: str = "10.128.0.0/14",
    service_network: str = "172.30.0.0/16",
) -> str:
    """An install-config.yaml as `openshift-install create install-config` writes it today."""
    cp_replicas = f"  replicas: {masters}\n" if masters is not None else ""
    w_replicas = f"  replicas: {workers}\n" if workers is not None else ""
    return (
        "apiVersion: v1\n"
        f"baseDomain: {base_domain}\n"
        "compute:\n"
        "- architecture: amd64\n"
        "  hyperthreading: Enabled\n"
        "  name: worker\n"
        "  platform: {}\n"
        f"{w_replicas}"
        "controlPlane:\n"
        "  architecture: amd64\n"
        "  hyperthreading: Enabled\n"
        "  name: master\n"
        "  platform: {}\n"
        f"{cp_replicas}"
        "metadata:\n"
        "  creationTimestamp: null\n"
        f"  name: {name}\n"
        "networking:\n"
        "  clusterNetwork:\n"
        f"  - cidr: {cluster_network}\n"
        "    hostPrefix: 23\n"
        f"{machine_network}"
        "  networkType: OVNKubernetes\n"
        "  serviceNetwork:\n"
        f"  - {service_network}\n"
        "platform:\n"
        "  none: {}\n"
        "publish: External\n"
        f"pullSecret: '{PULL_SECRET}'\n"
        "sshKey: |\n"
        "  ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsomethingsomething ops@prov\n"
    )


# The 4.1-era file of the article (shared/SEED.md): machineCIDR, flow-style pools.
SEED_IC = """\
apiVersion: v1
baseDomain: nvidia.com
compute: [{hyperthreading: Enabled, name: worker, platform: {}, replicas: 2}]
controlPlane: {hyperthreading: Enabled, name: master, platform: {}, replicas: 3}
metadata: {name: dgxpod}
networking:
  clusterNetwork: [{cidr: 10.128.0.0/14, hostPrefix: 23}]
  networkType: OpenShiftSDN
  machineCIDR: 10.0.0.0/16
  serviceNetwork: [172.30.0.0/16]
platform: {none: {}}
pullSecret: '{"auths": {}}'
sshKey: ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ ops@prov
"""


def _with_ic(raw: dict[str, Any], tmp_path: Path, text: str) -> dict[str, Any]:
    (tmp_path / "install-config.yaml").write_text(text)
    raw["cluster"]["install_config"] = "install-config.yaml"
    return raw


def _errors(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(InventoryError) as info:
        parse_inventory(raw, "inv.yaml", tmp_path)
    return info.value.lines()


def _warnings(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    return [str(w) for w in parse_inventory(raw, "inv.yaml", tmp_path).warnings]


def test_matching_install_config_is_silent(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic())
    loaded = parse_inventory(dgxpod_raw, "inv.yaml", tmp_path)
    assert loaded.warnings == ()
    assert loaded.inventory.cluster.name == "dgxpod"


# --- name and domain: errors naming both values ---------------------------------------


def test_cluster_name_differing_from_install_config_is_an_error(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(name="gpupod"))
    assert _errors(dgxpod_raw, tmp_path) == [
        "inv.yaml: cluster.name: 'dgxpod' differs from 'gpupod' (from install-config.yaml "
        "metadata.name): the ignition files' certificates are for gpupod.nvidia.com; "
        "write cluster.name: gpupod or remove the key"
    ]


def test_base_domain_differing_from_install_config_is_an_error(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(base_domain="lab.nvidia.com"))
    assert _errors(dgxpod_raw, tmp_path) == [
        "inv.yaml: cluster.base_domain: 'nvidia.com' differs from 'lab.nvidia.com' (from "
        "install-config.yaml baseDomain): the ignition files' certificates are for "
        "dgxpod.lab.nvidia.com; write cluster.base_domain: lab.nvidia.com or remove the key"
    ]


def test_domain_spelling_is_not_a_difference(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    # DNS names compare without case and without the root dot.
    _with_ic(dgxpod_raw, tmp_path, current_ic(base_domain="NVIDIA.com."))
    dgxpod_raw["cluster"]["base_domain"] = "nvidia.com."
    assert _warnings(dgxpod_raw, tmp_path) == []


def test_mismatch_exits_2_on_check(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(name="gpupod"))
    config = write_inventory(tmp_path / "inv.yaml", dgxpod_raw)
    with pytest.raises(InventoryError):
        load_inventory(config)
    assert main(["check", "--config", str(config)]) == 2


def test_values_taken_from_install_config_say_so(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    # name and subnet read from the file: a bad value names the file and the key in it.
    _with_ic(
        dgxpod_raw,
        tmp_path,
        current_ic(name="DGX_pod", machine_network="  machineNetwork:\n  - cidr: 10.0.0.0/16\n"),
    )
    del dgxpod_raw["cluster"]["name"], dgxpod_raw["network"]["subnet"]
    lines = _errors(dgxpod_raw, tmp_path)
    assert lines[0] == (
        "inv.yaml: cluster.name (from install-config.yaml metadata.name): 'DGX_pod' is not a "
        "lowercase DNS label (a-z, 0-9 and '-', at most 63 characters, no leading or "
        "trailing '-')"
    )
    dgxpod_raw["cluster"]["name"] = "dgxpod"
    (tmp_path / "install-config.yaml").write_text(
        current_ic(machine_network="  machineNetwork:\n  - cidr: 10.0.0.0/16\n")
    )
    lines = _errors(dgxpod_raw, tmp_path)
    assert lines[0] == (
        "inv.yaml: network.gateway: 10.33.3.1 is outside network.subnet (from "
        "install-config.yaml networking.machineNetwork[0].cidr) 10.0.0.0/16"
    )


def test_key_missing_in_both_says_so(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic().replace("baseDomain: nvidia.com\n", ""))
    del dgxpod_raw["cluster"]["base_domain"]
    assert _errors(dgxpod_raw, tmp_path) == [
        "inv.yaml: cluster.base_domain: required key is missing (install-config.yaml has no "
        "baseDomain either)"
    ]


# --- replicas: warnings --------------------------------------------------------------


def test_control_plane_replicas_differing_is_a_warning(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(masters=5))
    assert _warnings(dgxpod_raw, tmp_path) == [
        "nodes: 3 nodes have role master, but controlPlane.replicas is 5 (from "
        "install-config.yaml controlPlane.replicas): the cluster is made for 5 control-plane "
        "nodes (etcd members the bootstrap waits for); change the master nodes, or fix "
        "install-config.yaml and create the ignition files again"
    ]


def test_replicas_left_out_mean_openshift_installs_default_of_3(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(masters=None, workers=None))
    assert _warnings(dgxpod_raw, tmp_path) == [
        "nodes: 2 nodes have role worker, but compute replicas are 3 (from install-config.yaml "
        "compute[0].replicas, not set: openshift-install's default); with no machine sets "
        "(platform none) workers join as their CSRs are approved: fix whichever is wrong"
    ]


def test_compute_zero_with_workers_warns_that_masters_become_schedulable(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(workers=0))
    (line,) = _warnings(dgxpod_raw, tmp_path)
    assert line.startswith(
        "nodes: 2 nodes have role worker, but compute replicas are 0 (from install-config.yaml "
        "compute[0].replicas): openshift-install then makes the masters schedulable"
    )


def test_compute_replicas_without_workers_warns_that_ingress_has_nowhere_to_run(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    dgxpod_raw["nodes"] = [n for n in dgxpod_raw["nodes"] if n["role"] != "worker"]
    _with_ic(dgxpod_raw, tmp_path, current_ic(workers=2))
    (line,) = _warnings(dgxpod_raw, tmp_path)
    assert line.startswith("nodes: 0 nodes have role worker, but compute replicas are 2")
    assert "masters stay unschedulable" in line


def test_compute_pools_are_summed(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    text = current_ic(workers=1).replace(
        "controlPlane:\n", "- name: worker\n  replicas: 1\ncontrolPlane:\n"
    )
    _with_ic(dgxpod_raw, tmp_path, text)
    assert _warnings(dgxpod_raw, tmp_path) == []


# --- machineNetwork: node addresses --------------------------------------------------


def test_node_outside_machine_network_is_a_warning(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    # machineNetwork holds the masters' /25, a worker sits in the upper half.
    _with_ic(
        dgxpod_raw,
        tmp_path,
        current_ic(machine_network="  machineNetwork:\n  - cidr: 10.33.3.0/26\n"),
    )
    dgxpod_raw["nodes"][5]["ip"] = "10.33.3.100"
    assert _warnings(dgxpod_raw, tmp_path) == [
        "nodes[5].ip: 10.33.3.100 is outside machineNetwork 10.33.3.0/26 (from "
        "install-config.yaml networking.machineNetwork[0].cidr): OpenShift expects every "
        "node address inside it; widen machineNetwork or move the node"
    ]


def test_seed_install_config_machine_cidr_outside_every_node(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    # The article's own files: machineCIDR 10.0.0.0/16 holds none of 10.33.3.0/24.
    _with_ic(dgxpod_raw, tmp_path, SEED_IC)
    assert _warnings(dgxpod_raw, tmp_path) == [
        "nodes: every node address (network.subnet 10.33.3.0/24) is outside machineNetwork "
        "10.0.0.0/16 (from install-config.yaml networking.machineCIDR): OpenShift expects "
        "every node address inside it; set it to the nodes' network"
    ]


def test_machine_network_wins_over_machine_cidr(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    # openshift-install ignores the deprecated machineCIDR when machineNetwork is set.
    text = current_ic().replace("  networkType:", "  machineCIDR: 10.0.0.0/16\n  networkType:")
    _with_ic(dgxpod_raw, tmp_path, text)
    del dgxpod_raw["network"]["subnet"]
    loaded = parse_inventory(dgxpod_raw, "inv.yaml", tmp_path)
    assert str(loaded.inventory.network.subnet) == "10.33.3.0/24"
    assert loaded.warnings == ()


def test_node_subnet_overlapping_the_service_network_is_an_error(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(service_network="10.33.0.0/16"))
    assert _errors(dgxpod_raw, tmp_path) == [
        "inv.yaml: network.subnet: 10.33.3.0/24 overlaps serviceNetwork 10.33.0.0/16 (from "
        "install-config.yaml networking.serviceNetwork[0]): nodes would be unreachable from "
        "pods; choose another serviceNetwork before creating the ignition files"
    ]


# --- IPv6: refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "where", "kind"),
    [
        (
            "  machineNetwork:\n  - cidr: fd00:33:3::/64\n",
            "networking.machineNetwork[0].cidr",
            "an IPv6",
        ),
        (
            "  machineNetwork:\n  - cidr: 10.33.3.0/24\n  - cidr: fd00:33:3::/64\n",
            "networking.machineNetwork[1].cidr",
            "a dual-stack",
        ),
    ],
)
def test_ipv6_machine_network_is_refused(
    tmp_path: Path, dgxpod_raw: dict[str, Any], networks: str, where: str, kind: str
) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(machine_network=networks))
    assert _errors(dgxpod_raw, tmp_path) == [
        f"inv.yaml: cluster.install_config: fd00:33:3::/64 (from install-config.yaml {where}) "
        f"is IPv6: {kind} cluster is not supported yet (DHCPv4, IPv4 DNS and PXE only); "
        "use IPv4 networks only"
    ]


def test_ipv6_cluster_and_service_networks_are_refused(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    _with_ic(
        dgxpod_raw,
        tmp_path,
        current_ic(cluster_network="fd01::/48", service_network="fd02::/112"),
    )
    lines = _errors(dgxpod_raw, tmp_path)
    assert [line.split(" is IPv6")[0] for line in lines] == [
        "inv.yaml: cluster.install_config: fd01::/48 (from install-config.yaml "
        "networking.clusterNetwork[0].cidr)",
        "inv.yaml: cluster.install_config: fd02::/112 (from install-config.yaml "
        "networking.serviceNetwork[0])",
    ]
    assert all("not supported yet" in line for line in lines)


def test_unreadable_network_value_is_an_error(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    _with_ic(
        dgxpod_raw,
        tmp_path,
        current_ic(machine_network="  machineNetwork:\n  - cidr: 10.33.3.0/33\n"),
    )
    assert _errors(dgxpod_raw, tmp_path) == [
        "inv.yaml: cluster.install_config: '10.33.3.0/33' (from install-config.yaml "
        "networking.machineNetwork[0].cidr) is not an IP network in CIDR form"
    ]


def test_secrets_never_appear_in_messages(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(name="gpupod", masters=1, workers=0))
    text = "\n".join(_errors(dgxpod_raw, tmp_path))
    assert "c2VjcmV0" not in text and "ssh-ed25519" not in text


# --- where warnings show: check prints them, run logs them ------------------------------


def test_check_prints_install_config_warnings(
    tmp_path: Path, dgxpod_raw: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(masters=1))
    config = write_inventory(tmp_path / "inv.yaml", dgxpod_raw)
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "warning: nodes: 3 nodes have role master, but controlPlane.replicas is 1" in out


def test_run_logs_install_config_warnings_at_start(
    tmp_path: Path, dgxpod_raw: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic(masters=1))
    config = write_inventory(tmp_path / "inv.yaml", dgxpod_raw)
    with caplog.at_level(logging.WARNING):
        load_plan(config)
    (record,) = [r for r in caplog.records if "controlPlane.replicas" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"{config}: nodes: 3 nodes have role master")


def test_compute_left_empty_means_the_default_pool(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    # openshift-install turns `compute: []` into one worker pool of 3, as when left out.
    text = current_ic().split("compute:\n")[0] + "compute: []\ncontrolPlane:\n"
    text += current_ic().split("controlPlane:\n")[1]
    _with_ic(dgxpod_raw, tmp_path, text)
    (line,) = _warnings(dgxpod_raw, tmp_path)
    assert "compute replicas are 3 (from install-config.yaml compute, not set: " in line


def test_not_a_regular_file_is_refused_without_blocking(
    tmp_path: Path, dgxpod_raw: dict[str, Any]
) -> None:
    # A FIFO (or /dev/zero) named by mistake must not hang `run` or a reload.
    fifo = tmp_path / "ic.fifo"
    os.mkfifo(fifo)
    dgxpod_raw["cluster"]["install_config"] = str(fifo)
    result: list[list[str]] = []
    worker = threading.Thread(target=lambda: result.append(_errors(dgxpod_raw, tmp_path)))
    worker.start()
    worker.join(2)
    if worker.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "w"):
            pass
        worker.join(2)
        pytest.fail("reading install_config blocked on a FIFO")
    assert result == [[f"inv.yaml: cluster.install_config: {fifo} is not a regular file"]]
    dgxpod_raw["cluster"]["install_config"] = "/dev/zero"
    assert _errors(dgxpod_raw, tmp_path) == [
        "inv.yaml: cluster.install_config: /dev/zero is not a regular file"
    ]


def test_oversized_file_is_refused(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    _with_ic(dgxpod_raw, tmp_path, current_ic() + "#" * (1 << 20))
    assert _errors(dgxpod_raw, tmp_path) == [
        f"inv.yaml: cluster.install_config: {tmp_path / 'install-config.yaml'} is larger "
        "than 1 MiB: not an install-config"
    ]
