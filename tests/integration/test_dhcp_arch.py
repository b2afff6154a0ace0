"""Per-architecture boot over real DHCP (issue 15), packets built and read by scapy.

An aarch64 node gets the arm64 loader; an x86_64 node whose PXE firmware reports arm64
(option 93 = 11) is answered, and the daemon logs one warning line and records a node
event, both naming the key to fix (nodes[i].arch). Loopback: the appliance is 127.0.0.1.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Daemon, free_port, get_json, loopback_inventory, write_inventory

scapy_dhcp = pytest.importorskip("scapy.layers.dhcp")
BOOTP, DHCP = scapy_dhcp.BOOTP, scapy_dhcp.DHCP

SERVER = "127.0.0.1"
WORKER_MAC = "52:54:00:00:00:44"  # nodes[2], x86_64
ARM_MAC = "52:54:00:00:00:48"  # nodes[3], aarch64
_xids = itertools.count(0x6A000001)


@pytest.fixture
def env(daemons: Callable[..., Daemon], tmp_path: Path) -> tuple[Daemon, int, str]:
    raw = loopback_inventory(tmp_path)
    port = free_port(socket.SOCK_DGRAM)
    raw["listen"]["dhcp"] = f"{SERVER}:{port}"
    raw["boot"].update(rootfs="rhcos/rootfs.img")
    raw["boot"]["aarch64"] = {
        "kernel": "rhcos/kernel-aarch64",
        "initramfs": "rhcos/initramfs.aarch64.img",
        "rootfs": "rhcos/rootfs.aarch64.img",
    }
    raw["nodes"].append(
        {"name": "gh-0", "role": "worker", "mac": ARM_MAC, "ip": "127.0.0.48", "arch": "aarch64"}
    )
    d = daemons(write_inventory(tmp_path / "inv.yaml", raw))
    d.wait_for("serving")
    return d, port, raw["listen"]["admin"]


@pytest.fixture
def client() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def discover(sock: socket.socket, port: int, mac: str, arch: int | None) -> Any:
    options: list[Any] = [("message-type", "discover"), ("vendor_class_id", b"PXEClient")]
    if arch is not None:
        options.append(("pxe_client_architecture", arch.to_bytes(2, "big")))
    pkt = BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")), xid=next(_xids)) / DHCP(
        options=[*options, "end"]
    )
    sock.sendto(bytes(pkt), (SERVER, port))
    sock.settimeout(3.0)
    while True:
        reply = BOOTP(sock.recv(4096))
        if reply.xid == pkt[BOOTP].xid:
            return reply


def boot_file(reply: Any) -> bytes:
    return bytes(reply.file).rstrip(b"\0")


def test_arm_loader_and_a_mismatch_warned_with_its_key(
    env: tuple[Daemon, int, str], client: socket.socket
) -> None:
    daemon, port, admin = env
    for arch in (11, None):
        assert boot_file(discover(client, port, ARM_MAC, arch)) == b"ipxe-arm64.efi"
    assert boot_file(discover(client, port, WORKER_MAC, 7)) == b"ipxe.efi"
    assert "arch" not in daemon.output().split("serving", 1)[1]

    # worker-0 is x86_64 in the inventory; its firmware says arm64. Retransmitted: one line.
    for _ in range(3):
        assert boot_file(discover(client, port, WORKER_MAC, 11)) == b"ipxe-arm64.efi"
    deadline = time.monotonic() + 10
    while "nodes[2].arch" not in daemon.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [x for x in daemon.output().splitlines() if "nodes[2].arch" in x]
    assert len(lines) == 1 and "WARNING" in lines[0] and "worker-0" in lines[0], lines
    detail = ""
    while "nodes[2].arch" not in detail and time.monotonic() < deadline:
        status, body = get_json(f"http://{admin}/api/v1/nodes/worker-0")
        assert status == 200, body
        offers = [e for e in body["events"] if e["stage"] == "dhcp-offer"]
        detail = offers[-1]["detail"] if offers else ""
        time.sleep(0.05)
    assert "nodes[2].arch" in detail and "uefi-arm64" in detail
