"""The inventory: a pydantic model of the contract in shared/INVENTORY.md.

Loading is two passes. pydantic checks each key's shape (unknown keys refused);
then `_semantic_problems` checks what spans keys (unique names, MACs and IPs,
addresses inside the subnet, listener clashes). Every problem becomes one line
`<key path>: <reason>`, and all problems are reported together, never a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

# Re-exported: they live in appliance.addr so services can use them without pydantic.
from appliance.addr import Endpoint as Endpoint
from appliance.addr import normalize_mac as normalize_mac
from appliance.yamlio import YamlError, load_yaml

# --- reusable value checks ---------------------------------------------------

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _dns_label(value: str) -> str:
    if not _LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a lowercase DNS label (a-z, 0-9 and '-', at most 63 characters, "
            "no leading or trailing '-')"
        )
    return value


def _dns_name(value: str) -> str:
    name = value.strip().rstrip(".").lower()
    if not name or len(name) > 253 or not all(_LABEL.match(x) for x in name.split(".")):
        raise ValueError(f"{value!r} is not a valid DNS domain name")
    return name


def parse_endpoint(value: Any, default_port: int | None = None) -> Endpoint:
    """Parse `1.2.3.4:53`, `[::1]:53`, or a bare address when a default port is given."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not host:port")
    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{value!r} is not host:port (unclosed '[')")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{value!r} is not host:port")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f"{value!r} is not host:port (write IPv6 addresses as [addr]:port)")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r} is not host:port: {host!r} is not an IP address") from None
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r} is not host:port (the port is missing)")
        return Endpoint(str(addr), default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r} is not host:port: port {port_text!r} is not 1-65535")
    return Endpoint(str(addr), int(port_text))


def _ipv4(value: Any) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    try:
        return IPv4Address(value) if isinstance(value, str) else IPv4Address("x")
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def _ipv4_net(value: Any) -> IPv4Network:
    if isinstance(value, IPv4Network):
        return value
    try:
        return IPv4Network(value) if isinstance(value, str) else IPv4Network("x")
    except ValueError as exc:
        why = " (host bits are set)" if "host bits" in str(exc) else ""
        raise ValueError(f"{value!r} is not an IPv4 network in CIDR form{why}") from None


def _any_net(value: Any) -> IPv4Network | IPv6Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    try:
        if not isinstance(value, str):
            raise ValueError
        return ipaddress.ip_network(value)
    except ValueError as exc:
        why = " (host bits are set)" if "host bits" in str(exc) else ""
        raise ValueError(f"{value!r} is not an IP network in CIDR form{why}") from None


_NOT_IN_A_WORD = frozenset("\"'`$;\\{}")


def _boot_word(value: str) -> str:
    """A kernel argument or a boot path: one word of a pxelinux/GRUB/iPXE line. A space
    would make it two arguments (one the override rule never sees), a line break a new
    config line, and quotes, `$`, `;`, `\\` and braces are read by GRUB and iPXE."""
    if not value:
        raise ValueError("empty (remove the item)")
    bad = next(
        (c for c in value if c.isspace() or not c.isprintable() or c in _NOT_IN_A_WORD), None
    )
    if bad is not None:
        raise ValueError(
            f"{value!r} holds {bad!r}: one argument or path per item, without spaces, "
            "control characters, quotes, '$', ';', '\\' or braces (the boot configs "
            "would split it or read it)"
        )
    return value


def _listen(value: Any) -> Endpoint:
    return parse_endpoint(value)


def _upstream(value: Any) -> Endpoint:
    return parse_endpoint(value, default_port=53)


Mac = Annotated[str, BeforeValidator(normalize_mac)]
Label = Annotated[str, AfterValidator(_dns_label)]
DnsName = Annotated[str, AfterValidator(_dns_name)]
ListenAt = Annotated[Endpoint, BeforeValidator(_listen)]
Upstream = Annotated[Endpoint, BeforeValidator(_upstream)]
Port = Annotated[int, Field(ge=1, le=65535)]
IPv4 = Annotated[IPv4Address, BeforeValidator(_ipv4)]
IPv4Net = Annotated[IPv4Network, BeforeValidator(_ipv4_net)]
BootWord = Annotated[str, AfterValidator(_boot_word)]
AnyNet = Annotated[IPv4Network | IPv6Network, BeforeValidator(_any_net)]


# --- the model -----------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Cluster(_Strict):
    name: Label | None = None
    base_domain: DnsName | None = None
    install_config: str | None = None
    ignition_dir: str = "ignition"
    etcd_records: bool = True


class Network(_Strict):
    interface: str | None = None
    address: IPv4
    subnet: IPv4Net | None = None
    gateway: IPv4 | None = None
    dns_servers: list[IPv4] = []
    upstream_dns: list[Upstream] = []
    forward_allowed: list[AnyNet] = []
    ntp_servers: list[IPv4] = []
    dhcp_range: tuple[IPv4, IPv4] | None = None
    dhcp_mode: Literal["server", "proxy"] = "server"
    lease_time: Annotated[int, Field(ge=60, le=31_536_000)] = 3600
    # Seconds to wait for an ICMP echo reply from a pool address before its first offer
    # (RFC 2131 3.1: probe before allocating; dnsmasq pings too); 0 turns the check off.
    dhcp_ping_wait: Annotated[float, Field(ge=0, le=10)] = 0.5


class BackendPorts(_Strict):
    api: Port = 6443
    machine_config: Port = 22623
    ingress_http: Port = 80
    ingress_https: Port = 443


class FrontendSeconds(_Strict):
    """A number of seconds per frontend (added key: load_balancer.idle_timeout)."""

    api: Annotated[float, Field(gt=0)] = 3600.0  # API watches stay open for long
    machine_config: Annotated[float, Field(gt=0)] = 300.0
    ingress_http: Annotated[float, Field(gt=0)] = 300.0
    ingress_https: Annotated[float, Field(gt=0)] = 3600.0  # websockets through the router


Balance = Literal["roundrobin", "leastconn", "source"]


