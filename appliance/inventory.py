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
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from appliance.yamlio import YamlError, load_yaml

# --- reusable value checks ---------------------------------------------------

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HEX12 = re.compile(r"^[0-9a-f]{12}$")


def normalize_mac(value: Any) -> str:
    """`52-54-00-AA-bb-cc`, `5254.00aa.bbcc`, `525400aabbcc` -> `52:54:00:aa:bb:cc`."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a MAC address: write it as a quoted string")
    text = value.strip().lower()
    parts = re.split(r"[:-]", text)
    if len(parts) == 6 and all(re.fullmatch(r"[0-9a-f]{1,2}", p) for p in parts):
        digits = "".join(p.zfill(2) for p in parts)
    else:
        digits = text.replace(".", "")
        if "." in text and not re.fullmatch(r"[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}", text):
            digits = ""
    if not _HEX12.match(digits):
        raise ValueError(f"{value!r} is not a MAC address (six hex pairs separated by ':' or '-')")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


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


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed `host:port` (IPv6 as `[addr]:port`)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        return ipaddress.ip_address(self.host).is_unspecified


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


class LoadBalancer(_Strict):
    address: IPv4
    backend_ports: BackendPorts = BackendPorts()
    # Added keys (the proxy service); the defaults are HAProxy-like.
    balance: Literal["roundrobin", "leastconn", "source"] = "roundrobin"
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


class Loaders(_Strict):
    """Boot loader file names in tftp_root, per client kind (added key: boot.loaders)."""

    bios: str = "undionly.kpxe"
    uefi_x64: str = "ipxe.efi"
    uefi_arm64: str = "ipxe-arm64.efi"


class Boot(_Strict):
    tftp_root: str = "tftp"
    images_dir: str = "images"
    kernel: str = "rhcos/installer-kernel"
    initramfs: str = "rhcos/installer-initramfs.img"
    rootfs: str | None = None
    image: str | None = "rhcos/metal.raw.gz"
    install_device: str = "/dev/sda"
    kernel_args: list[str] = ["console=tty0", "console=ttyS0"]
    after_install: Literal["localboot", "reinstall"] = "localboot"
    loaders: Loaders = Loaders()


Role = Literal["bootstrap", "master", "worker"]


class Node(_Strict):
    name: Label
    role: Role
    mac: Mac
    ip: IPv4
    firmware: Literal["auto", "bios", "uefi"] = "auto"
    install_device: str | None = None
    gpu: bool = False
    kernel_args: list[str] = []


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


def _read_install_config(path: Path) -> tuple[dict[str, Any], list[Problem]]:
    where = "cluster.install_config"
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return {}, [Problem(where, f"cannot read {path}: {exc.strerror}")]
    except UnicodeDecodeError:
        return {}, [Problem(where, f"{path}: not UTF-8 text")]
    except YamlError as exc:
        return {}, [Problem(where, f"{path}: {exc}")]
    if not isinstance(data, dict):
        return {}, [Problem(where, f"{path}: not an install-config (expected a mapping)")]
    found: dict[str, Any] = {}
    meta = data.get("metadata") or {}
    if isinstance(meta, dict) and meta.get("name"):
        found["name"] = meta["name"]
    if data.get("baseDomain"):
        found["base_domain"] = data["baseDomain"]
    net = data.get("networking") or {}
    cidrs: list[str] = []
    if isinstance(net, dict):
        for entry in net.get("machineNetwork") or []:
            if isinstance(entry, dict) and entry.get("cidr"):
                cidrs.append(str(entry["cidr"]))
        if net.get("machineCIDR"):
            cidrs.append(str(net["machineCIDR"]))
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if network.version == 4:
            found["subnet"] = str(network)
            break
    return found, []


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
    # install-config.yaml supplies what the inventory leaves out; explicit keys win.
    cluster_raw = raw.get("cluster")
    ic_path = cluster_raw.get("install_config") if isinstance(cluster_raw, dict) else None
    if isinstance(ic_path, str) and ic_path:
        p = Path(ic_path).expanduser()
        found, ic_problems = _read_install_config(p if p.is_absolute() else base_dir / p)
        problems += ic_problems
        raw = dict(raw)
        cluster = dict(cluster_raw)  # type: ignore[arg-type]
        for key in ("name", "base_domain"):
            if cluster.get(key) is None and key in found:
                cluster[key] = found[key]
        raw["cluster"] = cluster
        net_raw = raw.get("network")
        if isinstance(net_raw, dict) and net_raw.get("subnet") is None and "subnet" in found:
            raw["network"] = {**net_raw, "subnet": found["subnet"]}
    try:
        inventory = Inventory.model_validate(raw)
    except ValidationError as exc:
        raise InventoryError(source, problems + _pydantic_problems(exc)) from None
    problems += list(_semantic_problems(inventory))
    problems += list(_layout_problems(inventory, base_dir))
    if problems:
        raise InventoryError(source, problems)
    return LoadedInventory(inventory, Path(source), base_dir)


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
    if masters == 0:
        yield Problem("nodes", "no node has role master (at least one is required)")

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
