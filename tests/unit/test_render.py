"""Classic configs rendered from the plan match the article's hand-made ones (shared/SEED.md)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from appliance.inventory import load_inventory, parse_inventory
from appliance.plan import Plan, build_plan
from appliance.render import KINDS, render, render_dnsmasq, render_haproxy, render_hosts
from tests.helpers import CONFIG, dgxpod_data

D = "dgxpod.nvidia.com"

# The article's hosts file, verbatim (minus its trailing comment).
ARTICLE_HOSTS = [
    f"10.33.3.44 worker-0.{D}",
    f"10.33.3.46 worker-1.{D}",
    f"10.33.3.50 master-0.{D} etcd-0.{D}",
    f"10.33.3.51 master-1.{D} etcd-1.{D}",
    f"10.33.3.52 master-2.{D} etcd-2.{D}",
    f"10.33.3.53 bootstrap.{D}",
    f"10.33.3.54 api-int.{D} api.{D}",
]
# The article's address=/apps.../ answers apps.<domain> itself too, and dnsmasq does not
# serve it in an auth zone: the wildcard is a CNAME there.
ARTICLE_DNSMASQ = [
    f"cname=*.apps.{D},api.{D}",
    f"srv-host=_etcd-server-ssl._tcp.{D},etcd-0.{D},2380,0,10",
    f"srv-host=_etcd-server-ssl._tcp.{D},etcd-1.{D},2380,0,10",
    f"srv-host=_etcd-server-ssl._tcp.{D},etcd-2.{D},2380,0,10",
]


@pytest.fixture(scope="module")
def plan() -> Plan:
    return variant(dgxpod_data())


def variant(raw: dict[str, Any]) -> Plan:
    """The plan of an edited copy of the article's inventory."""
    return build_plan(parse_inventory(raw, "test.yaml", CONFIG))


