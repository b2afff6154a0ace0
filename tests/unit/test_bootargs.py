"""What a node boots with (issue 15): live PXE, per-node arguments, ignition and architecture.

One test per rule of the plan's kernel command line, then the rendered pxelinux, GRUB
and iPXE text of a live-PXE inventory with an Arm node and a per-node `ip=`, then what
DHCP and `check` make of the same inventory.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from appliance.checks import file_warnings
from appliance.inventory import InventoryError, parse_inventory
from appliance.plan import NodeBoot, Plan, build_plan
from services import bootconfig
from services.dhcp import codec
from services.dhcp.codec import DhcpMessage
from services.dhcp.leases import LeaseTable
from services.dhcp.policy import DhcpCore
from tests.helpers import loopback_inventory

BASE = "http://127.0.0.1:8080"
ROOTFS = "rhcos/live-rootfs.x86_64.img"
ARM = {
    "kernel": "rhcos/live-kernel-aarch64",
    "initramfs": "rhcos/live-initramfs.aarch64.img",
    "rootfs": "rhcos/live-rootfs.aarch64.img",
}
GH_MAC = "52:54:00:00:00:48"


def _raw(tmp_path: Path, **boot: Any) -> dict[str, Any]:
    raw = loopback_inventory(tmp_path)
    raw["listen"]["http"] = "127.0.0.1:8080"
    raw["boot"].update(
        {
            "kernel": "rhcos/live-kernel-x86_64",
            "initramfs": "rhcos/live-initramfs.x86_64.img",
            "rootfs": ROOTFS,
            "install_device": "nvme0n1",
            "kernel_args": ["console=tty0", "console=ttyS0,115200n8"],
        }
    )
    raw["boot"].update(boot)
    return raw


def _plan(tmp_path: Path, raw: dict[str, Any]) -> Plan:
    return build_plan(parse_inventory(raw, "inv.yaml", tmp_path))


def _node(plan: Plan, name: str) -> NodeBoot:
    return next(b for b in plan.boot.nodes if b.node == name)


def _keys(args: tuple[str, ...], key: str) -> list[str]:
    return [a for a in args if a.split("=", 1)[0] == key]


def _with_arm(raw: dict[str, Any], **node: Any) -> dict[str, Any]:
    raw["boot"]["aarch64"] = dict(ARM)
    raw["nodes"].append(
        {
            "name": "gh-0",
            "role": "worker",
            "mac": GH_MAC,
            "ip": "127.0.0.48",
            "arch": "aarch64",
            "firmware": "uefi",
            **node,
        }
    )
    return raw


# --- live PXE --------------------------------------------------------------------------------


def test_live_pxe_arguments_as_coreos_installer_documents_them(tmp_path: Path) -> None:
    """rootfs set, image never written: rootfs URL, install device, ignition; nothing else."""
    plan = _plan(tmp_path, _raw(tmp_path))
    assert _node(plan, "master-0").kernel_args == (
        "ip=dhcp",
        "rd.neednet=1",
        "console=tty0",
        "console=ttyS0,115200n8",
        f"coreos.live.rootfs_url={BASE}/images/{ROOTFS}",
        "coreos.inst.install_dev=/dev/nvme0n1",
        f"coreos.inst.ignition_url={BASE}/ignition/master.ign",
    )
    boot = _node(plan, "master-0")
    assert boot.image_url is None and boot.rootfs_url == f"{BASE}/images/{ROOTFS}"


def test_live_pxe_image_url_only_when_written(tmp_path: Path) -> None:
    written = _plan(tmp_path, _raw(tmp_path, image="rhcos/metal.x86_64.raw.gz"))
    args = _node(written, "master-0").kernel_args
    assert _keys(args, "coreos.inst.image_url") == [
        f"coreos.inst.image_url={BASE}/images/rhcos/metal.x86_64.raw.gz"
    ]
    assert "coreos.inst=yes" not in args
    # Written as null: no image either (the installer copies the live image).
    nulled = _plan(tmp_path, _raw(tmp_path, image=None))
    assert not _keys(_node(nulled, "master-0").kernel_args, "coreos.inst.image_url")


def test_legacy_installer_arguments_stay(tmp_path: Path) -> None:
    """Without rootfs: SEED.md's arguments, the default image, the device as written."""
    raw = _raw(tmp_path, rootfs=None, install_device="vda")
    args = _node(_plan(tmp_path, raw), "master-0").kernel_args
    assert args == (
        "ip=dhcp",
        "rd.neednet=1",
        "console=tty0",
        "console=ttyS0,115200n8",
        "coreos.inst=yes",
        "coreos.inst.install_dev=vda",
        f"coreos.inst.image_url={BASE}/images/rhcos/metal.raw.gz",
        f"coreos.inst.ignition_url={BASE}/ignition/master.ign",
    )


