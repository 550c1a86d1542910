"""A real rsyslogd on a loopback port, for tests of anything that speaks syslog.

Mocks would only prove that we agree with ourselves; rsyslog is the receiver
most SIEM pipelines put in front of ArcSight/QRadar/Sentinel, so it is the
judge of framing, RFC 5424 headers and TLS. Each :class:`Rsyslog` runs its own
``rsyslogd -n -f CONF -i PIDFILE`` in the foreground with a config written into
a temporary directory: no system-wide config, its own work directory, one input
(``imtcp`` for TCP and TLS, ``imudp`` for UDP) on 127.0.0.1, and two output
files:

* ``raw.log``: ``%rawmsg%`` per line, the message exactly as received, without
  the transport framing (octet count or trailing newline);
* ``messages.jsonl``: ``%jsonmesg%`` per line, the fields rsyslog parsed from
  the RFC 5424 header (pri, timereported, hostname, app-name, procid, msgid,
  structured-data, msg ...).

Control-character escaping on receive is switched off (rsyslog would otherwise
turn LEEF's tab delimiter into ``#011``), and the maximum message size is raised
to 256 KiB so that a large finding is never truncated by the test receiver.

The port is chosen once, so :meth:`Rsyslog.stop` then :meth:`Rsyslog.start`
brings the receiver back at the same address (for "receiver down, then up"
tests of delivery). TLS uses a throwaway CA, server and client certificates
made with the ``openssl`` command-line tool (:class:`TlsFiles`);
:attr:`Rsyslog.ca_file` is the CA for the client to verify against, and
``require_client_cert=True`` makes rsyslog demand a client certificate signed
by that CA (``x509/certvalid``). Requires the ``rsyslog`` package, and
``rsyslog-gnutls`` (or ``rsyslog-openssl``) for TLS; tests skip with that
advice when they are missing.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

Protocol = Literal["tcp", "tls", "udp"]
_MODULE_DIRS = ("/usr/lib/*/rsyslog", "/usr/lib/rsyslog", "/usr/lib64/rsyslog", "/usr/local/lib/rsyslog")


def rsyslogd_path() -> str | None:
    """Where ``rsyslogd`` is (it lives in sbin, often not on a non-root PATH)."""
    return shutil.which("rsyslogd") or next(
        (p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.access(p, os.X_OK)), None
    )


def tls_driver() -> str | None:
    """``gtls`` or ``ossl``: the installed rsyslog TLS network stream driver, if any.

    ``RSYSLOG_TLS_DRIVER=ossl`` (or ``gtls``) picks one when both are installed.
    """
    wanted = os.environ.get("RSYSLOG_TLS_DRIVER")
    for driver in (wanted,) if wanted else ("gtls", "ossl"):
        for pattern in _MODULE_DIRS:
            if glob.glob(f"{pattern}/lmnsd_{driver}.so"):
                return driver
    return None


def require_rsyslog(protocol: Protocol) -> None:
    """Skip the calling test, saying what to install, when rsyslog (or its TLS driver) is missing."""
    if rsyslogd_path() is None:
        pytest.skip("rsyslogd not installed: apt-get install -y rsyslog")
    if protocol == "tls" and tls_driver() is None:
        pytest.skip("no rsyslog TLS driver installed: apt-get install -y rsyslog-gnutls (or rsyslog-openssl)")


def free_port(kind: int) -> int:
    """A loopback port that is free right now for ``kind`` (SOCK_STREAM or SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway PKI: one CA, a server certificate and a client certificate signed by it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA plus server (``localhost``/``127.0.0.1``) and client certificates, via the openssl CLI.

    EC P-256 keys keep it fast (well under a second).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl command-line tool not installed: apt-get install -y openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands: list[list[object]] = [
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", "2",
         "-subj", "/CN=inferwatch test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
    ]
    for role, usage, names in (("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                               ("client", "clientAuth", "DNS:inferwatch-agent")):
        ext = directory / f"{role}.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n"
            f"subjectAltName={names}\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n"
        )
        cn = names.split(",")[0].removeprefix("DNS:")
        commands += [
            [openssl, "req", *ec, "-keyout", directory / f"{role}.key", "-out", directory / f"{role}.csr",
             "-subj", f"/CN={cn}"],
            [openssl, "x509", "-req", "-in", directory / f"{role}.csr", "-CA", ca_cert, "-CAkey", ca_key,
             "-CAcreateserial", "-out", directory / f"{role}.pem", "-days", "2", "-extfile", ext],
        ]
    for command in commands:
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=30)
    return TlsFiles(ca_cert, directory / "server.pem", directory / "server.key",
                    directory / "client.pem", directory / "client.key")


def _complete_lines(path: Path) -> list[bytes]:
    """The newline-terminated lines of a file rsyslog may be writing to right now."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data.split(b"\n")[:-1]


class Rsyslog:
    """One rsyslogd listening on ``127.0.0.1:port`` (see the module docstring)."""

    def __init__(self, tmp_path: Path, protocol: Protocol = "tcp", require_client_cert: bool = False):
        require_rsyslog(protocol)
        if require_client_cert and protocol != "tls":
            raise ValueError("require_client_cert needs protocol 'tls'")
        self.require_client_cert = require_client_cert
        self.protocol: Protocol = protocol
        self.directory = tmp_path / f"rsyslog-{protocol}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.work_dir = self.directory / "work"
        self.work_dir.mkdir(exist_ok=True)
        self.raw_file = self.directory / "raw.log"
        self.json_file = self.directory / "messages.jsonl"
        self.config_file = self.directory / "rsyslog.conf"
        self.pid_file = self.directory / "rsyslogd.pid"
        self.log_file = self.directory / "rsyslogd.stderr"
        self.port = free_port(socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM)
        self.tls: TlsFiles | None = make_tls_files(self.directory / "tls") if protocol == "tls" else None
        self.config_file.write_text(self._config())
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path | None:
        """The CA a TLS client should trust to verify this receiver (None unless TLS)."""
        return self.tls.ca_cert if self.tls else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> str:
        globals_ = [
            f'workDirectory="{self.work_dir}"',
            'maxMessageSize="256k"',
            'parser.escapeControlCharactersOnReceive="off"',
        ]
        if self.protocol == "udp":
            inputs = ['module(load="imudp")', f'input(type="imudp" address="127.0.0.1" port="{self.port}")']
        else:
            module = ['module(load="imtcp"']
            if self.protocol == "tls":
                driver = tls_driver()
                assert self.tls is not None
                globals_ += [
                    f'defaultNetstreamDriver="{driver}"',
                    f'defaultNetstreamDriverCAFile="{self.tls.ca_cert}"',
                    f'defaultNetstreamDriverCertFile="{self.tls.server_cert}"',
                    f'defaultNetstreamDriverKeyFile="{self.tls.server_key}"',
                ]
                # x509/certvalid: the client must present a certificate signed by our CA.
                auth_mode = "x509/certvalid" if self.require_client_cert else "anon"
                module += [f'streamDriver.name="{driver}"', 'streamDriver.mode="1"',
                           f'streamDriver.authMode="{auth_mode}"']
            inputs = [" ".join(module) + ")", f'input(type="imtcp" address="127.0.0.1" port="{self.port}")']
        return "\n".join([
            "global(" + " ".join(globals_) + ")",
            *inputs,
            'template(name="raw" type="string" string="%rawmsg%\\n")',
            'template(name="fields" type="string" string="%jsonmesg%\\n")',
            f'action(type="omfile" file="{self.raw_file}" template="raw")',
            f'action(type="omfile" file="{self.json_file}" template="fields")',
            "",
        ])

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout_s: float = 15.0) -> None:
        """Start rsyslogd and return once it listens on :attr:`port`."""
        if self.running:
            return
        self.pid_file.unlink(missing_ok=True)
        with self.log_file.open("ab") as stderr:
            self._process = subprocess.Popen(
                [rsyslogd_path() or "rsyslogd", "-n", "-f", str(self.config_file), "-i", str(self.pid_file)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
            )
        deadline = time.monotonic() + timeout_s
        while not self._listening():
            if self._process.poll() is not None:
                raise RuntimeError(f"rsyslogd exited with {self._process.returncode}: {self.log_file.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rsyslogd did not listen on {self.address} within {timeout_s} s: "
                                   f"{self.log_file.read_text()}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop rsyslogd (SIGTERM, then SIGKILL); its output files stay readable."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Rsyslog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listening(self) -> bool:
        """Whether the port is bound, read from /proc so that probing sends rsyslog nothing."""
        table, state = ("/proc/net/udp", "07") if self.protocol == "udp" else ("/proc/net/tcp", "0A")
        wanted = f"0100007F:{self.port:04X}"
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:  # no procfs: fall back to a TCP connect (harmless to rsyslog)
            if self.protocol == "udp":
                time.sleep(0.5)
                return True
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        return any(row.split()[1] == wanted and row.split()[3] == state for row in rows)

    # -- what it received ----------------------------------------------------

    def lines(self) -> list[bytes]:
        """Every message received so far, as raw bytes (one per line, framing removed)."""
        return _complete_lines(self.raw_file)

    def messages(self) -> list[dict[str, Any]]:
        """Every message received so far, as the fields rsyslog parsed (``%jsonmesg%``)."""
        return [json.loads(line) for line in _complete_lines(self.json_file)]

    def wait_for_lines(self, count: int, timeout_s: float = 10.0) -> list[bytes]:
        """Wait until at least ``count`` messages were written (rsyslog writes asynchronously)."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = self.lines()
            if len(lines) >= count and len(self.messages()) >= count:
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"rsyslog wrote {len(lines)} of {count} expected messages "
                                     f"within {timeout_s} s; its stderr: {self.log_file.read_text()}")
            time.sleep(0.02)
