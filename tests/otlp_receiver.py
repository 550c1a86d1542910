"""A real OTLP/HTTP endpoint on loopback, for tests that must see what leaves the process.

In-memory exporters prove what the SDK was handed; only a server proves that the
OTLP exporter chosen from the ``OTEL_*`` environment actually delivers it, with
the endpoint, headers and encoding the environment asked for. This server speaks
the OTLP/HTTP binary protocol (``POST /v1/traces`` and ``/v1/metrics`` with
``application/x-protobuf``, optionally gzip-compressed), decodes every request
with the ``opentelemetry-proto`` messages and keeps them for assertions.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

PROTOBUF = "application/x-protobuf"


def any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as the plain Python value it carries."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP ``repeated KeyValue`` as a dict (arrays become lists)."""
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as delivered, with the resource and scope it was delivered under."""

    resource: dict[str, Any]
    scope: str
    span: Span

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)


@dataclass(frozen=True)
class ReceivedMetric:
    """One metric as delivered, with the resource it was delivered under."""

    resource: dict[str, Any]
    scope: str
    metric: Metric

    def points(self) -> list[Any]:
        """The data points, whatever the metric type (sum, gauge, histogram)."""
        kind = self.metric.WhichOneof("data")
        return list(getattr(self.metric, kind).data_points) if kind else []


class OTLPReceiver:
    """A stdlib HTTP server on ``127.0.0.1`` and a free port that stores OTLP exports.

    Use as a context manager; ``endpoint`` is what ``OTEL_EXPORTER_OTLP_ENDPOINT``
    should be set to. Requests it cannot accept are answered with the status an
    OTLP collector would give (404 wrong path, 415 wrong content type, 400 bad body)
    and counted in ``rejected``, so a test can tell "nothing sent" from "sent wrong".
    """

    def __init__(self) -> None:
        self.trace_requests: list[ExportTraceServiceRequest] = []
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        self.request_headers: list[dict[str, str]] = []
        self.rejected: list[tuple[str, int, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            requests = list(self.trace_requests)
        return [
            ReceivedSpan(attributes(rs.resource.attributes), ss.scope.name, span)
            for req in requests
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def metrics(self) -> list[ReceivedMetric]:
        with self._lock:
            requests = list(self.metric_requests)
        return [
            ReceivedMetric(attributes(rm.resource.attributes), sm.scope.name, metric)
            for req in requests
            for rm in req.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        ]

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        """Poll ``condition`` until it holds or the timeout passes (exports are asynchronous)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.02)
        return condition()

    def _store(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        if path == "/v1/traces":
            trace_request = ExportTraceServiceRequest.FromString(body)
            with self._lock:
                self.trace_requests.append(trace_request)
                self.request_headers.append(headers)
            return ExportTraceServiceResponse().SerializeToString()
        metric_request = ExportMetricsServiceRequest.FromString(body)
        with self._lock:
            self.metric_requests.append(metric_request)
            self.request_headers.append(headers)
        return ExportMetricsServiceResponse().SerializeToString()

    def _reject(self, path: str, status: int, why: str) -> None:
        with self._lock:
            self.rejected.append((path, status, why))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path not in ("/v1/traces", "/v1/metrics"):
                    return self._answer(404, b"", why="unknown path")
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if content_type != PROTOBUF:
                    return self._answer(415, b"", why=f"content type {content_type!r}")
                try:
                    encoding = (self.headers.get("Content-Encoding") or "").lower()
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    reply = receiver._store(self.path, body, {k.lower(): v for k, v in self.headers.items()})
                except Exception as error:  # noqa: BLE001 -- any undecodable body is the sender's bug: answer 400
                    return self._answer(400, b"", why=f"undecodable body: {error}")
                return self._answer(200, reply)

            def _answer(self, status: int, body: bytes, why: str = "") -> None:
                if status != 200:
                    receiver._reject(self.path, status, why)
                self.send_response(status)
                self.send_header("Content-Type", PROTOBUF)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Silence the per-request stderr line; tests assert on stored requests instead."""

        return Handler
