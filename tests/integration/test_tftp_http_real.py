"""The tftp and http services with real clients against `appliance run`.

The daemon serves a loopback inventory (tests.helpers.loopback_inventory: bootstrap
127.0.0.53, master-0 127.0.0.50, worker-0 127.0.0.44) with tftp and http on
127.0.0.1 and generated boot files under tmp_path. Checked:
- TFTP: curl (default options and --tftp-blksize 1468), the tftp-hpa client
  (binary and netascii), a raw RFC 7440 windowsize client, a lost ACK (the block is
  resent after the negotiated timeout), duplicate ACKs (nothing resent), a gap in a
  window, traversal attempts (`..`, absolute, NUL, symlink out of the root), WRQ:
  same bytes as on disk (sha256), error packets and never the file.
- HTTP with curl: Range, HEAD, ignition only to the owning node's address (curl
  bound to that 127.0.0.x) and 403 + an audit line for any other.
- Boot once: pxelinux, GRUB and iPXE configs of a MAC install, say local boot after
  the ignition fetch, install again after `appliance reinstall` (CLI against the
  running daemon, and against the store with no daemon), and the state survives
  a restart. Node events (bootloader, kernel, initramfs, ignition) reach the admin API.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, Daemon, free_port, loopback_inventory, need_tool, write_inventory

MASTER, WORKER, BOOTSTRAP = "127.0.0.50", "127.0.0.44", "127.0.0.53"
MASTER_MAC = "52:54:00:00:00:50"
MASTER_PXE = "01-52-54-00-00-00-50"
OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6
SECRET = b"SECRET-OUTSIDE-THE-ROOT\n"
RECV_TIMEOUT = 10.0  # one datagram; generous: the machine may be loaded
TRANSFER_LIMIT = 120.0  # a whole transfer, upper bound for every loop below


# --- the daemon -----------------------------------------------------------------------------


@dataclass
class Env:
    base: Path
    config: Path
    tftp: tuple[str, int]
    http: str  # http://127.0.0.1:port
    admin: str
    files: dict[str, bytes]  # TFTP name -> content
    start: Callable[[], Daemon]
    daemon: Daemon | None = None

    def path(self, name: str) -> Path:
        return self.base / name


def _build(
    base: Path, listen_host: str, **boot: Any
) -> tuple[Path, dict[str, Any], dict[str, bytes]]:
    """Boot files and ignition under `base`; the inventory that serves them."""
    raw = loopback_inventory(base)
    raw["boot"].update(boot)
    raw["listen"]["tftp"] = f"{listen_host}:{free_port(socket.SOCK_DGRAM)}"
    raw["listen"]["http"] = f"{listen_host}:{free_port()}"
    raw["boot"]["kernel_args"] = ["console=ttyS0,115200n8"]
    raw["nodes"][1]["kernel_args"] = ["ip=enp1s0f0:dhcp"]
    rnd = os.urandom
    files = {
        "undionly.kpxe": rnd(3 * 1024 * 1024 + 123),
        "ipxe.efi": rnd(1024 * 1024),
        "exact.bin": rnd(1468 * 512),  # a multiple of both block sizes: ends with an empty block
        "small.bin": rnd(40 * 1024 + 7),
        "empty.bin": b"",
        "images/rhcos/installer-kernel": rnd(2 * 1024 * 1024 + 5),
        "images/rhcos/installer-initramfs.img": rnd(1024 * 1024 + 9),
    }
    for name, content in files.items():
        path = base / (name if name.startswith("images/") else f"tftp/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (base / "secret.txt").write_bytes(SECRET)
    (base / "tftp" / "link-out").symlink_to(base / "secret.txt")
    (base / "tftp" / "link-in").symlink_to("small.bin")
    (base / "images" / "link-out").symlink_to(base / "secret.txt")
    ign = base / "ignition"
    ign.mkdir()
    for role in ("bootstrap", "master", "worker"):
        body = {"ignition": {"version": "3.2.0"}, "role": role, "secret": rnd(8).hex()}
        (ign / f"{role}.ign").write_text(json.dumps(body))
    files["link-in"] = files["small.bin"]
    return write_inventory(base / "inventory.yaml", raw), raw, files


def _env(base: Path, listen_host: str = "127.0.0.1", **boot: Any) -> Env:
    """`listen_host` is where tftp and http listen; clients always use 127.0.0.1."""
    config, raw, files = _build(base, listen_host, **boot)
    tftp_port = int(raw["listen"]["tftp"].rpartition(":")[2])
    http_port = int(raw["listen"]["http"].rpartition(":")[2])

    def start() -> Daemon:
        d = Daemon(config, base / f"daemon-{time.monotonic_ns()}.log")
        env.daemon = d
        try:
            d.wait_for("serving demo.example.com")
        except BaseException:
            d.stop()  # never leave a daemon behind a failed start
            raise
        return d

    env = Env(
        base=base,
        config=config,
        tftp=("127.0.0.1", tftp_port),
        http=f"http://127.0.0.1:{http_port}",
        admin=f"http://{raw['listen']['admin']}",
        files=files,
        start=start,
    )
    return env


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One daemon for the tests that do not depend on boot-once state."""
    env = _env(tmp_path_factory.mktemp("tftp-http"))
    env.start()
    yield env
    assert env.daemon is not None
    env.daemon.stop()


