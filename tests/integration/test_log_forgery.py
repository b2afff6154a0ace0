"""A hostile client cannot write a line of its own into the daemon's log (issue 14,
item 10): a TFTP file name, a DHCP vendor class and hostname, and an HTTP path with CR,
LF and ESC in them, sent to the real daemon, come out escaped."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from services.dhcp import codec
from services.dhcp.codec import DhcpMessage
from tests.helpers import Daemon, free_port, loopback_inventory, wait_until, write_inventory

FORGED = "\r\n12:00:00 ERROR   appliance: FORGED line\x1b[2J"


def test_client_data_cannot_forge_log_lines(daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    raw = loopback_inventory(tmp_path)
    dhcp, tftp, http = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM), free_port()
    raw["listen"].update(
        dhcp=f"127.0.0.1:{dhcp}", tftp=f"127.0.0.1:{tftp}", http=f"127.0.0.1:{http}"
    )
    (tmp_path / "tftp").mkdir()
    d = daemons(write_inventory(tmp_path / "inv.yaml", raw))
    d.wait_for("serving")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # TFTP: a traversal attempt is refused and logged with its name.
        name = ("../" + FORGED).encode()
        s.sendto(b"\0\1" + name + b"\0octet\0", ("127.0.0.1", tftp))
        # DHCP: an unknown machine is logged with its classes and hostname.
        discover = DhcpMessage(
            op=codec.BOOTREQUEST,
            xid=7,
            chaddr=bytes.fromhex("02000000de02"),
            options={
                codec.OPT_MESSAGE_TYPE: bytes((codec.DISCOVER,)),
                codec.OPT_VENDOR_CLASS: ("PXEClient" + FORGED).encode(),
                codec.OPT_HOSTNAME: ("host" + FORGED).encode(),
                codec.OPT_CLIENT_ARCH: codec.u16(7),
            },
        )
        s.sendto(codec.encode(discover), ("127.0.0.1", dhcp))
    # HTTP: a raw request line whose path carries encoded CR LF and ESC.
    with socket.create_connection(("127.0.0.1", http), timeout=5) as c:
        c.sendall(b"GET /a\x1b[31mFORGED\x08\x08 HTTP/1.1\r\nHost: x\r\n\r\n")
        c.recv(4096)
    with socket.create_connection(("127.0.0.1", http), timeout=5) as c:
        c.sendall(
            b"GET /images/..%2f..%0d%0a12:00:00%20ERROR%20FORGED%1b HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        c.recv(4096)
    wait_until(lambda: "FORGED" in d.output(), what="the hostile names logged")
    time.sleep(0.5)  # the DHCP and HTTP lines too, where they are logged
    out = d.output()
    assert "\x1b" not in out and "\r" not in out
    forged = [line for line in out.splitlines() if line.startswith("12:00:00 ERROR")]
    assert not forged, forged
