"""A minimal TFTP read client for the benchmark: RRQ with blksize and windowsize.

    python bench/tftp/client.py HOST PORT FILE [--blksize 1468] [--windowsize 16]
                                 [--timeout 2] [--repeat 1] [--json]

Sends an RRQ for FILE (octet) with `blksize` and, if above 1, `windowsize` (RFC 7440)
and `tsize`. If the server's OACK accepts a windowsize, the client acknowledges the
last block of each window (and the last block of the file); if the OACK does not
mention windowsize (tftpd-hpa ignores the option), or there is no OACK at all, it falls
back to lock-step (RFC 1350: an ACK for every block) with the block size the server
accepted. A block out of order (one was lost) is answered with an ACK for the last
in-order block, which makes an RFC 7440 server resend from there; nothing is resent
on a timeout more than a few times. The data is counted and thrown away; the sum of
payload bytes must equal the tsize the server announced, or the file's size given
with --expect.

Prints one line per transfer: seconds, bytes, MB/s (10^6 bytes per second),
the window in use, ACKs sent, DATA packets received, out-of-order blocks. With --json,
one JSON object per line instead. Exit status 1 if a transfer failed.
Traffic: only to the host given (the benchmark passes 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

OP_RRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 3, 4, 5, 6


class TftpError(Exception):
    pass


def rrq(name: str, options: dict[str, str]) -> bytes:
    body = name.encode() + b"\0octet\0"
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
    return struct.pack("!H", OP_RRQ) + body


def parse_oack(data: bytes) -> dict[str, str]:
    parts = data[2:].split(b"\0")
    return {parts[i].decode().lower(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)}


def fetch(
    host: str,
    port: int,
    name: str,
    blksize: int = 1468,
    windowsize: int = 1,
    timeout: float = 2.0,
    rcvbuf: int = 4 << 20,
) -> dict[str, object]:
    """Read `name`; returns counts and times. Raises TftpError on failure."""
    options = {"blksize": str(blksize), "tsize": "0"}
    if windowsize > 1:
        options["windowsize"] = str(windowsize)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    buf = bytearray(65536 + 4)
    view = memoryview(buf)
    recv_into, unpack = sock.recvfrom_into, struct.unpack_from
    t0, c0 = time.perf_counter(), time.process_time()
    sock.sendto(rrq(name, options), (host, port))
    block_size, window, tsize = 512, 1, None
    expected = 1  # absolute number of the next block wanted
    received = acks = datas = out_of_order = retries = 0
    peer = None
    try:
        # First reply: OACK, DATA 1 (no options accepted) or ERROR; it names the TID.
        while True:
            try:
                n, peer = recv_into(buf)
            except TimeoutError:
                retries += 1
                if retries > 3:
                    raise TftpError("no reply to the RRQ") from None
                sock.sendto(rrq(name, options), (host, port))
                continue
            break
        sock.connect(peer)
        send = sock.send
        recv_into = sock.recv_into  # type: ignore[assignment]
        opcode = unpack("!H", buf)[0]
        if opcode == OP_ERROR:
            raise TftpError(f"server error: {bytes(view[4 : n - 1]).decode(errors='replace')}")
        pending: int | None = None
        if opcode == OP_OACK:
            accepted = parse_oack(bytes(view[:n]))
            block_size = int(accepted.get("blksize", 512))
            window = int(accepted.get("windowsize", 1))
            tsize = int(accepted["tsize"]) if "tsize" in accepted else None
            ack0 = struct.pack("!HH", OP_ACK, 0)
            send(ack0)
            acks += 1
            last_ack = ack0
        elif opcode == OP_DATA:
            pending = n  # DATA 1 already in buf: plain RFC 1350, 512-byte blocks
            last_ack = b""
        else:
            raise TftpError(f"unexpected opcode {opcode}")
        full = block_size + 4
        in_window = 0
        while True:
            if pending is not None:
                n, pending = pending, None
            else:
                try:
                    n = recv_into(buf)
                except TimeoutError:
                    retries += 1
                    if retries > 5:
                        raise TftpError(f"timed out waiting for block {expected}") from None
                    send(last_ack)  # ask again from the last block we have
                    acks += 1
                    in_window = 0
                    continue
            opcode, number = unpack("!HH", buf)
            if opcode == OP_ERROR:
                raise TftpError(f"server error {number}: {bytes(view[4 : n - 1]).decode()}")
            if opcode != OP_DATA:
                continue
            datas += 1
            if number != expected & 0xFFFF:
                # A gap (a block lost) or a duplicate: restart the window from the last
                # block we have (RFC 7440), unless it is an old duplicate.
                if ((number - expected) & 0xFFFF) < 0x8000:
                    out_of_order += 1
                    last_ack = struct.pack("!HH", OP_ACK, (expected - 1) & 0xFFFF)
                    send(last_ack)
                    acks += 1
                    in_window = 0
                continue
            retries = 0
            received += n - 4
            last = n < full
            in_window += 1
            if last or in_window >= window:
                last_ack = struct.pack("!HH", OP_ACK, number)
                send(last_ack)
                acks += 1
                in_window = 0
            expected += 1
            if last:
                break
    finally:
        sock.close()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if tsize is not None and received != tsize:
        raise TftpError(f"got {received} bytes, the server announced {tsize}")
    return {
        "seconds": seconds,
        "bytes": received,
        "mbps": received / seconds / 1e6,
        "client_cpu": cpu,
        "blksize": block_size,
        "window": window,
        "acks": acks,
        "datas": datas,
        "out_of_order": out_of_order,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("file")
    p.add_argument("--blksize", type=int, default=1468)
    p.add_argument("--windowsize", type=int, default=1)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--expect", type=int, help="the file's size in bytes (checked)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    status = 0
    for _ in range(args.repeat):
        try:
            r = fetch(args.host, args.port, args.file, args.blksize, args.windowsize, args.timeout)
            if args.expect is not None and r["bytes"] != args.expect:
                raise TftpError(f"got {r['bytes']} bytes, expected {args.expect}")
        except (TftpError, OSError) as exc:
            print(json.dumps({"error": str(exc)}) if args.json else f"error: {exc}", flush=True)
            status = 1
            continue
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(
                f"{r['seconds']:.3f} s {r['bytes']} bytes {r['mbps']:.1f} MB/s "
                f"cpu {r['client_cpu']:.3f} s "
                f"window {r['window']} acks {r['acks']} data {r['datas']} "
                f"out-of-order {r['out_of_order']}",
                flush=True,
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
