"""systemd/appliance.service: `systemd-analyze verify` and `security`, its directives,
and the daemon under the confinement the unit asks for.

Without systemd as PID 1 here, the confinement is reproduced with the kernel's own
tools, which is what systemd uses too: the capability sets, user and no_new_privs
with util-linux `setpriv`; MemoryDenyWriteExecute with prctl(PR_SET_MDWE) (Linux
6.3+; systemd's seccomp variant also refuses mprotect(PROT_EXEC) on any mapping, a
superset not reproduced here). The seccomp SystemCallFilter is checked by verify only.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest

from appliance.inventory import Inventory
from appliance.supervisor import STOP_TIMEOUT
from tests.helpers import ROOT, free_port, loopback_inventory, need_tool, write_inventory

UNIT = ROOT / "systemd" / "appliance.service"
EXEC_START = "/opt/appliance/bin/appliance run --config /etc/appliance/inventory.yaml"
CAPS = ("net_bind_service", "net_raw", "net_admin")
CAP_BITS = {"net_bind_service": 10, "net_admin": 12, "net_raw": 13}
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
MAX_EXPOSURE = 2.5  # systemd-analyze security: fail if hardening regresses past this


def directives(text: str) -> dict[str, list[str]]:
    """Key -> values (in order) of the [Service] and other sections; comments skipped."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart on this checkout's `appliance` (verify checks
    that the binary exists); everything else unchanged."""
    binary = Path(sys.executable).parent / "appliance"
    if not binary.exists():
        pytest.skip(f"{binary} is not installed (pip install -e .)")
    text = UNIT.read_text()
    assert EXEC_START in text
    copy = tmp_path / "appliance.service"
    copy.write_text(text.replace("/opt/appliance/bin/appliance", str(binary)))
    return copy


def test_the_unit_says_what_the_appliance_needs() -> None:
    d = directives(UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == EXEC_START
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert _seconds(one["WatchdogSec"]) >= 10
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert sorted(one[key].lower().split()) == sorted(f"cap_{c}" for c in CAPS)
    # The stop budget: the LB drain (default stop_timeout) plus the supervisor's margin.
    default_drain = Inventory.model_fields["load_balancer"].annotation
    assert default_drain is not None
    drain = default_drain.model_fields["stop_timeout"].default
    assert _seconds(one["TimeoutStopSec"]) > drain + STOP_TIMEOUT
    # The inventory's default state_dir is the unit's state directory, and writable.
    state_dir = Inventory.model_fields["state_dir"].default
    assert state_dir == f"/var/lib/{one['StateDirectory']}"
    assert state_dir in one["ReadWritePaths"].split()
    assert one["User"] == "appliance" and "DynamicUser" not in d
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictNamespaces",
        "RestrictRealtime",
    ):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert set(one["RestrictAddressFamilies"].split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",
    }
    assert d["SystemCallFilter"][0] == "@system-service"
    sysusers = (ROOT / "systemd" / "appliance.sysusers").read_text()
    assert re.search(r"^u appliance - .* /var/lib/appliance$", sysusers, re.M)


def test_systemd_analyze_verify(unit_copy: Path) -> None:
    tool = need_tool("systemd-analyze")
    proc = subprocess.run(
        [tool, "verify", str(unit_copy)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    # verify warns (exit 0) about unknown keys, bad values, missing binaries: none here.
    assert "appliance.service" not in proc.stderr, proc.stderr


def test_systemd_analyze_security_score(unit_copy: Path) -> None:
    tool = need_tool("systemd-analyze")
    proc = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in proc.stderr:
        pytest.skip(f"systemd-analyze security --offline needs systemd 250+: {proc.stderr}")
    m = re.search(r"Overall exposure level for appliance\.service: (\d+\.\d+) (\w+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    print(f"\nsystemd-analyze security: exposure {m.group(1)} {m.group(2)} (0 best, 10 worst)")
    for line in proc.stdout.splitlines():
        if line.startswith("✗"):
            print("  " + " ".join(line.split()[:2]))
    assert float(m.group(1)) <= MAX_EXPOSURE


# --- the daemon under the unit's confinement ---------------------------------------------


def _reachable_by_others(path: Path) -> bool:
    """Whether a user other than root can execute `path` (every directory searchable)."""
    real = path.resolve()
    return all(part.stat().st_mode & stat.S_IXOTH for part in [*reversed(real.parents), real])


def _mdwe() -> None:
    """preexec_fn: MemoryDenyWriteExecute as the kernel does it; kept across execve."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def _have_mdwe() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    got: int = libc.prctl(PR_GET_MDWE, 0, 0, 0, 0)
    return got >= 0  # EINVAL before Linux 6.3


