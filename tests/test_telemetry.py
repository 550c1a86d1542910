"""Telemetry: the batch span, its links and events, the metrics, and real OTLP/HTTP export.

Most tests inject the SDK's in-memory span exporter and metric reader; the
``TestOTLPExport`` tests let ``Telemetry`` build its exporters from the
``OTEL_*`` environment and deliver to a real OTLP/HTTP server on loopback
(``tests/otlp_receiver.py``).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import ValidationError

from agent import telemetry as telemetry_module
from agent.findings import Finding, Severity
from agent.records import RawRecord
from agent.telemetry import FINDING_EVENT, BatchScope, Telemetry, TelemetryOptions, exporter_names
from tests.otlp_receiver import OTLPReceiver, ReceivedMetric, attributes

INFERENCE = "inferwatch.inference"
FEEDBACK = "inferwatch.feedback"
GROUP = "inferwatch-agent"


def traceparent(trace_id: int, span_id: int) -> bytes:
    return f"00-{trace_id:032x}-{span_id:016x}-01".encode()


def records(topic: str = INFERENCE, partition: int = 0, offsets: range = range(100, 105),
            headers: Callable[[int], tuple[tuple[str, bytes], ...]] = lambda i: ()) -> list[RawRecord]:
    return [RawRecord(topic, partition, off, b"{}", headers=headers(i)) for i, off in enumerate(offsets)]


def finding(**overrides: Any) -> Finding:
    values: dict[str, Any] = dict(
        family="extraction", detector="query-flood", title="Model extraction campaign",
        severity=Severity.HIGH, actor="tenant-7", model="digits-cnn", related_ids=("req-1", "req-2"),
        window="w-1", attacks=("AML.T0024.002",))
    values.update(overrides)
    return Finding(**values)


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* setting of the machine running the tests may leak into them; warnings start fresh."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(telemetry_module, "_warned", set())


class Memory:
    """A Telemetry wired to in-memory exporters, and accessors for what they hold."""

    def __init__(self, options: TelemetryOptions | None = None):
        self.spans_out = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_out))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(options or TelemetryOptions(), GROUP, tracer_provider=self.tracer_provider,
                                   meter_provider=self.meter_provider)

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.spans_out.get_finished_spans()

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of metric ``name`` at this moment."""
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        found += [(dict(p.attributes), p) for p in metric.data.data_points]
        return found

    def value(self, name: str, **attrs: Any) -> Any:
        """The value of the one data point of ``name`` whose attributes include ``attrs``."""
        matches = [p for a, p in self.points(name) if all(a.get(k) == v for k, v in attrs.items())]
        assert len(matches) == 1, f"{name} {attrs}: {len(matches)} points in {self.points(name)}"
        return matches[0].value


@pytest.fixture
def memory() -> Iterator[Memory]:
    m = Memory()
    yield m
    m.telemetry.shutdown()
    m.tracer_provider.shutdown()
    m.meter_provider.shutdown()


# -- the batch span ------------------------------------------------------------------------------


def test_batch_span_follows_kafka_messaging_conventions(memory: Memory) -> None:
    with memory.telemetry.batch(records(partition=3, offsets=range(100, 105))) as scope:
        scope.events(n_inference=5, n_feedback=0)

    (span,) = memory.spans()
    assert span.name == f"process {INFERENCE}"
    assert span.kind is SpanKind.CONSUMER
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes) == {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": INFERENCE,
        "messaging.consumer.group.name": GROUP,
        "messaging.destination.partition.id": "3",
        "messaging.kafka.offset": 100,
        "inferwatch.kafka.offset.last": 104,
        "messaging.batch.message_count": 5,
        "inferwatch.batch.events.inference": 5,
        "inferwatch.batch.events.feedback": 0,
    }


def test_offsets_are_first_and_last_even_when_records_arrive_unordered(memory: Memory) -> None:
    batch = [RawRecord(INFERENCE, 0, off, b"{}") for off in (7, 3, 9, 5)]
    with memory.telemetry.batch(batch):
        pass
    (span,) = memory.spans()
    assert span.attributes["messaging.kafka.offset"] == 3
    assert span.attributes["inferwatch.kafka.offset.last"] == 9


