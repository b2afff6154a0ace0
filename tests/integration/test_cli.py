"""The command line as an operator types it: one line per problem, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import CONFIG, run_cli, write_inventory


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("appliance ")


def test_check_summarises_and_warns() -> None:
    proc = run_cli("check", "--config", str(CONFIG / "dgxpod.yaml"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "cluster dgxpod.nvidia.com: 6 nodes (1 bootstrap, 3 master, 2 worker)" in out
    assert "ingress_https  0.0.0.0:443" in out and "worker-0:443 worker-1:443" in out
    assert "records: 2 SOA, 2 NS, 13 A, 8 PTR, 3 SRV" in out
    assert "warning: cluster.ignition_dir:" in out  # the article's files are not here


def test_check_fails_with_one_line_per_problem(tmp_path: Path, dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw["nodes"][0]["mac"] = "nope"
    dgxpod_raw["nodes"][1]["color"] = "blue"
    config = write_inventory(tmp_path / "bad.yaml", dgxpod_raw)
    proc = run_cli("check", "--config", str(config))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{config}: nodes[0].mac: 'nope' is not a MAC address "
        "(six hex pairs separated by ':' or '-')",
        f"{config}: nodes[1].color: unknown key",
    ]


def test_plan_json_and_yaml() -> None:
    as_json = json.loads(
        run_cli("plan", "-c", str(CONFIG / "dgxpod.yaml"), "--format", "json").stdout
    )
    as_yaml = yaml.safe_load(run_cli("plan", "-c", str(CONFIG / "dgxpod.yaml")).stdout)
    assert as_json == as_yaml
    assert as_json["domain"] == "dgxpod.nvidia.com"


def test_render_hosts_is_the_article_file() -> None:
    proc = run_cli("render", "-c", str(CONFIG / "dgxpod.yaml"), "--as", "hosts")
    assert proc.returncode == 0
    lines = [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")]
    assert "10.33.3.54 api-int.dgxpod.nvidia.com api.dgxpod.nvidia.com" in lines
    assert "10.33.3.50 master-0.dgxpod.nvidia.com etcd-0.dgxpod.nvidia.com" in lines


def test_missing_config_is_one_line() -> None:
    proc = run_cli("check", "--config", "/nonexistent/inv.yaml")
    assert proc.returncode == 2
    assert proc.stderr == "/nonexistent/inv.yaml: cannot read: No such file or directory\n"
