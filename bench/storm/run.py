"""Boot-storm benchmark: the appliance against dnsmasq (DHCP + TFTP) + nginx (HTTP).

Run through bench/storm/run.sh (root: network namespaces; it installs dnsmasq-base,
nginx-light and busybox-static when missing). The storm is the one the e2e test
runs (tests/e2e/storm.py): N machines, each a network namespace on one bridge with
real clients (busybox udhcpc announcing a BIOS or UEFI x64 PXE client, busybox
tftp for the loader the DHCP answer names, busybox wget for a kernel and an
initramfs of random bytes), all started on one signal. Servers, in the bridge's
namespace on 192.0.2.1, one at a time, each from an empty lease store:

  appliance        `appliance run` with the storm's inventory (DHCP, TFTP, HTTP on)
  dnsmasq+nginx    dnsmasq with the config `appliance render --as dnsmasq` prints for
                   the same inventory (DNS off: port=0; no log-dhcp; tftp-max raised
                   from 50 to the machine count, as a storm needs), and nginx serving
                   the same images directory (one worker like the one-process
                   appliance, sendfile and tcp_nopush on, no access log)

The two alternate (who goes first alternates too), `--reps` times each. Measured:
the storm's time (signal to the last initramfs byte), when the last lease, loader
and kernel came, the servers' and clients' CPU, and everything else's CPU on the
machine meanwhile (other work shares these 2 cores). Results go to
docs/benchmarks.md between `<!-- storm:begin -->` and `<!-- storm:end -->`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import children_cpu, machine_busy, stat_cpu, tree, write_section  # noqa: E402
from tests.e2e import storm as storm_mod  # noqa: E402
from tests.e2e.lab import SERVER, Appliance, Lab, dgxpod_inventory, install_loaders  # noqa: E402
from tests.helpers import write_inventory  # noqa: E402

BEGIN, END = "<!-- storm:begin -->", "<!-- storm:end -->"
HTTP_PORT = 8080
NGINX_CONF = """\
# bench/storm: a private nginx, nothing from /etc/nginx.
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen {host}:{port};
        location /images/ {{ alias {images}/; }}
    }}
}}
"""


@dataclass
class Run:
    server: str
    rep: int
    seconds: float
    phases: dict[str, float]
    ok: int
    failed: dict[str, str]
    duplicates: dict[str, int]
    server_cpu: float  # seconds
    client_cpu: float
    others_cores: float  # average cores used by anything else during the storm
    wall: float
    idle_busy: float = 0.0  # cores busy in the 2 s before the storm (servers idle): others' load


# --- CPU accounting --------------------------------------------------------------------


# --- servers ----------------------------------------------------------------------------


def inventory(work: Path, machines: list[storm_mod.StormMachine], kernel: str, initrd: str) -> Any:
    raw = dgxpod_inventory(work, kernel=kernel, initramfs=initrd)
    raw["network"].pop("gateway")
    raw["load_balancer"]["address"] = storm_mod.STORM_VIP
    raw["nodes"] = storm_mod.inventory_nodes(machines)
    for key in ("dns", "api", "machine_config"):
        raw["listen"][key] = None
    return raw


def start_appliance(lab: Lab, work: Path, raw: Any) -> list[int]:
    app = Appliance(lab, raw, work)
    app.wait_serving(60)
    return [app.proc.pid]


def dnsmasq_conf(raw: Any, work: Path, count: int) -> str:
    config = write_inventory(work / "storm.yaml", raw)
    rendered = subprocess.run(
        [sys.executable, "-m", "appliance", "render", "--as", "dnsmasq", "--config", str(config)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    lines = []
    for line in rendered.splitlines():
        if line.strip() == "log-dhcp":
            continue  # the appliance logs no line per packet either
        if line.startswith("port="):
            line = "port=0"  # DNS off: the storm loads DHCP, TFTP and HTTP
        lines.append(line)
    lines += [
        "# bench/storm additions",
        "interface=br0",
        f"dhcp-leasefile={work}/dnsmasq.leases",
        f"tftp-max={max(count, 50)}",  # the default 50 refuses a storm's 51st transfer
    ]
    return "\n".join(lines) + "\n"


def start_dnsmasq_nginx(lab: Lab, work: Path, raw: Any, count: int) -> list[int]:
    conf = work / "dnsmasq.conf"
    conf.write_text(dnsmasq_conf(raw, work, count))
    dnsmasq = lab.start(
        ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", "--user=root",
         "--group=root", "--pid-file=", "--log-facility=-"],
        work / "dnsmasq.log",
    )  # fmt: skip
    nginx_dir = work / "nginx"
    nginx_dir.mkdir(exist_ok=True)
    nconf = nginx_dir / "nginx.conf"
    nconf.write_text(
        NGINX_CONF.format(
            work=nginx_dir, host=SERVER, port=HTTP_PORT, images=raw["boot"]["images_dir"]
        )
    )
    nginx = lab.start(["nginx", "-c", str(nconf), "-p", str(nginx_dir)], work / "nginx.log")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log = (work / "dnsmasq.log").read_text(errors="replace")
        if "TFTP root" in log and len(tree(nginx.pid)) > 1:
            break
        for proc, name in ((dnsmasq, "dnsmasq"), (nginx, "nginx")):
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited: {(work / f'{name}.log').read_text()}")
        time.sleep(0.1)
    return [dnsmasq.pid, nginx.pid]


# --- one storm --------------------------------------------------------------------------


def one_run(
    lab: Lab, storm: storm_mod.Storm, server: str, rep: int, args: argparse.Namespace,
    base: Path, kernel: str, initrd: str,
) -> Run:  # fmt: skip
    work = base / f"{server}-{rep}"
    work.mkdir(parents=True)
    raw = inventory(work, storm.machines, kernel, initrd)
    raw["boot"]["images_dir"] = str(base / "images")
    raw["boot"]["tftp_root"] = str(base / "tftp")
    before = len(lab.processes)
    if server == "appliance":
        pids = start_appliance(lab, work, raw)
    else:
        pids = start_dnsmasq_nginx(lab, work, raw, len(storm.machines))
    # The machine's load from others, measured while the storm's servers sit idle.
    busy_before = machine_busy()
    time.sleep(2.0)
    idle_busy = (machine_busy() - busy_before) / 2.0
    all_pids = [p for pid in pids for p in tree(pid)]
    cpu0 = sum(stat_cpu(p) for p in all_pids)
    kids0, busy0, wall0 = children_cpu(), machine_busy(), time.monotonic()
    result = storm.run(
        storm_mod.http_base(HTTP_PORT), f"images/{kernel}", f"images/{initrd}", args.limit
    )
    wall = time.monotonic() - wall0
    server_cpu = sum(stat_cpu(p) for p in all_pids) - cpu0
    client_cpu = children_cpu() - kids0
    others = max(0.0, machine_busy() - busy0 - server_cpu - client_cpu) / wall
    for proc in lab.processes[before:]:
        if proc.pid in pids:
            lab.stop_process(proc)
    run = Run(
        server, rep, result.seconds, result.phases, len(result.ok), result.failed,
        result.duplicates(), server_cpu, client_cpu, others, wall, idle_busy,
    )  # fmt: skip
    print(
        f"{server} #{rep}: {result.summary()}; server CPU {server_cpu:.1f} s, clients "
        f"{client_cpu:.1f} s, others {others:.2f} cores (before: {idle_busy:.2f})",
        flush=True,
    )
    return run


# --- report -----------------------------------------------------------------------------


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def machine_line() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} vCPUs, {cpu}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def commit() -> str:
    rev = first_line(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    return f"{rev}{' + uncommitted changes' if dirty else ''}"


def median_range(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return f"{fmt.format(statistics.median(values))} ({low}-{high})"


def report(runs: list[Run], args: argparse.Namespace, load: tuple[str, str], cmd: str) -> str:
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.server, []).append(r)
    label = {"appliance": "appliance", "dnsmasq": "dnsmasq + nginx"}
    rows = []
    for server in ("appliance", "dnsmasq"):
        rs = by.get(server, [])
        if not rs:
            continue
        rows.append(
            f"| {label[server]} | {sum(r.ok for r in rs)}/{len(rs) * args.machines} | "
            f"{sum(len(r.duplicates) for r in rs)} | **{median_range([r.seconds for r in rs])}** | "
            f"{median_range([r.phases.get('lease', 0) for r in rs])} | "
            f"{median_range([r.phases.get('loader', 0) for r in rs])} | "
            f"{median_range([r.phases.get('kernel', 0) for r in rs])} | "
            f"{median_range([r.server_cpu for r in rs])} | "
            f"{median_range([r.client_cpu for r in rs])} | "
            f"{median_range([r.idle_busy for r in rs], '{:.2f}')} | "
            f"{median_range([r.others_cores for r in rs], '{:.2f}')} |"
        )
    app = statistics.median([r.seconds for r in by.get("appliance", [])] or [0])
    ref = statistics.median([r.seconds for r in by.get("dnsmasq", [])] or [0])
    ratio = app / ref if ref else float("nan")
    done = {server: sum(r.ok for r in rs) for server, rs in by.items()}
    total = args.machines * (args.kernel_mib + args.initramfs_mib)
    lines = [
        BEGIN,
        "## Boot storm (DHCP + TFTP + HTTP)",
        "",
        f"{args.machines} machines PXE-boot at once: each a network namespace on one bridge "
        "with real clients (busybox udhcpc announcing a PXE client, BIOS and UEFI x64 "
        "alternating; busybox tftp for the loader its DHCP answer names, `-b 1468`: "
        "undionly.kpxe 70 KB or ipxe.efi 850 KB from Debian's ipxe; busybox wget for a "
        f"{args.kernel_mib} MiB kernel and a {args.initramfs_mib} MiB initramfs of random "
        f"bytes: {total:,} MiB in all), all started by one signal; the same storm as "
        "`tests/e2e/test_storm.py`, launched by `bench/storm/run.sh` (the work is in "
        "`bench/storm/run.py`). The servers run in the bridge's namespace on 192.0.2.1, one "
        "at a time, each from an empty lease store, alternating (who goes first alternates "
        "too): the **appliance** (one process: DHCP, TFTP and HTTP, uvloop) and "
        "**dnsmasq** (DHCP + TFTP, the config `appliance render --as dnsmasq` prints for "
        f"the same {args.machines}-node inventory, with DNS off (`port=0`), no `log-dhcp`, and "
        f"`tftp-max={max(args.machines, 50)}`: its default of 50 concurrent transfers "
        "refuses the rest of a storm) **+ nginx** (HTTP: one worker, like the one-process "
        "appliance; sendfile, tcp_nopush, no access log).",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine_line()}  ",
        f"Versions: {first_line(['dnsmasq', '--version']).split('  ')[0]}; "
        f"{first_line(['nginx', '-v'])}; {first_line(['busybox'])}  ",
        f"Appliance: commit {commit()}  ",
        f"Load: load average {load[0]} before the runs, {load[1]} after (1, 5, 15 min); "
        "other engineers' work shares these 2 cores: the last two columns are what everything "
        "else used in the 2 s before each storm (its servers idle) and during it (CPU time "
        "of the whole machine less the servers' and the clients'; that includes kernel "
        "network work not charged to either, such as softirqs of the bridge)  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Median of {args.reps} (min-max); times from the start signal, in seconds:",
        "",
        "| server | machines done | duplicate addresses | **storm s** | last lease | last loader "
        "| last kernel | server CPU s | clients' CPU s | others' cores before | others' cores "
        "during |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        *rows,
        "",
        f"- **appliance / dnsmasq + nginx: {ratio:.2f}x the time** "
        f"({app:.1f} s vs {ref:.1f} s, each the median over its storms of the time until the "
        "last machine that finished had its initramfs; below 1 the appliance is faster). "
        f"Machines that finished: appliance {done.get('appliance', 0)}, dnsmasq + nginx "
        f"{done.get('dnsmasq', 0)}, of {args.reps * args.machines} each.",
    ]
    for server in ("appliance", "dnsmasq"):
        rs = by.get(server, [])
        failed = [why for r in rs for why in r.failed.values()]
        if not failed:
            if rs:
                lines.append(f"- {label[server]}: every machine of every storm finished.")
            continue
        steps = Counter(why.split(" ", 1)[0] for why in failed)
        said = Counter(why.rsplit("(", 1)[-1].rstrip(")") for why in failed if "(" in why)
        lines.append(
            f"- {label[server]}: {len(failed)} of {len(rs) * args.machines} machines did not "
            f"finish, by step: {dict(steps)}; the clients said: {dict(said.most_common(3))}. "
            "Its storm time is the time of the machines that finished. busybox tftp gave up "
            "after its retries; dnsmasq logged no error for those transfers. Not "
            "investigated further here."
        )
    lines += ["", END]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    write_section(section, BEGIN, END)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--machines", type=int, default=200)
    p.add_argument("--kernel-mib", type=int, default=10)
    p.add_argument("--initramfs-mib", type=int, default=60)
    p.add_argument("--reps", type=int, default=3, help="storms per server")
    p.add_argument("--limit", type=float, default=300.0, help="seconds one storm may take")
    p.add_argument("--only", choices=("appliance", "dnsmasq"), help="one server only")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--json", type=Path, help="write the runs here too")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("STORM_WORK", "/tmp")))
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/storm needs root (network namespaces)")
    # SIGTERM (run.sh's trap) unwinds through the cleanup below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cmd = "bench/storm/run.sh " + shlex.join(sys.argv[1:])
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    base = args.work / f"storm-bench-{os.getpid()}"
    base.mkdir(parents=True)
    kernel, initrd = storm_mod.make_images(base / "images", args.kernel_mib, args.initramfs_mib)
    install_loaders(base)
    machines = storm_mod.machines(args.machines)
    lab = Lab(base, vip=storm_mod.STORM_VIP)
    runs: list[Run] = []
    try:
        storm = storm_mod.Storm(lab, base, machines)
        servers = [args.only] if args.only else ["appliance", "dnsmasq"]
        for rep in range(args.reps):
            order = servers if rep % 2 == 0 else list(reversed(servers))
            for server in order:
                runs.append(one_run(lab, storm, server, rep, args, base, kernel, initrd))
    finally:
        lab.close()
        for path in (base / "images" / kernel, base / "images" / initrd):
            path.unlink(missing_ok=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    section = report(runs, args, (" ".join(load_before), " ".join(load_after)), cmd)
    print(section)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    if not args.no_doc:
        write_doc(section)
    print(f"logs: {base}")
    return 0 if all(not r.failed and not r.duplicates for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
