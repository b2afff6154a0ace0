"""End to end: real firmware PXE-boots a real Linux client from the appliance.

A network namespace holds a bridge with the appliance on 192.0.2.1 (the article's
cluster, config/dgxpod.yaml, moved to 192.0.2.0/24) and the API VIP 192.0.2.54.
Two qemu VMs plug into the bridge through taps, with the MACs of two inventory nodes:

- `bootstrap`, legacy BIOS: SeaBIOS runs qemu's iPXE ROM for the virtio NIC (Debian
  ipxe-qemu), whose DHCP carries user class "iPXE" and so gets the HTTP script
  URL straight away;
- `worker-0` (a DGX in the article: UEFI network boot only), OVMF with the NIC's
  option ROM removed: OVMF's own PXE client takes a lease, fetches ipxe.efi (Debian
  ipxe) by TFTP, and that iPXE asks DHCP again, now as "iPXE", and chainloads the
  HTTP script.

Both boot a Debian kernel with a busybox initramfs (tests/e2e/guest.py, init.sh)
whose init takes a lease, resolves api-int, a *.apps name, the etcd SRV record and
its own PTR through the appliance, fetches the ignition URL from its kernel command
line, makes an HTTPS request to the API VIP, which the appliance's load balancer
passes to a TLS backend on master-0's address (backend.py: a real server in its own
namespace, health-checked on /readyz), prints `E2E-RESULT {json}` and powers off.
A second boot of each VM is answered with local boot (iPXE `exit`): the ignition
fetch marked the node installed.

KVM is used when a probe boot shows it works; otherwise TCG. Serial logs, qemu and
appliance logs stay in the test's tmp folder; failures print their tails and path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import guest as guest_os
from tests.e2e.backend import ApiBackend, self_signed
from tests.e2e.lab import (
    DOMAIN,
    SERVER,
    VIP,
    Appliance,
    Lab,
    dgxpod_inventory,
    install_loaders,
    tail,
    write_ignition,
)
from tests.e2e.vm import OVMF_CODE, OVMF_VARS, QEMU, Machine, probe_accel
from tests.helpers import in_netns, need_tool, wait_until

pytestmark = [pytest.mark.root, pytest.mark.e2e]

BIOS_NODE = ("bootstrap", "52:54:00:00:03:53", "192.0.2.53", "bios")
UEFI_NODE = ("worker-0", "02:00:00:00:03:44", "192.0.2.44", "uefi")
MASTER0 = "192.0.2.50"
FIRST_BOOT_LIMIT = 300.0  # both VMs at once under TCG on 2 busy cores; one takes 30-50 s
LOCAL_BOOT_LIMIT = 150.0


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: .ci/run must install it")
    pytest.skip(reason)


@dataclass
class Cluster:
    lab: Lab
    appliance: Appliance
    backend: ApiBackend
    ignition: dict[str, bytes]
    workdir: Path
    accel: str
    accel_why: str
    machines: dict[str, Machine] = field(default_factory=dict)

    def why(self, *machines: Machine) -> str:
        """Everything a failed assertion should show: serial tails, the appliance log."""
        parts = [m.describe() for m in machines]
        parts.append(f"--- appliance log (last 40 lines) ---\n{tail(self.appliance.log_path, 40)}")
        if self.backend.errors:
            parts.append(f"--- API backend errors ---\n{self.backend.errors[-10:]}")
        parts.append(f"(accel {self.accel}: {self.accel_why}; all logs in {self.workdir})")
        return "\n".join(parts)

    def http(self, path: str) -> str:
        def get() -> str:
            url = f"http://{SERVER}:8080{path}"
            with urllib.request.urlopen(url, timeout=10) as resp:
                return str(resp.read().decode())

        return in_netns(self.lab.ns, get)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    need_tool("ip")
    if not shutil.which(QEMU):
        _missing(f"{QEMU} is not installed (Debian qemu-system-x86)")
    for path, package in (
        (OVMF_CODE, "ovmf"),
        (OVMF_VARS, "ovmf"),
        (Path("/usr/lib/ipxe/ipxe.efi"), "ipxe"),
        (Path("/usr/lib/ipxe/qemu/efi-virtio.rom"), "ipxe-qemu"),
    ):
        if not path.exists():
            _missing(f"{path} is missing (Debian {package})")
    try:
        guest = guest_os.prepare()
    except guest_os.GuestError as exc:
        _missing(f"cannot build the client OS: {exc}")
    workdir = tmp_path_factory.mktemp("e2e-vms")
    images = workdir / "images" / "e2e"
    images.mkdir(parents=True)
    shutil.copyfile(guest.kernel, images / "vmlinuz")
    shutil.copyfile(guest.initramfs, images / "initramfs.img")
    install_loaders(workdir)
    ignition = write_ignition(workdir)
    accel, why = probe_accel(guest.kernel, guest.initramfs, workdir)
    print(f"e2e: accel {accel} ({why}); logs in {workdir}")
    raw = dgxpod_inventory(
        workdir,
        kernel="e2e/vmlinuz",
        initramfs="e2e/initramfs.img",
        # panic=-1: a client that dies reboots at once, and -no-reboot ends its qemu.
        kernel_args=["console=tty0", "console=ttyS0", "panic=-1"],
    )
    lab = Lab(workdir)
    backend: ApiBackend | None = None
    try:
        # The API backend: master-0's address in a namespace of its own on the bridge.
        backend_ns, _ = lab.add_host(MASTER0)
        cert, key = self_signed(workdir, "master-0", MASTER0)

        def listen() -> Any:
            import socket

            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((MASTER0, 6443))
            sock.listen(64)
            return sock

        backend = ApiBackend(in_netns(backend_ns, listen), "master-0", cert, key)
        appliance = Appliance(lab, raw, workdir)
        appliance.wait_serving()
        made = Cluster(lab, appliance, backend, ignition, workdir, accel, why)
        for name, mac, _ip, firmware in (BIOS_NODE, UEFI_NODE):
            tap = lab.add_tap(f"tap-{name}")
            made.machines[name] = Machine(name, mac, firmware, tap, workdir, accel)
        yield made
    finally:
        if backend is not None:
            backend.close()
        lab.close()


def _api_backend_up(cluster: Cluster) -> bool:
    api = cluster.lab.get_json("/api/v1/backends")["frontends"]["api"]
    return any(b["name"] == "master-0" and b["health"] == "up" for b in api["backends"])


@pytest.fixture(scope="module")
def first_boots(cluster: Cluster) -> dict[str, Machine]:
    """Both VMs' first (install) boot, at the same time; they power themselves off."""
    wait_until(lambda: _api_backend_up(cluster), 30, "master-0 healthy behind the api VIP")
    machines = list(cluster.machines.values())
    started = time.monotonic()
    for machine in machines:
        machine.boot(cluster.lab)
    try:
        wait_until(
            lambda: not any(m.running() for m in machines),
            FIRST_BOOT_LIMIT,
            "both VMs powered off after their first boot",
            step=1.0,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.why(*machines)}") from None
    finally:
        for machine in machines:
            machine.stop(cluster.lab)
    print(f"e2e: first boots ({cluster.accel}) took {time.monotonic() - started:.0f} s")
    return cluster.machines