def test_batch_over_several_topics_omits_the_destination_as_the_conventions_say(memory: Memory) -> None:
    batch = records(INFERENCE, 0, range(10, 12)) + records(FEEDBACK, 1, range(4, 7))
    with memory.telemetry.batch(batch):
        pass

    (span,) = memory.spans()
    assert span.name == "process"
    attrs = dict(span.attributes)
    for absent in ("messaging.destination.name", "messaging.destination.partition.id", "messaging.kafka.offset"):
        assert absent not in attrs
    assert attrs["messaging.batch.message_count"] == 5
    assert list(attrs["inferwatch.kafka.topics"]) == [FEEDBACK, INFERENCE]
    assert list(attrs["inferwatch.kafka.offset_ranges"]) == [f"{FEEDBACK}/1:4-6", f"{INFERENCE}/0:10-11"]


def test_two_partitions_of_one_topic_keep_the_destination_but_not_the_partition(memory: Memory) -> None:
    with memory.telemetry.batch(records(INFERENCE, 0, range(3)) + records(INFERENCE, 1, range(8, 10))):
        pass
    (span,) = memory.spans()
    assert span.name == f"process {INFERENCE}"
    assert span.attributes["messaging.destination.name"] == INFERENCE
    assert "messaging.destination.partition.id" not in span.attributes
    assert list(span.attributes["inferwatch.kafka.offset_ranges"]) == [f"{INFERENCE}/0:0-2", f"{INFERENCE}/1:8-9"]


def test_an_empty_batch_is_a_process_span_without_destination(memory: Memory) -> None:
    with memory.telemetry.batch([]):
        pass
    (span,) = memory.spans()
    assert span.name == "process"
    assert span.attributes["messaging.batch.message_count"] == 0
    assert "messaging.destination.name" not in span.attributes


def test_an_error_in_the_batch_marks_the_span_and_propagates(memory: Memory) -> None:
    with pytest.raises(RuntimeError, match="detector blew up"), memory.telemetry.batch(records()):
        raise RuntimeError("detector blew up")

    (span,) = memory.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "RuntimeError"
    assert [e.name for e in span.events] == ["exception"]
    ((attrs, point),) = memory.points("messaging.process.duration")
    assert attrs["error.type"] == "RuntimeError" and point.count == 1


# -- links ---------------------------------------------------------------------------------------


def test_links_to_each_distinct_traceparent_with_per_message_attributes(memory: Memory) -> None:
    contexts = [(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331), (0x1234, 0x5678)]

    def headers(i: int) -> tuple[tuple[str, bytes], ...]:
        if i == 4:
            return ()  # a record without a trace
        trace_id, span_id = contexts[i % 2]
        extra = (("tracestate", b"vendor=abc"),) if i == 0 else ()
        return (("traceparent", traceparent(trace_id, span_id)), *extra)

    with memory.telemetry.batch(records(partition=2, offsets=range(50, 55), headers=headers)):
        pass

    (span,) = memory.spans()
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == contexts
    first, second = span.links
    assert first.context.is_remote
    assert first.context.trace_state.get("vendor") == "abc"
    assert dict(first.attributes) == {"messaging.destination.name": INFERENCE,
                                      "messaging.destination.partition.id": "2", "messaging.kafka.offset": 50}
    assert second.attributes["messaging.kafka.offset"] == 51
    assert "inferwatch.links.dropped" not in span.attributes
    assert "inferwatch.traceparent.invalid" not in span.attributes


@pytest.mark.parametrize("garbage", [
    b"garbage",
    b"\xff\xfe\x00",
    b"00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
    b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero span id
    b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",   # span id one digit short
    b"",
])
def test_garbage_traceparent_makes_no_link(memory: Memory, garbage: bytes) -> None:
    with memory.telemetry.batch(records(headers=lambda i: (("traceparent", garbage),))):
        pass
    (span,) = memory.spans()
    assert span.links == ()
    assert span.attributes["inferwatch.traceparent.invalid"] == 1  # five records, one distinct bad header


