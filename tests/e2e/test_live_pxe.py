"""End to end, RHCOS live PXE: a UEFI machine boots with a current release's arguments.

The lab of test_pxe_vms.py (tests/e2e/lab.py), with the inventory an OpenShift 4.12+
install uses: `boot.rootfs` set and `boot.image` unset, the install device a bare
name (`vda`), and the DGX worker naming its NIC (`kernel_args: ["ip=eth0:dhcp"]`), as
a many-NIC machine must. Its own ignition file (`<ignition_dir>/node/worker-0.ign`)
is there too.

worker-0 network-boots as in test_pxe_vms.py (OVMF's PXE, ipxe.efi by TFTP, the iPXE
script over HTTP) into the stand-in client OS, whose init (live.sh) reads the command
line as RHCOS does: dracut's one `ip=` for the NIC it names and the rootfs fetched
from `coreos.live.rootfs_url` (200, the bytes served); coreos-installer's absolute
install device, no legacy `coreos.inst=yes`, no image URL (none was set) and the
ignition fetched (200, this node's own file). Then the operator sets `boot.image`,
reloads and asks for a reinstall: the second boot fetches the image URL (200).
One VM, two boots, each bounded in time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import guest as guest_os
from tests.e2e.lab import (
    SERVER,
    Appliance,
    Lab,
    dgxpod_inventory,
    install_loaders,
    tail,
    write_ignition,
)
from tests.e2e.vm import OVMF_CODE, OVMF_VARS, QEMU, Machine, probe_accel
from tests.helpers import need_tool, wait_until, write_inventory

pytestmark = [pytest.mark.root, pytest.mark.e2e]

NODE, MAC, NODE_IP = "worker-0", "02:00:00:00:03:44", "192.0.2.44"
NIC = "eth0"  # the guest kernel's name for its one NIC (no udev renaming)
BOOT_LIMIT = 200.0  # one UEFI VM under TCG takes 40-80 s; with KVM about 15
ROOTFS_BYTES = 4 << 20  # a stand-in for the 1 GB live rootfs: big enough to stream
IMAGE_BYTES = 1 << 20


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: .ci/run must install it")
    pytest.skip(reason)


@dataclass
class LiveBoot:
    lab: Lab
    appliance: Appliance
    machine: Machine
    rootfs: bytes
    ignition: bytes
    workdir: Path
    accel: str
    first: dict[str, Any] | None = None  # the first boot's E2E-RESULT

    def why(self) -> str:
        return (
            f"{self.machine.describe()}\n--- appliance log (last 40 lines) ---\n"
            f"{tail(self.appliance.log_path, 40)}\n(accel {self.accel}; logs in {self.workdir})"
        )

    def boot(self) -> dict[str, Any]:
        """One network boot of the VM to its power-off; its result, checked for shape."""
        started = time.monotonic()
        self.machine.boot(self.lab)
        try:
            wait_until(
                lambda: not self.machine.running(), BOOT_LIMIT, "the VM powered off", step=1.0
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.why()}") from None
        finally:
            self.machine.stop(self.lab)
        took = time.monotonic() - started
        print(f"e2e live: boot {self.machine.boots} ({self.accel}) took {took:.0f} s")
        result = self.machine.result()
        assert result is not None, f"no E2E-RESULT line\n{self.why()}"
        assert "error" not in result, f"{result['error']}\n{self.why()}"
        assert result.get("mode") == "live", f"not read as a live PXE boot: {result}\n{self.why()}"
        return result

    def result(self) -> dict[str, Any]:
        assert self.first is not None, "the first boot did not finish"
        return self.first


def live_inventory(workdir: Path) -> dict[str, Any]:
    raw = dgxpod_inventory(
        workdir,
        kernel="e2e/vmlinuz",
        initramfs="e2e/initramfs.img",
        rootfs="e2e/rootfs.img",
        kernel_args=["console=tty0", "console=ttyS0", "panic=-1"],
    )
    # image unset: coreos-installer copies the live image, there is no image URL.
    raw["boot"].pop("image", None)
    raw["boot"]["install_device"] = "vda"  # a bare name: live mode writes /dev/vda
    (node,) = (n for n in raw["nodes"] if n["name"] == NODE)
    node.pop("install_device", None)
    node["kernel_args"] = [f"ip={NIC}:dhcp"]
    return raw


@pytest.fixture(scope="module")
def live_boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBoot]:
    need_tool("ip")
    if not shutil.which(QEMU):
        _missing(f"{QEMU} is not installed (Debian qemu-system-x86)")
    for path, package in (
        (OVMF_CODE, "ovmf"),
        (OVMF_VARS, "ovmf"),
        (Path("/usr/lib/ipxe/ipxe.efi"), "ipxe"),
    ):
        if not path.exists():
            _missing(f"{path} is missing (Debian {package})")
    try:
        guest = guest_os.prepare()
    except guest_os.GuestError as exc:
        _missing(f"cannot build the client OS: {exc}")
    workdir = tmp_path_factory.mktemp("e2e-live")
    images = workdir / "images" / "e2e"
    images.mkdir(parents=True)
    shutil.copyfile(guest.kernel, images / "vmlinuz")
    shutil.copyfile(guest.initramfs, images / "initramfs.img")
    rootfs = os.urandom(ROOTFS_BYTES)
    (images / "rootfs.img").write_bytes(rootfs)
    install_loaders(workdir)
    write_ignition(workdir)
    ignition = json.dumps({"ignition": {"version": "3.2.0"}, "e2e": f"node {NODE}"}).encode()
    (workdir / "ignition" / "node").mkdir()
    (workdir / "ignition" / "node" / f"{NODE}.ign").write_bytes(ignition)
    accel, why = probe_accel(guest.kernel, guest.initramfs, workdir)
    print(f"e2e live: accel {accel} ({why}); logs in {workdir}")
    lab = Lab(workdir)
    try:
        appliance = Appliance(lab, live_inventory(workdir), workdir)
        appliance.wait_serving()
        machine = Machine(NODE, MAC, "uefi", lab.add_tap("tap-live"), workdir, accel)
        made = LiveBoot(lab, appliance, machine, rootfs, ignition, workdir, accel)
        made.first = made.boot()
        yield made
    finally:
        lab.close()


def test_live_boot_arguments_are_what_rhcos_reads(live_boot: LiveBoot) -> None:
    result, why = live_boot.result(), live_boot.why()
    # What the guest found wrong, as dracut / coreos-installer would have stumbled.
    assert result["problems"] == "", f"{result['problems']}\n{why}"
    assert (result["mac"], result["ip"]) == (MAC, NODE_IP), why
    # Exactly one ip=, the node's own, and the lease taken on the NIC it names.
    assert (result["ip_args"], result["ip_arg"], result["nic"]) == (1, f"{NIC}:dhcp", NIC), why
    assert result["install_dev"] == "/dev/vda", why
    # No image was set: no image URL; the installer copies the live image.
    assert result["image_url"] == "", why


def test_live_rootfs_is_fetched_from_the_appliance(live_boot: LiveBoot) -> None:
    result, why = live_boot.result(), live_boot.why()
    assert result["rootfs_url"] == f"http://{SERVER}:8080/images/e2e/rootfs.img", why
    assert result["rootfs_status"] == "200", why
    assert result["rootfs_bytes"] == ROOTFS_BYTES, why
    assert result["rootfs_sha256"] == hashlib.sha256(live_boot.rootfs).hexdigest(), why


def test_live_ignition_is_the_nodes_own(live_boot: LiveBoot) -> None:
    result, why = live_boot.result(), live_boot.why()
    assert result["ignition_url"] == f"http://{SERVER}:8080/ignition/node/{NODE}.ign", why
    assert result["ignition_status"] == "200", why
    assert result["ignition_sha256"] == hashlib.sha256(live_boot.ignition).hexdigest(), why
    # The appliance saw the boot: loader, kernel, initramfs and the ignition fetch.
    stages = live_boot.appliance.nodes()[NODE]["stages"]
    for stage in ("bootloader", "kernel", "initramfs", "ignition"):
        assert stage in stages, f"no {stage} event: {stages}\n{why}"
    assert "boot-error" not in stages, f"{stages['boot-error']}\n{why}"
    assert stages["ignition"]["detail"].endswith(f"{NODE}.ign"), stages


def test_live_image_is_written_and_fetched_once_set(live_boot: LiveBoot) -> None:
    """The operator sets boot.image (a metal image other than the live one), reloads and
    asks for a reinstall: the next boot carries coreos.inst.image_url, which the node
    fetches with 200; the rest stays as it was."""
    appliance, workdir = live_boot.appliance, live_boot.workdir
    image = os.urandom(IMAGE_BYTES)
    (workdir / "images" / "e2e" / "metal.img").write_bytes(image)
    raw = live_inventory(workdir)
    raw["boot"]["image"] = "e2e/metal.img"
    write_inventory(appliance.config, raw)
    token = appliance.token()
    reply = live_boot.lab.get_json("/api/v1/reload", method="POST", token=token)
    assert reply["ok"], reply
    reply = live_boot.lab.get_json(f"/api/v1/nodes/{NODE}/reinstall", method="POST", token=token)
    assert reply["next_boot"] == "install", reply
    result = live_boot.boot()
    why = live_boot.why()
    assert result["problems"] == "", f"{result['problems']}\n{why}"
    assert result["image_url"] == f"http://{SERVER}:8080/images/e2e/metal.img", why
    assert result["image_status"] == "200", why
    assert (result["ip_args"], result["install_dev"]) == (1, "/dev/vda"), why
    assert result["rootfs_status"] == "200" and result["ignition_status"] == "200", why
