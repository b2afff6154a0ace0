"""Preflight: what the plan needs of this host, for `check` and at `run` start.

Files: an operator writes the inventory before `openshift-install` has made the
ignition files and before the RHCOS images are downloaded, so missing, empty or
unreadable boot files are warnings, not load errors. The host: the service addresses
and the DHCP interface exist here, the listeners' ports are free (else who holds
them), and this process has the capabilities the listeners need. Each finding is one
line naming the key and the fix; `error` findings stop `run` (appliance.supervisor).

The host is read once (appliance.hostinfo) and judged here as plain values, so the
decisions are unit-tested with made-up hosts.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from appliance.hostinfo import (
    APPLIANCE,
    CAP_NET_ADMIN,
    CAP_NET_BIND_SERVICE,
    CAP_NET_RAW,
    TCP_LISTEN,
    HostFacts,
    SocketRow,
    read_sockets,
    socket_owners,
)
from appliance.inventory import LISTENER_PROTOCOLS, Endpoint, Problem
from appliance.plan import NodeBoot, Plan


@dataclass(frozen=True, slots=True)
class RunAs:
    """The user the daemon runs as, whose access to the boot files is checked."""

    name: str
    uid: int
    gids: frozenset[int]
    # This very process: os.access answers (ACLs and capabilities included).
    current: bool = False


def current_user() -> RunAs:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return RunAs(name, uid, frozenset({os.getegid(), *os.getgroups()}), current=True)


def user_named(name: str) -> RunAs:
    """The account `name` (KeyError when there is none), with its groups."""
    entry = pwd.getpwnam(name)
    if entry.pw_uid == os.geteuid():
        return current_user()
    return RunAs(name, entry.pw_uid, frozenset(os.getgrouplist(name, entry.pw_gid)))


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"owner {user}:{group}, mode {stat.S_IMODE(st.st_mode):04o}"


def _permits(st: os.stat_result, user: RunAs, bits: int) -> bool:
    """Classic Unix permissions: owner, else group, else other (`bits` as for other)."""
    if user.uid == 0:
        return True  # root reads and searches everything (CAP_DAC_OVERRIDE)
    if st.st_uid == user.uid:
        return st.st_mode & (bits << 6) == bits << 6
    if st.st_gid in user.gids:
        return st.st_mode & (bits << 3) == bits << 3
    return st.st_mode & bits == bits


def access_problem(path: Path, user: RunAs, write: bool = False) -> str | None:
    """Why `user` cannot read (or write) `path`, naming the folder or file that stops
    it; None when it can."""
    mode = os.W_OK if write else os.R_OK
    if user.current and os.access(path, mode):
        return None
    real = Path(os.path.realpath(path))
    what = "writable" if write else "readable"
    for folder in reversed(real.parents):
        try:
            st = os.stat(folder)
        except OSError:
            break
        if not _permits(st, user, 0o1):
            return (
                f"{path} is not {what} by user {user.name}: it cannot enter {folder} ({_owner(st)})"
            )
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"{path} is not {what} by user {user.name}: {exc.strerror}"
    # Writing into a folder (the state dir) needs search as well: w and x.
    bits = (0o3 if stat.S_ISDIR(st.st_mode) else 0o2) if write else 0o4
    if user.current or not _permits(st, user, bits):
        return f"{path} is not {what} by user {user.name} ({_owner(st)})"
    return None


def _file_problem(path: Path, user: RunAs) -> str | None:
    """Missing, empty or unreadable: what a node's fetch of `path` would meet."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError:
        st = None  # a folder on the way that we cannot enter: said below
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return f"{path} is empty (0 bytes): copy or download it again"
    if st is not None and not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    problem = access_problem(path, user)
    if problem is not None:
        return f"{problem}: give that user read access (e.g. chgrp and chmod g+r)"
    return None


# Where Debian's `ipxe` package puts the loaders the defaults name.
DEBIAN_IPXE = {
    "undionly.kpxe": "/usr/lib/ipxe/undionly.kpxe",
    "ipxe.efi": "/usr/lib/ipxe/ipxe.efi",
}


def _ipxe_hint(loader: str) -> str:
    found = DEBIAN_IPXE.get(loader)
    if found is None:
        return ""
    return f" (Debian's ipxe package installs it as {found}: copy it there)"


