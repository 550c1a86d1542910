"""OpenTelemetry traces and metrics for the agent: one CONSUMER span per processed batch.

Why a span per *batch* and not per record: the pipeline works on whole polled
batches (one detector call per batch), so that is the unit of work whose
duration and failure mean something. The requests behind it are reached through
span **links**, one per distinct W3C ``traceparent`` carried in the records'
Kafka headers, as the OTel messaging conventions prescribe for batch
processing (a batch has many producers, so no single parent).

Span shape (OTel messaging semantic conventions, Kafka):

* kind ``CONSUMER``; name ``process <topic>``. For a batch that spans several
  topics the conventions say the ``{destination}`` part of the name, and the
  ``messaging.destination.*`` attributes, are set only when they apply to *every*
  message of the batch, and are otherwise omitted (the span is then named just
  ``process``) with the per-message destination on the links. We do exactly
  that, and list the topics in the custom ``inferwatch.kafka.topics``.
* ``messaging.system=kafka``, ``messaging.operation.name``/``.type`` = ``process``,
  ``messaging.consumer.group.name``, ``messaging.batch.message_count``.
* ``messaging.destination.partition.id`` (a string) and ``messaging.kafka.offset``
  (the first offset) when the batch is from one partition, with the last offset in
  ``inferwatch.kafka.offset.last``; for several partitions the per-partition ranges
  are in ``inferwatch.kafka.offset_ranges`` (``topic/partition:first-last``).
* a link per distinct valid trace context, at most ``max_span_links`` (the SDK's
  own default link limit is 128 too); the distinct header values beyond the cap
  are counted, unparsed, in ``inferwatch.links.dropped``, and invalid headers
  in ``inferwatch.traceparent.invalid``.
* an event ``inferwatch.finding`` per finding.

Exporters come from the standard environment (``OTEL_TRACES_EXPORTER``,
``OTEL_METRICS_EXPORTER``, ``OTEL_EXPORTER_OTLP_*``, ``OTEL_SERVICE_NAME``, ...),
read by the SDK's own exporter classes, found through the same entry points the
SDK's auto-configuration uses. The one deliberate difference from the SDK's
defaults: with no ``OTEL_*_EXPORTER`` and no OTLP endpoint configured, nothing
is exported (instead of retrying ``localhost:4318`` forever), so an agent with
no collector pays nothing for telemetry. ``otlp`` means OTLP/HTTP protobuf
unless ``OTEL_EXPORTER_OTLP_PROTOCOL`` says otherwise (the spec's default; the
Python SDK would pick gRPC, which is not installed).

Telemetry must never take the agent down: a misconfiguration is logged once and
that signal is switched off; a failing gauge callback is logged once and skipped.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_SDK_DISABLED,
)
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field

from agent import __version__
from agent.findings import Finding
from agent.records import RawRecord

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "inferwatch"
FINDING_EVENT = "inferwatch.finding"

# Messaging semantic-convention attribute names (kept here rather than imported
# from opentelemetry.semconv._incubating, a private module path).
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_PARTITION_ID = "messaging.destination.partition.id"
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"
MESSAGING_KAFKA_OFFSET = "messaging.kafka.offset"
MESSAGING_BATCH_COUNT = "messaging.batch.message_count"
ERROR_TYPE = "error.type"

# Bucket boundaries (seconds) for the duration histograms: the OTel semconv
# advice for durations, extended downwards because a detector on a small batch
# takes well under 5 ms and the SDK's default buckets (0, 5, 10, ... 10000) are
# meant for milliseconds.
DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
                      0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
_SIGNAL_ENV = {
    "traces": (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL),
    "metrics": (OTEL_METRICS_EXPORTER, OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, OTEL_EXPORTER_OTLP_METRICS_PROTOCOL),
}
Signal = Literal["traces", "metrics"]

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str, *args: object) -> None:
    """Log a telemetry problem once per process: telemetry trouble must not flood the agent's log."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


