"""The cluster loop's node-related lines (CSR approved or left pending for a node, a node
Ready, bootstrap retired) carry the node's name, MAC and address as fields of their own,
so `--log-format json` lets a log pipeline pick one machine's lines (issue 17). The
real cluster service against the fake API server of tests/fakekube.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from appliance.logs import JsonFormatter
from tests.fakekube import FakeKube
from tests.integration.test_cluster import (
    WORKER_0_SANS,
    client_csr,
    cluster,
    fake,  # noqa: F401 (the fixture)
    inventory,
    serving_csr,
    started,
    until,
)

MASTER = ("master-0", "52:54:00:00:00:50", "127.0.0.50")
WORKER = ("worker-0", "52:54:00:00:00:44", "127.0.0.44")
BOOTSTRAP = ("bootstrap", "52:54:00:00:00:53", "127.0.0.53")


def _fields(caplog: pytest.LogCaptureFixture, needle: str) -> tuple[object, ...]:
    found = [r for r in caplog.records if needle in r.getMessage()]
    assert found, [r.getMessage() for r in caplog.records]
    line = json.loads(JsonFormatter().format(found[0]))
    assert line["logger"].startswith("appliance.cluster."), line
    return line.get("node"), line.get("mac"), line.get("ip")


async def test_node_lines_carry_node_mac_and_ip(
    tmp_path: Path,
    fake: FakeKube,  # noqa: F811 (the fixture)
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.cluster")
    config = inventory(tmp_path, fake.kubeconfig(tmp_path / "kubeconfig"))
    sup = await started(config)
    try:
        svc = cluster(sup)
        await until(lambda: svc.connection["state"] == "connected", "connected")
        client_csr(fake, "csr-master-0", "master-0")
        serving_csr(fake, "csr-serving-extra-san", "worker-0", dns=["worker-0", "api.evil"])
        serving_csr(fake, "csr-serving-worker-0", "worker-0", **WORKER_0_SANS)
        await until(lambda: fake.approved["csr-master-0"], "master-0's CSR approved")
        fake.add_node("master-0", ready=True)
        await until(lambda: "master-0" in svc.view.nodes, "master-0 seen")
        fake.set_configmap("kube-system", "bootstrap", {"status": "complete"})
        await until(lambda: svc.status().bootstrap["complete"], "bootstrap complete")
        await until(
            lambda: any("csr-serving-extra-san" in r.getMessage() for r in caplog.records),
            "the forged serving CSR left pending",
        )
    finally:
        await sup.stop()
    assert _fields(caplog, "approved csr-master-0") == MASTER
    assert _fields(caplog, "left csr-serving-extra-san") == WORKER
    assert _fields(caplog, "master-0 is Ready") == MASTER
    assert _fields(caplog, "bootstrap complete") == BOOTSTRAP
