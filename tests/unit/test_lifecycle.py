"""Service lifecycle and logger names (issue 17): a service is built whole from the plan,
`start` only binds and spawns; every logger of the daemon is under "appliance".
"""

from __future__ import annotations

import ast
import gc
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from appliance import registry
from appliance.events import EventBus
from appliance.inventory import parse_inventory
from appliance.plan import Plan, build_plan
from appliance.runtime import RuntimeState
from appliance.service import ServiceContext, ServiceSpec
from appliance.status import Family, ServiceStatus
from appliance.storequeue import DaemonStore
from appliance.supervisor import Supervisor
from tests.helpers import CONFIG, loopback_inventory, write_inventory

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "appliance").rglob("*.py"), *(ROOT / "services").rglob("*.py")])


def _calls(name: str) -> list[tuple[Path, ast.Call, ast.AST | None]]:
    """Every call of a function or method called `name`, with the node it is a part of."""
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    found.append((path, node, parents.get(node)))
    return found


def _appliance_name(arg: ast.expr, path: Path) -> bool:
    """`__name__` in appliance/, or a name (literal or f-string) under "appliance"."""
    if isinstance(arg, ast.Name) and arg.id == "__name__":
        return path.is_relative_to(ROOT / "appliance")
    if isinstance(arg, ast.JoinedStr) and arg.values:
        arg = arg.values[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value.startswith("appliance.")
        return False
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value == "appliance" or arg.value.startswith("appliance.")
    return False


def test_every_logger_is_under_appliance() -> None:
    """`--log-level`, journald filters and log pipelines select the daemon by "appliance.":
    a logger named "dns" or "cluster.csr" escapes them. Exempt: the root logger and a
    library's logger the logging setup only configures (`getLogger("aiohttp.access")
    .setLevel(...)`)."""
    calls = _calls("getLogger")
    assert len(calls) > 5  # the scan sees them
    wrong = []
    for path, call, parent in calls:
        if not call.args:
            continue  # the root logger: configured, never logged to
        configures = isinstance(parent, ast.Attribute) and parent.attr == "setLevel"
        if configures or _appliance_name(call.args[0], path):
            continue
        wrong.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)}")
    assert not wrong, "loggers outside 'appliance.':\n" + "\n".join(wrong)


def test_the_scan_catches_a_bad_name(tmp_path: Path) -> None:
    bad = ast.parse('log = logging.getLogger("dns")').body[0]
    assert isinstance(bad, ast.Assign) and isinstance(bad.value, ast.Call)
    assert not _appliance_name(bad.value.args[0], ROOT / "appliance" / "x.py")
    named = ast.parse("logging.getLogger(__name__)").body[0]
    assert isinstance(named, ast.Expr) and isinstance(named.value, ast.Call)
    assert _appliance_name(named.value.args[0], ROOT / "appliance" / "x.py")
    assert not _appliance_name(named.value.args[0], ROOT / "services" / "x.py")


def test_no_attribute_is_left_for_start_to_fill() -> None:
    """`self.engine: DnsEngine` without a value is an AttributeError waiting for whoever
    reads it before `start` (a status() scrape, a stop after a failed start)."""
    bare = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.AnnAssign)
                and node.value is None
                and isinstance(node.target, ast.Attribute)
                and isinstance(node.target.value, ast.Name)
                and node.target.value.id == "self"
            ):
                bare.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bare, "attributes declared without a value:\n" + "\n".join(bare)


# --- the supervisor builds from the plan, then starts -----------------------------------------


class _Recorder:
    """A service that says how the supervisor built and started it."""

    name = "probe"
    seen: list[tuple[str, Any]] = []

    def __init__(self, ctx: ServiceContext, plan: Plan) -> None:
        self.seen.append(("built", (ctx.log.name, plan.domain)))

    async def start(self) -> None:
        self.seen.append(("start", None))

    async def reload(self, plan: Plan) -> None:
        self.seen.append(("reload", plan.domain))

    async def stop(self) -> None:
        self.seen.append(("stop", None))

    def status(self) -> ServiceStatus:
        return _NoStatus()


class _NoStatus:
    def to_json(self) -> dict[str, Any]:
        return {}

    def metrics(self) -> Iterable[Family]:
        return ()


async def test_supervisor_builds_each_service_from_the_plan_with_its_logger(
    tmp_path: Path,
) -> None:
    _Recorder.seen = []
    config = write_inventory(tmp_path / "inv.yaml", loopback_inventory(tmp_path))
    plan = build_plan(parse_inventory(loopback_inventory(tmp_path), str(config), tmp_path))
    spec = ServiceSpec("probe", _Recorder, enabled=lambda p: True)
    sup = Supervisor(config, specs=[spec])
    with pytest.raises(RuntimeError):
        sup.runtime  # noqa: B018 (no runtime state before start: said, not an AttributeError)
    await sup.start(plan)
    try:
        assert _Recorder.seen == [("built", ("appliance.probe", plan.domain)), ("start", None)]
        assert isinstance(sup.runtime, RuntimeState)
    finally:
        await sup.stop()
        gc.unfreeze()  # start froze what existed (for the daemon's life): not this process's
    assert _Recorder.seen[-1] == ("stop", None)


# --- every service of the registry is whole before start --------------------------------------


@pytest.fixture
def full_plan(dgxpod_raw: dict[str, Any], tmp_path: Path) -> Plan:
    """The article's cluster with every service enabled (nothing is bound here)."""
    dgxpod_raw["state_dir"] = str(tmp_path / "state")
    return build_plan(parse_inventory(dgxpod_raw, "x.yaml", CONFIG))


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: s.name)
async def test_a_service_built_from_the_plan_reports_before_start(
    spec: ServiceSpec, full_plan: Plan
) -> None:
    """Built, never started (a start that failed on another service's bind): status()
    answers and stop() is safe."""
    assert spec.is_enabled(full_plan), spec.name
    store = DaemonStore.open(full_plan.state_dir)
    try:
        ctx = ServiceContext(
            bus=EventBus(),
            store=store,
            log=logging.getLogger(f"appliance.{spec.name}"),
            runtime=RuntimeState(store),
        )
        service = spec.factory(ctx, full_plan)
        assert service.name == spec.name
        service.status()
        await service.stop()
    finally:
        store.close()
