"""The tftp service: requests on `listen.tftp`, one socket (a new TID) per transfer.

The protocol lives in the sans-IO core: codec.py (the one packet codec), admission.py
(what a datagram on the listener gets: nothing, an ERROR, a slot), files.py (what a
name is, jailed by services/bootfiles.py) and transfer.py. Requests are read on the
event loop here, each transfer then runs in a session.py worker thread, and node
events are published from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from appliance.events import BOOT_ERROR
from appliance.logs import fields
from appliance.pktinfo import Dst, UdpReader, needs_pktinfo
from appliance.pktinfo import host as pktinfo_host
from appliance.plan import Plan
from appliance.ratelog import RateLimitedLog
from appliance.service import ServiceContext, bind_socket
from services.bootconfig import client_ipv4
from services.booterrors import BootErrors, tftp_cause
from services.bootfiles import Refused
from services.bootstage import boot_file, boot_stage, tftp_route
from services.tftp import session as session_module
from services.tftp.admission import (
    Answer,
    Drop,
    Limits,
    Slots,
    TokenBuckets,
    busy,
    examine,
    is_new_request,
    own_endpoints,
    refusal,
)
from services.tftp.codec import ERR_ACCESS, ERR_UNDEFINED, error_packet
from services.tftp.files import Source, open_source
from services.tftp.session import Session
from services.tftp.status import TftpStatus
from services.tftp.transfer import ReadTransfer, negotiate

MAX_TRANSFERS = Limits().max_transfers
ERROR_LOG_EVERY = 10.0  # s: a bug every request hits must not log a traceback per request
STOP_WAIT = 5.0  # s: how long stop() waits for the transfers' threads to end
# A resent request is looked at once more after this long: the client's ERROR that ends
# its transfer may still be on its way to the transfer's thread (the request came first).
RECHECK = 0.05


UDP_SERVICES = ("dns", "dhcp")  # our other UDP listeners (TCP ports are another space)


def _own(plan: Plan) -> frozenset[tuple[str, int]]:
    """Our other UDP services' endpoints (see admission.own_endpoints)."""
    addresses = [str(plan.dhcp.server_id), str(plan.load_balancer), "127.0.0.1", "::1"]
    listen = [(ep.host, ep.port) for k in UDP_SERVICES if (ep := plan.listen.get(k)) is not None]
    return own_endpoints(listen, addresses)


class _Listener(asyncio.DatagramProtocol):
    """The listener: an asyncio transport's protocol, or (a wildcard listener) the
    handler of an appliance.pktinfo.UdpReader: then each request's destination (`dst`)
    is the source of its ERROR and the address its transfer's socket binds."""

    def __init__(self, service: TftpService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None
        self.reader: UdpReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received(data, addr, None)

    def received(self, data: bytes, addr: tuple[Any, ...], dst: Dst | None) -> None:
        try:
            self.service.on_request(data, addr, self, dst=dst)
        except Exception:  # one bad packet must never take the service down
            self.service.counters["errors"] += 1
            self.service.errors_log.exception("request", "error on a request from %s", addr[0])

    def error_received(self, exc: Exception) -> None:
        self.service.counters["socket_errors"] += 1

    def reply(self, data: bytes, addr: tuple[Any, ...], dst: Dst | None = None) -> None:
        if self.reader is not None:
            self.reader.sendto(data, addr, dst)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)


