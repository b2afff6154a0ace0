"""The pure decisions under both HTTP ports: request-head deadline and budget, log rate."""

from __future__ import annotations

from appliance.httpd import LOG_EVERY, Guard, HeadClock


def test_new_connection_must_send_its_head_in_time() -> None:
    clock = HeadClock(timeout=10, limit=100)
    assert clock.opened(now=0) == 10
    assert not clock.expired(9.9) and clock.expired(10)


def test_a_slowloris_is_not_saved_by_its_drip() -> None:
    clock = HeadClock(timeout=10, limit=1000)
    clock.opened(0)
    for t in range(1, 10):
        assert clock.received(float(t), 1, parsed=0) is None
    assert clock.expired(10)  # the deadline counts from the open, not the last byte


def test_a_complete_head_stops_the_clock_until_the_response_is_done() -> None:
    clock = HeadClock(timeout=10, limit=1000)
    clock.opened(0)
    clock.received(1, 40, parsed=1)
    assert clock.due is None and not clock.expired(100)
    clock.received(2, 5000, parsed=1)  # a request body: no deadline, no head budget
    assert clock.due is None
    clock.done()
    assert not clock.expired(1000)  # idle keep-alive: aiohttp's keep-alive timeout applies
    assert clock.received(200, 3, parsed=1) is None  # the next request starts
    assert clock.due == 210 and clock.expired(210)


def test_pipelined_heads_queued_behind_a_long_response() -> None:
    clock = HeadClock(timeout=10, limit=1000)
    clock.opened(0)
    clock.received(1, 80, parsed=2)  # two heads at once
    clock.done()
    assert not clock.expired(500)  # the second is still being answered
    clock.done()
    assert not clock.expired(600)


def test_head_budget() -> None:
    clock = HeadClock(timeout=10, limit=100)
    clock.opened(0)
    assert clock.received(1, 60, parsed=0) is None
    assert clock.received(2, 60, parsed=0) == "too large"


def test_hush_one_line_per_interval_with_the_count() -> None:
    guard = Guard("http", {})
    hush = guard.gate  # the malformed-request lines of one port: the one RateGate
    assert hush.every == LOG_EVERY

    def event(now: float) -> int:
        """0 to stay quiet, else the number of events the line covers."""
        v = hush.admit("malformed", now)
        return v.held + 1 if v.write else 0

    assert event(0) == 1
    assert [event(t) for t in (1, 2, 3)] == [0, 0, 0]
    assert event(10) == 4  # this line stands for the three held back and itself
    assert event(15) == 0
    assert event(30) == 2


def test_a_body_read_after_an_early_answer_is_not_a_head() -> None:
    """401 or 405 before the body was read: aiohttp still reads the body. Its bytes are
    no request head: no budget (it got a 431) and no deadline (a slow upload got a 408)."""
    clock = HeadClock(timeout=10, limit=1000)
    clock.opened(0)
    clock.received(1, 80, parsed=1)
    clock.done()  # answered early
    for t in range(2, 40):  # 100 kB, slowly
        assert clock.received(float(t), 2500, parsed=1, body=True) is None
    assert clock.due is None and not clock.expired(100)
    assert clock.received(101, 3, parsed=1) is None  # the body is over: the next head
    assert clock.due == 111