@pytest.mark.parametrize(
    ("device", "written"),
    [
        ("sda", "/dev/sda"),
        ("nvme0n1", "/dev/nvme0n1"),
        ("/dev/sdb", "/dev/sdb"),
        ("/dev/disk/by-path/pci-0000:01:00.0-nvme-1", "/dev/disk/by-path/pci-0000:01:00.0-nvme-1"),
        ("disk/by-id/wwn-0x5000c500a1b2c3d4", "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"),
    ],
)
def test_live_pxe_device_is_a_path(tmp_path: Path, device: str, written: str) -> None:
    raw = _raw(tmp_path)
    raw["nodes"][2]["install_device"] = device
    boot = _node(_plan(tmp_path, raw), "worker-0")
    assert _keys(boot.kernel_args, "coreos.inst.install_dev") == [
        f"coreos.inst.install_dev={written}"
    ]
    assert boot.install_device == written


# --- per-node arguments replace, never duplicate ---------------------------------------------


def test_node_ip_replaces_the_derived_one_in_place(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["nodes"][1]["kernel_args"] = ["ip=enp1s0f0:dhcp", "nvidia-drm.modeset=1"]
    args = _node(_plan(tmp_path, raw), "master-0").kernel_args
    assert _keys(args, "ip") == ["ip=enp1s0f0:dhcp"]
    assert args[0] == "ip=enp1s0f0:dhcp"  # where ip=dhcp was
    assert args[-1] == "nvidia-drm.modeset=1"  # a new key: appended
    assert len(args) == 8


def test_node_console_replaces_every_global_console(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["nodes"][1]["kernel_args"] = ["console=ttyS1,115200n8"]
    args = _node(_plan(tmp_path, raw), "master-0").kernel_args
    assert _keys(args, "console") == ["console=ttyS1,115200n8"]
    assert args[2] == "console=ttyS1,115200n8"  # at the first console='s place
    # Two of the node's own: both kept, in its order, still in that place.
    raw["nodes"][1]["kernel_args"] = ["console=tty0", "console=ttyS1,9600"]
    args = _node(_plan(tmp_path, raw), "master-0").kernel_args
    assert args[2:4] == ("console=tty0", "console=ttyS1,9600")
    assert len(_keys(args, "console")) == 2


def test_global_arguments_replace_derived_and_node_beats_global(tmp_path: Path) -> None:
    raw = _raw(tmp_path, kernel_args=["ip=dhcp6", "rd.neednet=0", "console=ttyS0"])
    args = _node(_plan(tmp_path, raw), "worker-0").kernel_args
    assert args[:3] == ("ip=dhcp6", "rd.neednet=0", "console=ttyS0")
    assert len(_keys(args, "ip")) == 1 and len(_keys(args, "rd.neednet")) == 1
    raw["nodes"][2]["kernel_args"] = ["ip=enp1s0f0:dhcp"]
    args = _node(_plan(tmp_path, raw), "worker-0").kernel_args
    assert _keys(args, "ip") == ["ip=enp1s0f0:dhcp"] and args[0] == "ip=enp1s0f0:dhcp"


def test_node_coreos_inst_arguments_replace_derived(tmp_path: Path) -> None:
    raw = _raw(tmp_path, rootfs=None)
    raw["nodes"][1]["kernel_args"] = [
        "coreos.inst.install_dev=/dev/sdc",
        "coreos.inst.ignition_url=http://10.0.0.9/m.ign",
        "coreos.inst.insecure",
    ]
    args = _node(_plan(tmp_path, raw), "master-0").kernel_args
    assert _keys(args, "coreos.inst.install_dev") == ["coreos.inst.install_dev=/dev/sdc"]
    assert _keys(args, "coreos.inst.ignition_url") == [
        "coreos.inst.ignition_url=http://10.0.0.9/m.ign"
    ]
    assert args.index("coreos.inst.install_dev=/dev/sdc") == args.index("coreos.inst=yes") + 1
    assert args[-1] == "coreos.inst.insecure"
    # The same argument twice in one list is the operator's to keep (dracut may want it).
    raw["nodes"][1]["kernel_args"] = ["ip=eno1:dhcp", "ip=eno2:none"]
    args = _node(_plan(tmp_path, raw), "master-0").kernel_args
    assert _keys(args, "ip") == ["ip=eno1:dhcp", "ip=eno2:none"]


# --- per-node ignition ------------------------------------------------------------------------


def test_node_ignition_file_when_it_exists(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    before = _node(_plan(tmp_path, raw), "worker-0")
    assert before.ignition_url == f"{BASE}/ignition/worker.ign"
    assert before.ignition_file == "worker.ign"
    (tmp_path / "ignition" / "node").mkdir(parents=True)
    (tmp_path / "ignition" / "node" / "worker-0.ign").write_text("{}")
    plan = _plan(tmp_path, raw)  # what a reload does
    after = _node(plan, "worker-0")
    assert after.ignition_file == "node/worker-0.ign"
    assert after.ignition_url == f"{BASE}/ignition/node/worker-0.ign"
    assert _keys(after.kernel_args, "coreos.inst.ignition_url") == [
        f"coreos.inst.ignition_url={BASE}/ignition/node/worker-0.ign"
    ]
    assert _node(plan, "master-0").ignition_url == f"{BASE}/ignition/master.ign"  # others not


def test_node_ignition_directory_or_dangling_link_is_not_a_file(tmp_path: Path) -> None:
    node_dir = tmp_path / "ignition" / "node"
    (node_dir / "worker-0.ign").mkdir(parents=True)
    (node_dir / "master-0.ign").symlink_to(tmp_path / "nowhere.ign")
    plan = _plan(tmp_path, _raw(tmp_path))
    assert _node(plan, "worker-0").ignition_file == "worker.ign"
    assert _node(plan, "master-0").ignition_file == "master.ign"


# --- per architecture ---------------------------------------------------------------------------


def test_arm_node_gets_the_aarch64_artifacts(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _with_arm(_raw(tmp_path)))
    gh = _node(plan, "gh-0")
    assert gh.arch == "aarch64"
    assert gh.kernel == ARM["kernel"] and gh.initramfs == ARM["initramfs"]
    assert gh.kernel_url == f"{BASE}/images/{ARM['kernel']}"
    assert gh.initramfs_url == f"{BASE}/images/{ARM['initramfs']}"
    assert _keys(gh.kernel_args, "coreos.live.rootfs_url") == [
        f"coreos.live.rootfs_url={BASE}/images/{ARM['rootfs']}"
    ]
    assert not _keys(gh.kernel_args, "coreos.inst.image_url")
    x86 = _node(plan, "worker-0")
    assert x86.arch == "x86_64" and x86.kernel == "rhcos/live-kernel-x86_64"
    assert f"coreos.live.rootfs_url={BASE}/images/{ROOTFS}" in x86.kernel_args


def test_arm_image_and_legacy_mode_follow_the_aarch64_block(tmp_path: Path) -> None:
    raw = _with_arm(_raw(tmp_path))
    raw["boot"]["aarch64"]["image"] = "rhcos/metal.aarch64.raw.gz"
    gh = _node(_plan(tmp_path, raw), "gh-0")
    assert f"coreos.inst.image_url={BASE}/images/rhcos/metal.aarch64.raw.gz" in gh.kernel_args
    # No aarch64 rootfs: the legacy installer with the aarch64 image, even when x86 is live.
    del raw["boot"]["aarch64"]["rootfs"]
    gh = _node(_plan(tmp_path, raw), "gh-0")
    assert "coreos.inst=yes" in gh.kernel_args and gh.rootfs_url is None
    assert "coreos.inst.install_dev=nvme0n1" in gh.kernel_args


def test_arm_node_without_aarch64_artifacts_is_an_error(tmp_path: Path) -> None:
    raw = _with_arm(_raw(tmp_path))
    del raw["boot"]["aarch64"]
    with pytest.raises(InventoryError) as err:
        _plan(tmp_path, raw)
    assert [p.path for p in err.value.problems] == ["nodes[3].arch"]
    assert "boot.aarch64" in str(err.value)


@pytest.mark.parametrize(
    ("aarch64", "path"),
    [
        ({"initramfs": "a.img", "rootfs": "r.img"}, "boot.aarch64.kernel"),
        ({"kernel": "k", "initramfs": "i"}, "boot.aarch64"),  # neither rootfs nor image
        ({"kernel": "k", "initramfs": "i", "rootfs": "r", "ramdisk": "x"}, "boot.aarch64.ramdisk"),
    ],
)
def test_aarch64_block_mistakes(tmp_path: Path, aarch64: dict[str, str], path: str) -> None:
    raw = _with_arm(_raw(tmp_path))
    raw["boot"]["aarch64"] = aarch64
    with pytest.raises(InventoryError) as err:
        _plan(tmp_path, raw)
    assert path in [p.path for p in err.value.problems], err.value


def test_arm_node_cannot_be_bios_and_arch_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InventoryError) as err:
        _plan(tmp_path, _with_arm(_raw(tmp_path), firmware="bios"))
    assert [p.path for p in err.value.problems] == ["nodes[3].firmware"]
    with pytest.raises(InventoryError) as err:
        _plan(tmp_path, _with_arm(_raw(tmp_path), arch="arm64"))
    assert [p.path for p in err.value.problems] == ["nodes[3].arch"]


# --- the rendered configs ---------------------------------------------------------------------


def never(_node: str) -> bool:
    return False


@pytest.fixture
def live(tmp_path: Path) -> Plan:
    """Live PXE, an Arm node, a per-node ip= on worker-0."""
    raw = _with_arm(_raw(tmp_path), kernel_args=["ip=enP5p3s0f0np0:dhcp"])
    raw["nodes"][2]["kernel_args"] = ["ip=enp1s0f0:dhcp"]
    return _plan(tmp_path, raw)


def _render(plan: Plan, mac: str) -> dict[str, str]:
    pxe = "01-" + mac.replace(":", "-")
    out = {}
    for kind, path, query in (
        ("pxelinux", f"pxelinux.cfg/{pxe}", ""),
        ("grub", f"grub.cfg-{pxe}", ""),
        ("ipxe", "boot.ipxe", f"mac={mac}"),
    ):
        found = bootconfig.virtual_file(plan.boot, path, never, query)
        assert found is not None
        out[kind] = found[0]
    return out


def test_rendered_configs_of_a_live_x86_node_with_its_own_ip(live: Plan) -> None:
    args = (
        "ip=enp1s0f0:dhcp rd.neednet=1 console=tty0 console=ttyS0,115200n8 "
        f"coreos.live.rootfs_url={BASE}/images/{ROOTFS} coreos.inst.install_dev=/dev/nvme0n1 "
        f"coreos.inst.ignition_url={BASE}/ignition/worker.ign"
    )
    text = _render(live, "52:54:00:00:00:44")
    assert text["pxelinux"] == (
        "# worker-0 (worker): install RHCOS\n"
        "DEFAULT install\nPROMPT 0\nTIMEOUT 0\n"
        "LABEL install\n"
        "  KERNEL images/rhcos/live-kernel-x86_64\n"
        "  INITRD images/rhcos/live-initramfs.x86_64.img\n"
        f"  APPEND {args}\n"
    )
    assert text["grub"] == (
        "set timeout=0\nset default=0\n"
        "menuentry 'Install worker-0 (worker)' {\n"
        f"  linux /images/rhcos/live-kernel-x86_64 {args}\n"
        "  initrd /images/rhcos/live-initramfs.x86_64.img\n"
        "}\n"
    )
    assert text["ipxe"] == (
        "#!ipxe\n"
        "echo Installing worker-0 (worker)\n"
        f"kernel {BASE}/images/rhcos/live-kernel-x86_64 initrd=initrd {args}\n"
        f"initrd --name initrd {BASE}/images/rhcos/live-initramfs.x86_64.img\n"
        "boot\n"
    )


def test_rendered_configs_of_an_arm_node(live: Plan) -> None:
    args = (
        "ip=enP5p3s0f0np0:dhcp rd.neednet=1 console=tty0 console=ttyS0,115200n8 "
        f"coreos.live.rootfs_url={BASE}/images/{ARM['rootfs']} "
        "coreos.inst.install_dev=/dev/nvme0n1 "
        f"coreos.inst.ignition_url={BASE}/ignition/worker.ign"
    )
    text = _render(live, GH_MAC)
    assert f"  KERNEL images/{ARM['kernel']}\n" in text["pxelinux"]
    assert f"  INITRD images/{ARM['initramfs']}\n" in text["pxelinux"]
    assert f"  APPEND {args}\n" in text["pxelinux"]
    assert f"  linux /images/{ARM['kernel']} {args}\n" in text["grub"]
    assert f"  initrd /images/{ARM['initramfs']}\n" in text["grub"]
    assert f"kernel {BASE}/images/{ARM['kernel']} initrd=initrd {args}\n" in text["ipxe"]
    assert f"initrd --name initrd {BASE}/images/{ARM['initramfs']}\n" in text["ipxe"]
    for config in text.values():
        assert config.count("ip=") == 1 and "x86_64" not in config


# --- DHCP: the arm64 loader, and a client that contradicts nodes[].arch -----------------------


def _dhcp(plan: Plan) -> DhcpCore:
    return DhcpCore(plan.dhcp, LeaseTable(None), 67, Counter())


def _discover(mac: str, arch: int | None, vendor: bytes = b"PXEClient:Arch:00011") -> bytes:
    options = {codec.OPT_MESSAGE_TYPE: bytes((codec.DISCOVER,)), codec.OPT_VENDOR_CLASS: vendor}
    if arch is not None:
        options[codec.OPT_CLIENT_ARCH] = codec.u16(arch)
    m = DhcpMessage(
        op=codec.BOOTREQUEST, xid=7, chaddr=bytes.fromhex(mac.replace(":", "")), options=options
    )
    return codec.encode(m)


def test_arm_node_gets_the_arm64_loader(live: Plan) -> None:
    core = _dhcp(live)
    for arch in (11, None):  # its own report, or none at all (firmware: uefi)
        out = core.handle(_discover(GH_MAC, arch), ("127.0.0.48", 68), 1000.0)
        offer = codec.parse(out.replies[0].data)
        assert offer.file == b"ipxe-arm64.efi", arch
        assert not out.warning


def test_x86_node_reporting_arm64_is_warned_naming_the_key(live: Plan) -> None:
    core = _dhcp(live)
    out = core.handle(_discover("52:54:00:00:00:44", 11), ("127.0.0.44", 68), 1000.0)
    assert "nodes[2].arch" in out.warning and "worker-0" in out.warning
    assert "uefi-arm64" in out.warning
    [(node, stage, detail)] = out.events
    assert (node, stage) == ("worker-0", "dhcp-offer") and "nodes[2].arch" in detail
    assert core.counters["arch_mismatch"] == 1
    # HTTP boot (19) too; the warning line is not repeated for every retransmission.
    http = _discover("52:54:00:00:00:44", 19, b"HTTPClient:Arch:00019")
    again = core.handle(http, ("127.0.0.44", 68), 1001.0)
    assert not again.warning and "nodes[2].arch" in again.events[0][2]
    assert core.counters["arch_mismatch"] == 2
    later = core.handle(http, ("127.0.0.44", 68), 1000.0 + 3600)
    assert "nodes[2].arch" in later.warning


def test_arm_node_reporting_x86_is_warned(live: Plan) -> None:
    core = _dhcp(live)
    out = core.handle(_discover(GH_MAC, 7), ("127.0.0.48", 68), 1000.0)
    assert "nodes[3].arch" in out.warning and "aarch64" in out.warning
    # The loader follows what the firmware can run; the kernel would not: hence the line.
    assert codec.parse(out.replies[0].data).file == b"ipxe.efi"


# --- check ---------------------------------------------------------------------------------


def test_check_does_not_ask_for_an_image_that_is_never_fetched(tmp_path: Path) -> None:
    raw = _with_arm(_raw(tmp_path))
    images = tmp_path / "images"
    for rel in (
        "rhcos/live-kernel-x86_64",
        "rhcos/live-initramfs.x86_64.img",
        ROOTFS,
        *ARM.values(),
    ):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(b"x")
    keys = [p.path for p in file_warnings(_plan(tmp_path, raw))]
    assert not [k for k in keys if k.startswith("boot.") and k != "boot.tftp_root"], keys
    (images / ROOTFS).unlink()
    (images / ARM["kernel"]).unlink()
    problems = [str(p) for p in file_warnings(_plan(tmp_path, raw))]
    assert any(p.startswith("boot.rootfs:") for p in problems), problems
    assert any(p.startswith("boot.aarch64.kernel:") for p in problems), problems


# --- one list item is one argument: nothing that would break or inject config lines ------------


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("nodes[1].kernel_args[0]", "ip=dhcp rd.break"),  # two arguments: the dedupe misses one
        ("nodes[1].kernel_args[0]", "quiet\n  KERNEL images/evil"),  # a new pxelinux line
        ("nodes[1].kernel_args[0]", "x=1;exit"),  # GRUB runs what follows ';'
        ("nodes[1].kernel_args[0]", "x=${net0/mac}"),  # iPXE and GRUB expand $...
        ("nodes[1].kernel_args[0]", ""),
        ("boot.kernel_args[1]", 'console="ttyS0"'),
        ("boot.install_device", "/dev/sda rd.break"),
        ("nodes[2].install_device", "sdb\n"),
        ("boot.kernel", "rhcos/live kernel"),
        ("boot.rootfs", "rhcos/root\tfs.img"),
    ],
)
def test_arguments_and_paths_that_would_break_the_configs_are_refused(
    tmp_path: Path, where: str, value: str
) -> None:
    raw = _raw(tmp_path)
    if where.startswith("nodes[1].kernel_args"):
        raw["nodes"][1]["kernel_args"] = [value]
    elif where == "boot.kernel_args[1]":
        raw["boot"]["kernel_args"] = ["console=tty0", value]
    elif where.startswith("nodes[2]"):
        raw["nodes"][2]["install_device"] = value
    else:
        raw["boot"][where.removeprefix("boot.")] = value
    with pytest.raises(InventoryError) as err:
        _plan(tmp_path, raw)
    assert [p.path for p in err.value.problems] == [where], err.value
