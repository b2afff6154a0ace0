"""A running appliance with every service on loopback, for the admin API, CLI, metrics and
dashboard tests, and the real clients that make its nodes move.

The inventory is tests.helpers.loopback_inventory (bootstrap 127.0.0.53, master-0
127.0.0.50, worker-0 127.0.0.44 with GPUs) with dns, dhcp, tftp, http, the ingress_http frontend
and admin on free 127.0.0.1 ports. worker-0's ingress backend is a real listening
socket on 127.0.0.44 (TCP health check), so it comes up; the others stay down.
Node stages are caused by real fetches: curl bound to a node's address, DHCP packets
built by scapy (an encoder we did not write).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import Daemon, free_port, loopback_inventory, need_tool, write_inventory

MASTER, WORKER, BOOTSTRAP = "127.0.0.50", "127.0.0.44", "127.0.0.53"
MACS = {"master-0": "52:54:00:00:00:50", "worker-0": "52:54:00:00:00:44"}
KERNEL = b"K" * 70_000
INITRAMFS = b"I" * 50_000
LOADER = b"L" * 30_000


class Backend:
    """A TCP server on a node address that accepts and closes: enough for a TCP check."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 600  # bounded, whatever happens to the test
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(1)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@dataclass
class AdminEnv:
    base: Path
    config: Path
    raw: dict[str, Any]
    admin: str  # http://127.0.0.1:port
    http: str
    dns: tuple[str, int]
    dhcp: tuple[str, int]
    tftp: tuple[str, int]
    ingress: tuple[str, int]
    backend: Backend | None  # None: an env around a daemon started otherwise (test_boot_errors)
    daemon: Daemon | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return (self.base / "state" / "admin.token").read_text().strip()

    def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        req = urllib.request.Request(
            self.admin + path, method=method, data=b"" if method == "POST" else None
        )
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, body, hdrs = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            status, body, hdrs = err.code, err.read(), dict(err.headers)
        try:
            return status, json.loads(body), hdrs
        except ValueError:
            return status, body.decode(errors="replace"), hdrs

    def get(self, path: str, token: str | None = None) -> Any:
        status, body, _ = self.request("GET", path, token)
        assert status == 200, (path, status, body)
        return body

    def post(self, path: str, token: str | None = None) -> tuple[int, Any]:
        status, body, _ = self.request("POST", path, token)
        return status, body

    def fetch(self, path: str, src: str) -> int:
        """curl from a node's address (it owns that address: its fetches are its events)."""
        curl = need_tool("curl")
        proc = subprocess.run(
            [curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", src,
             "--max-time", "20", f"{self.http}{path}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        return int(proc.stdout or 0)

    def wait(self, what: Callable[[], Any], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = what()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"not within {timeout} s (last: {last!r})")

    def stages(self, node: str) -> dict[str, Any]:
        nodes = self.get("/api/v1/nodes")["nodes"]
        return dict(next(n for n in nodes if n["name"] == node)["stages"])

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.backend is not None:
            self.backend.close()


def free_udp_and_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both UDP and TCP")


def start(base: Path, **listen: str | None) -> AdminEnv:
    """Write boot files and the inventory under `base`, start `appliance run`, wait for it."""
    raw = loopback_inventory(base)
    raw["nodes"][2]["gpu"] = True  # worker-0: a DGX, so its timeline has the GPU stages
    backend = Backend(WORKER)
    udp = socket.SOCK_DGRAM
    dns, dhcp, tftp = free_udp_and_tcp_port(), free_port(udp), free_port(udp)
    http, ingress = free_port(), free_port()
    raw["listen"].update(
        dns=f"127.0.0.1:{dns}",
        dhcp=f"127.0.0.1:{dhcp}",
        tftp=f"127.0.0.1:{tftp}",
        http=f"127.0.0.1:{http}",
        ingress_http=f"127.0.0.1:{ingress}",
    )
    raw["listen"].update(listen)
    raw["load_balancer"].update(
        backend_ports={"ingress_http": backend.port}, ingress_check="tcp", check_interval=0.3
    )
    files = {
        "tftp/undionly.kpxe": LOADER,
        "images/rhcos/installer-kernel": KERNEL,
        "images/rhcos/installer-initramfs.img": INITRAMFS,
    }
    for role in ("bootstrap", "master", "worker"):
        files[f"ignition/{role}.ign"] = json.dumps({"ignition": {"version": "3.2.0"}}).encode()
    for name, content in files.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    config = write_inventory(base / "inventory.yaml", raw)
    env = AdminEnv(
        base=base,
        config=config,
        raw=raw,
        admin=f"http://{raw['listen']['admin']}",
        http=f"http://127.0.0.1:{http}",
        dns=("127.0.0.1", dns),
        dhcp=("127.0.0.1", dhcp),
        tftp=("127.0.0.1", tftp),
        ingress=("127.0.0.1", ingress),
        backend=backend,
    )
    try:
        env.daemon = Daemon(config, base / f"daemon-{os.getpid()}-{time.monotonic_ns()}.log")
        env.daemon.wait_for("serving demo.example.com", timeout=30)
    except BaseException:
        env.close()
        raise
    return env


def dhcp_exchange(env: AdminEnv, mac: str, timeout: float = 5.0) -> str:
    """DISCOVER, OFFER, REQUEST, ACK with scapy-built packets; returns the ACKed address."""
    from scapy.layers.dhcp import BOOTP, DHCP

    chaddr = bytes.fromhex(mac.replace(":", ""))
    xid = int.from_bytes(os.urandom(4), "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(timeout)

        def ask(options: list[Any], want: int) -> Any:
            pkt = BOOTP(chaddr=chaddr, xid=xid, flags=0) / DHCP(options=[*options, "end"])
            sock.sendto(bytes(pkt), env.dhcp)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                reply = BOOTP(sock.recv(4096))
                opts: dict[str, Any] = dict(o for o in reply[DHCP].options if isinstance(o, tuple))
                if reply.xid == xid and opts.get("message-type") == want:
                    return reply, opts
            raise AssertionError(f"no DHCP reply of type {want}")

        offer, opts = ask([("message-type", "discover")], 2)
        ack, _ = ask(
            [
                ("message-type", "request"),
                ("requested_addr", offer.yiaddr),
                ("server_id", opts["server_id"]),
            ],
            5,
        )
        return str(ack.yiaddr)


def discover_unknown(env: AdminEnv, mac: str) -> None:
    """A PXE DISCOVER from a MAC outside the inventory: it gets no answer."""
    from scapy.layers.dhcp import BOOTP, DHCP

    pkt = BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")), xid=7) / DHCP(
        options=[("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00007"), "end"]
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(bytes(pkt), env.dhcp)
