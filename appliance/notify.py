"""systemd notify protocol (sd_notify) without libsystemd: one datagram per state change.

The messages follow sd_notify(3): READY=1 once every listener is bound, RELOADING=1
with MONOTONIC_USEC= while a new plan is applied (then READY=1 again), STOPPING=1 at
the start of a graceful stop, STATUS= lines for `systemctl status`, and WATCHDOG=1
pings. The pings come from a task on the event loop itself, so a loop that is stuck
(a blocking call, a busy callback) stops pinging and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping


def _address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):  # abstract namespace socket
        return "\0" + path[1:]
    return path


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `READY=1`-style lines to $NOTIFY_SOCKET; False when not run under systemd.

    Never blocks: the socket is non-blocking, so a manager that does not read (a full
    receive queue) costs a lost message, not a stalled event loop.
    """
    address = _address(env if env is not None else os.environ)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC= with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading_message(status: str = "reloading") -> str:
    # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) tell this reload from an
    # older one; earlier versions ignore the field.
    return f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}\nSTATUS={status}"


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Half of $WATCHDOG_USEC in seconds, if the watchdog is meant for this process.

    sd_watchdog_enabled(3): WATCHDOG_PID, when set, must be our pid (a child that
    inherited the environment must not ping for its parent).
    """
    env = env if env is not None else os.environ
    usec = env.get("WATCHDOG_USEC", "")
    want = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if want and want != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2_000_000


async def watchdog_loop(interval: float, send: Callable[[str], bool] = notify) -> None:
    """Ping WATCHDOG=1 every `interval` seconds from the event loop itself, until cancelled.

    asyncio.sleep only returns when the loop runs again, so a blocked loop sends nothing:
    that silence is exactly what systemd's watchdog is meant to see. `send` is a
    parameter for tests.
    """
    while True:
        send("WATCHDOG=1")
        await asyncio.sleep(interval)
