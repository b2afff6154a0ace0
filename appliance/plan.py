"""The plan: everything the services need, derived once from a valid inventory.

A plan is immutable. Services read it and never look at the inventory; a reload
builds a whole new plan and swaps it in. Derivation follows "Derived" in
shared/INVENTORY.md to the letter.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

# The ha names live in appliance.haplan; re-exported: the plan is where the others read them.
from appliance.haplan import HaMember as HaMember
from appliance.haplan import HaPlan as HaPlan
from appliance.haplan import MemberError as MemberError
from appliance.haplan import choose_member as choose_member
from appliance.haplan import ha_plan
from appliance.inventory import (
    Endpoint,
    GpuSettings,
    Inventory,
    LoadedInventory,
    Node,
    OperatorSubscription,
)

DNS_TTL = 60  # short: a reload should reach clients quickly
DNS_NEGATIVE_TTL = 30  # SOA minimum, the negative-caching TTL (RFC 2308)
ETCD_SRV = "_etcd-server-ssl._tcp"
ETCD_PORT = 2380
NS_LABEL = "ns"  # the zone's name server: the appliance itself

IGNITION_FILE = {"bootstrap": "bootstrap.ign", "master": "master.ign", "worker": "worker.ign"}
LB_FRONTENDS = ("api", "machine_config", "ingress_http", "ingress_https")
ROUTER_HEALTH_PORT = 1936  # the OpenShift router's health endpoint


# --- DNS --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ARecord:
    name: str
    address: IPv4Address


@dataclass(frozen=True, slots=True)
class PtrRecord:
    name: str  # e.g. 50.3.33.10.in-addr.arpa
    target: str


@dataclass(frozen=True, slots=True)
class SrvRecord:
    name: str
    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True, slots=True)
class NsRecord:
    name: str
    target: str


@dataclass(frozen=True, slots=True)
class Soa:
    name: str
    mname: str
    rname: str
    serial: int
    refresh: int = 3600
    retry: int = 600
    expire: int = 604800
    minimum: int = DNS_NEGATIVE_TTL


DnsRecord = ARecord | PtrRecord | SrvRecord | NsRecord


@dataclass(frozen=True, slots=True)
class DnsZone:
    origin: str  # lower case, no trailing dot
    soa: Soa
    records: tuple[DnsRecord, ...]


@dataclass(frozen=True, slots=True)
class DnsPlan:
    listen: Endpoint | None
    domain: str
    zones: tuple[DnsZone, ...]  # the forward zone first, then the reverse zones
    ttl: int
    upstreams: tuple[Endpoint, ...]
    forward_allowed: tuple[IPv4Network | IPv6Network, ...]


# --- DHCP and boot ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BootFiles:
    """Boot loader per client kind, and the iPXE script URL that chainloads the rest."""

    bios: str = "undionly.kpxe"
    uefi_x64: str = "ipxe.efi"
    uefi_arm64: str = "ipxe-arm64.efi"
    ipxe_script_url: str = ""
    # UEFI HTTP boot fetches the loader itself over HTTP: the http service serves
    # tftp_root read-only under /boot/.
    http_base: str = ""

    def http_url(self, loader: str) -> str:
        return f"{self.http_base}/boot/{loader}"


@dataclass(frozen=True, slots=True)
class DhcpReservation:
    mac: str
    ip: IPv4Address
    hostname: str
    node: str
    firmware: Literal["auto", "bios", "uefi"]
    arch: Literal["x86_64", "aarch64"] = "x86_64"
    index: int = 0  # its place in the inventory: warnings name the key nodes[index]


@dataclass(frozen=True, slots=True)
class DhcpPlan:
    listen: Endpoint | None
    interface: str | None
    mode: Literal["server", "proxy"]
    server_id: IPv4Address
    subnet: IPv4Network
    router: IPv4Address | None
    dns_servers: tuple[IPv4Address, ...]
    domain: str
    ntp_servers: tuple[IPv4Address, ...]
    lease_time: int
    pool: tuple[IPv4Address, IPv4Address] | None
    reservations: tuple[DhcpReservation, ...]
    next_server: IPv4Address
    boot_files: BootFiles
    by_mac: Mapping[str, DhcpReservation] = field(compare=False, repr=False)
    # s to wait for an echo reply before a pool address's first offer; 0: no ping check
    # (configured so, or a loopback subnet, where every address is this host).
    ping_wait: float = 0.0


@dataclass(frozen=True, slots=True)
class NodeBoot:
    """What one node boots: the install kernel, its arguments and its ignition."""

    node: str
    role: str
    mac: str
    ip: IPv4Address
    firmware: Literal["auto", "bios", "uefi"]
    kernel: str  # path below images_dir
    initramfs: str
    kernel_url: str
    initramfs_url: str
    ignition_file: str
    ignition_url: str
    install_device: str
    image_url: str | None
    rootfs_url: str | None
    kernel_args: tuple[str, ...]  # complete command line, in order
    arch: Literal["x86_64", "aarch64"] = "x86_64"


@dataclass(frozen=True, slots=True)
class BootPlan:
    http_base: str
    tftp_root: Path
    images_dir: Path
    ignition_dir: Path
    after_install: Literal["localboot", "reinstall"]
    nodes: tuple[NodeBoot, ...]
    by_mac: Mapping[str, NodeBoot] = field(compare=False, repr=False)
    # Real paths the file services (TFTP, /images, /boot) never serve, whatever the
    # layout: the ignition dir, the state dir (admin.token, the store), the kubeconfig.
    private: tuple[str, ...] = ()


# --- load balancer and cluster ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backend:
    name: str  # the node name
    address: IPv4Address
    port: int
    role: str


@dataclass(frozen=True, slots=True)
class HealthCheck:
    kind: Literal["tcp", "http", "https"]
    port: int | None  # None: the backend's own port
    path: str = ""  # for http(s): GET this, expect 200
    interval: float = 2.0
    rise: int = 2
    fall: int = 3
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class Frontend:
    name: str  # api | machine_config | ingress_http | ingress_https
    listen: Endpoint | None
    backend_port: int
    backends: tuple[Backend, ...]
    check: HealthCheck = HealthCheck("tcp", None)
    balance: Literal["roundrobin", "leastconn", "source"] = "roundrobin"
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    max_connections: int = 10_000
    stop_timeout: float = 10.0  # graceful stop: how long connections may drain


@dataclass(frozen=True, slots=True)
class CsrNode:
    """One entry of the CSR allow-list: who may get a kubelet certificate."""

    name: str
    fqdn: str
    ip: IPv4Address
    role: str


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    fqdn: str
    role: str
    mac: str
    ip: IPv4Address
    gpu: bool


@dataclass(frozen=True, slots=True)
class OperatorSource:
    """Where OLM takes an operator from (kubernetes.gpu.nfd / .operator)."""

    catalog_source: str
    catalog_namespace: str = "openshift-marketplace"
    channel: str | None = None  # None: the package's default channel
    starting_csv: str | None = None  # None: the channel's head


@dataclass(frozen=True, slots=True)
class GpuPlan:
    nfd: OperatorSource = OperatorSource("redhat-operators")
    operator: OperatorSource = OperatorSource("certified-operators")
    # Merged over the spec of the GPU operator CSV's ClusterPolicy example.
    cluster_policy: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    validate_all_gpus: bool = True  # the pod asks for all of a node's GPUs, each is checked


@dataclass(frozen=True, slots=True)
class KubernetesPlan:
    kubeconfig: Path
    approve_csrs: bool
    gpu_operator: bool
    deny_unmatched: bool = False
    serving_max_expiration: int = 31_536_000  # seconds
    approvals_per_minute: float = 60.0
    approval_burst: int = 20
    validation_image: str = "nvcr.io/nvidia/cuda:12.4.1-base-ubi8"
    gpu: GpuPlan = GpuPlan()


@dataclass(frozen=True, slots=True)
class Plan:
    cluster: str
    base_domain: str
    domain: str
    source: Path
    state_dir: Path
    listen: Mapping[str, Endpoint]  # enabled services only
    nodes: tuple[NodeInfo, ...]
    dns: DnsPlan
    dhcp: DhcpPlan
    boot: BootPlan
    frontends: tuple[Frontend, ...]
    csr_allow: tuple[CsrNode, ...]
    kubernetes: KubernetesPlan
    load_balancer: IPv4Address
    by_name: Mapping[str, NodeInfo] = field(compare=False, repr=False)
    by_ip: Mapping[IPv4Address, NodeInfo] = field(compare=False, repr=False)
    admin_hosts: tuple[str, ...] = ()  # extra Host names the admin endpoint answers to
    ha: HaPlan | None = None  # None: one host (no `ha` key), the SQLite store

    def frontend(self, name: str) -> Frontend:
        for fe in self.frontends:
            if fe.name == name:
                return fe
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A plain-data view (for `appliance plan` and the admin API)."""
        out: dict[str, Any] = _plain(self)
        if self.ha is None:
            del out["ha"]  # a plan without ha prints exactly as before issue 18
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Endpoint | IPv4Address | IPv4Network | IPv6Network | Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.compare is False:
                continue  # lookup indexes repeat what is already listed
            out[f.name] = _plain(getattr(value, f.name))
        if isinstance(value, ARecord | PtrRecord | SrvRecord | NsRecord):
            out = {"type": type(value).__name__.removesuffix("Record").upper(), **out}
        return out
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


