"""The node-progress event bus: ordering, validation, slow subscribers, close."""

from __future__ import annotations

import asyncio

import pytest

from appliance.events import STAGES, Event, EventBus, stage_index


def test_stages_in_install_order() -> None:
    assert STAGES[0] == "dhcp-offer"
    assert STAGES[-1] == "gpu-validated"
    assert len(set(STAGES)) == len(STAGES) == 14
    assert [stage_index(s) for s in STAGES] == list(range(14))
    assert stage_index("ignition") < stage_index("machine-config") < stage_index("csr-client")


def test_unknown_stage_is_a_programming_error() -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="unknown stage 'booted'"):
        stage_index("booted")
    with pytest.raises(ValueError, match="unknown stage"):
        bus.publish("m0", "booted")
    assert bus.published == 0


def test_publish_without_subscribers_returns_the_event() -> None:
    bus = EventBus()
    ev = bus.publish("m0", "kernel", "vmlinuz", source="tftp", time=12.5)
    assert ev == Event("m0", "kernel", "vmlinuz", 12.5, "tftp", 0)
    assert ev.to_dict() == {
        "id": 0,
        "node": "m0",
        "stage": "kernel",
        "detail": "vmlinuz",
        "time": 12.5,
        "source": "tftp",
        "ok": True,
    }
    assert bus.published == 1
    assert bus.dropped == 0


def test_publish_defaults_to_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.events._wallclock", lambda: 1000.0)
    assert EventBus().publish("m0", "dhcp-ack").time == 1000.0


async def test_subscriber_sees_events_in_publish_order() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        for i, stage in enumerate(STAGES):
            bus.publish("w1", stage, time=float(i))
        got = [await sub.get() for _ in STAGES]
    assert [e.stage for e in got] == list(STAGES)
    assert [e.time for e in got] == [float(i) for i in range(len(STAGES))]


async def test_waiting_subscriber_is_woken_by_publish() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    task = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    assert not task.done()
    bus.publish("m0", "bootloader", time=1.0)
    ev = await asyncio.wait_for(task, 1)
    assert ev.stage == "bootloader"


async def test_full_subscriber_drops_oldest_and_never_blocks_publish() -> None:
    bus = EventBus()
    slow = bus.subscribe(maxsize=3)
    fast = bus.subscribe(maxsize=100)
    for i in range(10):
        bus.publish("m0", "ignition", str(i), time=float(i))
    assert [e.detail for e in slow.drain()] == ["7", "8", "9"]  # the newest survive
    assert slow.dropped == 7
    assert fast.dropped == 0
    assert [e.detail for e in fast.drain()] == [str(i) for i in range(10)]
    assert bus.dropped == 7
    assert bus.published == 10


async def test_multiple_subscribers_each_get_every_event() -> None:
    bus = EventBus()
    subs = [bus.subscribe() for _ in range(3)]
    bus.publish("m0", "dhcp-offer", time=1.0)
    bus.publish("m1", "dhcp-ack", time=2.0)
    for sub in subs:
        assert [(e.node, e.stage) for e in sub.drain()] == [
            ("m0", "dhcp-offer"),
            ("m1", "dhcp-ack"),
        ]


async def test_close_unsubscribes_and_ends_iteration_after_queued_events() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish("m0", "kernel", time=1.0)
    bus.publish("m0", "initramfs", time=2.0)
    sub.close()
    sub.close()  # idempotent
    assert bus.subscribers == 0
    bus.publish("m0", "ignition", time=3.0)  # not delivered after close
    assert [e.stage async for e in sub] == ["kernel", "initramfs"]


async def test_close_wakes_a_waiting_consumer() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    seen: list[Event] = []

    async def consume() -> None:
        async for ev in sub:
            seen.append(ev)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    bus.publish("m0", "node-ready", time=1.0)
    await asyncio.sleep(0)
    sub.close()
    await asyncio.wait_for(task, 1)
    assert [e.stage for e in seen] == ["node-ready"]


def test_context_manager_closes() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        assert bus.subscribers == 1
    assert sub.closed
    assert bus.subscribers == 0


def test_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EventBus().subscribe(maxsize=0)
