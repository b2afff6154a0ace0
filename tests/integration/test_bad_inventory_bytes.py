"""An inventory that is not UTF-8 text, or holds characters YAML refuses (issue 14, item 13).

An operator's editor saved the file as Latin-1, or a stray NUL crept in. `check` says
so in one line with the line number and exits 2; a running daemon's SIGHUP reload and
`POST /api/v1/reload` refuse it the same way (one line, 422), log no traceback, and keep
serving the running plan.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, Daemon, get_json, loopback_inventory, wait_until, write_inventory

BAD = {
    "latin-1": "cluster:\n  name: d\xe9mo\n".encode("latin-1"),
    "nul": b"cluster:\n  name: demo\0\n",
    "bom+utf-16": "cluster: {}\n".encode("utf-16"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_check_says_one_line_and_exits_2(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "inventory.yaml"
    config.write_bytes(BAD[kind])
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "check", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "internal error" not in out and "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and str(config) in lines[0], out


def test_reload_of_a_non_utf8_inventory_is_refused_cleanly(tmp_path: Path) -> None:
    raw = loopback_inventory(tmp_path)
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for("serving demo.example.com")
        admin = f"http://{raw['listen']['admin']}"
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        good = config.read_bytes()
        config.write_bytes(good.replace(b"demo", "d\xe9mo".encode("latin-1"), 1))
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_until(lambda: "reload refused" in daemon.output(), what="SIGHUP reload refused")
        status, body = get_json(f"{admin}/api/v1/reload", token, method="POST")
        assert status == 422, body
        assert any("UTF-8" in e for e in body["errors"]), body
        status, _health = get_json(f"{admin}/healthz")
        assert status == 200
        assert daemon.proc.poll() is None
        assert "Traceback" not in daemon.output()
        assert "Task exception was never retrieved" not in daemon.output()
        # Fixed file: the next reload takes it.
        config.write_bytes(good)
        status, body = get_json(f"{admin}/api/v1/reload", token, method="POST")
        assert status == 200, body
    finally:
        assert daemon.stop() == 0
