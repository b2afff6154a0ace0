"""What this host is, read from the kernel for the preflight (appliance.checks decides).

Pure parsers over the bytes and text the kernel hands out (rtnetlink dumps, /proc/net/*,
/proc/<pid>/status), each with a small reader next to it. Nothing here runs a program:
no `ip`, no `ss`, so the preflight works in a minimal container.

- Local addresses: the kernel's `local` routing table (RTM_GETROUTE, table 255), which
  is what bind() itself consults: an address assigned to an interface, the whole
  127.0.0.0/8 of `lo`, and AnyIP routes (`ip route add local 192.0.2.0/24 dev lo`).
- Sockets: /proc/net/{tcp,udp,tcp6,udp6} rows -> inode -> /proc/<pid>/fd links ->
  /proc/<pid>/comm, the way `ss -p` names a socket's process.
- Capabilities: CapEff of /proc/self/status.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from pathlib import Path

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTATTR = struct.Struct("=HH")  # length, type
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
RT_TABLE_LOCAL, RTN_LOCAL = 255, 2

# Capability bit numbers (linux/capability.h).
CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_NET_RAW = 10, 12, 13

TCP_LISTEN = 0x0A
APPLIANCE = "appliance"  # the name socket_owners gives an `appliance run` process


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """One `local` route: every address in `network` is this host's, on `interface`."""

    network: IPv4Network
    interface: str


@dataclass(frozen=True, slots=True)
class HostFacts:
    """A snapshot of what the preflight asks of the host (read once, then judged)."""

    local: tuple[LocalRoute, ...]
    interfaces: frozenset[str]
    cap_eff: int  # effective capabilities of this process, a bit mask
    unprivileged_port_start: int  # net.ipv4.ip_unprivileged_port_start
    ping_group_range: tuple[int, int]  # net.ipv4.ping_group_range
    gids: frozenset[int]  # this process's groups (for ping_group_range)
    nonlocal_bind: bool = False  # net.ipv4.ip_nonlocal_bind: bind() succeeds for any address

    def local_interface(self, address: IPv4Address) -> str | None:
        """The interface `address` is local on, or None when it is not this host's.

        The most specific route wins (an address's /32 before lo's 127.0.0.0/8)."""
        best: LocalRoute | None = None
        for route in self.local:
            if address in route.network and (
                best is None or route.network.prefixlen > best.network.prefixlen
            ):
                best = route
        return best.interface if best is not None else None

    def addresses(self) -> list[str]:
        """The host's addresses as an operator reads them (for messages)."""
        return [
            str(r.network.network_address) if r.network.prefixlen == 32 else str(r.network)
            for r in sorted(self.local, key=lambda r: r.network)
        ]

    def own_addresses(self) -> list[str]:
        """The addresses assigned to interfaces (the /32 local routes): not every address
        of a local range (127.0.0.0/8, AnyIP), which no one host could be told apart by."""
        return [str(r.network.network_address) for r in self.local if r.network.prefixlen == 32]

    def has_cap(self, bit: int) -> bool:
        return bool(self.cap_eff >> bit & 1)


# --- netlink: the local routing table --------------------------------------------------


def parse_local_routes(data: bytes, names: dict[int, str]) -> tuple[list[LocalRoute], bool]:
    """The IPv4 `local` routes in a batch of netlink messages, and whether the dump ended.

    `names` maps interface indexes to names."""
    found: list[LocalRoute] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            break
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            raise OSError("netlink: RTM_GETROUTE failed")
        if kind == RTM_NEWROUTE:
            route = _local_route(data[offset + _NLMSG.size : offset + length], names)
            if route is not None:
                found.append(route)
        offset += (length + 3) & ~3
    return found, False


def _local_route(body: bytes, names: dict[int, str]) -> LocalRoute | None:
    if len(body) < _RTMSG.size:
        return None
    family, dst_len, _, _, table, _, _, kind, _ = _RTMSG.unpack_from(body)
    if family != socket.AF_INET or kind != RTN_LOCAL or dst_len > 32:
        return None
    attrs: dict[int, bytes] = {}
    at = _RTMSG.size
    while at + _RTATTR.size <= len(body):
        length, attr = _RTATTR.unpack_from(body, at)
        if length < _RTATTR.size:
            break
        attrs[attr] = body[at + _RTATTR.size : at + length]
        at += (length + 3) & ~3
    if RTA_TABLE in attrs and len(attrs[RTA_TABLE]) == 4:
        table = struct.unpack("=I", attrs[RTA_TABLE])[0]
    if table != RT_TABLE_LOCAL:
        return None
    dst = attrs.get(RTA_DST, b"\0\0\0\0")
    if len(dst) != 4:
        return None
    oif = struct.unpack("=I", attrs[RTA_OIF])[0] if len(attrs.get(RTA_OIF, b"")) == 4 else 0
    network = IPv4Network((socket.inet_ntoa(dst), dst_len), strict=False)
    return LocalRoute(network, names.get(oif, f"if{oif}"))