class TelemetryOptions(BaseModel):
    """The ``telemetry:`` section of the agent's YAML.

    Where to send telemetry is deliberately *not* here: that is the standard
    ``OTEL_*`` environment, so the same image works under any collector.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Off: no spans or metrics at all. On: exported where the OTEL_* environment says; "
        "a no-op when it names no exporter and no OTLP endpoint.",
    )
    service_name: str = Field(
        default="inferwatch", min_length=1,
        description="service.name resource attribute. When left at the default, OTEL_SERVICE_NAME or "
        "service.name in OTEL_RESOURCE_ATTRIBUTES win; a value written in the YAML always wins.",
    )
    metric_export_interval_s: float | None = Field(
        default=None, gt=0,
        description="Seconds between metric exports; unset means OTEL_METRIC_EXPORT_INTERVAL (ms), else 60 s.",
    )
    max_span_links: int = Field(
        default=128, ge=0,
        description="Links per batch span to the records' traceparent contexts; the rest are counted. "
        "Raising it above 128 also needs OTEL_SPAN_LINK_COUNT_LIMIT, the SDK's own cap.",
    )
    shutdown_timeout_s: float = Field(
        default=5.0, gt=0,
        description="Longest the final flush may hold up the agent's exit when the collector is down "
        "(the OTLP exporter alone would retry for up to OTEL_EXPORTER_OTLP_TIMEOUT per signal).",
    )


class _RateLimitedLog(logging.Filter):
    """Let each distinct message of an exporter's logger through once per ``interval_s``.

    The OTLP exporter logs every failed retry; with the collector down that is
    several lines per export, forever. One line per problem per interval tells
    the operator the same thing, with the count of what was held back.
    """

    def __init__(self, interval_s: float = 600.0):
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, int, str], float] = {}
        self._held: Counter[tuple[str, int, str]] = Counter()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] += 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} similar messages held back in the last {self.interval_s:g} s)"
        return True


_EXPORTER_LOG_FILTER = _RateLimitedLog()


def _quiet_exporter_logs(exporter: object) -> None:
    """Rate-limit the log of the module that defines ``exporter`` (idempotent)."""
    logger = logging.getLogger(type(exporter).__module__)
    if _EXPORTER_LOG_FILTER not in logger.filters:
        logger.addFilter(_EXPORTER_LOG_FILTER)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def exporter_names(signal: Signal) -> list[str]:
    """The exporter entry-point names the environment selects for ``signal``, [] for none.

    ``OTEL_<SIGNAL>_EXPORTER`` as the SDK reads it (comma-separated, ``none``
    disables); unset means ``otlp`` only when an OTLP endpoint is configured.
    """
    exporter_var, signal_endpoint_var, signal_protocol_var = _SIGNAL_ENV[signal]
    raw = os.environ.get(exporter_var, "").strip()
    if not raw:
        endpoint = os.environ.get(signal_endpoint_var) or os.environ.get(OTEL_EXPORTER_OTLP_ENDPOINT)
        raw = "otlp" if endpoint and endpoint.strip() else "none"
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if any(n.lower() == "none" for n in names):
        return []
    resolved = []
    for name in names:
        if name.lower() == "otlp":
            protocol = (os.environ.get(signal_protocol_var) or os.environ.get(OTEL_EXPORTER_OTLP_PROTOCOL)
                        or "http/protobuf").strip().lower()
            if protocol not in _OTLP_BY_PROTOCOL:
                _warn_once(f"protocol:{signal}:{protocol}",
                           "OpenTelemetry %s: OTLP protocol %r is not supported; set "
                           "OTEL_EXPORTER_OTLP_PROTOCOL to http/protobuf (or grpc with the gRPC exporter "
                           "installed). Exporting no %s.", signal, protocol, signal)
                continue
            name = _OTLP_BY_PROTOCOL[protocol]
        resolved.append(name)
    return resolved


def _load_exporter_class(signal: Signal, name: str) -> type | None:
    """The class behind entry point ``name`` in ``opentelemetry_<signal>_exporter`` (as the SDK finds it)."""
    group = f"opentelemetry_{signal}_exporter"
    found = list(importlib.metadata.entry_points(group=group, name=name))
    if not found:
        available = sorted(ep.name for ep in importlib.metadata.entry_points(group=group))
        _warn_once(f"missing:{signal}:{name}",
                   "OpenTelemetry %s exporter %r is not installed (installed: %s); fix OTEL_%s_EXPORTER. "
                   "Exporting no %s through it.", signal, name, ", ".join(available) or "none",
                   signal.upper(), signal)
        return None
    return found[0].load()


def _build_exporters(signal: Signal) -> list[tuple[str, Any]]:
    """Instantiated exporters (or, for metrics, pull readers) named by the environment."""
    built = []
    for name in exporter_names(signal):
        try:
            cls = _load_exporter_class(signal, name)
            if cls is None:
                continue
            exporter = cls()  # the exporter reads its own OTEL_EXPORTER_* settings
            _quiet_exporter_logs(exporter)
            built.append((name, exporter))
        except Exception as error:  # noqa: BLE001 -- bad cert path, broken plugin: telemetry off, agent on
            _warn_once(f"init:{signal}:{name}",
                       "OpenTelemetry %s exporter %r could not be created (%s: %s); check the OTEL_* "
                       "environment. Exporting no %s through it.", signal, name,
                       type(error).__name__, error, signal)
    return built


def _resource(options: TelemetryOptions) -> Resource:
    """Resource with ``service.name``: the YAML's if written there, else the environment's, else ours."""
    attributes: dict[str, Any] = {"service.version": __version__}
    explicit = "service_name" in options.model_fields_set
    if explicit or "service.name" not in OTELResourceDetector().detect().attributes:
        attributes["service.name"] = options.service_name
    return Resource.create(attributes)


def _traceparent_context(header: bytes | str, tracestate: bytes | str | None,
                         propagator: TraceContextTextMapPropagator) -> SpanContext | None:
    """The remote span context in a W3C ``traceparent`` header value, None if it is not a valid one.

    Kafka header values are bytes, but a replayed file may hand us text; anything
    else, or bytes that are not ASCII, is simply not a trace context.
    """
    carrier: dict[str, str] = {}
    for key, value in (("traceparent", header), ("tracestate", tracestate)):
        if isinstance(value, str):
            carrier[key] = value
        elif isinstance(value, bytes):
            try:
                carrier[key] = value.decode("ascii")
            except UnicodeDecodeError:
                if key == "traceparent":
                    return None
    if "traceparent" not in carrier:
        return None
    context = trace.get_current_span(propagator.extract(carrier)).get_span_context()
    return context if context.is_valid else None


class BatchScope:
    """What the pipeline reports while one batch is processed; all of it lands on the batch span.

    Not thread-safe: one batch is processed by one thread.
    """

    __slots__ = ("_counts", "_span", "_telemetry")

    def __init__(self, telemetry: Telemetry, span: trace.Span):
        self._telemetry = telemetry
        self._span = span
        self._counts: Counter[str] = Counter()

    @property
    def span(self) -> trace.Span:
        """The batch span, for callers that want to add their own attributes."""
        return self._span

    def finding(self, finding: Finding) -> None:
        """One span event per finding, and the findings counter by family and severity."""
        self._counts["inferwatch.batch.findings"] += 1
        severity = finding.severity.name.lower()
        if self._span.is_recording():
            attributes: dict[str, Any] = {
                "inferwatch.finding.uid": finding.uid,
                "inferwatch.finding.family": finding.family,
                "inferwatch.finding.detector": finding.detector,
                "inferwatch.finding.severity": severity,
                "inferwatch.finding.severity_id": int(finding.severity),
                "inferwatch.finding.title": finding.title,
                "inferwatch.finding.related_count": len(finding.related_ids),
            }
            if finding.actor is not None:
                attributes["inferwatch.finding.actor"] = finding.actor
            if finding.model is not None:
                attributes["inferwatch.finding.model"] = finding.model
            if finding.attacks:
                attributes["inferwatch.finding.atlas.technique"] = finding.attacks[0]
                attributes["inferwatch.finding.atlas.techniques"] = list(finding.attacks)
            self._span.add_event(FINDING_EVENT, attributes)
        self._telemetry._findings.add(
            1, {"inferwatch.finding.family": finding.family, "inferwatch.finding.severity": severity})

    def dead_lettered(self, n: int, reason_kind: str) -> None:
        """``n`` records of this batch went to the dead-letter topic; ``reason_kind`` must be low-cardinality."""
        if n <= 0:
            return
        self._counts["inferwatch.batch.dead_lettered"] += n
        self._telemetry._dead_lettered.add(n, {"inferwatch.dead_letter.reason": reason_kind})

    def detector_latency(self, detector: str, seconds: float) -> None:
        """How long ``detector`` took on this batch (histogram, seconds)."""
        self._telemetry._detector_duration.record(seconds, {"inferwatch.detector.name": detector})

    def events(self, n_inference: int, n_feedback: int) -> None:
        """Decoded events of this batch, by kind."""
        self._counts["inferwatch.batch.events.inference"] += n_inference
        self._counts["inferwatch.batch.events.feedback"] += n_feedback
        if n_inference:
            self._telemetry._events.add(n_inference, {"inferwatch.event.kind": "inference"})
        if n_feedback:
            self._telemetry._events.add(n_feedback, {"inferwatch.event.kind": "feedback"})

    def _close(self) -> None:
        if self._span.is_recording() and self._counts:
            self._span.set_attributes(dict(self._counts))


class Telemetry:
    """The agent's traces and metrics. Build one per agent; call :meth:`shutdown` on exit.

    ``tracer_provider`` / ``meter_provider`` replace the ones built from the
    environment (tests pass in-memory ones). Telemetry owns and shuts down only
    the providers it built; injected ones are flushed, and the caller shuts them down.
    Gauge callbacks run on the metric reader's thread, so they must be thread-safe.
    """

    def __init__(self, options: TelemetryOptions, consumer_group: str, *,
                 tracer_provider: TracerProvider | None = None,
                 meter_provider: MeterProvider | None = None):
        self.options = options
        self.consumer_group = consumer_group
        self.trace_exporters: tuple[str, ...] = ()
        self.metric_exporters: tuple[str, ...] = ()
        self._owned: list[SdkTracerProvider | SdkMeterProvider] = []
        self._injected: list[Any] = []
        self._lag_callbacks: list[Callable[[], dict[tuple[str, int], int]]] = []
        self._queue_callbacks: list[Callable[[], dict[str, int]]] = []
        self._sink_stats_callbacks: list[Callable[[], dict[str, dict[str, Any]]]] = []
        self._propagator = TraceContextTextMapPropagator()
        self._shut_down = False

        on = options.enabled and not _env_flag(OTEL_SDK_DISABLED)
        self._tracer_provider = self._make_tracer_provider(tracer_provider) if on else trace.NoOpTracerProvider()
        self._meter_provider = self._make_meter_provider(meter_provider) if on else metrics.NoOpMeterProvider()
        self.tracing_enabled = not isinstance(self._tracer_provider, trace.NoOpTracerProvider)
        self.metrics_enabled = not isinstance(self._meter_provider, metrics.NoOpMeterProvider)
        self._tracer = self._tracer_provider.get_tracer(INSTRUMENTATION_NAME, __version__)
        self._create_instruments(self._meter_provider.get_meter(INSTRUMENTATION_NAME, __version__))

    # -- providers -------------------------------------------------------------------------

    def _make_tracer_provider(self, injected: TracerProvider | None) -> TracerProvider:
        if injected is not None:
            self._injected.append(injected)
            return injected
        try:
            exporters = _build_exporters("traces")
            if not exporters:
                return trace.NoOpTracerProvider()
            # shutdown_on_exit=False: our shutdown() is bounded; the SDK's atexit hook is not.
            provider = SdkTracerProvider(resource=_resource(self.options), shutdown_on_exit=False)
            for _, exporter in exporters:
                if not isinstance(exporter, SpanExporter):
                    raise TypeError(f"{type(exporter).__name__} is not a span exporter")
                provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* apply
        except Exception as error:  # noqa: BLE001 -- telemetry must never stop the agent from starting
            _warn_once("tracer-provider", "OpenTelemetry tracing is off: %s: %s; check OTEL_TRACES_EXPORTER "
                       "and OTEL_EXPORTER_OTLP_*.", type(error).__name__, error)
            return trace.NoOpTracerProvider()
        self.trace_exporters = tuple(name for name, _ in exporters)
        self._owned.append(provider)
        return provider

    def _make_meter_provider(self, injected: MeterProvider | None) -> MeterProvider:
        if injected is not None:
            self._injected.append(injected)
            return injected
        try:
            exporters = _build_exporters("metrics")
            if not exporters:
                return metrics.NoOpMeterProvider()
            interval = self.options.metric_export_interval_s
            readers: list[MetricReader] = []
            for _, exporter in exporters:
                if isinstance(exporter, MetricReader):  # pull exporters (Prometheus) are readers themselves
                    readers.append(exporter)
                elif isinstance(exporter, MetricExporter):
                    readers.append(PeriodicExportingMetricReader(
                        exporter, export_interval_millis=None if interval is None else interval * 1000.0))
                else:
                    raise TypeError(f"{type(exporter).__name__} is not a metric exporter or reader")
            provider = SdkMeterProvider(resource=_resource(self.options), metric_readers=readers,
                                        shutdown_on_exit=False)
        except Exception as error:  # noqa: BLE001 -- telemetry must never stop the agent from starting
            _warn_once("meter-provider", "OpenTelemetry metrics are off: %s: %s; check OTEL_METRICS_EXPORTER "
                       "and OTEL_EXPORTER_OTLP_*.", type(error).__name__, error)
            return metrics.NoOpMeterProvider()
        self.metric_exporters = tuple(name for name, _ in exporters)
        self._owned.append(provider)
        return provider

    def _create_instruments(self, meter: metrics.Meter) -> None:
        self._consumed = meter.create_counter(
            "messaging.client.consumed.messages", unit="{message}",
            description="Kafka records delivered to the agent's pipeline.")
        self._process_duration = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Time to process one polled batch.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self._events = meter.create_counter(
            "inferwatch.events.processed", unit="{event}",
            description="Decoded inference and feedback events, by inferwatch.event.kind.")
        self._dead_lettered = meter.create_counter(
            "inferwatch.records.dead_lettered", unit="{record}",
            description="Records that could not be decoded and went to the dead-letter topic.")
        self._findings = meter.create_counter(
            "inferwatch.findings", unit="{finding}", description="Findings raised, by family and severity.")
        self._detector_duration = meter.create_histogram(
            "inferwatch.detector.duration", unit="s", description="Time one detector took on one batch.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self._delivery_failures = meter.create_counter(
            "inferwatch.sink.delivery.failures", unit="{failure}",
            description="Failed deliveries of findings to a sink (each retried or spooled).")
        meter.create_observable_gauge(
            "inferwatch.consumer.lag", callbacks=[self._observe_lag], unit="{message}",
            description="Records between the committed offset and the end of each partition.")
        meter.create_observable_gauge(
            "inferwatch.sink.queue.depth", callbacks=[self._observe_queues], unit="{finding}",
            description="Findings waiting in a sink's queue or spool.")
        # A full spool must never be silent: its fill level, its bound, and what the full-spool policy did.
        meter.create_observable_gauge(
            "inferwatch.sink.spool.usage", callbacks=[self._spool_reader("spool_bytes")], unit="By",
            description="Bytes in a sink's on-disk spool.")
        meter.create_observable_gauge(
            "inferwatch.sink.spool.limit", callbacks=[self._spool_reader("spool_max_bytes")], unit="By",
            description="The bound of a sink's spool (delivery.spool_max_bytes); usage = limit means full.")
        meter.create_observable_counter(
            "inferwatch.sink.findings.dropped", callbacks=[self._spool_reader("dropped")], unit="{finding}",
            description="Findings dropped because the spool was full (spool_full_policy: drop_lowest_severity).")
        meter.create_observable_counter(
            "inferwatch.sink.spool.refused", callbacks=[self._spool_reader("blocked")], unit="{call}",
            description="Deliveries refused because the spool was full (spool_full_policy: block; "
                        "consumption pauses).")
        meter.create_observable_counter(
            "inferwatch.sink.findings.reclaimed", callbacks=[self._spool_reader("reclaimed")], unit="{finding}",
            description="Findings a sink had taken and then found were not received (a syslog receiver that "
                        "rejected the session): spooled and sent again.")

    # -- the pipeline's interface ----------------------------------------------------------

    def batch(self, records: Sequence[RawRecord]) -> AbstractContextManager[BatchScope]:
        """One CONSUMER span around the processing of ``records`` (see the module docstring)."""
        return self._batch(records)

    @contextmanager
    def _batch(self, records: Sequence[RawRecord]) -> Iterator[BatchScope]:
        started = time.perf_counter()
        ranges: dict[tuple[str, int], list[int]] = {}  # (topic, partition) -> [first, last, count]
        for record in records:
            key = (record.topic, record.partition)
            r = ranges.get(key)
            if r is None:
                ranges[key] = [record.offset, record.offset, 1]
            else:
                if record.offset < r[0]:
                    r[0] = record.offset
                if record.offset > r[1]:
                    r[1] = record.offset
                r[2] += 1
        topics = sorted({topic for topic, _ in ranges})
        common = {MESSAGING_SYSTEM: "kafka", MESSAGING_OPERATION_NAME: "process",
                  MESSAGING_CONSUMER_GROUP: self.consumer_group}
        if len(topics) == 1:
            common[MESSAGING_DESTINATION_NAME] = topics[0]
        for (topic, partition), (_, _, count) in ranges.items():
            self._consumed.add(count, {MESSAGING_SYSTEM: "kafka", MESSAGING_OPERATION_NAME: "process",
                                       MESSAGING_CONSUMER_GROUP: self.consumer_group,
                                       MESSAGING_DESTINATION_NAME: topic, MESSAGING_PARTITION_ID: str(partition)})

        span_attributes: dict[str, Any] = {**common, MESSAGING_OPERATION_TYPE: "process",
                                           MESSAGING_BATCH_COUNT: len(records)}
        links: list[Link] = []
        if self.tracing_enabled:
            if len(ranges) == 1:
                ((_, partition), (first, last, _)), = ranges.items()
                span_attributes[MESSAGING_PARTITION_ID] = str(partition)
                span_attributes[MESSAGING_KAFKA_OFFSET] = first
                span_attributes["inferwatch.kafka.offset.last"] = last
            elif ranges:
                span_attributes["inferwatch.kafka.offset_ranges"] = [
                    f"{t}/{p}:{first}-{last}" for (t, p), (first, last, _) in sorted(ranges.items())]
            if len(topics) > 1:
                span_attributes["inferwatch.kafka.topics"] = topics
            links, dropped, invalid = self._links(records)
            if dropped:
                span_attributes["inferwatch.links.dropped"] = dropped
            if invalid:
                span_attributes["inferwatch.traceparent.invalid"] = invalid

        name = f"process {topics[0]}" if len(topics) == 1 else "process"
        error_type: str | None = None
        with self._tracer.start_as_current_span(name, kind=SpanKind.CONSUMER, attributes=span_attributes,
                                                links=links) as span:
            scope = BatchScope(self, span)
            try:
                yield scope
            except BaseException as error:
                error_type = type(error).__qualname__
                span.set_attribute(ERROR_TYPE, error_type)
                raise
            finally:
                scope._close()
                duration_attributes = dict(common)
                if error_type is not None:
                    duration_attributes[ERROR_TYPE] = error_type
                self._process_duration.record(time.perf_counter() - started, duration_attributes)

    def _links(self, records: Sequence[RawRecord]) -> tuple[list[Link], int, int]:
        """Links to the distinct valid ``traceparent`` contexts, capped; plus dropped and invalid counts.

        Once the cap is reached the remaining distinct header values are counted as
        dropped without being parsed: parsing is most of the cost of this method
        (about 5 µs a header), and a link we will not add is not worth it.
        """
        cap = self.options.max_span_links
        seen_headers: set[bytes] = set()
        seen_contexts: set[tuple[int, int]] = set()
        links: list[Link] = []
        dropped = invalid = 0
        for record in records:
            header = record.header("traceparent")
            if header is None or header in seen_headers:
                continue
            seen_headers.add(header)
            if len(links) >= cap:
                dropped += 1
                continue
            context = _traceparent_context(header, record.header("tracestate"), self._propagator)
            if context is None:
                invalid += 1
                continue
            key = (context.trace_id, context.span_id)
            if key in seen_contexts:  # same context, different spelling (e.g. upper-case hex)
                continue
            seen_contexts.add(key)
            links.append(Link(context, {MESSAGING_DESTINATION_NAME: record.topic,
                                        MESSAGING_PARTITION_ID: str(record.partition),
                                        MESSAGING_KAFKA_OFFSET: record.offset}))
        return links, dropped, invalid

    def observe_lag(self, callback: Callable[[], dict[tuple[str, int], int]]) -> None:
        """Feed the consumer-lag gauge: ``callback()`` returns lag per ``(topic, partition)``."""
        self._lag_callbacks.append(callback)

    def observe_sink_queue(self, callback: Callable[[], dict[str, int]]) -> None:
        """Feed the sink-queue gauge: ``callback()`` returns queued/spooled findings per sink name."""
        self._queue_callbacks.append(callback)

    def observe_sink_stats(self, callback: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Feed the spool gauges and counters: ``callback()`` returns per sink name its delivery stats
        (``spool_bytes``, ``spool_max_bytes``, ``dropped``, ``blocked``)."""
        self._sink_stats_callbacks.append(callback)

    def delivery_failure(self, sink: str, n: int = 1) -> None:
        """``n`` failed deliveries to ``sink``."""
        if n > 0:
            self._delivery_failures.add(n, {"inferwatch.sink.name": sink})

    def shutdown(self) -> None:
        """Flush everything; shut down the providers this object built. Safe to call twice.

        Bounded by ``shutdown_timeout_s`` in all: with the collector unreachable the
        exporters would otherwise retry for many seconds per signal and hold up a
        SIGTERM'd agent. What is not delivered by then is given up (logged once).
        """
        if self._shut_down:
            return
        self._shut_down = True
        jobs = [(f"{type(p).__name__}.shutdown", p.shutdown) for p in self._owned]
        jobs += [(f"{type(p).__name__}.force_flush", p.force_flush)
                 for p in self._injected if callable(getattr(p, "force_flush", None))]
        threads = [threading.Thread(target=self._run_quietly, args=job, name=f"telemetry-{job[0]}", daemon=True)
                   for job in jobs]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + self.options.shutdown_timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = [thread.name for thread in threads if thread.is_alive()]
        if late:
            _warn_once("shutdown-timeout", "OpenTelemetry flush did not finish within %.1f s (%s); giving up "
                       "on undelivered telemetry. Is the OTLP endpoint reachable?",
                       self.options.shutdown_timeout_s, ", ".join(late))

    @staticmethod
    def _run_quietly(what: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as error:  # noqa: BLE001 -- a failed flush must not fail the agent's shutdown
            _warn_once(f"shutdown:{what}", "OpenTelemetry %s failed: %s: %s", what, type(error).__name__, error)

    # -- gauge callbacks (run on the metric reader's thread) ---------------------------------

    def _observe_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for callback in self._lag_callbacks:
            for (topic, partition), lag in self._call("lag", callback).items():
                observations.append(Observation(lag, {
                    MESSAGING_SYSTEM: "kafka", MESSAGING_CONSUMER_GROUP: self.consumer_group,
                    MESSAGING_DESTINATION_NAME: topic, MESSAGING_PARTITION_ID: str(partition)}))
        return observations

    def _observe_queues(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(depth, {"inferwatch.sink.name": sink})
                for callback in self._queue_callbacks
                for sink, depth in self._call("sink queue", callback).items()]

    def _spool_reader(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(int(stats[key]), {"inferwatch.sink.name": sink})
                    for callback in self._sink_stats_callbacks
                    for sink, stats in self._call("sink stats", callback).items() if key in stats]
        return observe

    @staticmethod
    def _call(what: str, callback: Callable[[], dict[Any, int]]) -> dict[Any, int]:
        try:
            return dict(callback())
        except Exception as error:  # noqa: BLE001 -- a broken gauge must not kill the metric thread
            _warn_once(f"callback:{what}:{getattr(callback, '__qualname__', callback)!s}",
                       "%s gauge callback %r failed (%s: %s); skipping it until it recovers.",
                       what, callback, type(error).__name__, error)
            return {}
