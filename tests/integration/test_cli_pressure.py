"""Client commands under pressure, against `appliance run` (tests/integration/admin_env.py):
a half-edited inventory, --admin/--token-file and their environment variables, the default
/etc/appliance/inventory.yaml, which daemon answered, what a reload changes, drain by node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, free_port, write_inventory
from tests.integration.admin_env import AdminEnv, start


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminEnv]:
    # Every frontend listens: masters are backends of api and machine_config, worker-0
    # of both ingress frontends.
    e = start(
        tmp_path_factory.mktemp("cli-pressure"),
        api=f"127.0.0.1:{free_port()}",
        machine_config=f"127.0.0.1:{free_port()}",
        ingress_https=f"127.0.0.1:{free_port()}",
    )
    yield e
    e.close()


def cli(*args: str, env_vars: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env=environ | (env_vars or {}),
    )  # fmt: skip


def token_file(env: AdminEnv) -> Path:
    state = Path(env.raw["state_dir"])
    return (state if state.is_absolute() else env.base / state) / "admin.token"


CLIENT_COMMANDS = (
    ("status",),
    ("nodes",),
    ("unknown",),
    ("watch", "--once"),
    ("watch", "--timeout", "0.5"),
    ("drain", "ingress_http", "worker-0"),
    ("enable", "ingress_http", "worker-0"),
    ("reinstall", "worker-0"),
)

BROKEN = {
    "yaml": "\nnodes: [unclosed\n  - {name: x\n",  # a YAML syntax error
    "unknown-key": "\nfavourite_colour: blue\n",  # valid YAML, invalid inventory
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_client_commands_work_while_the_inventory_is_half_edited(env: AdminEnv, how: str) -> None:
    good = env.config.read_text()
    env.config.write_text(good + BROKEN[how])
    try:
        for args in CLIENT_COMMANDS:
            proc = cli(*args, "--config", str(env.config))
            assert proc.returncode == 0, (args, proc.stderr)
            assert proc.stderr == "", (args, proc.stderr)  # the same file: no warning either
        # reload: the daemon reads the broken file and refuses; every problem one line, exit 2
        proc = cli("reload", "--config", str(env.config))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()
        assert lines and all(line.startswith("appliance: reload refused: ") for line in lines)
        assert ("favourite_colour" in proc.stderr) == (how == "unknown-key")
    finally:
        env.config.write_text(good)
    assert cli("status", "--config", str(env.config)).returncode == 0  # still serving


def test_admin_and_token_file_flags_without_any_inventory(env: AdminEnv, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such.yaml")
    flags = ("--admin", env.admin, "--token-file", str(token_file(env)))
    # Global options before or after the subcommand.
    for args in (("--config", missing, *flags, "status"), ("status", "--config", missing, *flags)):
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "serving demo.example.com" in proc.stdout
    proc = cli("--config", missing, *flags, "drain", "ingress-http", "worker-0")
    assert proc.returncode == 0, proc.stderr
    assert cli("enable", "worker-0", "--config", missing, *flags).returncode == 0
    # A mutation with the wrong token is refused by the daemon, in one line.
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-token\n")
    proc = cli("--config", missing, "--admin", env.admin, "--token-file", str(bad), "reload")
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "HTTP 401" in proc.stderr
    # No file, no flag: say what to do.
    proc = cli("status", "--config", missing)
    assert proc.returncode == 1
    assert proc.stderr.startswith("appliance: cannot find listen.admin (cannot read ")
    assert "--admin URL" in proc.stderr
    proc = cli("status", "--config", missing, "--admin", "ftp://x")
    assert (proc.returncode, proc.stderr) == (
        1,
        "appliance: --admin 'ftp://x': expected http://HOST:PORT\n",
    )


def test_environment_variables(env: AdminEnv, tmp_path: Path) -> None:
    variables = {
        "APPLIANCE_CONFIG": str(tmp_path / "absent.yaml"),
        "APPLIANCE_ADMIN": env.admin.removeprefix("http://"),  # a bare host:port is fine
        "APPLIANCE_TOKEN_FILE": str(token_file(env)),
    }
    for args in (
        ("status",),
        ("nodes",),
        ("reload",),
        ("drain", "worker-0"),
        ("enable", "worker-0"),
    ):
        proc = cli(*args, env_vars=variables)
        assert proc.returncode == 0, (args, proc.stderr)
    # APPLIANCE_CONFIG names the inventory: the daemon's own, so no warning.
    proc = cli("status", env_vars={"APPLIANCE_CONFIG": str(env.config)})
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.root
def test_default_config_path(env: AdminEnv) -> None:
    """No --config, no APPLIANCE_CONFIG: /etc/appliance/inventory.yaml, here the daemon's
    own file bind-mounted in a private mount namespace (the host's /etc is not touched
    beyond an empty mount point, removed again when this test made it)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    mount_point = Path("/etc/appliance")
    made = not mount_point.exists()
    if made:
        mount_point.mkdir()
    try:
        script = (
            f"mount --bind {env.base} /etc/appliance && exec {sys.executable} -m appliance status"
        )
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
        )  # fmt: skip
    finally:
        if made:
            mount_point.rmdir()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # the same file through the bind mount: no mismatch warning
    assert "serving demo.example.com" in proc.stdout
    help_text = cli("status", "--help").stdout
    assert "/etc/appliance/inventory.yaml" in help_text and "APPLIANCE_CONFIG" in help_text


