"""The tftp service: requests on `listen.tftp`, one socket (a new TID) per transfer.

The protocol lives in transfer.py and files.py; requests are read on the event loop
here, each transfer then runs in a session.py worker thread, and node events are
published from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from typing import Any

from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketRRQ, TftpPacketWRQ

from appliance.plan import Plan
from appliance.service import ServiceContext, bind_socket
from services.bootconfig import IMAGES_PREFIX, client_ipv4
from services.tftp import session as session_module
from services.tftp.files import Refused, Source, open_source
from services.tftp.session import Session
from services.tftp.transfer import (
    ERR_ACCESS,
    ERR_ILLEGAL_OP,
    ERR_UNDEFINED,
    ReadTransfer,
    error_packet,
    negotiate,
)

MAX_TRANSFERS = 512  # concurrent transfers (threads); a boot storm of hundreds of nodes fits
STOP_WAIT = 5.0  # s: how long stop() waits for the transfers' threads to end


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, service: TftpService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.service.on_request(data, addr, self)
        except Exception:  # one bad packet must never take the service down
            self.service.counters["errors"] += 1
            self.service.log.exception("error on a request from %s", addr[0])

    def reply(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)


class TftpService:
    name = "tftp"

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.counters: Counter[str] = Counter()
        self.plan: Plan
        self.listener: asyncio.DatagramTransport | None = None
        self.sessions: set[Session] = set()
        self.factory = TftpPacketFactory()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, plan: Plan) -> None:
        self.plan = plan
        sock = bind_socket(self.name, plan.listen["tftp"], socket.SOCK_DGRAM)
        self.loop = loop = asyncio.get_running_loop()
        self.listener, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), sock=sock)
        if session_module.NATIVE is None:
            self.log.info("lock-step transfers run in Python (services.tftp._lockstep not built)")

    async def reload(self, plan: Plan) -> None:
        self.plan = plan  # running transfers finish with the file they opened

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for session in list(self.sessions):
            session.stop()
        # Each thread ends at once (its socket reads as shut down) and reports back here.
        deadline = time.monotonic() + STOP_WAIT
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def status(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "transfers": len(self.sessions)}

    # --- requests ------------------------------------------------------------------

    def on_request(self, data: bytes, addr: tuple[Any, ...], listener: _Listener) -> None:
        self.counters["requests"] += 1
        try:
            packet = self.factory.parse(data)
        except Exception:  # tftpy raises TftpException, struct.error, UnicodeDecodeError...
            self.counters["malformed"] += 1
            if data[:2] in (b"\0\1", b"\0\2"):
                # A request we cannot read (a NUL inside the name shifts the fields, a
                # non-ASCII name, an odd option list): say so, as tftpd-hpa does, rather
                # than leave the client waiting for its timeout.
                listener.reply(error_packet(ERR_ILLEGAL_OP, "malformed request"), addr)
            return
        if isinstance(packet, TftpPacketWRQ):
            self.counters["refused"] += 1
            listener.reply(error_packet(ERR_ACCESS, "read-only server: no writes"), addr)
            return
        if not isinstance(packet, TftpPacketRRQ):
            self.counters["malformed"] += 1
            listener.reply(error_packet(ERR_ILLEGAL_OP, "expected a read request"), addr)
            return
        mode = packet.mode.lower()
        if mode not in ("octet", "netascii"):
            listener.reply(error_packet(ERR_ILLEGAL_OP, f"mode {mode} is not supported"), addr)
            return
        if len(self.sessions) >= MAX_TRANSFERS:
            self.counters["busy"] += 1
            listener.reply(error_packet(ERR_UNDEFINED, "server busy, try again"), addr)
            return
        plan = self.plan
        try:
            source = open_source(
                plan.boot, packet.filename, self.ctx.boot.installed, netascii=mode == "netascii"
            )
        except Refused as exc:
            self.counters["refused" if exc.code == ERR_ACCESS else "not_found"] += 1
            if exc.code == ERR_ACCESS:
                self.log.warning("tftp: refused %r to %s: %s", packet.filename, addr[0], exc)
            listener.reply(error_packet(exc.code, str(exc)), addr)
            return
        neg = negotiate(packet.options or {}, source.size)
        readinto = source.readinto if source.fd is not None else None  # files: os.preadv
        xfer = ReadTransfer(source.read, source.size, neg, time.monotonic(), readinto)
        if not self._spawn(xfer, source, addr):
            listener.reply(error_packet(ERR_UNDEFINED, "server busy, try again"), addr)
            return
        self._event(addr[0], source)

    def _spawn(self, xfer: ReadTransfer, source: Source, addr: tuple[Any, ...]) -> bool:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.plan.listen["tftp"].host, 0))
            sock.connect(addr[:2])  # blocking: the session's thread waits in recv
        except OSError:
            sock.close()
            source.close()
            raise
        session = Session(sock, xfer, source, addr, self._thread_done, self.log)
        self.sessions.add(session)
        self.counters["transfers"] += 1
        try:
            session.start()
        except RuntimeError:  # no more threads: this transfer cannot run
            self.sessions.discard(session)
            sock.close()
            source.close()
            self.counters["busy"] += 1
            self.log.warning("tftp: no thread for a transfer to %s", addr[0])
            return False
        return True

    def _thread_done(self, session: Session) -> None:
        """From a session's thread: the rest happens on the event loop."""
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                self.loop.call_soon_threadsafe(self.finished, session)

    def finished(self, session: Session) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        session.close()
        session.source.close()
        xfer = session.xfer
        self.counters["bytes"] += xfer.bytes_sent
        if session.crashed:
            self.counters["errors"] += 1
        if xfer.error and not xfer.error.startswith("client error"):
            self.counters["failed"] += 1
            self.log.info(
                "tftp: %s to %s ended: %s", session.source.path, session.peer[0], xfer.error
            )
        elif not xfer.error:
            self.counters["completed"] += 1

    # --- events -------------------------------------------------------------------

    def _event(self, client: str, source: Source) -> None:
        ip = client_ipv4(client)
        node = self.plan.by_ip.get(ip) if ip is not None else None
        if node is None:
            return
        path = source.path
        files = self.plan.dhcp.boot_files
        boot = self.plan.boot.by_mac.get(node.mac)
        stage = None
        if path.rsplit("/", 1)[-1] in (files.bios, files.uefi_x64, files.uefi_arm64):
            stage = "bootloader"
        elif boot is not None and path == IMAGES_PREFIX + boot.kernel:
            stage = "kernel"
        elif boot is not None and path == IMAGES_PREFIX + boot.initramfs:
            stage = "initramfs"
        if stage:
            self.ctx.bus.publish(node.name, stage, f"tftp {path}", source="tftp")
