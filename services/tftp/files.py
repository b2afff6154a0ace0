"""What a TFTP file name means (sans-IO apart from reading files).

A name is, in order: a generated boot config (pxelinux, GRUB, iPXE), a file
under `boot.images_dir` (as `images/...`), or a file under `boot.tftp_root`.
Every real file is jailed (services/bootfiles.py, shared with HTTP).
"""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass

from appliance.plan import BootPlan, NodeBoot
from services import bootconfig
from services.bootconfig import IMAGES_PREFIX, Installed
from services.bootfiles import Refused, jailed, open_regular, served
from services.tftp.transfer import FileChanged

__all__ = ["Netascii", "Refused", "Source", "jailed", "open_source", "served", "to_netascii"]

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
    fd, st = open_regular(real)
    if netascii:
        if st.st_size > NETASCII_LIMIT:
            os.close(fd)
            raise Refused(0, "file too large for netascii mode")
        # Converted while it streams (Netascii); its size is counted by prepare().
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return Source(0, fd=fd, path=clean, netascii=Netascii(fd, st.st_size, identity))
    return Source(st.st_size, fd=fd, path=clean)
