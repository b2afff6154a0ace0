"""What a TFTP file name means (sans-IO apart from reading files).

A name is, in order: a generated boot config (pxelinux, GRUB, iPXE), a file
under `boot.images_dir` (as `images/...`), or a file under `boot.tftp_root`.
Every real file is jailed: `..`, NUL bytes and symlinks that leave the root are
refused; a leading `/` means the root (as tftpd-hpa's --secure does), so
`/etc/passwd` is looked up as `<root>/etc/passwd` and never outside it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from appliance.plan import BootPlan, NodeBoot
from services import bootconfig
from services.bootconfig import IMAGES_PREFIX, Installed


class Refused(Exception):
    """The request cannot be served: `code` is the TFTP error code, the message says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Source:
    """Bytes to send: an open file (read with pread) or generated content."""

    size: int
    content: bytes | None = None
    fd: int | None = None
    path: str = ""
    node: NodeBoot | None = None  # a generated config names its node

    def read(self, offset: int, length: int) -> bytes:
        if self.content is not None:
            return self.content[offset : offset + length]
        assert self.fd is not None
        return os.pread(self.fd, length, offset)

    def readinto(self, buffers: list[memoryview], offset: int) -> int:
        """Fill `buffers` in order from `offset` with one os.preadv: bytes read."""
        assert self.fd is not None  # generated content has `read` only
        return os.preadv(self.fd, buffers, offset)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def jailed(root: Path, name: str) -> Path:
    """The real path of `name` inside `root`, or Refused."""
    if "\0" in name:
        raise Refused(2, "NUL in file name")
    clean = name.replace("\\", "/").lstrip("/")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise Refused(2, "'..' is not allowed")
    if not parts:
        raise Refused(1, "no file name")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if real != real_root and not real.startswith(real_root + os.sep):
        raise Refused(2, "the path leaves the TFTP root")
    return Path(real)


def to_netascii(data: bytes) -> bytes:
    """RFC 764: CR -> CR NUL, then LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


NETASCII_LIMIT = 16 * 1024 * 1024  # netascii is converted in memory: text files only


def open_source(plan: BootPlan, name: str, installed: Installed, netascii: bool = False) -> Source:
    """Find and open what `name` refers to; Refused with the TFTP error otherwise."""
    path, query = bootconfig.split_target(name)
    generated = bootconfig.virtual_file(plan, path, installed, query)
    if generated is not None:
        text, node = generated
        data = text.encode()
        data = to_netascii(data) if netascii else data
        return Source(len(data), content=data, path=path, node=node)
    clean = path.replace("\\", "/").lstrip("/")
    if clean.startswith(IMAGES_PREFIX):
        real = jailed(plan.images_dir, clean[len(IMAGES_PREFIX) :])
    else:
        real = jailed(plan.tftp_root, clean)
    try:
        # O_NONBLOCK: opening a FIFO someone left in the root must not hang the service.
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise Refused(1, "file not found") from None
    except IsADirectoryError:
        raise Refused(1, "is a directory") from None
    except PermissionError:
        raise Refused(2, "permission denied") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused(1, "not a regular file")
    if netascii:
        if st.st_size > NETASCII_LIMIT:
            os.close(fd)
            raise Refused(0, "file too large for netascii mode")
        with os.fdopen(fd, "rb") as fh:
            data = to_netascii(fh.read())
        return Source(len(data), content=data, path=clean)
    return Source(st.st_size, fd=fd, path=clean)
