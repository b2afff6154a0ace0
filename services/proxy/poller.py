"""Readiness of the proxied sockets: one edge-triggered epoll set inside the event loop.

uvloop's add_reader/remove_reader make a libuv poll handle per call (an epoll ADD+DEL
probe, an FIONBIO ioctl, and two DELs when it stops): about a dozen system calls per
socket when a pump toggles its interest. Here every proxied socket is registered once
in a private epoll set (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET), whose own descriptor is
the one reader the loop watches. Closing a socket takes it out of the set, so a short
connection costs one epoll_ctl per socket and no interest changes at all. Handlers
must cope with edges: read and write until EAGAIN (or a short read), remember what
they still owe.

Where select.epoll does not exist, `LoopPoller` drives the same handlers from the
loop's add_reader/add_writer (level-triggered: the connection says what it wants).
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Callable

READ = 1  # the event bits handlers receive (the same values as EPOLLIN/EPOLLOUT)
WRITE = 4
ERROR = 8  # EPOLLERR
HANGUP = 16  # EPOLLHUP
PEER_SHUT = 0x2000  # EPOLLRDHUP: the peer sent its FIN
MAX_EVENTS = 1024  # events taken per wakeup; the loop calls again while more are ready

Handler = Callable[[int], None]
HAVE_EPOLL = hasattr(select, "epoll")


class EpollPoller:
    """Edge-triggered readiness for many sockets through one loop reader."""

    level_triggered = False

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_error: Callable[[BaseException], None]
    ) -> None:
        self.loop = loop
        self.on_error = on_error
        self.ep = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.now = time.monotonic()  # of the current batch: one clock read per wakeup
        self._mask = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
        loop.add_reader(self.ep.fileno(), self._ready)

    def add(self, fd: int, handler: Handler) -> None:
        self.ep.register(fd, self._mask)
        self.handlers[fd] = handler

    def want(self, fd: int, read: bool, write: bool) -> None:
        """Edge-triggered: interest never changes (the fallback needs this call)."""

    def forget(self, fd: int) -> None:
        """Before the descriptor is closed: the close itself leaves the epoll set."""
        self.handlers.pop(fd, None)

    def _ready(self) -> None:
        self.now = time.monotonic()
        handlers = self.handlers
        for fd, events in self.ep.poll(0, MAX_EVENTS):
            handler = handlers.get(fd)
            if handler is None:  # closed earlier in this batch
                continue
            try:
                handler(events)
            except Exception as exc:  # one connection's bug must not stop the others
                self.on_error(exc)

    def __len__(self) -> int:
        return len(self.handlers)

    def close(self) -> None:
        if not self.ep.closed:
            self.loop.remove_reader(self.ep.fileno())
            self.ep.close()
        self.handlers.clear()


class LoopPoller:
    """The fallback: the loop's own readers and writers, switched by `want`."""

    level_triggered = True

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_error: Callable[[BaseException], None]
    ) -> None:
        self.loop = loop
        self.on_error = on_error
        self.handlers: dict[int, Handler] = {}
        self.wanted: dict[int, tuple[bool, bool]] = {}
        self.now = time.monotonic()

    def add(self, fd: int, handler: Handler) -> None:
        self.handlers[fd] = handler
        self.wanted[fd] = (False, False)

    def want(self, fd: int, read: bool, write: bool) -> None:
        old = self.wanted.get(fd)
        if old is None or old == (read, write):
            return
        if read != old[0]:
            if read:
                self.loop.add_reader(fd, self._call, fd, READ)
            else:
                self.loop.remove_reader(fd)
        if write != old[1]:
            if write:
                self.loop.add_writer(fd, self._call, fd, WRITE)
            else:
                self.loop.remove_writer(fd)
        self.wanted[fd] = (read, write)

    def forget(self, fd: int) -> None:
        self.want(fd, False, False)
        self.handlers.pop(fd, None)
        self.wanted.pop(fd, None)

    def _call(self, fd: int, events: int) -> None:
        self.now = time.monotonic()
        handler = self.handlers.get(fd)
        if handler is not None:
            try:
                handler(events)
            except Exception as exc:
                self.on_error(exc)

    def __len__(self) -> int:
        return len(self.handlers)

    def close(self) -> None:
        for fd in list(self.handlers):
            self.forget(fd)


Poller = EpollPoller | LoopPoller


def make_poller(
    loop: asyncio.AbstractEventLoop, on_error: Callable[[BaseException], None]
) -> Poller:
    return EpollPoller(loop, on_error) if HAVE_EPOLL else LoopPoller(loop, on_error)
