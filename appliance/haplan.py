"""The ha part of the plan (issue 18): who the members are, where etcd is, what floats.

Pure: derived from a valid inventory (appliance.plan re-exports these names), and the
choice of which member this host is, made over values (the flag, the environment, the
local addresses read elsewhere: appliance.hostinfo.local_ipv4_addresses).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from appliance.inventory import LoadedInventory, etcd_url

MEMBER_ENV = "APPLIANCE_MEMBER"


@dataclass(frozen=True, slots=True)
class HaMember:
    name: str
    address: str  # its own fixed address (IPv4, dotted)


@dataclass(frozen=True, slots=True)
class HaPlan:
    members: tuple[HaMember, ...]
    endpoints: tuple[str, ...]  # scheme://host:port, lower-case
    prefix: str  # every etcd key of this cluster is under it; no trailing '/'
    ca_file: str | None  # resolved paths; ca None with https: the system's trusted CAs
    cert_file: str | None
    key_file: str | None
    lease_ttl: int  # seconds
    interface: str  # network.interface: the floating addresses go on it
    floating: tuple[str, ...]  # network.address, load_balancer.address (deduplicated)
    prefixlen: int  # of network.subnet

    def member(self, name: str) -> HaMember | None:
        return next((m for m in self.members if m.name == name), None)


class MemberError(Exception):
    """This host's member cannot be told: the message says what was seen and how to fix it."""


def ha_plan(loaded: LoadedInventory) -> HaPlan | None:
    inv = loaded.inventory
    ha = inv.ha
    if ha is None:
        return None
    net = inv.network
    # Validated: interface and subnet are required with ha, the cluster name is known.
    assert net.interface is not None and net.subnet is not None and inv.cluster.name
    etcd = ha.etcd

    def path(value: str | None) -> str | None:
        return None if value is None else str(loaded.path(value))

    floating = tuple(dict.fromkeys((str(net.address), str(inv.load_balancer.address))))
    return HaPlan(
        members=tuple(HaMember(m.name, str(m.address)) for m in ha.members),
        endpoints=tuple(etcd_url(url) for url in etcd.endpoints),
        prefix=etcd.prefix if etcd.prefix is not None else f"/appliance/{inv.cluster.name}",
        ca_file=path(etcd.ca_file),
        cert_file=path(etcd.cert_file),
        key_file=path(etcd.key_file),
        lease_ttl=ha.lease_ttl,
        interface=net.interface,
        floating=floating,
        prefixlen=net.subnet.prefixlen,
    )


def _listed(members: Iterable[HaMember]) -> str:
    return ", ".join(f"{m.name} {m.address}" for m in members)


def choose_member(
    ha: HaPlan, flag: str | None, env: Mapping[str, str], local: Iterable[str]
) -> HaMember:
    """Which member this host is: `appliance run --member NAME`, else APPLIANCE_MEMBER,
    else the one member whose address is among `local` (this host's addresses)."""
    name = flag or env.get(MEMBER_ENV) or None  # an empty variable counts as unset
    if name is not None:
        said = f"--member {name}" if flag else f"{MEMBER_ENV}={name}"
        member = ha.member(name)
        if member is None:
            known = ", ".join(f"{m.name} ({m.address})" for m in ha.members)
            raise MemberError(f"{said}: no such member; ha.members names {known}")
        return member
    seen = list(dict.fromkeys(local))
    mine = [m for m in ha.members if m.address in seen]
    how = "name it with `appliance run --member NAME` or APPLIANCE_MEMBER=NAME"
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise MemberError(
            f"which member is this host? none of the member addresses ({_listed(ha.members)}) "
            f"is on a local interface (this host has {', '.join(seen) or 'no IPv4 address'}): "
            f"add this member's own address to its interface, or {how}"
        )
    raise MemberError(
        f"which member is this host? several member addresses are local ({_listed(mine)}): {how}"
    )
