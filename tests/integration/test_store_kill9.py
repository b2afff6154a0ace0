"""Leases survive kill -9: every lease a writer saw committed is there after the crash."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from appliance.store import DB_NAME, Store

REPO = Path(__file__).resolve().parents[2]
LINES_BEFORE_KILL = 300

# The writer: bounded (2000 leases or 5 s). A MAC is printed only after put_lease has
# returned, i.e. after COMMIT; renewals and refused steals keep other writes in flight.
CHILD = """
import sys, time
from pathlib import Path
from appliance.store import Lease, LeaseConflict, Store

store = Store.open(Path(sys.argv[1]))
deadline = time.monotonic() + 5.0
for i in range(2000):
    if time.monotonic() > deadline:
        break
    now = time.time()
    mac = "52:54:00:%02x:%02x:%02x" % (i >> 16 & 255, i >> 8 & 255, i & 255)
    ip = "10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255)
    store.put_lease(Lease(mac, ip, "n%d" % i, now + 3600, "offered", now))
    store.put_lease(Lease(mac, ip, "n%d" % i, now + 7200, "bound", now))
    if i:
        try:  # an address already held by another MAC must be refused
            store.put_lease(Lease(mac, "10.0.0.0", "thief", now + 60, "bound", now))
        except LeaseConflict:
            pass
        else:
            print("STOLEN", flush=True)
    print(mac, flush=True)
"""


def test_leases_survive_sigkill(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        reported: list[str] = []
        while len(reported) < LINES_BEFORE_KILL:
            line = proc.stdout.readline()
            if not line:
                break  # the writer ended early (it is bounded); still check what it wrote
            reported.append(line.strip())
        proc.kill()  # SIGKILL, by PID
        rest, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    # Lines flushed after the first batch were committed too.
    reported += [line.strip() for line in rest.splitlines() if line.strip()]
    assert proc.returncode in (0, -signal.SIGKILL), err
    assert "STOLEN" not in reported
    assert len(reported) >= 50, f"writer reported only {len(reported)} leases: {err}"

    with Store.open(state) as store:
        stored = {lease.mac: lease for lease in store.leases()}
        missing = [mac for mac in reported if mac not in stored]
        assert not missing, f"{len(missing)} committed leases lost, e.g. {missing[:3]}"
        assert all(stored[mac].state == "bound" for mac in reported)
        assert not any(lease.hostname == "thief" for lease in stored.values())

    conn = sqlite3.connect(state / DB_NAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        shared = conn.execute(
            "SELECT ip, count(*) FROM leases GROUP BY ip HAVING count(*) > 1"
        ).fetchall()
        assert shared == []
    finally:
        conn.close()
