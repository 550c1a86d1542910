"""Kafka alert-topic sink: one OCSF finding per record on ``inferwatch.findings``.

For SOCs that take alerts from Kafka (a SIEM's Kafka input, a SOAR consumer,
another team's stream processor). The value is the compact OCSF Detection
Finding JSON; the key is the finding's actor (client or feedback source), so
every finding about one client lands on one partition in order; findings
without an actor are keyed by model. Headers say what the value is
(``content-type: application/json``, ``ocsf-class-uid: 2004``) and carry the
finding uid for consumers that deduplicate.

``export`` sends the batch and then flushes, so SUCCESS means the broker
acknowledged every record with ``acks=all`` (the default): the delivery layer
may then let the pipeline commit. A broker that cannot be reached gives
FAILURE (retried, spooled), never an exception out of the pipeline. The
connection settings (TLS, SASL) are the same :class:`KafkaOptions` the source
uses, under this sink's own ``kafka:`` key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from kafka import KafkaProducer
from kafka.errors import KafkaError
from pydantic import Field

from agent.findings import Finding
from agent.ocsf import CLASS_UID
from connectors.formats import ocsf_json
from connectors.kafka_options import KafkaOptions
from connectors.sink import ExportResult, Sink, SinkOptions

log = logging.getLogger(__name__)


class KafkaAlertOptions(SinkOptions):
    type: Literal["kafka"] = "kafka"
    kafka: KafkaOptions = Field(default_factory=KafkaOptions, description="connection, TLS and SASL settings")
    topic: str = Field("inferwatch.findings", min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")
    key_by: Literal["actor", "model", "none"] = "actor"
    acks: Literal["all", 1, 0] = "all"
    # off by default: findings carry a uid to drop duplicates by, while a broker that answers a retried batch
    # DUPLICATE_SEQUENCE_NUMBER without having stored it (Tansu 0.6 on S3 after a kill, see connectors/deadletter.py)
    # loses it silently with idempotence on
    enable_idempotence: bool = False
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    linger_ms: int = Field(5, ge=0)
    delivery_timeout_s: float = Field(30.0, gt=0, description="how long one export waits for the acks")
    max_block_s: float = Field(10.0, gt=0, description="how long connecting or send() may wait for the broker")


class KafkaAlertSink(Sink):
    type_name = "kafka"
    Options = KafkaAlertOptions

    def __init__(self, options: KafkaAlertOptions):
        super().__init__(options)
        self.options: KafkaAlertOptions = options
        self._producer: KafkaProducer | None = None
        self.counters: dict[str, int] = {"records_sent": 0, "unrenderable": 0}

    def _connect(self) -> KafkaProducer:
        o = self.options
        kw: dict[str, Any] = o.kafka.client_kwargs()
        kw["client_id"] = f"{o.kafka.client_id}-alerts"
        delivery_ms = int(o.delivery_timeout_s * 1000)
        kw["request_timeout_ms"] = min(kw["request_timeout_ms"], delivery_ms)
        return KafkaProducer(
            acks=-1 if o.acks == "all" else o.acks,
            enable_idempotence=o.enable_idempotence and o.acks == "all",
            compression_type=o.compression_type,
            linger_ms=o.linger_ms,
            delivery_timeout_ms=delivery_ms + o.linger_ms,
            max_block_ms=int(o.max_block_s * 1000),
            bootstrap_timeout_ms=int(o.max_block_s * 1000),
            **kw,
        )

    def key(self, finding: Finding) -> bytes | None:
        """Partitioning key: findings about one client stay in order on one partition."""
        if self.options.key_by == "none":
            return None
        value = finding.actor if self.options.key_by == "actor" else None
        value = value if value is not None else finding.model
        return value.encode() if value is not None else None

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        if not findings:
            return ExportResult.SUCCESS
        try:
            if self._producer is None:
                self._producer = self._connect()
            futures = []
            for f in findings:
                try:
                    value = ocsf_json.render(f)
                except (ValueError, TypeError) as exc:
                    self.counters["unrenderable"] += 1
                    log.error("sink %s: finding %s cannot be rendered and is dropped: %s", self.name, f.uid, exc)
                    continue
                headers = [
                    ("content-type", b"application/json"),
                    ("ocsf-class-uid", str(CLASS_UID).encode()),
                    ("finding-uid", f.uid.encode()),
                ]
                futures.append(self._producer.send(self.options.topic, value=value, key=self.key(f), headers=headers))
            self._producer.flush(timeout=self.options.delivery_timeout_s + 5)
        except KafkaError as exc:
            log.warning(
                "sink %s: producing to %s failed: %s: %s", self.name, self.options.topic, type(exc).__name__, exc
            )
            return ExportResult.FAILURE
        failed = [fut.exception for fut in futures if not fut.is_done or fut.failed()]
        if failed:
            log.warning(
                "sink %s: %d of %d records were not acknowledged (%s); will retry",
                self.name,
                len(failed),
                len(futures),
                failed[0],
            )
            return ExportResult.FAILURE
        self.counters["records_sent"] += len(futures)
        return ExportResult.SUCCESS

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        if self._producer is None:
            return True
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError:
            return False
        return True

    def shutdown(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None
