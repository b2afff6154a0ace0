"""systemd notify protocol (sd_notify) without libsystemd: one datagram per state change."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket


def notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send `READY=1`-style lines to $NOTIFY_SOCKET; False when not run under systemd."""
    path = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(path)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Half of $WATCHDOG_USEC in seconds, if the watchdog is meant for this process."""
    env = env if env is not None else dict(os.environ)
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def watchdog_loop(interval: float) -> None:
    """Ping from the event loop itself: a stuck loop stops the pings and systemd restarts us."""
    while True:
        with contextlib.suppress(OSError):
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)
