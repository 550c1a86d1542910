"""A TLS-protected Kafka endpoint for tests: a test CA made with the ``openssl`` CLI, and a TLS terminator.

Why a terminator and not Tansu's own TLS: the Tansu 0.6.0 binary we pin rejects
``--cert`` together with ``--key`` ("the argument '--cert <CERT>' cannot be used
with '--key <KEY>'", a clap argument-group bug), and with ``--cert`` alone (cert
and key in one PEM) it listens but never completes a TLS handshake. So the
agent's TLS client (kafka-python ``ssl_cafile``, hostname check on) is verified
against a real TLS server here — Python's ``ssl`` module, TLS 1.2+ — that
forwards the decrypted bytes to a real Tansu broker which advertises the
terminator's port, exactly like a TLS load balancer in front of a cluster.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.broker import EmbeddedBroker, free_port


@dataclass(frozen=True)
class TestCA:
    """Paths of a throw-away CA and a server certificate it signed for 127.0.0.1/localhost."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_test_ca(directory: Path, name: str = "inferwatch-test-ca") -> TestCA:
    """Create a CA and a server certificate (SAN IP:127.0.0.1, DNS:localhost) with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", f"/CN={name}", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.cnf", cwd=directory)
    return TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy bytes from ``src`` to ``dst`` until either side closes, then close both (a TCP proxy's half)."""
    try:
        while chunk := src.recv(1 << 16):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class TlsTerminator:
    """Accept TLS on a loopback port and relay the plaintext to ``127.0.0.1:upstream_port``.

    One thread per direction per connection; the test traffic is a handful of connections.
    """

    def __init__(self, ca: TestCA, upstream_port: int, port: int | None = None):
        self.port = port or free_port()
        self.upstream_port = upstream_port
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ctx.load_cert_chain(str(ca.server_cert), str(ca.server_key))
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self.handshake_failures = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tls-terminator", daemon=True)

    def start(self) -> TlsTerminator:
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            tls = self._ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_failures += 1  # e.g. the client did not trust our CA: it closes the handshake
            raw.close()
            return
        tls.settimeout(None)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:
            tls.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=pump, args=(upstream, tls), daemon=True).start()
        pump(tls, upstream)

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        self._thread.join(timeout=2)


@dataclass(frozen=True)
class SecureBroker:
    """Where a test's agent connects: TLS ``bootstrap`` and the CA that signed the server certificate."""

    bootstrap: str
    ca: TestCA


def secure_broker(directory: Path, *, authentication: bool = False) -> Iterator[SecureBroker]:
    """Start Tansu (optionally with ``--authentication``) behind a TLS terminator; yield, then stop both."""
    ca = make_test_ca(directory / "pki")
    tls_port = free_port()
    broker = EmbeddedBroker(log_path=directory / "tansu.log", advertised_port=tls_port,
                            authentication=authentication).start()
    terminator = TlsTerminator(ca, broker.port, tls_port).start()
    try:
        yield SecureBroker(f"127.0.0.1:{tls_port}", ca)
    finally:
        terminator.stop()
        broker.stop()
