"""TFTP benchmark: the appliance's tftp service against tftpd-hpa, one 64 MiB file, one run.

Run through bench/tftp/run.sh (it installs tftpd-hpa, curl, strace and uvloop when
missing). Steps:
  1. a temp dir with one 64 MiB file of random bytes (written once per run), served
     by both: the appliance (an inventory with only listen.tftp and listen.admin on,
     127.0.0.1 and free ports; boot.tftp_root and boot.images_dir in the temp dir) and
     our own `in.tftpd --foreground --listen --address 127.0.0.1:PORT --secure DIR`
     (the system's tftpd-hpa service is never used or touched; in --listen mode
     in.tftpd forks one child per request, and those children are stopped by PID too);
  2. one untimed download from each with curl, compared with the file (sha256): both
     serve the same bytes, and the file is in the page cache for every timed run;
  3. timed downloads, alternating between the servers (who goes first alternates
     too), with two clients: curl (`--tftp-blksize 1468`: lock-step, curl has no
     windowsize) and bench/tftp/client.py (raw UDP: blksize 1468, lock-step; and
     windowsize 16, which tftpd-hpa ignores: its OACK has no windowsize and the client
     falls back to lock-step), in three placements:
       one vCPU   server and client pinned to the same vCPU (--cpu): every block is a
                  context switch there and back; wall time = the CPU both spend;
       two vCPUs  server on --cpu, client on the other one: every block is two
                  cross-vCPU wake-ups;
       free       no pinning: the scheduler's choice, which changes from run to run;
  4. per download: MB/s (10^6 bytes/s), the client's CPU, the server's CPU (read every
     2 ms from /proc/PID/task/*/schedstat: the appliance's threads, the transfer's own
     one included, and in.tftpd's forked children; both also estimated as the busy
     time of the server's vCPU less the client's CPU when they share it), and what
     the rest of the machine used meanwhile (flagged above 0.2 cores);
  5. pingpong.py on the same placements: two processes exchanging a 1472-byte datagram
     and a 4-byte answer, the floor under any lock-step transfer here;
  6. a table, optional JSON, and the "TFTP" section of docs/benchmarks.md (between
     <!-- tftp:begin --> and <!-- tftp:end -->; the rest of the file is left alone).
--profile adds where the appliance's time goes: floor.py in each of its shells (the
least a Python sender can do per block with a worker thread, with add_reader, with a
DatagramProtocol) on the one-vCPU placement, ReadTransfer timed in-process without
sockets (fast path, general path, windows), and syscalls per block of both servers
(`strace -f -c`, counts only: strace itself slows the transfer ten times). No
cProfile: it follows only the main thread, and the transfers run in their own.
Traffic goes to 127.0.0.1 only; every run is bounded (the script arms an alarm).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import (
    DOC,
    AppSource,
    Children,
    child_pids,
    children_cpu,
    cpu_times,
    set_affinity,
    thread_cpu,
    write_section,
)
from bench.common import wait_quiet as common_wait_quiet

Result = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- tftp:begin -->", "<!-- tftp:end -->"
APPLIANCE = (sys.executable, "-m", "appliance")
HOST = "127.0.0.1"
SIZE = 64 * 1024 * 1024
NAME = "bench-64MiB.bin"
BLKSIZE = 1468
WINDOW = 16
BLOCKS = SIZE // BLKSIZE + 1
RETRY_UNTIL = 120.0  # s into the run: after this, noisy downloads are not repeated
POLL = 0.002  # s between readings of in.tftpd's children's CPU
GOAL_RATIO = 1.0  # appliance MB/s / tftpd-hpa MB/s, curl lock-step, blksize 1468
X = "\u00d7"  # the multiplication sign, for ratios in the doc
BUSY = 0.2  # cores used by others above which a run is flagged as noisy
READY_TIMEOUT = 20.0
LABEL = {"appliance": "appliance", "hpa": "tftpd-hpa", "floor": "floor.py"}
LISTENERS = (
    "dns",
    "dhcp",
    "tftp",
    "http",
    "api",
    "machine_config",
    "ingress_http",
    "ingress_https",
    "admin",
)

# --- processes: started here, stopped here by PID ------------------------------------

WORK = Path(os.environ.get("BTF_WORK") or tempfile.mkdtemp(prefix="bench-tftp."))
PIDS = WORK / "pids"
CHILDREN = Children("bench/tftp", PIDS)
_start, _stop, _stop_children, _on_signal = (
    CHILDREN.start,
    CHILDREN.stop,
    CHILDREN.stop_all,
    CHILDREN.on_signal,
)
APP = AppSource()  # the code the appliance runs from; --rev REV: a `git archive` of REV


# --- measuring ------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds of every live thread of `pid` (ns resolution, from schedstat)."""
    return sum(thread_cpu(pid).values())


def wait_quiet(limit: float) -> float:
    return common_wait_quiet(limit, BUSY)


# --- set-up ---------------------------------------------------------------------------


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
        return int(port)
    raise SystemExit("bench/tftp: no free port on 127.0.0.1")


