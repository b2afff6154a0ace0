"""The e2e lab: a network namespace with a bridge, the appliance in it, hosts and taps.

One namespace (`ape2e-<pid>-<n>`) holds the bridge `br0` with the appliance's
address (192.0.2.1) and the load balancer's VIP (192.0.2.54). VMs plug into it
through tap devices made in that namespace (qemu runs there too, by `ip netns
exec`); other hosts (the API backend, the boot-storm machines) are namespaces of
their own joined to the bridge by veth pairs. Everything is TEST-NET-1.

Cleanup goes by what was made: processes by PID (SIGTERM, then SIGKILL), then the
namespaces, whose deletion takes the bridge, taps and veths with them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import CONFIG, ROOT, in_netns, wait_until, write_inventory

SERVER = "192.0.2.1"
VIP = "192.0.2.54"
GATEWAY = "192.0.2.254"
DOMAIN = "dgxpod.nvidia.com"
ADMIN = "127.0.0.1:9000"  # inside the lab namespace
_serial = itertools.count()


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return f"({path} is missing)"
    return "\n".join(text.splitlines()[-lines:])


class Lab:
    """The lab namespace with its bridge, plus every host namespace and process it made."""

    def __init__(self, workdir: Path, vip: str = VIP) -> None:
        self.workdir, self.vip = workdir, vip
        self.tag = f"{os.getpid()}-{next(_serial)}"
        self.ns = f"ape2e-{self.tag}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.hosts = 0
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        sh("ip", "netns", "add", self.ns)
        self.namespaces.append(self.ns)
        self.ip("link", "set", "lo", "up")
        # No STP and no forwarding delay: a port forwards the moment it is up, as PXE
        # firmware sends its first DISCOVER right after link up.
        self.ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.ip("addr", "add", f"{SERVER}/24", "dev", "br0")
        self.ip("addr", "add", f"{self.vip}/24", "dev", "br0")
        self.ip("link", "set", "br0", "up")

    def ip(self, *args: str) -> None:
        sh("ip", "-n", self.ns, *args)

    def exec_argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def add_tap(self, name: str) -> str:
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        self.ip("link", "set", name, "master", "br0")
        self.ip("link", "set", name, "up")
        return name

    def add_host(self, address: str | None, mac: str | None = None) -> tuple[str, str]:
        """A namespace joined to the bridge by a veth pair: (namespace, its interface)."""
        n = self.hosts
        self.hosts += 1
        ns = f"{self.ns}-h{n}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        port = f"vh{n}"
        peer = ["name", "eth0", "netns", ns]
        if mac:
            peer += ["address", mac]
        sh("ip", "-n", self.ns, "link", "add", port, "type", "veth", "peer", *peer)
        self.ip("link", "set", port, "master", "br0")
        self.ip("link", "set", port, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        if address:
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return ns, "eth0"

    def start(self, argv: list[str], log: Path, ns: str | None = None) -> subprocess.Popen[bytes]:
        """A process inside `ns` (the lab's by default); `ip netns exec` execs it, so the
        Popen PID is the process's own."""
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns or self.ns, *argv],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.processes.append(proc)
        return proc

    def get_json(self, path: str, method: str = "GET", token: str | None = None) -> Any:
        """The admin API (loopback inside the lab namespace)."""

        def call() -> Any:
            req = urllib.request.Request(f"http://{ADMIN}{path}", method=method)
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                raise AssertionError(f"{method} {path}: {err.code} {err.read()!r}") from None

        return in_netns(self.ns, call)

    def stop_process(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def close(self) -> None:
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                self.stop_process(proc)
        if self.namespaces:
            # One `ip -batch` for all (a storm has hundreds); -force goes on past errors.
            batch = "".join(f"netns del {ns}\n" for ns in reversed(self.namespaces))
            subprocess.run(
                ["ip", "-force", "-batch", "-"], input=batch, text=True, capture_output=True,
                timeout=300, check=False,
            )  # fmt: skip
            for ns in self.namespaces:  # anything the batch left behind
                if Path(f"/run/netns/{ns}").exists():
                    sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


# --- the appliance ---------------------------------------------------------------------


def dgxpod_inventory(workdir: Path, **boot: Any) -> dict[str, Any]:
    """The article's cluster (config/dgxpod.yaml) on 192.0.2.0/24, every service on."""
    raw: dict[str, Any] = yaml.safe_load((CONFIG / "dgxpod.yaml").read_text())
    raw["network"] = {
        "interface": "br0",
        "address": SERVER,
        "subnet": "192.0.2.0/24",
        "gateway": GATEWAY,
    }
    raw["load_balancer"] = {
        "address": VIP,
        "check_interval": 1.0,
        "rise": 1,
        "fall": 2,
        "connect_timeout": 2.0,
    }
    for node in raw["nodes"]:
        node["ip"] = node["ip"].replace("10.33.3.", "192.0.2.")
    raw["cluster"]["ignition_dir"] = str(workdir / "ignition")
    raw["boot"].update(
        {
            "tftp_root": str(workdir / "tftp"),
            "images_dir": str(workdir / "images"),
            **boot,
        }
    )
    raw["listen"] = {
        "dns": "0.0.0.0:53",
        "dhcp": "0.0.0.0:67",
        "tftp": "0.0.0.0:69",
        "http": "0.0.0.0:8080",
        "api": "0.0.0.0:6443",
        "machine_config": "0.0.0.0:22623",
        "ingress_http": None,
        "ingress_https": None,
        "admin": ADMIN,
    }
    # No cluster to talk to: the CSR approver and GPU bring-up stay idle.
    raw["kubernetes"] = {"approve_csrs": False, "gpu_operator": False}
    raw["state_dir"] = str(workdir / "state")
    return raw


def write_ignition(workdir: Path) -> dict[str, bytes]:
    """Distinct ignition per role, so a node is seen to get its own."""
    out: dict[str, bytes] = {}
    folder = workdir / "ignition"
    folder.mkdir(parents=True, exist_ok=True)
    for role in ("bootstrap", "master", "worker"):
        data = json.dumps(
            {"ignition": {"version": "3.2.0"}, "storage": {"files": []}, "e2e": role}
        ).encode()
        (folder / f"{role}.ign").write_bytes(data)
        out[role] = data
    return out


def install_loaders(workdir: Path) -> None:
    """Debian's iPXE builds as the appliance's boot loaders (package ipxe)."""
    tftp = workdir / "tftp"
    tftp.mkdir(parents=True, exist_ok=True)
    for name in ("ipxe.efi", "undionly.kpxe"):
        shutil.copyfile(Path("/usr/lib/ipxe") / name, tftp / name)


class Appliance:
    """`appliance run` inside the lab namespace."""

    def __init__(self, lab: Lab, raw: dict[str, Any], workdir: Path) -> None:
        self.lab, self.raw, self.workdir = lab, raw, workdir
        self.config = write_inventory(workdir / "dgxpod.yaml", raw)
        self.log_path = workdir / "appliance.log"
        self.proc = lab.start(
            [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
            self.log_path,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 30) -> None:
        def serving() -> bool:
            assert self.proc.poll() is None, f"appliance exited:\n{tail(self.log_path)}"
            return "serving" in self.log()

        wait_until(serving, timeout, "appliance serving")

    def token(self) -> str:
        return (Path(self.raw["state_dir"]) / "admin.token").read_text().strip()

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.lab.get_json("/api/v1/nodes")["nodes"]}

    def events(self, node: str) -> list[tuple[str, str, str]]:
        """(stage, detail, source) of every event of `node`, in order, read from the
        store as an operator's sqlite3 would (read-only)."""
        path = Path(self.raw["state_dir"]) / "appliance.db"
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute(
                "SELECT stage, detail, source FROM events WHERE node = ? ORDER BY id", (node,)
            ).fetchall()
        finally:
            conn.close()
        return [(str(a), str(b), str(c)) for a, b, c in rows]
