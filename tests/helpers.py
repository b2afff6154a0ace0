"""Helpers for tests: external tools, free loopback ports, runnable inventories."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"


def need_tool(name: str) -> str:
    """Path of an external program; skip (or, under CI, fail) when it is not installed."""
    path = shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).exists()), None
    )
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed: .ci/run must install it")
    pytest.skip(f"{name} is not installed (Debian package; .ci/run installs it)")


def dgxpod_data() -> dict[str, Any]:
    """config/dgxpod.yaml as plain data, without its upstream_dns: a test's appliance
    forwards nowhere (10.33.3.1 is the article's site resolver, not a test host)."""
    raw: dict[str, Any] = yaml.safe_load((CONFIG / "dgxpod.yaml").read_text())
    raw["network"].pop("upstream_dns", None)
    return raw


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def loopback_inventory(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A runnable inventory on loopback with free ports, state under tmp_path."""
    raw: dict[str, Any] = {
        "cluster": {"name": "demo", "base_domain": "example.com", "ignition_dir": "ignition"},
        "network": {"address": "127.0.0.1", "subnet": "127.0.0.0/24"},
        "load_balancer": {"address": "127.0.0.54"},
        "boot": {"tftp_root": "tftp", "images_dir": "images"},
        "nodes": [
            {
                "name": "bootstrap",
                "role": "bootstrap",
                "mac": "52:54:00:00:00:53",
                "ip": "127.0.0.53",
            },
            {"name": "master-0", "role": "master", "mac": "52:54:00:00:00:50", "ip": "127.0.0.50"},
            {"name": "worker-0", "role": "worker", "mac": "52:54:00:00:00:44", "ip": "127.0.0.44"},
        ],
        "listen": {
            "dns": None,
            "dhcp": None,
            "tftp": None,
            "http": None,
            "api": None,
            "machine_config": None,
            "ingress_http": None,
            "ingress_https": None,
            "admin": f"127.0.0.1:{free_port()}",
        },
        "state_dir": str(tmp_path / "state"),
    }
    for key, value in overrides.items():
        raw[key] = value
    return raw


def write_inventory(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m appliance ARGS` as an operator runs it, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


class Daemon:
    def __init__(
        self,
        config: Path,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", *extra, "run", "--config", str(config)],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # nofile: RLIMIT_NOFILE (soft and hard) of the daemon, as LimitNOFILE= sets it
            preexec_fn=None if nofile is None else lambda: _set_nofile(nofile),
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen in:\n{self.output()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def _set_nofile(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def get_json(url: str, token: str | None = None, method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")


def in_netns(ns: str, fn: Callable[[], _T]) -> _T:
    """Run `fn` in a thread that entered `ns`: sockets it makes belong to that namespace."""
    result: dict[str, Any] = {}

    def enter_and_call() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{ns}") as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=enter_and_call)  # setns changes this thread only
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    value: _T = result["value"]
    return value


def wait_until(
    check: Callable[[], _T | None],
    timeout: float = 10.0,
    what: str = "condition",
    step: float = 0.05,
) -> _T:
    """Poll `check` every `step` seconds until it returns something true (returned), or
    fail with `what` after `timeout` seconds. (Never None: so `_T | None` in, `_T` out.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g} s")
        time.sleep(step)
