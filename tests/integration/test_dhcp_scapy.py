"""The dhcp service against packets built and read by scapy, an encoder we did not write.

`appliance run` serves the article's cluster (config/dgxpod.yaml) moved onto loopback:
10.33.3.X becomes 127.0.0.X, so the appliance is 127.0.0.18, the gateway (and relay
agent) 127.0.0.1, and a pool 127.0.0.100-150 serves machines outside the inventory.
A client socket on 127.0.0.1 gets its replies back at its own address (a sender with
an address is answered there). The relay agent is a socket on the gateway address
127.0.0.1 bound to the server's port: relayed replies go to giaddr:server_port, as
from a real server to a real relay. Every request and every reply is encoded and
decoded by scapy, never by services.dhcp.codec.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import CONFIG, ROOT, free_port, write_inventory

scapy_dhcp = pytest.importorskip("scapy.layers.dhcp")
BOOTP, DHCP, DHCPOptions = scapy_dhcp.BOOTP, scapy_dhcp.DHCP, scapy_dhcp.DHCPOptions

SERVER = "127.0.0.18"
RELAY = "127.0.0.1"  # the article's gateway 10.33.3.1, moved to loopback
POOL = [f"127.0.0.{i}" for i in range(100, 151)]
NTP = [f"127.0.0.{i}" for i in range(160, 220)]  # 60 servers: 242 bytes of option 42
MASTER0 = "52:54:00:00:03:50"  # firmware: bios
WORKER0 = "02:00:00:00:03:44"  # firmware: uefi
_macs = (f"de:ad:be:ef:{i >> 8:02x}:{i & 0xFF:02x}" for i in itertools.count(1))
_xids = itertools.count(0x5C000001)


def _loopback(address: str) -> str:
    return address.replace("10.33.3.", "127.0.0.")


class Appliance:
    def __init__(self, tmp: Path) -> None:
        # The relay agent's socket first: its port becomes the server's port.
        self.relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.relay.bind((RELAY, 0))
        self.port = self.relay.getsockname()[1]
        self.http_port = free_port()
        raw: dict[str, Any] = yaml.safe_load((CONFIG / "dgxpod.yaml").read_text())
        raw["network"] = {
            "address": SERVER,
            "subnet": "127.0.0.0/24",
            "gateway": RELAY,
            "dns_servers": [SERVER, "127.0.0.53"],
            "ntp_servers": NTP,
            "dhcp_range": [POOL[0], POOL[-1]],
        }
        raw["load_balancer"]["address"] = _loopback(raw["load_balancer"]["address"])
        for node in raw["nodes"]:
            node["ip"] = _loopback(node["ip"])
        raw["listen"] = {
            "dns": None,
            "dhcp": f"{SERVER}:{self.port}",
            "tftp": None,
            "http": f"{SERVER}:{self.http_port}",
            "api": None,
            "machine_config": None,
            "ingress_http": None,
            "ingress_https": None,
            "admin": f"127.0.0.1:{free_port()}",
        }
        raw["state_dir"] = str(tmp / "state")
        for folder in ("ignition", "tftp", "images"):
            (tmp / folder).mkdir()
        self.log_path = tmp / "appliance.log"
        config = write_inventory(tmp / "dgxpod.yaml", raw)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "run", "--config", str(config)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while "serving" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"appliance did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.relay.close()


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    app = Appliance(tmp_path_factory.mktemp("dhcp-scapy"))
    yield app
    app.close()


@pytest.fixture
def client() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


# --- scapy on both ends ---------------------------------------------------------------


def request(
    kind: str,
    mac: str,
    options: Sequence[tuple[Any, ...]] = (),
    **bootp: Any,
) -> Any:
    bootp.setdefault("xid", next(_xids))
    return BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")), **bootp) / DHCP(
        options=[("message-type", kind), *options, "end"]
    )


def exchange(sock: socket.socket, pkt: Any, port: int, timeout: float = 3.0) -> Any:
    """Send one scapy packet to the appliance; return the scapy-decoded reply to it."""
    sock.sendto(bytes(pkt), (SERVER, port))
    sock.settimeout(timeout)
    while True:
        data, _ = sock.recvfrom(4096)
        reply = BOOTP(data)
        if reply.xid == pkt[BOOTP].xid:
            return reply


def silence(sock: socket.socket, pkt: Any, port: int, wait: float = 0.5) -> None:
    sock.sendto(bytes(pkt), (SERVER, port))
    sock.settimeout(wait)
    with pytest.raises(TimeoutError):
        while True:
            data, _ = sock.recvfrom(4096)
            assert BOOTP(data).xid != pkt[BOOTP].xid, "a reply where none was due"


def opts(reply: Any) -> dict[Any, Any]:
    """Option name (or code, where scapy has no name) -> value, or a tuple for lists."""
    out: dict[Any, Any] = {}
    for item in reply[DHCP].options:
        if isinstance(item, tuple):
            out[item[0]] = item[1] if len(item) == 2 else tuple(item[1:])
    return out


def names(reply: Any) -> list[Any]:
    return [o[0] for o in reply[DHCP].options if isinstance(o, tuple)]


def name_of(code: int) -> Any:
    known = DHCPOptions.get(code)
    return code if known is None else known if isinstance(known, str) else known.name


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def file_of(reply: Any) -> str:
    return bytes(reply.file).rstrip(b"\0").decode()


def dora(
    sock: socket.socket, port: int, mac: str, options: list[tuple[Any, ...]], **bootp: Any
) -> tuple[Any, Any]:
    offer = exchange(sock, request("discover", mac, options, **bootp), port)
    assert opts(offer)["message-type"] == 2  # OFFER
    chosen = [("server_id", SERVER), ("requested_addr", offer.yiaddr), *options]
    ack = exchange(sock, request("request", mac, chosen, **bootp), port)
    return offer, ack


def pxe(arch: int, vendor: str = "PXEClient") -> list[tuple[Any, ...]]:
    return [
        ("vendor_class_id", f"{vendor}:Arch:{arch:05d}:UNDI:003016".encode()),
        ("pxe_client_architecture", arch.to_bytes(2, "big")),
        ("pxe_client_machine_identifier", b"\x00" + bytes(range(16))),
    ]


# --- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "loader"),
    [
        (0, "undionly.kpxe"),  # BIOS
        (6, None),  # UEFI IA32: no loader configured for it, so no boot file
        (7, "ipxe.efi"),  # UEFI x64 (EFI BC)
        (9, "ipxe.efi"),  # UEFI x64
        (11, "ipxe-arm64.efi"),  # UEFI arm64
    ],
)
def test_pxe_loader_for_every_architecture(
    appliance: Appliance, client: socket.socket, arch: int, loader: str | None
) -> None:
    offer, ack = dora(client, appliance.port, next(_macs), pxe(arch))
    for reply in (offer, ack):
        o = opts(reply)
        assert reply.op == 2 and reply.yiaddr in POOL and reply.yiaddr == offer.yiaddr
        if loader is None:
            assert file_of(reply) == "" and "boot-file-name" not in o
            continue
        assert file_of(reply) == loader and text(o["boot-file-name"]) == loader
        assert reply.siaddr == SERVER and text(o["tftp_server_name"]) == SERVER
        assert "vendor_class_id" not in o  # TFTP boot: no HTTPClient
    assert opts(ack)["message-type"] == 5  # ACK


@pytest.mark.parametrize(("arch", "loader"), [(16, "ipxe.efi"), (19, "ipxe-arm64.efi")])
def test_uefi_http_boot_gets_a_url_and_httpclient_echoed(
    appliance: Appliance, client: socket.socket, arch: int, loader: str
) -> None:
    offer, ack = dora(client, appliance.port, next(_macs), pxe(arch, vendor="HTTPClient"))
    url = f"http://{SERVER}:{appliance.http_port}/boot/{loader}"
    for reply in (offer, ack):
        o = opts(reply)
        assert file_of(reply) == url and text(o["boot-file-name"]) == url
        assert o["vendor_class_id"] == b"HTTPClient"  # UEFI ignores offers without it


def test_plain_client_gets_no_boot_file(appliance: Appliance, client: socket.socket) -> None:
    offer, ack = dora(client, appliance.port, next(_macs), [("hostname", b"laptop")])
    for reply in (offer, ack):
        assert reply.yiaddr in POOL and file_of(reply) == ""
        assert "boot-file-name" not in opts(reply) and "tftp_server_name" not in opts(reply)


@pytest.mark.parametrize(
    "ipxe",
    [
        [("user_class", b"iPXE")],  # what iPXE sends: the bare string
        [("user_class", b"\x04iPXE")],  # RFC 3004 framing
        [(175, b"\x13\x01\x01\x27\x01\x01")],  # iPXE's encapsulated options only
    ],
)
def test_ipxe_gets_the_http_script(
    appliance: Appliance, client: socket.socket, ipxe: list[tuple[Any, ...]]
) -> None:
    url = f"http://{SERVER}:{appliance.http_port}/boot.ipxe"
    offer, ack = dora(client, appliance.port, next(_macs), [*pxe(7), *ipxe])
    assert file_of(offer) == file_of(ack) == url
    assert text(opts(ack)["boot-file-name"]) == url


@pytest.mark.parametrize(
    ("mac", "arch", "ip", "hostname", "loader"),
    [
        (MASTER0, 7, "127.0.0.50", "master-0", "undionly.kpxe"),  # bios node reporting UEFI
        (MASTER0, 0, "127.0.0.50", "master-0", "undionly.kpxe"),
        (WORKER0, 0, "127.0.0.44", "worker-0", "ipxe.efi"),  # DGX-1: uefi overrides BIOS
        (WORKER0, 7, "127.0.0.44", "worker-0", "ipxe.efi"),
    ],
)
def test_inventory_node_reservation_and_firmware_override(
    appliance: Appliance,
    client: socket.socket,
    mac: str,
    arch: int,
    ip: str,
    hostname: str,
    loader: str,
) -> None:
    offer, ack = dora(client, appliance.port, mac, pxe(arch))
    for reply in (offer, ack):
        o = opts(reply)
        assert reply.yiaddr == ip and file_of(reply) == loader
        assert text(o["hostname"]) == hostname and text(o["domain"]) == "dgxpod.nvidia.com"
        assert o["name_server"] == (SERVER, "127.0.0.53")
        assert o["router"] == RELAY and o["subnet_mask"] == "255.255.255.0"
        assert o["server_id"] == SERVER and o["lease_time"] == 3600
    # An init-reboot REQUEST for another address is refused: the node is reserved.
    wrong = request("request", mac, [("requested_addr", "127.0.0.99")])
    nak = exchange(client, wrong, appliance.port)
    assert opts(nak)["message-type"] == 6 and nak.yiaddr == "0.0.0.0"


def test_relay_agent_giaddr_and_option_82(appliance: Appliance) -> None:
    relay82 = b"\x01\x06eth1/7" + b"\x02\x08rack-a01"  # circuit id, remote id
    mac = next(_macs)
    pxe_opts = [*pxe(7), ("relay_agent_information", relay82)]
    bootp = {"giaddr": RELAY, "hops": 1}
    offer = exchange(appliance.relay, request("discover", mac, pxe_opts, **bootp), appliance.port)
    chosen = [("server_id", SERVER), ("requested_addr", offer.yiaddr), *pxe_opts]
    ack = exchange(appliance.relay, request("request", mac, chosen, **bootp), appliance.port)
    for reply, kind in ((offer, 2), (ack, 5)):
        assert opts(reply)["message-type"] == kind
        assert reply.giaddr == RELAY and reply.yiaddr in POOL and file_of(reply) == "ipxe.efi"
        # RFC 3046 2.2: option 82 echoed unchanged, the last option before END.
        assert names(reply)[-1] == "relay_agent_information"
        assert opts(reply)["relay_agent_information"] == relay82
    # A relay outside the subnet is not served (127.0.1.1 is loopback, outside /24).
    far = request("discover", next(_macs), pxe(7), giaddr="127.0.1.1")
    silence(appliance.relay, far, appliance.port)


def test_parameter_request_list_order(appliance: Appliance, client: socket.socket) -> None:
    asked = [15, 28, 119, 6, 12, 3, 1]
    _, ack = dora(client, appliance.port, MASTER0, [("param_req_list", asked)])
    order = names(ack)
    assert order[:2] == ["message-type", "server_id"]
    wanted = [name_of(code) for code in asked]
    assert [n for n in order if n in wanted] == wanted  # RFC 2132 9.8: the client's order
    o = opts(ack)
    assert o["broadcast_address"] == "127.0.0.255"
    assert "NTP_server" not in o  # not asked for, not sent


@pytest.mark.parametrize("limit", [None, 576, 1500])
def test_maximum_message_size(
    appliance: Appliance, client: socket.socket, limit: int | None
) -> None:
    # 60 NTP servers (option 42, 242 bytes) do not fit in a 576-byte message together
    # with the rest; with room (option 57 = 1500) they are all sent.
    options: list[tuple[Any, ...]] = [*pxe(16, vendor="HTTPClient")]
    options.append(("param_req_list", [42, 1, 3, 6, 12, 15, 119, 28, 60, 66, 67]))
    relay82 = b"\x01\x04port\x02\x06switch"
    options.append(("relay_agent_information", relay82))
    if limit is not None:
        options.append(("max_dhcp_size", limit))
    offer = exchange(
        appliance.relay,
        request("discover", WORKER0, options, giaddr=RELAY, hops=1),
        appliance.port,
    )
    size = len(bytes(offer))
    o = opts(offer)
    assert size <= max(576, limit or 576) - 28  # IP and UDP headers count (RFC 2132 9.10)
    # What the client needs to boot and to reach the relay is never what is left out.
    assert offer.yiaddr == "127.0.0.44" and text(o["hostname"]) == "worker-0"
    url = f"http://{SERVER}:{appliance.http_port}/boot/ipxe.efi"
    assert text(o["boot-file-name"]) == url and o["vendor_class_id"] == b"HTTPClient"
    assert o["relay_agent_information"] == relay82 and names(offer)[-1] == "relay_agent_information"
    if limit == 1500:
        assert o["NTP_server"] == tuple(NTP)
    else:
        assert "NTP_server" not in o