def write_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(SIZE // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    path.chmod(0o644)
    return digest.hexdigest()


def write_inventory(tmp: Path, root: Path, tftp_port: int) -> Path:
    raw: dict[str, Any] = {
        "cluster": {"name": "bench", "base_domain": "example.com", "ignition_dir": "ignition"},
        "network": {"address": HOST, "subnet": "127.0.0.0/24"},
        "load_balancer": {"address": "127.0.0.54"},
        "boot": {"tftp_root": str(root), "images_dir": str(root)},
        "nodes": [
            {"name": "master-0", "role": "master", "mac": "52:54:00:00:00:50", "ip": "127.0.0.50"}
        ],
        "listen": {key: None for key in LISTENERS},
        "state_dir": str(tmp / "state"),
    }
    raw["listen"]["tftp"] = f"{HOST}:{tftp_port}"
    raw["listen"]["admin"] = f"{HOST}:{free_port()}"
    path = tmp / "inventory.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def rrq_probe(port: int) -> bool:
    """True when something answers a read request for a missing file (an ERROR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(b"\0\1no-such-file\0octet\0", (HOST, port))
        with contextlib.suppress(TimeoutError, ConnectionRefusedError):
            return sock.recv(600)[:2] == b"\0\5"
    return False


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT:
        if proc.poll() is not None:
            raise SystemExit(f"bench/tftp: {proc.args[0]} exited:\n{log.read_text()}")
        if rrq_probe(port):
            return time.monotonic() - start
        time.sleep(0.1)
    raise SystemExit(f"bench/tftp: nothing answers on {HOST}:{port}:\n{log.read_text()}")


# --- one download ---------------------------------------------------------------------


def download(client: str, port: int, cpus: set[int] | None, server: int | None = None) -> Result:
    """One timed download of the file; client is curl, lockstep or window.

    With `server` (its PID), the server's CPU during the download is summed from
    readings every POLL s (the last reading of each): of its threads (the appliance
    serves each transfer from a thread that ends with it, taking its counters along)
    and of its children (in.tftpd forks one per transfer and ignores SIGCHLD, so a
    finished child's CPU never reaches the parent's counters).
    """
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    if client == "curl":
        argv = ["curl", "-sS", "--tftp-blksize", str(BLKSIZE), "-o", "/dev/null"]
        argv += ["-w", "%{time_total} %{size_download}", f"tftp://{HOST}:{port}/{NAME}"]
    else:
        argv = [sys.executable, str(HERE / "client.py"), HOST, str(port), NAME, "--json"]
        argv += ["--blksize", str(BLKSIZE), "--expect", str(SIZE)]
        argv += ["--windowsize", str(WINDOW if client == "window" else 1)]
    threads0 = thread_cpu(server) if server is not None else {}
    threads = dict(threads0)
    kids: dict[int, float] = {}

    def reading() -> None:
        if server is None:
            return
        threads.update(thread_cpu(server))
        for kid in child_pids(server):
            with contextlib.suppress(OSError, ValueError, IndexError):
                kids[kid] = int(Path(f"/proc/{kid}/schedstat").read_text().split()[0]) / 1e9

    c0 = children_cpu()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pin
    )
    deadline = time.monotonic() + 60
    while server is not None and proc.poll() is None and time.monotonic() < deadline:
        reading()
        time.sleep(POLL)
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise SystemExit(f"bench/tftp: {' '.join(argv)} took over 60 s") from None
    reading()  # one last reading
    rusage_cpu = children_cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"bench/tftp: {' '.join(argv)} failed: {stdout}{stderr}")
    if client == "curl":
        seconds, size = stdout.split()
        res: Result = {"seconds": float(seconds), "bytes": int(size), "client_cpu": rusage_cpu}
        res["window"] = 1
    else:
        out = json.loads(stdout.strip().splitlines()[-1])
        if "error" in out:
            raise SystemExit(f"bench/tftp: client.py: {out['error']}")
        res = {
            "seconds": out["seconds"],
            "bytes": out["bytes"],
            "client_cpu": out["client_cpu"],
            "window": out["window"],
            "acks": out["acks"],
        }
    if res["bytes"] != SIZE:
        raise SystemExit(f"bench/tftp: {client} got {res['bytes']} bytes, not {SIZE}")
    res["client_cpu_total"] = rusage_cpu  # with the client's start-up
    res["polled_cpu"] = (
        sum(threads.values()) - sum(threads0.values()) + sum(kids.values())
        if server is not None
        else None
    )
    res["mbps"] = SIZE / res["seconds"] / 1e6
    return res


def proc_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of a process, all its threads."""
    f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(f[11]), int(f[12])


def measured(
    client: str, server: str, port: int, pid: int, placement: str, cpu: int, other: int
) -> Result:
    """download() with the CPU everyone used around it."""
    client_cpus = {"one": {cpu}, "two": {other}, "free": set(range(os.cpu_count() or 1))}
    client_cpus = client_cpus[placement]
    before_stat, ticks0 = cpu_times(), proc_ticks(pid)
    t0 = time.monotonic()
    res = download(client, port, client_cpus, pid)
    wall = time.monotonic() - t0  # includes the client's start-up
    after_stat, ticks1 = cpu_times(), proc_ticks(pid)
    busy = {c: after_stat[c][0] - before_stat[c][0] for c in after_stat}
    steal = sum(after_stat[c][1] - before_stat[c][1] for c in after_stat)
    res["server"], res["placement"], res["client"] = server, placement, client
    # The server's CPU: every thread of the appliance (schedstat, ns, the transfer's own
    # thread included); for in.tftpd the listening parent and the child that did it.
    res["server_cpu"] = res["polled_cpu"]
    res["server_ticks"] = (ticks1[0] - ticks0[0], ticks1[1] - ticks0[1])
    if placement == "one":
        # Everything ran on `cpu`: its busy time less the client's (with its start-up)
        # is the server's, as a cross-check; the other vCPU is someone else (and this
        # script's light polling of in.tftpd's children).
        res["server_cpu_est"] = max(0.0, busy[cpu] - res["client_cpu_total"])
        res["others_cores"] = sum(v for c, v in busy.items() if c != cpu) / wall
    else:
        res["server_cpu_est"] = busy[cpu] if placement == "two" else None
        known = res["client_cpu_total"] + res["server_cpu"]
        res["others_cores"] = max(0.0, sum(busy.values()) - known) / wall
    res["steal_cores"] = steal / wall
    return res


def summarize(runs: list[Result]) -> Result:
    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    mbps = [r["mbps"] for r in runs]
    server = med("server_cpu")
    user, system = (sum(r["server_ticks"][i] for r in runs) for i in (0, 1))
    est = med("server_cpu_est")
    others = [r["others_cores"] for r in runs if r.get("others_cores") is not None]
    return {
        "n": len(runs),
        "mbps": statistics.median(mbps),
        "mbps_min": min(mbps),
        "mbps_max": max(mbps),
        "mbps_all": [round(x, 1) for x in mbps],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "us_per_block": 1e6 * statistics.median(r["seconds"] for r in runs) / BLOCKS,
        "server_us_per_block": None if server is None else 1e6 * server / BLOCKS,
        "server_est_us_per_block": None if est is None else 1e6 * est / BLOCKS,
        "client_us_per_block": 1e6 * (med("client_cpu") or 0.0) / BLOCKS,
        "server_user_share": user / (user + system) if user + system else None,
        "window": runs[0]["window"],
        "others_max": max(others) if others else None,
        "steal_max": max(r["steal_cores"] for r in runs),
    }


# --- pingpong -------------------------------------------------------------------------


def pingpong(placement: str, cpu: int, other: int, count: int, tmp: Path) -> Result:
    port = free_port()
    server_cpus = {cpu} if placement != "free" else set(range(os.cpu_count() or 1))
    client_cpus = {"one": {cpu}, "two": {other}, "free": None}[placement]
    log = tmp / f"pingpong-{placement}.log"
    srv = _start(
        "pingpong",
        [sys.executable, str(HERE / "pingpong.py"), "serve", str(port)],
        log,
        preexec_fn=lambda: os.sched_setaffinity(0, server_cpus),
    )
    try:
        time.sleep(0.3)
        pin = None if client_cpus is None else (lambda: os.sched_setaffinity(0, client_cpus))
        argv = [sys.executable, str(HERE / "pingpong.py"), "ping", str(port), str(count)]
        c0 = proc_cpu(srv.pid)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, preexec_fn=pin)
        server_cpu = proc_cpu(srv.pid) - c0
        out = json.loads(p.stdout)
    finally:
        _stop(srv)
    return {
        "placement": placement,
        "us_per_round_trip": out["us_per_round_trip"],
        "client_us": 1e6 * out["client_cpu_s"] / count,
        "server_us": 1e6 * server_cpu / (count + 200),
    }


