"""The proxy's node-related lines carry the node's name, MAC and address as fields of their
own, so `--log-format json` lets a log pipeline pick one machine's lines (issue 17)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from appliance.logs import JsonFormatter
from tests.unit.test_proxy_relay import WORKERS, exchange, proxy


def _json(record: logging.LogRecord) -> dict[str, object]:
    out = json.loads(JsonFormatter().format(record))
    assert isinstance(out, dict)
    return out


async def test_a_backend_down_line_names_its_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy-test")
    async with proxy(tmp_path, "epoll", False, monkeypatch) as p:
        dead = p.backends["worker-1"].server
        dead.close()
        await dead.wait_closed()
        for i in range(2):  # round-robin meets worker-1: its connect is refused
            await exchange(p.port, [f"try {i}"])
        p.svc.set_admin_state("ingress_http", "worker-0", "drain")
    down = [r for r in caplog.records if "backend worker-1 down" in r.getMessage()]
    assert down, [r.getMessage() for r in caplog.records]
    line = _json(down[0])
    assert line["node"] == "worker-1"
    assert line["ip"] == WORKERS["worker-1"]
    assert line["mac"] == "52:54:00:00:01:01"
    drained = [r for r in caplog.records if "worker-0 set to drain" in r.getMessage()]
    assert drained and _json(drained[0])["node"] == "worker-0"
    assert _json(drained[0])["ip"] == WORKERS["worker-0"]


async def test_an_error_every_connection_hits_is_logged_rarely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a connection's handler hit by a flood of connections: a traceback per
    WARN_EVERY seconds, not one per connection (the journal is not the client's to fill)."""
    caplog.set_level(logging.INFO, logger="proxy-test")
    async with proxy(tmp_path, "epoll", False, monkeypatch) as p:
        for _ in range(100):
            p.svc._poller_error(RuntimeError("bug in a handler"))
    errors = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is not None
