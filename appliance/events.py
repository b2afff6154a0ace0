"""The node-progress event bus.

Services publish what they saw a node do (node, stage, detail, time); the store, the
admin API, the dashboard and metrics subscribe. `publish` is synchronous and never
blocks: a subscriber that falls behind loses its OLDEST events (counted), so a stuck
dashboard client can never stall DHCP or TFTP.

The bus belongs to one event loop: call `publish` from the loop's thread (other threads
use `loop.call_soon_threadsafe(bus.publish, ...)`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from time import time as _wallclock
from types import TracebackType

# The install story of a node, in the order it normally happens.
STAGES: tuple[str, ...] = (
    "dhcp-offer",
    "dhcp-ack",
    "bootloader",
    "kernel",
    "initramfs",
    "ignition",
    "machine-config",
    "csr-client",
    "csr-serving",
    "node-ready",
    "bootstrap-complete",  # the bootstrap node: retired from the LB and ignition
    "gpu-discovered",
    "gpu-operator-ready",
    "gpu-validated",
)
_STAGE_INDEX = {stage: i for i, stage in enumerate(STAGES)}

# Not progress but a state: a node asked for a boot file (loader, kernel, initramfs,
# rootfs, image, ignition) and was refused. It stays until the node gets past the point
# where it failed (progress.timeline), so it is kept out of the ordered STAGES.
BOOT_ERROR = "boot-error"
STATES: tuple[str, ...] = (BOOT_ERROR,)
# What failed -> the stage whose (later) success clears the error. The rootfs and the
# image are fetched after the initramfs and before the ignition.
BOOT_FILE_STAGES = {
    "loader": "bootloader",
    "kernel": "kernel",
    "initramfs": "initramfs",
    "rootfs": "ignition",
    "image": "ignition",
    "ignition": "ignition",
    "file": "ignition",  # another file under images_dir, named by a boot config
}


def boot_error_detail(what: str, path: str, cause: str, via: str) -> str:
    """The detail of a boot-error event: `kernel /images/k: missing (http 404)`. The first
    word is ours (a BOOT_FILE_STAGES key); the path is the client's."""
    return f"{what} {path}: {cause} ({via})"


def blocked_stage(detail: str) -> str:
    """The stage a boot-error's detail blocks (see boot_error_detail)."""
    return BOOT_FILE_STAGES.get(detail.split(" ", 1)[0], "ignition")


def stage_index(stage: str) -> int:
    """Position of `stage` in STAGES; ValueError for an unknown stage."""
    try:
        return _STAGE_INDEX[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})") from None


@dataclass(frozen=True, slots=True)
class Event:
    node: str
    stage: str
    detail: str
    time: float
    source: str = ""  # the publishing service, e.g. "dhcp"
    id: int = 0  # assigned by the store; 0 while not stored
    # False: the stage was attempted and refused (a CSR left pending or denied). Such an
    # event is recorded and streamed, but the node has not reached the stage.
    ok: bool = True

    def to_dict(self) -> dict[str, str | float | int | bool]:
        return {
            "id": self.id,
            "node": self.node,
            "stage": self.stage,
            "detail": self.detail,
            "time": self.time,
            "source": self.source,
            "ok": self.ok,
        }


class Subscription:
    """One subscriber's bounded queue of events.

    An async iterator of Event; `close()` (or leaving the `with` block) unsubscribes.
    A closed subscription still yields what was already queued, then stops, so a
    consumer can flush on shutdown.
    """

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self._bus = bus
        self._queue: deque[Event] = deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None
        self.dropped = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def _offer(self, event: Event) -> bool:
        """Queue `event`; True when the oldest queued event had to be dropped for it."""
        dropped = len(self._queue) >= self._maxsize
        if dropped:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._wake()
        return dropped

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Event:
        """The next event; waits for one. StopAsyncIteration once closed and drained."""
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def drain(self) -> list[Event]:
        """Take every queued event without waiting."""
        events = list(self._queue)
        self._queue.clear()
        return events

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._bus._unsubscribe(self)
        self._wake()  # a consumer waiting in get() must see the close

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventBus:
    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self.published = 0
        self.dropped = 0  # summed over all subscribers

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def publish(
        self,
        node: str,
        stage: str,
        detail: str = "",
        *,
        source: str = "",
        time: float | None = None,
        ok: bool = True,
    ) -> Event:
        if stage not in STATES:
            stage_index(stage)  # an unknown stage is a bug in the caller: fail loudly
        event = Event(node, stage, detail, _wallclock() if time is None else time, source, ok=ok)
        self.published += 1
        for sub in self._subscriptions:
            if sub._offer(event):
                self.dropped += 1
        return event

    def subscribe(self, maxsize: int = 10000) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subscriptions.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.remove(sub)  # close() calls this once per subscription