def test_a_daemon_serving_another_inventory_is_named(env: AdminEnv, tmp_path: Path) -> None:
    raw = yaml.safe_load(env.config.read_text())
    raw["cluster"]["name"] = "other"
    other = write_inventory(tmp_path / "other.yaml", raw)
    for args in (("status",), ("nodes",), ("unknown",), ("watch", "--once")):
        proc = cli(*args, "--config", str(other))
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.splitlines() == [
            f"appliance: warning: the daemon at {env.admin} serves another inventory "
            f"(cluster demo.example.com, not other.example.com; file {env.config}, not {other})"
        ], args


def test_reload_prints_the_diff_and_diff_predicts_it(env: AdminEnv, tmp_path: Path) -> None:
    good = env.config.read_text()
    raw = yaml.safe_load(good)
    raw["load_balancer"]["check_interval"] = 0.4
    edited = write_inventory(env.base / "edited.yaml", raw)  # relative paths resolve alike
    same = cli("diff", "--config", str(env.config))
    assert same.returncode == 0, same.stderr
    assert same.stdout == "no changes: a reload would keep the running plan\n"
    predicted = cli("diff", "--config", str(edited))
    assert predicted.returncode == 1, predicted.stderr
    assert "~ frontends.ingress_http.check.interval: 0.3 -> 0.4" in predicted.stdout
    assert predicted.stderr == ""  # another file than the daemon's is the point here
    env.config.write_text(edited.read_text())
    try:
        proc = cli("reload", "--config", str(env.config))
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("reloaded: the new plan is in force")
        assert lines[1].startswith("changes: settings +0 -0 ~")
        changes = lines[2:]
        assert changes and all(line.startswith("  setting ") for line in changes)
        assert any("ingress_http.check" in line and "0.4" in line for line in changes), changes
        assert cli("diff", "--config", str(env.config)).returncode == 0  # now in force
    finally:
        env.config.write_text(good)
        assert cli("reload", "--config", str(env.config)).returncode == 0
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(good + "\nfavourite_colour: blue\n")
    proc = cli("diff", "--config", str(invalid))
    assert proc.returncode == 2 and "favourite_colour" in proc.stderr


def test_drain_by_node_across_frontends(env: AdminEnv) -> None:
    config = ("--config", str(env.config))
    proc = cli("drain", "master-0", *config)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(line.split(":")[0] for line in lines) == [
        "api/master-0",
        "machine_config/master-0",
    ]
    assert all(": drain (health " in line for line in lines)
    proc = cli("enable", "master-0", *config)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    assert all(": enabled (health " in line for line in proc.stdout.splitlines())
    proc = cli("disable", "worker-0", *config)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [
        "ingress_http/worker-0",
        "ingress_https/worker-0",
    ]
    proc = cli("enable", "ingress-http", "worker-0", *config)  # one frontend, '-' for '_'
    assert proc.returncode == 0 and proc.stdout.startswith("ingress_http/worker-0: enabled")
    assert len(proc.stdout.splitlines()) == 1
    assert cli("enable", "worker-0", *config).returncode == 0


def test_unknown_names_list_the_valid_ones(env: AdminEnv) -> None:
    config = ("--config", str(env.config))
    proc = cli("drain", "ingres", "worker-0", *config)
    assert proc.returncode == 2
    assert proc.stderr == (
        "appliance: no frontend 'ingres'; the frontends: "
        "api, ingress_http, ingress_https, machine_config\n"
    )
    proc = cli("drain", "nobody", *config)
    assert proc.returncode == 2
    assert proc.stderr.startswith("appliance: 'nobody' is a backend of no frontend; the backends: ")
    assert "master-0" in proc.stderr and "worker-0" in proc.stderr
    assert cli("drain", "a", "b", "c", *config).returncode == 2
