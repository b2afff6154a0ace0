"""The client OS the e2e VMs boot: a Debian kernel and a busybox initramfs built here.

The kernel comes from Debian's linux-image package, fetched with `apt-get download`
and unpacked with `dpkg-deb` (never installed). Its virtio NIC driver is a module, so
the module and everything it depends on (read from each module's `.modinfo` ELF
section: the package ships no modules.dep) go into the initramfs with an insmod
order. The initramfs is a gzipped newc cpio written by this module: the static
busybox (Debian busybox-static), `init.sh` as /init, `lease.sh` for udhcpc and
`live.sh`, the live PXE argument checks.

Everything is cached under tests/e2e/.cache (git-ignored): the kernel by package
version, the initramfs by a hash of what went into it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
NIC_MODULES = ("virtio_pci", "virtio_net")  # qemu's virtio-net-pci in the guest
BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initramfs: Path
    kernel_version: str


class GuestError(RuntimeError):
    pass


def _run(*cmd: str, cwd: Path | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned package behind Debian's linux-image-amd64 metapackage."""
    out = _run("apt-cache", "depends", "linux-image-amd64", timeout=60)
    for line in out.splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise GuestError("apt-cache knows no linux-image-amd64 (run apt-get update as root first)")


# --- kernel modules: dependencies from .modinfo ------------------------------------------


def modinfo(data: bytes) -> dict[str, str]:
    """The key=value strings of an ELF64 kernel module's .modinfo section."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestError("not an ELF64 kernel module")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name_at, offset, size = section(i)
        end = data.index(b"\0", str_off + name_at)
        if data[str_off + name_at : end] == b".modinfo":
            info: dict[str, str] = {}
            for item in data[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    raise GuestError("no .modinfo section")


def module_closure(tree: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The module files for `wanted` and their dependencies, dependencies first."""
    files = {p.name.removesuffix(".ko").replace("-", "_"): p for p in tree.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in files:
            raise GuestError(
                f"module {name} (needed by {' <- '.join(chain)}) is not in the package"
            )
        seen.add(name)
        depends = modinfo(files[name].read_bytes()).get("depends", "")
        for dep in filter(None, depends.split(",")):
            visit(dep.replace("-", "_"), (*chain, name))
        order.append(files[name])

    for name in wanted:
        visit(name, ())
    return order


# --- cpio (newc) ---------------------------------------------------------------------


class Cpio:
    """A newc archive written in memory: enough for an initramfs (files, dirs, links)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.out.write(header + name.encode() + b"\0")
        self.out.write(b"\0" * (-(110 + len(name) + 1) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.out.getvalue()


def build_initramfs(modules: list[Path], dest: Path) -> None:
    cpio = Cpio()
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "lib", "lib/modules", "run"):
        cpio.dir(d)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", (HERE / "init.sh").read_bytes(), 0o755)
    cpio.file("bin/lease.sh", (HERE / "lease.sh").read_bytes(), 0o755)
    cpio.file("bin/live.sh", (HERE / "live.sh").read_bytes(), 0o755)
    names = []
    for path in modules:
        cpio.file(f"lib/modules/{path.name}", path.read_bytes())
        names.append(path.name)
    cpio.file("etc/modules.order", ("\n".join(names) + "\n").encode())
    tmp = dest.parent / f"{dest.name}.partial"
    tmp.write_bytes(gzip.compress(cpio.finish(), 6))
    tmp.replace(dest)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def prepare(cache: Path = CACHE) -> Guest:
    """Kernel and initramfs, from the cache or built now (a few seconds plus a download)."""
    if not BUSYBOX.is_file() or b"/ld-linux" in BUSYBOX.read_bytes()[:4096]:
        # A dynamic busybox names its loader (PT_INTERP) near the start; it cannot run
        # in an initramfs that has no libc.
        raise GuestError(f"{BUSYBOX} is not a static busybox: apt-get install busybox-static")
    cache.mkdir(parents=True, exist_ok=True)
    kernels = sorted(cache.glob("vmlinuz-*"))
    if kernels:
        kernel = kernels[-1]
        version = kernel.name.removeprefix("vmlinuz-")
    else:
        kernel, version = _fetch_kernel(cache)
    modules = sorted((cache / f"modules-{version}").glob("*.ko"))
    order = (cache / f"modules-{version}" / "order").read_text().split()
    ordered = [cache / f"modules-{version}" / name for name in order]
    assert set(ordered) == set(modules), "module cache is inconsistent"
    key = _digest(
        BUSYBOX.read_bytes(),
        (HERE / "init.sh").read_bytes(),
        (HERE / "lease.sh").read_bytes(),
        (HERE / "live.sh").read_bytes(),
        version.encode(),
        " ".join(order).encode(),
        Path(__file__).read_bytes(),
    )
    initramfs = cache / f"initramfs-{key}.cpio.gz"
    if not initramfs.exists():
        for old in cache.glob("initramfs-*.cpio.gz"):
            old.unlink()
        build_initramfs(ordered, initramfs)
    return Guest(kernel, initramfs, version)


def _fetch_kernel(cache: Path) -> tuple[Path, str]:
    package = kernel_package()
    with tempfile.TemporaryDirectory(prefix="e2e-kernel-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)  # apt's sandbox user writes the download here
        _run("apt-get", "download", "-q", package, cwd=tmp, timeout=600)
        debs = list(tmp.glob("linux-image-*.deb"))
        if not debs:
            raise GuestError(f"apt-get download {package} left no .deb")
        tree = tmp / "x"
        _run("dpkg-deb", "-x", str(debs[0]), str(tree), timeout=300)
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestError(f"{debs[0].name} has no /boot/vmlinuz-*")
        version = vmlinuz[0].name.removeprefix("vmlinuz-")
        mods = module_closure(tree / "lib" / "modules" / version, NIC_MODULES)
        mod_dir = cache / f"modules-{version}"
        if mod_dir.exists():
            shutil.rmtree(mod_dir)
        mod_dir.mkdir()
        for path in mods:
            shutil.copy2(path, mod_dir / path.name)
        (mod_dir / "order").write_text("\n".join(p.name for p in mods) + "\n")
        kernel = cache / f"vmlinuz-{version}"
        partial = cache / f"{kernel.name}.partial"
        shutil.copy2(vmlinuz[0], partial)
        partial.replace(kernel)  # last: its presence means the cache is whole
    return kernel, version