def _check_first_boot(cluster: Cluster, machine: Machine, role: str, ip: str) -> dict[str, Any]:
    why = cluster.why(machine)
    result = machine.result()
    assert result is not None, f"{machine.name}: no E2E-RESULT line\n{why}"
    assert "error" not in result, f"{machine.name}: {result['error']}\n{why}"
    assert result["mac"] == machine.mac, why
    # The lease: the node's reserved address and what DHCP tells every node.
    assert (result["ip"], result["subnet"], result["router"]) == (
        ip,
        "255.255.255.0",
        "192.0.2.254",
    ), why
    assert (result["dns"], result["serverid"]) == (SERVER, SERVER), why
    assert (result["hostname"], result["domain"]) == (machine.name, DOMAIN), why
    # DNS through the appliance.
    assert result["api_int"] == VIP, why
    assert result["apps"] == VIP, why
    assert result["ptr"] == f"{machine.name}.{DOMAIN}", why
    srv = sorted(filter(None, result["srv"].split(";")))
    assert srv == [f"0 10 2380 etcd-{i}.{DOMAIN}" for i in range(3)], why
    # Its own ignition, fetched from the URL on its kernel command line.
    assert result["ignition_url"] == f"http://{SERVER}:8080/ignition/{role}.ign", why
    assert result["ignition_rc"] == 0, why
    assert result["ignition_sha256"] == hashlib.sha256(cluster.ignition[role]).hexdigest(), why
    # The API VIP, through the load balancer, to the backend on master-0.
    assert result["api"] == f"E2E-BACKEND master-0 /e2e?mac={machine.mac}", why
    seen = cluster.backend.seen(f"/e2e?mac={machine.mac}")
    assert seen, f"the backend never saw {machine.name}'s request\n{why}"
    # The load balancer, not the VM, connects to the backend.
    assert {r.peer for r in seen} <= {SERVER, VIP}, seen
    # The appliance saw every stage of the install boot.
    stages: dict[str, Any] = cluster.appliance.nodes()[machine.name]["stages"]
    for stage in ("dhcp-offer", "dhcp-ack", "kernel", "initramfs", "ignition"):
        assert stage in stages, f"{machine.name}: no {stage} event: {stages}\n{why}"
    return stages


