"""The shipped example inventories pass their own `appliance check`, and the current-release
example (config/dgx-rhcos.yaml) boots as RHCOS live PXE and coreos-installer expect."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

import pytest

from appliance.checks import current_user, preflight
from appliance.cli import main
from appliance.hostinfo import HostFacts, LocalRoute
from appliance.inventory import load_inventory
from appliance.plan import Plan, build_plan
from tests.helpers import CONFIG

EXAMPLES = sorted(p.name for p in CONFIG.glob("*.yaml"))


def test_the_current_release_example_is_shipped() -> None:
    assert "dgx-rhcos.yaml" in EXAMPLES, EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_passes_its_own_check(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check", "--config", str(CONFIG / name)])
    out = capsys.readouterr()
    assert status == 0, out.out + out.err
    assert f"{CONFIG / name}: OK" in out.out, out.out + out.err


def _intended_host(plan: Plan) -> HostFacts:
    """The provisioning host an example is written for: its interface holds
    network.address and the load balancer's address; every capability granted."""
    nic = plan.dhcp.interface or "eth0"
    local = (
        LocalRoute(IPv4Network("127.0.0.0/8"), "lo"),
        LocalRoute(IPv4Network(f"{plan.dhcp.server_id}/32"), nic),
        LocalRoute(IPv4Network(f"{plan.load_balancer}/32"), nic),
    )
    return HostFacts(
        local=local,
        interfaces=frozenset({"lo", nic}),
        cap_eff=(1 << 41) - 1,
        unprivileged_port_start=1024,
        ping_group_range=(1, 0),
        gids=frozenset({0}),
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_preflight_has_no_errors_on_its_host(name: str) -> None:
    # On the host it describes (its addresses there, ports free), an example that an
    # operator copies must not be refused: missing images, loaders and ignition are
    # warnings (they are not shipped), errors would be the file's own.
    plan = build_plan(load_inventory(CONFIG / name))
    findings = preflight(plan, _intended_host(plan), current_user(), rows=[], owners={})
    errors = [str(f) for f in findings if f.error]
    assert not errors, errors


def _args() -> dict[str, list[str]]:
    plan = build_plan(load_inventory(CONFIG / "dgx-rhcos.yaml"))
    return {b.node: list(b.kernel_args) for b in plan.boot.nodes}


def _values(args: list[str], key: str) -> list[str]:
    return [a.partition("=")[2] for a in args if a.partition("=")[0] == key]


def test_dgx_rhcos_is_live_pxe_without_image() -> None:
    for node, args in _args().items():
        # coreos-installer's live PXE arguments; the legacy installer's switch is gone
        # and, with `image` unset, so is the image URL (the live image is copied).
        assert "coreos.inst=yes" not in args, (node, args)
        assert _values(args, "coreos.inst.image_url") == [], (node, args)
        (rootfs,) = _values(args, "coreos.live.rootfs_url")
        arch = "aarch64" if node == "gh-0" else "x86_64"
        assert rootfs.endswith(f"/images/rhcos/rhcos-4.16.3-{arch}-live-rootfs.{arch}.img")
        (device,) = _values(args, "coreos.inst.install_dev")
        assert device.startswith("/dev/"), (node, device)
        assert len(_values(args, "coreos.inst.ignition_url")) == 1, (node, args)


def test_dgx_rhcos_nodes_name_their_nic_once() -> None:
    args = _args()
    for node in ("dgx-0", "dgx-1"):
        # One ip= only: with the default ip=dhcp as well, dracut would wait for DHCP on
        # every NIC of the DGX.
        assert _values(args[node], "ip") == ["enp170s0f1np1:dhcp"], args[node]
        assert _values(args[node], "coreos.inst.install_dev") == [
            "/dev/disk/by-path/pci-0000:01:00.0-nvme-1"
        ]
    assert _values(args["master-0"], "ip") == ["dhcp"], args["master-0"]
    assert _values(args["master-0"], "coreos.inst.install_dev") == [
        "/dev/disk/by-path/pci-0000:00:17.0-ata-1"
    ]


def test_dgx_rhcos_arm_node_boots_the_aarch64_artifacts() -> None:
    plan = build_plan(load_inventory(CONFIG / "dgx-rhcos.yaml"))
    boots = {b.node: b for b in plan.boot.nodes}
    arm = boots["gh-0"]
    assert arm.kernel_url.endswith("/rhcos-4.16.3-aarch64-live-kernel-aarch64")
    assert arm.initramfs_url.endswith("/rhcos-4.16.3-aarch64-live-initramfs.aarch64.img")
    assert _values(list(arm.kernel_args), "ip") == ["enP2p1s0f0np0:dhcp"]
    assert "aarch64" not in boots["dgx-0"].kernel_url


def test_dgx_rhcos_upstream_dns_is_set() -> None:
    # Nodes pull their images from registries outside the cluster during the install.
    inv = load_inventory(CONFIG / "dgx-rhcos.yaml").inventory
    assert inv.network.upstream_dns


def test_dgx_rhcos_paths_are_absolute() -> None:
    inv = load_inventory(CONFIG / "dgx-rhcos.yaml").inventory
    for path in (inv.boot.tftp_root, inv.boot.images_dir, inv.cluster.ignition_dir):
        assert Path(path).is_absolute(), path


@pytest.mark.parametrize(
    ("page", "link"), [("README.md", "docs/inventory.md"), ("docs/walkthrough.md", "inventory.md")]
)
def test_the_docs_link_the_inventory_reference(page: str, link: str) -> None:
    text = (CONFIG.parent / page).read_text()
    assert f"]({link})" in text, f"{page} does not link {link}"
    assert ((CONFIG.parent / page).parent / link).is_file()