# --- profile ---------------------------------------------------------------------------


def core_cost() -> Result:
    """ReadTransfer per block in-process, no sockets: the lock-step fast path (as the
    session calls it), the general path alone, and windowsize 16."""
    sys.path.insert(0, str(APP.path))
    from services.tftp.files import Source
    from services.tftp.transfer import ReadTransfer, negotiate

    path = WORK / "data" / NAME
    acks = [b"\0\4" + (n & 0xFFFF).to_bytes(2, "big") for n in range(BLOCKS + 1)]
    out: Result = {}
    for label, window in (("fast", 1), ("window1", 1), (f"window{WINDOW}", WINDOW)):
        best = float("inf")
        for _ in range(3):
            fd = os.open(path, os.O_RDONLY)
            try:
                src = Source(SIZE, fd=fd)
                opts = {"blksize": str(BLKSIZE), "tsize": "0"}
                if window > 1:
                    opts["windowsize"] = str(window)
                neg = negotiate(opts, SIZE)
                xfer = ReadTransfer(src.read, SIZE, neg, 0.0, src.readinto)
                xfer.start(0.0)
                mono, fast, general = time.monotonic, xfer.on_ack_fast, xfer.on_packet
                buf = bytearray(1024)
                t0 = time.perf_counter()
                general(acks[0], mono())
                block = window
                while not xfer.done:
                    ack = acks[min(block, BLOCKS)]
                    if label == "fast":
                        buf[:4] = ack
                        if fast(buf, 4, mono()) is None:
                            general(ack, mono())
                    else:
                        general(ack, mono())
                    block += window
                best = min(best, time.perf_counter() - t0)
            finally:
                os.close(fd)
        out[f"{label}_us_per_block"] = 1e6 * best / BLOCKS
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for i in range(BLOCKS - 1):
            b"\0\3" + (i & 0xFFFF).to_bytes(2, "big") + os.pread(fd, BLKSIZE, i * BLKSIZE)
        out["pread_pack_us_per_block"] = 1e6 * (time.perf_counter() - t0) / (BLOCKS - 1)
        view = memoryview(bytearray(32 * (BLKSIZE + 4)))
        slots = [view[i * (BLKSIZE + 4) + 4 : (i + 1) * (BLKSIZE + 4)] for i in range(32)]
        t0 = time.perf_counter()
        for i in range(0, BLOCKS - 32, 32):
            os.preadv(fd, slots, i * BLKSIZE)
        out["preadv32_us_per_block"] = 1e6 * (time.perf_counter() - t0) / (BLOCKS - 32)
    finally:
        os.close(fd)
    return out


