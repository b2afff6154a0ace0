"""The tftp service against hostile input and outside clients (issue 14), with `appliance run`.

What an attacker or a careless neighbour does, on loopback:
- a spoofed ACK/ERROR/DATA whose source is the listener itself (a raw socket writes the
  UDP header): the listener must not answer itself; two appliances must not bounce a
  stray packet between their listeners;
- one read request that is never acknowledged earns at most 3 packets in a few seconds
  (reflection), and holds its slot only that long;
- many never-acknowledged requests: a cap per client address, a share of the slots kept
  for inventory nodes, duplicate requests from one TID ignored;
- packets to a transfer's port from another TID: no reply, the transfer goes on; an
  ERROR from the peer ends it without a reply (in the C loop too);
- netascii of a large file: converted while streaming, in bounded memory, off the
  event loop, with the bytes tftpd-hpa puts on the wire (compared with a real in.tftpd);
- a 512-byte file name, a name with control characters: an ERROR, no traceback.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import free_port, get_json, need_tool, wait_until
from tests.integration.test_tftp_http_real import (
    OP_ACK,
    OP_DATA,
    OP_ERROR,
    OP_OACK,
    Client,
    Env,
    _env,
    expect_error,
    fetch,
    head,
    rrq,
    running_env,
)

MASTER = "127.0.0.50"  # an inventory node (tests.helpers.loopback_inventory)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from running_env(tmp_path)


def counters(env: Env) -> dict[str, Any]:
    status, body = get_json(f"{env.admin}/api/v1/status")
    assert status == 200, body
    tftp: dict[str, Any] = body["services"]["tftp"]
    return tftp


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def spoof(src_port: int, dst: tuple[str, int], payload: bytes) -> None:
    """One UDP datagram from 127.0.0.1:`src_port` (any port, even one bound by someone
    else): a raw socket writes the UDP header itself, the kernel the IP header."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
        header = struct.pack("!HHHH", src_port, dst[1], 8 + len(payload), 0)  # no checksum
        raw.sendto(header + payload, (dst[0], 0))


STRAYS = [
    struct.pack("!HH", OP_ERROR, 0) + b"x\0",
    struct.pack("!HH", OP_ACK, 1),
    struct.pack("!HH", OP_DATA, 1) + b"data",
    struct.pack("!H", OP_OACK) + b"blksize\x001024\0",
    struct.pack("!HH", 9, 9),  # no such opcode
]


# --- item 1: packet loops --------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("stray", STRAYS, ids=["error", "ack", "data", "oack", "opcode9"])
def test_spoofed_packet_from_the_listener_itself_is_not_answered(env: Env, stray: bytes) -> None:
    assert env.daemon is not None
    pid = env.daemon.proc.pid
    before, cpu0 = counters(env)["counters"], cpu_seconds(pid)
    spoof(env.tftp[1], env.tftp, stray)
    time.sleep(1.0)
    after, cpu1 = counters(env)["counters"], cpu_seconds(pid)
    # One datagram in, and nothing sent back to ourselves (which would come in again).
    assert after.get("requests", 0) - before.get("requests", 0) == 1, after
    assert after.get("dropped", 0) - before.get("dropped", 0) == 1, after
    assert cpu1 - cpu0 < 0.3, f"{cpu1 - cpu0:.2f} s of CPU for one packet"
    data, _ = fetch(env.tftp, "small.bin")  # still serving
    assert data == env.files["small.bin"]


@pytest.mark.root
def test_spoofed_request_from_the_listener_itself_is_not_served(env: Env) -> None:
    before = counters(env)["counters"]
    spoof(env.tftp[1], env.tftp, rrq(b"small.bin"))
    spoof(env.tftp[1], env.tftp, rrq(b"no-such-file"))
    time.sleep(0.5)
    after = counters(env)
    assert after["counters"].get("dropped", 0) - before.get("dropped", 0) == 2
    assert after["counters"].get("transfers", 0) == before.get("transfers", 0)


