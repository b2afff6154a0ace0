"""The one rate-limited logger: a client that repeats a fault cannot flood the journal."""

from __future__ import annotations

import json
import logging

import pytest

from appliance.logs import JsonFormatter, fields
from appliance.ratelog import RateGate, RateLimitedLog


def test_first_line_through_then_quiet_then_the_count() -> None:
    gate = RateGate(every=10, burst=1)
    assert gate.admit("malformed", 0.0).write
    for t in range(1, 10):
        assert not gate.admit("malformed", float(t)).write
    v = gate.admit("malformed", 10.0)
    assert v.write and v.held == 9
    assert gate.held == 9 and gate.pending() == 0


def test_keys_are_independent_and_burst_counts() -> None:
    gate = RateGate(every=60, burst=3)
    assert [gate.admit("a", 0.0).write for _ in range(5)] == [True, True, True, False, False]
    assert gate.admit("b", 1.0).write
    assert gate.pending() == 2


def test_a_flood_of_new_keys_stays_bounded() -> None:
    """Spoofed sources each make a new key: memory stays at `keep` keys."""
    gate = RateGate(every=60, keep=100)
    for i in range(10_000):
        gate.admit(("client_limit", f"198.51.100.{i % 256}", i), 0.0)
    assert len(gate._keys) == 100


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RateGate(every=1, burst=0)


def test_the_logger_says_how_many_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("appliance.test"), every=5, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "appliance.test"):
        for i in range(20):
            now[0] = i * 0.5  # 10 s of a client resending every half second
            rl.warning("bad", "malformed packet from %s", "192.0.2.9")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "malformed packet from 192.0.2.9",
        "malformed packet from 192.0.2.9 (9 more like this in the last 5 s were not logged)",
    ]


def test_a_disabled_level_is_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("appliance.test.quiet")
    logger.setLevel(logging.WARNING)
    try:
        rl = RateLimitedLog(logger, every=5, clock=lambda: 0.0)
        assert not rl.info("k", "hidden")
        assert rl.gate.held == 0
        assert rl.warning("k", "shown")
    finally:
        logger.setLevel(logging.NOTSET)


def test_fields_reach_the_json_line() -> None:
    rec = logging.LogRecord("appliance.dhcp", logging.INFO, __file__, 1, "ack %s", ("x",), None)
    for key, value in fields(node="worker-0", mac="52:54:00:00:00:01", ip="192.0.2.10").items():
        setattr(rec, key, value)
    out = json.loads(JsonFormatter().format(rec))
    assert (out["node"], out["mac"], out["ip"]) == ("worker-0", "52:54:00:00:00:01", "192.0.2.10")
    assert fields() == {} and fields(node=None, ip="") == {}


def test_exception_carries_the_traceback_and_is_limited(caplog: pytest.LogCaptureFixture) -> None:
    """A service's "error on a packet" line keeps its traceback (added for dns's log_error)."""
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("appliance.test.exc"), every=10, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, "appliance.test.exc"):
        for i in range(3):
            now[0] = float(i)
            try:
                raise ValueError("bad label")
            except ValueError:
                rl.exception("error", "dns: error on a query from %s", "192.0.2.9")
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert record.exc_info[0] is ValueError


def test_a_clock_stepped_back_opens_a_new_window() -> None:
    """Wall time (the DHCP core's `now`) can be stepped back: a line is not silenced until
    the clock catches up again."""
    gate = RateGate(every=300)
    assert gate.admit("worker-0", 1000.0).write
    assert not gate.admit("worker-0", 1100.0).write
    v = gate.admit("worker-0", 400.0)  # stepped back by ten minutes
    assert v.write and v.held == 1
