"""Syslog sink: findings as CEF or LEEF in RFC 5424 messages, over TCP, TLS or UDP.

The way most SIEMs (ArcSight, QRadar, Sentinel's AMA, any rsyslog/syslog-ng
relay) take third-party alerts. Each finding is one message::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - CEF:0|...

``PRI`` is ``facility * 8 + severity`` (OCSF Critical -> syslog crit(2), High ->
err(3), Medium -> warning(4), Low -> notice(5), Informational -> info(6));
``TIMESTAMP`` is the finding's time in RFC 3339 UTC with milliseconds; ``MSGID``
is the finding family; there is no structured data. MSG carries no UTF-8 BOM:
RFC 5424 allows MSG-ANY, and CEF/LEEF receivers expect the payload to start
with ``CEF:``/``LEEF:``.

Transport framing: over TCP, RFC 6587 octet-counting (``LEN SP MSG``) by
default, or newline framing for old receivers (safe, because CEF and LEEF
renderings never contain a line break); over TLS, RFC 5425 makes
octet-counting mandatory; over UDP (RFC 5426) one datagram per message.

Delivery semantics (the contract with ``agent/delivery.py``, which wraps every
sink with retries, backoff, spooling and dedup): :meth:`SyslogSink.export` makes
one delivery attempt and returns ``SUCCESS`` only when every message of the
call was written to the socket. Before each write the kept TCP/TLS connection
is checked (a syslog receiver never sends application data, so a readable
socket means the session ended):

- closed cleanly (FIN, no reset): the receiver read everything it got before it
  closed (a receiver that closes with bytes unread resets the connection
  instead); the sink reconnects and writes;
- answered with data, or reset: bytes already written may never have been read.
  TCP syslog has no acknowledgement, so the findings written on that connection
  in the last ``resend_window_s`` are handed back to the delivery layer
  (:meth:`SyslogSink.reclaim`), which spools them and sends them again (at least
  once: the same ``finding_info.uid``), and the call fails.

If writing on a kept connection fails, the sink reconnects once and re-sends
the whole call. :meth:`SyslogSink.force_flush` waits out the window of the last
write, so a session rejected right after it is noticed too.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.findings import Finding, Severity
from connectors.formats import cef, leef
from connectors.formats.ecs import iso8601_ms
from connectors.sink import ExportResult, Sink, SinkConfigurationError, SinkOptions

log = logging.getLogger(__name__)

FACILITIES: dict[str, int] = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    "ntp": 12,
    "audit": 13,
    "alert": 14,
    "clock": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}

# OCSF severity -> RFC 5424 severity (0 emerg ... 7 debug). emerg/alert are left
# to the system itself: a model under attack is not an unusable host.
SYSLOG_SEVERITY: dict[Severity, int] = {
    Severity.CRITICAL: 2,
    Severity.HIGH: 3,
    Severity.MEDIUM: 4,
    Severity.LOW: 5,
    Severity.INFORMATIONAL: 6,
}

_NILVALUE = "-"
# TLS alerts by which a receiver rejects our client certificate (or its absence):
# retrying cannot help until someone fixes cert_file/key_file or the receiver's CA.
_CLIENT_CERT_REJECTED = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED",
}
_TLS_CONFIRM_S = 0.25  # how long a new TLS 1.3 session waits for a late rejection (see _confirm_tls_session)
# Findings kept for re-sending, at most: a rate of alerts that fills it within resend_window_s is a flood that
# the delivery layer's dedup and rate limit are for; past it the oldest are no longer kept.
_RESEND_MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class _Written:
    """One export call's findings, written on the current connection at ``at`` (monotonic seconds)."""

    at: float
    findings: tuple[Finding, ...]
    nbytes: int


def _printable_ascii(value: str) -> bool:
    """RFC 5424 header fields are PRINTUSASCII (33-126): no spaces, no control chars."""
    return bool(value) and all(33 <= ord(ch) <= 126 for ch in value)