@pytest.mark.root
def test_two_appliances_do_not_bounce_a_stray_packet(tmp_path: Path) -> None:
    """A spoofed ERROR from appliance A's listener to appliance B's: B must not answer
    A (which would answer B, ...)."""
    a, b = _env(tmp_path / "a"), _env(tmp_path / "b")
    try:
        for e in (a, b):
            e.start()
        assert a.daemon is not None and b.daemon is not None
        before = [counters(e)["counters"].get("requests", 0) for e in (a, b)]
        for stray in STRAYS:
            spoof(a.tftp[1], b.tftp, stray)
        time.sleep(1.0)
        after = [counters(e)["counters"].get("requests", 0) for e in (a, b)]
        assert after[1] - before[1] == len(STRAYS)  # B saw them ...
        assert after[0] - before[0] == 0  # ... and sent A nothing
    finally:
        for e in (a, b):
            if e.daemon is not None:
                e.daemon.stop()


@pytest.mark.root
def test_requests_from_port_0_or_privileged_ports_are_dropped(env: Env) -> None:
    """A request "from" 127.0.0.1:53 would make us send DATA (or an ERROR) at a DNS
    server: reflection. Real TFTP clients use ephemeral ports."""
    before = counters(env)["counters"]
    for port in (0, 53, 69, 1023):
        spoof(port, env.tftp, rrq(b"small.bin"))
    time.sleep(0.5)
    after = counters(env)["counters"]
    assert after.get("dropped", 0) - before.get("dropped", 0) == 4
    assert after.get("transfers", 0) == before.get("transfers", 0)


@pytest.mark.root
def test_requests_from_our_own_dns_are_dropped(tmp_path: Path) -> None:
    """A request "from" our own DNS listener (UDP, unprivileged here) would have us talk
    to ourselves (and DNS answer back): dropped."""
    env = _env(tmp_path)
    dns_port = free_port(socket.SOCK_DGRAM)
    raw = yaml.safe_load(env.config.read_text())
    raw["listen"]["dns"] = f"127.0.0.1:{dns_port}"
    env.config.write_text(yaml.safe_dump(raw, sort_keys=False))
    env.start()
    try:
        spoof(dns_port, env.tftp, rrq(b"small.bin"))
        time.sleep(0.5)
        status = counters(env)
        assert status["counters"].get("dropped") == 1 and "transfers" not in status["counters"]
    finally:
        assert env.daemon is not None
        env.daemon.stop()