def running_env(tmp_path: Path) -> Iterator[Env]:
    """An Env started in `tmp_path` for a fixture; its daemon stopped at the end."""
    env = _env(tmp_path)
    env.start()
    yield env
    if env.daemon is not None:
        env.daemon.stop()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Env]:
    """A daemon of its own (boot-once state, events, restarts)."""
    yield from running_env(tmp_path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a raw TFTP client ----------------------------------------------------------------------


class TftpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"TFTP error {code}: {message}")
        self.code = code


def rrq(name: bytes, mode: bytes = b"octet", opcode: int = OP_RRQ, /, **options: str) -> bytes:
    # Positional-only, so that no option name can land on `mode` or `opcode`.
    opts = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
    return struct.pack("!H", opcode) + name + b"\0" + mode + b"\0" + opts


def parse_oack(packet: bytes) -> dict[str, str]:
    fields = packet[2:].split(b"\0")[:-1]
    return {fields[i].decode().lower(): fields[i + 1].decode() for i in range(0, len(fields), 2)}


class Client:
    """One transfer: requests on the server's port, talks to the transfer's own port."""

    def __init__(self, server: tuple[str, int], src: str = "127.0.0.1") -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((src, 0))
        # The kernel may pick the server's own port number for a client on another
        # loopback address (the test server listens on an ephemeral port): the server
        # drops a request "from our own port" by design (admission.drop_reason), so
        # such a client would wait in vain. Rare (1 in ~28,000), but 640 clients hit it.
        while self.sock.getsockname()[1] == server[1]:
            spare, self.sock = self.sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((src, 0))
            spare.close()
        self.sock.settimeout(RECV_TIMEOUT)
        self.peer: tuple[str, int] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send_request(self, packet: bytes) -> None:
        self.sock.sendto(packet, self.server)

    def recv(self) -> bytes:
        data, addr = self.sock.recvfrom(65536)
        if head(data)[0] == OP_ERROR and addr == self.server:
            return data  # a refused request is answered from the server's port
        if self.peer is None:
            self.peer = addr
            assert addr[1] != self.server[1], "a transfer must come from a new port (TID)"
        else:
            assert addr == self.peer, f"a packet from another TID {addr}"
        return data

    def abort(self) -> None:
        """End the transfer as a client may: an ERROR to the transfer's port."""
        assert self.peer is not None
        self.sock.sendto(struct.pack("!HH", OP_ERROR, 0) + b"enough\0", self.peer)

    def ack(self, block: int) -> None:
        assert self.peer is not None
        self.sock.sendto(struct.pack("!HH", OP_ACK, block & 0xFFFF), self.peer)

    def quiet_for(self, seconds: float) -> bytes | None:
        """The next packet if one comes within `seconds`, else None."""
        self.sock.settimeout(seconds)
        try:
            return self.recv()
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(RECV_TIMEOUT)


def head(packet: bytes) -> tuple[int, int]:
    op, num = struct.unpack_from("!HH", packet)
    return int(op), int(num)


def expect_error(packet: bytes) -> int:
    op, code = head(packet)
    assert op == OP_ERROR, f"expected an ERROR, got {packet[:40]!r}"
    assert packet.endswith(b"\0")
    return code


def fetch(
    server: tuple[str, int],
    name: str | bytes,
    src: str = "127.0.0.1",
    **options: str,
) -> tuple[bytes, dict[str, str]]:
    """A whole read with any RFC 7440 window: ACK every window's last block or the end.

    Resent blocks (the server's timer on a slow machine) are ignored; the bytes and
    the OACK's options come back.
    """
    raw_name = name.encode() if isinstance(name, str) else name
    with Client(server, src) as c:
        c.send_request(rrq(raw_name, **options))
        first = c.recv()
        op, num = head(first)
        if op == OP_ERROR:
            raise TftpError(num, first[4:-1].decode(errors="replace"))
        oack: dict[str, str] = {}
        pending: list[bytes] = []
        if op == OP_OACK:
            oack = parse_oack(first)
            c.ack(0)
        else:
            pending.append(first)
        blksize = int(oack.get("blksize", 512))
        window = int(oack.get("windowsize", 1))
        out = bytearray()
        expected, last_acked = 1, 0
        deadline = time.monotonic() + TRANSFER_LIMIT
        while time.monotonic() < deadline:
            packet = pending.pop() if pending else c.recv()
            op, num = head(packet)
            if op == OP_ERROR:
                raise TftpError(num, packet[4:-1].decode(errors="replace"))
            if op == OP_OACK:
                continue  # resent before our ACK 0 arrived
            assert op == OP_DATA, packet[:20]
            if num != expected & 0xFFFF:
                continue  # a resent block we already have
            payload = packet[4:]
            assert len(payload) <= blksize
            out += payload
            if len(payload) < blksize:
                c.ack(num)
                return bytes(out), oack
            if expected - last_acked >= window:
                c.ack(num)
                last_acked = expected
            expected += 1
        raise AssertionError(f"transfer of {name!r} did not finish in {TRANSFER_LIMIT} s")


