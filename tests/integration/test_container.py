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


HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def _debootstrap_base(tool: str, base: str) -> str:
    """Import a Debian bookworm minbase made by debootstrap as `base`; '' or why not.

    Used only where the registry of `base` cannot be reached (this machine reaches
    Debian's archive but not docker.io): the same distribution and release as
    debian:bookworm-slim, built from Debian's own packages.
    """
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed"
    cache = ROOT / "tests" / ".cache"
    tarball = cache / "bookworm-minbase.tar"
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        rootfs = cache / "bookworm-rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        boot = _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], 900)
        if boot.returncode != 0:
            return f"debootstrap failed: {boot.stderr.strip()[-300:]}"
        packed = _run(["tar", "-C", str(rootfs), "-cf", str(tarball) + ".part", "."], 300)
        shutil.rmtree(rootfs, ignore_errors=True)
        if packed.returncode != 0:
            return f"tar failed: {packed.stderr.strip()[-300:]}"
        os.replace(str(tarball) + ".part", tarball)
    imported = _run([tool, "import", str(tarball), base], 300)
    return "" if imported.returncode == 0 else f"import failed: {imported.stderr.strip()[-300:]}"


def _build(tool: str) -> subprocess.CompletedProcess[str]:
    cmd = [tool, "build", "--network", "host", "-t", TAG, "-f", str(CONTAINERFILE)]
    if Path(tool).name == "podman":
        # docker format keeps HEALTHCHECK (OCI has none); the host's CA bundle lets pip
        # through a TLS-inspecting proxy where there is one (a build-time mount only).
        # chroot isolation: RUN steps need no OCI runtime (some sandboxes refuse its
        # cgroup and rlimit set-up).
        cmd += ["--pull=never", "--format", "docker", "--isolation", "chroot"]
        if HOST_CA.exists():
            cmd += [
                "-v",
                f"{HOST_CA}:/run/host-ca.crt:ro",
                "--build-arg",
                "PIP_CERT=/run/host-ca.crt",
            ]
    return _run([*cmd, str(ROOT)], 1200)


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
            why_not = _debootstrap_base(tool, base)
            if why_not:
                pytest.skip(f"base image {base} cannot be pulled or made: {why_not}")
    build = _build(tool)
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
    try:
        if run.returncode != 0 and "OCI permission denied" in run.stderr:
            # This sandbox forbids the OCI runtime's setrlimit: run the image's own
            # filesystem, user, command and HEALTHCHECK by hand instead (chroot).
            _run_image_by_hand(tool, name, conf, admin, tmp_path)
            return
        assert run.returncode == 0, run.stderr
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


def _run_image_by_hand(tool: str, name: str, conf: Path, admin: str, tmp_path: Path) -> None:
    """The image's rootfs, its USER, ENTRYPOINT+CMD and HEALTHCHECK, run under chroot."""
    (image,) = json.loads(_run([tool, "image", "inspect", TAG], 60).stdout)
    config = image["Config"]
    # podman puts the docker-format HEALTHCHECK beside Config, docker inside it
    test = (image.get("Healthcheck") or config["Healthcheck"])["Test"]
    assert test[0] == "CMD", test
    user = config["User"]
    command = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    env["APPLIANCE_ADMIN"] = admin
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    export = subprocess.run(
        f"{shlex.quote(tool)} export {shlex.quote(name)} | tar -x -C {shlex.quote(str(rootfs))}",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr
    mounts = [(conf, rootfs / "etc/appliance"), (Path("/proc"), rootfs / "proc")]
    done: list[Path] = []
    try:
        for src, dst in mounts:
            dst.mkdir(parents=True, exist_ok=True)
            assert _run(["mount", "--bind", str(src), str(dst)], 30).returncode == 0
            done.append(dst)
        ids = _run(["chroot", str(rootfs), "id", "-u", user], 30).stdout.strip()
        proc = subprocess.Popen(
            ["chroot", f"--userspec={ids}:{ids}", str(rootfs), *command],
            env=env,
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline, healthy = time.monotonic() + 60, False
            while time.monotonic() < deadline and proc.poll() is None and not healthy:
                check = subprocess.run(
                    ["chroot", str(rootfs), *test[1:]], env=env, capture_output=True, timeout=30
                )
                healthy = check.returncode == 0
                time.sleep(0.5)
            assert healthy, "HEALTHCHECK never passed"
            proc.terminate()  # SIGTERM: the graceful stop
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, out
            assert "stopped" in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        for dst in reversed(done):
            _run(["umount", str(dst)], 30)
