"""`appliance import`: an inventory from an existing dnsmasq, hosts or helpernode setup.

Pure: text in, inventory data plus the lines it could not map out. The CLI reads the
files (including addn-hosts files a dnsmasq config names) and passes their text here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Any

import yaml

_ROLE_PATTERNS = (
    (re.compile(r"^bootstrap\b"), "bootstrap"),
    (re.compile(r"^(master|control-plane|controlplane|cp)-?\d*$"), "master"),
    (re.compile(r"^(worker|compute)-?\d*$"), "worker"),
)
_MAC = re.compile(r"^([0-9a-f]{2}[:-]){5}[0-9a-f]{2}$", re.I)


def role_of(name: str) -> str | None:
    """The node role a hostname implies (bootstrap, master-N, worker-N and synonyms)."""
    short = name.split(".")[0].lower()
    for pattern, role in _ROLE_PATTERNS:
        if pattern.match(short):
            return role
    return None


@dataclass
class Imported:
    """What was understood, and the source lines that were not (file:line, text)."""

    domain: str | None = None
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # short name -> node
    names: dict[str, IPv4Address] = field(default_factory=dict)  # fqdn/short -> address
    lb: IPv4Address | None = None
    etcd: bool = False
    network: dict[str, Any] = field(default_factory=dict)
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    addn_hosts: list[str] = field(default_factory=list)  # files a dnsmasq config names
    cnames: dict[str, str] = field(default_factory=dict)  # *.apps.<domain> -> target
    tftp_root: str | None = None  # where the caller looks for pxelinux.cfg/default
    boot: dict[str, Any] = field(default_factory=dict)

    def skip(self, where: str, line: str) -> None:
        self.unmapped.append((where, line))

    def node(self, name: str) -> dict[str, Any]:
        short = name.split(".")[0]
        return self.nodes.setdefault(short, {"name": short})


def _ip(text: str) -> IPv4Address | None:
    try:
        addr = ip_address(text.strip())
    except ValueError:
        return None
    return addr if isinstance(addr, IPv4Address) else None


def _lines(text: str, source: str) -> list[tuple[str, str]]:
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        # The article writes trailing "  # ..." notes; dnsmasq itself would choke on them.
        line = re.sub(r"\s+#.*$", "", raw).strip()
        if line and not line.startswith("#"):
            out.append((f"{source}:{number}", line))
    return out


def import_hosts(into: Imported, text: str, source: str) -> None:
    """An /etc/hosts style file: `IP name [name...]`."""
    for where, line in _lines(text, source):
        fields = line.split("#", 1)[0].split()
        addr = _ip(fields[0]) if fields else None
        if addr is None or len(fields) < 2:
            into.skip(where, line)
            continue
        for name in fields[1:]:
            into.names[name.lower().rstrip(".")] = addr


def import_dnsmasq(into: Imported, text: str, source: str) -> None:
    """dnsmasq.conf lines; addn-hosts files are only noted, the caller reads them."""
    handlers: dict[str, Callable[[str], bool]] = {
        "domain": lambda v: _set_domain(into, v),
        "dhcp-host": lambda v: _dhcp_host(into, v),
        "host-record": lambda v: _host_record(into, v),
        "address": lambda v: _address(into, v),
        "srv-host": lambda v: _srv(into, v),
        "dhcp-range": lambda v: _dhcp_range(into, v),
        "dhcp-option": lambda v: _dhcp_option(into, v),
        "server": lambda v: _server(into, v),
        "addn-hosts": lambda v: _addn_hosts(into, v),
        "cname": lambda v: _cname(into, v),
        "tftp-root": lambda v: _tftp_root(into, v),
    }
    for where, line in _lines(text, source):
        key, _, value = line.partition("=")
        handler = handlers.get(key.strip())
        if handler is None or not handler(value.strip()):
            into.skip(where, line)


def _tftp_root(into: Imported, value: str) -> bool:
    into.tftp_root = value.split(",")[0]
    return True


# Arguments the appliance writes itself on every boot (from the plan), so not kernel_args.
_OWN_ARGS = ("ip=", "rd.neednet=", "coreos.inst", "initrd=")


def import_pxelinux(into: Imported, text: str, source: str) -> None:
    """The article's pxelinux.cfg: kernel, initrd and the coreos.inst arguments."""
    append: list[str] = []
    in_append = False
    for where, line in _lines(text, source):
        word, _, rest = line.partition(" ")
        key = word.lower()
        if key == "kernel":
            into.boot["kernel"] = rest.strip()
        elif key == "initrd":
            into.boot["initramfs"] = rest.strip()
        elif key == "append":
            append += rest.split()
            in_append = True
            continue
        elif in_append and key not in ("label", "default", "prompt", "timeout", "menu"):
            append += line.split()  # the article wraps its append line
            continue
        elif key not in ("default", "prompt", "timeout", "label"):
            into.skip(where, line)
        in_append = False
    for arg in append:
        name, _, value = arg.partition("=")
        if name == "coreos.inst.install_dev":
            into.boot["install_device"] = value
        elif name == "coreos.inst.image_url":
            # http://host[:port]/path -> the path under the images folder
            into.boot["image"] = value.split("://", 1)[-1].partition("/")[2]
        elif not arg.startswith(_OWN_ARGS):
            into.boot.setdefault("kernel_args", []).append(arg)


