"""The tftp service on a wildcard listener: each request's destination (`dst`, from
IP_PKTINFO) is where its transfer's socket binds and where its ERROR comes from.

The service is built from the plan and fed requests directly (nothing started). The
hostile case: the address a request was sent to is gone before its transfer's socket
binds (an HA floating address moved to the other member between the two): the request
is dropped and counted, not an error with a traceback, and no boot event is published.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.events import EventBus
from appliance.inventory import parse_inventory
from appliance.plan import Plan, build_plan
from appliance.runtime import RuntimeState
from appliance.service import ServiceContext
from appliance.storequeue import DaemonStore
from services.tftp.server import TftpService, _Listener
from tests.helpers import CONFIG

MASTER0_IP = "10.33.3.50"
GONE = socket.inet_aton("192.0.2.99")  # TEST-NET-1: not an address of this host


@pytest.fixture
def plan(dgxpod_raw: dict[str, Any], tmp_path: Path) -> Plan:
    dgxpod_raw["state_dir"] = str(tmp_path / "state")
    dgxpod_raw["boot"]["tftp_root"] = str(tmp_path / "tftp")
    (tmp_path / "tftp").mkdir()
    (tmp_path / "tftp" / "undionly.kpxe").write_bytes(b"x" * 1000)
    return build_plan(parse_inventory(dgxpod_raw, "x.yaml", CONFIG))


@pytest.fixture
def ctx(plan: Plan) -> Iterator[ServiceContext]:
    store = DaemonStore.open(plan.state_dir)
    try:
        yield ServiceContext(
            bus=EventBus(),
            store=store,
            log=logging.getLogger("appliance.test-tftp-pktinfo"),
            runtime=RuntimeState(store),
        )
    finally:
        store.close()


class _Replies(_Listener):
    def __init__(self, svc: TftpService) -> None:
        super().__init__(svc)
        self.sent: list[tuple[bytes, tuple[Any, ...], bytes | None]] = []

    def reply(self, data: bytes, addr: tuple[Any, ...], dst: bytes | None = None) -> None:
        self.sent.append((data, addr, dst))


def test_a_request_to_an_address_gone_is_dropped_not_an_error(
    ctx: ServiceContext, plan: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = TftpService(ctx, plan)
    published: list[Any] = []
    monkeypatch.setattr(ctx.bus, "publish", lambda *a, **k: published.append(a))
    listener = _Replies(svc)
    listener.received(b"\x00\x01undionly.kpxe\x00octet\x00", (MASTER0_IP, 2070), GONE)
    assert svc.counters["errors"] == 0
    assert svc.counters["dst_gone"] == 1 and svc.counters["dropped"] == 1
    assert svc.counters["transfers"] == 0 and not svc.sessions
    assert not published  # no "fetched the boot loader" for a transfer that never ran
    assert not listener.sent  # an ERROR from a gone address could not be sent either


def test_an_error_reply_carries_the_requests_destination(ctx: ServiceContext, plan: Plan) -> None:
    svc = TftpService(ctx, plan)
    listener = _Replies(svc)
    listener.received(b"\x00\x01missing.bin\x00octet\x00", ("198.51.100.7", 2070), GONE)
    assert [(d[:2], dst) for d, _, dst in listener.sent] == [(b"\x00\x05", GONE)]
