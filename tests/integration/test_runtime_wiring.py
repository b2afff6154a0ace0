"""The supervisor's runtime state reaches the running services (real sockets, loopback).

Bootstrap retired, written to the runtime state (as the cluster loop does), makes HTTP
refuse bootstrap.ign at once; a drain kept there reaches the proxy's pools, also one
that a reload starts afresh.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from appliance.registry import HTTP, PROXY
from appliance.supervisor import Supervisor, load_plan
from services.proxy.server import ProxyService
from tests.helpers import free_port, loopback_inventory, write_inventory

LB = "127.0.0.54"


def _inventory(tmp_path: Path, http_port: int, api_port: int | None) -> Path:
    raw = loopback_inventory(tmp_path)
    api = f"{LB}:{api_port}" if api_port is not None else None
    raw["listen"].update(http=f"127.0.0.1:{http_port}", api=api, admin=None)
    raw["load_balancer"]["check_interval"] = 60  # no verdicts needed here
    ignition = tmp_path / "ignition"
    ignition.mkdir(exist_ok=True)
    for role in ("bootstrap", "master", "worker"):
        (ignition / f"{role}.ign").write_text('{"ignition": {"version": "3.2.0"}}')
    return write_inventory(tmp_path / "inventory.yaml", raw)


async def _bootstrap_ign(http_port: int) -> int:
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.53", 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"http://127.0.0.1:{http_port}/ignition/bootstrap.ign"
        async with session.get(url) as resp:
            await resp.read()
            return resp.status


def _admin(sup: Supervisor, frontend: str, backend: str) -> str:
    proxy = sup.running["proxy"]
    assert isinstance(proxy, ProxyService)
    found = proxy.frontends[frontend].pool.find(backend)
    assert found is not None
    return found.admin


async def test_runtime_state_reaches_http_and_the_proxy(tmp_path: Path) -> None:
    http_port = free_port()
    config = _inventory(tmp_path, http_port, free_port(host=LB))
    sup = Supervisor(config, specs=[HTTP, PROXY])
    await sup.start(load_plan(config))
    try:
        assert await _bootstrap_ign(http_port) == 200
        sup.runtime.retire_bootstrap()
        assert await _bootstrap_ign(http_port) == 410

        assert _admin(sup, "api", "bootstrap") == "enabled"
        assert sup.runtime.want_admin_state("api", "bootstrap", "drain") is True
        assert _admin(sup, "api", "bootstrap") == "drain"
        assert _admin(sup, "api", "master-0") == "enabled"

        # Switched off by a reload, and on again: the fresh proxy gets the kept drain.
        api = free_port(host=LB)
        _inventory(tmp_path, http_port, None)
        assert (await sup.reload()).ok
        assert "proxy" not in sup.running and not sup.runtime.load_balancer_running
        _inventory(tmp_path, http_port, api)
        assert (await sup.reload()).ok
        assert _admin(sup, "api", "bootstrap") == "drain"
        assert _admin(sup, "api", "master-0") == "enabled"
    finally:
        await sup.stop()
    assert not sup.runtime.load_balancer_running
