"""Boot files on disk, as both boot services (TFTP and HTTP) serve them: the jail, the
refusal and the opening.

Every real file is jailed to its root: `..`, NUL bytes and symlinks that leave the root
are refused; a leading `/` means the root (as tftpd-hpa's --secure does), so
`/etc/passwd` is looked up as `<root>/etc/passwd` and never outside it. Ignition and
the appliance's own state are never boot files (`served`): ignition has its own route,
which checks who asks. Plain code over paths: no sockets, no event loop.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

# Refused.code: what kind of refusal, numbered as TFTP's error codes (RFC 1350) since
# TFTP sends it as is; HTTP maps it to its status.
UNDEFINED, NOT_FOUND, ACCESS = 0, 1, 2


class Refused(Exception):
    """The request cannot be served: `code` is the TFTP error code, the message says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def jailed(root: Path, name: str) -> Path:
    """The real path of `name` inside `root`, or Refused."""
    if "\0" in name:
        raise Refused(ACCESS, "NUL in file name")
    clean = name.replace("\\", "/").lstrip("/")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise Refused(ACCESS, "'..' is not allowed")
    if not parts:
        raise Refused(NOT_FOUND, "no file name")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if real != real_root and not real.startswith(real_root + os.sep):
        raise Refused(ACCESS, "the path leaves the TFTP root")
    return Path(real)


_IGNITION = re.compile(r"\.ign(?:$|[.~])", re.IGNORECASE)  # master.ign, .IGN, .ign.orig, .ign~


def served(root: Path, name: str, private: tuple[str, ...]) -> Path:
    """`jailed`, and never a secret: no `*.ign` (ignition has its own route, which checks
    who asks), nothing in or under a `private` real path (the ignition dir, the state dir
    with admin.token, the kubeconfig), however the folders nest or link."""
    real = jailed(root, name)
    text = str(real)
    if _IGNITION.search(real.name):
        raise Refused(ACCESS, "ignition is served only to its nodes, over HTTP")
    for p in private:
        if text == p or text.startswith(p + os.sep):
            raise Refused(ACCESS, "not a boot file: this path holds cluster secrets or state")
    return real


def open_regular(real: Path) -> tuple[int, os.stat_result]:
    """Open a jailed path read-only: (fd, its fstat), or Refused; never a directory,
    device or FIFO."""
    try:
        # O_NONBLOCK: opening a FIFO someone left in the root must not hang the service.
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise Refused(NOT_FOUND, "file not found") from None
    except IsADirectoryError:
        raise Refused(NOT_FOUND, "is a directory") from None
    except PermissionError:
        raise Refused(ACCESS, "permission denied") from None
    except OSError as exc:  # ENOTDIR, ELOOP, ENAMETOOLONG, EIO ...: an answer, never a crash
        code = NOT_FOUND if exc.errno in (errno.ENOTDIR, errno.ENOENT) else UNDEFINED
        raise Refused(code, exc.strerror or "cannot open the file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused(NOT_FOUND, "not a regular file")
    return fd, st
