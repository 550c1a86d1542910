"""Elasticsearch sink: findings as ECS documents through the ``_bulk`` API.

Wire format (Elasticsearch "Bulk API"): ``POST {url}/_bulk`` with
``Content-Type: application/x-ndjson``; the body is one action line and one
document line per finding, every line ending in ``\\n`` (the last one too)::

    {"create":{"_index":"inferwatch-findings","_id":"iw-..."}}
    {"@timestamp":"...","event":{"kind":"alert",...},...}

``create`` with ``_id`` = the finding's uid makes delivery idempotent: a batch
sent twice (a retry after a timeout, a replay after a crash) gives ``409``
for the copies, counted as already delivered; it also works on data streams,
which accept only ``create``. A 200 answer can still hold per-item failures
(``"errors": true``): 429/5xx items make the call a FAILURE (the delivery layer
resends, the delivered ones answer 409); other item errors (mapping
conflicts) drop that finding, counted and logged. 401/403 and a 404 for the
endpoint are configuration errors; 429/5xx/timeouts are retried.
Authentication: ``api_key`` (``Authorization: ApiKey <base64 id:key>``, as
Kibana shows it) or ``username``/``password`` (basic).
"""

from __future__ import annotations

import base64
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from http.client import HTTPException
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from agent.findings import Finding
from connectors._http import HttpClient, HttpSinkOptions, render_each, status_is_retryable
from connectors.formats import ecs
from connectors.formats.ocsf_json import dumps_compact
from connectors.sink import ExportResult, Sink, SinkConfigurationError

log = logging.getLogger(__name__)

BULK_PATH = "/_bulk"
_REMEMBER_REJECTED = 10_000


class ElasticOptions(HttpSinkOptions):
    type: Literal["elastic"] = "elastic"
    index: str = Field("inferwatch-findings", description="index, alias or data stream to create documents in")
    api_key: SecretStr | None = Field(None, description="encoded API key (base64 of id:key); ${ELASTIC_API_KEY}")
    username: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _auth(self) -> ElasticOptions:
        if self.api_key is not None and self.username is not None:
            raise ValueError("give either api_key or username/password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.index != self.index.lower() or any(c in self.index for c in ' "*\\<|,>/?'):
            raise ValueError(
                f"index {self.index!r} is not a valid Elasticsearch index name (lowercase, "
                'no spaces or " * \\ < | , > / ?)'
            )
        return self


class ElasticSink(Sink):
    type_name = "elastic"
    Options = ElasticOptions

    def __init__(self, options: ElasticOptions):
        super().__init__(options)
        self.options: ElasticOptions = options
        self._client = HttpClient(options, self.name)
        self._rejected: OrderedDict[str, None] = OrderedDict()  # uids Elasticsearch refused for good
        self.counters: dict[str, int] = {"rejected_documents": 0, "already_indexed": 0, "unrenderable": 0}

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/x-ndjson"}
        o = self.options
        if o.api_key is not None:
            h["Authorization"] = f"ApiKey {o.api_key.get_secret_value()}"
        elif o.username is not None and o.password is not None:
            pair = f"{o.username}:{o.password.get_secret_value()}".encode()
            h["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        return h

    def _render(self, finding: Finding) -> bytes:
        action = dumps_compact({"create": {"_index": self.options.index, "_id": finding.uid}}).encode()
        return action + b"\n" + ecs.render(finding) + b"\n"

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        todo = [f for f in findings if f.uid not in self._rejected]
        pairs, skipped = render_each(todo, self._render, self.name)
        self.counters["unrenderable"] += skipped
        if not pairs:
            return ExportResult.SUCCESS
        try:
            resp = self._client.post(BULK_PATH, b"".join(b for _, b in pairs), self._headers())
        except (OSError, HTTPException) as exc:
            log.warning("sink %s: bulk request failed: %s: %s", self.name, type(exc).__name__, exc)
            return ExportResult.FAILURE
        if resp.status in (401, 403):
            raise SinkConfigurationError(
                f"Elasticsearch at {self.options.url} refused the credentials (HTTP {resp.status}); check "
                "api_key or username/password and that they may create documents in "
                f"{self.options.index!r}"
            )
        if status_is_retryable(resp.status):
            log.warning("sink %s: Elasticsearch answered %d; will retry", self.name, resp.status)
            return ExportResult.FAILURE
        if resp.status != 200:
            raise SinkConfigurationError(
                f"Elasticsearch at {self.options.url}{BULK_PATH} answered HTTP {resp.status}: "
                f"{resp.body[:300]!r}; check `url`" + (" or lower delivery batch_size" if resp.status == 413 else "")
            )
        try:
            reply = json.loads(resp.body)
        except ValueError:
            log.warning("sink %s: Elasticsearch answered 200 with a body that is not JSON; will retry", self.name)
            return ExportResult.FAILURE
        if not reply.get("errors"):
            return ExportResult.SUCCESS
        return self._item_results(reply.get("items", []), [f for f, _ in pairs])

    def _item_results(self, items: list[dict[str, Any]], sent: list[Finding]) -> ExportResult:
        retry = 0
        for finding, item in zip(sent, items):
            result = next(iter(item.values()), {}) if isinstance(item, dict) else {}
            status = int(result.get("status", 500))
            if status < 300:
                continue
            if status == 409:
                self.counters["already_indexed"] += 1
            elif status_is_retryable(status):
                retry += 1
            else:
                self.counters["rejected_documents"] += 1
                self._rejected[finding.uid] = None
                while len(self._rejected) > _REMEMBER_REJECTED:
                    self._rejected.popitem(last=False)
                error = result.get("error", {})
                log.error(
                    "sink %s: Elasticsearch rejected finding %s (%s): %s %s; dropped",
                    self.name,
                    finding.uid,
                    finding.detector,
                    error.get("type"),
                    error.get("reason"),
                )
        if len(items) < len(sent):
            retry += len(sent) - len(items)
        if retry:
            log.warning(
                "sink %s: %d of %d documents were throttled or failed on the server; will retry",
                self.name,
                retry,
                len(sent),
            )
            return ExportResult.FAILURE
        return ExportResult.SUCCESS

    def shutdown(self) -> None:
        self._client.close()