def strace_counts(pid: int, port: int, cpu: int, tmp: Path, label: str) -> Result:
    """Syscalls per block of one lock-step download (client.py), from strace -f -c."""
    if shutil.which("strace") is None:
        return {}
    out = tmp / f"strace-{label}.txt"
    tracer = _start(
        f"strace-{label}", ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)], tmp / "x.log"
    )
    time.sleep(0.5)
    try:
        download("lockstep", port, {cpu})
    except SystemExit as exc:  # strace slows a transfer ten times: on a busy machine, more
        return {"error": str(exc)}
    finally:
        time.sleep(0.3)
        with contextlib.suppress(ProcessLookupError):
            os.kill(tracer.pid, signal.SIGINT)
        try:
            tracer.wait(10)
        finally:
            _stop(tracer)
    counts: Result = {}
    for line in out.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[-1].isidentifier() and f[-1] != "syscall" and f[3].isdigit():
            counts[f[-1]] = round(int(f[3]) / BLOCKS, 2)
    total = counts.pop("total", None)
    top = {k: v for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v >= 0.01}
    return {"in all": total, **top}


FLOOR_SHELLS = ("thread", "reader", "protocol")


def profile(
    tmp: Path, root: Path, servers: dict[str, tuple[int, int]], cpu: int, other: int
) -> Result:
    found: Result = {}
    for shell in FLOOR_SHELLS:
        port = free_port()
        floor = _start(
            f"floor-{shell}",
            [sys.executable, str(HERE / "floor.py"), str(port), str(root), "--shell", shell],
            tmp / f"floor-{shell}.log",
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )
        time.sleep(0.5)
        clients = ("lockstep", "window") if shell == "thread" else ("lockstep",)
        for client in clients:
            runs = [measured(client, "floor", port, floor.pid, "one", cpu, other) for _ in range(5)]
            found[f"floor_{shell}_{client}"] = summarize(runs)
        _stop(floor)
    with contextlib.suppress(Exception):  # services/ may change under this benchmark
        found["core"] = core_cost()
    print("  strace -c runs ...", flush=True)
    for server in ("appliance", "hpa"):
        found[f"syscalls_{server}"] = strace_counts(
            servers[server][1], servers[server][0], cpu, tmp, server
        )
    return found


# --- report ---------------------------------------------------------------------------


def machine() -> Result:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    hpa = subprocess.run(["dpkg-query", "-W", "tftpd-hpa"], capture_output=True, text=True)
    idle = "?"
    with contextlib.suppress(OSError):
        idle = Path("/sys/devices/system/cpu/cpuidle/current_driver").read_text().strip()
    poll = ""
    with contextlib.suppress(OSError):
        poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text().strip()
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    hypervisor = "KVM guest" if "hypervisor" in Path("/proc/cpuinfo").read_text() else "bare metal"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": model,
        "hypervisor": hypervisor,
        "cpuidle": idle + (f", guest_halt_poll_ns={poll}" if poll else ""),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loop": loop,
        "curl": curl.split("\n")[0].split(" (")[0],
        "tftpd_hpa": "tftpd-hpa " + (hpa.stdout.split()[-1] if hpa.stdout.strip() else "?"),
        "source": APP.describe(),
        "tftp_loop": APP.tftp_loop(),
    }


