"""A decision stored before a restart is not stored again after it: the approver seeds
what it recorded from the store (through the store's reader, off the event loop)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.fakekube import FakeKube
from tests.integration.test_cluster import (
    FAST,
    client_csr,
    cluster,
    fake,  # noqa: F401 - the fixture
    inventory,
    started,
    until,
)


def _intruder_rows(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in rows if r["csr"] == "csr-intruder"]


async def test_a_refusal_stored_before_a_restart_is_not_stored_again(
    tmp_path: Path,
    fake: FakeKube,  # noqa: F811
) -> None:
    config = inventory(tmp_path, fake.kubeconfig(tmp_path / "kubeconfig"))
    client_csr(fake, "csr-intruder", "intruder")  # never approvable: stays pending
    sup = await started(config)
    try:
        assert sup.store is not None
        store = sup.store
        await until(lambda: _intruder_rows(store.csr_decisions()), "the refusal stored")
    finally:
        await sup.stop()

    sup = await started(config)  # the same state directory
    try:
        svc = cluster(sup)
        await until(lambda: svc.connection["state"] == "connected", "connected again")
        await until(lambda: svc.approver.informer is not None, "watching again")
        await until(lambda: svc.status().csr["pending_csrs"] == 1, "the CSR seen again")
        await asyncio.sleep(3 * FAST.resync)  # a few review rounds
        assert sup.store is not None
        assert len(_intruder_rows(sup.store.csr_decisions())) == 1
    finally:
        await sup.stop()
