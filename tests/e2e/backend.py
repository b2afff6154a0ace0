"""A stand-in for a master's kube-apiserver: HTTPS on :6443 with /readyz.

It is a real TLS server (Python's ssl with a self-signed certificate made by
cryptography), not a fake of the load balancer: the appliance's health checks GET
/readyz on it like they would on an apiserver, and clients reach it through the
load balancer's VIP. Every request is recorded (path and peer) for the test.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def self_signed(dest: Path, name: str, ip: str) -> tuple[Path, Path]:
    """An RSA key and a certificate for `name` and `ip`, valid for a day.

    RSA, as OpenShift's apiserver certificates are.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(IPv4Address(ip))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = dest / f"{name}.crt", dest / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass(frozen=True)
class Request:
    path: str
    peer: str


class ApiBackend:
    """Serves HTTPS on an already bound listening socket, in a thread, until closed."""

    def __init__(self, listener: socket.socket, name: str, cert: Path, key: Path) -> None:
        self.listener = listener
        self.name = name
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        # busybox's own TLS client sends no signature_algorithms extension, which means
        # SHA-1 signatures in TLS 1.2 (RFC 5246 7.4.1.4.1); Go's crypto/tls in a real
        # apiserver takes that, OpenSSL only at security level 0.
        self.context.set_ciphers("DEFAULT:@SECLEVEL=0")
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.listener.settimeout(0.2)
        self.thread = threading.Thread(target=self._serve, name=f"backend-{name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn, peer), daemon=True).start()

    def _one(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        conn.settimeout(10)
        hello = b""
        try:
            # The ClientHello, kept for the error message if the handshake fails.
            hello = conn.recv(2048, socket.MSG_PEEK)
            with self.context.wrap_socket(conn, server_side=True) as tls:
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 16384:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
                path = parts[1] if len(parts) >= 2 else ""
                with self.lock:
                    self.requests.append(Request(path, peer[0]))
                body = f"E2E-BACKEND {self.name} {path}".encode()
                if path == "/readyz":
                    body = b"ok"
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
        except (OSError, ssl.SSLError) as exc:
            with self.lock:
                self.errors.append(f"{peer[0]}: {exc} hello={hello.hex()}")
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def seen(self, prefix: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        self.thread.join(timeout=5)
