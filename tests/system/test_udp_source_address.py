"""UDP replies leave from the address the client asked (IP_PKTINFO), on wildcard listeners.

Two network namespaces joined by a veth pair: the server side has a primary address
192.0.2.16/24 and a secondary 192.0.2.1/24 (as an HA floating address is, or any host
whose network.address is not the interface's first). `appliance run` listens for DNS on
0.0.0.0:53 and TFTP on 0.0.0.0:69. Without IP_PKTINFO the kernel picks the reply's source
address (the primary), and a client that asked 192.0.2.1 rejects the reply: dig times out
("reply from unexpected source"), curl and tftp-hpa never see their DATA. Checked from the
client namespace: dig at either address, curl tftp:// and tftp-hpa `get` from the
secondary, and the listener's ERROR for a missing file comes from the secondary too.

The same again with the listeners on [::] (IPV6_PKTINFO): IPv6 clients, and IPv4 ones
(v4-mapped on the dual-stack socket). The server has two IPv6 addresses on one /64: the
kernel picks one of them as the source of a reply that does not choose (a tie broken by
the address list's order), so the tests ask both.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import CONFIG, ROOT, in_netns, need_tool, wait_until, write_inventory

pytestmark = pytest.mark.root

PRIMARY = "192.0.2.16"
SECONDARY = "192.0.2.1"  # network.address: what clients are told to ask
CLIENT = "192.0.2.2"
PRIMARY6 = "2001:db8::3"
SECONDARY6 = "2001:db8::1"
CLIENT6 = "2001:db8::2"
DOMAIN = "dgxpod.nvidia.com"
_serial = itertools.count()


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


class Link:
    """A server namespace (primary and secondary address) and a client namespace."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{next(_serial)}"
        self.server_ns, self.client_ns = f"apsa-{tag}-s", f"apsa-{tag}-c"
        short = f"{os.getpid() % 100000}{tag.rsplit('-', 1)[1]}"  # names: <= 15 characters
        self.server_if, self.client_if = f"aqs{short}", f"aqc{short}"
        self.made: list[str] = []
        try:
            for ns in (self.server_ns, self.client_ns):
                _run("ip", "netns", "add", ns)
                self.made.append(ns)
            _run(
                "ip", "link", "add", self.server_if, "netns", self.server_ns, "type", "veth",
                "peer", "name", self.client_if, "netns", self.client_ns,
            )  # fmt: skip
            # The first address on the subnet is the primary: the kernel's source by default.
            _run("ip", "-n", self.server_ns, "addr", "add", f"{PRIMARY}/24", "dev", self.server_if)
            _run(
                "ip", "-n", self.server_ns, "addr", "add", f"{SECONDARY}/24", "dev", self.server_if
            )
            _run("ip", "-n", self.client_ns, "addr", "add", f"{CLIENT}/24", "dev", self.client_if)
            for ns, dev, addrs in (
                (self.server_ns, self.server_if, (PRIMARY6, SECONDARY6)),
                (self.client_ns, self.client_if, (CLIENT6,)),
            ):
                for addr in addrs:  # nodad: usable at once, not "tentative" for a second
                    _run("ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", dev, "nodad")
            for ns, dev in ((self.server_ns, self.server_if), (self.client_ns, self.client_if)):
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise

    def in_client(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.client_ns, *cmd]

    def close(self) -> None:
        for ns in self.made:
            _run("ip", "netns", "del", ns, check=False)  # takes the veth pair with it


class Appliance:
    """`appliance run` in the server namespace: dns and tftp on a wildcard (`wildcard`
    is 0.0.0.0 or [::]), ports 53 and 69."""

    def __init__(self, link: Link, tmp: Path, wildcard: str) -> None:
        self.link, self.tmp, self.wildcard = link, tmp, wildcard
        raw: dict[str, Any] = yaml.safe_load((CONFIG / "dgxpod.yaml").read_text())
        raw["network"] = {
            "interface": link.server_if,
            "address": SECONDARY,
            "subnet": "192.0.2.0/24",
            "gateway": "192.0.2.254",
            "dns_servers": [SECONDARY],
        }
        raw["load_balancer"]["address"] = "192.0.2.54"
        for node in raw["nodes"]:
            node["ip"] = node["ip"].replace("10.33.3.", "192.0.2.")
        raw["listen"] = {
            "dns": f"{wildcard}:53",
            "dhcp": None,
            "tftp": f"{wildcard}:69",
            "http": None,
            "api": None,
            "machine_config": None,
            "ingress_http": None,
            "ingress_https": None,
            "admin": "127.0.0.1:9000",  # inside the server namespace
        }
        raw["state_dir"] = str(tmp / "state")
        raw.setdefault("boot", {})["tftp_root"] = str(tmp / "tftp")
        (tmp / "tftp").mkdir()
        self.content = os.urandom(3 * 512 * 40 + 17)  # many blocks, and a last short one
        (tmp / "tftp" / "file").write_bytes(self.content)
        self.config = write_inventory(tmp / "dgxpod.yaml", raw)
        self.log_path = tmp / "appliance.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return self.log_path.read_text()

    def start(self) -> None:
        with self.log_path.open("w") as log:
            # `ip netns exec` execs the command: the Popen pid is the appliance's own.
            self.proc = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.link.server_ns,
                    sys.executable, "-m", "appliance", "run", "--config", str(self.config),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

        def serving() -> bool:
            if "serving" in self.log():
                return True
            assert self.proc is not None and self.proc.poll() is None, self.log()
            return False

        wait_until(serving, 20, "'serving' in the appliance log")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def appliances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Appliance]]:
    """One link and appliance per listener wildcard, made when a test first needs it."""
    made: dict[str, Appliance] = {}
    yield made
    for app in made.values():
        try:
            app.close()
        finally:
            app.link.close()