def _addn_hosts(into: Imported, value: str) -> bool:
    into.addn_hosts.append(value)
    return True


def _set_domain(into: Imported, value: str) -> bool:
    into.domain = value.split(",")[0].strip().rstrip(".").lower()
    return bool(into.domain)


def _dhcp_host(into: Imported, value: str) -> bool:
    mac = ip = name = None
    firmware = None
    for part in (p.strip() for p in value.split(",")):
        if _MAC.match(part):
            mac = part.lower().replace("-", ":")
        elif part.startswith("set:fw-") and part[7:] in ("bios", "uefi"):
            firmware = part[7:]
        elif part.startswith(("set:", "tag:", "id:")) or part in ("infinite", "ignore"):
            continue
        elif (addr := _ip(part)) is not None:
            ip = addr
        elif re.fullmatch(r"\d+[smhdw]?", part):
            continue  # a lease time
        else:
            name = part
    if mac is None or ip is None or name is None:
        return False
    node = into.node(name)
    node.update(mac=mac, ip=str(ip))
    if firmware:
        node["firmware"] = firmware
    return True


def _host_record(into: Imported, value: str) -> bool:
    parts = [p.strip() for p in value.split(",")]
    addrs = [a for a in map(_ip, parts) if a is not None]
    names = [p.lower().rstrip(".") for p in parts if _ip(p) is None and not p.isdigit()]
    if len(addrs) != 1 or not names:
        return False
    for name in names:
        into.names[name] = addrs[0]
    return True


def _address(into: Imported, value: str) -> bool:
    # address=/apps.cluster.domain/10.0.0.54: the wildcard the LB serves.
    parts = value.split("/")
    if len(parts) != 3 or not parts[1].lower().startswith("apps."):
        return False
    addr = _ip(parts[2])
    if addr is None:
        return False
    into.names["*." + parts[1].lower().rstrip(".")] = addr
    return True


def _cname(into: Imported, value: str) -> bool:
    # The appliance's own render: cname=*.apps.<domain>,api.<domain>.
    parts = [p.strip().lower() for p in value.split(",")]
    if len(parts) == 2 and parts[0].startswith("*.apps."):
        into.cnames[parts[0]] = parts[1]
        return True
    return False


def _srv(into: Imported, value: str) -> bool:
    if value.lower().startswith("_etcd-server-ssl._tcp."):
        into.etcd = True
        return True
    return False


def _dhcp_range(into: Imported, value: str) -> bool:
    parts = [p.strip() for p in value.split(",") if not p.strip().startswith(("set:", "tag:"))]
    if not parts or (start := _ip(parts[0])) is None:
        return False
    rest = parts[1:]
    end = _ip(rest[0]) if rest else None
    static = bool(rest) and rest[0] == "static"
    mask = next((a for a in map(_ip, rest[1:]) if a is not None), None)
    if mask is not None:
        into.network["subnet"] = str(IPv4Network(f"{start}/{mask}", strict=False))
    if end is not None and not static:
        into.network["dhcp_range"] = [str(start), str(end)]
    elif not static:
        return False
    return True


def _dhcp_option(into: Imported, value: str) -> bool:
    parts = [p.strip() for p in value.split(",") if not p.strip().startswith(("set:", "tag:"))]
    if len(parts) < 2:
        return False
    opt, args = parts[0], parts[1:]
    addrs = [a for a in map(_ip, args) if a is not None]
    if opt in ("option:router", "3") and len(addrs) == 1:
        into.network["gateway"] = str(addrs[0])
    elif opt in ("option:dns-server", "6") and addrs:
        into.network["address"] = str(addrs[0])
    elif opt in ("option:domain-name", "15") and len(args) == 1:
        into.domain = into.domain or args[0].lower()
    else:
        return False
    return True


def _server(into: Imported, value: str) -> bool:
    addr = _ip(value.split("#")[0])
    if addr is None:
        return False  # per-domain servers (server=/x/ip) have no inventory key
    into.network.setdefault("upstream_dns", []).append(str(addr))
    return True