def test_links_are_capped_and_the_rest_counted() -> None:
    m = Memory(TelemetryOptions(max_span_links=16))
    batch = records(offsets=range(40), headers=lambda i: (("traceparent", traceparent(1000 + i, 7)),))
    with m.telemetry.batch(batch):
        pass
    (span,) = m.spans()
    assert len(span.links) == 16
    assert [link.context.trace_id for link in span.links] == list(range(1000, 1016))
    assert span.attributes["inferwatch.links.dropped"] == 24


# -- findings and metrics ------------------------------------------------------------------------


def test_one_span_event_per_finding(memory: Memory) -> None:
    drift = finding(family="drift", detector="mmd-drift", severity=Severity.MEDIUM, actor=None,
                    attacks=(), window="w-2", related_ids=("req-9",))
    with memory.telemetry.batch(records()) as scope:
        scope.finding(finding())
        scope.finding(drift)

    (span,) = memory.spans()
    assert [e.name for e in span.events] == [FINDING_EVENT, FINDING_EVENT]
    extraction, drifted = (dict(e.attributes) for e in span.events)
    assert extraction == {
        "inferwatch.finding.uid": finding().uid,
        "inferwatch.finding.family": "extraction",
        "inferwatch.finding.detector": "query-flood",
        "inferwatch.finding.severity": "high",
        "inferwatch.finding.severity_id": 4,
        "inferwatch.finding.title": "Model extraction campaign",
        "inferwatch.finding.related_count": 2,
        "inferwatch.finding.actor": "tenant-7",
        "inferwatch.finding.model": "digits-cnn",
        "inferwatch.finding.atlas.technique": "AML.T0024.002",
        "inferwatch.finding.atlas.techniques": ("AML.T0024.002",),
    }
    assert drifted["inferwatch.finding.uid"] == drift.uid
    assert "inferwatch.finding.actor" not in drifted  # no actor: left out, not an empty string
    assert "inferwatch.finding.atlas.technique" not in drifted  # plain drift has no ATLAS technique
    assert span.attributes["inferwatch.batch.findings"] == 2


def test_metric_values(memory: Memory) -> None:
    t = memory.telemetry
    with t.batch(records(INFERENCE, 0, range(6)) + records(FEEDBACK, 1, range(2))) as scope:
        scope.events(n_inference=5, n_feedback=2)
        scope.dead_lettered(1, "json")
        scope.finding(finding())
        scope.finding(finding(window="w-2"))
        scope.finding(finding(family="evasion", severity=Severity.CRITICAL, attacks=("AML.T0015",)))
        scope.detector_latency("query-flood", 0.003)
        scope.detector_latency("query-flood", 0.020)
        scope.detector_latency("mahalanobis", 0.5)
    with t.batch(records(INFERENCE, 0, range(6, 10))) as scope:
        scope.events(n_inference=3, n_feedback=0)
        scope.dead_lettered(1, "json")
        scope.dead_lettered(0, "schema")  # nothing dead-lettered: nothing counted
    t.delivery_failure("splunk-hec")
    t.delivery_failure("splunk-hec", 2)

    consumed = "messaging.client.consumed.messages"
    assert memory.value(consumed, **{"messaging.destination.name": INFERENCE,
                                     "messaging.destination.partition.id": "0",
                                     "messaging.consumer.group.name": GROUP}) == 10
    assert memory.value(consumed, **{"messaging.destination.name": FEEDBACK}) == 2
    assert memory.value("inferwatch.events.processed", **{"inferwatch.event.kind": "inference"}) == 8
    assert memory.value("inferwatch.events.processed", **{"inferwatch.event.kind": "feedback"}) == 2
    assert [(a, p.value) for a, p in memory.points("inferwatch.records.dead_lettered")] == [
        ({"inferwatch.dead_letter.reason": "json"}, 2)]
    assert memory.value("inferwatch.findings", **{"inferwatch.finding.family": "extraction",
                                                   "inferwatch.finding.severity": "high"}) == 2
    assert memory.value("inferwatch.findings", **{"inferwatch.finding.family": "evasion",
                                                   "inferwatch.finding.severity": "critical"}) == 1
    flood = next(p for a, p in memory.points("inferwatch.detector.duration")
                 if a == {"inferwatch.detector.name": "query-flood"})
    assert flood.count == 2 and flood.sum == pytest.approx(0.023)
    # the advisory buckets are in seconds: 3 ms and 20 ms land in different, sub-second buckets
    assert flood.explicit_bounds[0] == 0.0005 and sum(flood.bucket_counts[:7]) == 2
    assert memory.value("inferwatch.sink.delivery.failures", **{"inferwatch.sink.name": "splunk-hec"}) == 3
    # one series per destination: the two-topic batch has none, the one-topic batch names its topic
    durations = {a.get("messaging.destination.name"): p.count for a, p in memory.points("messaging.process.duration")}
    assert durations == {None: 1, INFERENCE: 1}