def test_stray_packets_on_the_listener_get_no_reply(env: Env) -> None:
    with Client(env.tftp) as c:
        for stray in STRAYS:
            c.send_request(stray)
        assert c.quiet_for(0.5) is None
    with urllib.request.urlopen(f"{env.admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    line = f'appliance_tftp_dropped_total{{reason="dropped"}} {float(len(STRAYS))}'
    assert line in text.splitlines()


def test_error_replies_are_rate_limited_per_source(env: Env) -> None:
    """A flood of requests for missing files from one address: a few ERRORs, then silence
    (counted); another address is still answered."""
    before = counters(env)["counters"]
    got = 0
    with Client(env.tftp) as c:
        for _ in range(500):
            c.send_request(rrq(b"no-such-file"))
        while c.quiet_for(0.3) is not None:
            got += 1
    assert 50 <= got <= 100, got  # a loader's probing fits in the burst (50)
    after = counters(env)["counters"]
    assert after.get("rate_limited", 0) - before.get("rate_limited", 0) >= 500 - got
    with Client(env.tftp, src="127.0.0.9") as c:
        c.send_request(rrq(b"no-such-file"))
        assert expect_error(c.recv()) == 1


# --- transfer sockets: wrong TIDs, ERROR from the peer ----------------------------------------


def test_wrong_tid_gets_nothing_and_the_transfer_goes_on(env: Env) -> None:
    with Client(env.tftp) as c, Client(env.tftp) as stranger:
        c.send_request(rrq(b"small.bin"))
        assert head(c.recv()) == (OP_DATA, 1)
        assert c.peer is not None
        for stray in [*STRAYS, struct.pack("!HH", OP_ACK, 1)]:
            stranger.sock.sendto(stray, c.peer)
        assert stranger.quiet_for(0.3) is None
        out = bytearray()
        c.ack(1)
        block = 2
        while True:
            op, num = head(packet := c.recv())
            assert (op, num) == (OP_DATA, block & 0xFFFF)
            out += packet[4:]
            c.ack(num)
            if len(packet) < 516:
                break
            block += 1
        assert bytes(out) == env.files["small.bin"][512:]


@pytest.mark.parametrize("blksize", [None, "1024"])
def test_error_from_the_peer_ends_the_transfer_without_a_reply(
    env: Env, blksize: str | None
) -> None:
    """Mid lock-step (the C loop takes these ACKs where it is built): an ERROR ends it."""
    opts = {"blksize": blksize} if blksize else {}
    with Client(env.tftp) as c:
        c.send_request(rrq(b"undionly.kpxe", **opts))
        if head(c.recv())[0] == OP_OACK:
            c.ack(0)
            c.recv()
        for block in range(1, 20):
            c.ack(block)
            assert head(c.recv()) == (OP_DATA, block + 1)
        c.abort()
        assert c.quiet_for(1.5) is None  # no reply to the ERROR, and no resend either
    wait_until(lambda: counters(env)["transfers"] == 0, 5, "the transfer ended")


# --- items 16 and 4: reflection, slot exhaustion ----------------------------------------------


def test_a_request_never_acknowledged_earns_three_packets_at_most(env: Env) -> None:
    """A spoofed request (here: clients that never answer, with and without options, one
    asking a 200 s timeout) gets the first packet and at most 2 resends, and its slot
    is free again after 5 s (it was 6 packets over 23 s)."""
    option_sets: list[dict[str, str]] = [{}, {"blksize": "1468", "tsize": "0", "timeout": "200"}]
    clients = [Client(env.tftp) for _ in option_sets]
    try:
        t0 = time.monotonic()
        for c, options in zip(clients, option_sets, strict=True):
            c.send_request(rrq(b"undionly.kpxe", **options))
        got: dict[int, list[bytes]] = {i: [] for i in range(len(clients))}
        while (left := 5.8 - (time.monotonic() - t0)) > 0:
            ready, _, _ = select.select([c.sock for c in clients], [], [], left)
            for i, c in enumerate(clients):
                if c.sock in ready:
                    got[i].append(c.recv())
        for packets in got.values():
            assert 1 <= len(packets) <= 3, len(packets)
            assert len(set(packets)) == 1  # the same first packet again
        wait_until(lambda: counters(env)["transfers"] == 0, 1.0, "the slots freed")
    finally:
        for c in clients:
            c.sock.close()


def test_duplicate_requests_from_one_tid_start_one_transfer(env: Env) -> None:
    before = counters(env)["counters"]
    with Client(env.tftp) as c:
        for _ in range(50):
            c.send_request(rrq(b"small.bin"))
        time.sleep(0.3)
        after = counters(env)
        assert after["counters"]["transfers"] - before.get("transfers", 0) == 1
        assert after["transfers"] == 1


def test_tftp_hpa_gets_twice_from_one_port(env: Env, tmp_path: Path) -> None:
    """tftp-hpa keeps its port for the next `get`: a new request from a TID whose
    transfer has been answered is a new transfer, not a duplicate to ignore."""
    host, port = env.tftp
    script = "".join(f"get small.bin {tmp_path / f'got{i}'}\n" for i in range(3))
    t0 = time.monotonic()
    res = subprocess.run(
        [need_tool("tftp"), host, str(port)],
        input=script.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"Error" not in res.stdout + res.stderr, res
    for i in range(3):
        assert (tmp_path / f"got{i}").read_bytes() == env.files["small.bin"]
    assert time.monotonic() - t0 < 3.0  # no request waited out a client timeout


def test_one_address_cannot_take_every_slot(env: Env) -> None:
    """Many never-acknowledged requests from one address (each from its own port): a cap
    per address; another client, and an inventory node, are served meanwhile."""
    clients = [Client(env.tftp) for _ in range(100)]
    try:
        for c in clients:
            c.send_request(rrq(b"undionly.kpxe"))
        status = wait_until(
            lambda: (s := counters(env))["counters"].get("requests", 0) >= 100 and s,
            5,
            "every request handled",
        )
        assert status["transfers"] == 16 and status["counters"]["busy_per_client"] == 84
        firsts = [head(p) for c in clients if (p := c.quiet_for(0.01)) is not None]
        served = sum(1 for op, _ in firsts if op == OP_DATA)
        refused = sum(1 for op, _ in firsts if op == OP_ERROR)  # "busy": rate-limited
        assert served == 16 and 1 <= refused <= 60, (served, refused)
        assert fetch(env.tftp, "small.bin", src="127.0.0.9")[0] == env.files["small.bin"]
        assert fetch(env.tftp, "small.bin", src=MASTER)[0] == env.files["small.bin"]
    finally:
        for c in clients:
            c.sock.close()


def test_unknown_clients_leave_slots_for_the_inventory_nodes(env: Env) -> None:
    """Never-acknowledged requests from 40 addresses outside the inventory, 16 each (640):
    they get most slots, not all; a node still gets its boot loader at once."""
    clients = [Client(env.tftp, src=f"127.0.1.{i}") for i in range(1, 41) for _ in range(16)]
    try:
        t0 = time.monotonic()
        for c in clients:
            c.send_request(rrq(b"undionly.kpxe"))
        status = wait_until(
            lambda: (s := counters(env))["counters"].get("requests", 0) >= len(clients) and s,
            10,
            "every request handled",
        )
        assert status["transfers"] == 512 - 128  # the inventory's share is left
        assert status["counters"]["busy"] == len(clients) - (512 - 128)
        assert status["counters"]["busy_reserved"] == status["counters"]["busy"]
        data, _ = fetch(env.tftp, "undionly.kpxe", src=MASTER, blksize="1468")
        assert data == env.files["undionly.kpxe"]
        # More than half the slots taken: silent peers get one resend and 3 s, not 5 (until
        # no longer more than half are taken).
        wait_until(lambda: counters(env)["transfers"] < 384, 10, "silent transfers given up")
        took = time.monotonic() - t0
        assert took < 4.5, f"{took:.1f} s"
        status = wait_until(lambda: (s := counters(env))["transfers"] == 0 and s, 10, "all ended")
        assert status["counters"]["silent"] == 384
        assert env.daemon is not None and "timed out" not in env.daemon.output()  # not logged
    finally:
        for c in clients:
            c.sock.close()


# --- item 17, 10: names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        b"A" * 512,
        b"d/" * 300 + b"x",
        b"small.bin/x",  # a file used as a directory: ENOTDIR
        b"\x1b[2J\x1b[31mred\r\nfake log line",
        b"../\x1b[2J\x1b[31mred\r\n2026-01-01 fake log line",  # refused: logged
    ],
    ids=["512-byte-name", "deep-path", "enotdir", "control-chars", "control-chars-logged"],
)
def test_odd_names_get_an_error_and_no_traceback(env: Env, name: bytes) -> None:
    assert env.daemon is not None
    with Client(env.tftp) as c:
        c.send_request(rrq(name))
        assert expect_error(c.recv()) in (0, 1, 2)
    assert fetch(env.tftp, "small.bin")[0] == env.files["small.bin"]
    out = env.daemon.output()
    assert "Traceback" not in out, out[-3000:]
    assert "\x1b" not in out  # the log escapes what the name carries (appliance/logs.py)
    assert not any(line.startswith("2026-01-01 fake") for line in out.splitlines())


