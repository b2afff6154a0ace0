"""One classification of boot paths for TFTP and HTTP (services.bootstage), and the
shared jail (services.bootfiles) that HTTP uses without importing the TFTP service."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address

import pytest

from appliance.plan import BootFiles, NodeBoot
from services.bootstage import boot_stage, http_route, tftp_route

BOOT = NodeBoot(
    node="worker-0", role="worker", mac="52:54:00:00:00:44", ip=IPv4Address("192.0.2.44"),
    firmware="auto", kernel="rhcos/vmlinuz", initramfs="rhcos/initramfs.img",
    kernel_url="http://192.0.2.1:8080/images/rhcos/vmlinuz",
    initramfs_url="http://192.0.2.1:8080/images/rhcos/initramfs.img",
    ignition_file="worker.ign", ignition_url="http://192.0.2.1:8080/ignition/worker.ign",
    install_device="/dev/sda", image_url=None,
    rootfs_url="http://192.0.2.1:8080/images/rhcos/rootfs.img", kernel_args=(),
)  # fmt: skip
IPXE = BootFiles()  # undionly.kpxe, ipxe.efi, ipxe-arm64.efi
SYSLINUX = BootFiles(bios="pxelinux.0", uefi_x64="grubx64.efi", uefi_arm64="efi/grubaa64.efi")

# (TFTP name, HTTP path, the stage with IPXE loaders, the stage with SYSLINUX loaders)
TABLE = [
    ("undionly.kpxe", "/boot/undionly.kpxe", "bootloader", None),
    ("ipxe.efi", "/boot/ipxe.efi", "bootloader", None),
    ("pxelinux.0", "/boot/pxelinux.0", None, "bootloader"),
    ("grubx64.efi", "/boot/grubx64.efi", None, "bootloader"),
    ("/grubx64.efi", "/boot/grubx64.efi", None, "bootloader"),
    ("efi/grubaa64.efi", "/boot/efi/grubaa64.efi", None, "bootloader"),  # the loader's own path
    ("x86/ipxe.efi", "/boot/x86/ipxe.efi", "bootloader", None),  # a loader's name in a folder
    ("ldlinux.c32", "/boot/ldlinux.c32", None, None),  # a pxelinux module: no stage
    ("grub/x86_64-efi/command.lst", "/boot/grub/x86_64-efi/command.lst", None, None),
    ("images/rhcos/vmlinuz", "/images/rhcos/vmlinuz", "kernel", "kernel"),
    ("images/rhcos/initramfs.img", "/images/rhcos/initramfs.img", "initramfs", "initramfs"),
    ("images\\rhcos\\vmlinuz", None, "kernel", "kernel"),  # a DOS-style TFTP name
    ("images/rhcos/rootfs.img", "/images/rhcos/rootfs.img", None, None),  # no stage of its own
    ("images/other/vmlinuz", "/images/other/vmlinuz", None, None),  # not this node's kernel
    ("rhcos/vmlinuz", "/boot/rhcos/vmlinuz", None, None),  # the kernel's name, not under images
    (None, "/ignition/worker.ign", "ignition", "ignition"),
    (None, "/ignition/node/worker-0.ign", "ignition", "ignition"),
    ("worker.ign", "/boot/worker.ign", None, None),  # never served there: no stage
    ("pxelinux.cfg/01-52-54-00-00-00-44", "/pxelinux.cfg/01-52-54-00-00-00-44", None, None),
    ("grub.cfg-01-52-54-00-00-00-44", "/grub.cfg-01-52-54-00-00-00-44", None, None),
    ("boot.ipxe", "/boot.ipxe", None, None),  # iPXE scripts: configs, no stage
]


@pytest.mark.parametrize(("tftp", "http", "ipxe", "syslinux"), TABLE)
def test_one_stage_per_path_for_tftp_and_http(
    tftp: str | None, http: str | None, ipxe: str | None, syslinux: str | None
) -> None:
    for files, stage in ((IPXE, ipxe), (SYSLINUX, syslinux)):
        if tftp is not None:
            assert boot_stage(BOOT, files, *tftp_route(tftp)) == stage, (tftp, files)
        if http is not None:
            route = http_route(http)
            got = boot_stage(BOOT, files, *route) if route is not None else None
            assert got == stage, (http, files)


def test_an_unplanned_node_reaches_only_the_loader() -> None:
    assert boot_stage(None, IPXE, *tftp_route("undionly.kpxe")) == "bootloader"
    assert boot_stage(None, IPXE, *tftp_route("images/rhcos/vmlinuz")) is None


def test_routes() -> None:
    assert tftp_route("images/a/b") == ("images", "a/b")
    assert tftp_route("/images/a") == ("images", "a")
    assert tftp_route("pxelinux.0") == ("root", "pxelinux.0")
    assert http_route("/boot/images/a") == ("root", "images/a")  # tftp_root's own images/
    assert http_route("/images/a") == ("images", "a")
    assert http_route("/ignition/node/m.ign") == ("ignition", "node/m.ign")
    assert http_route("/boot.ipxe") is None


def test_http_imports_no_tftp_and_the_shared_modules_no_service() -> None:
    code = (
        "import sys, services.http.server, services.bootstage, services.bootfiles;"
        "print(sorted(m for m in sys.modules if m.startswith('services.tftp')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # (appliance.plan itself pulls in socket; the packages' __init__ modules are the
    # registry's business: only these two shared modules are checked here.)
    code = (
        "import sys, services.bootstage, services.bootfiles;"
        "bad = ('asyncio', 'aiohttp', 'sqlite3');"
        "print(sorted(m for m in sys.modules if m in bad or m.startswith('services.')"
        " and m not in ('services.bootstage', 'services.bootfiles', 'services.bootconfig')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
