"""Secrets never leave through the file services (issue 14, item 3).

An operator who keeps everything under one folder (`/srv/appliance` with images, tftp,
ignition and state below it) must not end up serving ignition files or admin.token to
anyone over /images/, /boot/ or TFTP. `check` and `run` refuse such a layout, naming both
keys; and independently the file services never serve a `*.ign`, the ignition dir, the
state dir or the kubeconfig, whatever the layout (a copied master.ign in images/, a plan
built past the check).
"""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from appliance.inventory import Inventory, LoadedInventory
from appliance.plan import build_plan
from services.tftp.files import Refused, open_source, served
from tests.helpers import (
    Daemon,
    free_port,
    loopback_inventory,
    need_tool,
    run_cli,
    write_inventory,
)


def _one_folder(base: Path) -> dict[str, Any]:
    """Everything under `base`, images_dir being `base` itself: the mistake."""
    raw = loopback_inventory(base)
    raw["cluster"]["ignition_dir"] = str(base / "ignition")
    raw["boot"] = {"tftp_root": str(base / "tftp"), "images_dir": str(base)}
    raw["state_dir"] = str(base / "state")
    return raw


@pytest.mark.parametrize("command", ["check", "run"])
def test_check_and_run_refuse_secrets_under_served_folders(tmp_path: Path, command: str) -> None:
    (tmp_path / "ignition").mkdir()
    (tmp_path / "ignition" / "master.ign").write_text("{}")
    config = write_inventory(tmp_path / "inventory.yaml", _one_folder(tmp_path))
    done = run_cli(command, "--config", str(config))
    assert done.returncode == 2, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "boot.images_dir" in out and "cluster.ignition_dir" in out, out
    assert "boot.images_dir" in out and "state_dir" in out, out
    assert "Traceback" not in out


def test_tftp_root_inside_the_ignition_dir_is_refused(tmp_path: Path) -> None:
    raw = loopback_inventory(tmp_path)
    raw["cluster"]["ignition_dir"] = str(tmp_path / "ign")
    raw["boot"]["tftp_root"] = str(tmp_path / "ign" / "tftp")
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 2
    assert "boot.tftp_root" in done.stdout + done.stderr
    assert "cluster.ignition_dir" in done.stdout + done.stderr


def test_a_symlinked_layout_is_seen_through(tmp_path: Path) -> None:
    """images_dir is a symlink to the folder that holds the state: still refused."""
    (tmp_path / "srv" / "state").mkdir(parents=True)
    (tmp_path / "images").symlink_to(tmp_path / "srv")
    raw = loopback_inventory(tmp_path)
    raw["state_dir"] = str(tmp_path / "srv" / "state")
    raw["boot"]["images_dir"] = str(tmp_path / "images")
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 2
    assert "state_dir" in done.stdout + done.stderr


def _plan_past_the_check(base: Path) -> Any:
    """A plan of the one-folder layout, built without the layout check (defence in depth)."""
    inv = Inventory.model_validate(_one_folder(base))
    return build_plan(LoadedInventory(inv, base / "inventory.yaml", base))


def test_file_services_never_serve_secrets_even_past_the_check(tmp_path: Path) -> None:
    (tmp_path / "ignition" / "auth").mkdir(parents=True)
    (tmp_path / "ignition" / "bootstrap.ign").write_text('{"secret": 1}')
    (tmp_path / "ignition" / "auth" / "kubeconfig").write_text("secret")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "admin.token").write_text("secret")
    (tmp_path / "tftp").mkdir()
    (tmp_path / "kernel").write_bytes(b"k")
    plan = _plan_past_the_check(tmp_path)
    boot = plan.boot
    for name in (
        "images/ignition/bootstrap.ign",
        "images/ignition/auth/kubeconfig",
        "images/state/admin.token",
        "images/./state//admin.token",
        "images/STATE/../state/admin.token",
    ):
        with pytest.raises(Refused):
            open_source(boot, name, lambda _n: False)
    # What is not a secret is still served.
    src = open_source(boot, "images/kernel", lambda _n: False)
    assert src.size == 1
    src.close()
    with pytest.raises(Refused):
        served(tmp_path, "ignition", boot.private)  # the folder itself
    with pytest.raises(Refused):
        served(tmp_path, "state", boot.private)


def test_ign_outside_the_ignition_route_is_refused(tmp_path: Path) -> None:
    """An operator copied master.ign into images/ (the 4.1-era article served ignition
    from the web root): HTTP /images/ and /boot/ and TFTP refuse it; the ignition route
    still serves the owner."""
    curl = need_tool("curl")
    for d in ("images", "tftp", "ignition"):
        (tmp_path / d).mkdir()
    (tmp_path / "images" / "master.ign").write_text('{"copied": true}')
    (tmp_path / "images" / "Master.IGN").write_text('{"copied": true}')
    (tmp_path / "images" / "bootstrap.ign.orig").write_text('{"copied": true}')
    (tmp_path / "tftp" / "worker.ign").write_text('{"copied": true}')
    (tmp_path / "images" / "kernel").write_bytes(b"kernel")
    (tmp_path / "ignition" / "master.ign").write_text('{"real": true}')
    raw = loopback_inventory(tmp_path)
    http_port = free_port()
    tftp_port = free_port(socket.SOCK_DGRAM)
    raw["listen"]["http"] = f"127.0.0.1:{http_port}"
    raw["listen"]["tftp"] = f"127.0.0.1:{tftp_port}"
    config = write_inventory(tmp_path / "inventory.yaml", raw)
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for("serving demo.example.com")
        base = f"http://127.0.0.1:{http_port}"
        for path in (
            "/images/master.ign",
            "/images/Master.IGN",
            "/images/bootstrap.ign.orig",
            "/boot/worker.ign",
        ):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=10)
            assert err.value.code == 403, path
        with urllib.request.urlopen(base + "/images/kernel", timeout=10) as resp:
            assert resp.read() == b"kernel"
        # The owner still gets it from the ignition route.
        got = subprocess.run(
            [curl, "-sS", "--interface", "127.0.0.50", f"{base}/ignition/master.ign"],
            capture_output=True,
            timeout=30,
        )
        assert got.stdout == b'{"real": true}'
        for name in ("images/master.ign", "worker.ign"):
            got = subprocess.run(
                [curl, "-sS", f"tftp://127.0.0.1:{tftp_port}/{name}"],
                capture_output=True,
                timeout=30,
            )
            assert got.returncode != 0 and b"copied" not in got.stdout, name
    finally:
        daemon.stop()
