"""One transfer on its own connected socket (RFC 1350 TID), driven by a worker thread.

Why a thread and not the event loop: in lock-step every block is one ACK in and one
DATA out, and per block the event loop costs more than the work itself (an epoll
wake-up, a bytes object and an address tuple per datagram, callback dispatch, timer
handles). A thread blocked in recv on a connected socket is woken by the ACK
directly; the kernel's SO_RCVTIMEO is the retransmission timer, re-armed only when
the wait changes; recv, one preadv per 32 blocks and send release the GIL, so the
event loop runs meanwhile. In bench/tftp (one vCPU, lock-step) this costs about 4 µs
of CPU per block, as tftpd-hpa does; the bare add_reader and DatagramProtocol shells
cost about 6 (docs/benchmarks.md, TFTP). Threads are bounded by the service's limit
on concurrent transfers.

ReadTransfer decides everything: the fast path's in-order ACK (`on_ack_fast`, which
returns the next DATA packet from its read-ahead buffer), every other packet and every
timer tick (`on_packet`, `on_timer`, whose packets are sent as they come).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from services.bootfiles import Refused
from services.tftp.codec import ERR_UNDEFINED, error_packet
from services.tftp.files import Source
from services.tftp.transfer import FileChanged, ReadAhead, ReadTransfer

try:  # the lock-step loop in C: built at install where a compiler is at hand
    from services.tftp import _lockstep
except ImportError:  # pragma: no cover - depends on the install
    _lockstep = None  # type: ignore[assignment]
# APPLIANCE_TFTP_NATIVE=0 runs the Python loop even where the C one is built (A/B runs).
NATIVE = _lockstep if os.environ.get("APPLIANCE_TFTP_NATIVE", "1") != "0" else None

RECV_BUFFER = 1024  # an ACK is 4 bytes, an ERROR a few dozen; longer is cut, harmlessly
MIN_WAIT = 0.001  # SO_RCVTIMEO of 0 means "forever": never ask for less than this
WAIT_SLACK = 0.01  # s: re-arming by less than this is not worth a setsockopt


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


class Session:
    """The server side of one transfer: `start()` runs it in its own thread.

    `on_done(session)` is called from that thread when the transfer has ended; the
    owner then calls `close()`. `stop()` and `close()` belong to the owner's thread
    (the event loop): a socket closed there cannot be shut down by mistake after its
    number has gone to a new file.
    """

    def __init__(
        self,
        sock: socket.socket,
        xfer: ReadTransfer | Callable[[], ReadTransfer],
        source: Source,
        peer: tuple[Any, ...],
        on_done: Callable[[Session], None],
        log: logging.Logger,
        scarce: Callable[[], bool] = lambda: False,
    ) -> None:
        """`xfer`, or what makes it in the thread once `source.prepare()` has run (a
        netascii file is counted first); `scarce()`: the owner is short of slots."""
        self.sock = sock  # connected to the client, blocking
        self._make = xfer if callable(xfer) else None
        self.xfer = xfer if isinstance(xfer, ReadTransfer) else None
        self.scarce = scarce
        self.source = source
        self.peer = peer
        self.on_done = on_done
        self.log = log
        self.crashed = False  # an unexpected exception ended it (logged)
        self.error: str | None = None  # why it ended before a transfer could begin
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=f"tftp {peer[0]}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Wake the thread (a shut-down socket reads as empty) and let it end."""
        self._stopping = True
        with contextlib.suppress(OSError):  # the thread has ended, or never started
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """After `on_done`: release the socket."""
        self.sock.close()

    # --- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            xfer = self._prepare()
        except Exception as exc:  # OSError, Refused, or a bug: the client hears, we go on
            self.crashed = not isinstance(exc, (OSError, Refused))
            if self.crashed:
                self.log.exception("error preparing a transfer to %s", self.peer[0])
            code = exc.code if isinstance(exc, Refused) else ERR_UNDEFINED
            self.error = f"cannot read the file: {exc}"
            self._send_quietly([error_packet(code, "cannot read the file")])
            self.on_done(self)
            return
        try:
            self._send(xfer.start(time.monotonic()))
            self._loop(xfer)
        except FileChanged as exc:
            self._send_quietly(xfer.abort(str(exc)))
        except OSError as exc:
            # ECONNREFUSED: ICMP port unreachable, the client went away; or we stopped.
            if not xfer.done:
                xfer.abort(f"client unreachable: {exc}" if not self._stopping else "stopped")
        except Exception:
            self.crashed = True
            self.log.exception("error in a transfer to %s", self.peer[0])
            if not xfer.done:
                xfer.abort("internal error")
        finally:
            self.on_done(self)

    def _prepare(self) -> ReadTransfer:
        if self.xfer is None:
            assert self._make is not None
            self.source.prepare()
            self.xfer = self._make()
        return self.xfer

    def _loop(self, xfer: ReadTransfer) -> None:
        sock = self.sock
        buf = bytearray(RECV_BUFFER)
        recv_into, send, mono = sock.recv_into, sock.send, time.monotonic
        fast = xfer.on_ack_fast
        timeout = xfer.neg.timeout  # the wait after a block sent on an ACK
        wait = self._rearm(xfer, 0.0)  # the socket's SO_RCVTIMEO now
        native = NATIVE is not None and self.source.raw
        scarce = self.scarce
        while True:
            n: int
            if native and (state := xfer.lockstep()) is not None:
                n, wait = self._run_native(xfer, state, buf, wait, timeout)
            else:
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    n = -1
                else:
                    data = fast(buf, n, mono())
                    if data is not None:
                        if wait != timeout:
                            wait = self._set_wait(timeout)
                        send(data)
                        continue
            if n < 0:  # SO_RCVTIMEO ran out: the timer
                self._send(xfer.on_timer(mono(), scarce()))
                if xfer.done:
                    return
                wait = self._rearm(xfer, wait)
                continue
            if self._stopping:  # the socket was shut down: it reads as empty
                xfer.abort("stopped")
                return
            self._send(xfer.on_packet(bytes(buf[:n]), mono()))
            if xfer.done:
                return
            wait = self._rearm(xfer, wait)

    def _run_native(
        self,
        xfer: ReadTransfer,
        state: tuple[int, int, ReadAhead],
        buf: bytearray,
        wait: float,
        timeout: float,
    ) -> tuple[int, float]:
        """The fast path's ACKs in C until something else comes: (the length of the
        datagram it declined, now in `buf`, or -1 when the timer ran out; the wait)."""
        assert NATIVE is not None and self.source.fd is not None
        sent, below, ahead = state
        rearm = 0 if wait == timeout else int(timeout * 1e6)
        status, reached, first, loaded, n, when = NATIVE.run(
            self.sock.fileno(), self.source.fd, ahead.buffer, ahead.count, ahead.blksize,
            sent, below, ahead.first, ahead.loaded, buf, rearm,
        )  # fmt: skip
        xfer.lockstep_taken(reached, first, loaded, when)
        if reached != sent:
            wait = timeout
        if status == NATIVE.SHORT_READ:
            raise FileChanged(f"block {reached} is no longer in the file: it shrank")
        if status < 0:
            raise OSError(-status, os.strerror(-status))
        return (-1 if status == NATIVE.TIMED_OUT else n), wait

    def _send(self, packets: list[bytes]) -> None:
        for data in packets:
            self.sock.send(data)

    def _send_quietly(self, packets: list[bytes]) -> None:
        with contextlib.suppress(OSError):  # the client is gone; nothing more to tell it
            self._send(packets)

    def _rearm(self, xfer: ReadTransfer, wait: float) -> float:
        """Make the socket's receive timeout end at the transfer's deadline; the new one."""
        deadline = xfer.deadline
        if deadline is None:
            return wait
        left = max(MIN_WAIT, deadline - time.monotonic())
        return self._set_wait(left) if abs(left - wait) >= WAIT_SLACK else wait

    def _set_wait(self, seconds: float) -> float:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        return seconds