def _missing(path: Path) -> bool:
    return not path.exists()


def file_warnings(plan: Plan, user: RunAs | None = None) -> list[Problem]:
    """Boot files, ignition files and the state folder, as `user` (default: this
    process) would meet them."""
    user = user if user is not None else current_user()
    out: list[Problem] = []
    boot = plan.boot
    if _missing(boot.ignition_dir):
        out.append(
            Problem(
                "cluster.ignition_dir",
                f"{boot.ignition_dir} does not exist "
                "(openshift-install --dir <it> create ignition-configs writes it)",
            )
        )
    else:
        for name in sorted({n.ignition_file for n in boot.nodes}):
            problem = _file_problem(boot.ignition_dir / name, user)
            if problem is not None:
                out.append(Problem("cluster.ignition_dir", problem))
    # What the nodes fetch, per architecture (no image when live PXE never fetches one).
    firsts: dict[str, NodeBoot] = {}
    if _missing(boot.images_dir):
        out.append(Problem("boot.images_dir", f"{boot.images_dir} does not exist"))
    else:
        for node in boot.nodes:
            firsts.setdefault(node.arch, node)
    for first in firsts.values():
        at = "boot.aarch64." if first.arch == "aarch64" else "boot."
        wanted = {f"{at}kernel": first.kernel, f"{at}initramfs": first.initramfs}
        for key, url in ((f"{at}image", first.image_url), (f"{at}rootfs", first.rootfs_url)):
            if url:
                wanted[key] = url.split("/images/", 1)[1]
        for key, rel in wanted.items():
            problem = _file_problem(boot.images_dir / rel, user)
            if problem is not None:
                out.append(Problem(key, problem))
    if _missing(boot.tftp_root):
        out.append(Problem("boot.tftp_root", f"{boot.tftp_root} does not exist"))
    else:
        files = plan.dhcp.boot_files
        firmware = {n.firmware for n in boot.nodes if n.arch == "x86_64"}
        loaders = []
        if firmware & {"auto", "bios"}:
            loaders.append(files.bios)
        if firmware & {"auto", "uefi"}:
            loaders.append(files.uefi_x64)
        if any(n.arch == "aarch64" for n in boot.nodes):
            loaders.append(files.uefi_arm64)
        for loader in loaders:
            problem = _file_problem(boot.tftp_root / loader, user)
            if problem is not None:
                hint = _ipxe_hint(loader) if problem.endswith(" is missing") else ""
                out.append(Problem("boot.tftp_root", f"boot loader {problem}{hint}"))
    state = plan.state_dir
    probe = state if state.exists() else state.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if access_problem(probe, user, write=True) is not None:
        out.append(Problem("state_dir", f"{state} is not writable by user {user.name}"))
    return out


def install_warnings(plan: Plan) -> list[Problem]:
    """What the install lacks that the plan would use: the TFTP lock-step loop in C."""
    out: list[Problem] = []
    if "tftp" in plan.listen and importlib.util.find_spec("services.tftp._lockstep") is None:
        out.append(
            Problem(
                "listen.tftp",
                "the TFTP lock-step loop runs in Python: services.tftp._lockstep was not "
                "built at install (no C compiler or Python headers: apt-get install gcc "
                "python3-dev, then pip install again); transfers work, at more CPU per block",
            )
        )
    return out


# --- the host: addresses, interface, ports, capabilities -----------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One preflight line; `error`: `run` refuses to start on it."""

    key: str
    message: str
    error: bool = False

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


# The line that grants each capability, for a systemd unit and for podman.
_GRANT = {
    CAP_NET_BIND_SERVICE: "NET_BIND_SERVICE",
    CAP_NET_RAW: "NET_RAW",
    CAP_NET_ADMIN: "NET_ADMIN",
}


def _grant(cap: int) -> str:
    name = _GRANT[cap]
    return f"systemd: AmbientCapabilities=CAP_{name}; podman: --cap-add {name}"


