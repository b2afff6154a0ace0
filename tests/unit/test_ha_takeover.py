"""The supervisor's side of an HA member (no etcd, no namespaces: a fake of HaMode's
election answers `leading()`, and its store read fails as etcd would): DHCP and the
cluster loop start only once the shared state was read, and never after a fence."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from appliance.hamode import HaMode
from appliance.plan import Plan
from appliance.runtime import RuntimeState
from appliance.service import ServiceContext, ServiceSpec
from appliance.store import Store
from appliance.stores import StoreUnavailable
from appliance.supervisor import Supervisor


class FakeHa:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.reads = 0
        self.lead = True

    def leading(self) -> bool:
        return self.lead

    async def refresh_store(self) -> None:
        self.reads += 1
        if self.reads <= self.failures:
            raise StoreUnavailable("etcd: no endpoint answered")


class Leaderly:
    name = "dhcp"

    def __init__(self, ctx: ServiceContext, plan: Plan) -> None:
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def reload(self, plan: Plan) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> Any: ...


def _supervisor(ha: FakeHa, tmp: Path) -> Supervisor:
    spec = ServiceSpec("dhcp", Leaderly, enabled=lambda plan: True, leader_only=True)
    sup = Supervisor(Path("inventory.yaml"), [spec])
    sup.ha = cast(HaMode, ha)
    sup.plan = cast(Plan, object())
    sup.store = cast(Any, Store.open(tmp, durable=False))
    sup._runtime = RuntimeState(cast(Any, sup.store), shared=True)
    sup.runtime.elected = ha.leading
    return sup


async def test_takeover_reads_the_state_again_until_it_can(
    monkeypatch: Any, tmp_path: Path
) -> None:
    monkeypatch.setattr("appliance.supervisor.TAKEOVER_RETRY", 0.01)
    ha = FakeHa(failures=3)
    sup = _supervisor(ha, tmp_path)
    await sup._take_over()
    assert ha.reads == 4
    assert sup.runtime.leading and "dhcp" in sup.running


async def test_no_dhcp_when_fenced_before_the_state_could_be_read(
    monkeypatch: Any, tmp_path: Path
) -> None:
    monkeypatch.setattr("appliance.supervisor.TAKEOVER_RETRY", 0.01)
    ha = FakeHa(failures=10**6)
    sup = _supervisor(ha, tmp_path)

    async def fence_soon() -> None:
        await asyncio.sleep(0.05)
        ha.lead = False

    fence = asyncio.create_task(fence_soon())
    await sup._take_over()
    await fence
    assert not sup.runtime.leading and "dhcp" not in sup.running
