#!/usr/bin/env python3
"""Before/after pairs: proxy, DNS, DHCP and TFTP, each launched by its own run.sh once with
`--rev BEFORE` (a `git archive` of that commit) and once on the work tree, alternated.

    bench/pairs.py [--before 414fb17] [--after REV] [--rounds 2] [--only proxy,dns,dhcp,tftp]
                   [--out DIR] [--max-minutes 25] [--smoke] [--no-doc]
    bench/pairs.py --from-dir DIR [--no-doc]     (re-render the section from a finished run)

Each round runs, for each benchmark, "before" then "after"; a round starts only while the
time left (--max-minutes) holds one more round as long as the first one took, so every
benchmark always has whole pairs; no run goes past --max-minutes (it is stopped). Each
run measures its competitor (HAProxy, dnsmasq, kea-dhcp4, tftpd-hpa) in the same run, so
its ratio to it carries the machine's state of that moment. Every run's JSON and log go
to the results dir (runs.json indexes them, rewritten after each run); then ONE section,
"Issue 17 restructuring: before/after", goes into docs/benchmarks.md between
<!-- pairs17:begin --> and <!-- pairs17:end --> (and to DIR/section.md).
--smoke: the smallest settings, one round, no doc: it checks that the chain works end to
end; its numbers are not results.
Every child is started in its own session and stopped by PID (run.sh's trap cleans up
what it started); every run has a time limit. Traffic: loopback and the DHCP bench's own
network namespaces only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DOC, ROOT, AppSource, others_busy, write_section

Result = dict[str, Any]

BEGIN, END = "<!-- pairs17:begin -->", "<!-- pairs17:end -->"
BEFORE = "414fb17"  # the last commit before the issue 17 restructuring
BUSY = 0.2  # cores used by others above which a run is flagged as noisy (as the benches)
NOISE_FLOOR = 0.05  # a change under 5% is noise on this 2-vCPU machine whatever the spread
QUIET_WAIT = 60.0  # s, before each run: wait (bounded) for others to use under BUSY cores
MIN_LEFT = 60.0  # s: with less time left than this, no run is started


# --- the benchmarks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    fmt: str  # format of one value
    higher_better: bool
    competitor: str  # who the appliance's value is compared with, in the same run


@dataclass(frozen=True)
class Bench:
    name: str
    label: str
    script: str
    args: str  # the real run's settings
    smoke: str  # the smallest settings that go through every step
    timeout: float  # s, the real run; a smoke run gets half of it
    no_doc: bool  # the script has --no-doc (the DNS one never writes the doc)
    figures: tuple[Figure, ...]
    extract: Callable[[Result], dict[str, tuple[float | None, float | None]]]
    noise: Callable[[Result], float | None]  # others' cores during the run, worst case


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def proxy_figures(data: Result) -> dict[str, tuple[float | None, float | None]]:
    r = data.get("results", {})

    def ok(key: str, what: str, field: str) -> float | None:
        x = _get(r, key, what)
        return x.get(field) if x and x.get("ok") else None

    def us_per_conn(key: str) -> float | None:
        rps, cores = ok(key, "conn", "rps"), ok(key, "conn", "proxy_cores")
        return 1e6 * cores / rps if rps and cores is not None else None

    return {
        "conn": (ok("appliance", "conn", "rps"), ok("haproxy", "conn", "rps")),
        "bulk": (ok("appliance", "bulk", "gbps"), ok("haproxy", "bulk", "gbps")),
        "cpu": (us_per_conn("appliance"), us_per_conn("haproxy")),
    }


def proxy_noise(data: Result) -> float | None:
    vals = [
        m["others_cores"]
        for t in data.get("results", {}).values()
        for m in t.values()
        if isinstance(m, dict) and "others_cores" in m
    ]
    return max(vals, default=None)


def dns_figures(data: Result) -> dict[str, tuple[float | None, float | None]]:
    def both(run: str, field: str) -> tuple[float | None, float | None]:
        return _get(data, "appliance", run, field), _get(data, "dnsmasq", run, field)

    return {
        "qps": both("throughput", "qps"),
        "p99": both("latency", "p99_ms"),
        "cpu": both("throughput", "server_us_per_query"),
    }


def dns_noise(data: Result) -> float | None:
    vals = [
        _get(data, s, run, "other_cores") + (_get(data, s, run, "steal_cores") or 0.0)
        for s in ("appliance", "dnsmasq")
        for run in ("throughput", "latency")
        if _get(data, s, run, "other_cores") is not None
    ]
    return max(vals, default=None)


def dhcp_figures(data: Result) -> dict[str, tuple[float | None, float | None]]:
    rows = data.get("results", [])
    rates = sorted({r["rate"] for r in rows})
    if not rates:
        return {}
    top = rates[-1]
    goal = 2000 if 2000 in rates else top  # bench/dhcp's GOAL_RATE

    def at(server: str, rate: int, field: str) -> float | None:
        found = [r[field] for r in rows if r["server"] == server and r["rate"] == rate]
        return found[0] if found else None

    return {
        "completed": (
            at("appliance", top, "completed_per_s"),
            at("dnsmasq", top, "completed_per_s"),
        ),
        "cpu": (
            at("appliance", goal, "server_cpu_ms_per_dora"),
            at("kea", goal, "server_cpu_ms_per_dora"),
        ),
    }


def dhcp_noise(data: Result) -> float | None:
    return max((r["others_cores"] for r in data.get("results", [])), default=None)


def tftp_figures(data: Result) -> dict[str, tuple[float | None, float | None]]:
    def both(run: str, field: str) -> tuple[float | None, float | None]:
        return _get(data, "runs", run, "appliance", field), _get(data, "runs", run, "hpa", field)

    return {
        "curl": both("one/curl", "mbps"),
        "lockstep": both("one/lockstep", "mbps"),
        "window": both("one/window", "mbps"),
        "cpu": both("one/curl", "server_us_per_block"),
    }


def tftp_noise(data: Result) -> float | None:
    vals = [
        s["others_max"]
        for run in data.get("runs", {}).values()
        for s in run.values()
        if s.get("others_max") is not None
    ]
    return max(vals, default=None)


BENCHES: dict[str, Bench] = {
    b.name: b
    for b in (
        Bench(
            name="proxy",
            label="Proxy",
            script="bench/proxy/run.sh",
            args=(
                "--seconds 5 --targets haproxy,appliance --tests bulk,conn"
                " --wait-quiet 30 --retry-noisy 1"
            ),
            smoke=(
                "--seconds 1 --targets haproxy,appliance --tests bulk,conn"
                " --wait-quiet 0 --retry-noisy 0"
            ),
            timeout=300,
            no_doc=True,
            figures=(
                Figure(
                    "conn",
                    "new conn/s (wrk -c 32, new connection each)",
                    "{:,.0f}",
                    True,
                    "HAProxy",
                ),
                Figure("bulk", "bulk Gbit/s (iperf3, one stream)", "{:.2f}", True, "HAProxy"),
                Figure("cpu", "CPU us per proxied connection", "{:.0f}", False, "HAProxy"),
            ),
            extract=proxy_figures,
            noise=proxy_noise,
        ),
        Bench(
            name="dns",
            label="DNS",
            script="bench/dns/run.sh",
            args="--duration 5 --slices 5",
            smoke="--duration 1 --slices 1",
            timeout=240,
            no_doc=False,  # bench/dns never writes the doc
            figures=(
                Figure("qps", "queries/s (dnsperf -c 1 -q 100)", "{:,.0f}", True, "dnsmasq"),
                Figure("p99", "p99 ms at 2,000 q/s", "{:.3f}", False, "dnsmasq"),
                Figure("cpu", "server CPU us per query", "{:.1f}", False, "dnsmasq"),
            ),
            extract=dns_figures,
            noise=dns_noise,
        ),
        Bench(
            name="dhcp",
            label="DHCP",
            script="bench/dhcp/run.sh",
            args=(
                "--servers appliance,dnsmasq,kea --rates 2000,4000 --period 5"
                " --wait-quiet 30 --retry-noisy 1 --max-minutes 4"
            ),
            smoke=(
                "--servers appliance,dnsmasq,kea --rates 2000 --period 1"
                " --wait-quiet 0 --retry-noisy 0 --max-minutes 1"
            ),
            timeout=420,
            no_doc=True,
            figures=(
                Figure(
                    "completed",
                    "DORA completed/s at the top offered rate",
                    "{:,.0f}",
                    True,
                    "dnsmasq",
                ),
                Figure("cpu", "server CPU ms per DORA at 2,000/s", "{:.3f}", False, "kea-dhcp4"),
            ),
            extract=dhcp_figures,
            noise=dhcp_noise,
        ),
        Bench(
            name="tftp",
            label="TFTP",
            script="bench/tftp/run.sh",
            args="--reps 3 --reps-other 1 --wait-quiet 30",
            smoke="--reps 1 --reps-other 1 --pingpong 2000 --wait-quiet 0",
            timeout=420,
            no_doc=True,
            figures=(
                Figure("curl", "lock-step MB/s (curl, one vCPU)", "{:,.1f}", True, "tftpd-hpa"),
                Figure(
                    "lockstep", "lock-step MB/s (client.py, one vCPU)", "{:,.1f}", True, "tftpd-hpa"
                ),
                Figure("window", "windowsize 16 MB/s (one vCPU)", "{:,.1f}", True, "tftpd-hpa"),
                Figure("cpu", "server CPU us per block (curl)", "{:.2f}", False, "tftpd-hpa"),
            ),
            extract=tftp_figures,
            noise=tftp_noise,
        ),
    )
}


# --- running ------------------------------------------------------------------------------


def git(*argv: str) -> str:
    return subprocess.run(
        ["git", *argv], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()


def work_tree_fingerprint() -> str:
    """HEAD and a hash of the uncommitted state of the appliance's code: an "after" run
    that saw other code than the one before it shows up in the run table."""
    h = hashlib.sha256(git("diff", "HEAD", "--", "appliance", "services").encode())
    for name in sorted(
        git("ls-files", "-o", "--exclude-standard", "appliance", "services").split()
    ):
        path = ROOT / name
        if path.is_file():
            h.update(name.encode() + path.read_bytes())
    return f"{git('rev-parse', '--short=12', 'HEAD')}+{h.hexdigest()[:8]}"


def run_one(
    bench: Bench, code: str, rev: str | None, round_: int, out: Path, smoke: bool, left: float
) -> Result:
    """One run of one benchmark's run.sh, in at most `left` s; its record (the JSON's path,
    not its content)."""
    stem = f"r{round_}-{bench.name}-{code}"
    json_path, log_path = out / f"{stem}.json", out / f"{stem}.log"
    argv = [bench.script, *(bench.smoke if smoke else bench.args).split(), "--json", str(json_path)]
    if bench.no_doc:
        argv.append("--no-doc")
    if rev:
        argv += ["--rev", rev]
    start = time.monotonic()
    busy = others_busy(2.0)
    if busy >= BUSY and not smoke:
        deadline = start + min(QUIET_WAIT, left / 4)
        while busy >= BUSY and time.monotonic() < deadline:
            busy = others_busy(2.0)
    timeout = min(bench.timeout / 2 if smoke else bench.timeout, left - (time.monotonic() - start))
    rec: Result = {
        "bench": bench.name, "code": code, "round": round_, "argv": argv,
        "json": json_path.name, "log": log_path.name, "others_before": round(busy, 2),
        "started": datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S"),
        "work_tree": None if rev else work_tree_fingerprint(),
    }  # fmt: skip
    print(f"[{rec['started']} UTC] round {round_} {bench.name:5s} {code:6s}: {' '.join(argv)}",
          flush=True)  # fmt: skip
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = stop(proc)
            rec["timed_out"] = True
        except BaseException:  # interrupted: the child is in its own session, stop it too
            stop(proc)
            raise
    rec["seconds"] = round(time.monotonic() - t0, 1)
    rec["rc"] = rc
    data = json.loads(json_path.read_text()) if json_path.exists() and rc == 0 else None
    rec["ok"] = data is not None
    if data is not None:
        rec["others_during"] = bench.noise(data)
        rec["source"] = source_of(bench.name, data)
        figs = bench.extract(data)
        shown = ", ".join(
            f"{f.key} {fmt(f, figs.get(f.key, (None, None))[0])}"
            f" ({fmt_ratio(_div(*figs.get(f.key, (None, None))))} {f.competitor})"
            for f in bench.figures
        )
        print(f"    {rec['seconds']:.0f} s: {shown}", flush=True)
    else:
        tail = log_path.read_text(errors="replace")[-1500:]
        print(f"    FAILED (exit {rc}, {rec['seconds']:.0f} s), end of {log_path}:\n{tail}")
    return rec


def stop(proc: subprocess.Popen[bytes]) -> int:
    """Over its time: SIGTERM to run.sh (its trap stops what it started), then SIGKILL to
    the session it leads (its own process group, by that group's id)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(10)


def source_of(name: str, data: Result) -> str | None:
    """Which code the appliance ran, as the benchmark itself recorded it."""
    where = {"proxy": ("meta", "source"), "dhcp": ("machine", "appliance")}
    found = _get(data, *where.get(name, ("machine", "source")))
    return str(found) if found is not None else None


# --- the section ------------------------------------------------------------------------


def fmt(f: Figure, v: float | None) -> str:
    return "-" if v is None else f.fmt.format(v)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def spread(vals: list[float]) -> float | None:
    """max/min - 1 among runs of the same code: how much that code varied by itself."""
    return max(vals) / min(vals) - 1 if len(vals) >= 2 and min(vals) > 0 else None


def judge(f: Figure, change: float | None, normalized: float | None, noise: float) -> str:
    """`change`: after/before of the figure; `normalized`: of its ratio to the competitor."""
    if change is None:
        return "not measured"

    def worse(x: float) -> float:  # how much worse after is than before (< 0: better)
        return (1 / x - 1) if f.higher_better else (x - 1)

    w = worse(change)
    if w <= noise:
        return "better" if w < -noise else "within noise"
    if normalized is not None and worse(normalized) <= noise:
        return "worse, but not against the competitor (machine load)"
    return "**worse beyond noise**"


def section(runs: list[Result], meta: Result, out: Path) -> str:
    before_sha, after = meta["before_sha"], meta["after"]
    lines = [
        BEGIN,
        "## Issue 17 restructuring: before/after",
        "",
        f"Before: commit {before_sha[:12]} (the last one before the restructuring), run from"
        f" a `git archive` of it (each script's `--rev`); after: {after}. The same script"
        " launches both, back to back, before then after, for each benchmark in turn,"
        f" {meta['rounds_done']} round(s). Each run also measures its competitor (HAProxy,"
        ' dnsmasq, kea-dhcp4, tftpd-hpa) in the same run, so "vs competitor" (appliance /'
        " competitor, the same run) carries the machine's state of that moment; after/before"
        " is of the means of the runs. The settings (below) are shorter than those of the"
        " protocol sections, so the absolute figures are less steady than theirs: the pairs"
        " are what this section is for.",
        "",
        f"Command: `{meta['command']}`  ",
        f"Each run: {meta['each']}  ",
        f"Machine: {meta['machine']}  ",
        f"Date: {meta['started']} to {meta['ended']}",
        "",
        "| protocol | figure | competitor | before | after | after/before"
        " | vs competitor, before | vs competitor, after | verdict |",
        "|---|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for bench in BENCHES.values():
        mine = [r for r in runs if r["bench"] == bench.name and r.get("ok")]
        if not mine and not any(r["bench"] == bench.name for r in runs):
            continue
        figs = {id(r): bench.extract(json.loads((out / r["json"]).read_text())) for r in mine}
        busy = any(max(r["others_before"], r.get("others_during") or 0.0) >= BUSY for r in mine)
        for f in bench.figures:
            cells: dict[str, list[float]] = {"before": [], "after": []}
            ratios: dict[str, list[float]] = {"before": [], "after": []}
            for r in mine:
                a, c = figs[id(r)].get(f.key, (None, None))
                if a is not None:
                    cells[r["code"]].append(a)
                x = _div(a, c)
                if x is not None:
                    ratios[r["code"]].append(x)
            mb = statistics.mean(cells["before"]) if cells["before"] else None
            ma = statistics.mean(cells["after"]) if cells["after"] else None
            change = _div(ma, mb)
            rb = statistics.mean(ratios["before"]) if ratios["before"] else None
            ra = statistics.mean(ratios["after"]) if ratios["after"] else None
            noise = max([NOISE_FLOOR, *(s for s in map(spread, cells.values()) if s is not None)])
            lines.append(
                "| "
                + " | ".join(
                    [
                        bench.label,
                        f.label + (" (lower is better)" if not f.higher_better else ""),
                        f.competitor,
                        " / ".join(fmt(f, v) for v in cells["before"]) or "-",
                        " / ".join(fmt(f, v) for v in cells["after"]) or "-",
                        fmt_ratio(change),
                        " / ".join(fmt_ratio(v) for v in ratios["before"]) or "-",
                        " / ".join(fmt_ratio(v) for v in ratios["after"]) or "-",
                        judge(f, change, _div(ra, rb), noise)
                        + (" (a run was noisy)" if busy and change is not None else ""),
                    ]
                )
                + " |"
            )
    lines += [
        "",
        "before, after: each run's figure, in run order; verdict: a change in the bad"
        f" direction up to the larger of {100 * NOISE_FLOOR:.0f}% and the spread among the"
        " runs of the same code (max/min - 1) is within noise; a larger one whose ratio to the"
        " competitor did not worsen by as much is put down to the machine; (a run was noisy):"
        f" others used {BUSY} cores or more before or during one of that protocol's runs.",
        "",
        "Runs (others' cores: CPU used by anything but the benchmark's own processes; before:"
        " a 2 s sample by bench/pairs.py, which first waits up to"
        f" {QUIET_WAIT:.0f} s for it to drop under {BUSY}; during: the worst of the script's"
        f" own measurements; (!) above {BUSY}):",
        "",
        "| round | protocol | code | appliance ran | started (UTC) | seconds"
        " | others' cores before | during | result |",
        "|--:|---|---|---|---|--:|--:|--:|---|",
    ]

    def flag(x: float | None) -> str:
        return "" if x is None or x < BUSY else " (!)"

    for r in runs:
        during = r.get("others_during")
        lines.append(
            f"| {r['round']} | {BENCHES[r['bench']].label} | {r['code']}"
            f" | {r.get('source') or '-'}"
            + (f", fingerprint {r['work_tree']}" if r.get("work_tree") else "")
            + f" | {r['started']} | {r['seconds']:.0f}"
            f" | {r['others_before']:.2f}{flag(r['others_before'])}"
            f" | {'-' if during is None else f'{during:.2f}'}{flag(during)}"
            f" | {'ok' if r.get('ok') else 'failed (exit ' + str(r['rc']) + ')'} |"
        )
    prints = {r["work_tree"] for r in runs if r.get("work_tree")}
    if len(prints) > 1:
        lines += [
            "",
            'Note: the work tree changed between the "after" runs (fingerprints differ):'
            " they did not all run the same code.",
        ]
    quiet = [r["others_before"] for r in runs] + [
        r["others_during"] for r in runs if r.get("others_during") is not None
    ]
    worst = max(quiet, default=0.0)
    lines += [
        "",
        f"Machine quiet: the most any other load used, before or during a run, was {worst:.2f}"
        f" cores ({'quiet' if worst < BUSY else 'NOT quiet: read the pairs with care'}).",
        END,
    ]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {cpu}, Linux {os.uname().release}"


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--before", default=BEFORE, help=f"the commit before (default {BEFORE})")
    p.add_argument("--after", metavar="REV", help="after: this commit (`--rev`), not the work tree")
    p.add_argument("--rounds", type=int, default=2, help="before+after pairs per benchmark (2)")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    p.add_argument("--out", type=Path, help="results dir (default /tmp/pairs17-<time>)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=25.0,
        help="hard limit (25): no run past it, a round only if it fits",
    )
    p.add_argument("--smoke", action="store_true", help="smallest settings, one round, no doc")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--from-dir", type=Path, help="re-render the section from a results dir")
    args = p.parse_args()

    if args.from_dir:
        saved = json.loads((args.from_dir / "runs.json").read_text())
        finish(section(saved["runs"], saved["meta"], args.from_dir), args.from_dir, args.no_doc)
        return 0

    only = [b for b in args.only.split(",") if b]
    if unknown := [b for b in only if b not in BENCHES]:
        p.error(f"--only: unknown {unknown}; choose from {','.join(BENCHES)}")
    if not 1 <= args.rounds <= 4:
        p.error("--rounds: 1 to 4")
    rounds = 1 if args.smoke else args.rounds
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(f"/tmp/pairs17-{stamp}{'-smoke' if args.smoke else ''}")
    out.mkdir(parents=True, exist_ok=True)
    before_sha = git("rev-parse", "--verify", f"{args.before}^{{commit}}")
    after_sha = git("rev-parse", "--verify", f"{args.after}^{{commit}}") if args.after else None
    meta: Result = {
        "command": "bench/pairs.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "each": "; ".join(
            f"`{BENCHES[b].script} {BENCHES[b].smoke if args.smoke else BENCHES[b].args}"
            f"{' --no-doc' if BENCHES[b].no_doc else ''} --json FILE [--rev REV]`"
            for b in only
        ),
        "machine": machine(),
        "before_sha": before_sha,
        "after": (
            f"commit {after_sha[:12]}, run from a `git archive` of it"
            if after_sha
            else f"the {AppSource().describe()}"
        ),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
    }
    print(f"bench/pairs: before {before_sha[:12]}, after {meta['after']}; results in {out}")
    runs: list[Result] = []
    t0 = time.monotonic()
    first_round = 0.0

    def on_signal(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # stop the running child, then the section of what is there

    signal.signal(signal.SIGTERM, on_signal)
    done = 0
    end = t0 + 60 * args.max_minutes  # hard: no run goes past it
    try:
        for round_ in range(1, rounds + 1):
            if round_ > 1 and time.monotonic() + first_round > end:
                print(f"bench/pairs: no time for round {round_} (--max-minutes)", flush=True)
                break
            r0 = time.monotonic()
            for name in only:
                for code, rev in (("before", before_sha), ("after", after_sha)):
                    left = end - time.monotonic()
                    if left < MIN_LEFT:
                        raise TimeoutError
                    runs.append(run_one(BENCHES[name], code, rev, round_, out, args.smoke, left))
                    save(out, runs, meta, done)
            done = round_
            first_round = first_round or time.monotonic() - r0
    except KeyboardInterrupt:
        print("bench/pairs: interrupted; the section covers the runs that finished")
    except TimeoutError:
        print("bench/pairs: out of time (--max-minutes); the section covers the runs that finished")
    meta["ended"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta["rounds_done"] = done
    save(out, runs, meta, done)
    text = section(runs, meta, out)
    print(f"bench/pairs: {time.monotonic() - t0:.0f} s in all")
    finish(text, out, args.no_doc or args.smoke)
    return 0 if runs and all(r["ok"] for r in runs) else 1


def save(out: Path, runs: list[Result], meta: Result, done: int) -> None:
    meta.setdefault("ended", "-")
    meta["rounds_done"] = done
    tmp = out / "runs.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    os.replace(tmp, out / "runs.json")


def finish(text: str, out: Path, no_doc: bool) -> None:
    (out / "section.md").write_text(text)
    print()
    print(text)
    if no_doc:
        print(f"bench/pairs: section in {out / 'section.md'} (docs/benchmarks.md not touched)")
    else:
        write_section(text, BEGIN, END)
        print(f"bench/pairs: wrote the section into {DOC}")


if __name__ == "__main__":
    sys.exit(main())
