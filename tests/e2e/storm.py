"""The boot storm: many machines PXE-boot at once (shared by tests/e2e and bench/storm).

Each machine is a network namespace joined to the lab bridge by a veth pair whose
client end carries the machine's MAC, and runs `storm_client.sh` under busybox:
udhcpc takes a lease announcing a PXE client (option 60 and option 93: even
machines BIOS, odd ones UEFI x64), busybox tftp fetches the boot loader the answer
named, busybox wget the kernel and initramfs. All start on one signal (a file
appearing) and write one result line each. The server side (the appliance, or
dnsmasq + nginx for the benchmark) runs in the lab namespace on 192.0.2.1.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.lab import SERVER, Lab, sh

HERE = Path(__file__).resolve().parent
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "udhcpc", "tftp", "wget", "timeout", "usleep", "cut", "mv")  # ip: iproute2's
FIRST_HOST = 10  # machine i is 192.0.2.(10 + i)
STORM_VIP = "192.0.2.250"  # the load balancer address, off the machines' range
MIB = 1 << 20


@dataclass(frozen=True)
class StormMachine:
    index: int
    name: str
    mac: str
    ip: str
    arch: int  # option 93: 0 BIOS, 7 UEFI x64
    ns: str = ""


def machines(count: int) -> list[StormMachine]:
    if not 1 <= count <= 240:
        raise ValueError("the storm fits 1 to 240 machines in 192.0.2.0/24")
    return [
        StormMachine(
            i,
            f"node-{i:03d}",
            f"52:54:00:5a:{i >> 8:02x}:{i & 0xFF:02x}",
            f"192.0.2.{FIRST_HOST + i}",
            7 if i % 2 else 0,
        )
        for i in range(count)
    ]


def inventory_nodes(storm: list[StormMachine]) -> list[dict[str, Any]]:
    """The machines as inventory nodes: a bootstrap, three masters, the rest workers."""
    roles = ["bootstrap", "master", "master", "master"]
    return [
        {
            "name": m.name,
            "role": roles[m.index] if m.index < len(roles) else "worker",
            "mac": m.mac,
            "ip": m.ip,
        }
        for m in storm
    ]


def make_images(folder: Path, kernel_mib: int, initramfs_mib: int) -> tuple[str, str]:
    """Kernel and initramfs stand-ins of the given sizes (random bytes: no compression
    or sparse-file shortcut anywhere on the way). Paths relative to `folder`."""
    out = []
    for name, mib in (("kernel", kernel_mib), ("initramfs.img", initramfs_mib)):
        path = folder / "storm" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size != mib * MIB:
            with path.open("wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(MIB))
        out.append(f"storm/{name}")
    return out[0], out[1]


@dataclass
class StormResult:
    count: int
    seconds: float  # from the start signal to the last machine's initramfs
    ok: dict[str, dict[str, str]] = field(default_factory=dict)  # machine -> its result
    failed: dict[str, str] = field(default_factory=dict)  # machine -> why
    phases: dict[str, float] = field(default_factory=dict)  # step -> when the last ended

    def duplicates(self) -> dict[str, int]:
        seen = Counter(r["ip"] for r in self.ok.values())
        return {ip: n for ip, n in seen.items() if n > 1}

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        return (
            f"{len(self.ok)}/{self.count} machines booted in {self.seconds:.1f} s "
            f"(last {phases}); failed: {dict(list(self.failed.items())[:10])}"
        )


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


class Storm:
    """The machines' namespaces on the lab bridge, and the storm run over them."""

    def __init__(self, lab: Lab, workdir: Path, storm: list[StormMachine]) -> None:
        self.lab, self.workdir = lab, workdir
        self.dir = workdir / "storm-run"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin = self.dir / "bin"
        self.bin.mkdir(exist_ok=True)
        for applet in APPLETS:
            link = self.bin / applet
            if not link.exists():
                link.symlink_to(BUSYBOX)
        # Copies with the exec bit, whatever the checkout did with file modes.
        for script in ("storm_client.sh", "storm_lease.sh"):
            shutil.copyfile(HERE / script, self.bin / script)
            (self.bin / script).chmod(0o755)
        self.machines = [
            StormMachine(m.index, m.name, m.mac, m.ip, m.arch, f"{lab.ns}-s{m.index}")
            for m in storm
        ]
        self._make_namespaces()

    def _make_namespaces(self) -> None:
        """All namespaces and veth pairs with two `ip -batch` runs (fast for hundreds)."""
        batch = self.dir / "netns.batch"
        batch.write_text("".join(f"netns add {m.ns}\n" for m in self.machines))
        try:
            sh("ip", "-batch", str(batch), timeout=120)
        finally:
            # Whatever was made is cleaned up with the lab, even after a partial failure.
            made = {p.name for p in Path("/run/netns").iterdir()}
            self.lab.namespaces.extend(m.ns for m in self.machines if m.ns in made)
        links = self.dir / "links.batch"
        links.write_text(
            "".join(
                f"link add s{m.index} type veth peer name eth0 netns {m.ns} address {m.mac}\n"
                f"link set s{m.index} master br0\n"
                f"link set s{m.index} up\n"
                for m in self.machines
            )
        )
        sh("ip", "-n", self.lab.ns, "-batch", str(links), timeout=120)

    def run(self, http_base: str, kernel: str, initramfs: str, limit: float) -> StormResult:
        """Start every machine, give the signal, wait (at most `limit` s) and collect."""
        go = self.dir / "go"
        go.unlink(missing_ok=True)
        results = self.dir / "results"
        if results.exists():
            shutil.rmtree(results)
        results.mkdir()
        env = {**os.environ, "PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin"}
        procs: list[tuple[StormMachine, subprocess.Popen[bytes]]] = []
        for m in self.machines:
            argv = [
                "ip", "netns", "exec", m.ns, BUSYBOX, "sh", str(self.bin / "storm_client.sh"),
                str(results / m.name), str(go), str(self.bin / "storm_lease.sh"),
                http_base, kernel, initramfs, str(m.arch),
            ]  # fmt: skip
            with (results / f"{m.name}.log").open("wb") as log:
                proc = subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            self.lab.processes.append(proc)
            procs.append((m, proc))
        time.sleep(1.0)  # every client is waiting for the signal by now
        started = uptime()
        go.touch()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and any(p.poll() is None for _, p in procs):
            time.sleep(0.1)
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        out = StormResult(len(procs), 0.0)
        last: dict[str, float] = {}
        for m, _ in procs:
            path = results / m.name
            if path.exists():
                text = path.read_text().strip()
            else:
                said = (results / f"{m.name}.log").read_text(errors="replace").strip()
                text = f"fail unfinished after {limit} s: {said[-300:]}"
            kind, _, rest = text.partition(" ")
            if kind != "ok":
                said = (results / f"{m.name}.log").read_text(errors="replace").strip()
                out.failed[m.name] = f"{rest} ({said.splitlines()[-1][:200]})" if said else rest
                continue
            fields = dict(item.split("=", 1) for item in shlex.split(rest))
            out.ok[m.name] = fields
            for step in ("lease", "loader", "kernel", "initramfs"):
                last[step] = max(last.get(step, 0.0), float(fields[step]) - started)
        out.phases = last
        out.seconds = last.get("initramfs", 0.0)
        return out

    def expected(self) -> dict[str, tuple[str, str]]:
        """machine -> (its address, the loader its architecture should get)."""
        return {
            m.name: (m.ip, "ipxe.efi" if m.arch == 7 else "undionly.kpxe") for m in self.machines
        }


def http_base(port: int) -> str:
    return f"http://{SERVER}:{port}"
