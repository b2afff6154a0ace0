"""The daemon's log at start and on reload (issue 16): quiet and useful.

- Backends that are not up yet at start: one line per frontend ("ingress_http: 0 of 3
  backends up yet; checking every 0.3 s"), not a line per backend; then one line per
  change (a backend that comes up).
- The open-files warning speaks to where the daemon runs (systemd: LimitNOFILE=; a
  shell: ulimit -n), once; a reload that changes nothing logs nothing again.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Daemon, free_port, write_inventory
from tests.integration.test_proxy_real import LB, Backends, inventory, wait_until

NOFILE = 1024  # below what the frontends' max_connections need: the warning is due


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    b = Backends(tmp_path / "backends.log")
    yield b
    b.close()


def _start(tmp_path: Path, env: dict[str, str]) -> tuple[Daemon, int, int]:
    port, lb_http = free_port(), free_port(host=LB)
    raw = inventory(
        tmp_path,
        ["worker-0", "worker-1", "worker-2"],
        listen={"ingress_http": lb_http},
        ports={"ingress_http": port},
    )
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    d = Daemon(config, tmp_path / "daemon.log", env={"PYTHONUNBUFFERED": "1", **env}, nofile=NOFILE)
    d.wait_for("serving", timeout=30)
    return d, port, lb_http


def _lines(d: Daemon, pattern: str) -> list[str]:
    return [line for line in d.output().splitlines() if re.search(pattern, line)]


def test_backends_not_up_yet_are_one_line_per_frontend(tmp_path: Path, backends: Backends) -> None:
    d, port, _ = _start(tmp_path, {"INVOCATION_ID": "", "NOTIFY_SOCKET": ""})
    try:
        d.wait_for("ingress_http: 0 of 3 backends up yet; checking every 0.3 s", timeout=10)
        assert not _lines(d, r"ingress_http: backend worker-\d is down"), d.output()
        # A backend that comes up: one line, for it.
        backends.start("worker-1", port)
        d.wait_for("ingress_http: backend worker-1 is up", timeout=10)
        time.sleep(1.0)  # several check rounds of the two still down
        assert len(_lines(d, r"ingress_http: backend worker-1 is up")) == 1
        assert not _lines(d, r"backend worker-[02] is (down|up)"), d.output()
    finally:
        d.stop()


def _reload_twice(d: Daemon) -> None:
    for _ in range(2):
        mark = d.output().count("reload")
        d.proc.send_signal(signal.SIGHUP)

        def reloaded(m: int = mark) -> bool:  # this round's mark, bound now
            return d.output().count("reload") > m

        wait_until("reloaded", reloaded, timeout=10)
    time.sleep(0.5)


def test_open_files_warning_names_ulimit_in_a_shell_once(tmp_path: Path) -> None:
    env = {"INVOCATION_ID": "", "NOTIFY_SOCKET": ""}
    d, _, _ = _start(tmp_path, env)
    try:
        _reload_twice(d)
        warned = _lines(d, r"open files limit")
        assert len(warned) == 1, d.output()
        assert "ulimit -n" in warned[0] and "LimitNOFILE" not in warned[0], warned
        assert len(_lines(d, r"descriptors: limit")) == 1, d.output()
        # A reload that changed nothing is one line, not two.
        assert len(_lines(d, r"reload: new plan in force .*: no changes")) == 2, d.output()
        assert not _lines(d, r"reload: took the new plan"), d.output()
    finally:
        d.stop()


def test_open_files_warning_names_limitnofile_under_systemd(tmp_path: Path) -> None:
    d, _, _ = _start(tmp_path, {"INVOCATION_ID": "0123456789abcdef", "NOTIFY_SOCKET": ""})
    try:
        warned = _lines(d, r"open files limit")
        assert len(warned) == 1, d.output()
        assert "LimitNOFILE=" in warned[0] and "ulimit" not in warned[0], warned
    finally:
        d.stop()
