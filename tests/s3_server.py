"""An S3 server on a free loopback port (moto's, in its own process), the durable storage of a Tansu broker.

Tansu 0.6's only durable storage engine in the pinned binary is S3 (``--storage-engine s3://BUCKET/``), configured
by the ``AWS_*`` environment variables that :meth:`S3Server.env` returns; the bucket must exist before the broker
starts. The server runs in a subprocess (not moto's ``ThreadedMotoServer`` in the test process) so that serving the
broker's object traffic does not compete with the test's own producer and consumers for one GIL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.broker import free_port

ACCESS_KEY, SECRET_KEY, REGION = "inferwatch-test", "inferwatch-test-secret", "us-east-1"


class S3Server:
    def __init__(self, log_path: Path | None = None, port: int | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables Tansu's S3 engine reads (object_store's ``AmazonS3Builder::from_env``)."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true"}

    def start(self, timeout_s: float = 30.0) -> S3Server:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto S3 server exited with status {self._proc.returncode} during start-up")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto S3 server did not listen on {self.endpoint} within {timeout_s:.0f} s")

    def create_bucket(self, bucket: str) -> None:
        """``PUT /BUCKET`` (moto does not check request signatures)."""
        req = urllib.request.Request(f"{self.endpoint}/{bucket}", method="PUT", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, resp.status

    def object_count(self, bucket: str) -> int:
        """Keys in ``bucket`` (first page of ListObjectsV2, up to 1,000): evidence that the broker writes there."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/{bucket}?list-type=2", timeout=10) as resp:
                return resp.read().count(b"<Key>")
        except urllib.error.URLError:
            return -1

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A fresh S3 server with the bucket ``tansu`` (storage-engine URL ``s3://tansu/``), stopped at teardown. Its
    ``AWS_*`` variables are set in ``os.environ`` for the test: the embedded broker is a subprocess that inherits
    them. Use it with ``from tests.s3_server import s3_server``."""
    with S3Server(log_path=tmp_path / "moto.log") as s3:
        s3.create_bucket("tansu")
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        yield s3
