"""Classic configs equivalent to a plan: dnsmasq.conf, haproxy.cfg and a hosts file.

They give operators a migration path from (or back to) the hand-made stack of
shared/SEED.md, and a cross-check of the plan against it. Like every service, this
module reads only the Plan, never the inventory. Output is deterministic (no
timestamps) so renders can be diffed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from ipaddress import IPv4Address

from appliance.inventory import Endpoint
from appliance.plan import (
    ARecord,
    BootFiles,
    DnsZone,
    Frontend,
    Plan,
    PtrRecord,
    SrvRecord,
    reverse_name,
)

KINDS = ("dnsmasq", "haproxy", "hosts")


def render(plan: Plan, kind: str) -> str:
    """Render one classic config (`kind` in KINDS) for the plan."""
    renderer = _RENDERERS.get(kind)
    if renderer is None:
        raise ValueError(f"unknown config kind {kind!r} (one of: {', '.join(KINDS)})")
    return renderer(plan)


def _header(plan: Plan, what: str) -> str:
    return f"# {what} for {plan.domain}, rendered by appliance from {plan.source}"


def _lines(lines: Iterable[str]) -> str:
    return "\n".join(lines) + "\n"


# --- DNS data shared by hosts and dnsmasq ----------------------------------------------


def _forward_zone(plan: Plan) -> DnsZone:
    return next(z for z in plan.dns.zones if z.origin == plan.dns.domain)


def _ptr_targets(plan: Plan) -> dict[str, set[str]]:
    """Reverse name -> the names its PTR records answer."""
    out: dict[str, set[str]] = {}
    for zone in plan.dns.zones:
        for rec in zone.records:
            if isinstance(rec, PtrRecord):
                out.setdefault(rec.name, set()).add(rec.target)
    return out


def host_entries(plan: Plan) -> list[tuple[IPv4Address, tuple[str, ...]]]:
    """Names per address as a hosts file lists them, sorted by address.

    Within a line the node's FQDN comes first (OpenShift takes the hostname from the
    reverse lookup, and hosts-file readers use the first name for it), then the other
    PTR targets, then the remaining names; ties sort by name.
    """
    names: dict[IPv4Address, list[str]] = {}
    for rec in _forward_zone(plan).records:
        if isinstance(rec, ARecord) and not rec.name.startswith("*."):
            names.setdefault(rec.address, []).append(rec.name)
    ptrs = _ptr_targets(plan)
    fqdn = {n.ip: n.fqdn for n in plan.nodes}

    def order(ip: IPv4Address) -> Callable[[str], tuple[bool, bool, str]]:
        targets = ptrs.get(reverse_name(ip), set())
        return lambda name: (name != fqdn.get(ip), name not in targets, name)

    return [(ip, tuple(sorted(n, key=order(ip)))) for ip, n in sorted(names.items())]


def _wildcards(plan: Plan) -> list[tuple[str, IPv4Address]]:
    """(`apps.<domain>`, address) for each `*.apps.<domain>` style record."""
    return [
        (rec.name.removeprefix("*."), rec.address)
        for rec in _forward_zone(plan).records
        if isinstance(rec, ARecord) and rec.name.startswith("*.")
    ]


def _srv_records(plan: Plan) -> list[SrvRecord]:
    return [r for r in _forward_zone(plan).records if isinstance(r, SrvRecord)]


# --- hosts ---------------------------------------------------------------------------------


def render_hosts(plan: Plan) -> str:
    """An /etc/hosts (or dnsmasq addn-hosts) file with the plan's A records."""
    lines = [_header(plan, "hosts entries")]
    lines += [f"{ip} {' '.join(names)}" for ip, names in host_entries(plan)]
    # A hosts file cannot say "any name below"; say where it went instead of dropping it.
    lines += [
        f"# *.{name} -> {ip} is a wildcard: a hosts file cannot hold it (dnsmasq: address=)"
        for name, ip in _wildcards(plan)
    ]
    return _lines(lines)