class FrontendBalance(_Strict):
    """Algorithm per frontend (added key: load_balancer.balance_per_frontend); unset: default."""

    api: Balance | None = None
    machine_config: Balance | None = None
    ingress_http: Balance | None = None
    ingress_https: Balance | None = None


# OpenShift's documented user-managed balancer: source for the routers (sticky clients),
# roundrobin for the API and machine-config servers.
DEFAULT_BALANCE: dict[str, Balance] = {
    "api": "roundrobin",
    "machine_config": "roundrobin",
    "ingress_http": "source",
    "ingress_https": "source",
}


class LoadBalancer(_Strict):
    address: IPv4
    backend_ports: BackendPorts = BackendPorts()
    # Added keys (the proxy service); the defaults are HAProxy-like.
    # balance, when written, applies to every frontend; unwritten, DEFAULT_BALANCE does.
    balance: Balance = "roundrobin"
    balance_per_frontend: FrontendBalance = FrontendBalance()
    check_interval: Annotated[float, Field(gt=0, le=3600)] = 2.0
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    fall: Annotated[int, Field(ge=1, le=100)] = 3
    connect_timeout: Annotated[float, Field(gt=0, le=300)] = 5.0
    idle_timeout: FrontendSeconds = FrontendSeconds()
    max_connections: Annotated[int, Field(ge=1)] = 10_000  # per frontend
    ingress_check: Literal["http", "tcp"] = "http"  # http: GET /healthz/ready on :1936
    # Graceful stop (SIGTERM): seconds open connections may take to finish after the
    # listeners close; what is still open then is cut.
    stop_timeout: Annotated[float, Field(ge=0, le=3600)] = 10.0

    def balance_of(self, frontend: str) -> Balance:
        """The algorithm of one frontend: its own entry, else balance if written, else default."""
        own: Balance | None = getattr(self.balance_per_frontend, frontend)
        if own is not None:
            return own
        return self.balance if "balance" in self.model_fields_set else DEFAULT_BALANCE[frontend]


class Loaders(_Strict):
    """Boot loader file names in tftp_root, per client kind (added key: boot.loaders)."""

    bios: str = "undionly.kpxe"
    uefi_x64: str = "ipxe.efi"
    uefi_arm64: str = "ipxe-arm64.efi"


class ArchArtifacts(_Strict):
    """boot.aarch64: the Arm nodes' artifacts; the same meanings as the top-level keys.

    No defaults for kernel and initramfs: x86 defaults would boot nothing on Arm. With
    rootfs set it is live PXE; `image` is written only when set (else the installer
    copies the live image); without rootfs the legacy installer needs the image.
    """

    kernel: BootWord
    initramfs: BootWord
    rootfs: BootWord | None = None
    image: BootWord | None = None


class Boot(_Strict):
    tftp_root: str = "tftp"
    images_dir: str = "images"
    kernel: BootWord = "rhcos/installer-kernel"
    initramfs: BootWord = "rhcos/installer-initramfs.img"
    rootfs: BootWord | None = None
    image: BootWord | None = "rhcos/metal.raw.gz"
    install_device: BootWord = "/dev/sda"
    kernel_args: list[BootWord] = ["console=tty0", "console=ttyS0"]
    after_install: Literal["localboot", "reinstall"] = "localboot"
    loaders: Loaders = Loaders()
    aarch64: ArchArtifacts | None = None


Role = Literal["bootstrap", "master", "worker"]


class Node(_Strict):
    name: Label
    role: Role
    mac: Mac
    ip: IPv4
    firmware: Literal["auto", "bios", "uefi"] = "auto"
    install_device: BootWord | None = None
    gpu: bool = False
    kernel_args: list[BootWord] = []
    arch: Literal["x86_64", "aarch64"] = "x86_64"  # aarch64: boot.aarch64's artifacts


class Listen(_Strict):
    dns: ListenAt | None = parse_endpoint("0.0.0.0:53")
    dhcp: ListenAt | None = parse_endpoint("0.0.0.0:67")
    tftp: ListenAt | None = parse_endpoint("0.0.0.0:69")
    http: ListenAt | None = parse_endpoint("0.0.0.0:8080")
    api: ListenAt | None = parse_endpoint("0.0.0.0:6443")
    machine_config: ListenAt | None = parse_endpoint("0.0.0.0:22623")
    ingress_http: ListenAt | None = parse_endpoint("0.0.0.0:80")
    ingress_https: ListenAt | None = parse_endpoint("0.0.0.0:443")
    admin: ListenAt | None = parse_endpoint("127.0.0.1:9000")


_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_CHANNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _k8s_name(value: str) -> str:
    # Not lowercased for the operator: the API would refuse the name, OLM would never resolve.
    if not _K8S_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes object name (lowercase a-z, 0-9, '-' and '.', "
            "at most 253 characters)"
        )
    return value


def _channel(value: str) -> str:
    if not _CHANNEL.fullmatch(value):
        raise ValueError(f"{value!r} is not an OLM channel name (letters, digits, '.', '_', '-')")
    return value


K8sName = Annotated[str, AfterValidator(_k8s_name)]
Channel = Annotated[str, AfterValidator(_channel)]


class OperatorSubscription(_Strict):
    """Where OLM takes an operator from (added key: kubernetes.gpu.nfd / .operator)."""

    catalog_source: K8sName
    catalog_namespace: Label = "openshift-marketplace"
    channel: Channel | None = None  # None: the package's default channel in the catalog
    starting_csv: K8sName | None = None  # None: the channel's head


class NfdSubscription(OperatorSubscription):
    catalog_source: K8sName = "redhat-operators"


class GpuOperatorSubscription(OperatorSubscription):
    catalog_source: K8sName = "certified-operators"


class GpuSettings(_Strict):
    """The GPU bring-up (added key: kubernetes.gpu); absent, today's defaults."""

    nfd: NfdSubscription = NfdSubscription()
    operator: GpuOperatorSubscription = GpuOperatorSubscription()
    # Merged (JSON merge patch: null removes) over the spec of the CSV's ClusterPolicy example.
    cluster_policy: dict[str, Any] = {}
    # The validation pod asks for all of a node's GPUs and nvidia-smi must list each.
    validate_all_gpus: bool = True


