"""`appliance backup` while the daemon hands out leases, and `appliance restore` of it.

A running appliance (tests/integration/admin_env.py, with a DHCP pool) gets a burst of
scapy-built DHCP exchanges from distinct MACs; `appliance backup` (the real CLI, another
process) runs in the middle of it. Every lease ACKed before the backup started must be
in the archive. Restore is refused while that daemon runs and for another cluster's
inventory; restored into a fresh state dir, a daemon started on it serves the same
leases and install marks through its admin API.
"""

from __future__ import annotations

import sqlite3
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.store import DB_NAME
from tests import helpers
from tests.helpers import Daemon, get_json, run_cli, write_inventory
from tests.integration import admin_env
from tests.integration.admin_env import MASTER, AdminEnv, dhcp_exchange

POOL = ("127.0.0.100", "127.0.0.250")
BURST = 140  # DHCP exchanges at most
BURST_SECONDS = 20.0  # and for at most this long


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AdminEnv]:
    def with_pool(base: Path, **kw: Any) -> dict[str, Any]:
        raw = helpers.loopback_inventory(base, **kw)
        raw["network"]["dhcp_range"] = list(POOL)
        return raw

    monkeypatch.setattr(admin_env, "loopback_inventory", with_pool)
    e = admin_env.start(tmp_path)
    yield e
    e.close()


def _archive_leases(archive: Path, tmp: Path) -> dict[str, str]:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(DB_NAME)
        assert member is not None  # a regular file, not a directory or link
        data = member.read()
    db = tmp / "check.db"
    db.write_bytes(data)
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT mac, ip FROM leases").fetchall())


def test_backup_during_a_dhcp_burst_and_restore_into_a_fresh_state_dir(
    env: AdminEnv, tmp_path: Path
) -> None:
    assert env.fetch("/ignition/master.ign", MASTER) == 200  # master-0: installed
    env.wait(lambda: env.get("/api/v1/nodes")["nodes"][1]["installed_at"])
    acks: list[tuple[str, str, float]] = []  # mac, ip, when its ACK arrived
    stop = threading.Event()
    failures: list[BaseException] = []

    def burst() -> None:
        deadline = time.monotonic() + BURST_SECONDS
        try:
            for i in range(BURST):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                mac = f"02:00:5e:00:01:{i:02x}"
                ip = dhcp_exchange(env, mac)
                acks.append((mac, ip, time.monotonic()))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=burst, daemon=True)
    thread.start()
    try:
        env.wait(lambda: len(acks) >= 15, timeout=BURST_SECONDS)
        archive = tmp_path / "backup.tar.gz"
        started = time.monotonic()
        done = run_cli("backup", "--config", str(env.config), str(archive))
        ended = time.monotonic()
        assert done.returncode == 0, done.stderr
        assert "not included: ignition files" in done.stdout
    finally:
        stop.set()
        thread.join(timeout=BURST_SECONDS)
    assert not failures, failures
    before = {mac: ip for mac, ip, t in acks if t < started}
    saved = _archive_leases(archive, tmp_path)
    assert len(before) >= 15
    during = [mac for mac, _, t in acks if started <= t <= ended]
    print(f"burst: {len(before)} ACKs before the backup, {len(during)} while it ran")
    assert during, "the backup did not overlap the burst"
    missing = {mac: ip for mac, ip in before.items() if saved.get(mac) != ip}
    assert not missing, f"ACKed before the backup but not in it: {missing}"

    # Refused while the daemon runs on that state dir; nothing changed.
    refused = run_cli("restore", "--config", str(env.config), str(archive))
    assert refused.returncode == 1 and "running" in refused.stderr, refused.stderr
    assert env.daemon is not None and f"PID {env.daemon.proc.pid}" in refused.stderr
    assert not (env.base / "state" / "appliance.db.before-restore").exists()

    # Another cluster's inventory: refused, also after the daemon is gone.
    assert env.daemon is not None
    env.daemon.stop()
    env.daemon = None
    other = dict(env.raw, cluster={**env.raw["cluster"], "name": "other"})
    other["state_dir"] = str(tmp_path / "other-state")
    other_config = write_inventory(tmp_path / "other.yaml", other)
    refused = run_cli("restore", "--config", str(other_config), str(archive))
    assert refused.returncode == 1, refused.stdout
    assert "not of 'other.example.com'" in refused.stderr and "--force" in refused.stderr
    assert not (tmp_path / "other-state" / DB_NAME).exists()

    # Restored into a fresh state dir, a daemon serves the same leases and install marks.
    fresh = dict(env.raw, state_dir=str(tmp_path / "fresh-state"))
    fresh_config = write_inventory(tmp_path / "fresh.yaml", fresh)
    restored = run_cli("restore", "--config", str(fresh_config), str(archive))
    assert restored.returncode == 0, restored.stderr
    daemon = Daemon(fresh_config, tmp_path / "fresh-daemon.log")
    try:
        daemon.wait_for("serving demo.example.com", timeout=30)
        token = (tmp_path / "fresh-state" / "admin.token").read_text().strip()
        status, leases = get_json(f"{env.admin}/api/v1/leases?all=1", token)
        assert status == 200, leases
        served = {lease["mac"]: lease["ip"] for lease in leases["leases"]}
        assert served == saved
        status, nodes = get_json(f"{env.admin}/api/v1/nodes", token)
        assert status == 200
        installed = {n["name"] for n in nodes["nodes"] if n["installed_at"]}
        assert installed == {"master-0"}
    finally:
        daemon.stop()