# --- TFTP: real clients ---------------------------------------------------------------------


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [need_tool("curl"), "-s", *args], capture_output=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize("blksize", [None, "1468"])
@pytest.mark.parametrize("name", ["undionly.kpxe", "images/rhcos/installer-kernel", "exact.bin"])
def test_curl_tftp_same_bytes(shared: Env, name: str, blksize: str | None) -> None:
    host, port = shared.tftp
    extra = ["--tftp-blksize", blksize] if blksize else []
    res = curl(*extra, f"tftp://{host}:{port}/{name}")
    assert res.returncode == 0, res.stderr
    assert sha(res.stdout) == sha(shared.files[name])


def test_empty_file(shared: Env) -> None:
    """One empty DATA block. (curl refuses an OACK with tsize 0, from tftpd-hpa too,
    so curl asks without options here.)"""
    host, port = shared.tftp
    res = curl("--tftp-no-options", f"tftp://{host}:{port}/empty.bin")
    assert res.returncode == 0 and res.stdout == b""
    assert fetch(shared.tftp, "empty.bin", tsize="0") == (b"", {"tsize": "0"})
    assert fetch(shared.tftp, "empty.bin") == (b"", {})


def test_curl_tftp_missing_file(shared: Env) -> None:
    host, port = shared.tftp
    res = curl(f"tftp://{host}:{port}/no-such-file")
    assert res.returncode == 68 and res.stdout == b""  # curl: TFTP file not found


def _tftp_hpa(env: Env, *command: str, mode: str = "binary") -> str:
    host, port = env.tftp
    res = subprocess.run(
        [need_tool("tftp"), "-v", host, str(port), "-m", mode, "-c", *command],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=env.base,
    )
    return (res.stdout + res.stderr).decode(errors="replace")


@pytest.mark.parametrize("name", ["undionly.kpxe", "images/rhcos/installer-initramfs.img"])
def test_tftp_hpa_client(shared: Env, tmp_path: Path, name: str) -> None:
    """tftp-hpa sends no options: plain RFC 1350 lock-step with 512-byte blocks."""
    dest = tmp_path / "got"
    out = _tftp_hpa(shared, "get", name, str(dest))
    assert "Error" not in out, out
    assert sha(dest.read_bytes()) == sha(shared.files[name])


def test_tftp_hpa_netascii_generated_config(shared: Env, tmp_path: Path) -> None:
    """netascii mode: the client turns CR LF back into LF, so it sees the HTTP text."""
    dest = tmp_path / "worker.cfg"
    worker_cfg = "pxelinux.cfg/01-52-54-00-00-00-44"
    out = _tftp_hpa(shared, "get", worker_cfg, str(dest), mode="netascii")
    assert "Error" not in out, out
    with urllib.request.urlopen(f"{shared.http}/{worker_cfg}", timeout=30) as resp:
        assert dest.read_bytes() == resp.read()
    assert b"\r" not in dest.read_bytes() and b"\nLABEL " in dest.read_bytes()


def test_tftp_hpa_errors(shared: Env, tmp_path: Path) -> None:
    trav = tmp_path / "trav"
    out = _tftp_hpa(shared, "get", "../inventory.yaml", str(trav))
    assert "Error code 2" in out
    assert not trav.exists() or trav.read_bytes() == b""
    (tmp_path / "up.txt").write_text("hello\n")
    out = _tftp_hpa(shared, "put", str(tmp_path / "up.txt"), "up.txt")
    assert "Error code 2" in out  # read-only server
    assert not (shared.path("tftp") / "up.txt").exists()


# --- TFTP: a raw client for windows, lost and duplicate ACKs ------------------------------


@pytest.mark.parametrize("name", ["undionly.kpxe", "exact.bin", "images/rhcos/installer-kernel"])
def test_windowsize_transfer(shared: Env, name: str) -> None:
    data, oack = fetch(shared.tftp, name, blksize="1468", windowsize="8", tsize="0")
    assert oack == {"blksize": "1468", "windowsize": "8", "tsize": str(len(shared.files[name]))}
    assert sha(data) == sha(shared.files[name])


