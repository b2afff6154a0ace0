"""A machine that PXE-boots but is missing from the inventory is answered with silence,
logged once, and listed by the admin API (so an operator sees the forgotten DGX)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from services.dhcp import codec
from services.dhcp.codec import DhcpMessage
from tests.helpers import Daemon, free_port, get_json, loopback_inventory, write_inventory

STRANGER = "02:00:00:de:ad:01"


def test_unknown_machine_is_listed(daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    raw = loopback_inventory(tmp_path)
    port = free_port(socket.SOCK_DGRAM)
    raw["listen"]["dhcp"] = f"127.0.0.1:{port}"
    d = daemons(write_inventory(tmp_path / "inv.yaml", raw))
    d.wait_for("serving")
    discover = DhcpMessage(
        op=codec.BOOTREQUEST,
        xid=99,
        chaddr=bytes.fromhex(STRANGER.replace(":", "")),
        options={
            codec.OPT_MESSAGE_TYPE: bytes((codec.DISCOVER,)),
            codec.OPT_VENDOR_CLASS: b"PXEClient:Arch:00007:UNDI:003016",
            codec.OPT_CLIENT_ARCH: codec.u16(7),
        },
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.5)
        for _ in range(3):  # a PXE ROM retries: still logged once
            s.sendto(codec.encode(discover), ("127.0.0.1", port))
            try:
                s.recv(2048)
                raise AssertionError("an unknown MAC got an answer")
            except TimeoutError:
                pass
    admin = f"http://{raw['listen']['admin']}"
    deadline = time.monotonic() + 10
    machines: list[dict[str, object]] = []
    while time.monotonic() < deadline and not machines:
        machines = get_json(f"{admin}/api/v1/unknown-machines")[1]["machines"]
        time.sleep(0.1)
    assert machines and machines[0]["mac"] == STRANGER
    assert machines[0]["arch"] == "7" and str(machines[0]["vendor_class"]).startswith("PXEClient")
    assert d.output().count(f"unknown machine {STRANGER}") == 1
