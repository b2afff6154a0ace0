"""What a TFTP file name means (sans-IO apart from reading files).

A name is, in order: a generated boot config (pxelinux, GRUB, iPXE), a file
under `boot.images_dir` (as `images/...`), or a file under `boot.tftp_root`.
Every real file is jailed: `..`, NUL bytes and symlinks that leave the root are
refused; a leading `/` means the root (as tftpd-hpa's --secure does), so
`/etc/passwd` is looked up as `<root>/etc/passwd` and never outside it.
"""

from __future__ import annotations

import bisect
import errno
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from appliance.plan import BootPlan, NodeBoot
from services import bootconfig
from services.bootconfig import IMAGES_PREFIX, Installed
from services.tftp.transfer import FileChanged


class Refused(Exception):
    """The request cannot be served: `code` is the TFTP error code, the message says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


NETASCII_CHUNK = 64 * 1024  # raw bytes converted at a time: at most twice this in memory
NETASCII_PASSES = 2  # netascii files counted at once (see Netascii.measure)
NETASCII_KEEP = 64  # files whose count is kept (an offset per 64 KiB: 2 KB for 16 MiB)
_PASSES = threading.BoundedSemaphore(NETASCII_PASSES)
_MEASURED: dict[tuple[int, ...], tuple[int, ...]] = {}  # identity -> starts, oldest first


@dataclass
class Netascii:
    """A file read as netascii (RFC 764: CR -> CR NUL, LF -> CR LF) while it streams.

    `measure` reads the file once, in chunks, and notes where each chunk starts in the
    converted stream (a byte converts alone, so chunks convert independently); `read`
    then converts only the chunks a block spans, keeping the last one for the next
    block. Memory: one converted chunk and an offset per chunk, whatever the file size.
    """

    fd: int
    raw_size: int
    identity: tuple[int, ...] = ()  # the file as fstat saw it: the key of _MEASURED
    starts: tuple[int, ...] = ()  # converted offset of chunk i; the end
    _cached: tuple[int, bytes] = (-1, b"")

    def measure(self) -> int:
        """The converted size (one pass over the file: in a worker thread, not the loop).

        Counting holds the GIL: a few passes at a time (NETASCII_PASSES), and each file
        (by device, inode, size and times) is counted once while it stays the same
        (_MEASURED), so that a burst of requests cannot keep the event loop from it."""
        key = (*self.identity, NETASCII_CHUNK) if self.identity else ()
        with _PASSES:
            if key and (known := _MEASURED.get(key)) is not None:
                self.starts = known
                return known[-1]
            starts, total = [0], 0
            for offset in range(0, self.raw_size, NETASCII_CHUNK):
                raw = os.pread(self.fd, min(NETASCII_CHUNK, self.raw_size - offset), offset)
                if not raw:
                    break  # it shrank meanwhile: what is there is what is sent
                total += len(raw) + raw.count(b"\r") + raw.count(b"\n")
                starts.append(total)
            self.starts = tuple(starts)
            if key and len(starts) - 1 == -(-self.raw_size // NETASCII_CHUNK):  # whole
                _MEASURED[key] = self.starts
                while len(_MEASURED) > NETASCII_KEEP:
                    del _MEASURED[next(iter(_MEASURED))]  # the oldest
        return total

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        starts = self.starts
        while length > 0:
            i = bisect.bisect_right(starts, offset) - 1
            if i >= len(starts) - 1:
                break  # the end
            chunk = self._chunk(i)
            part = chunk[offset - starts[i] : offset - starts[i] + length]
            out += part
            offset += len(part)
            length -= len(part)
        return bytes(out)

    def _chunk(self, i: int) -> bytes:
        if self._cached[0] != i:
            offset = i * NETASCII_CHUNK  # the file as it was opened: never past raw_size
            raw = os.pread(self.fd, max(0, min(NETASCII_CHUNK, self.raw_size - offset)), offset)
            converted = to_netascii(raw)
            if len(converted) != self.starts[i + 1] - self.starts[i]:
                # Shorter (it shrank) or converted otherwise (rewritten): a short block
                # would end the transfer as if the file were whole. The ERROR instead,
                # as the octet path sends it.
                raise FileChanged(f"netascii chunk {i} is no longer what was counted")
            self._cached = (i, converted)
        return self._cached[1]


@dataclass
class Source:
    """Bytes to send: an open file (read with pread), one read as netascii, or generated
    content. A netascii file's size is known after `prepare()` (a pass over the file)."""

    size: int
    content: bytes | None = None
    fd: int | None = None
    path: str = ""
    node: NodeBoot | None = None  # a generated config names its node
    netascii: Netascii | None = None

    @property
    def raw(self) -> bool:
        """Its bytes are the file's own: preadv and the C loop may read the fd directly."""
        return self.fd is not None and self.netascii is None

    def prepare(self) -> None:
        """Whatever must happen before the size is known: off the event loop."""
        if self.netascii is not None and not self.netascii.starts:
            self.size = self.netascii.measure()

    def read(self, offset: int, length: int) -> bytes:
        if self.content is not None:
            return self.content[offset : offset + length]
        if self.netascii is not None:
            return self.netascii.read(offset, length)
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