@pytest.fixture
def served(
    appliances: dict[str, Appliance], tmp_path_factory: pytest.TempPathFactory, wildcard: str
) -> Appliance:
    if wildcard not in appliances:
        need_tool("ip")
        link = Link()
        try:
            app = Appliance(link, tmp_path_factory.mktemp("udp-source"), wildcard)
        except BaseException:
            link.close()
            raise
        appliances[wildcard] = app  # closed by `appliances`, started or not
        app.start()
    return appliances[wildcard]


def _cases(*v6: str, v4: tuple[str, ...] = (SECONDARY,)) -> pytest.MarkDecorator:
    """(listener wildcard, address asked) pairs. The [::] listener is asked on IPv6 and on
    IPv4 (v4-mapped)."""
    pairs = [(w, a) for w in ("0.0.0.0", "[::]") for a in v4] + [("[::]", a) for a in v6]
    return pytest.mark.parametrize(("wildcard", "server"), pairs)


def _url_host(server: str) -> str:
    return f"[{server}]" if ":" in server else server


def _dig(app: Appliance, server: str, *args: str) -> str:
    tool = need_tool("dig")
    cmd = app.link.in_client(tool, f"@{server}", "+time=2", "+tries=1", *args)
    out = _run(*cmd, check=False)
    return out.stdout + out.stderr


@_cases(SECONDARY6, PRIMARY6, v4=(SECONDARY, PRIMARY))
def test_dig_answers_from_the_address_asked(served: Appliance, server: str) -> None:
    out = _dig(served, server, f"master-0.{DOMAIN}")
    assert "status: NOERROR" in out, out
    assert f"SERVER: {server}#53(" in out, out
    assert "192.0.2.50" in out, out


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "[::]"])
def test_dig_many_queries_in_a_row(served: Appliance) -> None:
    """Several questions over one socket (dig +qr batches): each answer comes back."""
    names = [f"master-{i}.{DOMAIN}" for i in range(3)] + [f"worker-0.{DOMAIN}"]
    tool = need_tool("dig")
    cmd: list[str] = [tool, f"@{SECONDARY}", "+time=2", "+tries=1", "+short"]
    out = _run(*served.link.in_client(*cmd, *names), check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("192.0.2.")]
    assert len(lines) == len(names), out.stdout + out.stderr


@_cases(SECONDARY6, PRIMARY6)
def test_curl_tftp_from_the_secondary(served: Appliance, tmp_path: Path, server: str) -> None:
    tool = need_tool("curl")
    dest = tmp_path / "got"
    url = f"tftp://{_url_host(server)}/file"
    cmd = [tool, "-sS", "--max-time", "20", "-o", str(dest), url]
    out = _run(*served.link.in_client(*cmd), check=False)
    assert out.returncode == 0, out.stderr
    assert dest.read_bytes() == served.content


@_cases(SECONDARY6, PRIMARY6)
def test_tftp_hpa_get_from_the_secondary(served: Appliance, tmp_path: Path, server: str) -> None:
    tool = need_tool("tftp")
    dest = tmp_path / "got-hpa"
    cmd = [tool, "-m", "binary", server, "-c", "get", "file", str(dest)]
    out = _run(*served.link.in_client(*cmd), check=False, timeout=60)
    assert dest.exists() and dest.read_bytes() == served.content, out.stdout + out.stderr


@_cases(SECONDARY6, PRIMARY6)
def test_tftp_error_from_the_secondary(served: Appliance, server: str) -> None:
    """The listener's own ERROR (file not found) comes from the address asked too."""
    asked = server
    six = ":" in asked

    def ask() -> tuple[bytes, tuple[Any, ...]]:
        sock = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.settimeout(5)
            sock.bind((CLIENT6 if six else CLIENT, 0))
            sock.sendto(b"\x00\x01no-such-file\x00octet\x00", (asked, 69))
            data, addr = sock.recvfrom(2048)
            return data, addr
        finally:
            sock.close()

    # An unconnected socket takes a reply from any address: check where it came from.
    data, addr = in_netns(served.link.client_ns, ask)
    assert data[:2] == b"\x00\x05", data
    assert addr[0] == asked, addr
