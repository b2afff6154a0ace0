"""qemu VMs for the e2e tests: BIOS (SeaBIOS + qemu's iPXE ROM) or UEFI (OVMF's own PXE).

Each VM has one virtio NIC on a tap of the lab bridge and its serial console in a
file; firmware, iPXE and the client OS all write there. KVM is used only when a
probe boot (the client kernel with `e2e.probe`, which prints a line and powers off)
finishes within a short limit: the nested KVM of some hosts hangs an unmodified
guest kernel early, so TCG is the fallback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.lab import Lab, tail

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
PROBE_LIMIT = 15.0  # seconds; a working KVM boots the probe in about 2, TCG in about 5


_probed: dict[tuple[Path, Path], tuple[str, str]] = {}


def probe_accel(kernel: Path, initramfs: Path, workdir: Path) -> tuple[str, str]:
    """("kvm" | "tcg", why): KVM when /dev/kvm opens and boots the probe in time.

    Probed once per process: each e2e module asks, and a hanging KVM costs the limit."""
    key = (kernel, initramfs)
    if key not in _probed:
        _probed[key] = _probe(kernel, initramfs, workdir)
    return _probed[key]


def _probe(kernel: Path, initramfs: Path, workdir: Path) -> tuple[str, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is missing or not usable"
    log = workdir / "kvm-probe.log"
    argv = [
        QEMU, "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults", "-display", "none",
        "-no-reboot", "-serial", f"file:{log}", "-kernel", str(kernel), "-initrd", str(initramfs),
        "-append", "console=ttyS0 e2e.probe panic=-1",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=PROBE_LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return "tcg", f"KVM probe boot hung (no power-off within {PROBE_LIMIT:.0f} s)"
    took = time.monotonic() - started
    if "E2E-PROBE-OK" in log.read_text(errors="replace"):
        return "kvm", f"KVM probe boot took {took:.1f} s"
    return "tcg", f"KVM probe boot failed (exit {proc.returncode}): {tail(log, 5)}"


@dataclass
class Machine:
    name: str
    mac: str
    firmware: str  # bios | uefi
    tap: str
    workdir: Path
    accel: str
    proc: subprocess.Popen[bytes] | None = None
    boots: int = 0

    @property
    def serial(self) -> Path:
        return self.workdir / f"{self.name}-boot{self.boots}.serial.log"

    def argv(self) -> list[str]:
        argv = [
            QEMU, "-accel", self.accel, "-m", "512", "-smp", "1", "-nodefaults",
            "-display", "none", "-no-reboot", "-name", self.name,
            "-serial", f"file:{self.serial}",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
        ]  # fmt: skip
        if self.accel == "kvm":
            argv += ["-cpu", "host"]
        nic = f"virtio-net-pci,netdev=n0,mac={self.mac}"
        if self.firmware == "uefi":
            vars_copy = self.workdir / f"{self.name}-OVMF_VARS.fd"
            if not vars_copy.exists():
                shutil.copyfile(OVMF_VARS, vars_copy)
            argv += [
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            ]  # fmt: skip
            # No option ROM on the NIC: OVMF's own virtio-net driver and PXE client boot
            # it, as a DGX's firmware would, and fetch ipxe.efi by TFTP.
            nic += ",romfile="
        else:
            # SeaBIOS mirrors its text console, and so the iPXE ROM's, to COM1 when
            # fw_cfg etc/sercon-port holds the port as a little-endian integer.
            sercon = self.workdir / "sercon-port.bin"
            sercon.write_bytes((0x3F8).to_bytes(8, "little"))
            argv += ["-fw_cfg", f"name=etc/sercon-port,file={sercon}"]
        argv += ["-device", nic, "-boot", "order=n"]
        return argv

    def boot(self, lab: Lab) -> None:
        self.boots += 1
        self.proc = lab.start(self.argv(), self.workdir / f"{self.name}-boot{self.boots}.qemu.log")

    def output(self) -> str:
        try:
            return self.serial.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def result(self) -> dict[str, Any] | None:
        for line in reversed(self.output().splitlines()):
            at = line.find("E2E-RESULT ")
            if at >= 0:
                parsed: dict[str, Any] = json.loads(line[at + len("E2E-RESULT ") :])
                return parsed
        return None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self, lines: int = 80) -> str:
        """The serial log's tail, for assertion messages."""
        return f"--- {self.serial} (last {lines} lines) ---\n{tail(self.serial, lines)}"

    def stop(self, lab: Lab) -> None:
        if self.proc is not None:
            lab.stop_process(self.proc, timeout=5)