# --- derivation -------------------------------------------------------------------------


def reverse_name(ip: IPv4Address) -> str:
    return ".".join(reversed(str(ip).split("."))) + ".in-addr.arpa"


def reverse_zones(subnet: IPv4Network) -> list[IPv4Network]:
    """Octet-aligned zones that cover a subnet (a /20 -> sixteen /24 zones; a /26 -> its /24)."""
    zone_prefix = min(24, -(-subnet.prefixlen // 8) * 8)
    if zone_prefix <= subnet.prefixlen:
        return [subnet.supernet(new_prefix=zone_prefix)]
    return list(subnet.subnets(new_prefix=zone_prefix))


def reverse_origin(zone: IPv4Network) -> str:
    octets = str(zone.network_address).split(".")[: zone.prefixlen // 8]
    return ".".join(reversed(octets)) + ".in-addr.arpa"


def _serial(parts: list[str]) -> int:
    # Deterministic per content: the same inventory gives the same zone serial.
    return zlib.crc32("\n".join(parts).encode()) or 1


def _dns_plan(loaded: LoadedInventory, domain: str) -> DnsPlan:
    inv = loaded.inventory
    lb = inv.load_balancer.address
    ns_name = f"{NS_LABEL}.{domain}"
    forward: list[DnsRecord] = [
        NsRecord(domain, ns_name),
        ARecord(ns_name, inv.network.address),
        ARecord(f"api.{domain}", lb),
        ARecord(f"api-int.{domain}", lb),
        ARecord(f"*.apps.{domain}", lb),
    ]
    ptrs: list[PtrRecord] = []
    for node in inv.nodes:
        fqdn = f"{node.name}.{domain}"
        forward.append(ARecord(fqdn, node.ip))
        ptrs.append(PtrRecord(reverse_name(node.ip), fqdn))
    ptrs.append(PtrRecord(reverse_name(lb), f"api.{domain}"))
    ptrs.append(PtrRecord(reverse_name(lb), f"api-int.{domain}"))
    if inv.cluster.etcd_records:
        masters = [n for n in inv.nodes if n.role == "master"]
        for i, node in enumerate(masters):
            forward.append(ARecord(f"etcd-{i}.{domain}", node.ip))
        for i in range(len(masters)):
            forward.append(
                SrvRecord(f"{ETCD_SRV}.{domain}", 0, 10, ETCD_PORT, f"etcd-{i}.{domain}")
            )

    subnet = inv.network.subnet
    assert subnet is not None  # validated
    zone_nets = reverse_zones(subnet)
    if not any(lb in z for z in zone_nets):
        zone_nets.append(IPv4Network(f"{lb}/24", strict=False))
    zones: list[DnsZone] = []
    texts = [f"{type(r).__name__} {dataclasses.astuple(r)}" for r in forward + ptrs]
    serial = _serial(texts)
    rname = f"hostmaster.{domain}"
    zones.append(DnsZone(domain, Soa(domain, ns_name, rname, serial), tuple(forward)))
    for net in zone_nets:
        origin = reverse_origin(net)
        inside = tuple(p for p in ptrs if p.name.endswith("." + origin))
        records: tuple[DnsRecord, ...] = (NsRecord(origin, ns_name), *inside)
        zones.append(DnsZone(origin, Soa(origin, ns_name, rname, serial), records))

    allowed: list[IPv4Network | IPv6Network] = list(inv.network.forward_allowed)
    if not allowed:
        allowed = [subnet, ip_network("127.0.0.0/8"), ip_network("::1/128")]
    return DnsPlan(
        listen=inv.listen.dns,
        domain=domain,
        zones=tuple(zones),
        ttl=DNS_TTL,
        upstreams=tuple(inv.network.upstream_dns),
        forward_allowed=tuple(allowed),
    )


def _http_base(loaded: LoadedInventory) -> str:
    inv = loaded.inventory
    # With the http service off, an external web server is assumed on port 80.
    port = inv.listen.http.port if inv.listen.http is not None else 80
    host = str(inv.network.address)
    return f"http://{host}" if port == 80 else f"http://{host}:{port}"


def arg_key(arg: str) -> str:
    """The key of a kernel argument: `ip` of `ip=enp1s0f0:dhcp`; a bare flag is its own key."""
    return arg.split("=", 1)[0]


def override_args(base: list[str], extra: list[str], at: int) -> list[str]:
    """`extra` inserted at index `at` of `base`, except that an argument whose key `base`
    has replaces every occurrence of that key in `base`, at the first one's place.

    So a node's `ip=enp1s0f0:dhcp` takes the place of the derived `ip=dhcp` (a DGX has
    many NICs: with a global ip=dhcp dracut waits on each), and a node's one console=
    replaces all the global ones. Repeats within `extra` are the operator's and stay.
    """
    replacing: dict[str, list[str]] = {}
    for arg in extra:
        replacing.setdefault(arg_key(arg), []).append(arg)
    present = {arg_key(a) for a in base}
    fresh = [a for a in extra if arg_key(a) not in present]
    out: list[str] = []
    placed: set[str] = set()
    for i, arg in enumerate(base):
        if i == at:
            out.extend(fresh)
        key = arg_key(arg)
        if key not in replacing:
            out.append(arg)
        elif key not in placed:
            out.extend(replacing[key])
            placed.add(key)
    if at >= len(base):
        out.extend(fresh)
    return out


def _node_ignition(ignition_dir: Path, node: Node) -> str:
    """`node/<name>.ign` when that file exists (checked at each plan build: on reload
    too), else the role's file."""
    own = f"node/{node.name}.ign"
    try:
        if (ignition_dir / own).is_file():
            return own
    except OSError:  # unreadable folder: the role file, and `check` says why
        pass
    return IGNITION_FILE[node.role]


def _node_boot(loaded: LoadedInventory, node: Node, base: str, ignition_dir: Path) -> NodeBoot:
    boot = loaded.inventory.boot
    if node.arch == "aarch64":
        arm = boot.aarch64
        assert arm is not None  # validated: an aarch64 node needs boot.aarch64
        kernel, initramfs, rootfs, image = arm.kernel, arm.initramfs, arm.rootfs, arm.image
    else:
        kernel, initramfs, rootfs = boot.kernel, boot.initramfs, boot.rootfs
        # Live PXE: an image URL only when the inventory writes one (the model's default
        # is the legacy installer's image; without it coreos-installer copies the live one).
        written = rootfs is None or "image" in boot.model_fields_set
        image = boot.image if written else None
    device = node.install_device or boot.install_device
    if rootfs and not device.startswith("/"):
        device = f"/dev/{device}"  # coreos-installer wants a path; SEED's `vda` stays as is
    ignition_file = _node_ignition(ignition_dir, node)
    ignition_url = f"{base}/ignition/{ignition_file}"
    image_url = f"{base}/images/{image}" if image else None
    rootfs_url = f"{base}/images/{rootfs}" if rootfs else None
    derived = ["ip=dhcp", "rd.neednet=1"]
    if rootfs_url:  # live PXE as coreos-installer documents it: no coreos.inst=yes
        derived += [f"coreos.live.rootfs_url={rootfs_url}", f"coreos.inst.install_dev={device}"]
    else:  # the legacy installer (SEED.md)
        derived += ["coreos.inst=yes", f"coreos.inst.install_dev={device}"]
    if image_url:
        derived.append(f"coreos.inst.image_url={image_url}")
    derived.append(f"coreos.inst.ignition_url={ignition_url}")
    # Node arguments beat boot.kernel_args, which beat the derived ones (same key).
    args = override_args(derived, boot.kernel_args, at=2)
    args = override_args(args, node.kernel_args, at=len(args))
    return NodeBoot(
        node=node.name,
        role=node.role,
        mac=node.mac,
        ip=node.ip,
        firmware=node.firmware,
        kernel=kernel,
        initramfs=initramfs,
        kernel_url=f"{base}/images/{kernel}",
        initramfs_url=f"{base}/images/{initramfs}",
        ignition_file=ignition_file,
        ignition_url=ignition_url,
        install_device=device,
        image_url=image_url,
        rootfs_url=rootfs_url,
        kernel_args=tuple(args),
        arch=node.arch,
    )


def _frontends(loaded: LoadedInventory) -> tuple[Frontend, ...]:
    inv = loaded.inventory
    ports = inv.load_balancer.backend_ports
    control = [n for n in inv.nodes if n.role in ("bootstrap", "master")]
    workers = [n for n in inv.nodes if n.role == "worker"]
    ingress = workers or [n for n in inv.nodes if n.role == "master"]
    pools = {
        "api": control,
        "machine_config": control,
        "ingress_http": ingress,
        "ingress_https": ingress,
    }
    lb = inv.load_balancer

    def check(kind: Literal["tcp", "http", "https"], port: int | None, path: str) -> HealthCheck:
        timeout = min(lb.check_interval, 2.0)
        return HealthCheck(kind, port, path, lb.check_interval, lb.rise, lb.fall, timeout)

    router = (
        check("http", ROUTER_HEALTH_PORT, "/healthz/ready")
        if lb.ingress_check == "http"
        else check("tcp", None, "")
    )
    checks = {
        "api": check("https", None, "/readyz"),
        "machine_config": check("https", None, "/healthz"),
        "ingress_http": router,
        "ingress_https": router,
    }
    out = []
    for name in LB_FRONTENDS:
        port: int = getattr(ports, name)
        backends = tuple(Backend(n.name, n.ip, port, n.role) for n in pools[name])
        out.append(
            Frontend(
                name,
                getattr(inv.listen, name),
                port,
                backends,
                check=checks[name],
                balance=lb.balance_of(name),
                connect_timeout=lb.connect_timeout,
                idle_timeout=getattr(lb.idle_timeout, name),
                max_connections=lb.max_connections,
                stop_timeout=lb.stop_timeout,
            )
        )
    return tuple(out)


def _gpu_plan(settings: GpuSettings) -> GpuPlan:
    def source(sub: OperatorSubscription) -> OperatorSource:
        return OperatorSource(
            sub.catalog_source, sub.catalog_namespace, sub.channel, sub.starting_csv
        )

    return GpuPlan(
        source(settings.nfd),
        source(settings.operator),
        MappingProxyType(copy.deepcopy(settings.cluster_policy)),
        settings.validate_all_gpus,
    )


def _default_dns(loaded: LoadedInventory) -> tuple[IPv4Address, ...]:
    """DHCP's DNS option unless network.dns_servers is written: this appliance; with ha
    the floating address first, then each member (every member answers DNS on its own
    address too, so a node keeps resolving during a takeover)."""
    inv = loaded.inventory
    members = [m.address for m in inv.ha.members] if inv.ha is not None else []
    return tuple(dict.fromkeys([inv.network.address, *members]))


def _freebind_floating(inv: Inventory) -> Inventory:
    """An HA pair: listeners at a floating address are bound with IP_FREEBIND, so every
    member binds them at start and the one that holds the address gets the traffic."""
    floating = {str(inv.network.address), str(inv.load_balancer.address)}
    update = {
        key: dataclasses.replace(ep, freebind=True)
        for key in type(inv.listen).model_fields
        if (ep := getattr(inv.listen, key)) is not None and ep.host in floating
    }
    if not update:
        return inv
    return inv.model_copy(update={"listen": inv.listen.model_copy(update=update)})


def build_plan(loaded: LoadedInventory) -> Plan:
    """Derive the plan. The inventory is already valid, so this cannot fail."""
    if loaded.inventory.ha is not None:  # every part below reads `loaded`
        loaded = dataclasses.replace(loaded, inventory=_freebind_floating(loaded.inventory))
    inv = loaded.inventory
    name, base_domain = inv.cluster.name, inv.cluster.base_domain
    assert name is not None and base_domain is not None
    domain = f"{name}.{base_domain}"
    base = _http_base(loaded)
    ignition_dir = loaded.path(inv.cluster.ignition_dir)
    k8s = inv.kubernetes
    kubeconfig = (
        loaded.path(k8s.kubeconfig) if k8s.kubeconfig else ignition_dir / "auth" / "kubeconfig"
    )

    nodes = tuple(
        NodeInfo(n.name, f"{n.name}.{domain}", n.role, n.mac, n.ip, n.gpu) for n in inv.nodes
    )
    reservations = tuple(
        DhcpReservation(n.mac, n.ip, n.name, n.name, n.firmware, n.arch, i)
        for i, n in enumerate(inv.nodes)
    )
    net = inv.network
    subnet = net.subnet
    assert subnet is not None  # validated: required, or read from install-config
    ipxe_url = f"{base}/boot.ipxe"
    dhcp = DhcpPlan(
        listen=inv.listen.dhcp,
        interface=net.interface,
        mode=net.dhcp_mode,
        server_id=net.address,
        subnet=subnet,
        router=net.gateway,
        dns_servers=tuple(net.dns_servers) or _default_dns(loaded),
        domain=domain,
        ntp_servers=tuple(net.ntp_servers),
        lease_time=net.lease_time,
        pool=net.dhcp_range,
        reservations=reservations,
        next_server=net.address,
        boot_files=BootFiles(
            bios=inv.boot.loaders.bios,
            uefi_x64=inv.boot.loaders.uefi_x64,
            uefi_arm64=inv.boot.loaders.uefi_arm64,
            ipxe_script_url=ipxe_url,
            http_base=base,
        ),
        by_mac=MappingProxyType({r.mac: r for r in reservations}),
        ping_wait=(
            net.dhcp_ping_wait
            if net.dhcp_range is not None and net.dhcp_mode == "server" and not subnet.is_loopback
            else 0.0
        ),
    )
    node_boots = tuple(_node_boot(loaded, n, base, ignition_dir) for n in inv.nodes)
    boot = BootPlan(
        http_base=base,
        tftp_root=loaded.path(inv.boot.tftp_root),
        images_dir=loaded.path(inv.boot.images_dir),
        ignition_dir=ignition_dir,
        after_install=inv.boot.after_install,
        nodes=node_boots,
        by_mac=MappingProxyType({b.mac: b for b in node_boots}),
        private=tuple(
            os.path.realpath(p) for p in (ignition_dir, loaded.path(inv.state_dir), kubeconfig)
        ),
    )
    listen = {svc: ep for svc in type(inv.listen).model_fields if (ep := getattr(inv.listen, svc))}
    return Plan(
        cluster=name,
        base_domain=base_domain,
        domain=domain,
        source=loaded.source,
        state_dir=loaded.path(inv.state_dir),
        listen=MappingProxyType(listen),
        nodes=nodes,
        dns=_dns_plan(loaded, domain),
        dhcp=dhcp,
        boot=boot,
        frontends=_frontends(loaded),
        csr_allow=tuple(CsrNode(n.name, n.fqdn, n.ip, n.role) for n in nodes),
        kubernetes=KubernetesPlan(
            kubeconfig,
            k8s.approve_csrs,
            k8s.gpu_operator,
            deny_unmatched=k8s.deny_unmatched,
            serving_max_expiration=k8s.serving_max_expiration,
            approvals_per_minute=k8s.approvals_per_minute,
            approval_burst=k8s.approval_burst,
            validation_image=k8s.validation_image,
            gpu=_gpu_plan(k8s.gpu),
        ),
        load_balancer=inv.load_balancer.address,
        by_name=MappingProxyType({n.name: n for n in nodes}),
        by_ip=MappingProxyType({n.ip: n for n in nodes}),
        admin_hosts=tuple(inv.admin_hosts),
        ha=ha_plan(loaded),
    )