def import_helpernode(into: Imported, text: str, source: str) -> None:
    """The OpenShift helper-node playbooks' vars.yaml."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a YAML mapping")
    dns = data.get("dns") or {}
    if dns.get("clusterid") and dns.get("domain"):
        into.domain = f"{dns['clusterid']}.{dns['domain']}".lower()
    fwd = [str(dns[k]) for k in ("forwarder1", "forwarder2") if dns.get(k)]
    if fwd:
        into.network["upstream_dns"] = fwd
    dhcp = data.get("dhcp") or {}
    if dhcp.get("router"):
        into.network["gateway"] = str(dhcp["router"])
    if dhcp.get("ipid") and dhcp.get("netmaskid"):
        into.network["subnet"] = str(IPv4Network(f"{dhcp['ipid']}/{dhcp['netmaskid']}"))
    if dhcp.get("poolstart") and dhcp.get("poolend"):
        into.network["dhcp_range"] = [str(dhcp["poolstart"]), str(dhcp["poolend"])]
    helper = data.get("helper") or {}
    if helper.get("ipaddr"):
        into.network["address"] = str(helper["ipaddr"])
        into.lb = IPv4Address(str(helper["ipaddr"]))  # helpernode runs haproxy itself
    sections = [("bootstrap", [data["bootstrap"]] if data.get("bootstrap") else [])]
    sections += [("master", data.get("masters") or []), ("worker", data.get("workers") or [])]
    for role, entries in sections:
        for entry in entries:
            node = into.node(str(entry["name"]))
            node.update(role=role, ip=str(entry["ipaddr"]), mac=str(entry["macaddr"]).lower())
    into.etcd = True  # helpernode always serves the etcd SRV records
    known = {"bootstrap", "masters", "workers", "dhcp", "dns", "helper"}
    for key in data:
        if key not in known:
            into.skip(f"{source}", f"{key}: {data[key]!r}")


def inventory(into: Imported) -> tuple[dict[str, Any], list[str]]:
    """The inventory mapping and the comment lines for what could not be mapped."""
    notes: list[str] = []
    # A hosts file has no domain= line: the API name carries it (api.<cluster>.<base>).
    domain = into.domain or next(
        (n.removeprefix("api.") for n in sorted(into.names) if n.startswith("api.")), ""
    )
    for name, addr in into.names.items():
        short = name.removesuffix("." + domain) if domain else name
        if short.startswith("*.apps"):
            into.lb = into.lb or addr
        elif "." not in short and role_of(short) and short not in into.nodes:
            # Known only from DNS (a hosts file has no MACs): keep it, ask for the MAC.
            into.node(short)["ip"] = str(addr)
            notes.append(f"node {short}: no dhcp-host line gives its MAC; set it")
    for target in into.cnames.values():
        into.lb = into.lb or into.names.get(target)
    for api in ("api", "api-int"):
        api_addr = into.names.get(f"{api}.{domain}") or into.names.get(api)
        if api_addr is not None and into.lb is None:
            into.lb = api_addr
    for node in into.nodes.values():
        node.setdefault("role", role_of(node["name"]))
        if node["role"] is None:
            notes.append(f"node {node['name']}: role not known from its name; set it")
    name, _, base = domain.partition(".")
    out: dict[str, Any] = {"cluster": {"name": name, "base_domain": base}}
    if into.etcd:
        out["cluster"]["etcd_records"] = True
    network = {k: into.network[k] for k in sorted(into.network)}
    out["network"] = network
    if "address" not in network:
        notes.append("network.address: the provisioning host's address was not found; set it")
    if into.lb is not None:
        out["load_balancer"] = {"address": str(into.lb)}
    else:
        notes.append("load_balancer.address: no api/api-int/apps record found; set it")
    if into.boot:
        out["boot"] = dict(into.boot)
    if not {"kernel", "initramfs"} <= into.boot.keys():
        notes.append("boot: kernel and initramfs are not in these files; add a boot section")
    order = {"bootstrap": 0, "master": 1, "worker": 2}
    nodes = sorted(into.nodes.values(), key=lambda n: (order.get(n["role"], 3), n["name"]))
    keys = ("name", "role", "mac", "ip", "firmware")
    out["nodes"] = [{k: n[k] for k in keys if k in n} for n in nodes]
    notes += [f"{where}: {line}" for where, line in into.unmapped]
    return out, notes


def to_yaml(data: dict[str, Any], notes: list[str]) -> str:
    head = "# inventory imported by `appliance import`; review before use\n"
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    tail = "".join(f"# not imported: {n}\n" for n in notes)
    return head + body + tail
