"""The floating service addresses: added to the leader's interface, announced, dropped.

Each address is added with a valid and preferred lifetime (`ip -4 addr replace ...
valid_lft L preferred_lft L`) and renewed after every successful keepalive: the kernel
removes an address that is not renewed, so a leader killed with -9 (or hung) loses it
too: a dead-man switch below the process. `release()` removes them at once (absent is
fine). Gratuitous ARP tells the link's hosts and switches where the addresses moved:
an ARP announcement (RFC 5227: a request, sender = target = the address) and a reply,
broadcast, built by hand and sent on a raw AF_PACKET socket.

Blocking (iproute2 runs as a child process): the elector calls these in an executor.
Needs CAP_NET_ADMIN (addresses) and CAP_NET_RAW (ARP).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from ipaddress import IPv4Address

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARP_REQUEST, ARP_REPLY = 1, 2
BROADCAST = b"\xff" * 6
IP_TIMEOUT = 5.0  # one iproute2 run; it answers in milliseconds unless the host is in trouble


def address_lifetime(lease_ttl: int) -> int:
    """The addresses' kernel lifetime for a lease of `lease_ttl` seconds: a second shorter
    than the lease, because they are renewed after the keepalive's answer (later than etcd
    renewed the lease) and the kernel drops them up to ~0.3 s late (measured in
    tests/system/test_ha_floating.py): so a leader killed with -9 has lost them by the time
    its lease expires and another member may take them. At least 2 s: renewed every ttl/3,
    one late keepalive must not let them lapse under a live leader."""
    return max(2, lease_ttl - 1)


class FloatingError(Exception):
    """iproute2 refused (no such interface, no CAP_NET_ADMIN, ...): the message says why."""


def garp_frame(mac: bytes, address: IPv4Address, op: int = ARP_REQUEST) -> bytes:
    """A broadcast Ethernet frame carrying a gratuitous ARP for `address` at `mac`:
    op 1 is the announcement (target hardware address zero), op 2 the reply form some
    older hosts only learn from (target hardware address = the sender's). Padded to the
    Ethernet minimum of 60 bytes (without the FCS)."""
    if len(mac) != 6:
        raise ValueError(f"not an Ethernet address: {mac.hex(':')}")
    target_mac = bytes(6) if op == ARP_REQUEST else mac
    ip = address.packed
    arp = struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, op, mac, ip, target_mac, ip)
    frame = BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp
    return frame.ljust(60, b"\0")


class Floating:
    def __init__(
        self,
        interface: str,
        addresses: Sequence[str],
        prefixlen: int,
        lifetime: int,
        *,
        ip: str = "ip",
    ) -> None:
        if lifetime < 1:
            raise ValueError(f"address lifetime must be at least 1 s, not {lifetime}")
        self.interface = interface
        self.addresses = tuple(str(IPv4Address(a)) for a in dict.fromkeys(addresses))
        self.prefixlen = prefixlen
        self.lifetime = lifetime
        self.ip = ip

    def hold(self) -> None:
        """Add (or renew the lifetime of) every address; one iproute2 run for all."""
        lft = f"valid_lft {self.lifetime} preferred_lft {self.lifetime}"
        lines = [
            f"addr replace {a}/{self.prefixlen} dev {self.interface} {lft}" for a in self.addresses
        ]
        self._batch(lines)

    def release(self) -> list[str]:
        """Remove every address present (with whatever prefix it was added); returns those
        removed. Also at start: addresses a crashed run left behind."""
        present = self._present()
        lines = [f"addr del {a}/{plen} dev {self.interface}" for a, plen in present.items()]
        if lines:
            try:
                self._batch(lines)
            except FloatingError:
                # One may have expired between the listing and the delete: only an
                # address still there is a failure.
                if self._present():
                    raise
        return list(present)

    def held(self) -> list[str]:
        """The floating addresses on the interface now."""
        return list(self._present())

    def announce(self, rounds: int = 3, interval: float = 0.1) -> int:
        """Gratuitous ARP for every address: `rounds` rounds (an announcement and a reply
        each), `interval` seconds apart; returns the frames sent. The elector sends one
        round at a time (rounds=1) so a release is never queued behind the pauses."""
        sent = 0
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
            s.bind((self.interface, ETH_P_ARP))
            mac: bytes = s.getsockname()[4][:6]
            for i in range(rounds):
                if i:
                    time.sleep(interval)
                for a in self.addresses:
                    for op in (ARP_REQUEST, ARP_REPLY):
                        s.send(garp_frame(mac, IPv4Address(a), op))
                        sent += 1
        return sent

    # --- inside ---------------------------------------------------------------------------

    def _present(self) -> dict[str, int]:
        out = self._run(["-j", "-4", "addr", "show", "dev", self.interface])
        present: dict[str, int] = {}
        try:
            links = json.loads(out or "[]")
        except ValueError as e:
            raise FloatingError(f"ip addr show {self.interface}: unreadable answer: {e}") from e
        for link in links:
            for info in link.get("addr_info", ()):
                local = info.get("local")
                if local in self.addresses:
                    present[local] = int(info.get("prefixlen", self.prefixlen))
        return present

    def _batch(self, lines: list[str]) -> None:
        # -force: go on after an error, so one bad line does not leave the others undone.
        self._run(["-4", "-force", "-batch", "-"], "\n".join(lines) + "\n")

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                [self.ip, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=IP_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FloatingError(f"{self.ip} {' '.join(args)}: {e}") from e
        if done.returncode != 0:
            why = done.stderr.strip() or f"exit status {done.returncode}"
            raise FloatingError(f"{self.ip} {' '.join(args)}: {why}")
        return done.stdout