def test_a_loop_of_symlinks_is_an_error(env: Env) -> None:
    (env.base / "tftp" / "loop1").symlink_to("loop2")
    (env.base / "tftp" / "loop2").symlink_to("loop1")
    with Client(env.tftp) as c:
        c.send_request(rrq(b"loop1"))
        assert expect_error(c.recv()) in (0, 1, 2)  # ELOOP: code 0 and its strerror
    assert env.daemon is not None and "Traceback" not in env.daemon.output()


# --- item 2: netascii ------------------------------------------------------------------------


NETASCII_TEXT = b"line one\nline two\r\nbare cr\rend\n" * 3000 + b"\r"  # ends on a CR


def _text_env(tmp_path: Path) -> Env:
    env = _env(tmp_path)
    (tmp_path / "tftp" / "text.txt").write_bytes(NETASCII_TEXT)
    big = (b"\n" * 1024) * (16 * 1024 - 1)  # just under 16 MiB, doubled by netascii
    (tmp_path / "tftp" / "big.txt").write_bytes(big)
    return env


def _raw_packets(server: tuple[str, int], name: bytes, **options: str) -> list[bytes]:
    """Every packet of a netascii read, ACKed as it comes: the bytes on the wire."""
    out = []
    with Client(server) as c:
        c.send_request(rrq(name, b"netascii", **options))
        first = c.recv()
        out.append(first)
        if head(first)[0] == OP_ERROR:
            return out
        blksize = int(options.get("blksize", "512"))
        if head(first)[0] == OP_OACK:
            c.ack(0)
            first = c.recv()
            out.append(first)
        packet = first
        while True:
            c.ack(head(packet)[1])
            if len(packet) - 4 < blksize:
                return out
            packet = c.recv()
            out.append(packet)


