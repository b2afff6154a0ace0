"""The background tasks a service owns, started in one place and stopped in one place.

Every service used to keep a list of tasks and a hand-written cancel-and-reap block in its
`stop`, each a little different: one forgot a task that swallowed its cancel, one never
retrieved an exception (asyncio then says "Task exception was never retrieved" at exit,
long after the fact). A TaskSet does it once: `spawn` keeps a strong reference (the loop
keeps only weak ones) and forgets the task when it ends, a task that fails is logged with
its name the moment it fails, and `close` cancels what is left, cancels again a task that
swallowed the cancel, and waits a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["TaskSet", "cancel_and_wait"]

T = TypeVar("T")

CLOSE_TIMEOUT = 5.0  # s: a task still running after this many cancels is left, and said so
_RECANCEL = 0.1  # s between cancels of a task that swallowed one


class TaskSet:
    """A set of tasks that ends together. Not thread-safe: the event loop's thread only."""

    def __init__(self, log: logging.Logger, what: str = "task") -> None:
        self.log = log
        self.what = what
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failed = 0  # tasks that ended with an exception (not a cancel)

    def spawn(
        self, coro: Coroutine[Any, Any, T], *, name: str | None = None, report: bool = True
    ) -> asyncio.Task[T]:
        """Run `coro` as a task of this set. `report`: log its exception if it fails (off
        when the caller awaits the task and handles the exception itself)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done if report else self._tasks.discard)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here: no "never retrieved" at exit
        if exc is not None:
            self.failed += 1
            self.log.error("%s %s failed: %s", self.what, task.get_name(), exc, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def __bool__(self) -> bool:
        return bool(self._tasks)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Cancel every task and wait for them to end, at most `timeout` seconds."""
        await cancel_and_wait(self._tasks, timeout, self.log, self.what)
        self._tasks.clear()


async def cancel_and_wait(
    tasks: set[asyncio.Task[Any]] | list[asyncio.Task[Any]] | asyncio.Task[Any] | None,
    timeout: float = CLOSE_TIMEOUT,
    log: logging.Logger | None = None,
    what: str = "task",
) -> None:
    """Cancel `tasks` (one, several or None) and wait until they have ended: a task that
    swallowed its cancel gets another, up to `timeout` seconds. Exceptions they ended with
    are retrieved (and not raised: the caller is stopping them)."""
    if tasks is None:
        return
    group = [tasks] if isinstance(tasks, asyncio.Task) else list(tasks)
    me = asyncio.current_task()
    pending = {t for t in group if not t.done() and t is not me}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL, left))
    if pending and log is not None:
        log.warning(
            "%d %s(s) still running %g s after being cancelled: %s",
            len(pending),
            what,
            timeout,
            ", ".join(sorted(t.get_name() for t in pending)),
        )
    for task in group:
        if task.done() and not task.cancelled():
            with contextlib.suppress(BaseException):
                task.exception()
