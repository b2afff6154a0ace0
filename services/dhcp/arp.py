"""Teach the kernel's ARP cache where a DHCP client is, so a reply can be unicast to it.

RFC 2131 4.1: to a client without an address that did not set the broadcast bit, the
OFFER and ACK go unicast to its hardware address and new address. The kernel would ARP
for that address and get no answer (the client has not taken it yet), so the entry is
put in the cache first with SIOCSARP, as dnsmasq and ISC dhcpd do. That needs
CAP_NET_ADMIN (the systemd unit grants it); without it, replies are broadcast, which
every client accepts (said once in the log).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import socket
import struct
from ipaddress import IPv4Address

SIOCSARP = 0x8955
ATF_COM = 0x02  # a complete entry; not ATF_PERM: it ages out like a learned one
ARPHRD_ETHER = 1
IFNAMSIZ = 16


def arpreq(ip: IPv4Address, mac: str, device: str = "") -> bytes:
    """struct arpreq for SIOCSARP: protocol address, hardware address, flags, netmask,
    device (empty: the kernel takes the device of the route to `ip`)."""
    hw = bytes.fromhex(mac.replace(":", ""))
    if len(hw) != 6:
        raise ValueError(f"not an Ethernet address: {mac}")
    if len(device.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name too long: {device}")
    pa = struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", ip.packed)  # sockaddr_in
    ha = struct.pack("=H6s8x", ARPHRD_ETHER, hw)  # sockaddr with sa_data = the MAC
    netmask = bytes(16)
    return pa + ha + struct.pack("=i", ATF_COM) + netmask + device.encode().ljust(IFNAMSIZ, b"\0")


class ArpCache:
    """SIOCSARP through a socket of its own; off for good after a permission error."""

    def __init__(self, device: str | None, log: logging.Logger) -> None:
        self.device = device or ""
        self.log = log
        self.sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.enabled = True

    def teach(self, ip: IPv4Address, mac: str) -> bool:
        """Put ip -> mac in the ARP cache; False when it could not (broadcast instead)."""
        if not self.enabled or self.sock is None:
            return False
        try:
            fcntl.ioctl(self.sock.fileno(), SIOCSARP, arpreq(ip, mac, self.device))
        except PermissionError:
            self.enabled = False
            self.log.warning(
                "no CAP_NET_ADMIN: replies to clients without an address are broadcast "
                "(RFC 2131 allows it; a unicast needs an ARP entry this process may not add)"
            )
            return False
        except (OSError, ValueError) as exc:
            # No route to the address, a device without ARP: this reply goes broadcast.
            self.log.debug("ARP entry %s -> %s not added: %s", ip, mac, exc)
            return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
