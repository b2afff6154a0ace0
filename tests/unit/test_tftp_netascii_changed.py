"""A netascii transfer of a file that changes under it ends with an ERROR (issue 14),
as the octet path does (FileChanged): never a short block, which the client would take
for the end of a silently truncated file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.tftp import files as files_module
from services.tftp.files import Netascii
from services.tftp.transfer import FileChanged, ReadTransfer, negotiate


def netascii_of(path: Path) -> Netascii:
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    n = Netascii(fd, st.st_size)  # no identity: never taken from the cache
    n.measure()
    return n


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_module, "NETASCII_CHUNK", 1024)


def test_a_file_that_shrinks_during_a_netascii_transfer_aborts_it(tmp_path: Path) -> None:
    path = tmp_path / "pxelinux.cfg"
    path.write_bytes(b"line\n" * 2000)  # 10000 bytes, 12000 converted
    n = netascii_of(path)
    size = n.starts[-1]
    xfer = ReadTransfer(n.read, size, negotiate({}, size), 0.0)
    assert len(xfer.start(0.0)[0]) == 4 + 512
    os.truncate(path, 3000)  # shrinks past block 8's chunks
    with pytest.raises(FileChanged):
        for block in range(1, 30):
            assert len(xfer.on_packet(bytes((0, 4, 0, block)), 0.0)[0]) == 4 + 512
    assert xfer.abort("the file changed")[0][:4] == bytes((0, 5, 0, 0))  # the ERROR sent
    os.close(n.fd)


def test_a_file_rewritten_with_other_line_ends_aborts_too(tmp_path: Path) -> None:
    path = tmp_path / "grub.cfg"
    path.write_bytes(b"a\n" * 1500)  # same size afterwards, other conversion
    n = netascii_of(path)
    assert n.read(0, 512)
    path.write_bytes(b"ab" * 1500)
    with pytest.raises(FileChanged):
        n.read(2048, 512)  # a chunk not read yet: it converts shorter than counted
    os.close(n.fd)


def test_an_unchanged_file_reads_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "default"
    path.write_bytes(b"x\r\n" * 700)
    n = netascii_of(path)
    total = n.starts[-1]
    got = b"".join(n.read(off, 512) for off in range(0, total + 512, 512))
    assert got == files_module.to_netascii(b"x\r\n" * 700)
    assert n.read(total, 512) == b""  # the end: an empty last block, no error
    os.close(n.fd)
