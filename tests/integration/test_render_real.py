"""The rendered configs pass the real daemons' own checks (dnsmasq --test, haproxy -c)."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.inventory import load_inventory, parse_inventory
from appliance.plan import Plan, build_plan
from appliance.render import render_dnsmasq, render_haproxy
from tests.helpers import CONFIG, need_tool


def _config(name: str) -> Plan:
    return build_plan(load_inventory(CONFIG / name))


def _dgxpod(edit: Callable[[dict[str, Any]], None]) -> Plan:
    raw = copy.deepcopy(yaml.safe_load((CONFIG / "dgxpod.yaml").read_text()))
    edit(raw)
    return build_plan(parse_inventory(raw, "test.yaml", CONFIG))


def _proxy(raw: dict[str, Any]) -> None:
    raw["network"]["dhcp_mode"] = "proxy"


def _busy(raw: dict[str, Any]) -> None:
    # Everything optional at once: pool, upstreams with ports, NTP, an interface, IPv6 bind.
    raw["network"].update(
        interface="lo",
        dhcp_range=["10.33.3.100", "10.33.3.150"],
        upstream_dns=["192.0.2.53", "198.51.100.53:5353"],
        ntp_servers=["10.33.3.1"],
    )
    raw["listen"] = {"dns": "10.33.3.18:5353", "api": "[::]:6443", "ingress_http": None}


def _no_backends(plan: Plan) -> Plan:
    empty = tuple(dataclasses.replace(fe, backends=()) for fe in plan.frontends)
    return dataclasses.replace(plan, frontends=empty)


PLANS: dict[str, Callable[[], Plan]] = {
    "dgxpod": lambda: _config("dgxpod.yaml"),
    "example": lambda: _config("example.yaml"),
    "dgxpod-proxy": lambda: _dgxpod(_proxy),
    "dgxpod-busy": lambda: _dgxpod(_busy),
}
# haproxy accepts a backend without servers; the plan can produce one only in theory.
HAPROXY_PLANS: dict[str, Callable[[], Plan]] = {
    **PLANS,
    "dgxpod-no-backends": lambda: _no_backends(_config("dgxpod.yaml")),
}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.tool("dnsmasq")
@pytest.mark.parametrize("case", sorted(PLANS))
def test_dnsmasq_accepts_the_rendered_config(tmp_path: Path, case: str) -> None:
    dnsmasq = need_tool("dnsmasq")
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(render_dnsmasq(PLANS[case]()))
    result = _run([dnsmasq, "--test", "-C", str(conf)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "syntax check OK" in output


@pytest.mark.tool("haproxy")
@pytest.mark.parametrize("case", sorted(HAPROXY_PLANS))
def test_haproxy_accepts_the_rendered_config(tmp_path: Path, case: str) -> None:
    haproxy = need_tool("haproxy")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render_haproxy(HAPROXY_PLANS[case]()))
    result = _run([haproxy, "-c", "-f", str(cfg)])
    assert result.returncode == 0, result.stdout + result.stderr
