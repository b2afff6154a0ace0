"""UDP ping-pong between two processes: what one lock-step round trip costs here.

    python bench/tftp/pingpong.py serve PORT        # echo 4 bytes back to each datagram
    python bench/tftp/pingpong.py ping PORT N [SIZE]

`ping` sends N datagrams of SIZE bytes (default 1472: a TFTP DATA packet with blksize
1468) to 127.0.0.1:PORT, one at a time, each after the 4-byte answer to the previous
one, as a TFTP server and a lock-step client do with DATA and ACK; it prints one JSON
line: microseconds per round trip and its own CPU. No file, no protocol: the floor
under any lock-step TFTP transfer between two processes on this machine, and how it
changes with where the scheduler puts them (the same vCPU or two).
"""

from __future__ import annotations

import json
import socket
import sys
import time


def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    buf = bytearray(65536)
    reply = b"\0\4\0\0"
    while True:
        _, addr = sock.recvfrom_into(buf)
        sock.sendto(reply, addr)


def ping(port: int, count: int, size: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sock.connect(("127.0.0.1", port))
    data = bytes(size)
    buf = bytearray(64)
    for _ in range(200):  # warm-up
        sock.send(data)
        sock.recv_into(buf)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(count):
        sock.send(data)
        sock.recv_into(buf)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"us_per_round_trip": 1e6 * wall / count, "client_cpu_s": cpu, "n": count}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        ping(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1472)
