"""The Containerfile: its structure (so it cannot rot unnoticed), its HEALTHCHECK
command against a real daemon, and a real build + run where a builder can work.

The build needs podman or a running Docker daemon and the base image (pulled from
docker.io). Where either is missing the test skips and says which; the structure and
health-check tests run everywhere.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, Daemon, free_port, loopback_inventory, write_inventory

CONTAINERFILE = ROOT / "Containerfile"
CONFIG_PATH = "/etc/appliance/inventory.yaml"
VOLUMES = {
    "/etc/appliance",
    "/srv/appliance/images",
    "/srv/appliance/ignition",
    "/srv/appliance/tftp",
    "/var/lib/appliance",
}
TAG = "localhost/appliance-test:latest"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _json_or_words(args: str) -> list[str]:
    if args.startswith("["):
        value: list[str] = json.loads(args)
        return value
    return shlex.split(args)


def _healthcheck_cmd(ins: list[tuple[str, str]]) -> list[str]:
    (health,) = [a for i, a in ins if i == "HEALTHCHECK"]
    return _json_or_words(health.split(" CMD ", 1)[1])


def test_containerfile_structure() -> None:
    ins = instructions(CONTAINERFILE.read_text())
    stages = [a for i, a in ins if i == "FROM"]
    assert len(stages) == 2, stages
    assert stages[0].endswith(" AS builder") and " AS " not in stages[1]
    assert all(s.startswith("${BASE}") for s in stages)
    (base,) = [a for i, a in ins if i == "ARG" and a.startswith("BASE=")]
    assert "slim" in base
    runtime = ins[[n for n, (i, _) in enumerate(ins) if i == "FROM"][1] :]
    # The builder makes wheels; the runtime stage only copies the installed venv.
    builder_runs = " ".join(a for i, a in ins[: len(ins) - len(runtime)] if i == "RUN")
    assert "pip wheel" in builder_runs and "--no-index --find-links /wheels" in builder_runs
    assert ("COPY", "--from=builder /opt/appliance /opt/appliance") in runtime
    assert not any(i == "RUN" and "pip install" in a for i, a in runtime)
    (volume,) = [a for i, a in runtime if i == "VOLUME"]
    assert set(_json_or_words(volume)) == VOLUMES
    (user,) = [a for i, a in runtime if i == "USER"]
    assert user not in ("root", "0")
    entry = _json_or_words(next(a for i, a in runtime if i == "ENTRYPOINT"))
    cmd = _json_or_words(next(a for i, a in runtime if i == "CMD"))
    assert entry + cmd == ["/opt/appliance/bin/appliance", "run", "--config", CONFIG_PATH]
    health = _healthcheck_cmd(ins)
    assert health[0] == "/usr/bin/python3" and "/healthz" in health[-1]
    labels = " ".join(a for i, a in runtime if i == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    # Every COPY source exists and is not excluded by the ignore files.
    ignored = _ignore_lines(ROOT / ".containerignore")
    assert ignored == _ignore_lines(ROOT / ".dockerignore")
    for i, a in ins:
        if i == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert src not in ignored, src
    assert {".git", ".venv", "tests"} <= ignored


def _ignore_lines(path: Path) -> set[str]:
    return {
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }


def test_readme_shows_the_container_line() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "podman run" in readme
    line = readme[readme.index("podman run") :].split("\n```")[0]
    for part in ("--network host", "NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW", "-v "):
        assert part in line, part


def test_healthcheck_command_against_a_real_daemon(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The image's HEALTHCHECK command, run here: 0 while the admin endpoint answers,
    non-zero once it is gone."""
    cmd = _healthcheck_cmd(instructions(CONTAINERFILE.read_text()))
    python = shutil.which("python3") or "/usr/bin/python3"
    raw = loopback_inventory(tmp_path)
    d = daemons(write_inventory(tmp_path / "inv.yaml", raw))
    d.wait_for("serving")
    env = {**os.environ, "APPLIANCE_ADMIN": raw["listen"]["admin"]}
    ok = subprocess.run([python, *cmd[1:]], env=env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert d.stop() == 0
    down = subprocess.run([python, *cmd[1:]], env=env, capture_output=True, timeout=30)
    assert down.returncode == 1, down.stderr


# --- a real build, where possible ---------------------------------------------------------


def _builder() -> tuple[str, str]:
    """(tool, why not) of podman or a Docker with a daemon; tool '' when none works."""
    reasons = []
    for tool in ("podman", "docker"):
        path = shutil.which(tool)
        if path is None:
            reasons.append(f"{tool} is not installed")
            continue
        info = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return path, ""
        reasons.append(f"{tool} info failed: {(info.stderr or info.stdout).strip()[:200]}")
    return "", "; ".join(reasons)


def _base_image() -> str:
    (base,) = [a for i, a in instructions(CONTAINERFILE.read_text()) if i == "ARG" and "BASE=" in a]
    return base.split("=", 1)[1]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.root
def test_image_builds_runs_and_is_healthy(tmp_path: Path) -> None:
    tool, why = _builder()
    if not tool:
        pytest.skip(f"no container builder here: {why}")
    base = _base_image()
    have = _run([tool, "image", "inspect", base], 60).returncode == 0
    if not have:
        pull = _run([tool, "pull", base], 300)
        if pull.returncode != 0:
            pytest.skip(f"base image {base} cannot be pulled: {pull.stderr.strip()[-300:]}")
    build = _run([tool, "build", "-t", TAG, "-f", str(CONTAINERFILE), str(ROOT)], 1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    conf = tmp_path / "etc"
    conf.mkdir()
    admin = f"127.0.0.1:{free_port()}"
    raw: dict[str, Any] = loopback_inventory(tmp_path)
    raw["listen"]["admin"] = admin
    raw["listen"]["http"] = f"127.0.0.1:{free_port()}"
    raw["state_dir"] = "/var/lib/appliance"
    write_inventory(conf / "inventory.yaml", raw)
    name = f"appliance-test-{os.getpid()}"
    run = _run(
        [
            tool,
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            *("--cap-add", "NET_ADMIN", "--cap-add", "NET_BIND_SERVICE", "--cap-add", "NET_RAW"),
            "--health-interval",
            "1s",
            "-e",
            f"APPLIANCE_ADMIN={admin}",
            "-v",
            f"{conf}:/etc/appliance:ro",
            TAG,
        ],
        120,
    )
    assert run.returncode == 0, run.stderr
    try:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            inspect = _run([tool, "inspect", name], 30)
            data = json.loads(inspect.stdout)[0]
            health = data["State"].get("Health") or data["State"].get("Healthcheck") or {}
            state = health.get("Status", "")
            if state == "healthy" or not data["State"].get("Running", True):
                break
            time.sleep(1)
        logs = _run([tool, "logs", name], 30)
        assert state == "healthy", logs.stdout + logs.stderr
        stop = _run([tool, "stop", "-t", "30", name], 60)
        assert stop.returncode == 0, stop.stderr
        code = json.loads(_run([tool, "inspect", name], 30).stdout)[0]["State"]["ExitCode"]
        assert code == 0, _run([tool, "logs", name], 30).stderr
    finally:
        _run([tool, "rm", "-f", name], 60)