def address_findings(plan: Plan, host: HostFacts) -> list[Finding]:
    """network.address, load_balancer.address and network.interface exist on this host."""
    if plan.ha is not None:
        return ha_address_findings(plan, host)
    out: list[Finding] = []
    dhcp_on = "dhcp" in plan.listen
    have = ", ".join(host.addresses())
    address = plan.dhcp.server_id
    # Every host has 127.0.0.0/8: no local route read means netlink failed, not "none".
    known = bool(host.local)
    where = host.local_interface(address)
    # ip_nonlocal_bind=1 is how floating addresses (keepalived) are run: the address
    # may come later, so it is not a reason to refuse.
    floating = (
        " (net.ipv4.ip_nonlocal_bind=1: if it floats, it is held elsewhere now)"
        if host.nonlocal_bind
        else ""
    )
    if known and where is None:
        why = (
            "DHCP's server identifier and next-server would not be ours"
            + ("" if host.nonlocal_bind else ", so `run` refuses to start")
            if dhcp_on
            else "nodes would fetch boot files and ignition from another machine"
        )
        out.append(
            Finding(
                "network.address",
                f"{address} is not an address of this host (it has {have}){floating}: "
                f"{why}; add it (ip addr add {address}/{plan.dhcp.subnet.prefixlen} dev "
                "<interface>) or correct the key",
                error=dhcp_on and not host.nonlocal_bind,
            )
        )
    lb = plan.load_balancer
    frontends_on = any(fe.listen is not None for fe in plan.frontends)
    if known and host.local_interface(lb) is None and frontends_on:
        out.append(
            Finding(
                "load_balancer.address",
                f"{lb} is not an address of this host (it has {have}){floating}: "
                f"api, api-int and *.apps resolve to it; add it (ip addr add {lb}/32 dev "
                "<interface>) or correct the key",
            )
        )
    interface = plan.dhcp.interface
    if interface is not None and interface not in host.interfaces:
        names = ", ".join(sorted(host.interfaces)) or "none"
        out.append(
            Finding(
                "network.interface",
                f"{interface} is not an interface of this host (it has {names}): "
                + ("DHCP cannot listen there, so `run` refuses to start; " if dhcp_on else "")
                + "correct the key (or null: every interface)",
                error=dhcp_on,
            )
        )
    elif interface is not None and where is not None and where != interface and dhcp_on:
        out.append(
            Finding(
                "network.interface",
                f"network.address {address} is on {where}, not on {interface}: DHCP "
                f"answers on {interface} with a server identifier of another link; "
                "put the address on that interface or correct the key",
            )
        )
    return out


def ha_address_findings(plan: Plan, host: HostFacts) -> list[Finding]:
    """With ha, network.address and load_balancer.address float: the leader holds them,
    so their absence here says nothing. What this host needs is one member's own address
    and network.interface, where the floating addresses go when it leads."""
    ha = plan.ha
    assert ha is not None
    out: list[Finding] = []
    own = host.own_addresses()
    if host.local and not any(m.address in own for m in ha.members):
        listed = ", ".join(f"{m.name} {m.address}" for m in ha.members)
        out.append(
            Finding(
                "ha.members",
                f"none of the member addresses ({listed}) is on this host (it has "
                f"{', '.join(host.addresses())}): `run` needs --member NAME (or "
                "APPLIANCE_MEMBER), and each member serves DNS, TFTP and HTTP on its own address",
            )
        )
    if ha.interface not in host.interfaces:
        names = ", ".join(sorted(host.interfaces)) or "none"
        out.append(
            Finding(
                "network.interface",
                f"{ha.interface} is not an interface of this host (it has {names}): the "
                "floating addresses go on it (and DHCP listens there), so `run` refuses to "
                "start; correct the key",
                error=True,
            )
        )
    return out


def ha_findings(plan: Plan, user: RunAs) -> list[Finding]:
    """The etcd TLS files: present and readable (errors: etcd cannot be reached without
    them), and the private key kept from group and others."""
    if plan.ha is None:
        return []
    out: list[Finding] = []
    for key in ("ca_file", "cert_file", "key_file"):
        value: str | None = getattr(plan.ha, key)
        if value is None:
            continue
        path = Path(value)
        problem = _file_problem(path, user)
        if problem is not None:
            out.append(Finding(f"ha.etcd.{key}", problem, error=True))
            continue
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue  # gone since: the next check says so
        if key == "key_file" and mode & 0o044:
            out.append(
                Finding(
                    f"ha.etcd.{key}",
                    f"{path} is readable by group or others (mode {mode:04o}): chmod 600 {path}",
                )
            )
    return out