CLIENTS = {
    "curl": "curl, lock-step",
    "lockstep": "client.py, lock-step",
    "window": f"client.py, windowsize {WINDOW}",
}
PLACEMENTS = {
    "one": "one vCPU",
    "two": "two vCPUs",
    "free": "unpinned",
}


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(results: Result) -> list[str]:
    rows = [
        "| placement | client | appliance MB/s | tftpd-hpa MB/s | ratio | server CPU µs/block "
        "app / hpa | client CPU µs/block app / hpa | others' cores |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for key, pair in results["runs"].items():
        placement, client = key.split("/")
        a, h = pair["appliance"], pair["hpa"]
        ratio = a["mbps"] / h["mbps"]
        others = [x for x in (a["others_max"], h["others_max"]) if x is not None]
        noisy = max(others) if others else None
        flag = " (!)" if noisy is not None and noisy > BUSY else ""
        label = CLIENTS[client]
        if client == "window":
            label += f" (tftpd-hpa: window {h['window']})"
        rows.append(
            f"| {PLACEMENTS[placement]} | {label} | {a['mbps']:,.1f} "
            f"({a['mbps_min']:,.0f}-{a['mbps_max']:,.0f}) | {h['mbps']:,.1f} "
            f"({h['mbps_min']:,.0f}-{h['mbps_max']:,.0f}) | **{ratio:.2f}** | "
            f"{_f(a['server_us_per_block'], '{:.2f}')} / "
            f"{_f(h['server_us_per_block'], '{:.2f}')} | "
            f"{a['client_us_per_block']:.2f} / {h['client_us_per_block']:.2f} | "
            f"{_f(noisy, '{:.2f}')}{flag} |"
        )
    return rows


def verdict(results: Result) -> Result:
    main = results["runs"]["one/curl"]
    ratio = main["appliance"]["mbps"] / main["hpa"]["mbps"]
    win = results["runs"]["one/window"]
    win_two = results["runs"].get("two/window")
    return {
        "ratio": ratio,
        "met": ratio >= GOAL_RATIO,
        "window_ratio": win["appliance"]["mbps"] / win["hpa"]["mbps"],
        "window_ratio_two": (
            win_two["appliance"]["mbps"] / win_two["hpa"]["mbps"] if win_two else None
        ),
    }


def section(results: Result, command: str) -> str:
    m = results["machine"]
    v = results["verdict"]
    pp = {p["placement"]: p for p in results["pingpong"]}
    runs = results["runs"]
    reps = results["reps"]
    lines = [
        BEGIN,
        "## TFTP",
        "",
        f"One 64 MiB file of random bytes ({SIZE:,} bytes, {BLOCKS:,} blocks of {BLKSIZE}) "
        "from the appliance's `tftp` service and from tftpd-hpa (our own `in.tftpd "
        "--foreground --listen --address 127.0.0.1:PORT --secure DIR`, which forks one child "
        "per transfer; the system's tftpd-hpa service is not used), same directory, in one "
        "run: `bench/tftp/run.sh` (installs tftpd-hpa, curl and strace when missing; the "
        "work is in `bench/tftp/run.py`). Clients: curl `--tftp-blksize 1468 -o /dev/null` "
        "(lock-step: curl has no windowsize) and `bench/tftp/client.py` (raw UDP; RRQ with "
        f"blksize {BLKSIZE}, tsize, and windowsize {WINDOW} when asked: it ACKs the last "
        "block of each window, or every block when the OACK has no windowsize, as from "
        "tftpd-hpa, which ignores the option). Each cell is the median of "
        f"{reps['one']} downloads on one vCPU, {reps['two']} on two and {reps['free']} "
        "unpinned (range in brackets), the servers alternating and who goes first "
        "alternating; one untimed download from each first (sha256 checked against the "
        "file; the file is in the page cache for every timed run). MB = 10^6 bytes.",
        "",
        "Placements: **one vCPU**: server and client pinned to the same vCPU: every block "
        "is a context switch to the server and back, wall time is the CPU both spend, so "
        "the comparison measures the servers' own cost per block. **Two vCPUs**: server on "
        "one, client on the other: every block is two wake-ups across vCPUs. **Unpinned**: "
        "the scheduler's choice, which changes from one download to the next.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {m['cores']} vCPUs, {m['cpu']}, {m['hypervisor']} (cpuidle {m['cpuidle']}), "
        f"Linux {m['kernel']}, Python {m['python']} ({m['loop']})  ",
        f"Versions: {m['tftpd_hpa']}; {m['curl']}  ",
        f"Appliance: {m['source']}; lock-step loop in {m.get('tftp_loop', 'Python')}  ",
        f"Date: {m['date']}",
        "",
        *table(results),
        "",
        "MB/s: median (min-max). Server CPU per block, median: read every "
        f"{POLL * 1000:.0f} ms while the download runs, from /proc/PID/task/*/schedstat "
        "(ns): every thread of the appliance, the transfer's own worker thread included, "
        "and for tftpd-hpa the forked child that did the transfer (in.tftpd ignores "
        "SIGCHLD, so its children's CPU never reaches its own counters); a thread or child "
        "that ends takes its counters along, so the last few ms of each are missed. It "
        "includes the kernel's loopback work done in the server's context. "
        "Client CPU per block: client.py's own count during the transfer, curl's "
        "rusage (with its start-up). Others' cores: CPU used by anything else meanwhile "
        "(max over the downloads; (!) above 0.2; a download during which others used more "
        "is repeated once, when the machine is quiet again, and the quieter one kept).",
        "",
    ]
    goal = "met" if v["met"] else "missed"
    one = runs["one/curl"]
    lines += [
        f"- **Goal (curl, blksize 1468, appliance ≥ {GOAL_RATIO:.1f}{X} tftpd-hpa): {goal}**: "
        f"{v['ratio']:.2f}{X} on one vCPU ({one['appliance']['mbps']:,.0f} vs "
        f"{one['hpa']['mbps']:,.0f} MB/s); "
        + ", ".join(
            f"{runs[k]['appliance']['mbps'] / runs[k]['hpa']['mbps']:.2f}{X} "
            f"{PLACEMENTS[k.split('/')[0]]}"
            for k in ("two/curl", "free/curl")
            if k in runs
        )
        + ".",
        f"- **Windowsize {WINDOW}** (client.py): the appliance sends {WINDOW} blocks per ACK, "
        f"tftpd-hpa answers the same request in lock-step: {v['window_ratio']:.2f}{X} on one vCPU"
        + (
            f", {v['window_ratio_two']:.1f}{X} on two vCPUs"
            if v["window_ratio_two"] is not None
            else ""
        )
        + ".",
        *how_it_sends(m),
    ]
    if pp:
        parts = [
            f"{PLACEMENTS[k]} {p['us_per_round_trip']:.1f} µs per round trip" for k, p in pp.items()
        ]
        lines.append(
            "- **What makes curl fast or slow here is placement, not curl.** Two plain "
            "Python processes exchanging a 1472-byte datagram and a 4-byte answer "
            "(`bench/tftp/pingpong.py`, the floor under any lock-step transfer): "
            + "; ".join(parts)
            + f". A lock-step 64 MiB transfer is {BLOCKS:,} such round trips, so "
            f"{BLOCKS * pp.get('two', pp.get('one'))['us_per_round_trip'] / 1e6:.1f} s "
            "of waking alone when client and server sit on different vCPUs, against "
            f"{BLOCKS * pp['one']['us_per_round_trip'] / 1e6:.2f} s on one. This is a KVM "
            f"guest with cpuidle `{m['cpuidle']}`: an idle vCPU halts at once, and waking it "
            "goes through the host; each side then also spends "
            f"{pp.get('two', pp['one'])['client_us']:.0f}-"
            f"{pp.get('two', pp['one'])['server_us']:.0f} µs of CPU per round trip instead "
            f"of {pp['one']['client_us']:.0f}. curl does the same work per block either way "
            "(six system calls: two polls, recvfrom, sendto and three rt_sigaction); "
            "whether the scheduler puts it on the server's vCPU decides 0.3-0.5 s or 3-5 s "
            "for the file (the 0.57 s and 3.1 s seen earlier), per download, and load from "
            "other processes, which moves tasks between vCPUs, shifts the mix (the 54 MB/s "
            "measured earlier fits a mix of the two). Hence the pinned placements; the "
            "unpinned row shows what it gave this time.",
        )
    prof = results.get("profile")
    if prof:
        lines += ["", *profile_lines(prof, results)]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def how_it_sends(m: Result) -> list[str]:
    text = (
        "- **How the appliance sends** (services/tftp): each transfer runs in a worker "
        "thread of its own, blocked in `recv` on the transfer's connected socket (no event "
        "loop per block); the kernel's SO_RCVTIMEO is the retransmission timer, re-armed "
        "with `setsockopt` only when the wait changes (after a resend or a duplicate), "
        "never per block. `ReadTransfer` judges every packet; its fast path takes the "
        "in-order ACK in lock-step and sends the next block from a read-ahead buffer (32 "
        "packet slots, their headers in place, filled by one `preadv`). Per block: one "
        "`recv`, one `send`, 1/32 of a `preadv`. "
    )
    if m.get("tftp_loop", "Python").startswith("C"):
        text += (
            "That fast path runs in C (services/tftp/_lockstep.c, without the GIL): it "
            "takes exactly the ACKs `ReadTransfer.on_ack_fast` would take and hands "
            "everything else back (the OACK, duplicates, windows, the short last block, "
            "timeouts, errors) with the state reached, which `ReadTransfer.lockstep_taken` "
            "records; a test runs both over the same ACK sequences and requires the same "
            "packets and state. Where no compiler was at install, `on_ack_fast` does it "
            "in Python (`APPLIANCE_TFTP_NATIVE=0` forces that)."
        )
    else:
        text += (
            "This run's fast path is the Python one (`on_ack_fast`, a call per ACK): "
            f"{m.get('tftp_loop', 'Python')}."
        )
    return [text]


SHELL_TEXT = {
    "thread": "a worker thread per transfer blocked in `recv` on its connected socket, "
    "`recv_into`, one `os.preadv` per 32 blocks into packet slots, `send` (the shape of "
    "the appliance's tftp now)",
    "reader": "`loop.add_reader` on the connected socket, `recv_into` a preallocated "
    "buffer, `os.preadv` behind the DATA header already in place, `send`",
    "protocol": "an asyncio `DatagramProtocol` per transfer, `os.pread` and "
    "`transport.sendto` per block (the appliance's tftp before)",
}


def profile_lines(prof: Result, results: Result) -> list[str]:
    one = results["runs"]["one/lockstep"]
    out = ["Where the time goes (`--profile`, lock-step, one vCPU, client.py):", ""]
    a, h = one["appliance"], one["hpa"]
    share = a.get("server_user_share")
    out.append(
        f"- Per block the appliance spends {_f(a['server_us_per_block'], '{:.2f}')} µs of CPU"
        + (f" ({share:.0%} of it in user space)" if share else "")
        + f", tftpd-hpa {_f(h['server_us_per_block'], '{:.2f}')} µs (cross-check from the "
        f"vCPU's busy time less the client's: {_f(a['server_est_us_per_block'], '{:.2f}')} and "
        f"{_f(h['server_est_us_per_block'], '{:.2f}')} µs)."
    )
    floors = {
        sh: prof[f"floor_{sh}_lockstep"] for sh in FLOOR_SHELLS if f"floor_{sh}_lockstep" in prof
    }
    if floors:
        out.append(
            "- `bench/tftp/floor.py`, the least a Python sender costs in each shell (uvloop; "
            "per ACK the next block; no timers, checks, events or counters), 5 downloads each:"
        )
        for sh, fl in floors.items():
            out.append(
                f"  - `--shell {sh}`: {_f(fl['server_us_per_block'], '{:.2f}')} µs of CPU per "
                f"block, {fl['mbps']:,.0f} MB/s ({fl['mbps'] / h['mbps']:.2f}{X} tftpd-hpa): "
                f"{SHELL_TEXT[sh]}."
            )
        if "floor_thread_window" in prof:
            out.append(
                f"  - `--shell thread` with windowsize {WINDOW}: "
                f"{prof['floor_thread_window']['mbps']:,.0f} MB/s."
            )
    core = prof.get("core")
    if core:
        out.append(
            "- `ReadTransfer` in-process without sockets, reads included: "
            f"{core['fast_us_per_block']:.2f} µs per block lock-step as the session calls it "
            f"(`on_ack_fast`, `on_packet` only for what it declines), "
            f"{core['window1_us_per_block']:.2f} µs with `on_packet` for every ACK, "
            f"{core[f'window{WINDOW}_us_per_block']:.2f} µs with windowsize {WINDOW}; of "
            f"which the read: `os.preadv` of 32 blocks {core['preadv32_us_per_block']:.2f} µs "
            f"per block (`os.pread` and a new header per block: "
            f"{core['pread_pack_us_per_block']:.2f} µs)."
        )
    for server in ("appliance", "hpa"):
        sc = prof.get(f"syscalls_{server}")
        if sc and "error" not in sc:
            out.append(
                f"- System calls per block, {LABEL[server]} (`strace -f -c`, one download): "
                + ", ".join(f"{k} {v}" for k, v in sc.items())
                + "."
            )
    thread = floors.get("thread")
    if thread and core and a["server_us_per_block"] and h["server_us_per_block"]:
        app_us, hpa_us = a["server_us_per_block"], h["server_us_per_block"]
        out += [
            "",
            f"Reading it: per block the appliance costs {app_us:.1f} µs of CPU to tftpd-hpa's "
            f"{hpa_us:.1f}, {app_us - thread['server_us_per_block']:+.1f} µs from the bare "
            "Python thread floor"
            + (
                " (the appliance's lock-step loop is C, the floor's is Python; what the "
                "appliance adds is a clock read per block and the retransmission timer "
                "the floor does without). "
                if results["machine"].get("tftp_loop", "").startswith("C")
                else ": what it adds is `on_ack_fast` (a call and its bookkeeping), a "
                "clock read per block and the retransmission timer the floor does without "
                "(SO_RCVTIMEO arms a kernel timer whenever the thread sleeps in `recv`). "
            )
            + "Of the "
            "shells, a thread blocked in `recv` costs least: the ACK wakes it directly, the "
            "kernel's SO_RCVTIMEO is the retransmission timer, and no event loop runs per "
            "block (no epoll wake-up, callback, bytes object or address tuple per datagram); "
            "`add_reader` with preallocated buffers saves part of the DatagramProtocol's "
            "cost, not all. In lock-step on one vCPU the rate is the server's and the "
            "client's CPU per block together, so the clients' own costs weigh as much as the "
            f"servers'. With windowsize {WINDOW} the appliance needs "
            f"{_f(results['runs']['one/window']['appliance']['server_us_per_block'], '{:.1f}')} "
            "µs per block; across vCPUs (or over a real network) the round trip, not the "
            "server, sets the lock-step rate.",
        ]
    return out


def write_doc(section: str) -> None:
    write_section(section, BEGIN, END)


def print_results(results: Result) -> None:
    print()
    for line in table(results):
        print(line)
    v = results["verdict"]
    print(
        f"\ngoal (curl lock-step on one vCPU, appliance >= {GOAL_RATIO}x tftpd-hpa): "
        f"{v['ratio']:.2f}x: {'met' if v['met'] else 'MISSED'}"
    )
    print(f"windowsize {WINDOW}: {v['window_ratio']:.2f}x on one vCPU", end="")
    if v["window_ratio_two"] is not None:
        print(f", {v['window_ratio_two']:.2f}x on two vCPUs")
    else:
        print()
    for p in results["pingpong"]:
        print(
            f"pingpong {PLACEMENTS[p['placement']]}: {p['us_per_round_trip']:.1f} us/round trip "
            f"(client {p['client_us']:.1f} us CPU, server {p['server_us']:.1f} us CPU)"
        )
    if results.get("profile"):
        print()
        for line in profile_lines(results["profile"], results):
            print(line)


# --- main -----------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--reps", type=int, default=5, help="downloads per server and client, one vCPU (5)"
    )
    p.add_argument("--reps-other", type=int, default=3, help="the same, two vCPUs and unpinned (3)")
    p.add_argument(
        "--cpu", type=int, default=0, help="the servers' vCPU (0); clients: it or the other"
    )
    p.add_argument("--pingpong", type=int, default=20000, help="round trips per pingpong run")
    p.add_argument("--wait-quiet", type=float, default=30.0, metavar="S")
    p.add_argument("--profile", action="store_true", help="add floors, core, strace")
    p.add_argument("--rev", help="run the appliance from a `git archive` of this commit")
    p.add_argument("--json", type=Path)
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    ncpu = os.cpu_count() or 1
    if ncpu < 2 or not 0 <= args.cpu < ncpu:
        p.error("needs two vCPUs and --cpu among them")
    if not 1 <= args.reps <= 9 or not 1 <= args.reps_other <= 5:
        p.error("--reps 1-9, --reps-other 1-5 (a run must stay under 5 min, 7 with --profile)")
    for tool in ("curl", "in.tftpd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/tftp: {tool} not found (run bench/tftp/run.sh)")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _on_signal)
    signal.alarm(420 if args.profile else 285)  # the floors and strace add about two minutes
    try:
        return _run(args, ncpu)
    finally:
        _stop_children()
        if args.keep:
            print(f"kept {WORK}")
        elif not os.environ.get("BTF_WORK"):
            shutil.rmtree(WORK, ignore_errors=True)