@pytest.fixture
def tftpd_hpa(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """The real tftpd-hpa (`in.tftpd -L`) serving tmp_path/tftp on a loopback port."""
    binary = need_tool("in.tftpd")
    port = free_port(socket.SOCK_DGRAM)
    root = tmp_path / "tftp"
    root.mkdir(parents=True, exist_ok=True)
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    proc = subprocess.Popen(
        [binary, "-L", "-s", str(root), "-a", f"127.0.0.1:{port}", "-u", user],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        assert proc.poll() is None, "in.tftpd did not start"
        yield ("127.0.0.1", port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.tool("in.tftpd")
def test_netascii_bytes_on_the_wire_match_tftpd_hpa(
    tmp_path: Path, tftpd_hpa: tuple[str, int]
) -> None:
    env = _text_env(tmp_path)
    env.start()
    try:
        for options in ({}, {"blksize": "1024"}, {"blksize": "8"}):
            ours = _raw_packets(env.tftp, b"text.txt", **options)
            theirs = _raw_packets(tftpd_hpa, b"text.txt", **options)
            assert len(ours) == len(theirs) and ours == theirs, options
    finally:
        assert env.daemon is not None
        env.daemon.stop()


def test_netascii_with_real_clients(tmp_path: Path) -> None:
    """tftp-hpa in ascii mode turns CR LF / CR NUL back: the file as on disk; curl keeps
    the netascii bytes and, asking tsize, learns the converted size."""
    env = _text_env(tmp_path)
    env.start()
    try:
        host, port = env.tftp
        dest = tmp_path / "got.txt"
        res = subprocess.run(
            [need_tool("tftp"), host, str(port), "-m", "ascii", "-c", "get", "text.txt", str(dest)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0 and b"Error" not in res.stdout + res.stderr
        assert dest.read_bytes() == NETASCII_TEXT
        converted = NETASCII_TEXT.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
        res = subprocess.run(
            [need_tool("curl"), "-s", f"tftp://{host}:{port}/text.txt;mode=netascii"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0 and res.stdout == converted
        data, oack = fetch(env.tftp, b"text.txt", tsize="0", blksize="1468")  # octet
        assert data == NETASCII_TEXT and oack["tsize"] == str(len(NETASCII_TEXT))
        with Client(env.tftp) as c:
            c.send_request(rrq(b"text.txt", b"netascii", tsize="0"))
            assert head(first := c.recv())[0] == OP_OACK
            assert first == struct.pack("!H", OP_OACK) + f"tsize\0{len(converted)}\0".encode()
    finally:
        assert env.daemon is not None
        env.daemon.stop()


def test_netascii_of_large_files_stays_small_and_the_loop_responsive(tmp_path: Path) -> None:
    """40 netascii requests for a 16 MiB file of newlines (about 1 KB of packets), never
    acknowledged, from 40 addresses: the daemon's memory stays within tens of MB and a
    request meanwhile is answered at once (it was 145 MB -> 1.3 GB, DNS stalled)."""
    env = _text_env(tmp_path)
    env.start()
    assert env.daemon is not None
    pid = env.daemon.proc.pid
    clients = [Client(env.tftp, src=f"127.0.2.{i}") for i in range(1, 41)]
    try:
        before = rss_mb(pid)
        for c in clients:
            c.send_request(rrq(b"big.txt", b"netascii"))
        t0 = time.monotonic()
        with Client(env.tftp, src="127.0.0.9") as probe:
            probe.send_request(rrq(b"no-such-file"))
            assert expect_error(probe.recv()) == 1
        answered = time.monotonic() - t0
        peak = before
        for c in clients:
            c.sock.settimeout(20)
            assert head(c.recv()) == (OP_DATA, 1)
            peak = max(peak, rss_mb(pid))
        assert answered < 0.5, f"a request waited {answered:.2f} s behind netascii"
        assert peak - before < 100, f"RSS {before:.0f} -> {peak:.0f} MB"
    finally:
        for c in clients:
            c.sock.close()
        env.daemon.stop()
