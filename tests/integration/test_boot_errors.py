"""Boot failures are visible: a node that asks for its kernel, initramfs, loader or
ignition and gets a 403/404 (or a TFTP error) shows up in the log, the node's timeline,
`appliance nodes` and the metrics, once per node and path however often its firmware
retries; the next progress clears it. Real clients: curl bound to a node's address
(HTTP and TFTP), scapy for an unknown machine's DISCOVER, the CLI as a subprocess.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, free_port, loopback_inventory, need_tool, write_inventory
from tests.integration.admin_env import (
    BOOTSTRAP,
    MASTER,
    WORKER,
    AdminEnv,
    discover_unknown,
    start,
)

KERNEL = "images/rhcos/installer-kernel"
INITRAMFS = "images/rhcos/installer-initramfs.img"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminEnv]:
    e = start(tmp_path_factory.mktemp("boot-errors"))
    yield e
    e.close()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def node(env: AdminEnv, name: str) -> dict[str, Any]:
    body: dict[str, Any] = env.get(f"/api/v1/nodes/{name}")
    return body


def boot_error_lines(env: AdminEnv, needle: str) -> list[str]:
    assert env.daemon is not None
    return [
        line
        for line in env.daemon.output().splitlines()
        if "WARNING" in line and "boot error" in line and needle in line
    ]


def metric(env: AdminEnv, name: str, **labels: str) -> float:
    with urllib.request.urlopen(env.admin + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def tftp_fetch(env: AdminEnv, name: str, src: str) -> int:
    """curl's TFTP client from a node's address: its exit code (0: got it, 68: not found)."""
    curl = need_tool("curl")
    host, port = env.tftp
    proc = subprocess.run(
        [curl, "-s", "-o", "/dev/null", "--interface", src, "--max-time", "10",
         f"tftp://{host}:{port}/{name}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return proc.returncode


def test_a_missing_kernel_is_one_warning_an_event_and_a_red_timeline(env: AdminEnv) -> None:
    kernel = env.base / KERNEL
    aside = kernel.with_name("moved-away")
    kernel.rename(aside)
    try:
        # A firmware that retries: five 404s, one log line, one event.
        for _ in range(5):
            assert env.fetch("/" + KERNEL, MASTER) == 404
        view = env.wait(lambda: node(env, "master-0").get("boot_error"))
        assert view["stage"] == "kernel"
        assert "/" + KERNEL in view["detail"] and "missing" in view["detail"]
        entry = next(e for e in node(env, "master-0")["timeline"] if e["stage"] == "kernel")
        assert entry["state"] == "error" and "missing" in entry["error"]
        events = [e for e in node(env, "master-0")["events"] if e["stage"] == "boot-error"]
        assert len(events) == 1 and events[0]["source"] == "http"
        lines = boot_error_lines(env, "/" + KERNEL)
        assert len(lines) == 1, lines
        assert "master-0" in lines[0] and "missing" in lines[0]
        assert metric(env, "appliance_boot_errors_total", service="http", cause="missing") == 5
        # `appliance nodes` says so, in the node's row and with the detail below.
        out = cli(env.config, "nodes")
        assert out.returncode == 0, out.stderr
        row = next(line for line in out.stdout.splitlines() if line.startswith("master-0"))
        assert "BOOT ERROR" in row
        assert any("/" + KERNEL in line and "missing" in line for line in out.stdout.splitlines())
        # The progress is still computed from the stages reached, not the error.
        assert node(env, "master-0")["progress"] == 0.0
    finally:
        aside.rename(kernel)
    # The next progress (the kernel it now gets) clears it.
    assert env.fetch("/" + KERNEL, MASTER) == 200
    env.wait(lambda: node(env, "master-0")["boot_error"] is None)
    entry = next(e for e in node(env, "master-0")["timeline"] if e["stage"] == "kernel")
    assert entry["state"] == "done"
    assert "BOOT ERROR" not in cli(env.config, "nodes").stdout


def test_a_tftp_error_on_the_initramfs_is_a_boot_error(env: AdminEnv) -> None:
    initramfs = env.base / INITRAMFS
    aside = initramfs.with_name("initramfs-aside")
    initramfs.rename(aside)
    try:
        assert tftp_fetch(env, INITRAMFS, WORKER) != 0
        assert tftp_fetch(env, INITRAMFS, WORKER) != 0
        view = env.wait(lambda: node(env, "worker-0").get("boot_error"))
        assert view["stage"] == "initramfs" and "(tftp" in view["detail"]
        assert len(boot_error_lines(env, INITRAMFS)) == 1
        assert metric(env, "appliance_boot_errors_total", service="tftp", cause="missing") == 2
    finally:
        aside.rename(initramfs)
    # A file a firmware merely probes for (pxelinux, GRUB look for many) is no boot error.
    before = len(node(env, "worker-0")["events"])
    assert tftp_fetch(env, "ldlinux.c32", WORKER) != 0
    assert tftp_fetch(env, "pxelinux.cfg/default", WORKER) in (0, 68)
    assert len(node(env, "worker-0")["events"]) == before


def test_ignition_of_another_role_names_the_node_and_the_cause(env: AdminEnv) -> None:
    # The bootstrap machine booted with master arguments: 403, and its timeline says why.
    assert env.fetch("/ignition/master.ign", BOOTSTRAP) == 403
    view = env.wait(lambda: node(env, "bootstrap").get("boot_error"))
    assert view["stage"] == "ignition" and "not the owner" in view["detail"]
    assert len(boot_error_lines(env, "/ignition/master.ign")) == 1
    # A stranger's refusal is an audit line, not a node's boot error.
    assert env.fetch("/ignition/worker.ign", "127.0.0.99") == 403
    assert not boot_error_lines(env, "/ignition/worker.ign")


def test_unknown_machines_cli_suggests_the_inventory_mac_one_digit_away(env: AdminEnv) -> None:
    discover_unknown(env, "52:54:00:00:01:50")  # master-0 is 00:50: a typo in the inventory
    discover_unknown(env, "02:00:00:aa:bb:cc")  # nothing like any node
    body = env.wait(
        lambda: (b := env.get("/api/v1/unknown-machines"))["total"] >= 2 and b, timeout=15
    )
    near = next(m for m in body["machines"] if m["mac"] == "52:54:00:00:01:50")
    assert near["closest"][0]["name"] == "master-0" and near["closest"][0]["index"] == 1
    far = next(m for m in body["machines"] if m["mac"] == "02:00:00:aa:bb:cc")
    assert far["closest"] == []
    out = cli(env.config, "unknown")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("2 unknown machines")
    assert lines[1].split()[:2] == ["MAC", "ARCH"]
    row = next(line for line in lines if line.startswith("52:54:00:00:01:50"))
    assert "uefi-x64" in row
    assert "did you mean nodes[1] master-0 52:54:00:00:00:50?" in out.stdout
    far_row = next(line for line in lines if line.startswith("02:00:00:aa:bb:cc"))
    assert "did you mean" not in far_row


@pytest.mark.root
def test_an_unreadable_kernel_is_said_so_and_is_no_kernel_stage(tmp_path: Path) -> None:
    """The daemon as a user that cannot read the files (root without CAP_DAC_OVERRIDE:
    mode 000 files are as unreadable to it as to an `appliance` user)."""
    setpriv = need_tool("setpriv")
    raw = loopback_inventory(tmp_path)
    http, tftp = free_port(), free_port(socket.SOCK_DGRAM)
    raw["listen"].update(http=f"127.0.0.1:{http}", tftp=f"127.0.0.1:{tftp}")
    for name in (KERNEL, INITRAMFS, "tftp/undionly.kpxe"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
        path.chmod(0)
    (tmp_path / "ignition").mkdir()
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--",
             sys.executable, "-m", "appliance", "run", "--config", str(config)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "serving demo.example.com" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        env = AdminEnv(
            base=tmp_path, config=config, raw=raw, admin=f"http://{raw['listen']['admin']}",
            http=f"http://127.0.0.1:{http}", dns=("", 0), dhcp=("", 0),
            tftp=("127.0.0.1", tftp), ingress=("", 0), backend=None,
        )  # fmt: skip
        assert env.fetch("/" + KERNEL, MASTER) == 403
        view = env.wait(lambda: node(env, "master-0").get("boot_error"))
        assert view["stage"] == "kernel" and "unreadable" in view["detail"], view
        assert "kernel" not in node(env, "master-0")["stages"]  # refused: not reached
        assert tftp_fetch(env, INITRAMFS, WORKER) != 0
        view = env.wait(lambda: node(env, "worker-0").get("boot_error"))
        assert view["stage"] == "initramfs" and "unreadable" in view["detail"], view
        assert "initramfs" not in node(env, "worker-0")["stages"]
        lines = [line for line in log.read_text().splitlines() if "boot error" in line]
        assert len(lines) == 2 and all("unreadable" in line for line in lines), lines
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