def header_token(value: str, max_len: int) -> str:
    """Make a value usable as an RFC 5424 header field: keep PRINTUSASCII, cut to length."""
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:max_len]
    return cleaned or _NILVALUE


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` -> ``(host, port)``; raises ValueError saying what is wrong."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {address!r} must be HOST:PORT, e.g. 127.0.0.1:6514 or [::1]:6514")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"address {address!r}: write an IPv6 address in brackets, e.g. [::1]:6514")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"address {address!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


class SyslogOptions(SinkOptions):
    """``sinks: [{type: syslog, address: "siem.example:6514", protocol: tls, format: cef}]``."""

    type: Literal["syslog"]
    address: str = Field(description="HOST:PORT of the syslog receiver")
    protocol: Literal["tcp", "tls", "udp"] = "tcp"
    format: Literal["cef", "leef"] = "cef"
    framing: Literal["octet-counting", "newline"] = "octet-counting"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify: bool = True
    server_name: str | None = None
    app_name: str = "inferwatch"
    hostname: str | None = Field(default=None, description="default: this machine's FQDN")
    facility: int = Field(default=FACILITIES["local0"], description="0-23 or a name such as local0")
    timeout_s: float = Field(default=5.0, gt=0)
    resend_window_s: float = Field(
        default=1.0, ge=0, le=60,
        description="TCP/TLS: findings written in the last this many seconds are sent again (via the spool) when "
                    "the receiver turns out to have rejected the session (it answered with data or reset the "
                    "connection); 0: off",
    )
    vendor: str = cef.DEFAULT_VENDOR
    product: str = cef.DEFAULT_PRODUCT
    leef_delimiter: str = leef.DEFAULT_DELIMITER
    max_related_ids: int = Field(default=cef.DEFAULT_MAX_RELATED_IDS, ge=0)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("facility", mode="before")
    @classmethod
    def _facility(cls, value: object) -> int:
        if isinstance(value, str) and not value.strip().isdigit():
            name = value.strip().lower()
            if name not in FACILITIES:
                raise ValueError(f"unknown syslog facility {value!r}; use 0-23 or one of {', '.join(FACILITIES)}")
            return FACILITIES[name]
        number = int(value)  # type: ignore[call-overload]
        if not 0 <= number <= 23:
            raise ValueError(f"syslog facility {number} is out of range; use 0-23 or a name such as local0")
        return number

    @field_validator("app_name")
    @classmethod
    def _app_name(cls, value: str) -> str:
        if not _printable_ascii(value) or len(value) > 48:
            raise ValueError(f"app_name {value!r} must be 1-48 printable ASCII characters without spaces (RFC 5424)")
        return value

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str | None) -> str | None:
        if value is not None and (not _printable_ascii(value) or len(value) > 255):
            raise ValueError(f"hostname {value!r} must be 1-255 printable ASCII characters without spaces (RFC 5424)")
        return value

    @field_validator("vendor", "product")
    @classmethod
    def _header_text(cls, value: str) -> str:
        if not value or any(ch in value for ch in "|\\\r\n\t"):
            raise ValueError(f"{value!r} must be non-empty and contain no '|', '\\\\', tab or line break")
        return value

    @field_validator("leef_delimiter")
    @classmethod
    def _leef_delimiter(cls, value: str) -> str:
        return leef.check_delimiter(value)

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist or is not a file")
        return value

    @model_validator(mode="after")
    def _transport_consistency(self) -> SyslogOptions:
        tls_fields = [
            name for name in ("ca_file", "cert_file", "key_file", "server_name") if getattr(self, name) is not None
        ]
        if self.protocol != "tls":
            if tls_fields:
                raise ValueError(
                    f"{', '.join(tls_fields)} only apply to protocol: tls "
                    f"(protocol is {self.protocol}); remove them or set protocol: tls"
                )
            if not self.verify:
                raise ValueError(f"verify only applies to protocol: tls (protocol is {self.protocol})")
        if self.protocol == "tls" and self.framing != "octet-counting":
            raise ValueError("framing must be octet-counting with protocol: tls (RFC 5425 requires it)")
        if self.protocol == "udp" and self.framing != "octet-counting":
            raise ValueError("framing does not apply to protocol: udp (one message per datagram); remove it")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the client certificate it belongs to)")
        return self


class SyslogSink(Sink):
    """Findings to a syslog receiver as RFC 5424 + CEF/LEEF (see the module docstring)."""

    type_name = "syslog"
    Options = SyslogOptions

    def __init__(self, options: SyslogOptions):
        super().__init__(options)
        self.options: SyslogOptions = options
        self._host, self._port = parse_address(options.address)
        self._hostname = options.hostname or header_token(socket.getfqdn(), 255)
        self._socket: socket.socket | None = None
        self._tls_context = self._make_tls_context() if options.protocol == "tls" else None
        self._lock = threading.Lock()  # export and force_flush may come from different threads
        self._unconfirmed: deque[_Written] = deque()  # written on self._socket within the resend window
        self._unconfirmed_bytes = 0
        self._rejected: list[Finding] = []  # for reclaim(): written, then the session was rejected

    # -- rendering ---------------------------------------------------------

    def payload(self, finding: Finding) -> bytes:
        """The CEF or LEEF line of one finding (the syslog MSG part)."""
        o = self.options
        if o.format == "cef":
            return cef.render(finding, vendor=o.vendor, product=o.product, max_related_ids=o.max_related_ids)
        return leef.render(
            finding, vendor=o.vendor, product=o.product, delimiter=o.leef_delimiter, max_related_ids=o.max_related_ids
        )

    def message(self, finding: Finding) -> bytes:
        """One complete RFC 5424 message (unframed)."""
        pri = self.options.facility * 8 + SYSLOG_SEVERITY[finding.severity]
        header = " ".join(
            (
                f"<{pri}>1",
                iso8601_ms(finding.time_ms),
                self._hostname,
                self.options.app_name,
                str(os.getpid()),
                header_token(finding.family, 32),
                _NILVALUE,  # no structured data
            )
        )
        return header.encode("ascii") + b" " + self.payload(finding)

    def frame(self, message: bytes) -> bytes:
        """Frame one message for a stream transport (RFC 6587)."""
        if self.options.framing == "newline":
            return message + b"\n"
        return str(len(message)).encode("ascii") + b" " + message

    # -- transport ---------------------------------------------------------

    def _make_tls_context(self) -> ssl.SSLContext:
        """TLS 1.2+ client context; unreadable PEM files are a configuration error, said as such."""
        o = self.options
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(o.ca_file) if o.ca_file else None)
        except ssl.SSLError as error:
            raise SinkConfigurationError(
                f"syslog sink {self.name}: ca_file {str(o.ca_file)!r} holds no usable PEM certificate ({error})"
            ) from error
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not o.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if o.cert_file is not None:
            try:
                context.load_cert_chain(str(o.cert_file), str(o.key_file) if o.key_file else None)
            except ssl.SSLError as error:
                raise SinkConfigurationError(
                    f"syslog sink {self.name}: cert_file {str(o.cert_file)!r} / key_file {str(o.key_file)!r} "
                    f"are not a PEM certificate and its matching private key ({error})"
                ) from error
        return context

    def _connect(self) -> socket.socket:
        o = self.options
        if o.protocol == "udp":
            # A connected UDP socket: resolves once, and reports ICMP "port unreachable" on a later send.
            family, kind, proto, _, address = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(o.timeout_s)
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self._host, self._port), timeout=o.timeout_s)
        if self._tls_context is None:
            return sock
        try:
            tls = self._tls_context.wrap_socket(sock, server_hostname=o.server_name or self._host)
        except BaseException:
            sock.close()
            raise
        try:
            self._confirm_tls_session(tls)
        except BaseException:
            tls.close()
            raise
        return tls

    def _confirm_tls_session(self, tls: ssl.SSLSocket) -> None:
        """Wait briefly for the receiver to reject the session after a TLS 1.3 handshake.

        In TLS 1.3 the client's handshake ends before the server has checked the
        client certificate, so a receiver that requires one (and does not like
        ours, or got none) answers with an alert only afterwards. Without this
        wait the first batch would be "written" into a session already refused,
        and every retry would lose its batch the same way. A receiver that
        accepts sends nothing (or only session tickets), so the read times out.
        """
        if tls.version() != "TLSv1.3":
            return  # TLS 1.2: the handshake itself already failed on a rejected certificate
        tls.settimeout(min(_TLS_CONFIRM_S, self.options.timeout_s))
        try:
            if tls.recv(1) == b"":
                raise ConnectionResetError(
                    "the syslog receiver closed the TLS session right after the handshake "
                    "(if it requires a client certificate, set cert_file and key_file)"
                )
        except TimeoutError:
            pass  # silence: the session stands
        finally:
            tls.settimeout(self.options.timeout_s)

    def _session_state(self, sock: socket.socket) -> Literal["open", "closed", "rejected"]:
        """How a kept-open stream stands (see the module docstring): ``closed`` when the receiver ended it
        after reading everything it got, ``rejected`` when it answered with data or reset the connection."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return "open"
            sock.setblocking(False)
            try:
                data = sock.recv(1)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""  # TLS ended, with or without close_notify: an end of stream like a FIN
            finally:
                sock.settimeout(self.options.timeout_s)
            if data:
                return "rejected"  # a syslog receiver never sends application data
            # A FIN: and did bytes we wrote after it come back as a reset (SO_ERROR)?
            return "rejected" if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) else "closed"
        except ssl.SSLWantReadError:
            return "open"  # TLS 1.3 session tickets made it readable; nothing is wrong
        except (OSError, ValueError):
            return "rejected"

    def _close(self, graceful: bool = False, rejected: bool = False) -> None:
        """Drop the connection. ``rejected``: what was written on it may be unread, so the findings of the
        resend window go to :meth:`reclaim`; else the receiver had them. ``graceful`` also ends a TLS session
        with close_notify, so the receiver logs a clean close rather than an "unexpected EOF" error."""
        if rejected:
            self._rejected += [f for w in self._unconfirmed for f in w.findings]
        self._unconfirmed.clear()
        self._unconfirmed_bytes = 0
        sock, self._socket = self._socket, None
        if sock is None:
            return
        try:
            if graceful and isinstance(sock, ssl.SSLSocket):
                sock.unwrap()
        except (OSError, ValueError):
            pass
        finally:
            sock.close()

    def _settle(self) -> Literal["open", "closed", "rejected"]:
        """Check the kept session: while open, confirm what the resend window has aged past; else close it,
        handing the window's findings to :meth:`reclaim` when the receiver rejected it."""
        assert self._socket is not None
        state = self._session_state(self._socket)
        if state == "open":
            self._confirm(time.monotonic())
            return state
        if state == "rejected":
            log.warning("syslog sink %s: %s rejected the session (answered with data or reset it); %d finding(s) "
                        "written on it in the last %.1f s will be sent again", self.name, self.options.address,
                        sum(len(w.findings) for w in self._unconfirmed), self.options.resend_window_s)
        self._close(rejected=state == "rejected")
        return state

    def _confirm(self, now: float) -> None:
        """The connection is open now: findings written more than the resend window ago were taken."""
        window = self.options.resend_window_s
        while self._unconfirmed and (now - self._unconfirmed[0].at >= window
                                     or self._unconfirmed_bytes > _RESEND_MAX_BYTES):
            self._unconfirmed_bytes -= self._unconfirmed.popleft().nbytes

    def _written(self, findings: Sequence[Finding], nbytes: int) -> None:
        if self.options.resend_window_s > 0:
            self._unconfirmed.append(_Written(time.monotonic(), tuple(findings), nbytes))
            self._unconfirmed_bytes += nbytes

    def _send_stream(self, data: bytes, findings: Sequence[Finding]) -> bool:
        """Write ``data`` on the kept connection, reconnecting once if the old one broke. False, with
        nothing written, when the old session turns out rejected (its findings are then for reclaim())."""
        reused = False
        if self._socket is not None:
            state = self._settle()
            if state == "rejected":
                return False
            reused = state == "open"
        if self._socket is None:
            self._socket = self._connect()
        try:
            self._socket.sendall(data)
            self._written(findings, len(data))
            return True
        except OSError as error:
            self._close(rejected=True)
            if not reused:
                raise
            log.info(
                "syslog sink %s: connection to %s broke (%s); reconnecting once", self.name, self.options.address, error
            )
        self._socket = self._connect()
        try:
            self._socket.sendall(data)
        except OSError:
            self._close(rejected=True)
            raise
        self._written(findings, len(data))
        return True

    def _send_datagrams(self, messages: list[bytes]) -> None:
        if self._socket is None:
            self._socket = self._connect()
        try:
            for message in messages:
                self._socket.send(message)
        except OSError:
            self._close()
            raise

    # -- Sink --------------------------------------------------------------

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        """One delivery attempt (see the module docstring).

        Raises :class:`SinkConfigurationError` when TLS certificates make delivery
        impossible until the configuration changes (an untrusted or misnamed
        receiver certificate, or our client certificate missing or rejected).
        """
        if not findings:
            return ExportResult.SUCCESS
        messages = [self.message(f) for f in findings]
        with self._lock:
            return self._export(findings, messages)

    def _export(self, findings: Sequence[Finding], messages: list[bytes]) -> ExportResult:
        try:
            if self.options.protocol == "udp":
                self._send_datagrams(messages)
            elif not self._send_stream(b"".join(self.frame(m) for m in messages), findings):
                return ExportResult.FAILURE
        except ssl.SSLCertVerificationError as error:
            self._close(rejected=True)
            raise SinkConfigurationError(
                f"syslog sink {self.name}: the TLS certificate of {self.options.address} was not accepted "
                f"({error.verify_message}); set ca_file to the CA that signed it, server_name to a name in it, "
                "or (for testing only) verify: false"
            ) from error
        except ssl.SSLError as error:
            self._close(rejected=True)
            if error.reason not in _CLIENT_CERT_REJECTED:
                log.warning("syslog sink %s: TLS to %s failed: %s", self.name, self.options.address, error)
                return ExportResult.FAILURE
            raise SinkConfigurationError(
                f"syslog sink {self.name}: {self.options.address} rejected the TLS session ({error.reason}); "
                "it requires a client certificate it trusts: set cert_file and key_file"
            ) from error
        except OSError as error:
            log.warning(
                "syslog sink %s: could not deliver %d finding(s) to %s over %s: %s",
                self.name,
                len(findings),
                self.options.address,
                self.options.protocol,
                error,
            )
            return ExportResult.FAILURE
        return ExportResult.SUCCESS

    def reclaim(self) -> list[Finding]:
        """Findings this sink said were delivered, written on a session the receiver then rejected."""
        with self._lock:
            rejected, self._rejected = self._rejected, []
        return rejected

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (at most ``timeout_s``) until the last write is ``resend_window_s`` old, then check the
        session once more: a receiver that rejects it right after the last write is noticed too. True
        when everything written was taken; False when some of it is for :meth:`reclaim`."""
        with self._lock:
            if self._socket is not None and self._unconfirmed:
                wait = self._unconfirmed[-1].at + self.options.resend_window_s - time.monotonic()
                if wait > 0:
                    select.select([self._socket], [], [], min(wait, max(0.0, timeout_s)))  # wakes on data or FIN
                self._settle()
            return not self._unconfirmed and not self._rejected

    def shutdown(self) -> None:
        """Close the session after a last check (what it finds rejected stays for :meth:`reclaim`)."""
        self.force_flush(self.options.resend_window_s)
        with self._lock:
            if self._unconfirmed:
                log.warning("syslog sink %s: shut down with %d finding(s) written to %s less than %.1f s ago",
                            self.name, sum(len(w.findings) for w in self._unconfirmed), self.options.address,
                            self.options.resend_window_s)
            self._close(graceful=True)