# --- dnsmasq -------------------------------------------------------------------------------

# PXE client architectures (DHCP option 93, RFC 4578 and its IANA registry):
# (code, dnsmasq's pxe-service CSA name, loader kind). 7 and 9 are both x86-64 UEFI
# in practice (RFC 4578 errata), so they share a loader.
_ARCHES = (
    (0, "x86PC", "bios"),
    (7, "BC_EFI", "efi-x64"),
    (9, "x86-64_EFI", "efi-x64"),
    (11, "ARM64_EFI", "efi-arm64"),
)
_LOADER_KINDS = ("bios", "efi-x64", "efi-arm64")


def _loader_file(files: BootFiles, kind: str) -> str:
    return {"bios": files.bios, "efi-x64": files.uefi_x64, "efi-arm64": files.uefi_arm64}[kind]


def _loader_for(firmware: str, arch_kind: str) -> str:
    """The loader kind a client gets: a node's pinned firmware wins over option 93."""
    if firmware == "bios":
        return "bios"
    if firmware == "uefi" and arch_kind == "bios":
        return "efi-x64"
    return arch_kind


def _boot_rules(plan: Plan, arch_kind: str) -> list[tuple[tuple[str, ...], str]]:
    """(extra tags, loader kind) for clients of one architecture, mutually exclusive.

    Nodes with pinned firmware carry a `fw-<firmware>` tag from their dhcp-host line;
    only pins that change the answer get their own rule.
    """
    pinned = sorted({r.firmware for r in plan.dhcp.reservations} - {"auto"})
    differing = [fw for fw in pinned if _loader_for(fw, arch_kind) != arch_kind]
    rules: list[tuple[tuple[str, ...], str]]
    rules = [((f"fw-{fw}",), _loader_for(fw, arch_kind)) for fw in differing]
    rules.append((tuple(f"!fw-{fw}" for fw in differing), arch_kind))
    return rules


def _tags(tags: Iterable[str]) -> str:
    return "".join(f"tag:{t}," for t in tags)


def _dnsmasq_listen(plan: Plan) -> list[str]:
    # dnsmasq shares its sockets' addresses between DNS, DHCP and TFTP: list them all.
    eps = [plan.listen.get(svc) for svc in ("dns", "dhcp", "tftp")]
    hosts = sorted({ep.host for ep in eps if ep is not None and not ep.is_wildcard})
    lines = [f"interface={plan.dhcp.interface}"] if plan.dhcp.interface else []
    lines += [f"listen-address={host}" for host in hosts]
    if lines:
        lines.append("bind-interfaces")
    return lines


def _upstream(ep: Endpoint) -> str:
    return f"server={ep.host}" if ep.port == 53 else f"server={ep.host}#{ep.port}"


def _dnsmasq_dns(plan: Plan) -> list[str]:
    dns = plan.dns
    if dns.listen is None:
        return ["# DNS is off in the plan", "port=0"]
    lines = [f"port={dns.listen.port}", "no-hosts"]  # the plan's names only, not this host's
    lines += [f"local=/{zone.origin}/" for zone in dns.zones]
    lines.append(f"local-ttl={dns.ttl}")
    # Empty upstreams mean "no forwarding": without no-resolv dnsmasq would use resolv.conf.
    lines.append("no-resolv")
    lines += [_upstream(ep) for ep in dns.upstreams]
    if dns.upstreams:
        allowed = ", ".join(str(n) for n in dns.forward_allowed)
        lines.append(f"# the plan forwards only for {allowed}; dnsmasq cannot restrict that")
    # host-record gives A and PTR; its first name is the one a reverse lookup returns.
    lines += [f"host-record={','.join(names)},{ip}" for ip, names in host_entries(plan)]
    # address=/d/ also answers d itself, a name the plan leaves without records.
    lines += [f"address=/{name}/{ip}" for name, ip in _wildcards(plan)]
    lines += [
        f"srv-host={r.name},{r.target},{r.port},{r.priority},{r.weight}" for r in _srv_records(plan)
    ]
    return lines


