"""Generic webhook sink: ``POST`` a JSON array of OCSF findings to any URL.

For SOAR tools, chat bridges and in-house receivers. The body is
``[{ocsf finding},{ocsf finding},...]`` (compact JSON, UTF-8, ``Content-Type:
application/json``). Extra ``headers`` (e.g. a bearer token from ``${VAR}``)
are sent as configured and masked in every repr.

With ``hmac_secret`` set, the ``signature_header`` (default
``X-Inferwatch-Signature-256``) carries ``sha256=<hex HMAC-SHA256 of the exact
body bytes>``, GitHub's webhook scheme, so the receiver can verify that the
findings came from this agent unaltered: compute the HMAC of the raw body
and compare with ``hmac.compare_digest``.

2xx is success; 408, 429 and 5xx are retried; any other answer (401, 403,
404, 400 ...) will not get better by retrying and stops the sink
(:class:`~connectors.sink.SinkConfigurationError`); its findings stay spooled.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence
from http.client import HTTPException
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from agent import __version__
from agent.findings import Finding
from connectors._http import HttpClient, HttpSinkOptions, render_each, status_is_retryable
from connectors.formats import ocsf_json
from connectors.sink import ExportResult, Sink, SinkConfigurationError

log = logging.getLogger(__name__)

_RESERVED = {"content-length", "content-type", "host", "transfer-encoding"}


def signature(secret: bytes, body: bytes) -> str:
    """The signature header value for ``body``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookOptions(HttpSinkOptions):
    type: Literal["webhook"] = "webhook"
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="extra request headers")
    hmac_secret: SecretStr | None = Field(None, description="sign each body with HMAC-SHA256; ${WEBHOOK_SECRET}")
    signature_header: str = "X-Inferwatch-Signature-256"

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name in v:
            if name.lower() in _RESERVED:
                raise ValueError(f"header {name!r} is set by the sink itself; remove it")
            if not name or any(c in name for c in " :\r\n"):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
        return v


class WebhookSink(Sink):
    type_name = "webhook"
    Options = WebhookOptions

    def __init__(self, options: WebhookOptions):
        super().__init__(options)
        self.options: WebhookOptions = options
        self._client = HttpClient(options, self.name)
        self.counters: dict[str, int] = {"unrenderable": 0}

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        pairs, skipped = render_each(list(findings), ocsf_json.render, self.name)
        self.counters["unrenderable"] += skipped
        if not pairs:
            return ExportResult.SUCCESS
        body = b"[" + b",".join(b for _, b in pairs) + b"]"
        o = self.options
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"inferwatch/{__version__}",
            **{k: v.get_secret_value() for k, v in o.headers.items()},
        }
        if o.hmac_secret is not None:
            headers[o.signature_header] = signature(o.hmac_secret.get_secret_value().encode(), body)
        try:
            resp = self._client.post("", body, headers)
        except (OSError, HTTPException) as exc:
            log.warning("sink %s: webhook request failed: %s: %s", self.name, type(exc).__name__, exc)
            return ExportResult.FAILURE
        if 200 <= resp.status < 300:
            return ExportResult.SUCCESS
        if status_is_retryable(resp.status):
            log.warning("sink %s: webhook answered %d; will retry", self.name, resp.status)
            return ExportResult.FAILURE
        raise SinkConfigurationError(
            f"webhook {o.url} answered HTTP {resp.status} {resp.body[:200]!r}; retrying will not help: "
            "check url, headers and hmac_secret"
        )

    def shutdown(self) -> None:
        self._client.close()
