"""The CLI client against `appliance run` (tests/integration/admin_env.py): status, nodes,
watch (plain, bounded, and on a pseudo-terminal ended by Ctrl-C), drain/disable/enable,
reload, reinstall; one clear line and exit 1 when no appliance runs."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, free_port, write_inventory
from tests.integration.admin_env import MASTER, WORKER, AdminEnv, start


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminEnv]:
    e = start(tmp_path_factory.mktemp("cli-client"))
    yield e
    e.close()


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_status(env: AdminEnv) -> None:
    proc = cli(env.config, "status")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("appliance ") and "serving demo.example.com: 3 nodes, up" in lines[0]
    assert lines[2].split() == ["SERVICE", "STATE", "LISTEN", "ACTIVITY"]
    dns = next(line for line in lines if line.startswith("dns "))
    assert "running" in dns and f"127.0.0.1:{env.dns[1]}" in dns
    as_json = json.loads(cli(env.config, "status", "--json").stdout)
    assert as_json["services"]["admin"]["state"] == "running"


def test_nodes(env: AdminEnv) -> None:
    assert env.fetch("/images/rhcos/installer-kernel", MASTER) == 200
    env.wait(lambda: "kernel" in env.stages("master-0"))
    proc = cli(env.config, "nodes")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["NODE", "ROLE", "IP", "PROGRESS"]
    master = next(line for line in lines if line.startswith("master-0"))
    assert "kernel" in master and "initramfs for" in master and "40%" in master
    assert json.loads(cli(env.config, "nodes", "--json").stdout)["nodes"][0]["name"] == "bootstrap"


def test_watch_once_and_bounded(env: AdminEnv) -> None:
    proc = cli(env.config, "watch", "--once")
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].startswith("NODE")
    t0 = time.monotonic()
    proc = cli(env.config, "watch", "--timeout", "1.5")
    assert proc.returncode == 0, proc.stderr
    assert 1.4 <= time.monotonic() - t0 < 15
    assert cli(env.config, "watch", "--count", "0").returncode == 2


def test_watch_prints_events_as_they_happen(env: AdminEnv) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "appliance", "watch", "--count", "2", "--timeout", "30",
         "--config", str(env.config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)  # the stream is open (a later start would miss nothing either)
        assert env.fetch("/boot/undionly.kpxe", WORKER) == 200
        assert env.fetch("/images/rhcos/installer-initramfs.img", MASTER) == 200
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    events = [line.split() for line in out.splitlines() if line[:2].isdigit()]
    assert [e[1:3] for e in events] == [["worker-0", "bootloader"], ["master-0", "initramfs"]]


def test_watch_on_a_terminal_ends_cleanly_on_ctrl_c(env: AdminEnv) -> None:
    """A pseudo-terminal: the screen is redrawn, Ctrl-C (SIGINT) exits 0 and shows the cursor."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "watch", "--timeout", "60", "--config",
         str(env.config)],
        cwd=ROOT, stdin=follower, stdout=follower, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    out = b""
    try:
        deadline = time.monotonic() + 20
        while out.count(b"\x1b[2J") < 2 and time.monotonic() < deadline:  # two frames
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                out += os.read(leader, 65536)
        assert out.count(b"\x1b[2J") >= 2, out[-2000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        with_rest = out
        while True:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            with_rest += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    text = with_rest.decode(errors="replace")
    assert "appliance watch: demo.example.com" in text and "master-0" in text
    assert "\x1b[?25l" in text and text.rstrip().endswith("\x1b[?25h")
    assert "Traceback" not in text


def test_drain_disable_enable(env: AdminEnv) -> None:
    env.wait(lambda: env.get("/api/v1/backends")["frontends"]["ingress_http"]["backends"])
    for action, state in (("drain", "drain"), ("disable", "disabled"), ("enable", "enabled")):
        proc = cli(env.config, action, "ingress_http", "worker-0")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"ingress_http/worker-0: {state} (health ")
    proc = cli(env.config, "drain", "ingress_http", "nobody")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "appliance: no backend 'nobody' in ingress_http "
        "(POST /api/v1/frontends/ingress_http/backends/nobody/drain: HTTP 404)"
    ]


def test_reload_and_reinstall(env: AdminEnv) -> None:
    proc = cli(env.config, "reload")
    assert proc.returncode == 0 and proc.stdout.startswith("reloaded: the new plan is in force")
    proc = cli(env.config, "reinstall", "master-0")
    assert proc.returncode == 0
    assert proc.stdout == (
        "master-0: its next network boot installs it again (told the running appliance)\n"
    )


def test_reload_refused_by_the_daemon(env: AdminEnv, tmp_path: Path) -> None:
    """The CLI reads a valid copy; the daemon's own file is now invalid (dns on http's port)."""
    raw = yaml.safe_load(env.config.read_text())
    copy = write_inventory(tmp_path / "copy.yaml", raw)
    good = env.config.read_text()
    taken = env.raw["listen"]["http"]  # held by the daemon's own http service
    env.config.write_text(yaml.safe_dump({**raw, "listen": {**raw["listen"], "dns": taken}}))
    try:
        proc = cli(copy, "reload")
    finally:
        env.config.write_text(good)
    assert proc.returncode == 2  # the daemon refused the file: exit as `check` does
    warning, *refused = proc.stderr.splitlines()
    assert "serves another inventory (file " in warning  # the copy is not the daemon's file
    assert refused and all(line.startswith("appliance: reload refused: ") for line in refused)
    assert "Address already in use" in proc.stderr or "already used" in proc.stderr
    assert cli(env.config, "status").returncode == 0  # still serving


def test_no_daemon_is_one_clear_line(tmp_path: Path, env: AdminEnv) -> None:
    raw = yaml.safe_load(env.config.read_text())
    port = free_port()
    raw["listen"] = {k: None for k in raw["listen"]} | {"admin": f"127.0.0.1:{port}"}
    raw["state_dir"] = str(tmp_path / "state")
    config = write_inventory(tmp_path / "down.yaml", raw)
    expected = (
        "appliance: no appliance is running: "
        f"nothing answers on http://127.0.0.1:{port} (listen.admin)\n"
    )
    for args in (("status",), ("nodes",), ("watch",), ("watch", "--once"), ("reload",),
                 ("drain", "ingress_http", "worker-0")):  # fmt: skip
        proc = cli(config, *args)
        assert (proc.returncode, proc.stderr) == (1, expected), args
    # reinstall still works without a daemon: the store keeps it for the next start.
    proc = cli(config, "reinstall", "worker-0")
    assert proc.returncode == 0 and "no appliance running: recorded in" in proc.stdout


def test_a_missing_token_is_named(env: AdminEnv, tmp_path: Path) -> None:
    """The daemon runs, but this inventory's state_dir holds no token: say which file."""
    raw = yaml.safe_load(env.config.read_text())
    raw["state_dir"] = str(tmp_path / "elsewhere")
    config = write_inventory(tmp_path / "other.yaml", raw)
    token = tmp_path / "elsewhere" / "admin.token"
    proc = cli(config, "reload")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"appliance: cannot read the admin token {token}: No such file or directory"
    )
    assert cli(config, "status").returncode == 0  # reads on loopback need none
