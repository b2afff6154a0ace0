"""One proxied connection: the connect to a backend (with retry) and the two directions.

The upstream connect is a plain non-blocking connect(); the client's first bytes are
sent at once, without waiting for a writable wakeup: on loopback and fast LANs the
kernel has finished the handshake by then, and if it has not the send blocks and the
write edge resumes it. Until a byte got through (or the socket reported writable),
an error on the upstream socket is a failed connect: the client's bytes are still
held, so the connection is retried on the next eligible backend and the failing one
leaves the pool at once (passive check). What to do after a failure (blame, retry on
which backend, give up) and when a connect has timed out are the frontend's connects
core's decisions (connects.py); its one timer is armed by server.py, not one per
connection. This module makes the sockets and carries the decisions out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import TYPE_CHECKING

from services.proxy.connects import Attempt, Outcome
from services.proxy.poller import ERROR, HANGUP, PEER_SHUT, READ, WRITE
from services.proxy.pool import BackendState
from services.proxy.pump import DST_ERROR, EOF, SRC_ERROR, WAIT, Direction

if TYPE_CHECKING:
    from services.proxy.server import FrontendRunner

_IN_PROGRESS = frozenset({0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})
_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)  # no extra ioctl
_EXPLICIT_NONBLOCK = not hasattr(socket, "SOCK_NONBLOCK")
_READABLE = READ | ERROR | HANGUP | PEER_SHUT  # errors and hang-ups show in the next recv


class Connection(Attempt):
    __slots__ = (
        "backend",
        "client",
        "client_fd",
        "closed",
        "connecting",
        "down",
        "fe",
        "last",
        "poller",
        "up",
        "upstream",
        "upstream_fd",
    )

    def __init__(self, fe: FrontendRunner, client: socket.socket, peer: str) -> None:
        self.fe = fe
        self.poller = fe.service.get_poller()
        self.client = client
        self.client_fd = client.fileno()
        # peer, the backend it tries and those that failed it: the connects core decides.
        Attempt.__init__(self, peer)
        self.upstream: socket.socket | None = None
        self.upstream_fd = -1
        self.backend: BackendState | None = None  # once connected
        self.connecting = False
        self.up: Direction | None = None  # client -> backend
        self.down: Direction | None = None  # backend -> client
        self.last = self.poller.now
        self.closed = False

    def start(self) -> None:
        self._connect(self.fe.connects.choose(self))
        if not self.closed:
            try:
                self.poller.add(self.client_fd, self._on_client)
            except OSError as exc:
                self._local_error(exc)
                return
            self._interest()

    # --- connecting ------------------------------------------------------------------

    def _connect(self, backend: BackendState | None) -> None:
        """Connect to `backend`; on to the next one while connect() itself fails."""
        while backend is not None:
            try:
                sock = socket.socket(socket.AF_INET, _STREAM)
            except OSError as exc:
                self._local_error(exc)
                return
            if _EXPLICIT_NONBLOCK:
                sock.setblocking(False)
            err = sock.connect_ex(backend.sockaddr)
            if err in _IN_PROGRESS:
                self._attach(sock, backend)
                return
            sock.close()
            outcome = self.fe.connects.failed(self, backend, os.strerror(err), err, self.poller.now)
            backend = self._follow(outcome)
        self.close()  # no backend left (counted by the core), or given up

    def _attach(self, sock: socket.socket, backend: BackendState) -> None:
        # Small writes go out at once (a TLS handshake is many small writes). A failure
        # here (a reset already) shows in the first send or read.
        try:  # noqa: SIM105 (per connection: suppress() would cost an object)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.upstream, self.upstream_fd = sock, sock.fileno()
        self.connecting = True
        service = self.fe.service
        splice, ledger = service.splice, service.ledger
        if self.up is None or self.down is None:
            self.up = Direction(self.client, sock, splice, ledger)
            self.down = Direction(sock, self.client, splice, ledger)
        else:  # a retry: the client's bytes read so far are still in self.up
            self.up.dst = sock
            self.up.done, self.up.error = False, None
            self.down = Direction(sock, self.client, splice, ledger)
        self.fe.connect_started(self, backend, self.poller.now)
        try:
            self.poller.add(self.upstream_fd, self._on_upstream)
        except OSError as exc:  # out of memory or epoll watches: this host's trouble
            self._local_error(exc)
            return
        if self.up.holding:
            self._run(True, False)

    def _established(self) -> None:
        self.connecting = False
        backend = self.backend = self.fe.connects.established(self)
        backend.active += 1
        backend.total += 1

    def _connect_failed(self, why: str, err: int = 0, blame: bool = True) -> None:
        backend = self.trying
        assert backend is not None
        self._drop_upstream()
        outcome = self.fe.connects.failed(self, backend, why, err, self.poller.now, blame)
        self._retry(outcome)

    def timed_out(self, outcome: Outcome[Connection]) -> None:
        """The frontend's timer: this connect took longer than connect_timeout."""
        if self.connecting and not self.closed:
            self._drop_upstream()
            self._retry(outcome)

    def _drop_upstream(self) -> None:
        assert self.upstream is not None
        self.connecting = False
        self.poller.forget(self.upstream_fd)
        self.upstream.close()
        self.upstream, self.upstream_fd = None, -1

    def _retry(self, outcome: Outcome[Connection]) -> None:
        backend = self._follow(outcome)
        if backend is None:
            self.close()
            return
        self._connect(backend)
        if not self.closed:
            self._interest()

    def _follow(self, outcome: Outcome[Connection]) -> BackendState | None:
        """Carry out what the core said of a failed connect; the backend to try next."""
        if outcome.local:
            # Out of descriptors or ports here: the backend is not to blame (counted).
            self._warn_local(OSError(outcome.err, outcome.why))
            return None
        if outcome.down:  # the core took it out of the pool (passive check)
            fe = self.fe
            fe.service.ctx.log.warning(
                "%s: backend %s down: connect failed (%s)",
                fe.name,
                outcome.failed.spec.name,
                outcome.why,
                extra=fe.service.node_fields(outcome.failed),
            )
        return outcome.retry

    def _local_error(self, exc: OSError) -> None:
        # Out of descriptors or ports here: the backend is not to blame.
        self.fe.counters["local_errors"] += 1
        self._warn_local(exc)

    def _warn_local(self, exc: OSError) -> None:
        self.fe.warn("local", "connection from %s: %s", self.peer, exc)  # not one per client
        self.close()

    # --- readiness -------------------------------------------------------------------

    def _on_client(self, events: int) -> None:
        up = self.up
        if up is None or self.closed:
            return
        if events & _READABLE:
            up.readable = True
            if events & PEER_SHUT:
                up.peer_shut = True
        # Client readable: bytes to send up; client writable: held bytes to send down.
        self._run(bool(events & _READABLE), bool(events & WRITE))

    def _on_upstream(self, events: int) -> None:
        down = self.down
        if down is None or self.closed:
            return
        if self.connecting:
            if events & (ERROR | HANGUP) or self.poller.level_triggered:
                assert self.upstream is not None
                err = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._connect_failed(os.strerror(err), err)
                    return
                if events & (ERROR | HANGUP):
                    # A failed connect always leaves an error: this event was meant for
                    # an earlier socket with the same descriptor number, closed in this
                    # batch of events. The connect goes on.
                    return
            self._established()
        if events & _READABLE:
            down.readable = True
            if events & PEER_SHUT:
                down.peer_shut = True
        self._run(bool(events & WRITE), bool(events & _READABLE))

    def _run(self, pump_up: bool, pump_down: bool) -> None:
        """Pump the directions an edge concerns (an idle pump is a wasted call)."""
        up, down = self.up, self.down
        assert up is not None and down is not None
        if self.connecting and self.trying is not None and self.trying.admin == "disabled":
            # Disabled while we connected: it takes no connection at all (no blame).
            self._connect_failed("disabled", blame=False)
            return
        if pump_up:
            sent = up.moved
            result = up.pump()
            if up.moved != sent:
                if self.connecting:
                    self._established()  # a byte got through: the handshake is done
                assert self.backend is not None
                self.backend.bytes_in += up.moved - sent
                self.last = self.poller.now
            if result != WAIT and self._ended(up, result):
                return
        if pump_down:
            received = down.moved
            result = down.pump()
            if down.moved != received:
                assert self.backend is not None
                self.backend.bytes_out += down.moved - received
                self.last = self.poller.now
            if result != WAIT and self._ended(down, result):
                return
        self._interest()

    def _ended(self, way: Direction, result: int) -> bool:
        """Handle EOF or an error of one direction; True when the connection closed."""
        if self.connecting:
            if (result == DST_ERROR and way is self.up) or (
                result == SRC_ERROR and way is self.down
            ):
                exc = way.error
                assert exc is not None
                self._connect_failed(exc.strerror or str(exc), exc.errno or 0)
                return True  # retried with fresh directions, or closed
            if result == EOF:
                return False  # the client's FIN waits until the backend is connected
        if result != EOF:
            self.close()
            return True
        other = self.down if way is self.up else self.up
        if other is not None and other.done:
            self.close()  # both ways ended: close() sends the last FIN itself
            return True
        way.done = True
        try:
            way.dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:
            self.close()
            return True
        return False

    def _interest(self) -> None:
        poller = self.poller
        if not poller.level_triggered or self.closed:
            return
        up, down = self.up, self.down
        if up is None or down is None:
            return
        poller.want(self.client_fd, up.wants_read, down.holding)
        if self.upstream_fd >= 0:
            poller.want(
                self.upstream_fd,
                down.wants_read and not self.connecting,
                up.holding or self.connecting,
            )

    # --- the end ---------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        poller = self.poller
        poller.forget(self.client_fd)
        with contextlib.suppress(OSError):
            self.client.close()
        if self.upstream is not None:
            poller.forget(self.upstream_fd)
            with contextlib.suppress(OSError):
                self.upstream.close()
        for way in (self.up, self.down):
            if way is not None:
                way.close()
        if self.backend is not None:
            self.backend.active -= 1
        fe = self.fe
        if self.connecting:
            fe.connects.forget(self)
        fe.connections.discard(self)
        fe.gate.release(self.peer)
        fe.service.release_poller_if_idle()