def _dhcp_range(plan: Plan) -> str:
    dhcp = plan.dhcp
    net, mask = dhcp.subnet.network_address, dhcp.subnet.netmask
    if dhcp.mode == "proxy":
        return f"dhcp-range={net},proxy,{mask}"
    if dhcp.pool is None:
        return f"dhcp-range={net},static,{mask},{dhcp.lease_time}"
    first, last = dhcp.pool
    return f"dhcp-range={first},{last},{mask},{dhcp.lease_time}"


def _dhcp_host(plan: Plan) -> list[str]:
    lines = []
    for r in plan.dhcp.reservations:
        pin = f"set:fw-{r.firmware}," if r.firmware != "auto" else ""
        lines.append(f"dhcp-host={r.mac},{pin}{r.ip},{r.hostname}")
    return lines


def _dhcp_options(plan: Plan) -> list[str]:
    dhcp = plan.dhcp
    lines = ["dhcp-authoritative"]
    # dnsmasq leases at most 1,000 addresses unless told: room for the pool and every node.
    pool = int(dhcp.pool[1]) - int(dhcp.pool[0]) + 1 if dhcp.pool else 0
    lines.append(f"dhcp-lease-max={max(1000, pool + len(dhcp.reservations))}")
    if dhcp.pool and dhcp.ping_wait == 0:
        lines.append("no-ping")  # pool addresses offered without a ping first, as here
    if dhcp.router is not None:
        lines.append(f"dhcp-option=option:router,{dhcp.router}")
    lines.append(f"dhcp-option=option:dns-server,{','.join(map(str, dhcp.dns_servers))}")
    if dhcp.ntp_servers:
        lines.append(f"dhcp-option=option:ntp-server,{','.join(map(str, dhcp.ntp_servers))}")
    lines.append(f"dhcp-option=option:domain-name,{dhcp.domain}")
    return lines


def _pxe_server(plan: Plan) -> list[str]:
    """Server mode: dhcp-boot by loader kind, and the script URL for iPXE."""
    files, server = plan.dhcp.boot_files, plan.dhcp.next_server
    lines = [f"dhcp-match=set:{kind},option:client-arch,{code}" for code, _, kind in _ARCHES]
    lines.append("dhcp-userclass=set:ipxe,iPXE")
    lines.append(f"dhcp-boot=tag:ipxe,{files.ipxe_script_url}")
    for kind in _LOADER_KINDS:
        for tags, loader in _boot_rules(plan, kind):
            tagged = _tags(("!ipxe", kind, *tags))
            lines.append(f"dhcp-boot={tagged}{_loader_file(files, loader)},,{server}")
    return lines


def _pxe_proxy(plan: Plan) -> list[str]:
    """proxyDHCP: dnsmasq answers PXE clients from pxe-service, per client architecture."""
    files, server = plan.dhcp.boot_files, plan.dhcp.next_server
    lines = ["dhcp-userclass=set:ipxe,iPXE"]
    for _, csa, kind in _ARCHES:
        lines.append(f'pxe-service=tag:ipxe,{csa},"iPXE script",{files.ipxe_script_url}')
        for tags, loader in _boot_rules(plan, kind):
            tagged = _tags(("!ipxe", *tags))
            file = _loader_file(files, loader)
            lines.append(f'pxe-service={tagged}{csa},"{file}",{file},{server}')
    return lines


