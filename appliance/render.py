"""Classic configs equivalent to a plan: dnsmasq.conf, haproxy.cfg and a hosts file.

They give operators a migration path from (or back to) the hand-made stack of
shared/SEED.md, and a cross-check of the plan against it. Like every service, this
module reads only the Plan, never the inventory. Output is deterministic (no
timestamps) so renders can be diffed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network

from appliance.inventory import Endpoint
from appliance.plan import (
    ARecord,
    BootFiles,
    DnsZone,
    Frontend,
    HealthCheck,
    NsRecord,
    Plan,
    PtrRecord,
    SrvRecord,
    reverse_name,
)

KINDS = ("dnsmasq", "haproxy", "hosts", "rbac")


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


def _origin_net(origin: str) -> IPv4Network:
    """The subnet a reverse zone covers: 3.33.10.in-addr.arpa -> 10.33.3.0/24."""
    octets = origin.removesuffix(".in-addr.arpa").split(".")[::-1]
    return IPv4Network(f"{'.'.join(octets + ['0'] * (4 - len(octets)))}/{8 * len(octets)}")


def _name_server(plan: Plan) -> tuple[str, IPv4Address | None]:
    """The forward zone's NS name and its address."""
    zone = _forward_zone(plan)
    ns = next((r.target for r in zone.records if isinstance(r, NsRecord)), zone.soa.mname)
    address = next(
        (r.address for r in zone.records if isinstance(r, ARecord) and r.name == ns), None
    )
    return ns, address


def _dnsmasq_authority(plan: Plan) -> list[str]:
    """auth-zone/auth-server/auth-soa: SOA and NS, AA set, SOA on negative answers."""
    dns = plan.dns
    assert dns.listen is not None
    forward = _forward_zone(plan)
    soa = forward.soa
    ns, ns_address = _name_server(plan)
    nets = [str(_origin_net(z.origin)) for z in dns.zones if z.origin.endswith(".in-addr.arpa")]
    # dnsmasq answers authoritatively (AA, SOA/NS) only queries that arrive at an auth-server
    # address, and there it never forwards.
    if dns.upstreams:
        where = ""
        lines = [
            "# with upstreams, queries must also be forwarded, which dnsmasq does not do at an",
            "# auth-server address: the zones are answered from the same data, but without AA",
            "# and without SOA on negative answers (the appliance sets both)",
        ]
    else:
        host = dns.listen.host if not dns.listen.is_wildcard else str(ns_address or "")
        where = f",{host}" if host else ""
        lines = []
        if dns.listen.is_wildcard:
            lines.append(
                f"# authoritative for queries to {host or 'no address'}; others get AA clear"
            )
    lines += [
        f"auth-server={ns}{where}",
        f"auth-zone={','.join([forward.origin, *nets])}",
        f"auth-soa={soa.serial},{soa.rname},{soa.refresh},{soa.retry},{soa.expire}",
        f"auth-ttl={dns.ttl}",
        f"# dnsmasq's SOA minimum and negative TTL are auth-ttl; the appliance's are {soa.minimum}",
    ]
    return lines


def _ptr_order(plan: Plan) -> dict[str, list[str]]:
    """Reverse name -> the names its PTR records answer, in plan order."""
    out: dict[str, list[str]] = {}
    for zone in plan.dns.zones:
        for rec in zone.records:
            if isinstance(rec, PtrRecord):
                out.setdefault(rec.name, []).append(rec.target)
    return out


def _dnsmasq_records(plan: Plan) -> list[str]:
    """A, PTR, wildcard and SRV records of the plan, as dnsmasq's auth zones serve them."""
    forward = _forward_zone(plan)
    names: dict[IPv4Address, list[str]] = {}
    for rec in forward.records:
        if isinstance(rec, ARecord) and not rec.name.startswith("*."):
            names.setdefault(rec.address, []).append(rec.name)
    ptrs = _ptr_order(plan)
    lines = []
    for ip, at in sorted(names.items()):
        rev = reverse_name(ip)
        targets = [t for t in ptrs.get(rev, []) if t in at]
        if not targets:
            # host-record would add a PTR the plan does not have: a bare A record instead.
            lines.append(f"# {', '.join(at)}: A {ip} without PTR")
            lines += [f"dns-rr={name},1,{ip.packed.hex()}" for name in at]
            continue
        # The first name of a host-record is the one its address's PTR answers.
        first = targets[0]
        lines.append(f"host-record={','.join([first, *(n for n in at if n != first)])},{ip}")
        if len(targets) > 1:
            also = ", ".join(targets[1:])
            lines.append(
                f"# dnsmasq answers one PTR per address: {rev} also names {also} in the appliance"
            )
    for rec in forward.records:
        if isinstance(rec, ARecord) and rec.name.startswith("*."):
            # In an auth zone dnsmasq has wildcards only as CNAMEs (address=/d/ answers d
            # itself too, and is not served there): point it at a name with the same address.
            target = next(iter(names.get(rec.address, [])), None)
            if target is None:
                lines.append(f"# {rec.name} -> {rec.address}: no name to point a CNAME at")
                continue
            lines.append(
                f"# {rec.name}: A {rec.address} in the appliance, a CNAME to {target} here"
            )
            lines.append(f"cname={rec.name},{target}")
    lines += [
        f"srv-host={r.name},{r.target},{r.port},{r.priority},{r.weight}" for r in _srv_records(plan)
    ]
    return lines


