"""Active health probes: a TCP connect, or an HTTP(S) GET that must answer 200.

HTTPS probes do not verify certificates: the API server and the machine-config
server present the cluster's own CA, which the appliance does not hold (HAProxy's
`check-ssl verify none` in the manual setup).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from appliance.plan import HealthCheck
from services.proxy.connects import LOCAL_ERRNOS  # this host's errors, not the backend's

_TLS = ssl.create_default_context()
_TLS.check_hostname = False
_TLS.verify_mode = ssl.CERT_NONE


async def probe(check: HealthCheck, host: str, backend_port: int) -> tuple[bool | None, str]:
    """(ok, detail) for one check of one backend; never raises. ok is None when the
    check could not be made here (out of descriptors): that says nothing of the backend."""
    port = check.port or backend_port
    try:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancel that
        # arrives as the probe finishes, and the check loop then outlives stop().
        async with asyncio.timeout(check.timeout):
            return await _probe(check, host, port)
    except TimeoutError:
        return False, f"{check.kind} :{port} timed out after {check.timeout:g} s"
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError) as exc:
        detail = f"{check.kind} :{port} {type(exc).__name__}: {exc}"
        if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
            return None, detail
        return False, detail


async def _probe(check: HealthCheck, host: str, port: int) -> tuple[bool, str]:
    tls = _TLS if check.kind == "https" else None
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        if check.kind == "tcp":
            return True, f"tcp :{port} connected"
        writer.write(
            f"GET {check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: appliance-check\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.decode("latin-1").split(" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        ok = code == 200
        return ok, f"{check.kind} :{port} GET {check.path} -> {code or status_line[:40]!r}"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
