"""Build a ready-to-run :class:`~agent.pipeline.Pipeline` from a validated configuration.

Kept apart from the pipeline so that ``pipeline.py`` shows only the data path,
and so tests can assemble pipelines from the same parts the CLI uses.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent import signing
from agent.artifacts import load_detectors
from agent.checkpoint import Checkpointer
from agent.config import AgentConfig
from agent.decode_ahead import build_decoding
from agent.delivery import Delivery
from agent.device import configure_cpu_threads
from agent.pipeline import Pipeline
from agent.signing import build_signer
from agent.telemetry import Telemetry
from connectors.deadletter import FileDeadLetters, KafkaDeadLetters
from connectors.decoder_router import DecoderRouter
from connectors.file_source import FileSource
from connectors.kafka_source import KafkaSource
from connectors.kserve_format import KServeDecoder, KServeSpec
from connectors.native_format import DecodeSpec, NativeDecoder
from connectors.sink import registry as sink_registry

log = logging.getLogger(__name__)


def build_decoder(cfg: AgentConfig, input_dim: int | None, n_classes: int | None = None):
    """The native decoder for native topics; with ``format: kserve``, KServe's for its topics beside it."""
    src = cfg.source
    native = NativeDecoder(DecodeSpec(
        inference_topics=frozenset(src.topics.inference), feedback_topics=frozenset(src.topics.feedback),
        input_dim=input_dim, max_record_bytes=src.max_record_bytes, model=cfg.model.name, n_classes=n_classes,
    ))
    if src.format != "kserve":
        return native
    kserve = KServeDecoder(KServeSpec(
        request_topics=frozenset(src.topics.kserve_request), response_topics=frozenset(src.topics.kserve_response),
        input_dim=input_dim, max_record_bytes=src.max_record_bytes, client_header=src.kserve_client_header,
        join_ttl_s=src.kserve_join_ttl_s, model=cfg.model.name, n_classes=n_classes,
    ))
    routes = {t: native for t in [*src.topics.inference, *src.topics.feedback]}
    routes |= {t: kserve for t in [*src.topics.kserve_request, *src.topics.kserve_response]}
    return DecoderRouter(routes)


def build_source(cfg: AgentConfig):
    src = cfg.source
    if src.type == "file":
        files = {}
        if src.inference_path:
            files[src.topics.inference[0]] = src.inference_path
        if src.feedback_path:
            files[src.topics.feedback[0]] = src.feedback_path
        return FileSource(files, Path(cfg.state.dir) / "file-offsets.json", src.max_poll_records)
    return KafkaSource(
        cfg.kafka, src.topics.all(), src.group_id, auto_offset_reset=src.auto_offset_reset,
        max_poll_records=src.max_poll_records, poll_timeout_ms=src.poll_timeout_ms,
        session_timeout_ms=src.session_timeout_ms, heartbeat_interval_ms=src.heartbeat_interval_ms,
        max_poll_interval_ms=src.max_poll_interval_ms, metadata_max_age_ms=src.metadata_max_age_ms,
        fetch_max_bytes=max(64 << 20, src.max_record_bytes * 2),
    )


def build_pipeline(cfg: AgentConfig) -> Pipeline:
    configure_cpu_threads(cfg.cpu_threads)
    signing.install(build_signer(cfg.signing))  # before any sink renders a finding
    detectors, context = load_detectors(cfg)
    checkpoint = Checkpointer(Path(cfg.state.dir), cfg.state.checkpoint_interval_s)
    restored = checkpoint.restore(detectors)
    if restored:
        log.info("restored detector state from %s: %s", cfg.state.dir, ", ".join(restored))
    telemetry = Telemetry(cfg.telemetry_options, cfg.source.group_id)
    sinks_by_type = sink_registry()
    sinks = [sinks_by_type[o.type](o) for o in cfg.sink_options]
    delivery = Delivery(sinks, cfg.delivery_options, Path(cfg.state.dir) / "spool",
                        on_failure=telemetry.delivery_failure)
    if cfg.source.type == "file":
        dead = FileDeadLetters(cfg.deadletter.path or Path(cfg.state.dir) / "deadletter.jsonl",
                               cfg.deadletter.max_value_bytes)
    else:
        dead = KafkaDeadLetters(cfg.kafka, cfg.deadletter.topic, cfg.deadletter.max_value_bytes)
    source = build_source(cfg)
    decoder = build_decoder(cfg, context.input_dim, context.n_classes)
    decoding = build_decoding(decoder, cfg.source.decode_worker, cfg.source.max_poll_records)
    pipeline = Pipeline(source, decoding, detectors, delivery, dead, telemetry, checkpoint)
    # Gauges read cached values: kafka-python clients must not be touched from the metrics thread.
    telemetry.observe_lag(lambda: dict(pipeline.last_lag))
    telemetry.observe_sink_queue(delivery.queue_depths)
    telemetry.observe_sink_stats(lambda: delivery.stats()["sinks"])
    return pipeline