def _run(args: argparse.Namespace, ncpu: int) -> int:
    t_start = time.monotonic()
    cpu = args.cpu
    other = next(c for c in range(ncpu) if c != cpu)
    # This script (which polls in.tftpd's children during downloads) stays off the
    # servers' vCPU; every process it starts is pinned explicitly.
    os.sched_setaffinity(0, {other})
    if args.rev:
        APP.use_rev(args.rev, WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    WORK.chmod(0o755)  # in.tftpd drops to nobody: the file must be reachable
    root = WORK / "data"
    root.mkdir(exist_ok=True)
    root.chmod(0o755)
    print(f"writing {SIZE >> 20} MiB of random bytes ...", flush=True)
    digest = write_file(root / NAME)

    app_port, hpa_port = free_port(), free_port()
    while hpa_port == app_port:
        hpa_port = free_port()
    inventory = write_inventory(WORK, root, app_port)
    app_log, hpa_log = WORK / "appliance.log", WORK / "in.tftpd.log"
    app = _start(
        "appliance",
        [*APPLIANCE, "--log-level", "warning", "run", "--config", str(inventory)],
        app_log,
        cwd=APP.path,
        env=APP.env(),
    )
    tftpd = shutil.which("in.tftpd") or "in.tftpd"
    hpa = _start(
        "in.tftpd",
        [
            tftpd,
            "--foreground",
            "--listen",
            "--address",
            f"{HOST}:{hpa_port}",
            "--secure",
            str(root),
        ],
        hpa_log,
    )
    t_app, t_hpa = wait_ready(app_port, app, app_log), wait_ready(hpa_port, hpa, hpa_log)
    print(f"appliance pid {app.pid} on {HOST}:{app_port} (ready in {t_app:.1f} s)")
    print(f"in.tftpd  pid {hpa.pid} on {HOST}:{hpa_port} (ready in {t_hpa:.1f} s)")
    servers = {"appliance": (app_port, app.pid), "hpa": (hpa_port, hpa.pid)}

    # Same bytes from both (and the file in the page cache before any timed run).
    for name, (port, _) in servers.items():
        out = WORK / f"check-{name}.bin"
        subprocess.run(
            [
                "curl",
                "-sS",
                "--tftp-blksize",
                str(BLKSIZE),
                "-o",
                str(out),
                f"tftp://{HOST}:{port}/{NAME}",
            ],
            check=True,
            timeout=60,
        )
        got = hashlib.sha256(out.read_bytes()).hexdigest()
        out.unlink()
        if got != digest:
            raise SystemExit(f"bench/tftp: {LABEL[name]} sent different bytes")
    print("both servers send the file intact (sha256)")

    results: Result = {"machine": machine(), "runs": {}, "pingpong": []}
    results["reps"] = {"one": args.reps, "two": args.reps_other, "free": args.reps_other}
    quiet = wait_quiet(args.wait_quiet)
    results["machine"]["busy_before"] = round(quiet, 2)
    plan = [
        ("one", "curl", args.reps),
        ("one", "lockstep", args.reps),
        ("one", "window", args.reps),
        ("two", "curl", args.reps_other),
        ("two", "window", args.reps_other),
        ("free", "curl", args.reps_other),
    ]
    for placement, client, reps in plan:
        cpus = {cpu} if placement != "free" else set(range(ncpu))
        for _, pid in servers.values():
            set_affinity(pid, cpus)
        print(f"{PLACEMENTS[placement]}, {CLIENTS[client]}: {reps} x each ...", flush=True)
        runs: dict[str, list[Result]] = {"appliance": [], "hpa": []}
        for i in range(reps):
            order = ["appliance", "hpa"] if i % 2 == 0 else ["hpa", "appliance"]
            for server in order:
                port, pid = servers[server]
                res = measured(client, server, port, pid, placement, cpu, other)
                if res["others_cores"] > BUSY and time.monotonic() - t_start < RETRY_UNTIL:
                    # Someone else was busy: once more after the machine quietens.
                    wait_quiet(10)
                    again = measured(client, server, port, pid, placement, cpu, other)
                    again["retried"] = True
                    res = min(res, again, key=lambda r: r["others_cores"])
                runs[server].append(res)
        results["runs"][f"{placement}/{client}"] = {s: summarize(r) for s, r in runs.items()}
        a, h = (results["runs"][f"{placement}/{client}"][s]["mbps"] for s in ("appliance", "hpa"))
        print(f"  appliance {a:,.1f} MB/s, tftpd-hpa {h:,.1f} MB/s: {a / h:.2f}x", flush=True)
    for placement in ("one", "two"):
        results["pingpong"].append(pingpong(placement, cpu, other, args.pingpong, WORK))
    for _, pid in servers.values():
        set_affinity(pid, set(range(ncpu)))
    for proc, log in ((app, app_log), (hpa, hpa_log)):
        if proc.poll() is not None:
            raise SystemExit(f"bench/tftp: {proc.args[0]} died during the run:\n{log.read_text()}")
    results["verdict"] = verdict(results)
    if args.profile:
        print("profile ...", flush=True)
        for _, pid in servers.values():
            set_affinity(pid, {cpu})
        results["profile"] = profile(WORK, root, servers, cpu, other)
    results["seconds"] = round(time.monotonic() - t_start, 1)
    print_results(results)
    print(f"\nwhole run: {results['seconds']:.0f} s")
    command = "bench/tftp/run.sh" + "".join(f" {a}" for a in sys.argv[1:])
    if not args.no_doc:
        write_doc(section(results, command))
        print(f"written: {DOC.relative_to(ROOT)} (TFTP section)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