class Kubernetes(_Strict):
    kubeconfig: str | None = None
    approve_csrs: bool = True
    gpu_operator: bool = True
    # Added keys (the cluster loop): deny kubelet CSRs that fail review instead of
    # leaving them pending; the longest serving certificate a CSR may ask for (seconds);
    # the approval rate limit; the image of the nvidia-smi validation pods.
    deny_unmatched: bool = False
    serving_max_expiration: Annotated[int, Field(ge=600)] = 31_536_000
    approvals_per_minute: Annotated[float, Field(gt=0, le=100_000)] = 60.0
    approval_burst: Annotated[int, Field(ge=1, le=100_000)] = 20
    validation_image: str = "nvcr.io/nvidia/cuda:12.4.1-base-ubi8"
    gpu: GpuSettings = GpuSettings()


# --- ha: two or more appliances serving one inventory (issue 18) ---------------------


def _etcd_url(value: str) -> str:
    """An etcd client URL, `http(s)://host:port` and nothing else (the client adds /v3/...)."""
    text = value.strip()
    scheme, sep, _ = text.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        hint = f" (write http://{text})" if not sep and ":" in text else ""
        raise ValueError(f"{value!r} is not an http:// or https:// URL{hint}")
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError:
        raise ValueError(f"{value!r}: port is not 1-65535") from None
    if not url.hostname:
        raise ValueError(f"{value!r} has no host")
    if url.path not in ("", "/") or url.query or url.fragment or url.username or url.password:
        raise ValueError(f"{value!r} has a path, query or user: write only scheme://host:port")
    if port is None:
        raise ValueError(
            f"{value!r} has no port: write it (etcd's client port is 2379 unless configured "
            "otherwise)"
        )
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: port is not 1-65535")
    return value


def etcd_url(value: str) -> str:
    """A valid endpoint as the client takes it: lower-case, no trailing '/'."""
    url = urlsplit(value.strip())
    return f"{url.scheme.lower()}://{url.netloc.lower()}"


