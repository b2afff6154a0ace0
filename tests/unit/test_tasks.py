"""TaskSet: tasks a service owns end together, failures are said once, swallowers too."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from appliance.tasks import TaskSet, cancel_and_wait

log = logging.getLogger("test.tasks")


async def test_close_cancels_and_forgets() -> None:
    tasks = TaskSet(log)
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    t = tasks.spawn(forever(), name="forever")
    await started.wait()
    assert len(tasks) == 1 and list(tasks) == [t]
    await tasks.close()
    assert t.cancelled() and not tasks


async def test_finished_tasks_are_dropped() -> None:
    tasks = TaskSet(log)
    t = tasks.spawn(asyncio.sleep(0), name="short")
    await t
    await asyncio.sleep(0)
    assert not tasks


async def test_a_failure_is_logged_at_once_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet(log, what="probe")

    async def boom() -> None:
        raise RuntimeError("disk on fire")

    with caplog.at_level(logging.ERROR, "test.tasks"):
        t = tasks.spawn(boom(), name="probe-42")
        with contextlib.suppress(RuntimeError):
            await t
        await asyncio.sleep(0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["probe probe-42 failed: disk on fire"]
    assert tasks.failed == 1 and not tasks


async def test_report_false_leaves_the_exception_to_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet(log)

    async def boom() -> None:
        raise ValueError("mine")

    with caplog.at_level(logging.ERROR, "test.tasks"):
        t = tasks.spawn(boom(), report=False)
        with pytest.raises(ValueError):
            await t
    assert not caplog.records and tasks.failed == 0 and not tasks


async def test_a_task_that_swallows_its_cancel_gets_another() -> None:
    """A task that catches CancelledError once (a cleanup that awaits) still ends."""
    tasks = TaskSet(log)
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed >= 3:
                    raise

    t = tasks.spawn(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await tasks.close(timeout=5)
    assert t.cancelled() and swallowed == 3
    assert loop.time() - t0 < 2


async def test_a_task_that_never_ends_is_left_and_said(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet(log, what="worker")
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    t = tasks.spawn(deaf(), name="deaf")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, "test.tasks"):
        await tasks.close(timeout=0.3)
    assert any(
        "still running" in r.getMessage() and "deaf" in r.getMessage() for r in caplog.records
    )
    release.set()
    t.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await t


async def test_cancel_and_wait_one_or_none() -> None:
    await cancel_and_wait(None)
    t = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
    await cancel_and_wait(t)
    assert t.cancelled()


async def test_an_exception_raised_while_cancelling_is_retrieved() -> None:
    """A task whose cleanup raises ends with that error: it is retrieved, not raised."""

    async def messy() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise OSError("close failed")

    t = asyncio.get_running_loop().create_task(messy())
    await asyncio.sleep(0)
    await cancel_and_wait([t])
    assert t.done() and isinstance(t.exception(), OSError)
