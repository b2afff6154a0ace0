"""A real etcd cluster for tests: N members of Debian's etcd-server on 127.0.0.1.

Each member gets free client and peer ports and a data dir under the given directory;
`kill(i)` (SIGKILL), `stop(i)` (SIGTERM), `start(i)` (the same member again, on its data
dir) act by PID; `close()` ends every PID it started, always. Raft timings are fast
(heartbeat 50 ms, election 500 ms) so a cluster is up in about a second. `tls=EtcdTls(...)`
serves the client URLs over TLS with client-certificate auth (peers stay plain http).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.helpers import free_port, need_tool

START_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # A test run killed hard leaves no etcd behind (the kernel sends SIGKILL).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class EtcdTls:
    """PEM files: the CA, the server's cert/key (IP SAN 127.0.0.1) and a client cert/key."""

    ca_file: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls(directory: Path, *, name: str = "test") -> EtcdTls:
    """A self-made CA with a server certificate for 127.0.0.1 and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} etcd CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(cn: str, usage: list[x509.ObjectIdentifier], stem: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        )
        cert = builder.sign(ca_key, hashes.SHA256())
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, directory / f"{stem}-key.pem")

    # etcd 3.4's JSON gateway dials its own gRPC server with the server certificate as a
    # client certificate: without clientAuth too, every gateway request is refused.
    leaf("127.0.0.1", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], "server")
    leaf("appliance", [ExtendedKeyUsageOID.CLIENT_AUTH], "client")
    d = str(directory)
    return EtcdTls(
        ca_file=f"{d}/ca.pem",
        server_cert=f"{d}/server.pem",
        server_key=f"{d}/server-key.pem",
        client_cert=f"{d}/client.pem",
        client_key=f"{d}/client-key.pem",
    )


@dataclass
class _Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None


class EtcdCluster:
    def __init__(
        self,
        directory: Path,
        size: int = 3,
        *,
        tls: EtcdTls | None = None,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
    ) -> None:
        self.binary = need_tool("etcd")
        self.directory = directory
        self.tls = tls
        self._timing = (heartbeat_ms, election_ms)
        directory.mkdir(parents=True, exist_ok=True)
        self.members: list[_Member] = []
        used: set[int] = set()
        for i in range(size):
            ports: list[int] = []
            while len(ports) < 2:
                p = free_port()
                if p not in used:
                    used.add(p)
                    ports.append(p)
            self.members.append(
                _Member(
                    f"m{i}",
                    ports[0],
                    ports[1],
                    directory / f"m{i}.etcd",
                    directory / f"m{i}.log",
                )
            )
        self.initial_cluster = ",".join(
            f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members
        )
        self.token = f"rig-{os.getpid()}-{time.monotonic_ns()}"

    # -- addresses

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def endpoint(self, i: int) -> str:
        return f"{self.scheme}://127.0.0.1:{self.members[i].client_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(i) for i in range(len(self.members))]

    def pid(self, i: int) -> int | None:
        proc = self.members[i].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- lifecycle

    def start_all(self) -> EtcdCluster:
        try:
            for i in range(len(self.members)):
                self._spawn(i)
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def start(self, i: int, *, wait: bool = True) -> None:
        """(Re)start member i on its data dir (etcd then ignores the --initial-* flags)."""
        if self.pid(i) is not None:
            raise RuntimeError(f"etcd member {i} is running")
        self._spawn(i)
        if wait:
            self.wait_ready(only=[i])

    def kill(self, i: int) -> None:
        """SIGKILL member i by its PID and reap it."""
        self._signal(i, signal.SIGKILL)

    def stop(self, i: int) -> None:
        """SIGTERM member i (SIGKILL after 5 s) and reap it."""
        self._signal(i, signal.SIGTERM)

    def close(self) -> None:
        for i in range(len(self.members)):
            # Every member, whatever one of them does.
            with contextlib.suppress(Exception):
                self._signal(i, signal.SIGKILL)

    def __enter__(self) -> EtcdCluster:
        return self.start_all()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, i: int) -> None:
        m = self.members[i]
        heartbeat, election = self._timing
        args = [
            self.binary,
            "--name",
            m.name,
            "--data-dir",
            str(m.data_dir),
            "--listen-client-urls",
            self.endpoint(i),
            "--advertise-client-urls",
            self.endpoint(i),
            "--listen-peer-urls",
            f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-token",
            self.token,
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            str(heartbeat),
            "--election-timeout",
            str(election),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            "--enable-pprof=false",
        ]
        if self.tls:
            args += [
                "--cert-file",
                self.tls.server_cert,
                "--key-file",
                self.tls.server_key,
                "--trusted-ca-file",
                self.tls.ca_file,
                "--client-cert-auth",
            ]
        if m.log is not None:
            m.log.close()
        m.log = open(m.log_path, "ab")  # noqa: SIM115 -- lives as long as the member
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        m.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=m.log,
            stderr=m.log,
            env=env,
            preexec_fn=_die_with_parent,
        )

    def _signal(self, i: int, sig: signal.Signals) -> None:
        m = self.members[i]
        proc = m.proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            m.proc = None
        if m.log is not None:
            m.log.close()
            m.log = None

    # -- readiness

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls.ca_file)
        ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return ctx

    def member_status(self, i: int, timeout: float = 1.0) -> dict[str, object] | None:
        """/v3/maintenance/status of member i, or None when it does not answer."""
        req = urllib.request.Request(
            self.endpoint(i) + "/v3/maintenance/status", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl()) as r:
                answer: dict[str, object] = json.loads(r.read())
                return answer
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def leader_index(self) -> int | None:
        """Which member leads now (by the members' own answers), None when none is known."""
        ids: dict[str, int] = {}
        leader: str | None = None
        for i in range(len(self.members)):
            if self.pid(i) is None:
                continue
            st = self.member_status(i, timeout=0.5)
            if st is None:
                continue
            header = st.get("header")
            if isinstance(header, dict):
                ids[str(header.get("member_id"))] = i
            if st.get("leader"):
                leader = str(st["leader"])
        return ids.get(leader) if leader else None

    def wait_ready(self, only: list[int] | None = None, timeout: float = START_TIMEOUT) -> None:
        """Until every running member (or `only`) answers status with a leader; bounded."""
        deadline = time.monotonic() + timeout
        targets = only if only is not None else list(range(len(self.members)))
        while True:
            pending = []
            for i in targets:
                proc = self.members[i].proc
                if proc is None or proc.poll() is not None:
                    raise RuntimeError(f"etcd member {i} exited:\n{self.log_tail(i)}")
                st = self.member_status(i, timeout=0.5)
                if st is None or not st.get("leader"):
                    pending.append(i)
            if not pending:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(self.log_tail(i) for i in pending)
                raise RuntimeError(f"etcd members {pending} not ready in {timeout} s:\n{tails}")
            time.sleep(0.05)

    def log_tail(self, i: int, lines: int = 15) -> str:
        try:
            text = self.members[i].log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