@pytest.fixture
def confined_dir() -> Iterator[Path]:
    """Outside pytest's 0700 tmp: the daemon may run as an unprivileged user."""
    d = Path(tempfile.mkdtemp(prefix="appliance-unit-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _caps(status: str, field: str) -> set[str]:
    found = re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M)
    assert found is not None, (field, status)
    value = int(found.group(1), 16)
    return {name for name, bit in CAP_BITS.items() if value >> bit & 1} | (
        {"other"} if value & ~sum(1 << b for b in CAP_BITS.values()) else set()
    )


@pytest.mark.root
def test_daemon_runs_confined_like_the_unit(confined_dir: Path) -> None:
    """Only CAP_NET_BIND_SERVICE, CAP_NET_RAW and CAP_NET_ADMIN, no_new_privs, an
    unprivileged user (when this interpreter is reachable by one; else uid 0 with
    nothing but those capabilities), write-xor-execute memory: every service binds
    its privileged port, uvloop runs, READY arrives, SIGTERM exits 0."""
    setpriv = need_tool("setpriv")
    if not _have_mdwe():
        pytest.skip("prctl(PR_SET_MDWE) needs Linux 6.3+")
    unprivileged = _reachable_by_others(Path(sys.executable))
    uid = 65534 if unprivileged else 0
    state = confined_dir / "state"
    state.mkdir()
    os.chown(state, uid, uid)
    host = "127.0.0.97"  # privileged ports on an address of its own
    raw = loopback_inventory(confined_dir)
    raw["network"]["interface"] = "lo"  # SO_BINDTODEVICE, as on a real provisioning host
    raw["listen"].update(
        dns=f"{host}:53",
        dhcp=f"{host}:67",
        tftp=f"{host}:69",
        http=f"{host}:80",
        ingress_https=f"127.0.0.54:{free_port(host='127.0.0.54')}",
    )
    raw["load_balancer"]["check_interval"] = 60
    config = write_inventory(confined_dir / "inventory.yaml", raw)
    config.chmod(0o644)
    notify_path = confined_dir / "notify.sock"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(notify_path))
    notify_path.chmod(0o666)
    ns.settimeout(20)
    caps = ",".join(f"+{c}" for c in CAPS)
    ids = ["--reuid", str(uid), "--regid", str(uid), "--clear-groups"] if unprivileged else []
    cmd = [
        setpriv,
        *ids,
        f"--inh-caps=-all,{caps}",
        f"--ambient-caps=-all,{caps}" if unprivileged else "--ambient-caps=-all",
        f"--bounding-set=-all,{caps}",
        "--no-new-privs",
        sys.executable,
        "-m",
        "appliance",
        "run",
        "--config",
        str(config),
    ]
    log = (confined_dir / "daemon.log").open("w")
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        preexec_fn=_mdwe,
    )
    try:
        ready = ns.recv(4096).decode()
        assert ready.startswith("READY=1"), ready
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{uid}\s", status, re.M)
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        assert _caps(status, "CapEff") == set(CAPS)
        assert _caps(status, "CapBnd") == set(CAPS)
        answer = dns.query.udp(
            dns.message.make_query("api.demo.example.com", "A"), host, port=53, timeout=5
        )
        assert [str(r) for rrset in answer.answer for r in rrset] == ["127.0.0.54"]
        with urllib.request.urlopen(f"http://{host}/boot.ipxe", timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        ns.close()
    out = (confined_dir / "daemon.log").read_text()
    assert "Traceback" not in out and "cannot" not in out, out
    print(f"\nconfined run as uid {uid}: {out.count(chr(10))} log lines, exit 0")


def test_mdwe_keeps_uvloop_cryptography_and_cffi_working() -> None:
    """MemoryDenyWriteExecute=yes: W^X memory is refused, and what the daemon uses
    still works: uvloop, cryptography (Rust + OpenSSL), cffi calls. (cffi's old-style
    ffi.callback() needs W+X memory and fails; nothing in the appliance uses it.)"""
    if not _have_mdwe():
        pytest.skip("prctl(PR_SET_MDWE) needs Linux 6.3+")
    code = """
import asyncio, ctypes, mmap
libc = ctypes.CDLL(None)
assert libc.prctl(66, 0, 0, 0, 0) == 1, "MDWE not kept across execve"
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("W+X mapping allowed")
except PermissionError:
    pass
import uvloop
async def main():
    await asyncio.sleep(0.01)
    return 1
assert uvloop.run(main()) == 1
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
key.public_key().verify(key.sign(b"csr", ec.ECDSA(hashes.SHA256())), b"csr",
                        ec.ECDSA(hashes.SHA256()))
import cffi
ffi = cffi.FFI()
ffi.cdef("int getpid(void);")
import os
assert ffi.dlopen(None).getpid() == os.getpid()
import appliance.cli, services.proxy, services.dns, services.dhcp, services.tftp, services.http
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_mdwe,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