class TftpService:
    name = "tftp"

    def __init__(self, ctx: ServiceContext, plan: Plan) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.errors_log = RateLimitedLog(ctx.log, every=ERROR_LOG_EVERY)
        # Anyone can send requests (from spoofed addresses too): a line, then a count.
        self.refusals_log = RateLimitedLog(ctx.log, every=ERROR_LOG_EVERY)
        self.counters: Counter[str] = Counter()
        self.plan = plan
        # While running: the listener start binds, and the loop the sessions report to.
        self.listener: asyncio.DatagramTransport | UdpReader | None = None
        self.sessions: set[Session] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.limits = Limits()
        self.slots = Slots(self.limits)
        self._admitted: dict[Session, tuple[tuple[Any, ...], bool]] = {}
        self._by_tid: dict[tuple[Any, ...], Session] = {}  # the latest transfer to each TID
        self._request: dict[Session, bytes] = {}  # the request that started it
        self._rechecks: set[tuple[Any, ...]] = set()  # TIDs with a RECHECK pending
        self.error_limit = TokenBuckets(self.limits)
        self.listen_port = plan.listen["tftp"].port  # the bound one once started (port 0)
        self.own = _own(plan)
        self.boot_errors = BootErrors()

    async def start(self) -> None:
        sock = bind_socket(self.name, self.plan.listen["tftp"], socket.SOCK_DGRAM)
        self.loop = loop = asyncio.get_running_loop()
        self.listen_port = int(sock.getsockname()[1])
        if needs_pktinfo(sock):
            # A wildcard listener answers from the address asked (see appliance.pktinfo).
            proto = _Listener(self)
            proto.reader = reader = UdpReader(sock, proto.received, proto.error_received)
            reader.start(loop)
            self.listener = reader
        else:
            self.listener, _ = await loop.create_datagram_endpoint(
                lambda: _Listener(self), sock=sock
            )
        if session_module.NATIVE is None:
            self.log.info("lock-step transfers run in Python (services.tftp._lockstep not built)")

    async def reload(self, plan: Plan) -> None:
        self.plan = plan  # running transfers finish with the file they opened
        self.own = _own(plan)

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for session in list(self.sessions):
            session.stop()
        # Each thread ends at once (its socket reads as shut down) and reports back here.
        deadline = time.monotonic() + STOP_WAIT
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def status(self) -> TftpStatus:
        return TftpStatus(
            counters=dict(self.counters),
            transfers=len(self.sessions),
            transfers_to_nodes=self.slots.nodes,
            boot_errors=self.boot_errors.status(),
        )

    # --- requests ------------------------------------------------------------------

    def on_request(
        self,
        data: bytes,
        addr: tuple[Any, ...],
        listener: _Listener,
        again: bool = False,
        dst: Dst | None = None,
    ) -> None:
        """`again`: a RECHECK of a request that looked like a resend (counted already).
        `dst`: the address the request was sent to, on a wildcard listener (else None)."""
        self.counters["requests"] += not again
        now = time.monotonic()
        packet = examine(data, addr[0], addr[1], self.listen_port, self.own)
        if isinstance(packet, Drop):
            self.counters["dropped"] += 1
            return
        if isinstance(packet, Answer):
            self._answer(listener, addr, now, packet, dst)
            return
        mode = packet.mode
        ip = client_ipv4(addr[0])
        is_node = ip is not None and ip in self.plan.by_ip
        tid = tuple(addr[:2])
        running = self._by_tid.get(tid)
        answered = running is None or is_new_request(
            same=self._request.get(running) == data,
            heard=running.xfer is not None and running.xfer.heard,
            ended=running.xfer is not None and running.xfer.done,
        )
        why = self.slots.refuse_reason(tid, is_node, answered)
        if why == "duplicate":  # the client sent its request again: its transfer is running
            if not again and tid not in self._rechecks and self.loop is not None:
                self._rechecks.add(tid)
                self.loop.call_later(RECHECK, self._recheck, data, addr, listener, dst)
                return
            self.counters["duplicate"] += 1
            return
        if why is not None:
            self._answer(listener, addr, now, busy(why), dst)
            self.counters[f"busy_{why}"] += 1
            return
        plan = self.plan
        try:
            source = open_source(
                plan.boot, packet.filename, self.ctx.runtime.installed, netascii=mode == "netascii"
            )
        except Refused as exc:
            # A node's boot file: a boot error says it (rate-limited); else an access refusal.
            said = self._boot_error(addr[0], packet.filename, exc.code, str(exc), now)
            if not said and exc.code == ERR_ACCESS:
                self.refusals_log.warning(
                    "refused",
                    "refused %r to %s: %s",
                    packet.filename,
                    addr[0],
                    exc,
                    extra=self._who(addr[0]),
                )
            self._answer(listener, addr, now, refusal(exc), dst)
            return
        options = packet.options
        if source.netascii is not None:
            # Its size (for the blocks and tsize) is counted in the transfer's thread.
            def make() -> ReadTransfer:
                neg = negotiate(options, source.size)
                return ReadTransfer(source.read, source.size, neg, time.monotonic())

            xfer: ReadTransfer | Callable[[], ReadTransfer] = make
        else:
            neg = negotiate(options, source.size)
            readinto = source.readinto if source.raw else None  # files: os.preadv
            xfer = ReadTransfer(source.read, source.size, neg, now, readinto)
        started = self._spawn(xfer, source, addr, is_node, data, dst)
        if started is False:
            self._error(listener, addr, now, ERR_UNDEFINED, "server busy, try again", dst)
            return
        if started:
            self._event(addr[0], source)

    def _recheck(
        self, data: bytes, addr: tuple[Any, ...], listener: _Listener, dst: Dst | None = None
    ) -> None:
        self._rechecks.discard(tuple(addr[:2]))
        if self.listener is None or self.listener.is_closing():
            return  # stopped meanwhile: no new transfer
        try:
            self.on_request(data, addr, listener, again=True, dst=dst)
        except Exception:  # as datagram_received: one request never takes the service down
            self.counters["errors"] += 1
            self.errors_log.exception("request", "error on a request from %s", addr[0])

    def _answer(
        self,
        listener: _Listener,
        addr: tuple[Any, ...],
        now: float,
        answer: Answer,
        dst: Dst | None = None,
    ) -> None:
        if answer.counter is not None:
            self.counters[answer.counter] += 1
        self._error(listener, addr, now, answer.code, answer.message, dst)

    def _error(
        self,
        listener: _Listener,
        addr: tuple[Any, ...],
        now: float,
        code: int,
        message: str,
        dst: Dst | None = None,
    ) -> None:
        """An ERROR from the listener, unless this address (or every stranger) had its
        share: a node's answers never wait on what strangers spent."""
        ip = client_ipv4(addr[0])
        node = ip is not None and ip in self.plan.by_ip
        if self.error_limit.allow(addr[0], now, node):
            listener.reply(error_packet(code, message), addr, dst)
        else:
            self.counters["rate_limited"] += 1

    def _spawn(
        self,
        xfer: ReadTransfer | Callable[[], ReadTransfer],
        source: Source,
        addr: tuple[Any, ...],
        is_node: bool,
        request: bytes = b"",
        dst: Dst | None = None,
    ) -> bool | None:
        """True: the transfer runs; False: no thread for it (busy); None: nothing to
        serve, the request is dropped (counted)."""
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # On a wildcard listener: the address the request was sent to, so that DATA
            # comes from the address the client asked (it drops DATA from any other).
            if dst is None:
                sock.bind((self.plan.listen["tftp"].host, 0))
            else:
                try:
                    sock.bind((pktinfo_host(dst), 0))
                except OSError as exc:
                    if exc.errno != errno.EADDRNOTAVAIL:
                        raise
                    # The address was taken away since the request came (an HA floating
                    # address moved to the other member): no reply can come from it.
                    sock.close()
                    source.close()
                    self.counters["dst_gone"] += 1
                    self.counters["dropped"] += 1
                    return None
            sock.connect(addr[:2])  # blocking: the session's thread waits in recv
            if sock.getsockname()[:2] == tuple(addr[:2]):
                # A spoofed request "from" the very port we just took: it would talk to
                # itself. Nothing to serve.
                sock.close()
                source.close()
                self.counters["dropped"] += 1
                return None
        except OSError:
            sock.close()
            source.close()
            raise
        tid = tuple(addr[:2])
        session = Session(
            sock, xfer, source, addr, self._thread_done, self.log, lambda: self.slots.scarce
        )
        self.sessions.add(session)
        self.slots.admit(tid, is_node)
        self._admitted[session] = (tid, is_node)
        self._by_tid[tid] = session
        self._request[session] = request
        self.counters["transfers"] += 1
        try:
            session.start()
        except RuntimeError:  # no more threads: this transfer cannot run
            self._release(session)
            sock.close()
            source.close()
            self.counters["busy"] += 1
            self.log.warning("no thread for a transfer to %s", addr[0])
            return False
        return True

    def _release(self, session: Session) -> None:
        self.sessions.discard(session)
        self._request.pop(session, None)
        if (admitted := self._admitted.pop(session, None)) is not None:
            self.slots.release(*admitted)
            if self._by_tid.get(admitted[0]) is session:
                del self._by_tid[admitted[0]]

    def _thread_done(self, session: Session) -> None:
        """From a session's thread: the rest happens on the event loop."""
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                self.loop.call_soon_threadsafe(self.finished, session)

    def finished(self, session: Session) -> None:
        if session not in self.sessions:
            return
        is_node = self._admitted.get(session, ((), False))[1]
        self._release(session)
        session.close()
        session.source.close()
        xfer = session.xfer
        if xfer is None:  # it never began: the file could not be read
            self.counters["failed"] += 1
            if session.crashed:
                self.counters["errors"] += 1
            self.log.info(
                "%s to %s failed: %s",
                session.source.path,
                session.peer[0],
                session.error,
                extra=self._who(session.peer[0]),
            )
            return
        self.counters["bytes"] += xfer.bytes_sent
        if session.crashed:
            self.counters["errors"] += 1
        if xfer.error and not xfer.error.startswith("client error"):
            self.counters["failed"] += 1
            if not xfer.heard and not is_node:
                # A stranger that never answered (a spoofed request, a scan): counted, not
                # logged, or a flood of requests would become a flood of log lines.
                self.counters["silent"] += 1
                return
            self.log.info(
                "%s to %s ended: %s",
                session.source.path,
                session.peer[0],
                xfer.error,
                extra=self._who(session.peer[0]),
            )
        elif not xfer.error:
            self.counters["completed"] += 1

    # --- events -------------------------------------------------------------------

    def _who(self, client: str) -> dict[str, str]:
        """Log fields for a line about `client`: its node's name and MAC when it is one."""
        ip = client_ipv4(client)
        node = self.plan.by_ip.get(ip) if ip is not None else None
        if node is None:
            return fields(ip=client)
        return fields(node=node.name, mac=node.mac, ip=client)

    def _boot_error(self, client: str, name: str, code: int, message: str, now: float) -> bool:
        """A known node was refused one of its boot files: a line and an event (once per
        node, path and cause a minute: PXE ROMs resend), every one counted. True when
        the refusal was a node's boot file (said here, or said recently)."""
        ip = client_ipv4(client)
        node = self.plan.by_ip.get(ip) if ip is not None else None
        if node is None:
            return False
        route, rel = tftp_route(name)
        boot = self.plan.boot.by_mac.get(node.mac)
        what = boot_file(boot, self.plan.dhcp.boot_files, route, rel)
        if what is None:
            return False  # a name pxelinux or GRUB only probes for
        cause = tftp_cause(code, message)
        root = self.plan.boot.images_dir if route == "images" else self.plan.boot.tftp_root
        reason = str(root) if cause == "missing" else message
        report = self.boot_errors.refused(
            node.name, client, what, name, cause, f"tftp error {code}", now, reason
        )
        if report is not None:
            self.log.warning(
                "%s", report.line, extra=fields(node=node.name, mac=node.mac, ip=client)
            )
            self.ctx.bus.publish(node.name, BOOT_ERROR, report.detail, source="tftp")
        return True

    def _event(self, client: str, source: Source) -> None:
        ip = client_ipv4(client)
        node = self.plan.by_ip.get(ip) if ip is not None else None
        if node is None:
            return
        boot = self.plan.boot.by_mac.get(node.mac)
        stage = boot_stage(boot, self.plan.dhcp.boot_files, *tftp_route(source.path))
        if stage is not None:
            self.log.debug(
                "%s fetched %s (%s)",
                node.name,
                source.path,
                stage,
                extra=fields(node=node.name, mac=node.mac, ip=client),
            )
            self.ctx.bus.publish(node.name, stage, f"tftp {source.path}", source="tftp")
