"""What the HTTP sinks (Splunk HEC, Elastic, webhook) share: options, TLS, one kept-alive connection.

Standard library only (``http.client`` + ``ssl``): three POST-only clients do
not justify a dependency. TLS certificates are verified by default against the
system store or ``ca_file``; ``verify_tls: false`` exists for lab setups and
is logged as a warning every time a sink starts with it.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from agent.findings import Finding
from connectors.sink import SinkOptions

log = logging.getLogger(__name__)


class HttpSinkOptions(SinkOptions):
    """Options every HTTP sink has; each one adds its own and its ``type`` Literal."""

    url: str = Field(description="base URL, e.g. https://splunk.example:8088")
    timeout_s: float = Field(10.0, gt=0, description="connect and read timeout of one request")
    verify_tls: bool = True
    ca_file: Path | None = Field(None, description="PEM bundle to verify the server with, instead of the system's")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL with a host, got {v!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"the URL must not have a query or fragment, got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _ca_file(self) -> HttpSinkOptions:
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file: file {str(self.ca_file)!r} does not exist")
        return self


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    headers: dict[str, str]


class HttpClient:
    """POSTs to one origin over a kept-alive connection, reconnecting when needed.

    Transport errors (refused, reset, timeout, TLS failure) raise ``OSError``
    or ``http.client.HTTPException``; callers turn them into a retryable failure.
    """

    def __init__(self, options: HttpSinkOptions, sink_name: str):
        parts = urlsplit(options.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._timeout = options.timeout_s
        self._context: ssl.SSLContext | None = None
        if self._https:
            self._context = ssl.create_default_context(cafile=str(options.ca_file) if options.ca_file else None)
            if not options.verify_tls:
                log.warning(
                    "sink %s: TLS certificate verification is OFF for %s (verify_tls: false); "
                    "anyone on the path can read and alter findings",
                    sink_name,
                    options.url,
                )
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        conn.connect()
        # http.client writes headers and body in separate send() calls; with Nagle on, the body waits
        # for the peer's delayed ACK (~40 ms on Linux) on every request of a kept-alive connection.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> HttpResponse:
        """POST ``body`` to ``{url}{path}``; one transparent retry when a kept-alive connection went stale."""
        reused = self._conn is not None
        try:
            try:
                return self._post_once(path, body, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                self.close()
                return self._post_once(path, body, headers)
        except BaseException:
            self.close()  # never reuse a connection in an unknown state
            raise

    def _post_once(self, path: str, body: bytes, headers: dict[str, str]) -> HttpResponse:
        if self._conn is None:
            self._conn = self._connect()
        self._conn.request(
            "POST", (self._prefix + path) or "/", body=body, headers={"Content-Length": str(len(body)), **headers}
        )
        resp = self._conn.getresponse()
        data = resp.read()
        if resp.will_close:
            self.close()
        return HttpResponse(resp.status, data, {k.lower(): v for k, v in resp.getheaders()})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def render_each(
    findings: list[Finding] | tuple[Finding, ...], render, sink_name: str
) -> tuple[list[tuple[Finding, bytes]], int]:
    """Render every finding; one that cannot be rendered is logged and skipped, not allowed to jam the batch.

    Returns the rendered pairs and how many were skipped.
    """
    out: list[tuple[Finding, bytes]] = []
    skipped = 0
    for f in findings:
        try:
            out.append((f, render(f)))
        except (ValueError, TypeError) as exc:
            skipped += 1
            log.error(
                "sink %s: finding %s (%s) cannot be rendered and is dropped: %s", sink_name, f.uid, f.detector, exc
            )
    return out, skipped


def status_is_retryable(status: int) -> bool:
    """408 timeout, 429 throttled, 5xx server trouble: worth another attempt later."""
    return status in (408, 429) or status >= 500