def test_options_are_negotiated_and_capped(shared: Env) -> None:
    data, oack = fetch(shared.tftp, "small.bin", blksize="100000", windowsize="1000", foo="1")
    assert oack == {"blksize": "65464", "windowsize": "64"}
    assert data == shared.files["small.bin"]
    data, oack = fetch(shared.tftp, "small.bin", blksize="4")  # below 8: plain RFC 1350
    assert oack == {} and data == shared.files["small.bin"]


def test_symlink_inside_the_root_is_served(shared: Env) -> None:
    data, _ = fetch(shared.tftp, "link-in")
    assert data == shared.files["small.bin"]


def test_lost_ack_is_followed_by_a_resend_of_that_block(shared: Env) -> None:
    """The client withholds the ACK of block 5: after its 1 s timeout the server sends
    block 5 again, unchanged, and never block 6 before block 5 is acknowledged."""
    content = shared.files["small.bin"]
    drop = 5
    with Client(shared.tftp) as c:
        c.send_request(rrq(b"small.bin", blksize="1024", timeout="1"))
        first = c.recv()
        assert head(first)[0] == OP_OACK
        assert parse_oack(first) == {"blksize": "1024", "timeout": "1"}
        c.ack(0)
        out = bytearray()
        expected = 1
        withheld: bytes | None = None
        resent: list[bytes] = []
        deadline = time.monotonic() + TRANSFER_LIMIT
        while time.monotonic() < deadline:
            packet = c.recv()
            op, num = head(packet)
            assert op == OP_DATA, packet[:20]
            if withheld is not None and not resent:
                # The very next packet after a withheld ACK: block 5 again.
                assert num == drop, f"after the lost ACK of {drop} came block {num}"
                assert packet == withheld
                resent.append(packet)
            if num != expected:
                assert num < expected, f"block {num} while waiting for {expected}"
                continue  # a resend of what we have (slow machine): already acknowledged
            if num == drop and withheld is None:
                withheld = packet  # "lost": no ACK
                continue
            out += packet[4:]
            c.ack(num)
            expected += 1
            if len(packet) - 4 < 1024:
                break
        assert resent, "block 5 was never resent"
        assert bytes(out) == content


def test_duplicate_acks_send_nothing(shared: Env) -> None:
    """Sorcerer's Apprentice: duplicate ACKs (lock-step and in a window) move nothing.

    Before each real ACK the client repeats the previous one five times. A long
    timeout (60 s) keeps the server's timer out of it: every block must arrive
    exactly once, in order, and nothing may follow the end.
    """
    content = shared.files["small.bin"]  # 40 kB + 7: blocks 1-40 full, 41 short
    for window in (1, 4):
        with Client(shared.tftp) as c:
            c.send_request(rrq(b"small.bin", blksize="1024", timeout="60", windowsize=str(window)))
            assert parse_oack(c.recv())["windowsize"] == str(window)
            c.ack(0)
            seen: list[int] = []
            out = bytearray()
            last_acked = 0
            for _ in range(100):
                packet = c.recv()
                op, num = head(packet)
                assert op == OP_DATA
                seen.append(num)
                out += packet[4:]
                if len(packet) - 4 < 1024:
                    c.ack(num)
                    break
                if num - last_acked == window:
                    for _ in range(5):
                        c.ack(last_acked)  # duplicates of the ACK that moved the window
                    c.ack(num)
                    last_acked = num
            assert bytes(out) == content
            assert seen == list(range(1, 42)), "a block was sent twice or skipped"
            assert c.quiet_for(0.5) is None  # nothing after the end either


def test_partial_window_ack_restarts_at_the_gap(shared: Env) -> None:
    """RFC 7440: the client got 1-3 of a window of 8 and acknowledges 3: 4.. come again."""
    content = shared.files["small.bin"]
    with Client(shared.tftp) as c:
        c.send_request(rrq(b"small.bin", blksize="1024", timeout="60", windowsize="8"))
        assert parse_oack(c.recv())["windowsize"] == "8"
        c.ack(0)
        window = [c.recv() for _ in range(8)]
        assert [head(p)[1] for p in window] == list(range(1, 9))
        c.ack(3)
        again = [c.recv() for _ in range(8)]
        assert [head(p)[1] for p in again] == list(range(4, 12))
        assert again[:5] == window[3:]  # the same bytes for the same blocks
        for i, packet in enumerate(again):
            assert packet[4:] == content[(3 + i) * 1024 : (4 + i) * 1024]
        c.abort()


