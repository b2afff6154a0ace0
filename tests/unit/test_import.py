"""`appliance import`: dnsmasq / hosts / helpernode setups back into an inventory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from appliance import importer
from appliance.cli import main
from appliance.inventory import parse_inventory
from appliance.plan import Plan, SrvRecord, build_plan
from appliance.render import render

ROOT = Path(__file__).resolve().parents[2]

# Hand-written in the article's style (shared/SEED.md), with its inline notes.
ARTICLE_CONF = """\
domain=dgxpod.nvidia.com
dhcp-range=10.33.3.100,10.33.3.150,255.255.255.0,12h
dhcp-option=option:router,10.33.3.1
dhcp-option=option:dns-server,10.33.3.18
dhcp-host=52:54:00:00:03:53,10.33.3.53,bootstrap
dhcp-host=52:54:00:00:03:50,10.33.3.50,master-0
dhcp-host=52:54:00:00:03:51,10.33.3.51,master-1
dhcp-host=52:54:00:00:03:52,10.33.3.52,master-2
dhcp-host=02:00:00:00:03:44,10.33.3.44,worker-0
dhcp-host=02:00:00:00:03:46,10.33.3.46,worker-1
addn-hosts={hosts}
address=/apps.dgxpod.nvidia.com/10.33.3.54        # wildcard *.apps -> load balancer
srv-host=_etcd-server-ssl._tcp.dgxpod.nvidia.com,etcd-0.dgxpod.nvidia.com,2380,0,10
srv-host=_etcd-server-ssl._tcp.dgxpod.nvidia.com,etcd-1.dgxpod.nvidia.com,2380,0,10
srv-host=_etcd-server-ssl._tcp.dgxpod.nvidia.com,etcd-2.dgxpod.nvidia.com,2380,0,10
enable-tftp
tftp-root={tftp}
dhcp-boot=pxelinux.0
"""

ARTICLE_HOSTS = """\
10.33.3.44 worker-0.dgxpod.nvidia.com
10.33.3.46 worker-1.dgxpod.nvidia.com
10.33.3.50 master-0.dgxpod.nvidia.com etcd-0.dgxpod.nvidia.com
10.33.3.51 master-1.dgxpod.nvidia.com etcd-1.dgxpod.nvidia.com
10.33.3.52 master-2.dgxpod.nvidia.com etcd-2.dgxpod.nvidia.com
10.33.3.53 bootstrap.dgxpod.nvidia.com
10.33.3.54 api-int.dgxpod.nvidia.com api.dgxpod.nvidia.com     # the load balancer
"""

ARTICLE_PXELINUX = """\
DEFAULT rhcos
PROMPT 0
TIMEOUT 0
LABEL rhcos
  kernel rhcos/rhcos-410.8.20190425.1-installer-kernel
  initrd rhcos/rhcos-410.8.20190425.1-installer-initramfs.img
  append ip=dhcp rd.neednet=1 console=tty0 console=ttyS0 coreos.inst=yes
         coreos.inst.install_dev=vda
         coreos.inst.image_url=http://10.33.3.18/rhcos/rhcos-410.8.20190412.1-metal-bios.raw
         coreos.inst.ignition_url=http://10.33.3.18/rhcos/ignition/master.ign
"""

HELPERNODE = """\
disk: vda
helper: {name: helper, ipaddr: 192.0.2.10}
dns: {domain: example.com, clusterid: ocp4, forwarder1: 8.8.8.8, forwarder2: 8.8.4.4}
dhcp: {router: 192.0.2.1, bcast: 192.0.2.255, netmask: 255.255.255.0,
       poolstart: 192.0.2.100, poolend: 192.0.2.120, ipid: 192.0.2.0, netmaskid: 255.255.255.0}
bootstrap: {name: bootstrap, ipaddr: 192.0.2.20, macaddr: "52:54:00:60:72:67"}
masters:
  - {name: master0, ipaddr: 192.0.2.21, macaddr: "52:54:00:e7:9d:67"}
  - {name: master1, ipaddr: 192.0.2.22, macaddr: "52:54:00:80:16:23"}
  - {name: master2, ipaddr: 192.0.2.23, macaddr: "52:54:00:d5:1c:39"}
workers:
  - {name: worker0, ipaddr: 192.0.2.11, macaddr: "52:54:00:f4:26:a1"}