def _dnsmasq_dhcp(plan: Plan) -> list[str]:
    dhcp = plan.dhcp
    if dhcp.listen is None:
        return ["# DHCP is off in the plan"]
    lines = ["log-dhcp"]
    if dhcp.listen.port != 67:
        lines.append(f"dhcp-alternate-port={dhcp.listen.port}")  # client port = this + 1
    lines.append(_dhcp_range(plan))
    lines += _dhcp_host(plan)
    if dhcp.pool is None:
        lines.append("dhcp-ignore=tag:!known")  # without a pool, inventory MACs only
    if dhcp.mode == "server":
        lines += _dhcp_options(plan)
        lines += _pxe_server(plan)
    else:
        lines += _pxe_proxy(plan)
    if plan.boot.after_install == "localboot":
        lines.append("# the appliance boots installed nodes from disk; this config reinstalls them")
    return lines


def _dnsmasq_tftp(plan: Plan) -> list[str]:
    ep = plan.listen.get("tftp")
    if ep is None:
        return ["# TFTP is off in the plan"]
    lines = ["enable-tftp", f"tftp-root={plan.boot.tftp_root}"]
    if ep.port != 69:
        lines.insert(0, f"# dnsmasq serves TFTP on port 69 only; the plan listens on {ep}")
    return lines


def render_dnsmasq(plan: Plan) -> str:
    """A dnsmasq.conf doing the plan's DNS, DHCP/PXE and TFTP."""
    lines = [_header(plan, "dnsmasq.conf"), *_dnsmasq_listen(plan), f"domain={plan.domain}"]
    lines += ["", "# --- DNS", *_dnsmasq_dns(plan)]
    lines += ["", "# --- DHCP and PXE", *_dnsmasq_dhcp(plan)]
    lines += ["", "# --- TFTP", *_dnsmasq_tftp(plan)]
    return _lines(lines)


# --- haproxy -------------------------------------------------------------------------------

_HAPROXY_HEAD = """\
global
    log stdout format raw local0

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    # a failed connect is retried on another backend, as the appliance's proxy does
    retries 3
    option redispatch
    timeout connect 5s
    # long enough for API watches
    timeout client 1h
    timeout server 1h
    timeout check 5s"""

_RISE_FALL = "inter 2s rise 2 fall 3"  # the appliance's check interval and thresholds
INGRESS_HEALTH_PORT = 1936  # the OpenShift router's health endpoint, plain HTTP

# How the appliance's proxy checks each pool: HTTP GET, expecting 200. The API and the
# machine-config server answer over TLS with the cluster's own CA, hence "verify none";
# the router answers plain HTTP on its stats port, not on the traffic port.
_TLS_CHECK = "check check-ssl verify none"
_HEALTH = {
    "api": ("GET /readyz", _TLS_CHECK),
    "machine_config": ("GET /healthz", _TLS_CHECK),
    "ingress_http": ("GET /healthz/ready", f"check port {INGRESS_HEALTH_PORT}"),
    "ingress_https": ("GET /healthz/ready", f"check port {INGRESS_HEALTH_PORT}"),
}


def _haproxy_proxy(fe: Frontend, listen: Endpoint) -> list[str]:
    name = fe.name.replace("_", "-")
    request, server_check = _HEALTH.get(fe.name, ("", "check"))  # unknown: TCP connect
    checks = [f"option httpchk {request}", "http-check expect status 200"] if request else []
    lines = ["", f"frontend {name}", f"    bind {listen}", f"    default_backend {name}"]
    lines += ["", f"backend {name}", "    balance roundrobin", *(f"    {c}" for c in checks)]
    lines += [
        f"    server {b.name} {b.address}:{b.port} {server_check} {_RISE_FALL}" for b in fe.backends
    ]
    return lines


def render_haproxy(plan: Plan) -> str:
    """An haproxy.cfg with one frontend and backend per enabled LB frontend of the plan."""
    lines = [_header(plan, "haproxy.cfg"), _HAPROXY_HEAD]
    for fe in plan.frontends:
        if fe.listen is not None:  # a frontend set to null is off
            lines += _haproxy_proxy(fe, fe.listen)
    return _lines(lines)


_RENDERERS: dict[str, Callable[[Plan], str]] = {
    "dnsmasq": render_dnsmasq,
    "haproxy": render_haproxy,
    "hosts": render_hosts,
}
