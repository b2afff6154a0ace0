"""The services reach the state store only through appliance.stores' Protocols: no
service shell (nor the metrics) loads the SQLite implementation, and the DHCP service's
own lease connection, handed out by the daemon's store, says "busy" in the Protocols'
terms (StoreBusy) instead of leaking sqlite3's exceptions."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.store import StoreError
from appliance.storequeue import DaemonStore
from appliance.stores import Lease, StoreBusy, StoreUnavailable
from tests.unit.test_layers import _contract

ROOT = Path(__file__).resolve().parents[2]
SQLITE_STORE = ("appliance.store", "appliance.storequeue")
CONSUMERS = (
    "services.dhcp.server",
    "services.dns.server",
    "services.tftp.server",
    "services.http.server",
    "services.proxy.server",
    "services.cluster.service",
    "appliance.metrics",
    "appliance.service",
    "appliance.stores",
)

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("module", CONSUMERS)
def test_a_consumer_of_the_store_loads_no_sqlite_store(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    loaded = set(json.loads(out))
    assert not loaded & set(SQLITE_STORE), module


def test_the_import_linter_contract_names_them() -> None:
    contract = _contract("services-behind-store-interfaces")
    assert set(contract["forbidden_modules"]) == set(SQLITE_STORE)
    assert {"services", "appliance.metrics", "appliance.service"} <= set(contract["source_modules"])


def _lease(mac: str = "52:54:00:00:00:10", ip: str = "192.0.2.10") -> Lease:
    return Lease(mac, ip, "w0", 2e9, "bound", 1.0)


def test_the_lease_connection_says_busy_in_the_protocols_terms(tmp_path: Path) -> None:
    daemon = DaemonStore.open(tmp_path)
    leases = daemon.open_leases(tmp_path, busy_timeout_ms=50)
    holder = sqlite3.connect(tmp_path / "appliance.db", isolation_level=None)
    try:
        leases.save_leases([_lease()])
        assert [lease.mac for lease in leases.leases()] == ["52:54:00:00:00:10"]
        holder.execute("BEGIN IMMEDIATE")  # an operator's sqlite3 shell holds the lock
        with pytest.raises(StoreBusy):
            leases.save_leases([_lease("52:54:00:00:00:11", "192.0.2.11")])
        with pytest.raises(StoreBusy):
            leases.note_unknowns([], 10, lost=1)
        holder.execute("ROLLBACK")
        leases.save_leases([_lease("52:54:00:00:00:11", "192.0.2.11")])  # the same write, later
        assert len(leases.leases()) == 2
    finally:
        holder.close()
        leases.close()
        daemon.close()


def test_busy_is_one_kind_of_unavailable() -> None:
    # The DHCP service retries a lease batch on StoreBusy only; unknown-machine records
    # wait in memory on any StoreUnavailable (locked, disk full, I/O), as before.
    assert issubclass(StoreBusy, StoreUnavailable)
    assert issubclass(StoreUnavailable, StoreError)


def test_the_services_store_has_no_synchronous_file_read() -> None:
    # What ServiceContext.store offers a service on the loop: queued writes, reads kept
    # in memory, `read` (the reader thread). A file read there would wait out a lock on
    # the loop (an operator's sqlite3 shell), so the type does not offer one.
    from appliance.stores import ServiceStore, StoreReader

    file_reads = {
        name
        for name in dir(StoreReader)
        if not name.startswith("_") and name not in ("progress", "cluster_state")
    }
    assert {"events", "last_event_id", "csr_decisions", "leases"} <= file_reads
    assert not file_reads & set(dir(ServiceStore))
    assert {"read", "record_events", "record_csr_decision", "progress"} <= set(dir(ServiceStore))