def test_gauges_read_the_pipelines_callbacks(memory: Memory) -> None:
    lag = {(INFERENCE, 0): 120, (INFERENCE, 1): 0, (FEEDBACK, 0): 7}
    queues = {"splunk-hec": 42}
    memory.telemetry.observe_lag(lambda: lag)
    memory.telemetry.observe_sink_queue(lambda: queues)

    assert memory.value("inferwatch.consumer.lag", **{"messaging.destination.name": INFERENCE,
                                                      "messaging.destination.partition.id": "0",
                                                      "messaging.consumer.group.name": GROUP}) == 120
    assert memory.value("inferwatch.consumer.lag", **{"messaging.destination.name": FEEDBACK}) == 7
    assert memory.value("inferwatch.sink.queue.depth", **{"inferwatch.sink.name": "splunk-hec"}) == 42
    lag[(INFERENCE, 0)] = 3  # a gauge reports the value at collection time
    assert memory.value("inferwatch.consumer.lag", **{"messaging.destination.name": INFERENCE,
                                                      "messaging.destination.partition.id": "0"}) == 3


def test_a_failing_gauge_callback_is_logged_once_and_skipped(memory: Memory, caplog) -> None:
    def broken() -> dict[tuple[str, int], int]:
        raise ConnectionError("broker gone")

    memory.telemetry.observe_lag(broken)
    memory.telemetry.observe_sink_queue(lambda: {"file": 1})
    with caplog.at_level(logging.WARNING, logger="agent.telemetry"):
        for _ in range(3):
            assert memory.points("inferwatch.consumer.lag") == []
            assert memory.value("inferwatch.sink.queue.depth", **{"inferwatch.sink.name": "file"}) == 1
    warnings = [r for r in caplog.records if "broker gone" in r.getMessage()]
    assert len(warnings) == 1


def test_exporter_log_lines_are_rate_limited_with_a_count_of_what_was_held() -> None:
    limiter = telemetry_module._RateLimitedLog(interval_s=0.2)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("opentelemetry.exporter.x", logging.WARNING, __file__, 1, msg, ("c:4318",), None)

    first = record("Transient error %s")
    assert limiter.filter(first)
    assert [limiter.filter(record("Transient error %s")) for _ in range(5)] == [False] * 5
    assert limiter.filter(record("Failed to export batch"))  # a different problem is reported at once
    time.sleep(0.25)
    later = record("Transient error %s")
    assert limiter.filter(later)
    assert later.getMessage() == "Transient error c:4318 (5 similar messages held back in the last 0.2 s)"


# -- configuration -------------------------------------------------------------------------------


def test_options_reject_unknown_keys_and_bad_values() -> None:
    assert TelemetryOptions().model_dump() == {"enabled": True, "service_name": "inferwatch",
                                               "metric_export_interval_s": None, "max_span_links": 128,
                                               "shutdown_timeout_s": 5.0}
    with pytest.raises(ValidationError, match="endpoint"):
        TelemetryOptions.model_validate({"endpoint": "http://collector:4318"})
    with pytest.raises(ValidationError, match="metric_export_interval_s"):
        TelemetryOptions(metric_export_interval_s=0)


def test_disabled_telemetry_emits_nothing_even_with_providers() -> None:
    m = Memory(TelemetryOptions(enabled=False))
    assert not m.telemetry.tracing_enabled and not m.telemetry.metrics_enabled
    with m.telemetry.batch(records(headers=lambda i: (("traceparent", traceparent(1, 2)),))) as scope:
        scope.finding(finding())
    m.telemetry.delivery_failure("x")
    assert m.spans() == ()
    assert m.points("inferwatch.findings") == []