"""

BOOT = {"kernel": "k", "initramfs": "i", "image": "img", "install_device": "/dev/sda"}


def _complete(data: dict[str, Any], tmp: Path) -> Plan:
    """What an operator adds after import (the boot section), then the plan."""
    data = dict(data, boot=BOOT)
    (tmp / "ign").mkdir(exist_ok=True)
    data["cluster"] = dict(data["cluster"], ignition_dir=str(tmp / "ign"))
    return build_plan(parse_inventory(data, "imported", tmp))


def _imported(capsys: Any, *argv: str) -> tuple[dict[str, Any], str]:
    assert main(["import", *argv]) == 0
    out = capsys.readouterr().out
    return yaml.safe_load(out), out


def _relevant(plan: Plan) -> dict[str, Any]:
    zone = next(z for z in plan.dns.zones if z.origin == plan.domain)
    return {
        "nodes": sorted((n.name, n.role, n.mac, str(n.ip), n.fqdn) for n in plan.nodes),
        "domain": plan.domain,
        "lb": str(plan.load_balancer),
        "srv": sorted(str(r) for r in zone.records if isinstance(r, SrvRecord)),
        "pool": plan.dhcp.pool,
    }


def test_round_trip_of_rendered_dnsmasq(tmp_path: Path, capsys: Any) -> None:
    original = build_plan(
        __import__("appliance.inventory").inventory.load_inventory(ROOT / "config/dgxpod.yaml")
    )
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(render(original, "dnsmasq"))
    data, out = _imported(capsys, "--from", "dnsmasq", str(conf))
    assert _relevant(_complete(data, tmp_path)) == _relevant(original)
    fw = {n["name"]: n.get("firmware") for n in data["nodes"]}
    assert fw["bootstrap"] == "bios" and fw["worker-0"] == "uefi"
    assert f"# not imported: {conf}:" in out  # e.g. dhcp-match lines, with file:line


def test_article_dnsmasq_with_addn_hosts(tmp_path: Path, capsys: Any) -> None:
    hosts = tmp_path / "hosts.dnsmasq"
    hosts.write_text(ARTICLE_HOSTS)
    conf = tmp_path / "dnsmasq.conf"
    (tmp_path / "tftp/pxelinux.cfg").mkdir(parents=True)
    (tmp_path / "tftp/pxelinux.cfg/default").write_text(ARTICLE_PXELINUX)
    conf.write_text(ARTICLE_CONF.format(hosts=hosts, tftp=tmp_path / "tftp"))
    data, out = _imported(capsys, "--from", "dnsmasq", str(conf))
    assert data["cluster"] == {"name": "dgxpod", "base_domain": "nvidia.com", "etcd_records": True}
    assert data["load_balancer"] == {"address": "10.33.3.54"}
    assert data["network"]["dhcp_range"] == ["10.33.3.100", "10.33.3.150"]
    assert data["network"]["subnet"] == "10.33.3.0/24"
    roles = {n["name"]: n["role"] for n in data["nodes"]}
    assert roles["bootstrap"] == "bootstrap" and roles["master-2"] == "master"
    assert roles["worker-1"] == "worker" and len(roles) == 6
    assert f"{conf}:18: dhcp-boot=pxelinux.0" in out
    assert data["boot"] == {
        "kernel": "rhcos/rhcos-410.8.20190425.1-installer-kernel",
        "initramfs": "rhcos/rhcos-410.8.20190425.1-installer-initramfs.img",
        "install_device": "vda",
        "image": "rhcos/rhcos-410.8.20190412.1-metal-bios.raw",
        "kernel_args": ["console=tty0", "console=ttyS0"],
    }
    assert "boot:" not in out.split("# not imported")[-1]
    plan = _complete(data, tmp_path)
    assert plan.dhcp.pool is not None and len(plan.nodes) == 6


def test_hosts_file_alone_asks_for_macs(tmp_path: Path, capsys: Any) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(ARTICLE_HOSTS + "garbage-line\n")
    data, out = _imported(capsys, "--from", "hosts", str(hosts))
    assert data["load_balancer"] == {"address": "10.33.3.54"}
    assert {n["name"] for n in data["nodes"]} >= {"bootstrap", "master-0", "worker-1"}
    assert "no dhcp-host line gives its MAC" in out
    assert f"{hosts}:8: garbage-line" in out


def test_helpernode_vars(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "vars.yaml"
    path.write_text(HELPERNODE)
    data, out = _imported(capsys, "--from", "helpernode", str(path))
    assert data["cluster"]["name"] == "ocp4" and data["cluster"]["base_domain"] == "example.com"
    assert data["network"]["address"] == "192.0.2.10"
    assert data["network"]["upstream_dns"] == ["8.8.8.8", "8.8.4.4"]
    roles = [(n["name"], n["role"]) for n in data["nodes"]]
    assert roles[0] == ("bootstrap", "bootstrap") and ("master1", "master") in roles
    assert ("worker0", "worker") in roles
    assert "disk: 'vda'" in out  # unknown top-level key listed, not dropped silently
    assert len(_complete(data, tmp_path).nodes) == 5


def test_bad_input_is_an_error_not_a_traceback(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "vars.yaml"
    path.write_text("masters: [{name: m}]\n")  # no ipaddr
    assert main(["import", "--from", "helpernode", str(path)]) == 2
    assert main(["import", "--from", "dnsmasq", str(tmp_path / "missing")]) == 2
    assert "appliance import:" in capsys.readouterr().err


def test_role_names() -> None:
    assert importer.role_of("control-plane-1") == "master"
    assert importer.role_of("compute-3.x.y") == "worker"
    assert importer.role_of("infra-0") is None