def test_concurrent_transfers_each_get_their_own_thread(shared: Env) -> None:
    """Eight lock-step transfers at once, interleaved block by block by one client
    loop: each is served from its own port (a worker thread each), all intact."""
    names = ["undionly.kpxe", "ipxe.efi", "small.bin", "exact.bin"] * 2
    clients = [Client(shared.tftp) for _ in names]
    try:
        for c, name in zip(clients, names, strict=True):
            c.send_request(rrq(name.encode(), blksize="1468"))
            assert head(c.recv())[0] == OP_OACK
            c.ack(0)
        got = [bytearray() for _ in names]
        open_ = set(range(len(names)))
        deadline = time.monotonic() + TRANSFER_LIMIT
        while open_ and time.monotonic() < deadline:
            for i in sorted(open_):
                op, num = head(packet := clients[i].recv())
                assert op == OP_DATA
                if len(got[i]) // 1468 + 1 != num:  # a resend (slow machine): ACK again
                    clients[i].ack(num)
                    continue
                got[i] += packet[4:]
                clients[i].ack(num)
                if len(packet) - 4 < 1468:
                    open_.discard(i)
        assert len({c.peer for c in clients}) == len(names)  # a TID (port) each
        for data, name in zip(got, names, strict=True):
            assert sha(bytes(data)) == sha(shared.files[name]), name
    finally:
        for c in clients:
            c.sock.close()


def test_stop_during_transfers_is_prompt_and_clean(fresh: Env) -> None:
    """SIGTERM while two transfers wait for ACKs (60 s timeout): the daemon ends at
    once with status 0, the transfers' threads woken rather than waited out."""
    clients = [Client(fresh.tftp) for _ in range(2)]
    try:
        for c in clients:
            c.send_request(rrq(b"undionly.kpxe", blksize="1468", timeout="60"))
            assert head(c.recv())[0] == OP_OACK
            c.ack(0)
            assert head(c.recv()) == (OP_DATA, 1)
        assert fresh.daemon is not None
        t0 = time.monotonic()
        assert fresh.daemon.stop() == 0
        assert time.monotonic() - t0 < 4.0  # under STOP_WAIT (5 s): woken, not waited out
        assert "Traceback" not in fresh.daemon.output()
    finally:
        for c in clients:
            c.sock.close()


# --- TFTP: refusals ---------------------------------------------------------------------------


def _refused(env: Env, packet: bytes) -> int:
    with Client(env.tftp) as c:
        c.send_request(packet)
        reply = c.recv()
        assert SECRET not in reply
        return expect_error(reply)


@pytest.mark.parametrize(
    ("name", "codes"),
    [
        (b"../secret.txt", {2}),
        (b"../../../../../../etc/passwd", {2}),
        (b"images/../../secret.txt", {2}),
        (b"images/../inventory.yaml", {2}),
        (b"..\\secret.txt", {2}),
        (b"/../secret.txt", {2}),
        (b"link-out", {2}),  # a symlink in tftp_root pointing outside it
        (b"images/link-out", {2}),
        (b"/etc/passwd", {1}),  # absolute: looked up inside the root, not there
        (b"//etc/passwd", {1}),
        (b"//[x/../secret.txt", {2}),
        (b"/", {1}),
    ],
)
def test_traversal_attempts_are_refused(shared: Env, name: bytes, codes: set[int]) -> None:
    assert _refused(shared, rrq(name)) in codes
    assert _refused(shared, rrq(name, blksize="1468", tsize="0")) in codes


@pytest.mark.parametrize(
    "fields",
    [
        b"../secret.txt\0.bin\0octet\0",
        b"undionly.kpxe\0/../secret.txt\0octet\0",
        b"../secret.txt\0\0octet\0",
        b"link-out\0x\0octet\0",
        b"\0../secret.txt\0octet\0",
    ],
)
def test_nul_in_the_name_never_reaches_a_file(shared: Env, fields: bytes) -> None:
    """A NUL ends the name on the wire, so the fields shift: an error, never a file."""
    assert _refused(shared, struct.pack("!H", OP_RRQ) + fields) in (1, 2, 4)


def test_curl_traversal(shared: Env) -> None:
    host, port = shared.tftp
    for path in ("../secret.txt", "link-out", "images/../../secret.txt"):
        res = curl("--path-as-is", f"tftp://{host}:{port}/{path}")
        assert res.returncode != 0 and SECRET not in res.stdout


def test_write_request_is_refused(shared: Env) -> None:
    assert _refused(shared, rrq(b"new.bin", b"octet", OP_WRQ)) == 2
    assert _refused(shared, rrq(b"small.bin", b"octet", OP_WRQ)) == 2
    assert shared.path("tftp/small.bin").read_bytes() == shared.files["small.bin"]


def test_unknown_mode_is_refused(shared: Env) -> None:
    assert _refused(shared, rrq(b"small.bin", b"mail")) == 4


def test_service_survives_garbage(shared: Env) -> None:
    with Client(shared.tftp) as c:
        for junk in (b"", b"\0", b"\0\1", b"\0\1abc", b"\xff" * 600, b"\0\1\xff\xfe\0octet\0"):
            c.send_request(junk)
    data, _ = fetch(shared.tftp, "small.bin")
    assert data == shared.files["small.bin"]