def _story(cluster: Cluster, machine: Machine) -> list[tuple[str, str]]:
    """The node's events, each DHCP detail without its address (`192.0.2.53 ipxe
    script` -> `ipxe script`; a plain lease -> ``), repeats in a row as one (PXE
    clients retransmit their DISCOVER while they collect offers)."""
    out: list[tuple[str, str]] = []
    for stage, detail, _source in cluster.appliance.events(machine.name):
        if stage.startswith("dhcp-"):
            detail = detail.partition(" ")[2]
        if not out or out[-1] != (stage, detail):
            out.append((stage, detail))
    return out


def test_bios_vm_boots_qemu_ipxe_rom_to_the_client_os(
    cluster: Cluster, first_boots: dict[str, Machine]
) -> None:
    machine = first_boots["bootstrap"]
    stages = _check_first_boot(cluster, machine, "bootstrap", BIOS_NODE[2])
    serial = machine.output()
    # qemu's legacy NIC ROM is already iPXE: its first DHCP gets the HTTP script.
    why = cluster.why(machine)
    assert "iPXE" in serial and "Filename: http://192.0.2.1:8080/boot.ipxe" in serial, why
    assert "bootloader" not in stages, stages  # no TFTP loader on this path
    # The boot as the appliance recorded it: iPXE's lease with the script URL, the
    # kernel and initramfs over HTTP, the client OS's own lease, its ignition.
    assert _story(cluster, machine) == [
        ("dhcp-offer", "ipxe script"),
        ("dhcp-ack", "ipxe script"),
        ("kernel", "http /images/e2e/vmlinuz"),
        ("initramfs", "http /images/e2e/initramfs.img"),
        ("dhcp-offer", ""),
        ("dhcp-ack", ""),
        ("ignition", "http bootstrap.ign"),
    ], why


