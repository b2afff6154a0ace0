"""Who gets which ignition (services.http.ignition.ignition_access), without sockets.

The loopback inventory (tests.helpers.loopback_inventory): bootstrap 127.0.0.53,
master-0 127.0.0.50, worker-0 127.0.0.44.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from appliance.inventory import parse_inventory
from appliance.plan import Plan, build_plan
from services.http.ignition import IgnitionDecision, Target, ignition_access
from tests.helpers import loopback_inventory

MASTER, WORKER, BOOTSTRAP = (IPv4Address(a) for a in ("127.0.0.50", "127.0.0.44", "127.0.0.53"))
STRANGER = IPv4Address("127.0.0.99")


@dataclass
class Runtime:
    bootstrap_retired: bool = False


def _plan(tmp_path: Path, after_install: str = "localboot") -> Plan:
    raw = loopback_inventory(tmp_path)
    raw["boot"]["after_install"] = after_install
    return build_plan(parse_inventory(raw, "inv.yaml", tmp_path))


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    return _plan(tmp_path)


def none(_name: str) -> bool:
    return False


def test_the_owner_gets_its_roles_file_and_is_marked_installed(plan: Plan) -> None:
    got = ignition_access(MASTER, ("role", "master"), "GET", plan, Runtime(), none)
    assert got == IgnitionDecision(
        200, "master.ign", "master", plan.by_name["master-0"], None, True, True
    )


def test_a_head_is_served_but_is_no_install(plan: Plan) -> None:
    got = ignition_access(MASTER, ("role", "master"), "HEAD", plan, Runtime(), none)
    assert got.status == 200 and not got.event and not got.mark_installed


def test_after_install_reinstall_never_marks(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "reinstall")
    got = ignition_access(MASTER, ("role", "master"), "GET", plan, Runtime(), none)
    assert got.status == 200 and got.event and not got.mark_installed


@pytest.mark.parametrize("client", [WORKER, BOOTSTRAP, STRANGER, None])
def test_anyone_else_gets_403_not_owner(plan: Plan, client: IPv4Address | None) -> None:
    got = ignition_access(client, ("role", "master"), "GET", plan, Runtime(), none)
    assert (got.status, got.cause, got.filename, got.what) == (
        403,
        "not_owner",
        "master.ign",
        "master",
    )
    assert not got.event and not got.mark_installed
    assert got.node == (plan.by_ip.get(client) if client is not None else None)


def test_bootstrap_retired_is_410_to_the_bootstrap_node(plan: Plan) -> None:
    live = ignition_access(BOOTSTRAP, ("role", "bootstrap"), "GET", plan, Runtime(), none)
    assert live.status == 200
    got = ignition_access(BOOTSTRAP, ("role", "bootstrap"), "GET", plan, Runtime(True), none)
    assert (got.status, got.cause) == (410, "bootstrap_retired")
    assert not got.mark_installed
    # Others' ignition is unaffected by the bootstrap's retirement.
    assert (
        ignition_access(MASTER, ("role", "master"), "GET", plan, Runtime(True), none).status == 200
    )
    # A stranger asking for bootstrap.ign is still "not the owner" (403), not 410.
    got = ignition_access(WORKER, ("role", "bootstrap"), "GET", plan, Runtime(True), none)
    assert (got.status, got.cause) == (403, "not_owner")


@pytest.mark.parametrize("target", [("role", "admin"), ("role", "node/master-0"), ("node", "x")])
def test_unknown_roles_and_nodes_are_404_without_a_cause(plan: Plan, target: Target) -> None:
    got = ignition_access(MASTER, target, "GET", plan, Runtime(), none)
    assert (got.status, got.cause, got.filename) == (404, None, "")


def test_a_nodes_own_file_when_it_has_one_else_its_roles(plan: Plan) -> None:
    asked: list[str] = []

    def has(name: str) -> bool:
        asked.append(name)
        return name == "node/master-0.ign"

    got = ignition_access(MASTER, ("node", "master-0"), "GET", plan, Runtime(), has)
    assert (got.status, got.filename, got.what) == (200, "node/master-0.ign", "node master-0")
    got = ignition_access(WORKER, ("node", "worker-0"), "GET", plan, Runtime(), has)
    assert (got.status, got.filename, got.what) == (200, "worker.ign", "node worker-0")
    # Only its own node may fetch it, even one of the same role.
    got = ignition_access(WORKER, ("node", "master-0"), "GET", plan, Runtime(), has)
    assert (got.status, got.cause) == (403, "not_owner")
    assert asked == ["node/master-0.ign", "node/worker-0.ign", "node/master-0.ign"]