def config_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def haproxy_sections(text: str) -> dict[str, list[str]]:
    """'frontend api' -> its stripped body lines."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(line.strip())
    return sections


# --- dispatch ----------------------------------------------------------------------


def test_render_dispatches_by_kind(plan: Plan) -> None:
    assert KINDS == ("dnsmasq", "haproxy", "hosts", "rbac")
    assert render(plan, "hosts") == render_hosts(plan)
    assert render(plan, "dnsmasq") == render_dnsmasq(plan)
    assert render(plan, "haproxy") == render_haproxy(plan)


def test_unknown_kind_is_a_clear_error(plan: Plan) -> None:
    with pytest.raises(ValueError, match="unknown config kind 'nginx'"):
        render(plan, "nginx")


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_deterministic_and_newline_terminated(plan: Plan, kind: str) -> None:
    again = variant(dgxpod_data())
    text = render(plan, kind)
    assert text == render(again, kind)
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert text.startswith("#")  # a header saying where it came from


# --- hosts ----------------------------------------------------------------------------


def test_hosts_is_the_article_hosts_file(plan: Plan) -> None:
    # Sorted by address, so the name server (the appliance) comes first.
    assert config_lines(render_hosts(plan)) == [f"10.33.3.18 ns.{D}", *ARTICLE_HOSTS]


def test_hosts_first_name_is_the_node_fqdn(plan: Plan) -> None:
    first = {line.split()[0]: line.split()[1] for line in config_lines(render_hosts(plan))}
    for node in plan.nodes:
        assert first[str(node.ip)] == node.fqdn


def test_hosts_wildcard_is_only_a_comment(plan: Plan) -> None:
    text = render_hosts(plan)
    assert "apps" not in "\n".join(config_lines(text))
    assert f"# *.apps.{D} -> 10.33.3.54" in text


def test_hosts_without_etcd_records(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["cluster"]["etcd_records"] = False
    hosts = config_lines(render_hosts(variant(dgxpod_raw)))
    assert f"10.33.3.50 master-0.{D}" in hosts
    assert not any("etcd" in line for line in hosts)


# --- dnsmasq: DNS -----------------------------------------------------------------------


def test_dnsmasq_has_the_article_lines(plan: Plan) -> None:
    lines = config_lines(render_dnsmasq(plan))
    for line in ARTICLE_DNSMASQ:
        assert line in lines


def test_dnsmasq_host_records_give_the_plans_ptrs(plan: Plan) -> None:
    text = render_dnsmasq(plan)
    lines = config_lines(text)
    records = [line.removeprefix("host-record=") for line in lines if "host-record=" in line]
    assert records == [
        f"worker-0.{D},10.33.3.44",
        f"worker-1.{D},10.33.3.46",
        f"master-0.{D},etcd-0.{D},10.33.3.50",  # first name = the PTR answer
        f"master-1.{D},etcd-1.{D},10.33.3.51",
        f"master-2.{D},etcd-2.{D},10.33.3.52",
        f"bootstrap.{D},10.33.3.53",
        f"api.{D},api-int.{D},10.33.3.54",  # dnsmasq: one PTR per address, the plan's first
    ]
    lb_ptr = "54.3.33.10.in-addr.arpa"
    assert f"one PTR per address: {lb_ptr} also names api-int.{D} in the appliance" in text
    # The name server's A has no PTR in the plan: a bare A record (host-record adds one).
    assert f"dns-rr=ns.{D},1,0a210312" in lines
    assert not any(line.startswith("address=") for line in lines)  # apps.<domain> has no A


def test_dnsmasq_is_authoritative_with_soa_and_ns(plan: Plan) -> None:
    lines = config_lines(render_dnsmasq(plan))
    soa = plan.dns.zones[0].soa
    for line in (
        f"auth-server=ns.{D},10.33.3.18",  # DNS on 0.0.0.0: the name server's address
        f"auth-zone={D},10.33.3.0/24",  # and the reverse zone of that subnet
        f"auth-soa={soa.serial},hostmaster.{D},3600,600,604800",
        "auth-ttl=60",
    ):
        assert line in lines


def test_dnsmasq_auth_server_on_the_dns_address(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["listen"] = {"dns": "10.33.3.19:53"}
    assert f"auth-server=ns.{D},10.33.3.19" in config_lines(render_dnsmasq(variant(dgxpod_raw)))


def test_dnsmasq_reverse_zones_of_a_wide_subnet_and_the_lb(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["network"]["subnet"] = "10.33.0.0/20"
    dgxpod_raw["load_balancer"]["address"] = "192.0.2.54"
    plan = variant(dgxpod_raw)
    lines = config_lines(render_dnsmasq(plan))
    nets = [f"10.33.{i}.0/24" for i in range(16)]
    assert f"auth-zone={','.join([D, *nets, '192.0.2.0/24'])}" in lines
    assert f"host-record=api.{D},api-int.{D},192.0.2.54" in lines


def test_dnsmasq_with_upstreams_forwards_and_says_it_is_not_authoritative(
    dgxpod_raw: dict[str, Any],
) -> None:
    dgxpod_raw["network"]["upstream_dns"] = ["192.0.2.53"]
    text = render_dnsmasq(variant(dgxpod_raw))
    lines = config_lines(text)
    # At an auth-server address dnsmasq never forwards: no address, the zones stay local.
    assert f"auth-server=ns.{D}" in lines
    assert "server=192.0.2.53" in lines
    assert "without AA" in text


def test_dnsmasq_dns_is_local_for_the_cluster_zones(plan: Plan) -> None:
    lines = config_lines(render_dnsmasq(plan))
    for line in (
        "port=53",
        f"domain={D}",
        f"local=/{D}/",
        "local=/3.33.10.in-addr.arpa/",
        "auth-ttl=60",
        "no-hosts",
        "no-resolv",  # no upstreams: nothing is forwarded, not even to resolv.conf
    ):
        assert line in lines
    assert not any(line.startswith("server=") for line in lines)
    assert not any(line.startswith(("listen-address=", "interface=")) for line in lines)


def test_dnsmasq_without_etcd_records(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["cluster"]["etcd_records"] = False
    text = render_dnsmasq(variant(dgxpod_raw))
    assert "etcd" not in text
    assert f"host-record=master-0.{D},10.33.3.50" in config_lines(text)


def test_dnsmasq_upstreams_with_and_without_port(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["network"]["upstream_dns"] = ["192.0.2.53", "198.51.100.53:5353"]
    lines = config_lines(render_dnsmasq(variant(dgxpod_raw)))
    servers = [line for line in lines if line.startswith("server=")]
    assert servers == ["server=192.0.2.53", "server=198.51.100.53#5353"]
    assert "no-resolv" in lines


def test_dnsmasq_dns_off(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["listen"] = {"dns": None}
    lines = config_lines(render_dnsmasq(variant(dgxpod_raw)))
    assert "port=0" in lines
    assert not any(line.startswith(("host-record=", "srv-host=", "address=")) for line in lines)
    assert f"domain={D}" in lines  # DHCP still hands out the domain


def test_dnsmasq_listen_addresses_and_ports(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["listen"] = {
        "dns": "10.33.3.18:5353",
        "dhcp": "10.33.3.18:6767",
        "tftp": "0.0.0.0:6969",
        "http": "10.33.3.18:8080",
    }
    text = render_dnsmasq(variant(dgxpod_raw))
    lines = config_lines(text)
    assert lines[:2] == ["listen-address=10.33.3.18", "bind-interfaces"]
    assert "port=5353" in lines
    assert "dhcp-alternate-port=6767" in lines
    assert "# dnsmasq serves TFTP on port 69 only; the plan listens on 0.0.0.0:6969" in text


def test_dnsmasq_interface(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["network"]["interface"] = "enp1s0f0"
    lines = config_lines(render_dnsmasq(variant(dgxpod_raw)))
    assert lines[:2] == ["interface=enp1s0f0", "bind-interfaces"]


# --- dnsmasq: DHCP and PXE ----------------------------------------------------------------


def test_dnsmasq_dhcp_server_mode(plan: Plan) -> None:
    lines = config_lines(render_dnsmasq(plan))
    for line in (
        "dhcp-range=10.33.3.0,static,255.255.255.0,3600",
        "dhcp-authoritative",
        "dhcp-ignore=tag:!known",  # no pool: inventory MACs only
        "dhcp-option=option:router,10.33.3.1",
        "dhcp-option=option:dns-server,10.33.3.18",
        f"dhcp-option=option:domain-name,{D}",
        "dhcp-host=52:54:00:00:03:50,set:fw-bios,10.33.3.50,master-0",
        "dhcp-host=02:00:00:00:03:44,set:fw-uefi,10.33.3.44,worker-0",
        "enable-tftp",
        f"tftp-root={plan.boot.tftp_root}",
    ):
        assert line in lines
    assert not any("ntp-server" in line for line in lines)
    assert not any(line.startswith("pxe-service=") for line in lines)


def test_dnsmasq_pxe_by_architecture_and_ipxe(plan: Plan) -> None:
    lines = config_lines(render_dnsmasq(plan))
    for line in (
        "dhcp-match=set:bios,option:client-arch,0",
        "dhcp-match=set:efi-x64,option:client-arch,7",
        "dhcp-match=set:efi-x64,option:client-arch,9",
        "dhcp-match=set:efi-arm64,option:client-arch,11",
        "dhcp-userclass=set:ipxe,iPXE",
        f"dhcp-boot=tag:ipxe,{plan.dhcp.boot_files.ipxe_script_url}",
    ):
        assert line in lines
    boots = [line for line in lines if line.startswith("dhcp-boot=tag:!ipxe,")]
    # Pinned firmware wins over option 93: BIOS VMs always get the BIOS loader, the DGX
    # (pinned uefi) the EFI one; each rule excludes the others, so order is irrelevant.
    assert boots == [
        "dhcp-boot=tag:!ipxe,tag:bios,tag:fw-uefi,ipxe.efi,,10.33.3.18",
        "dhcp-boot=tag:!ipxe,tag:bios,tag:!fw-uefi,undionly.kpxe,,10.33.3.18",
        "dhcp-boot=tag:!ipxe,tag:efi-x64,tag:fw-bios,undionly.kpxe,,10.33.3.18",
        "dhcp-boot=tag:!ipxe,tag:efi-x64,tag:!fw-bios,ipxe.efi,,10.33.3.18",
        "dhcp-boot=tag:!ipxe,tag:efi-arm64,tag:fw-bios,undionly.kpxe,,10.33.3.18",
        "dhcp-boot=tag:!ipxe,tag:efi-arm64,tag:!fw-bios,ipxe-arm64.efi,,10.33.3.18",
    ]


def test_dnsmasq_pxe_without_pinned_firmware() -> None:
    plan = build_plan(load_inventory(CONFIG / "example.yaml"))
    lines = config_lines(render_dnsmasq(plan))
    boots = [line for line in lines if line.startswith("dhcp-boot=")]
    assert boots == [
        "dhcp-boot=tag:ipxe,http://127.0.0.1:8080/boot.ipxe",
        "dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe,,127.0.0.1",
        "dhcp-boot=tag:!ipxe,tag:efi-x64,ipxe.efi,,127.0.0.1",
        "dhcp-boot=tag:!ipxe,tag:efi-arm64,ipxe-arm64.efi,,127.0.0.1",
    ]
    assert "dhcp-host=52:54:00:00:00:50,127.0.0.50,master-0" in lines


def test_dnsmasq_pool_and_options(dgxpod_raw: dict[str, Any]) -> None:
    net = dgxpod_raw["network"]
    net["dhcp_range"] = ["10.33.3.100", "10.33.3.150"]
    net["ntp_servers"] = ["10.33.3.1", "10.33.3.2"]
    net["dns_servers"] = ["10.33.3.18", "10.33.3.19"]
    net["lease_time"] = 600
    del net["gateway"]
    lines = config_lines(render_dnsmasq(variant(dgxpod_raw)))
    assert "dhcp-range=10.33.3.100,10.33.3.150,255.255.255.0,600" in lines
    assert "dhcp-ignore=tag:!known" not in lines  # a pool answers unknown MACs
    assert "dhcp-option=option:ntp-server,10.33.3.1,10.33.3.2" in lines
    assert "dhcp-option=option:dns-server,10.33.3.18,10.33.3.19" in lines
    assert not any("option:router" in line for line in lines)
    assert "no-ping" not in lines  # both ping a pool address before its first offer
    net["dhcp_ping_wait"] = 0
    assert "no-ping" in config_lines(render_dnsmasq(variant(dgxpod_raw)))


def test_dnsmasq_proxy_mode(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["network"]["dhcp_mode"] = "proxy"
    plan = variant(dgxpod_raw)
    lines = config_lines(render_dnsmasq(plan))
    assert "dhcp-range=10.33.3.0,proxy,255.255.255.0" in lines
    assert "dhcp-ignore=tag:!known" in lines
    # Another server leases: no authority, no network options, boot info only.
    assert "dhcp-authoritative" not in lines
    assert not any(line.startswith(("dhcp-option=", "dhcp-boot=")) for line in lines)
    url = plan.dhcp.boot_files.ipxe_script_url
    services = [line for line in lines if line.startswith("pxe-service=")]
    assert f'pxe-service=tag:ipxe,x86PC,"iPXE script",{url}' in services
    bios = 'pxe-service=tag:!ipxe,tag:!fw-uefi,x86PC,"undionly.kpxe",undionly.kpxe,10.33.3.18'
    efi = 'pxe-service=tag:!ipxe,tag:!fw-bios,x86-64_EFI,"ipxe.efi",ipxe.efi,10.33.3.18'
    assert bios in services and efi in services
    for csa in ("x86PC", "BC_EFI", "x86-64_EFI", "ARM64_EFI"):  # option 93: 0, 7, 9, 11
        assert sum(f",{csa}," in s for s in services) == 3  # iPXE, pinned, the rest


def test_dnsmasq_dhcp_and_tftp_off(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["listen"] = {"dhcp": None, "tftp": None}
    lines = config_lines(render_dnsmasq(variant(dgxpod_raw)))
    assert not any(line.startswith(("dhcp-", "pxe-", "enable-tftp", "tftp-")) for line in lines)
    assert "host-record=bootstrap.dgxpod.nvidia.com,10.33.3.53" in lines  # DNS stays


# --- haproxy --------------------------------------------------------------------------------


CONTROL = ["bootstrap", "master-0", "master-1", "master-2"]
CONTROL_IPS = ["10.33.3.53", "10.33.3.50", "10.33.3.51", "10.33.3.52"]
WORKERS = ["worker-0", "worker-1"]
WORKER_IPS = ["10.33.3.44", "10.33.3.46"]
PASSIVE = "observe layer4 error-limit 1 on-error mark-down"  # a failed connect: out at once


@pytest.mark.parametrize(
    ("name", "port", "nodes", "ips"),
    [
        ("ingress-http", 80, WORKERS, WORKER_IPS),
        ("ingress-https", 443, WORKERS, WORKER_IPS),
        ("api", 6443, CONTROL, CONTROL_IPS),
        ("machine-config", 22623, CONTROL, CONTROL_IPS),
    ],
)
def test_haproxy_has_the_article_frontends(
    plan: Plan, name: str, port: int, nodes: list[str], ips: list[str]
) -> None:
    sections = haproxy_sections(render_haproxy(plan))
    frontend = sections[f"frontend {name}"]
    assert frontend[0] == f"bind 0.0.0.0:{port}" and frontend[-1] == f"default_backend {name}"
    assert "maxconn 10000" in frontend
    servers = [
        line.split()[1:3] for line in sections[f"backend {name}"] if line.startswith("server ")
    ]
    assert servers == [[n, f"{ip}:{port}"] for n, ip in zip(nodes, ips, strict=True)]
    backend = sections[f"backend {name}"]
    # As OpenShift documents its API/ingress balancer: source for the routers.
    assert f"balance {'source' if name.startswith('ingress') else 'roundrobin'}" in backend
    assert f"retries {len(nodes) - 1}" in backend  # each backend tried once, as the appliance


def test_haproxy_defaults_and_timeouts(plan: Plan) -> None:
    sections = haproxy_sections(render_haproxy(plan))
    assert "hard-stop-after 10s" in sections["global"]
    assert not any(line.startswith("maxconn") for line in sections["global"])
    for line in ("mode tcp", "option redispatch 1"):
        assert line in sections["defaults"]
    assert not any(line.startswith("timeout") for line in sections["defaults"])
    # idle timeouts per frontend, from the plan: API watches an hour, machine-config 5 min
    for name, idle in (("api", "3600s"), ("machine-config", "300s"), ("ingress-http", "300s")):
        assert f"timeout client {idle}" in sections[f"frontend {name}"]
        backend = sections[f"backend {name}"]
        assert f"timeout server {idle}" in backend
        assert "timeout connect 5s" in backend and "timeout check 2s" in backend
    assert len([k for k in sections if k.startswith("frontend")]) == 4


@pytest.mark.parametrize(
    ("backend", "request_line", "server_check"),
    [
        ("api", "option httpchk GET /readyz", "check check-ssl verify none"),
        ("machine-config", "option httpchk GET /healthz", "check check-ssl verify none"),
        ("ingress-http", "option httpchk GET /healthz/ready", "check port 1936"),
        ("ingress-https", "option httpchk GET /healthz/ready", "check port 1936"),
    ],
)
def test_haproxy_health_checks(
    plan: Plan, backend: str, request_line: str, server_check: str
) -> None:
    body = haproxy_sections(render_haproxy(plan))[f"backend {backend}"]
    assert request_line in body
    assert "http-check expect status 200" in body
    servers = [line for line in body if line.startswith("server ")]
    assert servers
    for line in servers:
        assert line.endswith(f" {server_check} inter 2s rise 2 fall 3 {PASSIVE}")


def test_haproxy_follows_the_load_balancer_keys(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["load_balancer"].update(
        balance="leastconn",
        check_interval=0.5,
        rise=4,
        fall=5,
        connect_timeout=1.5,
        idle_timeout={"ingress_https": 120},
        max_connections=500,
        stop_timeout=0,
        ingress_check="tcp",
    )
    sections = haproxy_sections(render_haproxy(variant(dgxpod_raw)))
    assert "hard-stop-after" not in " ".join(sections["global"])  # stop at once
    body = sections["backend ingress-https"]
    assert "balance leastconn" in body
    for line in ("timeout connect 1500ms", "timeout server 120s", "timeout check 500ms"):
        assert line in body
    assert not any("httpchk" in line for line in body)  # a TCP connect check, on the port
    assert f"server worker-0 10.33.3.44:443 check inter 500ms rise 4 fall 5 {PASSIVE}" in body
    assert sections["frontend ingress-https"][1:3] == ["maxconn 500", "timeout client 120s"]
    assert "option httpchk GET /readyz" in sections["backend api"]  # the API stays HTTPS
    dgxpod_raw["load_balancer"]["balance"] = "source"
    assert "balance source" in haproxy_sections(render_haproxy(variant(dgxpod_raw)))["backend api"]


def test_haproxy_custom_binds_and_backend_ports(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["listen"] = {"api": "10.33.3.54:6443", "ingress_http": None}
    dgxpod_raw["load_balancer"]["backend_ports"] = {"ingress_https": 8443}
    sections = haproxy_sections(render_haproxy(variant(dgxpod_raw)))
    assert "bind 10.33.3.54:6443" in sections["frontend api"]
    assert "frontend ingress-http" not in sections and "backend ingress-http" not in sections
    assert "bind 0.0.0.0:443" in sections["frontend ingress-https"]
    server = f"server worker-0 10.33.3.44:8443 check port 1936 inter 2s rise 2 fall 3 {PASSIVE}"
    assert server in sections["backend ingress-https"]


def test_haproxy_ingress_on_masters_without_workers(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["nodes"] = [n for n in dgxpod_raw["nodes"] if n["role"] != "worker"]
    body = haproxy_sections(render_haproxy(variant(dgxpod_raw)))["backend ingress-http"]
    assert [line.split()[1] for line in body if line.startswith("server ")] == CONTROL[1:]


def test_haproxy_ipv6_bind(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["listen"] = {"api": "[::]:6443"}
    assert "bind [::]:6443" in haproxy_sections(render_haproxy(variant(dgxpod_raw)))["frontend api"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2.0, "2s"), (0.25, "250ms"), (300, "300s"), (1.0006, "1001ms"), (0.0001, "1ms")],
)
def test_haproxy_times(dgxpod_raw: dict[str, Any], seconds: float, text: str) -> None:
    dgxpod_raw["load_balancer"]["connect_timeout"] = seconds
    body = haproxy_sections(render_haproxy(variant(dgxpod_raw)))["backend api"]
    assert f"timeout connect {text}" in body


def without_backends(plan: Plan) -> Plan:
    empty = tuple(dataclasses.replace(fe, backends=()) for fe in plan.frontends)
    return dataclasses.replace(plan, frontends=empty)


def test_haproxy_frontend_without_backends_keeps_its_backend(plan: Plan) -> None:
    sections = haproxy_sections(render_haproxy(without_backends(plan)))
    assert sections["backend api"] == [
        "balance roundrobin",
        "retries 0",
        "timeout connect 5s",
        "timeout server 3600s",
        "timeout check 2s",
        "option httpchk GET /readyz",
        "http-check expect status 200",
    ]


def test_haproxy_balance_per_frontend(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["load_balancer"]["balance_per_frontend"] = {
        "api": "leastconn",
        "ingress_https": "roundrobin",
    }
    sections = haproxy_sections(render_haproxy(variant(dgxpod_raw)))
    assert "balance leastconn" in sections["backend api"]
    assert "balance roundrobin" in sections["backend machine-config"]  # default kept
    assert "balance source" in sections["backend ingress-http"]  # default kept
    assert "balance roundrobin" in sections["backend ingress-https"]


def test_explicit_balance_applies_to_every_frontend(dgxpod_raw: dict[str, Any]) -> None:
    # The contract key, when written, means every frontend; a per-frontend entry wins.
    dgxpod_raw["load_balancer"]["balance"] = "roundrobin"
    dgxpod_raw["load_balancer"]["balance_per_frontend"] = {"api": "source"}
    sections = haproxy_sections(render_haproxy(variant(dgxpod_raw)))
    assert "balance source" in sections["backend api"]
    for name in ("machine-config", "ingress-http", "ingress-https"):
        assert "balance roundrobin" in sections[f"backend {name}"]


def test_balance_per_frontend_rejects_unknown_names(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["load_balancer"]["balance_per_frontend"] = {"ingres_http": "source"}
    with pytest.raises(Exception, match="ingres_http"):
        variant(dgxpod_raw)
    dgxpod_raw["load_balancer"]["balance_per_frontend"] = {"api": "random"}
    with pytest.raises(Exception, match="random"):
        variant(dgxpod_raw)
