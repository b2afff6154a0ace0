"""Boot storm: 200 machines PXE-boot from the appliance at the same time.

Every machine is a network namespace on the lab bridge with real clients (busybox
udhcpc, tftp and wget; tests/e2e/storm.py): a lease announcing a PXE client (BIOS
or UEFI x64, alternating), the boot loader the DHCP answer names by TFTP, then a
kernel and an initramfs over HTTP. The inventory has the 200 machines (a
bootstrap, three masters, 196 workers). All machines must finish, each with its
own reserved address (no duplicates), and the admin API must show every node at
the initramfs stage with the DHCP, boot-loader and kernel stages behind it.

Image sizes: a 10 MiB kernel and a 60 MiB initramfs of random bytes (RHCOS's are
of that order): 13.7 GiB over HTTP in all, about 20 s here. E2E_STORM_MIB="4,16"
makes them smaller for a slower machine. bench/storm runs the same storm against
dnsmasq + nginx.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import storm as storm_mod
from tests.e2e.lab import (
    Appliance,
    Lab,
    dgxpod_inventory,
    install_loaders,
    tail,
)
from tests.helpers import need_tool, wait_until

pytestmark = [pytest.mark.root, pytest.mark.e2e]

MACHINES = 200
STORM_LIMIT = 240.0  # seconds for the whole storm; it takes about 20 s here


def _sizes() -> tuple[int, int]:
    kernel, initramfs = os.environ.get("E2E_STORM_MIB", "10,60").split(",")
    return int(kernel), int(initramfs)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    need_tool("ip")
    if not Path(storm_mod.BUSYBOX).exists():
        need_tool("busybox")
    made = Lab(tmp_path, vip=storm_mod.STORM_VIP)
    try:
        yield made
    finally:
        made.close()


def test_storm_of_200_pxe_boots(lab: Lab, tmp_path: Path) -> None:
    storm = storm_mod.machines(MACHINES)
    kernel_mib, initramfs_mib = _sizes()
    kernel, initramfs = storm_mod.make_images(tmp_path / "images", kernel_mib, initramfs_mib)
    install_loaders(tmp_path)
    raw = dgxpod_inventory(tmp_path, kernel=kernel, initramfs=initramfs)
    raw["network"].pop("gateway")
    raw["load_balancer"]["address"] = storm_mod.STORM_VIP
    raw["nodes"] = storm_mod.inventory_nodes(storm)
    # DHCP, TFTP and HTTP are what a storm loads; the rest stays off.
    for key in ("dns", "api", "machine_config"):
        raw["listen"][key] = None
    appliance = Appliance(lab, raw, tmp_path)
    appliance.wait_serving()

    made = time.monotonic()
    run = storm_mod.Storm(lab, tmp_path, storm)
    print(f"storm: {MACHINES} namespaces in {time.monotonic() - made:.1f} s")
    result = run.run(
        storm_mod.http_base(8080), f"images/{kernel}", f"images/{initramfs}", STORM_LIMIT
    )
    print(f"storm ({kernel_mib} + {initramfs_mib} MiB): {result.summary()}")
    why = f"{result.summary()}\nappliance log:\n{tail(appliance.log_path, 30)}\n(logs: {tmp_path})"

    assert not result.failed, why
    assert len(result.ok) == MACHINES, why
    assert result.duplicates() == {}, why
    for name, (ip, loader) in run.expected().items():
        got = result.ok[name]
        assert (got["ip"], got["boot_file"], got["siaddr"]) == (ip, loader, "192.0.2.1"), (
            name,
            got,
        )
    assert result.seconds < STORM_LIMIT, why

    # The admin API (events reach the store in batches, so allow it a moment): every
    # node got its lease, its loader, its kernel and its initramfs, and no ignition.
    def at_initramfs(stages: dict[str, Any]) -> bool:
        done = {"dhcp-offer", "dhcp-ack", "bootloader", "kernel", "initramfs"}
        return done <= set(stages) and "ignition" not in stages

    def behind() -> list[str]:
        return [n for n, v in appliance.nodes().items() if not at_initramfs(v["stages"])]

    try:
        wait_until(lambda: not behind(), 15, "every node at initramfs in the admin API")
    except AssertionError as exc:
        late = behind()
        raise AssertionError(f"{exc}: {len(late)} behind, e.g. {late[:10]}\n{why}") from None
    nodes = appliance.nodes()
    assert sorted(nodes) == sorted(run.expected()), sorted(nodes)
    for name, node in nodes.items():
        stages = node["stages"]
        assert stages["bootloader"]["detail"] == f"tftp {run.expected()[name][1]}", (name, stages)
        assert stages["dhcp-ack"]["first"] <= stages["bootloader"]["first"], (name, stages)
        assert stages["bootloader"]["first"] <= stages["kernel"]["first"], (name, stages)
        assert stages["kernel"]["first"] <= stages["initramfs"]["first"], (name, stages)
    shutil.rmtree(tmp_path / "images", ignore_errors=True)  # pytest keeps tmp dirs
