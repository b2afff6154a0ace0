"""Warnings about files the plan points at: missing boot files are not load errors.

An operator writes the inventory before `openshift-install` has made the ignition
files and before the RHCOS images are downloaded, so `check` reports what is still
missing instead of refusing the inventory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from appliance.inventory import Problem
from appliance.plan import Plan

# Where Debian's `ipxe` package puts the loaders the defaults name.
DEBIAN_IPXE = {
    "undionly.kpxe": "/usr/lib/ipxe/undionly.kpxe",
    "ipxe.efi": "/usr/lib/ipxe/ipxe.efi",
}


def _ipxe_hint(loader: str) -> str:
    found = DEBIAN_IPXE.get(loader)
    if found is None:
        return ""
    return f" (Debian's ipxe package installs it as {found}: copy it there)"


def _missing(path: Path) -> bool:
    return not path.exists()


def file_warnings(plan: Plan) -> list[Problem]:
    out: list[Problem] = []
    boot = plan.boot
    if _missing(boot.ignition_dir):
        out.append(
            Problem(
                "cluster.ignition_dir",
                f"{boot.ignition_dir} does not exist "
                "(openshift-install --dir <it> create ignition-configs writes it)",
            )
        )
    else:
        for name in sorted({n.ignition_file for n in boot.nodes}):
            if _missing(boot.ignition_dir / name):
                out.append(
                    Problem("cluster.ignition_dir", f"{boot.ignition_dir / name} is missing")
                )
    first = boot.nodes[0] if boot.nodes else None
    if _missing(boot.images_dir):
        out.append(Problem("boot.images_dir", f"{boot.images_dir} does not exist"))
    elif first is not None:
        wanted = {"boot.kernel": first.kernel, "boot.initramfs": first.initramfs}
        for key, url in (("boot.image", first.image_url), ("boot.rootfs", first.rootfs_url)):
            if url:
                wanted[key] = url.split("/images/", 1)[1]
        for key, rel in wanted.items():
            if _missing(boot.images_dir / rel):
                out.append(Problem(key, f"{boot.images_dir / rel} is missing"))
    if _missing(boot.tftp_root):
        out.append(Problem("boot.tftp_root", f"{boot.tftp_root} does not exist"))
    else:
        files = plan.dhcp.boot_files
        firmware = {n.firmware for n in boot.nodes}
        loaders = []
        if firmware & {"auto", "bios"}:
            loaders.append(files.bios)
        if firmware & {"auto", "uefi"}:
            loaders.append(files.uefi_x64)
        for loader in loaders:
            if _missing(boot.tftp_root / loader):
                out.append(
                    Problem("boot.tftp_root", f"boot loader {boot.tftp_root / loader} is missing")
                )
    state = plan.state_dir
    probe = state if state.exists() else state.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        out.append(Problem("state_dir", f"{state} is not writable by this user"))
    return out


def install_warnings(plan: Plan) -> list[Problem]:
    """What the install lacks that the plan would use: the TFTP lock-step loop in C."""
    out: list[Problem] = []
    if "tftp" in plan.listen and importlib.util.find_spec("services.tftp._lockstep") is None:
        out.append(
            Problem(
                "listen.tftp",
                "the TFTP lock-step loop runs in Python: services.tftp._lockstep was not "
                "built at install (no C compiler or Python headers: apt-get install gcc "
                "python3-dev, then pip install again); transfers work, at more CPU per block",
            )
        )
    return out
