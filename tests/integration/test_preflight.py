"""Preflight as an operator meets it: `appliance check` and the start of `appliance run`.

- a port held by another process (a Python child bound to it) is named with its pid, by
  `check` and in `run`'s bind error line;
- a service address that is not on this host: a warning in `check` elsewhere, a refused
  start at `run` when DHCP is on; an interface that does not exist, on the host that
  has the address: `check` exits 1;
- a boot file the daemon's user cannot read, checked as that user (`nobody`, through
  setpriv) and by root with `check --user nobody`;
- ports below 1024 without CAP_NET_BIND_SERVICE: the error names the systemd and podman
  lines; with the capability granted (ambient), no error.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT, free_port, loopback_inventory, need_tool, write_inventory

NOBODY = ["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


def _cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "appliance", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _lines(done: subprocess.CompletedProcess[str], key: str) -> list[str]:
    return [ln for ln in (done.stdout + done.stderr).splitlines() if key in ln]


class Holder:
    """A Python child process that binds a port and keeps it until killed (by PID)."""

    def __init__(self, kind: str, port: int) -> None:
        code = (
            "import socket, sys, time\n"
            f"s = socket.socket(socket.AF_INET, socket.SOCK_{kind})\n"
            f"s.bind(('127.0.0.1', {port}))\n"
            + ("s.listen(8)\n" if kind == "STREAM" else "")
            + "print('bound', flush=True)\n"
            "time.sleep(60)\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "bound\n"
        self.comm = Path(f"/proc/{self.proc.pid}/comm").read_text().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.close()


def test_a_held_port_is_named_with_its_process(tmp_path: Path, holders: list[Holder]) -> None:
    dns, http = free_port(socket.SOCK_DGRAM), free_port()
    udp, tcp = Holder("DGRAM", dns), Holder("STREAM", http)
    holders += [udp, tcp]
    raw = loopback_inventory(tmp_path)
    raw["listen"]["dns"] = f"127.0.0.1:{dns}"
    raw["listen"]["http"] = f"0.0.0.0:{http}"  # a wildcard clashes with 127.0.0.1 too
    config = write_inventory(tmp_path / "inventory.yaml", raw)

    done = _cli("check", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr  # run may still bind: a warning
    assert (
        f"warning: listen.dns: port {dns}/udp is held by {udp.comm} (pid {udp.proc.pid}): "
        "stop it, or move listen.dns elsewhere"
    ) in done.stdout, done.stdout
    assert f"listen.http: port {http}/tcp is held by {tcp.comm} (pid {tcp.proc.pid})" in (
        done.stdout
    )
    assert not _lines(done, f"port {dns}/tcp")  # DNS over TCP is free on that port

    # run: the bind fails, and its one line names the holder.
    done = _cli("run", "--config", str(config))
    assert done.returncode == 1
    [line] = _lines(done, "cannot bind")
    assert line.endswith(
        f"dns: cannot bind 127.0.0.1:{dns}: Address already in use; "
        f"port {dns}/udp is held by {udp.comm} (pid {udp.proc.pid})"
    ), line

    # The UDP holder gone, the TCP one stops the HTTP service; only TCP is named.
    holders.remove(udp)
    udp.close()
    done = _cli("run", "--config", str(config))
    assert done.returncode == 1
    [line] = _lines(done, "cannot bind")
    assert line.endswith(
        f"http: cannot bind 0.0.0.0:{http}: Address already in use; "
        f"port {http}/tcp is held by {tcp.comm} (pid {tcp.proc.pid})"
    ), line


def _elsewhere(tmp_path: Path, address: str = "198.51.100.7") -> dict[str, Any]:
    """A cluster on 198.51.100.0/24 (not this host's), DHCP on a free loopback port."""
    raw = loopback_inventory(tmp_path)
    raw["network"] = {"address": address, "subnet": "198.51.100.0/24"}
    raw["load_balancer"] = {"address": "198.51.100.54"}
    for i, node in enumerate(raw["nodes"]):
        node["ip"] = f"198.51.100.{10 + i}"
    raw["listen"]["dhcp"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    return raw


def test_an_address_not_on_this_host(tmp_path: Path) -> None:
    config = write_inventory(tmp_path / "inventory.yaml", _elsewhere(tmp_path))
    done = _cli("check", "--config", str(config))
    # check may run on another machine than the daemon: warnings, each saying run refuses
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = _lines(done, "network.address")
    assert line.startswith("warning: network.address: 198.51.100.7 is not an address of this")
    assert "`run` refuses to start" in line and "ip addr add 198.51.100.7/24" in line
    assert not _lines(done, "load_balancer.address")  # no load-balancer listener is on

    done = _cli("run", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = _lines(done, "network.address")
    assert "ERROR" in line and "198.51.100.7 is not an address of this host" in line
    assert _lines(done, "preflight: refusing to start")
    assert not _lines(done, "started")  # refused before any service bound a socket


def test_without_dhcp_a_foreign_address_is_a_warning_and_run_starts(
    tmp_path: Path, daemons: Any
) -> None:
    raw = _elsewhere(tmp_path)
    raw["listen"]["dhcp"] = None
    # No load-balancer frontend: its health checks would connect to 198.51.100.x.
    raw["listen"]["http"] = f"127.0.0.1:{free_port()}"
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    daemon = daemons(config)
    daemon.wait_for("serving")
    [line] = [ln for ln in daemon.output().splitlines() if "network.address" in ln]
    assert "WARNING" in line and "preflight: network.address: 198.51.100.7 is not" in line
    assert "nodes would fetch boot files and ignition from another machine" in line


def test_an_interface_that_is_not_here_fails_check_on_the_provisioning_host(
    tmp_path: Path,
) -> None:
    raw = loopback_inventory(tmp_path)
    raw["network"]["interface"] = "nosuch0"
    raw["listen"]["dhcp"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    done = _cli("check", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = _lines(done, "network.interface")
    assert line.startswith("error: network.interface: nosuch0 is not an interface of this host")
    assert "lo" in line


@pytest.fixture
def layout() -> Iterator[Path]:
    """Boot files in a folder every user may enter (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="appliance-preflight-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def _served(base: Path) -> Path:
    for folder in ("ignition", "images/rhcos", "tftp", "state"):
        (base / folder).mkdir(parents=True)
        (base / folder).chmod(0o755)
    for name in ("bootstrap.ign", "master.ign", "worker.ign"):
        (base / "ignition" / name).write_text("{}")
        (base / "ignition" / name).chmod(0o644)
    (base / "images/rhcos/kernel").write_bytes(b"k" * 64)
    (base / "images/rhcos/kernel").chmod(0o600)  # root's alone: the mistake
    (base / "images/rhcos/initramfs").write_bytes(b"i" * 64)
    (base / "images/rhcos/initramfs").chmod(0o644)
    (base / "images/rhcos/metal.raw.gz").write_bytes(b"")  # an interrupted download
    (base / "images/rhcos/metal.raw.gz").chmod(0o644)
    for loader in ("undionly.kpxe", "ipxe.efi"):
        (base / "tftp" / loader).write_bytes(b"l")
        (base / "tftp" / loader).chmod(0o644)
    raw = loopback_inventory(base)
    raw["cluster"]["ignition_dir"] = str(base / "ignition")
    raw["boot"] = {
        "tftp_root": str(base / "tftp"),
        "images_dir": str(base / "images"),
        "kernel": "rhcos/kernel",
        "initramfs": "rhcos/initramfs",
        "image": "rhcos/metal.raw.gz",
    }
    raw["state_dir"] = str(base / "state")
    config = write_inventory(base / "inventory.yaml", raw)
    config.chmod(0o644)
    return config


@pytest.mark.root
@pytest.mark.tool("setpriv")
def test_a_file_the_service_user_cannot_read(layout: Path) -> None:
    setpriv = need_tool("setpriv")
    config = _served(layout)
    kernel = layout / "images/rhcos/kernel"
    unreadable = (
        f"warning: boot.kernel: {kernel} is not readable by user nobody "
        "(owner root:root, mode 0600): give that user read access"
    )
    empty = f"warning: boot.image: {layout / 'images/rhcos/metal.raw.gz'} is empty (0 bytes)"

    as_nobody = _cli("check", "--config", str(config), prefix=(setpriv, *NOBODY))
    assert as_nobody.returncode == 0, as_nobody.stdout + as_nobody.stderr
    assert unreadable in as_nobody.stdout, as_nobody.stdout
    assert empty in as_nobody.stdout
    assert f"state_dir: {layout / 'state'} is not writable by user nobody" in as_nobody.stdout
    assert not _lines(as_nobody, "boot.initramfs")  # 0644: readable
    assert not _lines(as_nobody, "cluster.ignition_dir")

    # root checks for the daemon's user: the same verdict.
    for_nobody = _cli("check", "--config", str(config), "--user", "nobody")
    assert for_nobody.returncode == 0
    assert unreadable in for_nobody.stdout and empty in for_nobody.stdout
    # ... and root itself reads everything (only the empty image remains).
    as_root = _cli("check", "--config", str(config))
    assert not _lines(as_root, "boot.kernel") and empty in as_root.stdout

    # A folder on the way that the user cannot enter is named as the cause.
    (layout / "images/rhcos").chmod(0o700)
    done = _cli("check", "--config", str(config), "--user", "nobody")
    [line] = _lines(done, "boot.initramfs")
    assert f"it cannot enter {layout / 'images/rhcos'} (owner root:root, mode 0700)" in line

    bad = _cli("check", "--config", str(config), "--user", "no-such-user-here")
    assert bad.returncode == 2 and "--user no-such-user-here: no such user" in bad.stderr


@pytest.mark.root
@pytest.mark.tool("setpriv")
def test_low_ports_need_the_capability(layout: Path) -> None:
    setpriv = need_tool("setpriv")
    config = _served(layout)
    raw: dict[str, Any] = yaml.safe_load(config.read_text())
    raw["listen"]["dns"] = "127.0.0.1:53"  # checked, never bound: check only reads /proc
    write_inventory(config, raw)

    done = _cli("check", "--config", str(config), prefix=(setpriv, *NOBODY))
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = _lines(done, "CAP_NET_BIND_SERVICE")
    assert line == (
        "error: listen.dns: ports below 1024 need CAP_NET_BIND_SERVICE, which this process "
        "lacks: 53 (listen.dns); systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE; "
        "podman: --cap-add NET_BIND_SERVICE"
    )
    # run refuses before binding anything, with the same line.
    done = _cli("run", "--config", str(config), prefix=(setpriv, *NOBODY))
    assert done.returncode == 1
    assert _lines(done, "AmbientCapabilities=CAP_NET_BIND_SERVICE")
    assert not _lines(done, "cannot bind")

    granted = (
        setpriv,
        *NOBODY,
        "--inh-caps=+net_bind_service",
        "--ambient-caps=+net_bind_service",
    )
    done = _cli("check", "--config", str(config), prefix=granted)
    assert not _lines(done, "CAP_NET_BIND_SERVICE"), done.stdout + done.stderr
    assert done.returncode == 0


def test_the_shipped_example_passes_here() -> None:
    # Loopback addresses exist everywhere; unprivileged ports need no capability.
    done = _cli("check", "--config", str(ROOT / "config/example.yaml"))
    assert done.returncode == 0
    assert not [ln for ln in done.stdout.splitlines() if ln.startswith("error")]
    for key in ("network.address", "load_balancer.address", "CAP_", "upstream_dns"):
        assert not _lines(done, key), done.stdout


def test_dgxpod_forwards_to_its_site_resolver() -> None:
    done = _cli("check", "--config", str(ROOT / "config/dgxpod.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not _lines(done, "network.upstream_dns"), done.stdout


def test_a_reload_onto_a_held_port_names_the_holder(
    tmp_path: Path, daemons: Any, holders: list[Holder]
) -> None:
    raw = loopback_inventory(tmp_path)
    raw["listen"]["dns"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    daemon = daemons(config)
    daemon.wait_for("serving")
    taken = free_port(socket.SOCK_DGRAM)
    holder = Holder("DGRAM", taken)
    holders.append(holder)
    raw["listen"]["dns"] = f"127.0.0.1:{taken}"
    write_inventory(config, raw)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("reload refused")
    assert (
        f"reload refused: dns: cannot bind 127.0.0.1:{taken}: Address already in use; "
        f"port {taken}/udp is held by {holder.comm} (pid {holder.proc.pid}); "
        "keeping the running plan"
    ) in daemon.output()


def test_check_next_to_the_running_appliance_says_so(tmp_path: Path, daemons: Any) -> None:
    raw = loopback_inventory(tmp_path)
    raw["listen"]["dns"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    daemon = daemons(config)
    daemon.wait_for("serving")
    done = _cli("check", "--config", str(config))
    assert done.returncode == 0
    pid = daemon.proc.pid
    said = f"is held by appliance (pid {pid}): a running appliance: `appliance reload`"
    for key in ("dns", "admin"):
        lines = _lines(done, f"listen.{key}:")
        assert lines and all(said in line for line in lines), done.stdout
