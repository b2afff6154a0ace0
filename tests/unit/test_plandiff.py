"""The plan diff a reload logs: nodes, records, backends, listeners and settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.inventory import parse_inventory
from appliance.plan import Plan, build_plan
from appliance.plandiff import Change, diff_plans

D = "dgxpod.nvidia.com"


def _plan(raw: dict[str, Any]) -> Plan:
    return build_plan(parse_inventory(raw, "inv.yaml", Path("/srv/appliance")))


def _names(changes: list[Change]) -> set[str]:
    return {c.name for c in changes}


def test_same_inventory_is_no_change(dgxpod_raw: dict[str, Any]) -> None:
    diff = diff_plans(_plan(dgxpod_raw), _plan(dgxpod_raw))
    assert not diff
    assert diff.summary() == "no changes"
    assert diff.lines() == []


def test_added_worker_adds_node_records_and_ingress_backends(dgxpod_raw: dict[str, Any]) -> None:
    old = _plan(dgxpod_raw)
    dgxpod_raw["nodes"].append(
        {"name": "worker-2", "role": "worker", "mac": "52:54:00:00:00:99", "ip": "10.33.3.47"}
    )
    diff = diff_plans(old, _plan(dgxpod_raw))
    assert diff.of("node") == [
        Change("node", "added", "worker-2", "worker 10.33.3.47 52:54:00:00:00:99")
    ]
    assert _names(diff.of("record", "added")) == {
        f"A worker-2.{D}",
        "PTR 47.3.33.10.in-addr.arpa",
    }
    assert not diff.of("record", "removed") and not diff.of("record", "changed")
    assert {(c.name, c.detail) for c in diff.of("backend")} == {
        ("ingress_http/worker-2", "10.33.3.47:80"),
        ("ingress_https/worker-2", "10.33.3.47:443"),
    }
    assert not diff.of("setting") and not diff.of("listen")
    assert diff.summary() == "nodes +1 -0 ~0, records +2 -0 ~0, backends +2 -0 ~0"


def test_removed_bootstrap_leaves_records_and_control_plane_backends(
    dgxpod_raw: dict[str, Any],
) -> None:
    old = _plan(dgxpod_raw)
    dgxpod_raw["nodes"] = [n for n in dgxpod_raw["nodes"] if n["role"] != "bootstrap"]
    diff = diff_plans(old, _plan(dgxpod_raw))
    assert [(c.action, c.name) for c in diff.of("node")] == [("removed", "bootstrap")]
    assert _names(diff.of("record", "removed")) == {
        f"A bootstrap.{D}",
        "PTR 53.3.33.10.in-addr.arpa",
    }
    assert _names(diff.of("backend", "removed")) == {
        "api/bootstrap",
        "machine_config/bootstrap",
    }
    assert diff.of("backend", "removed")[0].detail == "10.33.3.53:6443"


def test_moved_master_is_a_change_everywhere_it_appears(dgxpod_raw: dict[str, Any]) -> None:
    old = _plan(dgxpod_raw)
    master = next(n for n in dgxpod_raw["nodes"] if n["name"] == "master-1")
    master["ip"] = "10.33.3.61"
    master["install_device"] = "/dev/nvme0n1"
    diff = diff_plans(old, _plan(dgxpod_raw))
    (node,) = diff.of("node")
    assert node.action == "changed" and node.name == "master-1"
    assert "ip 10.33.3.51 -> 10.33.3.61" in node.detail
    assert "install_device vda -> /dev/nvme0n1" in node.detail
    changed = {c.name: c.detail for c in diff.of("record", "changed")}
    assert changed[f"A master-1.{D}"] == "10.33.3.51 -> 10.33.3.61"
    assert changed[f"A etcd-1.{D}"] == "10.33.3.51 -> 10.33.3.61"
    # The reverse name moves: the old PTR goes, a new one comes.
    assert "PTR 51.3.33.10.in-addr.arpa" in _names(diff.of("record", "removed"))
    assert "PTR 61.3.33.10.in-addr.arpa" in _names(diff.of("record", "added"))
    backends = {c.name: c.detail for c in diff.of("backend", "changed")}
    assert backends == {
        "api/master-1": "10.33.3.51:6443 -> 10.33.3.61:6443",
        "machine_config/master-1": "10.33.3.51:22623 -> 10.33.3.61:22623",
    }


def test_listeners_and_settings(dgxpod_raw: dict[str, Any]) -> None:
    old = _plan(dgxpod_raw)
    dgxpod_raw["listen"] = {"dns": "10.33.3.18:53", "tftp": None}
    dgxpod_raw["network"]["lease_time"] = 7200
    dgxpod_raw["load_balancer"]["balance"] = "leastconn"
    dgxpod_raw["kubernetes"] = {"gpu_operator": False}
    diff = diff_plans(old, _plan(dgxpod_raw))
    listen = {(c.action, c.name): c.detail for c in diff.of("listen")}
    assert listen[("changed", "dns")] == "0.0.0.0:53 -> 10.33.3.18:53"
    assert listen[("removed", "tftp")] == "0.0.0.0:69"
    settings = {c.name: c.detail for c in diff.of("setting")}
    assert settings["dhcp.lease_time"] == "3600 -> 7200"
    assert settings["kubernetes.gpu_operator"] == "True -> False"
    for fe in ("api", "machine_config", "ingress_http", "ingress_https"):
        was = "source" if fe.startswith("ingress") else "roundrobin"  # per-frontend default
        assert settings[f"load_balancer.{fe}.balance"] == f"{was} -> leastconn"
    # The listeners have a section of their own: not repeated as dns.listen etc.
    assert not any(name.endswith(".listen") for name in settings)
    assert "setting dhcp.lease_time changed: 3600 -> 7200" in diff.lines()


def test_a_new_domain_is_summarised_and_the_lines_capped(dgxpod_raw: dict[str, Any]) -> None:
    old = _plan(dgxpod_raw)
    dgxpod_raw["cluster"]["name"] = "other"
    diff = diff_plans(old, _plan(dgxpod_raw))
    assert {c.name for c in diff.of("setting")} >= {"cluster", "domain", "dns.domain"}
    assert len(diff.of("record", "removed")) > 10 and len(diff.of("record", "added")) > 10
    lines = diff.lines(limit=5)
    assert len(lines) == 6 and lines[-1] == f"... and {len(diff.changes) - 5} more changes"
    assert diff.summary().startswith("nodes +0 -0 ~6, records +")