# --- HTTP with curl ---------------------------------------------------------------------------


def test_http_range(shared: Env, tmp_path: Path) -> None:
    content = shared.files["images/rhcos/installer-kernel"]
    out = tmp_path / "part"
    res = curl(
        "-r", "100-199", "-o", str(out), "-w", "%{http_code}",
        f"{shared.http}/images/rhcos/installer-kernel",
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout == b"206"
    assert out.read_bytes() == content[100:200]
    res = curl("-r", "-10", f"{shared.http}/images/rhcos/installer-kernel")
    assert res.stdout == content[-10:]
    res = curl("-D", "-", "-o", "/dev/null", "-r", "100-199", f"{shared.http}/boot/undionly.kpxe")
    headers = res.stdout.decode().lower()
    assert " 206 " in headers.splitlines()[0]
    assert f"content-range: bytes 100-199/{len(shared.files['undionly.kpxe'])}" in headers


def test_http_full_file_same_bytes(shared: Env) -> None:
    for url, name in (
        ("images/rhcos/installer-kernel", "images/rhcos/installer-kernel"),
        ("boot/undionly.kpxe", "undionly.kpxe"),
    ):
        res = curl("--fail", f"{shared.http}/{url}")
        assert res.returncode == 0 and sha(res.stdout) == sha(shared.files[name])


def _headers(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines()[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            out[key.strip().lower()] = value.strip()
    return out


def test_http_head(shared: Env) -> None:
    res = curl("-I", f"{shared.http}/images/rhcos/installer-kernel")
    assert res.returncode == 0
    text = res.stdout.decode()
    assert text.startswith("HTTP/1.1 200")
    headers = _headers(text)
    assert headers["content-length"] == str(len(shared.files["images/rhcos/installer-kernel"]))
    assert headers["etag"].startswith('"') and headers["etag"].endswith('"')
    assert headers["last-modified"].endswith("GMT")
    assert headers["accept-ranges"] == "bytes"
    # The ETag validates: a conditional GET is 304.
    res = curl(
        "-o", "/dev/null", "-w", "%{http_code}", "-H", f"If-None-Match: {headers['etag']}",
        f"{shared.http}/images/rhcos/installer-kernel",
    )  # fmt: skip
    assert res.stdout == b"304"


@pytest.mark.parametrize(
    ("path", "codes"),
    [
        ("images/../secret.txt", {403, 404}),
        ("images/../../secret.txt", {403, 404}),
        ("images/link-out", {403}),
        ("boot/link-out", {403}),
        ("boot/../secret.txt", {403, 404}),
        ("images/%2e%2e/secret.txt", {403, 404}),
        ("images/rhcos", {404}),
        ("nothing-here", {404}),
    ],
)
def test_http_traversal(shared: Env, path: str, codes: set[int]) -> None:
    res = curl("--path-as-is", "-w", "\n%{http_code}", f"{shared.http}/{path}")
    body, _, code = res.stdout.rpartition(b"\n")
    assert int(code) in codes and SECRET not in body


def _status(env: Env, path: str, src: str, *extra: str) -> tuple[int, bytes]:
    res = curl("--interface", src, *extra, "-w", "\n%{http_code}", f"{env.http}/{path}")
    assert res.returncode == 0, res.stderr
    body, _, code = res.stdout.rpartition(b"\n")
    return int(code), body


def _wait_log(env: Env, text: str, count: int = 1, timeout: float = 15.0) -> None:
    assert env.daemon is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if env.daemon.output().count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} x {text!r} not in the log:\n{env.daemon.output()}")


def test_ignition_only_to_its_owners(shared: Env) -> None:
    ign = shared.path("ignition")
    code, body = _status(shared, "ignition/master.ign", MASTER)
    assert code == 200 and body == (ign / "master.ign").read_bytes()
    code, body = _status(shared, "ignition/master.ign", WORKER)
    assert code == 403 and json.loads((ign / "master.ign").read_text())["secret"] not in str(body)
    _wait_log(shared, "ignition: refused master.ign (master) to 127.0.0.44")
    code, body = _status(shared, "ignition/worker.ign", WORKER)
    assert code == 200 and body == (ign / "worker.ign").read_bytes()
    code, _ = _status(shared, "ignition/bootstrap.ign", MASTER)
    assert code == 403
    code, _ = _status(shared, "ignition/bootstrap.ign", "127.0.0.1")  # not a node at all
    assert code == 403
    code, body = _status(shared, "ignition/bootstrap.ign", BOOTSTRAP)
    assert code == 200 and body == (ign / "bootstrap.ign").read_bytes()
    # Per node: the node's own file if there is one, else its role's.
    code, body = _status(shared, "ignition/node/master-0.ign", MASTER)
    assert code == 200 and body == (ign / "master.ign").read_bytes()
    code, _ = _status(shared, "ignition/node/master-0.ign", BOOTSTRAP)
    assert code == 403
    _wait_log(shared, "ignition: refused master.ign (node master-0) to 127.0.0.53")
    code, _ = _status(shared, "ignition/node/nobody.ign", MASTER)
    assert code == 404
    code, _ = _status(shared, "ignition/admin.ign", MASTER)
    assert code == 404


# --- boot once ----------------------------------------------------------------------------------


def _configs(env: Env, mac: str = MASTER_MAC) -> dict[str, str]:
    """The node's boot configs, fetched the way the firmware would (and over HTTP too)."""
    pxe = "01-" + mac.replace(":", "-")
    host, port = env.tftp
    out: dict[str, str] = {}
    for kind, path in (("pxelinux", f"pxelinux.cfg/{pxe}"), ("grub", f"grub.cfg-{pxe}")):
        res = curl(f"tftp://{host}:{port}/{path}")
        assert res.returncode == 0, res.stderr
        out[f"{kind}-tftp"] = res.stdout.decode()
        res = curl("--fail", f"{env.http}/{path}")
        assert res.returncode == 0, res.stderr
        out[f"{kind}-http"] = res.stdout.decode()
        assert out[f"{kind}-tftp"] == out[f"{kind}-http"]
    res = curl("--fail", f"{env.http}/boot.ipxe?mac={mac}")
    assert res.returncode == 0, res.stderr
    out["ipxe"] = res.stdout.decode()
    return out


INSTALL_LINE = {"pxelinux": "KERNEL ", "grub": "linux ", "ipxe": "kernel "}
LOCAL_LINE = {"pxelinux": "LOCALBOOT 0", "grub": "exit", "ipxe": "exit"}


def _boots(configs: dict[str, str]) -> str:
    """'install' or 'local': what every config says (they must agree)."""
    verdicts = set()
    for key, text in configs.items():
        kind = key.split("-")[0]
        lines = [line.strip() for line in text.splitlines()]
        installs = any(line.startswith(INSTALL_LINE[kind]) for line in lines)
        local = LOCAL_LINE[kind] in lines
        assert installs != local, text
        verdicts.add("install" if installs else "local")
    assert len(verdicts) == 1, configs
    return verdicts.pop()


def _reinstall(env: Env, node: str = "master-0") -> str:
    res = subprocess.run(
        [sys.executable, "-m", "appliance", "reinstall", node, "--config", str(env.config)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.decode()


def test_boot_once_reinstall_and_restart(fresh: Env) -> None:
    env = fresh
    first = _configs(env)
    assert _boots(first) == "install"
    assert "KERNEL images/rhcos/installer-kernel" in first["pxelinux-tftp"]
    assert "linux /images/rhcos/installer-kernel" in first["grub-tftp"]
    assert f"kernel {env.http}/images/rhcos/installer-kernel initrd=initrd" in first["ipxe"]
    assert "ip=enp1s0f0:dhcp" in first["ipxe"] and "console=ttyS0,115200n8" in first["ipxe"]

    # A HEAD is no install; a refused fetch from another address neither.
    assert _status(env, "ignition/master.ign", MASTER, "-I")[0] == 200
    assert _status(env, "ignition/master.ign", WORKER)[0] == 403
    assert _boots(_configs(env)) == "install"

    # The ignition fetch: from now on local boot (and only for master-0).
    code, body = _status(env, "ignition/master.ign", MASTER)
    assert code == 200 and body == env.path("ignition/master.ign").read_bytes()
    after = _configs(env)
    assert _boots(after) == "local"
    assert "master-0 is installed" in after["pxelinux-tftp"]
    assert _boots(_configs(env, "52:54:00:00:00:44")) == "install"  # worker-0
    _wait_log(env, "master-0 fetched its install ignition")

    # The operator asks for a reinstall through the running daemon.
    assert "told the running appliance" in _reinstall(env)
    assert _boots(_configs(env)) == "install"
    _wait_log(env, "master-0: reinstall requested")

    # Installed again, then a restart: the state survives.
    assert _status(env, "ignition/node/master-0.ign", MASTER)[0] == 200
    assert _boots(_configs(env)) == "local"
    assert env.daemon is not None and env.daemon.stop() == 0
    env.start()
    assert _boots(_configs(env)) == "local"

    # With no daemon running the CLI writes the store; the next start reads it.
    assert env.daemon.stop() == 0
    assert "no appliance running" in _reinstall(env)
    env.start()
    assert _boots(_configs(env)) == "install"


def _post(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, method="POST", data=b"")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_reinstall_api_and_cli_errors(fresh: Env) -> None:
    env = fresh
    assert _status(env, "ignition/master.ign", MASTER)[0] == 200
    assert _boots(_configs(env)) == "local"
    url = f"{env.admin}/api/v1/nodes/master-0/reinstall"
    assert _post(url, None) == 401  # a mutation needs the token, even on loopback
    assert _post(url, "wrong") == 401
    assert _boots(_configs(env)) == "local"
    token = env.path("state/admin.token").read_text().strip()
    assert _post(f"{env.admin}/api/v1/nodes/nobody/reinstall", token) == 404
    assert _post(url, token) == 200
    assert _boots(_configs(env)) == "install"
    res = subprocess.run(
        [sys.executable, "-m", "appliance", "reinstall", "nobody", "--config", str(env.config)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and b"no node 'nobody'" in res.stderr


def test_after_install_reinstall_never_goes_local(tmp_path: Path) -> None:
    env = _env(tmp_path, after_install="reinstall")
    try:
        env.start()
        assert _status(env, "ignition/master.ign", MASTER)[0] == 200
        assert _boots(_configs(env)) == "install"
    finally:
        if env.daemon is not None:
            env.daemon.stop()


def _nodes(env: Env) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"{env.admin}/api/v1/nodes", timeout=30) as resp:
        body = json.loads(resp.read())
    return {n["name"]: n["stages"] for n in body["nodes"]}


def _wait_stages(env: Env, node: str, stages: set[str], timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    got: dict[str, Any] = {}
    while time.monotonic() < deadline:
        got = _nodes(env)[node]
        if stages <= set(got):
            return got
        time.sleep(0.1)
    raise AssertionError(f"{node}: stages {sorted(got)}, expected {sorted(stages)}")


def test_events_reach_the_admin_api(fresh: Env) -> None:
    env = fresh
    # TFTP from master-0's address: the boot loader and the kernel.
    data, _ = fetch(env.tftp, "undionly.kpxe", src=MASTER, blksize="1468", windowsize="8")
    assert data == env.files["undionly.kpxe"]
    data, _ = fetch(env.tftp, "images/rhcos/installer-kernel", src=MASTER, blksize="1468")
    assert data == env.files["images/rhcos/installer-kernel"]
    # HTTP from master-0's address: the initramfs and the ignition.
    code, body = _status(env, "images/rhcos/installer-initramfs.img", MASTER)
    assert code == 200 and body == env.files["images/rhcos/installer-initramfs.img"]
    assert _status(env, "ignition/master.ign", MASTER)[0] == 200
    stages = _wait_stages(env, "master-0", {"bootloader", "kernel", "initramfs", "ignition"})
    assert stages["bootloader"]["detail"] == "tftp undionly.kpxe"
    assert stages["kernel"]["detail"] == "tftp images/rhcos/installer-kernel"
    assert stages["initramfs"]["detail"] == "http /images/rhcos/installer-initramfs.img"
    assert stages["ignition"]["detail"] == "http master.ign"
    # UEFI HTTP boot: the loader over HTTP from worker-0; a refused ignition is no event.
    code, body = _status(env, "boot/ipxe.efi", WORKER)
    assert code == 200 and body == env.files["ipxe.efi"]
    assert _status(env, "ignition/master.ign", WORKER)[0] == 403
    worker = _wait_stages(env, "worker-0", {"bootloader"})
    assert worker["bootloader"]["detail"] == "http /boot/ipxe.efi"
    assert "ignition" not in _nodes(env)["worker-0"]
    assert _nodes(env)["bootstrap"] == {}


def _dual_stack() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::ffff:127.0.0.1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _dual_stack(), reason="no IPv6 (v4-mapped) sockets here")
def test_ipv6_listener_knows_ipv4_nodes(tmp_path: Path) -> None:
    """On an IPv6 socket (as `[::]:8080` listens) an IPv4 node is ::ffff:a.b.c.d:
    it still owns its ignition and its fetches are still its events. (Bound to the
    v4-mapped loopback address, so nothing listens beyond 127.0.0.1.)"""
    env = _env(tmp_path, listen_host="[::ffff:127.0.0.1]")
    try:
        env.start()
        code, body = _status(env, "ignition/master.ign", MASTER)
        assert code == 200 and body == env.path("ignition/master.ign").read_bytes()
        assert _status(env, "ignition/master.ign", WORKER)[0] == 403
        _wait_log(env, "ignition: refused master.ign (master) to ::ffff:127.0.0.44")
        data, _ = fetch(env.tftp, "undionly.kpxe", src=MASTER, blksize="1468")
        assert data == env.files["undionly.kpxe"]
        stages = _wait_stages(env, "master-0", {"bootloader", "ignition"})
        assert stages["bootloader"]["detail"] == "tftp undionly.kpxe"
        assert _boots(_configs(env)) == "local"
    finally:
        if env.daemon is not None:
            env.daemon.stop()
