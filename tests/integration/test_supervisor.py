"""The supervisor as an operator meets it: `appliance run` in a real process.

Start, reload over SIGHUP and over the admin API with a changed and a broken
inventory, a listener that moves on reload, a port already taken, SIGTERM, and
the systemd notify datagrams on a real unix socket.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import (
    CONFIG,
    ROOT,
    Daemon,
    free_port,
    loopback_inventory,
    write_inventory,
)
from tests.helpers import get_json as _get


def _wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_example_config_runs_and_stops_on_sigterm(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemons(CONFIG / "example.yaml")
    d.wait_for("serving demo.example.com")
    status, body = _get("http://127.0.0.1:9000/api/v1/status")
    assert status == 200 and body["cluster"] == "demo.example.com" and body["nodes"] == 6
    assert body["services"]["admin"]["state"] == "running"
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 5
    assert "stopped" in d.output()


def test_reload_changed_broken_and_over_api(daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    raw = loopback_inventory(tmp_path)
    config = write_inventory(tmp_path / "inv.yaml", raw)
    admin = f"http://{raw['listen']['admin']}"
    d = daemons(config)
    d.wait_for("serving demo.example.com")

    # A changed inventory: a new worker appears in the plan after SIGHUP.
    raw["nodes"].append(
        {"name": "worker-1", "role": "worker", "mac": "52:54:00:00:00:46", "ip": "127.0.0.46"}
    )
    write_inventory(config, raw)
    d.proc.send_signal(signal.SIGHUP)
    _wait_until(lambda: _get(f"{admin}/api/v1/status")[1]["nodes"] == 4)
    _, plan = _get(f"{admin}/api/v1/plan")
    assert [b["name"] for b in plan["frontends"][2]["backends"]] == ["worker-0", "worker-1"]

    # A broken inventory: refused with the reason, the running plan stays.
    broken = dict(raw, nodes=[*raw["nodes"], dict(raw["nodes"][0], name="dup")])
    write_inventory(config, broken)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for("reload refused: keeping the running plan")
    assert "nodes[4].mac: 52:54:00:00:00:53 is already used by nodes[0] (bootstrap)" in d.output()
    status, body = _get(f"{admin}/api/v1/status")
    assert body["nodes"] == 4 and body["reloads"]["failed"] == 1 and body["reloads"]["ok"] == 1
    assert d.proc.poll() is None

    # The same through the admin API: the token is required and the errors come back.
    token = (tmp_path / "state" / "admin.token").read_text().strip()
    assert oct((tmp_path / "state" / "admin.token").stat().st_mode & 0o777) == "0o600"
    assert _get(f"{admin}/api/v1/reload", method="POST")[0] == 401
    status, body = _get(f"{admin}/api/v1/reload", token, method="POST")
    assert status == 422 and not body["ok"]
    assert any("already used by nodes[0]" in e for e in body["errors"])
    write_inventory(config, raw)
    status, body = _get(f"{admin}/api/v1/reload", token, method="POST")
    assert status == 200 and body["ok"]
    assert d.stop() == 0


def test_reload_moves_a_listener(daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    raw = loopback_inventory(tmp_path)
    config = write_inventory(tmp_path / "inv.yaml", raw)
    old = raw["listen"]["admin"]
    d = daemons(config)
    d.wait_for("serving")
    new = f"127.0.0.1:{free_port()}"
    raw["listen"]["admin"] = new
    write_inventory(config, raw)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(f"admin: started on {new}")
    assert _get(f"http://{new}/healthz")[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{old}/healthz", timeout=2)


def test_reload_to_a_taken_port_keeps_the_old_listener(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    raw = loopback_inventory(tmp_path)
    config = write_inventory(tmp_path / "inv.yaml", raw)
    d = daemons(config)
    d.wait_for("serving")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = f"127.0.0.1:{blocker.getsockname()[1]}"
        write_inventory(config, dict(raw, listen={**raw["listen"], "admin": taken}))
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for(f"reload refused: admin: cannot bind {taken}: Address already in use")
    status, body = _get(f"http://{raw['listen']['admin']}/api/v1/status")
    assert status == 200 and body["reloads"]["failed"] == 1


def _run_once(config: Path) -> subprocess.CompletedProcess[str]:
    """`appliance run` that is expected to exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", "run", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_port_already_taken_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        raw = loopback_inventory(tmp_path)
        raw["listen"]["admin"] = f"127.0.0.1:{port}"
        config = write_inventory(tmp_path / "inv.yaml", raw)
        proc = _run_once(config)
    assert proc.returncode == 1
    assert f"admin: cannot bind 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_inventory_refuses_to_start(tmp_path: Path) -> None:
    raw = loopback_inventory(tmp_path)
    raw["nodes"][1]["ip"] = "192.0.2.7"
    config = write_inventory(tmp_path / "inv.yaml", raw)
    proc = _run_once(config)
    assert proc.returncode == 2
    assert f"{config}: nodes[1].ip: 192.0.2.7 is outside network.subnet 127.0.0.0/24" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_systemd_notify_and_json_logs(daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    raw = loopback_inventory(tmp_path)
    config = write_inventory(tmp_path / "inv.yaml", raw)
    sock_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(sock_path)
        ns.settimeout(15)
        d = daemons(config, "--log-format", "json", env={"NOTIFY_SOCKET": sock_path})
        ready = ns.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={d.proc.pid}" in ready
        # READY comes after every listener is bound: the admin endpoint answers now.
        assert _get(f"http://{raw['listen']['admin']}/healthz")[0] == 200
        d.proc.send_signal(signal.SIGHUP)
        assert ns.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert ns.recv(4096).startswith(b"READY=1\nSTATUS=serving")
        assert d.stop() == 0
        assert ns.recv(4096).startswith(b"STOPPING=1\n")
    records = [json.loads(line) for line in d.output().splitlines() if line.strip()]
    assert any(r["msg"].startswith("appliance 0.1.0 serving") for r in records)
    assert {"time", "level", "logger", "msg"} <= set(records[0])
