"""`appliance run` with an `ha` block, as an operator gets it wrong: no etcd answering, a
member name that is not in the inventory, no member address on this host. Each is one
clear line and exit 1, before anything is bound or any address is touched (the run stops
before the election: nothing here needs root or a namespace)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from tests.helpers import free_port, loopback_inventory, run_cli, write_inventory


def _ha_inventory(tmp_path: Path, endpoints: list[str]) -> Path:
    raw: dict[str, Any] = loopback_inventory(tmp_path)
    raw["network"]["interface"] = "lo"
    raw["ha"] = {
        "members": [
            {"name": "prov-a", "address": "127.0.0.16"},
            {"name": "prov-b", "address": "127.0.0.17"},
        ],
        "etcd": {"endpoints": endpoints},
        "lease_ttl": 3,
    }
    return write_inventory(tmp_path / "inventory.yaml", raw)


def test_run_refuses_when_no_etcd_member_answers(tmp_path: Path) -> None:
    # A port nobody listens on, and one that accepts but is not etcd (it never answers).
    dead = f"http://127.0.0.2:{free_port(host='127.0.0.2')}"
    mute = socket.socket()
    mute.bind(("127.0.0.2", 0))
    mute.listen(8)
    try:
        silent = f"http://127.0.0.2:{mute.getsockname()[1]}"
        config = _ha_inventory(tmp_path, [dead, silent])
        res = run_cli("run", "--config", str(config), "--member", "prov-a")
    finally:
        mute.close()
    assert res.returncode == 1, res.stderr
    lines = [line for line in res.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1, res.stderr
    assert "etcd does not answer at any endpoint" in lines[0]
    assert dead in lines[0] and silent in lines[0]
    assert "serving" not in res.stderr


def test_run_refuses_an_unknown_member_name(tmp_path: Path) -> None:
    config = _ha_inventory(tmp_path, [f"http://127.0.0.2:{free_port(host='127.0.0.2')}"])
    res = run_cli("run", "--config", str(config), "--member", "prov-c")
    assert res.returncode == 1
    assert "prov-c" in res.stderr and "prov-a" in res.stderr and "prov-b" in res.stderr


def test_run_refuses_when_no_member_address_is_here(tmp_path: Path) -> None:
    config = _ha_inventory(tmp_path, [f"http://127.0.0.2:{free_port(host='127.0.0.2')}"])
    res = run_cli("run", "--config", str(config))  # neither --member nor APPLIANCE_MEMBER
    assert res.returncode == 1
    assert "--member" in res.stderr or "APPLIANCE_MEMBER" in res.stderr, res.stderr
