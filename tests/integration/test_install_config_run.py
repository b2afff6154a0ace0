"""`appliance run` with an install-config.yaml: disagreements that do not stop the install
are logged as warnings when it starts and again at each reload; a name that differs
refuses the start (exit 2) like any other inventory error."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from tests.helpers import Daemon, loopback_inventory, wait_until, write_inventory


def _install_config(name: str, masters: int) -> str:
    return (
        "apiVersion: v1\nbaseDomain: example.com\n"
        "compute: [{hyperthreading: Enabled, name: worker, platform: {}, replicas: 1}]\n"
        f"controlPlane: {{hyperthreading: Enabled, name: master, platform: {{}}, "
        f"replicas: {masters}}}\n"
        f"metadata: {{name: {name}}}\n"
        "networking:\n  clusterNetwork: [{cidr: 10.128.0.0/14, hostPrefix: 23}]\n"
        "  machineNetwork: [{cidr: 127.0.0.0/24}]\n  networkType: OVNKubernetes\n"
        "  serviceNetwork: [172.30.0.0/16]\n"
        "platform: {none: {}}\npullSecret: '{\"auths\": {}}'\nsshKey: ssh-ed25519 AAAA ops\n"
    )


def test_run_logs_warnings_at_start_and_reload_and_refuses_a_mismatch(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    ic = tmp_path / "install-config.yaml"
    ic.write_text(_install_config("demo", masters=3))
    raw = loopback_inventory(tmp_path)
    raw["cluster"]["install_config"] = "install-config.yaml"
    config = write_inventory(tmp_path / "inv.yaml", raw)
    d = daemons(config)
    d.wait_for("serving")
    said = "nodes: 1 nodes have role master, but controlPlane.replicas is 3 (from install-config"
    line = next(ln for ln in d.output().splitlines() if said in ln)
    assert "WARNING" in line, line

    # A reload re-reads the file: the new disagreement is logged.
    ic.write_text(_install_config("demo", masters=5))
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "controlPlane.replicas is 5" in d.output(), what="the reload's warning")
    assert d.stop() == 0

    ic.write_text(_install_config("other", masters=1))
    refused = daemons(config)
    assert refused.proc.wait(timeout=15) == 2
    assert (
        f"{config}: cluster.name: 'demo' differs from 'other' (from install-config.yaml "
        "metadata.name)" in refused.output()
    )
