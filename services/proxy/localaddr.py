"""This host's IPv4 addresses, from the kernel (an rtnetlink RTM_GETADDR dump).

The proxy asks to know whether a backend under a wildcard listener is itself. Not a
bind() test: with net.ipv4.ip_nonlocal_bind=1 (common where addresses float) bind()
succeeds for any address, and every backend would look local.
"""

from __future__ import annotations

import socket
import struct

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface
_RTATTR = struct.Struct("=HH")  # length, type
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2


def parse_addresses(data: bytes) -> tuple[set[str], bool]:
    """The IPv4 addresses in a batch of netlink messages, and whether the dump ended."""
    found: set[str] = set()
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            break
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            raise OSError("netlink: RTM_GETADDR failed")
        if kind == RTM_NEWADDR:
            found |= _address(data[offset + _NLMSG.size : offset + length])
        offset += (length + 3) & ~3
    return found, False


def _address(body: bytes) -> set[str]:
    if len(body) < _IFADDRMSG.size or body[0] != socket.AF_INET:
        return set()
    attrs: dict[int, bytes] = {}
    at = _IFADDRMSG.size
    while at + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, at)
        if length < _RTATTR.size:
            break
        attrs[kind] = body[at + _RTATTR.size : at + length]
        at += (length + 3) & ~3
    # IFA_LOCAL is this end of a point-to-point link (IFA_ADDRESS is the peer there).
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    return {socket.inet_ntoa(raw)} if raw is not None and len(raw) == 4 else set()


def local_ipv4() -> frozenset[str]:
    """Every IPv4 address of this host (its network namespace); OSError when unknown."""
    if not hasattr(socket, "AF_NETLINK"):
        raise OSError("no netlink on this system")
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(1.0)
        sock.bind((0, 0))
        request = _NLMSG.pack(
            _NLMSG.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        ) + _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        sock.send(request)
        found: set[str] = set()
        for _ in range(10_000):  # bounded: a dump ends with NLMSG_DONE
            addresses, done = parse_addresses(sock.recv(1 << 16))
            found |= addresses
            if done:
                return frozenset(found)
    raise OSError("netlink: the address dump did not end")


__all__ = ["local_ipv4", "parse_addresses"]
