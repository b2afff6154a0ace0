"""The supervisor's typed runtime state: boot once, bootstrap retired, backend admin states.

The admin API and the cluster loop write it; the proxy applies it and HTTP reads it.
No service looks another up by name any more (ServiceContext has no `services`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest

from appliance.events import EventBus
from appliance.inventory import load_inventory
from appliance.plan import Plan, build_plan
from appliance.runtime import AdminState, LoadBalancerOff, RuntimeState
from appliance.service import ServiceContext
from appliance.store import Store
from appliance.stores import ServiceStore
from services.proxy.server import FrontendRunner, ProxyService
from tests.helpers import loopback_inventory, write_inventory


class FakeLB:
    """A load balancer with one frontend "api" and backends m0, m1."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], str] = {
            ("api", "m0"): "enabled",
            ("api", "m1"): "enabled",
        }
        self.calls = 0

    def set_admin_state(self, frontend: str, backend: str, state: AdminState) -> Any:
        self.calls += 1
        if (frontend, backend) not in self.states:
            raise KeyError(f"no backend {backend!r} in {frontend}")
        self.states[frontend, backend] = state
        return self


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path, durable=False)
    yield s
    s.close()


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    raw = loopback_inventory(tmp_path)
    # Frontends that listen (nothing is bound here: the pools are what matters).
    raw["listen"].update(api="127.0.0.54:16443", machine_config="127.0.0.54:22623")
    raw["listen"].update(ingress_http="127.0.0.54:18080")
    return build_plan(load_inventory(write_inventory(tmp_path / "inv.yaml", raw)))


def test_service_context_has_no_lookup_of_services() -> None:
    names = {f.name for f in dataclasses.fields(ServiceContext)}
    assert "services" not in names and "runtime" in names


def test_boot_once_is_written_through_and_read_back(store: Store) -> None:
    rt = RuntimeState(store)
    assert rt.mark_installed("master-0", 10.0) is True
    assert rt.mark_installed("master-0", 11.0) is False  # not news
    assert rt.installed("master-0")
    assert RuntimeState(store).installed("master-0")  # a restart reads the store
    rt.request_reinstall("master-0", 12.0)
    assert not rt.installed("master-0") and not RuntimeState(store).installed("master-0")


def test_bootstrap_retired_comes_from_the_store(store: Store) -> None:
    assert not RuntimeState(store).bootstrap_retired
    store.set_cluster_state("bootstrap", {"complete": True}, 1.0)
    assert RuntimeState(store).bootstrap_retired
    rt = RuntimeState(Store.open(store.path.parent, durable=False))
    rt.retire_bootstrap()
    assert rt.bootstrap_retired


def test_admin_state_needs_a_running_load_balancer_and_a_known_backend(store: Store) -> None:
    rt = RuntimeState(store)
    with pytest.raises(LoadBalancerOff):
        rt.set_admin_state("api", "m0", "drain")
    lb = FakeLB()
    rt.attach_load_balancer(lb)
    with pytest.raises(KeyError):
        rt.set_admin_state("api", "nope", "drain")
    with pytest.raises(ValueError):
        # Not an AdminState, on purpose (as an admin request could send it).
        rt.set_admin_state("api", "m0", "sleeping")  # type: ignore[arg-type]
    assert list(rt.admin_states()) == []  # a refused change is not kept
    rt.set_admin_state("api", "m0", "drain")
    assert lb.states["api", "m0"] == "drain" and rt.admin_state("api", "m0") == "drain"


def test_states_kept_reach_a_load_balancer_that_starts_later(store: Store) -> None:
    """The cluster loop drains before the proxy runs (or while it restarts): applied at
    its start. An operator's enable afterwards wins over the earlier drain."""
    rt = RuntimeState(store)
    assert rt.want_admin_state("api", "m1", "drain") is False  # nothing to apply it to yet
    first = FakeLB()
    rt.attach_load_balancer(first)
    assert first.states["api", "m1"] == "drain"
    rt.set_admin_state("api", "m1", "enabled")
    second = FakeLB()
    rt.detach_load_balancer(first)
    rt.attach_load_balancer(second)
    assert second.states["api", "m1"] == "enabled"
    # An old instance stopping after the new one attached does not detach the new one.
    rt.detach_load_balancer(first)
    assert rt.load_balancer_running


def test_a_backend_missing_here_is_skipped_not_fatal(store: Store) -> None:
    rt = RuntimeState(store)
    rt.attach_load_balancer(FakeLB())
    assert rt.want_admin_state("machine_config", "bootstrap", "drain") is False
    assert rt.admin_state("machine_config", "bootstrap") == "drain"  # kept for a reload


def _proxy(plan: Plan, rt: RuntimeState, store: Store) -> ProxyService:
    """A proxy with its frontends' pools, as start() builds them (no sockets here)."""
    ctx = ServiceContext(
        bus=EventBus(),
        store=cast(ServiceStore, store),  # the proxy never touches ctx.store
        log=logging.getLogger("t"),
        runtime=rt,
    )
    svc = ProxyService(ctx, plan)
    for fe in plan.frontends:
        if fe.listen is not None:
            svc.frontends[fe.name] = FrontendRunner(svc, fe)
    return svc


def _admin(svc: ProxyService) -> Mapping[str, Mapping[str, str]]:
    return {
        name: {b.spec.name: b.admin for b in runner.pool.backends}
        for name, runner in svc.frontends.items()
    }


def test_drain_by_node_applies_to_the_proxy_pools(plan: Plan, store: Store) -> None:
    rt = RuntimeState(store)
    svc = _proxy(plan, rt, store)
    rt.attach_load_balancer(svc)
    node = "master-0"
    fronts = [name for name, pools in _admin(svc).items() if node in pools]
    assert fronts, "the node serves some frontend"
    for name in fronts:
        target = rt.set_admin_state(name, node, "drain")
        assert target.status().to_json()["admin"] == "drain"
    for name in fronts:
        assert _admin(svc)[name][node] == "drain"
        assert all(s == "enabled" for n, s in _admin(svc)[name].items() if n != node)


def test_bootstrap_drain_reaches_a_proxy_started_afterwards(plan: Plan, store: Store) -> None:
    rt = RuntimeState(store)
    for pool in ("api", "machine_config"):
        rt.want_admin_state(pool, "bootstrap", "drain")
    svc = _proxy(plan, rt, store)
    rt.attach_load_balancer(svc)  # what ProxyService.start does once its pools exist
    for pool in ("api", "machine_config"):
        assert _admin(svc)[pool]["bootstrap"] == "drain"
        assert _admin(svc)[pool]["master-0"] == "enabled"
    assert "bootstrap" not in _admin(svc)["ingress_http"]
