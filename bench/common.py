"""What every bench/*/run.py needs: its processes, the appliance's source, CPU accounting.

Processes are started here and stopped here by PID (never by name): each is recorded in
a PID file under the run's work folder, so run.sh's trap can clean up after a killed
run. CPU is read from /proc (schedstat, ns) and /proc/stat, so a run can say how busy
the rest of the machine was while it measured.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import resource
import signal
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]


# --- processes ------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (nginx's worker, in.tftpd's per-transfer processes)."""
    found: list[int] = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            found += [int(x) for x in Path(task).read_text().split()]
    return found


def tree(pid: int) -> list[int]:
    """`pid` and its direct children."""
    return [pid, *child_pids(pid)]


class Children:
    """The processes a benchmark started; `stop` and `stop_all` end them by PID."""

    def __init__(self, label: str, pids: Path | None = None) -> None:
        self.label = label  # "bench/tftp", for the message of on_signal
        self.pids = pids  # PID files for run.sh's fallback clean-up; None: none kept
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kw)
        if self.pids is not None:
            self.pids.mkdir(parents=True, exist_ok=True)
            (self.pids / f"{name}-{proc.pid}.pid").write_text(str(proc.pid))
        self.procs[proc.pid] = proc
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """`sig`, then SIGKILL after 10 s; children it had forked are killed too."""
        kids = child_pids(proc.pid)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for kid in kids:  # e.g. a transfer still running in a forked in.tftpd
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        self.procs.pop(proc.pid, None)
        if self.pids is not None:
            for f in self.pids.glob(f"*-{proc.pid}.pid"):
                f.unlink(missing_ok=True)

    def stop_all(self) -> None:
        for proc in list(self.procs.values()):
            self.stop(proc)

    def on_signal(self, signum: int, _frame: Any) -> NoReturn:
        why = " (over the time budget)" if signum == signal.SIGALRM else ""
        raise SystemExit(f"{self.label}: stopped by {signal.Signals(signum).name}{why}")


# --- the appliance's source -----------------------------------------------------------


class AppSource:
    """Where the appliance runs from: the work tree, or a `git archive` of a commit."""

    def __init__(self) -> None:
        self.path = ROOT
        self.rev_sha: str | None = None

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.path))

    def use_rev(self, rev: str, work: Path) -> str:
        """Run the appliance as committed at `rev` (others may be editing the work tree)."""
        sha = subprocess.run(
            ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout.strip()
        src = work / "src"
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(["git", "archive", sha], stdout=subprocess.PIPE, cwd=ROOT)
        subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise SystemExit(f"git archive {sha} failed")
        self.path, self.rev_sha = src, sha
        self.build_native()
        return sha

    NATIVE_SOURCE = "services/tftp/_lockstep.c"

    def native_module(self) -> Path:
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        return self.path / self.NATIVE_SOURCE.replace(".c", suffix)

    def build_native(self) -> None:
        """Compile the TFTP lock-step loop in C into the tree, as `pip install` does
        (a `git archive` has the source only); where the commit has none, nothing."""
        src = self.path / self.NATIVE_SOURCE
        if not src.exists():
            return
        cc = (sysconfig.get_config_var("CC") or "cc").split()
        include = sysconfig.get_paths()["include"]
        subprocess.run(
            [
                *cc,
                "-O2",
                "-fPIC",
                "-shared",
                f"-I{include}",
                str(src),
                "-o",
                str(self.native_module()),
            ],
            check=True,
        )

    def tftp_loop(self) -> str:
        """Which loop the appliance's TFTP transfers run in lock-step: C or Python."""
        src, mod = self.path / self.NATIVE_SOURCE, self.native_module()
        if os.environ.get("APPLIANCE_TFTP_NATIVE", "1") == "0":
            return "Python (APPLIANCE_TFTP_NATIVE=0)"
        if not src.exists():
            return "Python (this code has no C loop)"
        if not mod.exists():
            return "Python (services/tftp/_lockstep.c not built)"
        if mod.stat().st_mtime < src.stat().st_mtime:
            raise SystemExit(f"{mod} is older than {src}: pip install -e . to rebuild it")
        return "C (services/tftp/_lockstep.c)"

    def describe(self) -> str:
        """Which code the appliance ran: a --rev archive, or the work tree (dirty or not)."""
        if self.rev_sha:
            return f"commit {self.rev_sha[:12]} (`--rev`, a `git archive` of it)"
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "appliance", "services"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.split()
        changed = sorted({p for p in dirty if "/" in p})
        if changed:
            return f"work tree at {sha}, with uncommitted changes in {', '.join(changed)}"
        return f"work tree at {sha} (clean)"


# --- CPU ------------------------------------------------------------------------------


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of `pid` (a thread that has ended is gone)."""
    found = {}
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[int(f.split("/")[4])] = int(Path(f).read_text().split()[0]) / 1e9
    return found


def cpu_times() -> dict[int, tuple[float, float]]:
    """Per vCPU: (busy seconds: user+nice+system+irq+softirq, steal seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            f = [int(x) for x in m.group(2).split()]
            out[int(m.group(1))] = ((f[0] + f[1] + f[2] + f[5] + f[6]) / tick, f[7] / tick)
    return out


def cpu_busy() -> dict[int, float]:
    """Per vCPU: busy seconds."""
    return {cpu: busy for cpu, (busy, _) in cpu_times().items()}


def others_busy(seconds: float = 1.0) -> float:
    """Cores in use over the next `seconds` (call it while the benchmark itself is idle)."""
    before = cpu_busy()
    time.sleep(seconds)
    after = cpu_busy()
    return sum(after[c] - before[c] for c in after) / seconds


def wait_quiet(limit: float, busy_below: float) -> float:
    """Wait (at most `limit` s) until the machine uses under `busy_below` cores."""
    deadline = time.monotonic() + limit
    told = False
    while True:
        busy = others_busy()
        if busy < busy_below or time.monotonic() >= deadline:
            return busy
        if not told:
            print(f"  machine busy ({busy:.2f} cores used by others): waiting", flush=True)
            told = True


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` and of its children (later children inherit it)."""
    for p in tree(pid):
        for tid in os.listdir(f"/proc/{p}/task"):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(int(tid), cpus)


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (the clients' rusage)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def stat_cpu(pid: int) -> float:
    """user + system seconds of one process from /proc/PID/stat (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has spent (all cores; not idle, not iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


# --- docs/benchmarks.md ---------------------------------------------------------------

DOC = ROOT / "docs" / "benchmarks.md"


def write_section(section: str, begin: str, end: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) into DOC in place of
    the old one, or at the end; written atomically, one blank line after it."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    body = section.strip("\n") + "\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        tail = rest.partition(end)[2].lstrip("\n")
        text = head + body + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    tmp = DOC.with_name(f".{DOC.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, DOC)