def _dnsmasq_dns(plan: Plan) -> list[str]:
    dns = plan.dns
    if dns.listen is None:
        return ["# DNS is off in the plan", "port=0"]
    lines = [f"port={dns.listen.port}", "no-hosts"]  # the plan's names only, not this host's
    lines += _dnsmasq_authority(plan)
    lines += [f"local=/{zone.origin}/" for zone in dns.zones]  # never forwarded
    # Empty upstreams mean "no forwarding": without no-resolv dnsmasq would use resolv.conf.
    lines.append("no-resolv")
    lines += [_upstream(ep) for ep in dns.upstreams]
    if dns.upstreams:
        allowed = ", ".join(str(n) for n in dns.forward_allowed)
        lines.append(f"# the plan forwards only for {allowed}; dnsmasq cannot restrict that")
    lines += _dnsmasq_records(plan)
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


def _seconds(value: float) -> str:
    """A haproxy time: whole seconds as `5s`, anything finer in milliseconds."""
    ms = max(1, round(value * 1000))  # haproxy counts in ms; 0 would mean "none"
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _haproxy_head(plan: Plan) -> list[str]:
    enabled = [fe for fe in plan.frontends if fe.listen is not None]
    stop = max((fe.stop_timeout for fe in enabled), default=0.0)
    # No global maxconn: haproxy then sizes it from the descriptor limit it can get (a fixed
    # one it cannot reach refuses to start); each frontend has its own, as in the plan.
    lines = ["global", "    log stdout format raw local0"]
    if stop > 0:
        # Graceful stop (SIGUSR1 here; SIGTERM in the appliance) lets connections finish.
        lines.append(f"    hard-stop-after {_seconds(stop)}")
    lines += [
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    option dontlognull",
        # (the default redispatches on the last retry only)
        "    # a failed connect is retried on another backend, as the appliance's proxy does",
        "    option redispatch 1",
    ]
    return lines


def _check_options(check: HealthCheck) -> tuple[list[str], str]:
    """(backend lines, server keywords) for the plan's health check of a pool."""
    lines: list[str] = []
    server = "check"
    if check.kind in ("http", "https"):
        lines = [f"option httpchk GET {check.path}", "http-check expect status 200"]
    if check.kind == "https":
        # The API and the machine-config server present the cluster's own CA.
        server += " check-ssl verify none"
    if check.port is not None:
        server += f" port {check.port}"
    server += f" inter {_seconds(check.interval)} rise {check.rise} fall {check.fall}"
    # A failed connect takes the server out at once, as in the appliance (passive check);
    # the active checks bring it back after `rise` good ones.
    server += " observe layer4 error-limit 1 on-error mark-down"
    return lines, server


def _haproxy_proxy(fe: Frontend, listen: Endpoint) -> list[str]:
    name = fe.name.replace("_", "-")
    checks, server = _check_options(fe.check)
    lines = ["", f"frontend {name}", f"    bind {listen}", f"    maxconn {fe.max_connections}"]
    lines += [f"    timeout client {_seconds(fe.idle_timeout)}", f"    default_backend {name}"]
    lines += [
        "",
        f"backend {name}",
        f"    balance {fe.balance}",
        # The appliance tries each eligible backend once.
        f"    retries {max(len(fe.backends) - 1, 0)}",
        f"    timeout connect {_seconds(fe.connect_timeout)}",
        f"    timeout server {_seconds(fe.idle_timeout)}",
        f"    timeout check {_seconds(fe.check.timeout)}",
        *(f"    {c}" for c in checks),
    ]
    lines += [f"    server {b.name} {b.address}:{b.port} {server}" for b in fe.backends]
    return lines


def render_haproxy(plan: Plan) -> str:
    """An haproxy.cfg with one frontend and backend per enabled LB frontend of the plan."""
    lines = [_header(plan, "haproxy.cfg"), *_haproxy_head(plan)]
    for fe in plan.frontends:
        if fe.listen is not None:  # a frontend set to null is off
            lines += _haproxy_proxy(fe, fe.listen)
    return _lines(lines)


def render_rbac(plan: Plan) -> str:
    """The cluster loop's least-privilege RBAC objects (built by services.cluster.rbac)."""
    from appliance import registry  # the framework names services only there

    return registry.render_rbac(plan)


_RENDERERS: dict[str, Callable[[Plan], str]] = {
    "dnsmasq": render_dnsmasq,
    "haproxy": render_haproxy,
    "hosts": render_hosts,
    "rbac": render_rbac,
}