def _conflicts(ours: Endpoint, row: SocketRow) -> bool:
    """Would binding `ours` fail on `row`? Same port; same address, or either a
    wildcard (an IPv6 `::` socket takes IPv4 too, as bindv6only=0 does)."""
    if row.port != ours.port:
        return False
    if row.proto == "tcp" and row.state != TCP_LISTEN:
        return False  # SO_REUSEADDR: only a listener stands in the way
    mine = ip_address(ours.host)
    if row.address.is_unspecified or mine.is_unspecified or row.address == mine:
        return True
    mapped = getattr(row.address, "ipv4_mapped", None)
    return mapped is not None and mapped == mine


def port_holders(endpoint: Endpoint, proto: str, rows: Sequence[SocketRow]) -> list[SocketRow]:
    """The sockets that hold `endpoint` for `proto`."""
    return [r for r in rows if r.proto == proto and _conflicts(endpoint, r)]


def describe_holders(
    endpoint: Endpoint,
    proto: str,
    rows: Sequence[SocketRow],
    owners: Mapping[int, tuple[int, str]],
) -> str | None:
    """`port 53/udp is held by dnsmasq (pid 812)`, or None when nothing holds it."""
    held = port_holders(endpoint, proto, rows)
    if not held:
        return None
    names: list[str] = []
    for row in held:
        owner = owners.get(row.inode)
        name = f"{owner[1]} (pid {owner[0]})" if owner else "a process this user cannot see"
        if name not in names:
            names.append(name)
    return f"port {endpoint.port}/{proto} is held by {', '.join(names)}"


def listener_endpoints(plan: Plan) -> list[tuple[str, Endpoint, str]]:
    """(listen key, endpoint, protocol) of every enabled listener."""
    out: list[tuple[str, Endpoint, str]] = []
    for key, endpoint in plan.listen.items():
        for proto in LISTENER_PROTOCOLS.get(key, ("tcp",)):
            out.append((key, endpoint, proto))
    if "dhcp" in plan.listen and plan.dhcp.mode == "proxy":
        # proxyDHCP also answers on the PXE port (4011), as dnsmasq does.
        out.append(("dhcp", Endpoint(plan.listen["dhcp"].host, 4011), "udp"))
    return out


def port_findings(
    plan: Plan, rows: Sequence[SocketRow], owners: Mapping[int, tuple[int, str]]
) -> list[Finding]:
    """Every enabled listener's port is free, else who holds it (warnings: at `run`
    the bind itself decides, and its error line names the holder)."""
    out: list[Finding] = []
    for key, endpoint, proto in listener_endpoints(plan):
        held = describe_holders(endpoint, proto, rows, owners)
        if held is None:
            continue
        names = {owners.get(r.inode, (0, ""))[1] for r in port_holders(endpoint, proto, rows)}
        if names == {APPLIANCE}:
            # `check` of a new inventory next to the running daemon: not a clash.
            fix = "a running appliance: `appliance reload` hands it this inventory"
        else:
            fix = f"stop it, or move listen.{key} elsewhere"
        out.append(Finding(f"listen.{key}", f"{held}: {fix}"))
    return out


def _in_range(gids: Iterable[int], bounds: tuple[int, int]) -> bool:
    lo, hi = bounds
    return any(lo <= g <= hi for g in gids)