_IGNITION = re.compile(r"\.ign(?:$|[.~])", re.IGNORECASE)  # master.ign, .IGN, .ign.orig, .ign~


def served(root: Path, name: str, private: tuple[str, ...]) -> Path:
    """`jailed`, and never a secret: no `*.ign` (ignition has its own route, which checks
    who asks), nothing in or under a `private` real path (the ignition dir, the state dir
    with admin.token, the kubeconfig), however the folders nest or link."""
    real = jailed(root, name)
    text = str(real)
    if _IGNITION.search(real.name):
        raise Refused(2, "ignition is served only to its nodes, over HTTP")
    for p in private:
        if text == p or text.startswith(p + os.sep):
            raise Refused(2, "not a boot file: this path holds cluster secrets or state")
    return real


def to_netascii(data: bytes) -> bytes:
    """RFC 764: CR -> CR NUL, then LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


NETASCII_LIMIT = 16 * 1024 * 1024  # netascii is for text: a bound on the work per request
MAX_NAME = 4096  # bytes (PATH_MAX); a longer part: ENAMETOOLONG's "File name too long"


def open_source(plan: BootPlan, name: str, installed: Installed, netascii: bool = False) -> Source:
    """Find and open what `name` refers to; Refused with the TFTP error otherwise."""
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise Refused(0, "file name too long")
    path, query = bootconfig.split_target(name)
    generated = bootconfig.virtual_file(plan, path, installed, query)
    if generated is not None:
        text, node = generated
        data = text.encode()
        data = to_netascii(data) if netascii else data
        return Source(len(data), content=data, path=path, node=node)
    clean = path.replace("\\", "/").lstrip("/")
    if clean.startswith(IMAGES_PREFIX):
        real = served(plan.images_dir, clean[len(IMAGES_PREFIX) :], plan.private)
    else:
        real = served(plan.tftp_root, clean, plan.private)
    try:
        # O_NONBLOCK: opening a FIFO someone left in the root must not hang the service.
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise Refused(1, "file not found") from None
    except IsADirectoryError:
        raise Refused(1, "is a directory") from None
    except PermissionError:
        raise Refused(2, "permission denied") from None
    except OSError as exc:  # ENOTDIR, ELOOP, ENAMETOOLONG, EIO ...: an answer, never a crash
        code = 1 if exc.errno in (errno.ENOTDIR, errno.ENOENT) else 0
        raise Refused(code, exc.strerror or "cannot open the file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused(1, "not a regular file")
    if netascii:
        if st.st_size > NETASCII_LIMIT:
            os.close(fd)
            raise Refused(0, "file too large for netascii mode")
        # Converted while it streams (Netascii); its size is counted by prepare().
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return Source(0, fd=fd, path=clean, netascii=Netascii(fd, st.st_size, identity))
    return Source(st.st_size, fd=fd, path=clean)