def test_otel_sdk_disabled_switches_everything_off(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    t = Telemetry(TelemetryOptions(), GROUP)
    assert (t.tracing_enabled, t.metrics_enabled) == (False, False)
    t.shutdown()


def test_no_endpoint_configured_means_no_op_and_no_cost() -> None:
    t = Telemetry(TelemetryOptions(), GROUP)
    assert (t.tracing_enabled, t.metrics_enabled) == (False, False)
    assert exporter_names("traces") == [] and exporter_names("metrics") == []
    with t.batch(records()) as scope:
        scope.finding(finding())
        scope.events(5, 0)
    t.shutdown()
    t.shutdown()  # idempotent


@pytest.mark.parametrize(("env", "traces", "metrics"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp_proto_http"], ["otlp_proto_http"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp_proto_http"], []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, [], ["otlp_proto_http"]),
    ({"OTEL_TRACES_EXPORTER": "console,otlp", "OTEL_METRICS_EXPORTER": "console"},
     ["console", "otlp_proto_http"], ["console"]),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, ["otlp_proto_grpc"], []),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, [], []),
])
def test_exporter_selection_from_the_standard_environment(monkeypatch, env, traces, metrics) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert exporter_names("traces") == traces
    assert exporter_names("metrics") == metrics


def test_misconfigured_exporter_is_logged_once_and_the_agent_goes_on(monkeypatch, caplog) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")  # the gRPC exporter is not installed
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "no-such-exporter")
    with caplog.at_level(logging.WARNING, logger="agent.telemetry"):
        first = Telemetry(TelemetryOptions(), GROUP)
        second = Telemetry(TelemetryOptions(), GROUP)
    for t in (first, second):
        assert (t.tracing_enabled, t.metrics_enabled) == (False, False)
        with t.batch(records()) as scope:
            scope.finding(finding())
        t.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("otlp_proto_grpc" in m for m in messages) == 1, messages
    assert sum("no-such-exporter" in m and "OTEL_METRICS_EXPORTER" in m for m in messages) == 1, messages


