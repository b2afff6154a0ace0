"""A PXE ROM's tsize probe, then its real request from the same port (issue 14).

Many PXE ROMs ask with `tsize`, read the size from the OACK, end that transfer with an
ERROR (code 8: option negotiation refused by the client) and at once ask again from the
same port. That second request is new, not a resend of the first: it must be served.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_tftp_http_real import (
    OP_DATA,
    OP_ERROR,
    OP_OACK,
    Client,
    Env,
    head,
    parse_oack,
    rrq,
    running_env,
)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from running_env(tmp_path)


@pytest.mark.parametrize("again", [{"tsize": "0"}, {"blksize": "1024"}])
def test_a_request_right_after_a_tsize_probe_is_served(env: Env, again: dict[str, str]) -> None:
    size = len(env.files["small.bin"])
    with Client(env.tftp) as c:
        for _ in range(5):  # a few rounds: the listener must not race the transfer's end
            c.peer = None
            c.send_request(rrq(b"small.bin", tsize="0"))
            oack = c.recv()
            assert head(oack)[0] == OP_OACK and parse_oack(oack)["tsize"] == str(size)
            assert c.peer is not None
            c.sock.sendto(struct.pack("!HH", OP_ERROR, 8) + b"tsize probe\0", c.peer)
            c.peer = None
            c.send_request(rrq(b"small.bin", **again))  # at once, from the same port
            first = c.recv()
            assert head(first)[0] in (OP_OACK, OP_DATA), first[:40]
            c.sock.sendto(struct.pack("!HH", OP_ERROR, 0) + b"enough\0", c.peer)
