"""Dead letters: records that could not be decoded, kept with the reason.

Like bytewax's error path: a bad record never raises and never stalls its
partition. It is forwarded, as it came (value truncated past a bound, so one
10 MB body cannot block the producer), with headers that say why and where it
came from, and is counted.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from agent.records import DeadLetter
from connectors.kafka_options import KafkaOptions

REASON = "inferwatch.reason"


def reason_kind(reason: str) -> str:
    """A low-cardinality label for metrics: the text before the first colon."""
    return reason.split(":", 1)[0].strip()[:40] or "unknown"


def _headers(d: DeadLetter, original_size: int, truncated: bool) -> list[tuple[str, bytes]]:
    r = d.record
    h = [(k, v) for k, v in r.headers if not k.startswith("inferwatch.")]
    h += [
        (REASON, d.reason.encode()),
        ("inferwatch.source.topic", r.topic.encode()),
        ("inferwatch.source.partition", str(r.partition).encode()),
        ("inferwatch.source.offset", str(r.offset).encode()),
        ("inferwatch.original.bytes", str(original_size).encode()),
    ]
    if truncated:
        h.append(("inferwatch.truncated", b"true"))
    return h


class KafkaDeadLetters:
    """Forwards dead letters to a topic; ``flush`` must succeed before offsets are committed."""

    def __init__(self, kafka: KafkaOptions, topic: str, max_value_bytes: int = 262_144):
        from kafka import KafkaProducer

        self.topic = topic
        self.max_value_bytes = max_value_bytes
        self.counts: Counter[str] = Counter()
        # Not idempotent, on purpose: a duplicate dead letter is harmless, a lost one is not. Measured with
        # Tansu 0.6 on S3 storage (tests/test_broker_faults.py): a broker killed mid-produce answered the retried
        # batch DUPLICATE_SEQUENCE_NUMBER after its restart without having stored it, and kafka-python counts
        # that as delivered (5 of 8 runs lost a batch; 0 of 6 without idempotence).
        self._producer = KafkaProducer(
            acks="all", enable_idempotence=False, linger_ms=20, max_request_size=max(1 << 20, max_value_bytes * 2),
            **kafka.client_kwargs()
        )

    def send(self, dead: Sequence[DeadLetter]) -> None:
        for d in dead:
            value = d.record.value or b""
            truncated = len(value) > self.max_value_bytes
            self._producer.send(
                self.topic, value[: self.max_value_bytes], key=d.record.key, headers=_headers(d, len(value), truncated)
            )
            self.counts[reason_kind(d.reason)] += 1

    def flush(self, timeout_s: float = 30.0) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()


class FileDeadLetters:
    """Dead letters as JSONL lines (for the file source): reason, origin and base64 value."""

    def __init__(self, path: Path, max_value_bytes: int = 262_144):
        self.path = path
        self.max_value_bytes = max_value_bytes
        self.counts: Counter[str] = Counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def send(self, dead: Sequence[DeadLetter]) -> None:
        for d in dead:
            value = d.record.value or b""
            self._fh.write(
                json.dumps(
                    {
                        "reason": d.reason,
                        "topic": d.record.topic,
                        "partition": d.record.partition,
                        "offset": d.record.offset,
                        "original_bytes": len(value),
                        "value_b64": base64.b64encode(value[: self.max_value_bytes]).decode(),
                    }
                )
                + "\n"
            )
            self.counts[reason_kind(d.reason)] += 1

    def flush(self, timeout_s: float = 30.0) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
