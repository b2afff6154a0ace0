"""Shared fixtures: inventories built from the article's cluster, free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.etcdrig import EtcdCluster
from tests.helpers import Daemon, dgxpod_data


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    is_root = os.geteuid() == 0
    for item in items:
        if item.get_closest_marker("root") and not is_root:
            item.add_marker(
                pytest.mark.skip(reason="needs root (network namespaces, low ports, raw sockets)")
            )


@pytest.fixture
def dgxpod_raw() -> dict[str, Any]:
    """The article's inventory as plain data, to be edited by each test."""
    return dgxpod_data()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: Path, *extra: str, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(config, tmp_path / f"daemon-{len(started)}.log", *extra, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three real etcd members on 127.0.0.1 (tests/etcdrig.py), up with a leader; every
    member's PID ended after the test."""
    with EtcdCluster(tmp_path / "etcd") as cluster:
        yield cluster
