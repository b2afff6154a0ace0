"""The http service's node-related lines (ignition served or refused, a boot file refused)
carry the node's name, MAC and address as fields of their own, so `--log-format json`
lets a log pipeline pick one machine's lines (issue 17). A real aiohttp client bound to
the nodes' loopback addresses against the service in-process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import pytest

from appliance.events import EventBus
from appliance.inventory import load_inventory
from appliance.logs import JsonFormatter
from appliance.plan import build_plan
from appliance.runtime import RuntimeState
from appliance.service import ServiceContext
from appliance.storequeue import DaemonStore
from services.http.server import HttpService
from tests.helpers import free_port, loopback_inventory, write_inventory

MASTER = ("master-0", "52:54:00:00:00:50", "127.0.0.50")
WORKER = ("worker-0", "52:54:00:00:00:44", "127.0.0.44")


def _json(record: logging.LogRecord) -> dict[str, object]:
    out = json.loads(JsonFormatter().format(record))
    assert isinstance(out, dict)
    return out


async def _get(url: str, source: str) -> int:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url) as resp,
    ):
        await resp.read()
        return resp.status


async def test_ignition_lines_name_the_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance")
    port = free_port()
    raw = loopback_inventory(tmp_path)
    raw["listen"]["http"] = f"127.0.0.1:{port}"
    (tmp_path / "ignition").mkdir()
    (tmp_path / "ignition" / "master.ign").write_text('{"ignition": {"version": "3.2.0"}}')
    plan = build_plan(load_inventory(write_inventory(tmp_path / "inv.yaml", raw)))
    store = DaemonStore.open(plan.state_dir)
    ctx = ServiceContext(
        bus=EventBus(),
        store=store,
        log=logging.getLogger("appliance.http"),
        runtime=RuntimeState(store),
    )
    svc = HttpService(ctx, plan)
    await svc.start()
    try:
        url = f"http://127.0.0.1:{port}/ignition/master.ign"
        assert await _get(url, WORKER[2]) == 403  # not its role's file
        assert await _get(url, MASTER[2]) == 200
    finally:
        await svc.stop()
        store.close()

    def one(needle: str) -> dict[str, object]:
        found = [r for r in caplog.records if needle in r.getMessage()]
        assert found, [r.getMessage() for r in caplog.records]
        return _json(found[0])

    refused = one("ignition: refused master.ign")
    assert refused["logger"] == "appliance.http.audit"
    assert (refused["node"], refused["mac"], refused["ip"]) == WORKER
    boot_error = one("boot error")
    assert (boot_error["node"], boot_error["mac"], boot_error["ip"]) == WORKER
    served = one("ignition: served master.ign")
    assert (served["node"], served["mac"], served["ip"]) == MASTER
    # Boot once: the runtime state says the node is installed (it knows the node's name).
    assert one("fetched its install ignition")["node"] == MASTER[0]
