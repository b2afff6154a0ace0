"""Boot configurations generated from the plan: pxelinux, GRUB and iPXE (pure text).

Every node's config boots the installer for its role, until the node has fetched
its install ignition; from then on it boots from local disk (pxelinux LOCALBOOT,
GRUB exit to firmware, iPXE exit) until an operator asks for a reinstall. Unknown
machines get local boot: nothing is ever installed on a machine not in the
inventory. The TFTP and HTTP services both serve these as virtual files.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from urllib.parse import parse_qs

from appliance.addr import normalize_mac
from appliance.plan import BootPlan, NodeBoot

IMAGES_PREFIX = "images/"  # TFTP serves boot.images_dir under this prefix
Installed = Callable[[str], bool]  # node name -> has it fetched its install ignition?

_PXELINUX = re.compile(r"(?:^|/)pxelinux\.cfg/(01-[0-9a-fA-F]{2}(?:-[0-9a-fA-F]{2}){5}|default)$")
_GRUB = re.compile(r"(?:^|/)grub\.cfg(?:-(01-[0-9a-fA-F]{2}(?:-[0-9a-fA-F]{2}){5}))?$")
_IPXE = re.compile(r"^/?boot\.ipxe$")


def _mac_from_pxe_name(name: str) -> str | None:
    """`01-52-54-00-aa-bb-cc` (ARP type 1 + MAC) -> `52:54:00:aa:bb:cc`."""
    try:
        return normalize_mac(name[3:])
    except ValueError:
        return None


def _local(boot: NodeBoot | None, installed: Installed, after_install: str) -> bool:
    if boot is None:
        return True  # not in the inventory: never install
    return after_install == "localboot" and installed(boot.node)


def _args(boot: NodeBoot) -> str:
    return " ".join(boot.kernel_args)


def pxelinux(plan: BootPlan, boot: NodeBoot | None, installed: Installed) -> str:
    """pxelinux.cfg: kernel and initrd by TFTP path (images/...), or LOCALBOOT."""
    if _local(boot, installed, plan.after_install):
        why = f"{boot.node} is installed" if boot else "not in the inventory"
        return (
            f"# {why}: boot from local disk\n"
            "DEFAULT local\nPROMPT 0\nTIMEOUT 0\n"
            "LABEL local\n  LOCALBOOT 0\n"
        )
    assert boot is not None
    return (
        f"# {boot.node} ({boot.role}): install RHCOS\n"
        "DEFAULT install\nPROMPT 0\nTIMEOUT 0\n"
        "LABEL install\n"
        f"  KERNEL {IMAGES_PREFIX}{boot.kernel}\n"
        f"  INITRD {IMAGES_PREFIX}{boot.initramfs}\n"
        f"  APPEND {_args(boot)}\n"
    )


def grub(plan: BootPlan, boot: NodeBoot | None, installed: Installed) -> str:
    """grub.cfg for GRUB-based UEFI network boot: paths on GRUB's (tftp) root."""
    if _local(boot, installed, plan.after_install):
        why = f"{boot.node} is installed" if boot else "not in the inventory"
        return (
            f"# {why}: back to the firmware, which boots the next device (the disk)\n"
            "set timeout=0\nexit\n"
        )
    assert boot is not None
    return (
        "set timeout=0\nset default=0\n"
        f"menuentry 'Install {boot.node} ({boot.role})' {{\n"
        f"  linux /{IMAGES_PREFIX}{boot.kernel} {_args(boot)}\n"
        f"  initrd /{IMAGES_PREFIX}{boot.initramfs}\n"
        "}\n"
    )


def ipxe(plan: BootPlan, boot: NodeBoot | None, installed: Installed) -> str:
    """The per-node iPXE script: kernel and initrd over HTTP, or exit to the next device."""
    if _local(boot, installed, plan.after_install):
        why = f"{boot.node} is installed" if boot else "this machine is not in the inventory"
        return f"#!ipxe\necho {why}: booting from local disk\nexit\n"
    assert boot is not None
    # UEFI kernels find their initrd by name: initrd=<name> on the command line.
    return (
        "#!ipxe\n"
        f"echo Installing {boot.node} ({boot.role})\n"
        f"kernel {boot.kernel_url} initrd=initrd {_args(boot)}\n"
        f"initrd --name initrd {boot.initramfs_url}\n"
        "boot\n"
    )


def ipxe_chain(plan: BootPlan) -> str:
    """boot.ipxe without a MAC: ask again with the booting NIC's MAC (netX = that NIC)."""
    return f"#!ipxe\nchain {plan.http_base}/boot.ipxe?mac=${{netX/mac}}\n"


def virtual_file(
    plan: BootPlan, path: str, installed: Installed, query: str = ""
) -> tuple[str, NodeBoot | None] | None:
    """(content, node) for a generated path, or None when `path` is not one of ours."""
    if m := _PXELINUX.search(path):
        name = m.group(1)
        boot = None if name == "default" else _node(plan, _mac_from_pxe_name(name))
        return pxelinux(plan, boot, installed), boot
    if m := _GRUB.search(path):
        boot = _node(plan, _mac_from_pxe_name(m.group(1))) if m.group(1) else None
        return grub(plan, boot, installed), boot
    if _IPXE.match(path):
        macs = parse_qs(query).get("mac")
        if not macs:
            return ipxe_chain(plan), None
        try:
            mac = normalize_mac(macs[0])
        except ValueError:
            return ipxe(plan, None, installed), None
        boot = _node(plan, mac)
        return ipxe(plan, boot, installed), boot
    return None


def _node(plan: BootPlan, mac: str | None) -> NodeBoot | None:
    return plan.by_mac.get(mac) if mac else None


def client_ipv4(remote: str) -> IPv4Address | None:
    """A client's IPv4 address; a dual-stack listener ([::]) sees it as ::ffff:a.b.c.d."""
    try:
        addr = ip_address(remote)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address):
        return addr.ipv4_mapped
    return addr


def split_target(target: str) -> tuple[str, str]:
    """A TFTP file name may carry a query (`boot.ipxe?mac=...`): split it.

    Only at the first `?`: a file name is not a URL (urlsplit would read `//host/`,
    `c:` and `#` in it, and raise on `//[`).
    """
    path, _, query = target.partition("?")
    return path, query
