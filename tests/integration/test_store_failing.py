"""A store that fails (tests/fakestore.py): a lease not stored is never ACKed, and the
next client is served once the store works again; an event not stored is counted and
logged once per burst, and the writer keeps writing."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.events import Event
from appliance.registry import DHCP
from appliance.storequeue import DaemonStore, StoreWriter
from appliance.supervisor import Supervisor, load_plan
from services.dhcp import server as dhcp_server
from tests.fakestore import FailingStore
from tests.helpers import free_port, loopback_inventory, write_inventory
from tests.integration.test_graceful_stop import _request_message


async def test_a_lease_write_that_fails_withholds_the_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FailingStore(tmp_path / "fake.db")
    monkeypatch.setattr(DaemonStore, "open_leases", lambda self, state_dir, busy_ms: fake)
    raw: dict[str, Any] = loopback_inventory(tmp_path)
    raw["listen"]["dhcp"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    config = write_inventory(tmp_path / "inv.yaml", raw)
    sup = Supervisor(config, specs=[DHCP])
    await sup.start(load_plan(config))
    try:
        dhcp = sup.running["dhcp"]
        assert isinstance(dhcp, dhcp_server.DhcpService)
        first, second = raw["nodes"][1], raw["nodes"][2]
        fake.fail_writes = True
        message = _request_message(first["mac"], first["ip"], "127.0.0.1")
        dhcp.on_datagram(message, ("0.0.0.0", 68), dhcp.transports[0], False)
        for _ in range(100):  # bounded: 5 s
            if dhcp.counters["commit_failures"]:
                break
            await asyncio.sleep(0.05)
        assert dhcp.counters["commit_failures"] >= 1
        await asyncio.sleep(0.2)
        assert dhcp.counters["sent"] == 0 and fake.saved == {}  # no ACK, nothing promised

        fake.fail_writes = False  # the store works again: the next client is served
        message = _request_message(second["mac"], second["ip"], "127.0.0.1")
        dhcp.on_datagram(message, ("0.0.0.0", 68), dhcp.transports[0], False)
        for _ in range(100):
            if dhcp.counters["sent"]:
                break
            await asyncio.sleep(0.05)
        assert dhcp.counters["sent"] == 1
        assert list(fake.saved) == [second["mac"]]
    finally:
        await sup.stop()


def test_an_event_write_that_fails_is_counted_and_logged_once_per_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FailingStore()
    fake.fail_writes = True
    writer = StoreWriter(fake)
    try:
        with caplog.at_level(logging.ERROR, logger="appliance.store"):
            for i in range(50):
                writer.submit(Event("master-0", "kernel", f"try {i}", float(i)))
            deadline = time.monotonic() + 5
            while writer.done < writer.seq and time.monotonic() < deadline:
                time.sleep(0.01)
        assert writer.stats()["failed"] == 50
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]

        fake.fail_writes = False  # the writer keeps serving
        writer.submit(Event("master-0", "kernel", "ok", 99.0))
        deadline = time.monotonic() + 5
        while writer.done < writer.seq and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e.detail for e in fake.recorded] == ["ok"]
        assert writer.stats()["written"] == 1
    finally:
        writer.close()