def test_uefi_vm_pxe_boots_ipxe_efi_by_tftp_then_chainloads(
    cluster: Cluster, first_boots: dict[str, Machine]
) -> None:
    machine = first_boots["worker-0"]
    stages = _check_first_boot(cluster, machine, "worker", UEFI_NODE[2])
    serial = machine.output()
    why = cluster.why(machine)
    # OVMF's own PXE client (no iPXE ROM on the NIC) fetched ipxe.efi by TFTP ...
    assert "Start PXE over IPv4" in serial, why
    assert "NBP filename is ipxe.efi" in serial, why
    assert stages["bootloader"]["detail"] == "tftp ipxe.efi", stages
    # ... and that iPXE's own DHCP (user class iPXE) got the HTTP script.
    assert "Filename: http://192.0.2.1:8080/boot.ipxe" in serial, why
    assert serial.index("NBP filename is ipxe.efi") < serial.index("boot.ipxe"), why
    assert _story(cluster, machine) == [
        ("dhcp-offer", "uefi-x64 ipxe.efi"),
        ("dhcp-ack", "uefi-x64 ipxe.efi"),
        ("bootloader", "tftp ipxe.efi"),
        ("dhcp-offer", "ipxe script"),
        ("dhcp-ack", "ipxe script"),
        ("kernel", "http /images/e2e/vmlinuz"),
        ("initramfs", "http /images/e2e/initramfs.img"),
        ("dhcp-offer", ""),
        ("dhcp-ack", ""),
        ("ignition", "http worker.ign"),
    ], why


def test_second_boot_is_answered_with_local_boot(
    cluster: Cluster, first_boots: dict[str, Machine]
) -> None:
    machines = list(first_boots.values())
    before = cluster.appliance.nodes()
    for machine in machines:
        assert before[machine.name]["installed_at"], before[machine.name]
        assert before[machine.name]["next_boot"] == "local", before[machine.name]
        # What the appliance answers this MAC's iPXE now: exit to the next boot device.
        script = cluster.http(f"/boot.ipxe?mac={machine.mac}")
        assert "booting from local disk" in script and "\nexit" in script, script
    for machine in machines:
        machine.boot(cluster.lab)
    # iPXE's `exit` hands the boot back to the firmware; SeaBIOS then says which device
    # it tries next (there is no disk: it finds nothing to boot).
    done = {"bios": "Booting from Hard Disk", "uefi": "booting from local disk"}
    try:
        for machine in machines:

            def exited(m: Machine = machine) -> bool:  # this machine, bound now
                return done[m.firmware] in m.output()

            wait_until(
                exited,
                LOCAL_BOOT_LIMIT,
                f"{machine.name}: iPXE exit to the next boot device",
                step=1.0,
            )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.why(*machines)}") from None
    finally:
        for machine in machines:
            machine.stop(cluster.lab)
    after = cluster.appliance.nodes()
    for machine in machines:
        why = cluster.why(machine)
        serial = machine.output()
        said = f"{machine.name} is installed: booting from local disk"
        assert said in serial, why
        assert serial.index(said) < serial.index(done[machine.firmware]), why
        assert "E2E-RESULT" not in serial and "Linux version" not in serial, why
        # It asked for an address again, but fetched no kernel and no ignition.
        stages, old = after[machine.name]["stages"], before[machine.name]["stages"]
        assert stages["dhcp-ack"]["last"] > old["dhcp-ack"]["last"], stages
        for stage in ("kernel", "initramfs", "ignition"):
            assert stages[stage]["last"] == old[stage]["last"], (stage, stages)


def test_reinstall_request_turns_the_next_boot_back_into_an_install(cluster: Cluster) -> None:
    name, mac = BIOS_NODE[0], BIOS_NODE[1]
    reply = cluster.lab.get_json(
        f"/api/v1/nodes/{name}/reinstall", method="POST", token=cluster.appliance.token()
    )
    assert reply["next_boot"] == "install", reply
    script = cluster.http(f"/boot.ipxe?mac={mac}")
    assert f"Installing {name}" in script and "/images/e2e/vmlinuz" in script, script
    assert json.dumps(cluster.appliance.nodes()[name]["next_boot"]) == '"install"'
