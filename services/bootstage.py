"""What a boot path is to a node, for both boot services (TFTP and HTTP): one answer.

A path lives in one of three places (its route): "root" (boot.tftp_root: TFTP names,
HTTP /boot/...), "images" (boot.images_dir: TFTP images/..., HTTP /images/...) or
"ignition" (HTTP /ignition/...). `boot_file` names what it is to the node (for boot
errors too), `boot_stage` the install stage its fetch reaches, or None.

Before, TFTP and HTTP decided the stage each its own way: HTTP called every file under
/boot/ a boot loader, and TFTP knew a loader only by its base name. Now a loader is a
configured loader name (dhcp boot_files), as the whole path or its last part, by either
service; the kernel and initramfs are the node's own (boot.kernel, boot.initramfs under
images); ignition is any served ignition file. Rootfs, images and generated configs
(pxelinux.cfg, grub.cfg, iPXE scripts) are no stage of their own.
"""

from __future__ import annotations

from typing import Literal

from appliance.plan import BootFiles, NodeBoot
from services.bootconfig import IMAGES_PREFIX

Route = Literal["root", "images", "ignition"]
Stage = Literal["bootloader", "kernel", "initramfs", "ignition"]

# What a boot file is -> the stage its fetch reaches (appliance.events.STAGES).
STAGE_OF: dict[str, Stage] = {
    "loader": "bootloader",
    "kernel": "kernel",
    "initramfs": "initramfs",
    "ignition": "ignition",
}
_HTTP_ROUTES: tuple[tuple[str, Route], ...] = (
    ("/boot/", "root"),
    ("/images/", "images"),
    ("/ignition/", "ignition"),
)


def boot_file(boot: NodeBoot | None, files: BootFiles, route: str, rel: str) -> str | None:
    """What `rel` is to this node: kernel, initramfs, rootfs, image, loader, ignition or
    file; None for a name a firmware only probes for (pxelinux and GRUB try many that
    need not exist)."""
    name = rel.replace("\\", "/").lstrip("/")
    if route == "ignition":
        return "ignition"
    if route == "images":
        if boot is not None:
            for what, url in (
                ("kernel", boot.kernel_url),
                ("initramfs", boot.initramfs_url),
                ("rootfs", boot.rootfs_url),
                ("image", boot.image_url),
            ):
                if url and url.endswith("/images/" + name):
                    return what
            if name in (boot.kernel, boot.initramfs):
                return "kernel" if name == boot.kernel else "initramfs"
        # Nothing probes images_dir: whatever is asked for there, a boot config named.
        return "file"
    loaders = {files.bios, files.uefi_x64, files.uefi_arm64}
    if name in loaders or name.rsplit("/", 1)[-1] in loaders:
        return "loader"
    return None


def boot_stage(boot: NodeBoot | None, files: BootFiles, route: str, rel: str) -> Stage | None:
    """The install stage a node reaches when this file is served to it, or None."""
    what = boot_file(boot, files, route, rel)
    return STAGE_OF.get(what) if what is not None else None


def tftp_route(name: str) -> tuple[Route, str]:
    """A TFTP file name as (route, path below it): images/... is images_dir."""
    clean = name.replace("\\", "/").lstrip("/")
    if clean.startswith(IMAGES_PREFIX):
        return "images", clean[len(IMAGES_PREFIX) :]
    return "root", clean


def http_route(path: str) -> tuple[Route, str] | None:
    """An HTTP path as (route, path below it); None for generated configs and the rest."""
    for prefix, route in _HTTP_ROUTES:
        if path.startswith(prefix):
            return route, path[len(prefix) :]
    return None
