"""/metrics of `appliance run`, parsed by prometheus-client's own parser, moving with
real traffic: dnspython and dig queries, curl over HTTP and TFTP from a node's
address, a scapy DHCP exchange, TCP connections through the load balancer, a
malformed DNS packet, a reload."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import need_tool
from tests.integration.admin_env import MACS, MASTER, AdminEnv, dhcp_exchange, start

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminEnv]:
    e = start(tmp_path_factory.mktemp("metrics"))
    yield e
    e.close()


def scrape(env: AdminEnv) -> tuple[Samples, dict[str, str]]:
    status, text, headers = env.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_name_every_service(env: AdminEnv) -> None:
    samples, types = scrape(env)
    assert types["appliance_dns_queries"] == "counter"
    assert types["appliance_lb_backend_health"] == "gauge"
    assert value(samples, "appliance_uptime_seconds") > 0
    for service in ("dns", "dhcp", "tftp", "http", "proxy", "admin"):
        assert value(samples, "appliance_service_up", service=service) == 1, service
    assert value(samples, "appliance_service_up", service="cluster") in (0, 1)
    for stage in ("dhcp-offer", "kernel", "ignition", "node-ready", "gpu-validated"):
        assert ("appliance_events_total", (("stage", stage),)) in samples


def test_metrics_move_with_traffic(env: AdminEnv) -> None:
    before, _ = scrape(env)

    # DNS: dnspython over UDP and TCP, dig, a NXDOMAIN, a malformed packet.
    q = dns.message.make_query("master-0.demo.example.com", "A")
    assert dns.query.udp(q, env.dns[0], port=env.dns[1], timeout=5).rcode() == dns.rcode.NOERROR
    assert dns.query.tcp(q, env.dns[0], port=env.dns[1], timeout=5).rcode() == dns.rcode.NOERROR
    nx = dns.message.make_query("nobody.demo.example.com", "A")
    assert dns.query.udp(nx, env.dns[0], port=env.dns[1], timeout=5).rcode() == dns.rcode.NXDOMAIN
    dig = need_tool("dig")
    out = subprocess.run(
        [dig, "+short", "+time=3", "+tries=1", "-p", str(env.dns[1]), "@127.0.0.1",
         "worker-0.demo.example.com"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "127.0.0.44"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff", env.dns)
        s.settimeout(3)
        s.recv(512)  # FORMERR

    # HTTP and TFTP from master-0's address; a DHCP exchange; LB connections.
    assert env.fetch("/images/rhcos/installer-kernel", MASTER) == 200
    assert env.fetch("/images/rhcos/installer-initramfs.img", MASTER) == 200
    curl = need_tool("curl")
    subprocess.run(
        [curl, "-s", "-o", "/dev/null", "--interface", MASTER, "--max-time", "20",
         f"tftp://127.0.0.1:{env.tftp[1]}/undionly.kpxe"],
        timeout=30, check=True,
    )  # fmt: skip
    dhcp_exchange(env, MACS["master-0"])
    env.wait(lambda: value(scrape(env)[0], "appliance_lb_backend_health", frontend="ingress_http",
                           backend="worker-0", state="up") == 1)  # fmt: skip
    for _ in range(3):
        with socket.create_connection(env.ingress, timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while conn.recv(4096):
                pass
    status, _ = env.post("/api/v1/reload", env.token)
    assert status == 200
    time.sleep(0.3)  # the events reach the store
    after, _ = scrape(env)

    def moved(name: str, by: float = 1, **labels: str) -> None:
        delta = value(after, name, **labels) - value(before, name, **labels)
        assert delta >= by, (
            f"{name}{labels}: {value(before, name, **labels)} -> {value(after, name, **labels)}"
        )

    moved("appliance_dns_queries_total", 5)
    moved("appliance_dns_responses_total", 3, rcode="NOERROR")
    moved("appliance_dns_responses_total", 1, rcode="NXDOMAIN")
    moved("appliance_dns_responses_total", 1, rcode="FORMERR")
    moved("appliance_malformed_packets_total", 1, service="dns")
    moved("appliance_http_requests_total", 2)
    moved("appliance_http_bytes_total", 120_000)
    moved("appliance_tftp_transfers_total", 1, result="completed")
    moved("appliance_tftp_bytes_total", 30_000)
    moved("appliance_dhcp_packets_received_total", 2)
    moved("appliance_dhcp_messages_total", 1, type="discover")
    moved("appliance_dhcp_messages_total", 1, type="request")
    moved("appliance_dhcp_packets_sent_total", 2)
    moved("appliance_dhcp_leases_committed_total", 1)
    assert value(after, "appliance_dhcp_leases_bound") >= 1
    assert value(after, "appliance_dhcp_leases", state="bound") >= 1
    moved("appliance_lb_connections_total", 3, frontend="ingress_http")
    moved("appliance_lb_backend_connections_total", 3, frontend="ingress_http", backend="worker-0")
    moved("appliance_lb_backend_bytes_total", 3 * 18, frontend="ingress_http", backend="worker-0",
          direction="in")  # fmt: skip
    assert value(after, "appliance_lb_backend_admin_state", frontend="ingress_http",
                 backend="worker-0", state="enabled") == 1  # fmt: skip
    assert (
        "appliance_lb_backend_health",
        (("backend", "worker-0"), ("frontend", "ingress_http"), ("state", "down")),
    ) in after
    moved("appliance_events_total", 1, stage="kernel")
    moved("appliance_events_total", 1, stage="initramfs")
    moved("appliance_events_total", 1, stage="bootloader")
    moved("appliance_events_total", 1, stage="dhcp-ack")
    assert value(after, "appliance_nodes_reached", stage="kernel") >= 1
    moved("appliance_reloads_total", 1, result="ok")
