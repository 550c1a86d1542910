"""Splunk HTTP Event Collector sink: OCSF findings as HEC events.

Wire format (Splunk "Format events for HTTP Event Collector"): one
``POST {url}/services/collector/event`` per batch with ``Authorization: Splunk
<token>``; the body is the batch's event envelopes concatenated with no comma
and no separator::

    {"time":1763877600.25,"host":"h","source":"inferwatch","sourcetype":"inferwatch:ocsf","event":{...}}{"time":...}

``event`` is the OCSF Detection Finding object; ``time`` is epoch seconds with
milliseconds. Responses, as Splunk documents them:

* 200 -> delivered (with indexer acknowledgement on: once ``/services/collector/ack``
  says the ``ackId`` is indexed).
* 400 with ``invalid-event-number`` N -> event N is malformed: it is dropped and
  counted, the other events are sent again at once. HEC may already have
  indexed the events before N; resending them trades a possible duplicate
  (recognisable by ``finding_info.uid``) for never losing one.
* 401 / 403 (bad, missing or disabled token) and 400 "Incorrect index" ->
  :class:`~connectors.sink.SinkConfigurationError`: the delivery layer stops
  this sink and keeps its findings spooled until the configuration is fixed.
* 429, 5xx (503 "server is busy"), timeouts, refused connections -> FAILURE,
  retried by the delivery layer with backoff.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections.abc import Sequence
from http.client import HTTPException
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from agent.findings import Finding
from agent.ocsf import to_ocsf
from connectors._http import HttpClient, HttpSinkOptions, render_each, status_is_retryable
from connectors.formats.ocsf_json import dumps_compact
from connectors.sink import ExportResult, Sink, SinkConfigurationError

log = logging.getLogger(__name__)

EVENT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
_INCORRECT_INDEX = 7  # HEC status code "Incorrect index"


class SplunkHecOptions(HttpSinkOptions):
    type: Literal["splunk_hec"] = "splunk_hec"
    token: SecretStr = Field(description="the HEC token; write ${HEC_TOKEN} so it stays out of the file")
    index: str | None = Field(None, description="target index; None = the token's default index")
    source: str = "inferwatch"
    sourcetype: str = "inferwatch:ocsf"
    host: str = Field(default_factory=socket.gethostname, description="the envelope's host field")
    use_ack: bool = Field(False, description="wait for indexer acknowledgement before reporting success")
    channel: str | None = Field(None, description="X-Splunk-Request-Channel GUID; generated when None")
    ack_timeout_s: float = Field(30.0, gt=0)
    ack_poll_interval_s: float = Field(0.5, gt=0)

    @field_validator("channel")
    @classmethod
    def _guid(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                uuid.UUID(v)
            except ValueError:
                raise ValueError(f"channel must be a GUID like {uuid.uuid4()}, got {v!r}") from None
        return v


class SplunkHecSink(Sink):
    type_name = "splunk_hec"
    Options = SplunkHecOptions

    def __init__(self, options: SplunkHecOptions):
        super().__init__(options)
        self.options: SplunkHecOptions = options
        self._client = HttpClient(options, self.name)
        self._channel = options.channel or (str(uuid.uuid4()) if options.use_ack else None)
        self.counters: dict[str, int] = {"rejected_events": 0, "unrenderable": 0}

    def envelope(self, finding: Finding) -> dict[str, Any]:
        """The HEC event envelope of one finding."""
        o = self.options
        env: dict[str, Any] = {
            "time": finding.time_ms / 1000,
            "host": o.host,
            "source": o.source,
            "sourcetype": o.sourcetype,
        }
        if o.index is not None:
            env["index"] = o.index
        env["event"] = to_ocsf(finding)
        return env

    def _render(self, finding: Finding) -> bytes:
        return dumps_compact(self.envelope(finding)).encode("utf-8", "replace")

    def _headers(self) -> dict[str, str]:
        h = {"Authorization": f"Splunk {self.options.token.get_secret_value()}", "Content-Type": "application/json"}
        if self._channel:
            h["X-Splunk-Request-Channel"] = self._channel
        return h

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        pending, skipped = render_each(list(findings), self._render, self.name)
        self.counters["unrenderable"] += skipped
        # Each 400 names one bad event and removes it, so this ends within len(pending) + 1 requests.
        while pending:
            try:
                resp = self._client.post(EVENT_PATH, b"".join(b for _, b in pending), self._headers())
            except (OSError, HTTPException) as exc:
                log.warning("sink %s: HEC request failed: %s: %s", self.name, type(exc).__name__, exc)
                return ExportResult.FAILURE
            reply = _json(resp.body)
            if resp.status == 200:
                if reply.get("code") != 0:  # HEC's documented success is {"text":"Success","code":0}
                    log.warning("sink %s: HTTP 200 without HEC's success body (%r); not counted as delivered, "
                                "retrying (is a proxy answering for Splunk?)", self.name, resp.body[:120])
                    return ExportResult.FAILURE
                if self.options.use_ack:
                    return self._wait_for_ack(reply.get("ackId"))
                return ExportResult.SUCCESS
            if resp.status in (401, 403):
                raise SinkConfigurationError(
                    f"Splunk HEC at {self.options.url} refused the token (HTTP {resp.status}: "
                    f"{reply.get('text', '')!s}); check `token` and that the token is enabled"
                )
            if resp.status == 400:
                bad = reply.get("invalid-event-number")
                if isinstance(bad, int) and 0 <= bad < len(pending):
                    finding = pending.pop(bad)[0]
                    self.counters["rejected_events"] += 1
                    log.error(
                        "sink %s: Splunk HEC rejected finding %s (%s): %s; dropped, resending the other %d",
                        self.name,
                        finding.uid,
                        finding.detector,
                        reply.get("text"),
                        len(pending),
                    )
                    continue
                hint = (
                    "check `index` is allowed for this token"
                    if reply.get("code") == _INCORRECT_INDEX
                    else "the request itself was refused"
                )
                raise SinkConfigurationError(
                    f"Splunk HEC at {self.options.url} answered 400 {reply.get('text', '')!s}; {hint}"
                )
            if status_is_retryable(resp.status):
                log.warning(
                    "sink %s: Splunk HEC answered %d %s; will retry", self.name, resp.status, reply.get("text", "")
                )
                return ExportResult.FAILURE
            raise SinkConfigurationError(
                f"Splunk HEC at {self.options.url}{EVENT_PATH} answered HTTP {resp.status}; check `url` "
                "(it is the collector's base URL, e.g. https://splunk:8088)"
            )
        return ExportResult.SUCCESS

    def _wait_for_ack(self, ack_id: Any) -> ExportResult:
        """Poll ``/services/collector/ack`` until the batch is indexed; FAILURE on timeout (resent later)."""
        if not isinstance(ack_id, int):
            raise SinkConfigurationError(
                f"Splunk HEC at {self.options.url} returned no ackId although use_ack is on; enable "
                "indexer acknowledgement on the token or set use_ack: false"
            )
        deadline = time.monotonic() + self.options.ack_timeout_s
        body = json.dumps({"acks": [ack_id]}).encode()
        while True:
            try:
                resp = self._client.post(ACK_PATH, body, self._headers())
            except (OSError, HTTPException) as exc:
                log.warning("sink %s: HEC ack poll failed: %s", self.name, exc)
                return ExportResult.FAILURE
            if resp.status == 200 and _json(resp.body).get("acks", {}).get(str(ack_id)) is True:
                return ExportResult.SUCCESS
            if resp.status != 200 and not status_is_retryable(resp.status):
                raise SinkConfigurationError(
                    f"Splunk HEC at {self.options.url}{ACK_PATH} answered HTTP {resp.status}; check use_ack"
                )
            if time.monotonic() >= deadline:
                log.warning(
                    "sink %s: ackId %d not indexed within %.0f s; the batch will be sent again",
                    self.name,
                    ack_id,
                    self.options.ack_timeout_s,
                )
                return ExportResult.FAILURE
            time.sleep(self.options.ack_poll_interval_s)

    def shutdown(self) -> None:
        self._client.close()


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
