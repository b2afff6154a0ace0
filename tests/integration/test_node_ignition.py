"""Per-node ignition (issue 15) with curl against a running daemon.

`<ignition_dir>/node/<name>.ign`, when it exists, is what that node's boot arguments
point at, it is served to that node's address only, its fetch marks the node installed
(boot once), and one written while the daemon runs is picked up at the next reload.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_tftp_http_real import (
    BOOTSTRAP,
    MASTER,
    WORKER,
    Env,
    _boots,
    _configs,
    _env,
    _status,
    _wait_log,
)

WORKER_MAC = "52:54:00:00:00:44"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    env = _env(tmp_path)
    own = env.path("ignition/node/master-0.ign")
    own.parent.mkdir()
    own.write_text(json.dumps({"ignition": {"version": "3.2.0"}, "node": "master-0"}))
    env.start()
    yield env
    if env.daemon is not None:
        env.daemon.stop()


def test_node_file_is_pointed_at_served_to_its_node_and_marks_it_installed(env: Env) -> None:
    own = env.path("ignition/node/master-0.ign").read_bytes()
    configs = _configs(env)
    for text in configs.values():
        assert f"coreos.inst.ignition_url={env.http}/ignition/node/master-0.ign" in text
        assert "ignition/master.ign" not in text
    # Another node, even one of the same role, never gets it.
    assert _status(env, "ignition/node/master-0.ign", BOOTSTRAP)[0] == 403
    assert _status(env, "ignition/node/master-0.ign", WORKER)[0] == 403
    assert _boots(_configs(env)) == "install"
    code, body = _status(env, "ignition/node/master-0.ign", MASTER)
    assert code == 200 and body == own
    assert _boots(_configs(env)) == "local"
    _wait_log(env, "master-0 fetched its install ignition")
    # A node without a file of its own: its role file, also under /ignition/node/.
    code, body = _status(env, "ignition/node/worker-0.ign", WORKER)
    assert code == 200 and body == env.path("ignition/worker.ign").read_bytes()


def test_a_node_file_written_later_counts_after_a_reload(env: Env) -> None:
    before = _configs(env, WORKER_MAC)["ipxe"]
    assert f"{env.http}/ignition/worker.ign" in before
    env.path("ignition/node/worker-0.ign").write_text('{"ignition": {"version": "3.2.0"}}')
    assert env.daemon is not None
    os.kill(env.daemon.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if f"{env.http}/ignition/node/worker-0.ign" in _configs(env, WORKER_MAC)["ipxe"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the reload did not point worker-0 at its own ignition")
    code, body = _status(env, "ignition/node/worker-0.ign", WORKER)
    assert code == 200 and body == env.path("ignition/node/worker-0.ign").read_bytes()