def _etcd_prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must start with '/'")
    if value.endswith("/"):
        raise ValueError(f"{value!r} must not end with '/'")
    bad = next((c for c in value if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{value!r} holds {bad!r}: write printable characters without spaces")
    return value


def _file_name(value: str) -> str:
    if not value.strip():
        raise ValueError("empty (write a path, or null for the system's trusted CAs)")
    return value


def _lease_ttl(value: int) -> int:
    if not 2 <= value <= 60:
        # etcd's minimum lease TTL is 1.5 x its election timeout (1 s by default).
        raise ValueError(
            f"{value} is not 2-60 seconds (etcd raises a shorter lease to its minimum, "
            "1.5 x its election timeout; a longer one notices a dead leader late)"
        )
    return value


EtcdUrl = Annotated[str, AfterValidator(_etcd_url)]
EtcdPrefix = Annotated[str, AfterValidator(_etcd_prefix)]
FileName = Annotated[str, AfterValidator(_file_name)]
LeaseTtl = Annotated[int, Field(strict=True), AfterValidator(_lease_ttl)]


class HaMemberSpec(_Strict):
    """One provisioning host of the pair (ha.members[])."""

    name: Label
    address: IPv4  # its own fixed address; network.address and load_balancer.address float


class EtcdSettings(_Strict):
    """Where the shared state and the leader election live (ha.etcd)."""

    endpoints: list[EtcdUrl]
    prefix: EtcdPrefix | None = None  # None: /appliance/<cluster name>
    ca_file: FileName | None = None  # None with https: the system's trusted CAs
    cert_file: FileName | None = None
    key_file: FileName | None = None


class Ha(_Strict):
    members: list[HaMemberSpec]
    etcd: EtcdSettings
    lease_ttl: LeaseTtl = 3  # seconds: how fast a dead leader is noticed


class Inventory(_Strict):
    cluster: Cluster = Cluster()
    network: Network
    load_balancer: LoadBalancer
    boot: Boot = Boot()
    nodes: list[Node]
    listen: Listen = Listen()
    kubernetes: Kubernetes = Kubernetes()
    state_dir: str = "/var/lib/appliance"
    # Host header names the admin endpoint answers to besides its own address, IP
    # literals, localhost and this machine's names (e.g. a DNS name of the provisioning
    # host); any other name is refused (421), so DNS rebinding cannot reach it.
    admin_hosts: list[DnsName] = []
    # Two or more appliances serving this inventory (issue 18); absent: one host, SQLite.
    ha: Ha | None = None


# Which transport protocols each listener uses: a clash needs a shared protocol.
LISTENER_PROTOCOLS: dict[str, tuple[str, ...]] = {
    "dns": ("udp", "tcp"),
    "dhcp": ("udp",),
    "tftp": ("udp",),
    "http": ("tcp",),
    "api": ("tcp",),
    "machine_config": ("tcp",),
    "ingress_http": ("tcp",),
    "ingress_https": ("tcp",),
    "admin": ("tcp",),
}


# --- loading -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InventoryError(Exception):
    """An inventory that cannot be used; `lines()` gives one line per problem."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__("\n".join(f"{source}: {p}" for p in problems))
        self.source = source
        self.problems = problems

    def lines(self) -> list[str]:
        return [f"{self.source}: {p}" for p in self.problems]


@dataclass(frozen=True, slots=True)
class LoadedInventory:
    """A valid inventory plus where it came from (relative paths resolve against `base_dir`)."""

    inventory: Inventory
    source: Path
    base_dir: Path
    # Lines to show (check) and log (run) that do not make the inventory unusable.
    warnings: tuple[Problem, ...] = ()

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(os.path.normpath(self.base_dir / p))


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = part
        elif not part[:1].isupper():  # union members show as type names: not keys
            out += f".{part}"
    return out


def _pydantic_problems(exc: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        path = _loc_to_path(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ").replace("Input should", "should")
            shown = err.get("input")
            if kind != "value_error" and not isinstance(shown, dict | list):
                msg = f"{shown!r}: {msg}"
        problem = Problem(path, msg)
        if problem not in problems:
            problems.append(problem)
    return problems


# install-config.yaml as openshift-install reads it (4.1-era and current forms). What the
# installer fills in when a key is left out is used as it would be, and said so.
_IC_DEFAULT = "not set: openshift-install's default"
_IC_REPLICAS = 3
_IC_MAX_BYTES = 1 << 20  # a real one is a few KiB (the pull secret is the bulk)
_IC_NETWORKS = {  # group -> (current key, its entry field, deprecated key, default)
    "machineNetwork": ("machineNetwork", "cidr", "machineCIDR", "10.0.0.0/16"),
    "clusterNetwork": ("clusterNetwork", "cidr", "clusterNetworks", "10.128.0.0/14"),
    "serviceNetwork": ("serviceNetwork", None, "serviceCIDR", "172.30.0.0/16"),
}


@dataclass(frozen=True, slots=True)
class InstallConfig:
    """The values the appliance reads from install-config.yaml, each with its key there."""

    shown: str  # the file's name, as messages cite it
    name: Any  # metadata.name as written (None when absent)
    base_domain: Any  # baseDomain as written
    # group (machineNetwork, clusterNetwork, serviceNetwork) -> (key in the file, network);
    # IPv4 only (IPv6 is refused). A group left out holds the installer's default.
    networks: dict[str, tuple[tuple[str, IPv4Network], ...]]
    machine_network_written: bool
    control_plane: tuple[str, int] | None  # (key, replicas)
    compute: tuple[str, int] | None  # (keys, sum of the pools' replicas)

    def cite(self, key: str) -> str:
        return f"(from {self.shown} {key})"


def _ic_replicas(pool: Any, key: str, bad: list[Problem], shown: str) -> tuple[str, int] | None:
    value = pool.get("replicas") if isinstance(pool, dict) else None
    if pool is not None and not isinstance(pool, dict):
        bad.append(Problem("cluster.install_config", f"{shown} {key}: not a mapping"))
        return None
    if value is None:
        return f"{key}.replicas, {_IC_DEFAULT}", _IC_REPLICAS
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        bad.append(
            Problem(
                "cluster.install_config",
                f"{value!r} (from {shown} {key}.replicas) is not a number of machines",
            )
        )
        return None
    return f"{key}.replicas", value


def _ic_networks(
    net: dict[str, Any], group: str, shown: str, bad: list[Problem]
) -> tuple[tuple[tuple[str, IPv4Network], ...], bool]:
    """One group's IPv4 networks (IPv6 and unreadable entries become problems) and
    whether the file wrote the group at all."""
    key, field, old, default = _IC_NETWORKS[group]
    written: list[tuple[str, Any]] = []
    if net.get(key):  # openshift-install ignores the deprecated key when both are set
        items = net[key] if isinstance(net[key], list) else [net[key]]
        for i, item in enumerate(items):
            at = f"networking.{key}[{i}]"
            if field is None:
                written.append((at, item))
            elif isinstance(item, dict):
                written.append((f"{at}.{field}", item.get(field)))
            else:
                written.append((at, item))
    elif net.get(old):
        if isinstance(net[old], list):  # clusterNetworks: [{cidr, hostSubnetLength}]
            for i, item in enumerate(net[old]):
                value = item.get("cidr") if isinstance(item, dict) else item
                written.append((f"networking.{old}[{i}].cidr", value))
        else:
            written.append((f"networking.{old}", net[old]))
    if not written:
        return ((f"networking.{key}, {_IC_DEFAULT}", IPv4Network(default)),), False
    parsed: list[tuple[str, IPv4Network | IPv6Network]] = []
    for at, value in written:
        try:
            if not isinstance(value, str):
                raise ValueError
            parsed.append((at, ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            bad.append(
                Problem(
                    "cluster.install_config",
                    f"{value!r} (from {shown} {at}) is not an IP network in CIDR form",
                )
            )
    has_v4 = any(n.version == 4 for _, n in parsed)
    out: list[tuple[str, IPv4Network]] = []
    for at, network in parsed:
        if isinstance(network, IPv4Network):
            out.append((at, network))
            continue
        kind = "a dual-stack" if has_v4 else "an IPv6"
        bad.append(
            Problem(
                "cluster.install_config",
                f"{network} (from {shown} {at}) is IPv6: {kind} cluster is not supported yet "
                "(DHCPv4, IPv4 DNS and PXE only); use IPv4 networks only",
            )
        )
    return tuple(out), True


def _read_install_config(path: Path, shown: str) -> tuple[InstallConfig | None, list[Problem]]:
    where = "cluster.install_config"
    try:
        # Only a regular file of install-config size: a FIFO or a device named by mistake
        # would block start and reload (open(2) of a FIFO waits for a writer).
        if not stat.S_ISREG(path.stat().st_mode):
            return None, [Problem(where, f"{path} is not a regular file")]
        with path.open("rb") as f:
            blob = f.read(_IC_MAX_BYTES + 1)
        if len(blob) > _IC_MAX_BYTES:
            return None, [Problem(where, f"{path} is larger than 1 MiB: not an install-config")]
        data = load_yaml(blob.decode("utf-8"))
    except OSError as exc:
        return None, [Problem(where, f"cannot read {path}: {exc.strerror}")]
    except UnicodeDecodeError:
        return None, [Problem(where, f"{path}: not UTF-8 text")]
    except YamlError as exc:
        return None, [Problem(where, f"{path}: {exc}")]
    if not isinstance(data, dict):
        return None, [Problem(where, f"{path}: not an install-config (expected a mapping)")]
    bad: list[Problem] = []
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    net = data.get("networking")
    if net is not None and not isinstance(net, dict):
        bad.append(Problem(where, f"{shown} networking: not a mapping"))
    networks: dict[str, tuple[tuple[str, IPv4Network], ...]] = {}
    written: dict[str, bool] = {}
    for group in _IC_NETWORKS:
        networks[group], written[group] = _ic_networks(
            net if isinstance(net, dict) else {}, group, shown, bad
        )
    control_plane = _ic_replicas(data.get("controlPlane"), "controlPlane", bad, shown)
    pools = data.get("compute")
    compute: tuple[str, int] | None
    if pools is None or pools == []:  # the installer adds one worker pool
        compute = f"compute, {_IC_DEFAULT}", _IC_REPLICAS
    elif not isinstance(pools, list):
        bad.append(Problem(where, f"{shown} compute: not a list of machine pools"))
        compute = None
    else:
        counted = [_ic_replicas(pool, f"compute[{i}]", bad, shown) for i, pool in enumerate(pools)]
        known = [c for c in counted if c is not None]
        compute = None
        if len(known) == len(counted):
            compute = " + ".join(k for k, _ in known), sum(n for _, n in known)
    ic = InstallConfig(
        shown=shown,
        name=name or None,
        base_domain=data.get("baseDomain") or None,
        networks=networks,
        machine_network_written=written["machineNetwork"],
        control_plane=control_plane,
        compute=compute,
    )
    return ic, bad


# Inventory keys install-config.yaml can fill in -> the key they come from there.
_IC_FILLS = {
    "cluster.name": "metadata.name",
    "cluster.base_domain": "baseDomain",
    "network.subnet": "networking.machineNetwork",
}


def _fill_from_install_config(raw: dict[str, Any], ic: InstallConfig) -> dict[str, str]:
    """Put install-config's values where the inventory leaves a key out (in place);
    return which keys were filled, each with the key in the file it came from."""
    filled: dict[str, str] = {}
    cluster = raw.get("cluster")
    if isinstance(cluster, dict):
        cluster = raw["cluster"] = dict(cluster)
        for key, value, src in (
            ("name", ic.name, "metadata.name"),
            ("base_domain", ic.base_domain, "baseDomain"),
        ):
            if cluster.get(key) is None and value is not None:
                cluster[key] = value
                filled[f"cluster.{key}"] = src
    net = raw.get("network")
    machine = ic.networks["machineNetwork"]
    # The first IPv4 entry written (the nodes' network when there are several); never
    # the installer's default, which says nothing about this cluster.
    written = ic.machine_network_written and machine
    if isinstance(net, dict) and net.get("subnet") is None and written:
        raw["network"] = {**net, "subnet": str(machine[0][1])}
        filled["network.subnet"] = machine[0][0]
    return filled


def _cite_install_config(
    problems: list[Problem], ic: InstallConfig | None, filled: dict[str, str]
) -> list[Problem]:
    """Say which problems are about values read from install-config.yaml."""
    if ic is None:
        return problems
    out: list[Problem] = []
    for p in problems:
        path, message = p.path, p.message
        if path in _IC_FILLS and path not in filled and message.startswith("required key is"):
            what = "an IPv4 " if path == "network.subnet" else ""
            message = f"required key is missing ({ic.shown} has no {what}{_IC_FILLS[path]} either)"
        for key, src in filled.items():
            cited = f"{key} {ic.cite(src)}"
            if path == key:
                path = cited
            message = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w.])", cited, message)
        out.append(Problem(path, message))
    return out


def _same_dns_name(a: Any, b: Any) -> bool:
    return str(a).strip().rstrip(".").lower() == str(b).strip().rstrip(".").lower()


def _install_config_problems(
    inv: Inventory, ic: InstallConfig
) -> tuple[list[Problem], list[Problem]]:
    """Errors and warnings where the inventory and install-config.yaml disagree."""
    errors: list[Problem] = []
    warnings: list[Problem] = []
    c = inv.cluster
    ic_name = str(ic.name if ic.name is not None else c.name).strip().lower()
    ic_domain = str(ic.base_domain if ic.base_domain is not None else c.base_domain)
    ic_domain = ic_domain.strip().rstrip(".").lower()
    # The ignition files hold certificates for the install-config names: another
    # name or domain here would serve DNS for a cluster whose API certificate fails.
    for key, mine, theirs, src, fix in (
        ("cluster.name", c.name, ic.name, "metadata.name", ic_name),
        ("cluster.base_domain", c.base_domain, ic.base_domain, "baseDomain", ic_domain),
    ):
        if mine is not None and theirs is not None and not _same_dns_name(mine, theirs):
            errors.append(
                Problem(
                    key,
                    f"{mine!r} differs from {theirs!r} {ic.cite(src)}: the ignition files' "
                    f"certificates are for {ic_name}.{ic_domain}; write {key}: {fix} "
                    "or remove the key",
                )
            )

    masters = sum(1 for n in inv.nodes if n.role == "master")
    workers = sum(1 for n in inv.nodes if n.role == "worker")
    if ic.control_plane is not None and ic.control_plane[1] != masters:
        src, want = ic.control_plane
        warnings.append(
            Problem(
                "nodes",
                f"{masters} nodes have role master, but controlPlane.replicas is {want} "
                f"{ic.cite(src)}: the cluster is made for {want} control-plane nodes (etcd "
                "members the bootstrap waits for); change the master nodes, or fix "
                f"{ic.shown} and create the ignition files again",
            )
        )
    if ic.compute is not None and ic.compute[1] != workers:
        src, want = ic.compute
        said = f"{workers} nodes have role worker, but compute replicas are {want} {ic.cite(src)}"
        if want == 0:
            why = (
                ": openshift-install then makes the masters schedulable, so workloads may run "
                f"on them; set it to {workers} to keep them off the masters"
            )
        elif workers == 0:
            why = (
                ": the masters stay unschedulable and the ingress routers have nowhere to run, "
                "so the install does not complete; set it to 0 for a cluster of masters only"
            )
        else:
            why = (
                "; with no machine sets (platform none) workers join as their CSRs are "
                "approved: fix whichever is wrong"
            )
        warnings.append(Problem("nodes", said + why))

    machine = ic.networks["machineNetwork"]
    if machine:
        nets = ", ".join(str(n) for _, n in machine)
        cited = ic.cite(", ".join(k for k, _ in machine))
        outside = [
            (i, n) for i, n in enumerate(inv.nodes) if not any(n.ip in m for _, m in machine)
        ]
        if len(outside) == len(inv.nodes) > 1:
            warnings.append(
                Problem(
                    "nodes",
                    f"every node address (network.subnet {inv.network.subnet}) is outside "
                    f"machineNetwork {nets} {cited}: OpenShift expects every node address "
                    "inside it; set it to the nodes' network",
                )
            )
        else:
            for i, node in outside:
                warnings.append(
                    Problem(
                        f"nodes[{i}].ip",
                        f"{node.ip} is outside machineNetwork {nets} {cited}: OpenShift "
                        "expects every node address inside it; widen machineNetwork or move "
                        "the node",
                    )
                )

    # Pod and service addresses are routed inside the cluster: a node network among
    # them would make the nodes (and the appliance) unreachable from pods.
    subnet = inv.network.subnet
    ours: list[tuple[str, IPv4Network | IPv4Address]] = []
    if subnet is not None:
        ours.append(("network.subnet", subnet))
    for key, addr in (
        ("network.address", inv.network.address),
        ("load_balancer.address", inv.load_balancer.address),
    ):
        if subnet is None or addr not in subnet:
            ours.append((key, addr))
    for group in ("clusterNetwork", "serviceNetwork"):
        for src, network in ic.networks[group]:
            for key, value in ours:
                hit = (
                    value.overlaps(network) if isinstance(value, IPv4Network) else value in network
                )
                if hit:
                    errors.append(
                        Problem(
                            key,
                            f"{value} {'overlaps' if isinstance(value, IPv4Network) else 'is in'}"
                            f" {group} {network} {ic.cite(src)}: nodes would be unreachable "
                            f"from pods; choose another {group} before creating the ignition "
                            "files",
                        )
                    )
    return errors, warnings


def load_inventory(path: str | Path) -> LoadedInventory:
    """Read, validate and return an inventory, or raise InventoryError listing every problem."""
    source = Path(path)
    name = str(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(name, [Problem("", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        line = source.read_bytes()[: exc.start].count(b"\n") + 1
        raise InventoryError(
            name, [Problem("", f"line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})")]
        ) from None
    try:
        raw = load_yaml(text)
    except YamlError as exc:
        raise InventoryError(name, [Problem("", str(exc))]) from None
    return parse_inventory(raw, name, source.resolve().parent)


def parse_inventory(raw: Any, source: str, base_dir: Path) -> LoadedInventory:
    """Validate already-parsed YAML data (see load_inventory)."""
    if not isinstance(raw, dict):
        raise InventoryError(source, [Problem("", "the inventory must be a YAML mapping")])
    problems: list[Problem] = []
    # install-config.yaml supplies what the inventory leaves out and must agree with the rest.
    ic: InstallConfig | None = None
    filled: dict[str, str] = {}
    cluster_raw = raw.get("cluster")
    ic_path = cluster_raw.get("install_config") if isinstance(cluster_raw, dict) else None
    if isinstance(ic_path, str) and ic_path:
        p = Path(ic_path).expanduser()
        ic, ic_problems = _read_install_config(
            p if p.is_absolute() else base_dir / p, p.name or ic_path
        )
        problems += ic_problems
        if ic is not None:
            raw = dict(raw)
            filled = _fill_from_install_config(raw, ic)
    try:
        inventory = Inventory.model_validate(raw)
    except ValidationError as exc:
        problems += _pydantic_problems(exc)
        raise InventoryError(source, _cite_install_config(problems, ic, filled)) from None
    problems += list(_semantic_problems(inventory))
    problems += list(_ha_problems(inventory))
    problems += list(_layout_problems(inventory, base_dir))
    warnings: list[Problem] = list(_ha_warnings(inventory))
    if ic is not None:
        ic_errors, ic_warnings = _install_config_problems(inventory, ic)
        problems += ic_errors
        warnings += ic_warnings
    if problems:
        raise InventoryError(source, _cite_install_config(problems, ic, filled))
    return LoadedInventory(inventory, Path(source), base_dir, tuple(warnings))


# --- checks that span keys -------------------------------------------------------


def _layout_problems(inv: Inventory, base_dir: Path) -> Iterator[Problem]:
    """The folders served to anyone (boot.images_dir over HTTP and TFTP, boot.tftp_root)
    must not hold the secrets: ignition (keys and tokens), the state dir (admin.token),
    the kubeconfig. One `/srv/appliance` for everything makes that easy to get wrong."""

    def real(value: str) -> str:
        p = Path(value).expanduser()
        return os.path.realpath(p if p.is_absolute() else base_dir / p)

    served = {"boot.images_dir": inv.boot.images_dir, "boot.tftp_root": inv.boot.tftp_root}
    secret = {"cluster.ignition_dir": inv.cluster.ignition_dir, "state_dir": inv.state_dir}
    if inv.kubernetes.kubeconfig:
        secret["kubernetes.kubeconfig"] = inv.kubernetes.kubeconfig
    for skey, svalue in served.items():
        sreal = real(svalue)
        for key, value in secret.items():
            kreal = real(value)
            if kreal == sreal or kreal.startswith(sreal.rstrip(os.sep) + os.sep):
                yield Problem(
                    skey,
                    f"{svalue} is served to anyone and contains {key} ({value}): "
                    f"move {key} out of it",
                )
            elif sreal.startswith(kreal.rstrip(os.sep) + os.sep):
                yield Problem(
                    skey,
                    f"{svalue} is inside {key} ({value}): serving it would expose "
                    f"{key}'s neighbours; use separate folders",
                )


def _semantic_problems(inv: Inventory) -> Iterator[Problem]:
    c, net, lb = inv.cluster, inv.network, inv.load_balancer
    if c.name is None:
        yield Problem("cluster.name", "required key is missing (or set cluster.install_config)")
    if c.base_domain is None:
        yield Problem(
            "cluster.base_domain", "required key is missing (or set cluster.install_config)"
        )
    subnet = net.subnet
    if subnet is None:
        yield Problem("network.subnet", "required key is missing (or set cluster.install_config)")
    elif not 8 <= subnet.prefixlen <= 30:
        yield Problem("network.subnet", f"{subnet}: the prefix length must be between /8 and /30")
        subnet = None

    def where_in_subnet(path: str, ip: IPv4Address) -> Iterator[Problem]:
        if subnet is None:
            return
        if ip not in subnet:
            yield Problem(path, f"{ip} is outside network.subnet {subnet}")
        elif ip == subnet.network_address:
            yield Problem(path, f"{ip} is the network address of {subnet}")
        elif ip == subnet.broadcast_address:
            yield Problem(path, f"{ip} is the broadcast address of {subnet}")

    if net.gateway is not None:
        yield from where_in_subnet("network.gateway", net.gateway)

    # Names, MACs and IPs are each unique; IPs stay clear of the appliance's own.
    reserved: dict[IPv4Address, str] = {net.address: "network.address (the appliance itself)"}
    reserved.setdefault(lb.address, "load_balancer.address")
    if net.gateway is not None:
        reserved.setdefault(net.gateway, "network.gateway")
    names: dict[str, int] = {}
    macs: dict[str, int] = {}
    ips: dict[IPv4Address, int] = {}
    bootstrap_at: int | None = None
    derived = {"api", "api-int", "ns"}
    masters = 0
    for i, node in enumerate(inv.nodes):
        at = f"nodes[{i}]"
        if node.name in names:
            yield Problem(
                f"{at}.name", f"{node.name!r} is already used by nodes[{names[node.name]}]"
            )
        else:
            names[node.name] = i
        if node.name in derived or (c.etcd_records and re.fullmatch(r"etcd-\d+", node.name)):
            yield Problem(f"{at}.name", f"{node.name!r} clashes with a name the appliance derives")
        if node.mac in macs:
            j = macs[node.mac]
            yield Problem(
                f"{at}.mac", f"{node.mac} is already used by nodes[{j}] ({inv.nodes[j].name})"
            )
        else:
            macs[node.mac] = i
        if node.ip in ips:
            j = ips[node.ip]
            yield Problem(
                f"{at}.ip", f"{node.ip} is already used by nodes[{j}] ({inv.nodes[j].name})"
            )
        else:
            ips[node.ip] = i
        if node.ip in reserved:
            yield Problem(f"{at}.ip", f"{node.ip} is {reserved[node.ip]}")
        yield from where_in_subnet(f"{at}.ip", node.ip)
        if node.role == "bootstrap":
            if bootstrap_at is not None:
                yield Problem(
                    f"{at}.role",
                    f"a second bootstrap node (nodes[{bootstrap_at}] is one; at most one)",
                )
            else:
                bootstrap_at = i
        elif node.role == "master":
            masters += 1
        if node.arch == "aarch64":
            if inv.boot.aarch64 is None:
                yield Problem(
                    f"{at}.arch",
                    "aarch64, but boot.aarch64 is not set: give its kernel, initramfs and "
                    "rootfs (or image)",
                )
            if node.firmware == "bios":
                yield Problem(
                    f"{at}.firmware", "bios: an aarch64 machine boots with UEFI (write uefi)"
                )
    if masters == 0:
        yield Problem("nodes", "no node has role master (at least one is required)")
    arm = inv.boot.aarch64
    if arm is not None and arm.rootfs is None and arm.image is None:
        yield Problem(
            "boot.aarch64",
            "neither rootfs (live PXE) nor image (the legacy installer) is set: "
            "an Arm node would have nothing to install",
        )

    if net.dhcp_range is not None and subnet is not None:
        first, last = net.dhcp_range
        bad = False
        for k, ip in enumerate((first, last)):
            for p in where_in_subnet(f"network.dhcp_range[{k}]", ip):
                bad = True
                yield p
        if not bad and first > last:
            bad = True
            yield Problem("network.dhcp_range", f"first address {first} is after last {last}")
        if not bad:
            taken = {ip: f"nodes[{i}] ({inv.nodes[i].name})" for ip, i in ips.items()}
            for ip, what in list(reserved.items()) + list(taken.items()):
                if first <= ip <= last:
                    yield Problem(
                        "network.dhcp_range",
                        f"{first}-{last} contains {ip}, reserved for {what}",
                    )

    # Two listeners on one address, port and protocol cannot both bind.
    bound: list[tuple[str, Endpoint]] = []
    for svc in LISTENER_PROTOCOLS:
        ep: Endpoint | None = getattr(inv.listen, svc)
        if ep is None:
            continue
        for other, oep in bound:
            shared = set(LISTENER_PROTOCOLS[svc]) & set(LISTENER_PROTOCOLS[other])
            same_host = ep.host == oep.host or ep.is_wildcard or oep.is_wildcard
            if shared and ep.port == oep.port and same_host:
                yield Problem(
                    f"listen.{svc}",
                    f"{ep} ({'/'.join(sorted(shared))}) is already used by listen.{other} ({oep})",
                )
        bound.append((svc, ep))

    # An upstream that is our own DNS listener: every forwarded question would loop.
    dns_at = inv.listen.dns
    if dns_at is not None:
        own = {dns_at.host} | ({str(net.address), str(lb.address)} if dns_at.is_wildcard else set())
        for k, up in enumerate(net.upstream_dns):
            host = ipaddress.ip_address(up.host)
            is_own = up.host in own or (dns_at.is_wildcard and host.is_loopback)
            if up.port == dns_at.port and is_own:
                yield Problem(
                    f"network.upstream_dns[{k}]",
                    f"{up} is this appliance's own DNS listener (listen.dns {dns_at}): "
                    "forwarding to it would loop",
                )


def _ha_problems(inv: Inventory) -> Iterator[Problem]:
    """The ha block against the rest: members apart from every other address, the
    floating addresses on one link, TLS settings that mean what they say."""
    ha, net, lb = inv.ha, inv.network, inv.load_balancer
    if ha is None:
        return
    subnet = net.subnet if net.subnet is not None and 8 <= net.subnet.prefixlen <= 30 else None
    if len(ha.members) < 2:
        yield Problem(
            "ha.members",
            f"{len(ha.members)} member{'s' if len(ha.members) != 1 else ''}: at least 2 are "
            "needed (one leads, another takes over)",
        )
    if net.interface is None:
        yield Problem(
            "network.interface",
            "required with ha: the leader puts the floating addresses (network.address, "
            "load_balancer.address) on it",
        )
    if subnet is not None:
        for key, floating in (
            ("network.address", net.address),
            ("load_balancer.address", lb.address),
        ):
            if floating not in subnet:
                yield Problem(
                    key,
                    f"{floating} is outside network.subnet {subnet}: with ha it is a floating "
                    "address, moved between members by ARP on network.interface's link",
                )
    taken: dict[IPv4Address, str] = {
        net.address: "network.address, a floating address (the leader holds it): give each "
        "member its own fixed address",
    }
    taken.setdefault(
        lb.address,
        "load_balancer.address, a floating address (the leader holds it): give each member "
        "its own fixed address",
    )
    if net.gateway is not None:
        taken.setdefault(net.gateway, "network.gateway")
    for i, node in enumerate(inv.nodes):
        taken.setdefault(node.ip, f"already used by nodes[{i}] ({node.name})")
    names: dict[str, int] = {}
    addresses: dict[IPv4Address, int] = {}
    for i, member in enumerate(ha.members):
        at = f"ha.members[{i}]"
        if member.name in names:
            yield Problem(
                f"{at}.name", f"{member.name!r} is already used by ha.members[{names[member.name]}]"
            )
        else:
            names[member.name] = i
        ip = member.address
        if ip in addresses:
            j = addresses[ip]
            yield Problem(
                f"{at}.address", f"{ip} is already used by ha.members[{j}] ({ha.members[j].name})"
            )
            continue
        addresses[ip] = i
        if ip in taken:
            yield Problem(f"{at}.address", f"{ip} is {taken[ip]}")
        elif subnet is not None and ip not in subnet:
            yield Problem(f"{at}.address", f"{ip} is outside network.subnet {subnet}")
        elif subnet is not None and ip in (subnet.network_address, subnet.broadcast_address):
            what = "network" if ip == subnet.network_address else "broadcast"
            yield Problem(f"{at}.address", f"{ip} is the {what} address of {subnet}")
    if net.dhcp_range is not None and subnet is not None:
        first, last = net.dhcp_range
        if first in subnet and last in subnet and first <= last:
            for ip, i in addresses.items():
                if first <= ip <= last:
                    yield Problem(
                        "network.dhcp_range",
                        f"{first}-{last} contains {ip}, reserved for ha.members[{i}] "
                        f"({ha.members[i].name})",
                    )
    # One inventory for every member: a listener at one member's address binds only there.
    for svc in LISTENER_PROTOCOLS:
        ep: Endpoint | None = getattr(inv.listen, svc)
        if ep is None or ep.is_wildcard:
            continue
        owner = addresses.get(IPv4Address(ep.host)) if ":" not in ep.host else None
        if owner is not None:
            yield Problem(
                f"listen.{svc}",
                f"{ep} is the own address of ha.members[{owner}] ({ha.members[owner].name}): every "
                f"member runs this inventory and the others cannot bind it; use 0.0.0.0:{ep.port}",
            )
    # Every member forwards to network.upstream_dns: a member among them is a loop.
    dns_at = inv.listen.dns
    dns_port = dns_at.port if dns_at is not None and dns_at.is_wildcard else None
    for k, up in enumerate(net.upstream_dns):
        owner = addresses.get(IPv4Address(up.host)) if ":" not in up.host else None
        if owner is not None and up.port == dns_port:
            yield Problem(
                f"network.upstream_dns[{k}]",
                f"{up} is the DNS listener of ha.members[{owner}] ({ha.members[owner].name}), "
                "which forwards to network.upstream_dns too: forwarding would loop",
            )

    etcd = ha.etcd
    floating_at = {str(net.address): "network.address", str(lb.address): "load_balancer.address"}
    for i, written in enumerate(etcd.endpoints):
        host = urlsplit(written.strip()).hostname or ""
        if host in floating_at:
            yield Problem(
                f"ha.etcd.endpoints[{i}]",
                f"{written!r} is at {floating_at[host]}, a floating address: it moves with the "
                "leader, an etcd member listens on its host's fixed address",
            )
    if not etcd.endpoints:
        yield Problem(
            "ha.etcd.endpoints",
            "empty: list the etcd members' client URLs (http://HOST:2379 or https://HOST:2379)",
        )
    seen: dict[str, int] = {}
    for i, written in enumerate(etcd.endpoints):
        url = etcd_url(written)
        if url in seen:
            yield Problem(
                f"ha.etcd.endpoints[{i}]", f"{written!r} is already ha.etcd.endpoints[{seen[url]}]"
            )
        else:
            seen[url] = i
    schemes = {url.partition("://")[0] for url in seen}
    if len(schemes) > 1:
        yield Problem(
            "ha.etcd.endpoints",
            "mixes http:// and https://: one etcd cluster serves its clients one way; write "
            "every endpoint with the same scheme",
        )
    for have, need in (("cert_file", "key_file"), ("key_file", "cert_file")):
        if getattr(etcd, have) is not None and getattr(etcd, need) is None:
            yield Problem(
                f"ha.etcd.{need}",
                f"required with ha.etcd.{have} (a client certificate is used with its private key)",
            )
    if schemes == {"http"}:
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(etcd, key) is not None:
                yield Problem(
                    f"ha.etcd.{key}",
                    "set, but every endpoint is http://: TLS is used only with https:// "
                    "endpoints (write https://, or remove the key)",
                )


def _ha_warnings(inv: Inventory) -> Iterator[Problem]:
    if inv.ha is None or not 0 < len(inv.ha.etcd.endpoints) < 3:
        return
    every = "list every etcd member (three: the two provisioning hosts and a witness)"
    if len(inv.ha.etcd.endpoints) == 1:
        why = (
            "only 1 endpoint: while it is down the members cannot reach etcd (no DHCP, no "
            f"leader) even when the etcd cluster has quorum; {every}"
        )
    else:
        why = (
            "only 2 endpoints: the members reach etcd through these alone, and an etcd "
            f"cluster that survives the loss of a member has at least three; {every}"
        )
    yield Problem("ha.etcd.endpoints", why)