def read_local_routes() -> list[LocalRoute]:
    """The kernel's IPv4 `local` routes; OSError when they cannot be read."""
    if not hasattr(socket, "AF_NETLINK"):
        raise OSError("no netlink on this system")
    names = {index: name for index, name in socket.if_nameindex()}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(1.0)
        sock.bind((0, 0))
        request = _NLMSG.pack(
            _NLMSG.size + _RTMSG.size, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        ) + _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        sock.send(request)
        found: list[LocalRoute] = []
        for _ in range(10_000):  # bounded: a dump ends with NLMSG_DONE
            routes, done = parse_local_routes(sock.recv(1 << 16), names)
            found += routes
            if done:
                return found
    raise OSError("netlink: the route dump did not end")


def local_ipv4_addresses() -> list[str]:
    """This host's IPv4 interface addresses, for telling which ha member it is
    (appliance.haplan.choose_member); empty when the routes cannot be read."""
    try:
        routes = tuple(read_local_routes())
    except OSError:
        return []
    return [str(r.network.network_address) for r in routes if r.network.prefixlen == 32]


# --- /proc: capabilities, sysctls ---------------------------------------------------------


def parse_cap_eff(status: str) -> int:
    """CapEff of a /proc/<pid>/status text (0 when absent)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    return 0


def _sysctl(name: str, default: str) -> str:
    try:
        return Path("/proc/sys", name.replace(".", "/")).read_text().strip()
    except OSError:
        return default


def read_host() -> HostFacts:
    """This host and process, now. Unreadable parts read as "nothing" (never raise)."""
    try:
        local: tuple[LocalRoute, ...] = tuple(read_local_routes())
    except OSError:
        local = ()
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    ping = (1, 0)  # the kernel's default: no group may open ICMP datagram sockets
    with contextlib.suppress(ValueError):
        lo, hi = _sysctl("net.ipv4.ping_group_range", "1 0").split()
        ping = (int(lo), int(hi))
    try:
        start = int(_sysctl("net.ipv4.ip_unprivileged_port_start", "1024"))
    except ValueError:
        start = 1024
    return HostFacts(
        local=local,
        interfaces=frozenset(name for _, name in socket.if_nameindex()),
        cap_eff=parse_cap_eff(status),
        unprivileged_port_start=start,
        ping_group_range=ping,
        gids=frozenset({os.getegid(), *os.getgroups()}),
        nonlocal_bind=_sysctl("net.ipv4.ip_nonlocal_bind", "0") == "1",
    )


# --- /proc/net: who holds a port -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketRow:
    """One row of /proc/net/{tcp,udp}[6]: a socket bound to a local address and port."""

    proto: str  # tcp | udp
    address: IPv4Address | IPv6Address
    port: int
    state: int
    inode: int


def _hex_address(text: str) -> IPv4Address | IPv6Address:
    # The kernel prints the address as 32-bit words in host byte order.
    raw = bytes.fromhex(text)
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    native = b"".join(struct.pack("=I", int.from_bytes(w, "big")) for w in words)
    return ip_address(native)


def parse_proc_net(text: str, proto: str) -> list[SocketRow]:
    """The sockets of one /proc/net/{tcp,udp,tcp6,udp6} text; bad rows are skipped."""
    rows: list[SocketRow] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            addr, _, port = fields[1].partition(":")
            rows.append(
                SocketRow(
                    proto, _hex_address(addr), int(port, 16), int(fields[3], 16), int(fields[9])
                )
            )
        except ValueError:
            continue
    return rows


def read_sockets() -> list[SocketRow]:
    """Every TCP and UDP socket of this network namespace (IPv4 and IPv6)."""
    rows: list[SocketRow] = []
    for name, proto in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        with contextlib.suppress(OSError):
            rows += parse_proc_net(Path("/proc/net", name).read_text(), proto)
    return rows


def is_appliance_run(argv: list[str]) -> bool:
    """`appliance run ...` or `python -m appliance run ...` (options may come between)."""
    if not argv or "run" not in argv:
        return False
    if Path(argv[0]).name == APPLIANCE:
        return True
    return any(argv[i : i + 2] == ["-m", APPLIANCE] for i in range(len(argv) - 1))


def _process_name(folder: Path) -> str:
    """The command name as `ss -p` shows it; `appliance` for a running appliance (whose
    command name is its interpreter's, `python`)."""
    try:
        argv = (folder / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        argv = []
    if is_appliance_run([a for a in argv if a]):
        return APPLIANCE
    try:
        return (folder / "comm").read_text().strip()
    except OSError:
        return "?"


def socket_owners(inodes: set[int], proc: Path = Path("/proc")) -> dict[int, tuple[int, str]]:
    """inode -> (pid, command name) for the sockets in `inodes` this user may see.

    Like `ss -p`: a process's descriptors are readable by its owner and by root, so
    another user's sockets stay unnamed unless this runs as root."""
    wanted = {f"socket:[{i}]": i for i in inodes if i}
    found: dict[int, tuple[int, str]] = {}
    if not wanted:
        return found
    pids: list[int] = []
    with contextlib.suppress(OSError):
        pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    for pid in pids:
        try:
            fds = list((proc / str(pid) / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None and inode not in found:
                found[inode] = (pid, _process_name(proc / str(pid)))
        if len(found) == len(wanted):
            break
    return found