def test_console_exporter_chosen_by_environment_prints_the_span(tmp_path) -> None:
    """In a fresh interpreter: the SDK's console exporter binds sys.stdout when it is imported."""
    script = (
        "from agent.records import RawRecord\n"
        "from agent.telemetry import Telemetry, TelemetryOptions\n"
        "t = Telemetry(TelemetryOptions(), 'g')\n"
        "assert t.trace_exporters == ('console',) and not t.metrics_enabled, (t.trace_exporters, t.metrics_enabled)\n"
        f"with t.batch([RawRecord({INFERENCE!r}, 0, 1, b'{{}}')]):\n"
        "    pass\n"
        "t.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="none",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f'"name": "process {INFERENCE}"' in done.stdout and '"kind": "SpanKind.CONSUMER"' in done.stdout


# -- a real OTLP/HTTP endpoint -------------------------------------------------------------------


def _metric(received: list[ReceivedMetric], name: str) -> ReceivedMetric:
    matches = [m for m in received if m.metric.name == name]
    assert len(matches) == 1, f"{name}: {[m.metric.name for m in received]}"
    return matches[0]


@pytest.mark.integration
class TestOTLPExport:
    @pytest.mark.parametrize("compression", ["none", "gzip"])
    def test_spans_and_metrics_reach_a_real_otlp_http_endpoint(self, monkeypatch, compression) -> None:
        with OTLPReceiver() as receiver:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=s3cret")
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", compression)
            t = Telemetry(TelemetryOptions(metric_export_interval_s=60), GROUP)
            assert t.trace_exporters == ("otlp_proto_http",) and t.metric_exporters == ("otlp_proto_http",)
            t.observe_lag(lambda: {(INFERENCE, 0): 17})
            batch = records(partition=1, offsets=range(200, 204),
                            headers=lambda i: (("traceparent", traceparent(0xABC0 + i, 0x10 + i)),))
            with t.batch(batch) as scope:
                scope.events(4, 0)
                scope.finding(finding())
                scope.detector_latency("query-flood", 0.004)
            started = time.monotonic()
            t.shutdown()
            assert time.monotonic() - started < 5

            assert receiver.rejected == []
            (received,) = receiver.spans()
            span = received.span
            assert span.name == f"process {INFERENCE}"
            assert span.kind == span.SPAN_KIND_CONSUMER
            assert received.resource["service.name"] == "inferwatch"
            assert received.scope == "inferwatch"
            assert received.attributes["messaging.destination.partition.id"] == "1"
            assert received.attributes["messaging.kafka.offset"] == 200
            assert received.attributes["messaging.batch.message_count"] == 4
            assert [int.from_bytes(link.trace_id, "big") for link in span.links] == [0xABC0 + i for i in range(4)]
            assert [int.from_bytes(link.span_id, "big") for link in span.links] == [0x10 + i for i in range(4)]
            (event,) = span.events
            assert event.name == FINDING_EVENT
            assert attributes(event.attributes)["inferwatch.finding.uid"] == finding().uid

            metrics = receiver.metrics()
            consumed = _metric(metrics, "messaging.client.consumed.messages")
            assert [p.as_int for p in consumed.points()] == [4]
            assert consumed.metric.sum.is_monotonic
            lag = _metric(metrics, "inferwatch.consumer.lag")
            assert [(attributes(p.attributes)["messaging.destination.name"], p.as_int) for p in lag.points()] == [
                (INFERENCE, 17)]
            (latency,) = _metric(metrics, "inferwatch.detector.duration").points()
            assert latency.count == 1 and latency.sum == pytest.approx(0.004)
            assert _metric(metrics, "inferwatch.findings").points()[0].as_int == 1
            assert all(h.get("x-collector-token") == "s3cret" for h in receiver.request_headers)
            assert all(h["content-type"] == "application/x-protobuf" for h in receiver.request_headers)
            assert {h.get("content-encoding") for h in receiver.request_headers} == (
                {"gzip"} if compression == "gzip" else {None})

    def test_service_name_from_the_environment_wins_over_the_default(self, monkeypatch) -> None:
        with OTLPReceiver() as receiver:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{receiver.endpoint}/v1/traces")
            monkeypatch.setenv("OTEL_SERVICE_NAME", "fraud-model-sidecar")
            t = Telemetry(TelemetryOptions(), GROUP)
            assert not t.metrics_enabled  # only the traces endpoint was configured
            with t.batch(records()):
                pass
            t.shutdown()
            explicit = Telemetry(TelemetryOptions(service_name="from-yaml"), GROUP)
            with explicit.batch(records()):
                pass
            explicit.shutdown()
            assert [s.resource["service.name"] for s in receiver.spans()] == ["fraud-model-sidecar", "from-yaml"]

    def test_unreachable_endpoint_costs_a_bounded_shutdown_and_no_crash(self, monkeypatch) -> None:
        with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        t = Telemetry(TelemetryOptions(shutdown_timeout_s=1.0), GROUP)
        with t.batch(records()) as scope:
            scope.finding(finding())
        started = time.monotonic()
        t.shutdown()  # the OTLP exporter alone retries for up to 10 s per signal here
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"shutdown took {elapsed:.2f} s"


# -- cost ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("traced", [False, True], ids=["no-traceparent", "traceparent-per-record"])
def test_batch_overhead_500_records(benchmark, traced: bool) -> None:
    """What one batch span costs the pipeline (report: ``pytest -k overhead --benchmark-only``)."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    t = Telemetry(TelemetryOptions(), GROUP, tracer_provider=tracer_provider,
                  meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]))
    batch = [RawRecord(INFERENCE, i % 3, 1000 + i, b"{}",
                       headers=(("traceparent", traceparent(i + 1, i + 7)),) if traced else ())
             for i in range(500)]
    one = finding()

    def process() -> BatchScope:
        with t.batch(batch) as scope:
            scope.events(len(batch), 0)
            scope.finding(one)
            scope.detector_latency("query-flood", 0.001)
        return scope

    scope = benchmark.pedantic(process, rounds=100, warmup_rounds=5)
    span = scope.span
    assert len(span.links) == (128 if traced else 0)
    assert span.attributes.get("inferwatch.links.dropped", 0) == (372 if traced else 0)
    t.shutdown()
    tracer_provider.shutdown()