def capability_findings(plan: Plan, host: HostFacts) -> list[Finding]:
    """What the enabled listeners need of this process: low ports, ICMP, ARP."""
    out: list[Finding] = []
    low = sorted(
        {
            (key, ep.port)
            for key, ep, _ in listener_endpoints(plan)
            if ep.port < host.unprivileged_port_start
        },
        key=lambda kp: kp[1],
    )
    if low and not host.has_cap(CAP_NET_BIND_SERVICE):
        ports = ", ".join(f"{port} (listen.{key})" for key, port in low)
        out.append(
            Finding(
                f"listen.{low[0][0]}",
                f"ports below {host.unprivileged_port_start} need CAP_NET_BIND_SERVICE, "
                f"which this process lacks: {ports}; {_grant(CAP_NET_BIND_SERVICE)}",
                error=True,
            )
        )
    dhcp_on = "dhcp" in plan.listen
    if (
        dhcp_on
        and plan.dhcp.ping_wait > 0
        and not host.has_cap(CAP_NET_RAW)
        and not _in_range(host.gids, host.ping_group_range)
    ):
        out.append(
            Finding(
                "network.dhcp_ping_wait",
                "the DHCP ping check needs CAP_NET_RAW (or a group in "
                "net.ipv4.ping_group_range), which this process lacks; without it pool "
                f"addresses are offered unprobed; {_grant(CAP_NET_RAW)}",
            )
        )
    if (
        dhcp_on
        and plan.dhcp.mode == "server"
        and not plan.dhcp.subnet.is_loopback
        and not host.has_cap(CAP_NET_ADMIN)
    ):
        out.append(
            Finding(
                "listen.dhcp",
                "unicast DHCP replies need CAP_NET_ADMIN (an ARP entry per client), which "
                "this process lacks; without it replies are broadcast; "
                f"{_grant(CAP_NET_ADMIN)}",
            )
        )
    return out


def upstream_findings(plan: Plan) -> list[Finding]:
    """Nodes resolve through us and pull release images: we must forward."""
    if "dns" not in plan.listen or plan.dns.upstreams or plan.dhcp.subnet.is_loopback:
        return []
    if plan.dhcp.server_id not in plan.dhcp.dns_servers and "dhcp" in plan.listen:
        return []  # the nodes are told to use other resolvers
    return [
        Finding(
            "network.upstream_dns",
            "empty: nodes resolve through this appliance and cannot resolve the registries "
            "(quay.io, registry.redhat.io) they pull the release images from; set it to "
            "your site's resolvers",
        )
    ]


def preflight(
    plan: Plan,
    host: HostFacts,
    user: RunAs,
    rows: Sequence[SocketRow] | None = None,
    owners: Mapping[int, tuple[int, str]] | None = None,
) -> list[Finding]:
    """Every finding about this host for `plan`. `rows` None: ports not checked (at
    `run` the bind decides). Capabilities are this process's, so they are judged only
    when `user` is this process's user."""
    out = address_findings(plan, host)
    if rows is not None:
        out += port_findings(plan, rows, owners or {})
    if user.current:
        out += capability_findings(plan, host)
    out += upstream_findings(plan)
    out += ha_findings(plan, user)
    out += [Finding(p.path, p.message) for p in file_warnings(plan, user)]
    return out


def for_check(findings: list[Finding]) -> list[Finding]:
    """`check` may run where the daemon will not (a laptop, CI): when network.address
    (with ha, where it floats: every member address) is not on this host, what `run` would
    refuse here is said as warnings (each line says `run` refuses); on the provisioning
    host the errors stay errors."""
    if not any(f.key in ("network.address", "ha.members") for f in findings):
        return findings
    return [Finding(f.key, f.message) if f.error else f for f in findings]


def name_holders(endpoint: Endpoint, proto: str | None = None) -> str | None:
    """Who holds `endpoint` now for `proto` (None: TCP listeners and UDP sockets both),
    for a bind error line: `port 53/udp is held by dnsmasq (pid 812)`; None when no
    other process is seen."""
    rows = read_sockets()
    owners = socket_owners({r.inode for r in rows if r.port == endpoint.port})
    mine = os.getpid()
    others = [r for r in rows if owners.get(r.inode, (0, ""))[0] != mine]
    said = [
        held
        for kind in ("udp", "tcp")
        if proto in (None, kind)
        and (held := describe_holders(endpoint, kind, others, owners)) is not None
    ]
    return "; ".join(said) or None


__all__ = [
    "Finding",
    "RunAs",
    "access_problem",
    "address_findings",
    "capability_findings",
    "current_user",
    "describe_holders",
    "file_warnings",
    "for_check",
    "ha_address_findings",
    "ha_findings",
    "install_warnings",
    "listener_endpoints",
    "name_holders",
    "port_findings",
    "preflight",
    "upstream_findings",
    "user_named",
]
