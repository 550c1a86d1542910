"""Kafka source: a kafka-python consumer group with manual commits.

Offsets are committed only when the pipeline says so (after every sink accepted
the batch's findings), which gives at-least-once processing: a crash replays at
most the uncommitted batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from agent.records import RawRecord
from connectors.kafka_options import KafkaOptions

log = logging.getLogger(__name__)

TP = tuple[str, int]


class KafkaSource:
    """Polls batches of :class:`RawRecord` from the configured topics."""

    def __init__(
        self,
        kafka: KafkaOptions,
        topics: list[str],
        group_id: str,
        *,
        auto_offset_reset: str = "earliest",
        max_poll_records: int = 2000,
        poll_timeout_ms: int = 200,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        max_poll_interval_ms: int = 300_000,
        fetch_max_bytes: int = 64 << 20,
    ):
        self.topics = list(dict.fromkeys(topics))
        self.group_id = group_id
        self.poll_timeout_ms = poll_timeout_ms
        self.max_poll_records = max_poll_records
        self._consumer = KafkaConsumer(
            *self.topics,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            max_poll_records=max_poll_records,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms,
            fetch_max_bytes=fetch_max_bytes,
            max_partition_fetch_bytes=fetch_max_bytes,
            **kafka.client_kwargs(),
        )

    def poll(self) -> list[RawRecord]:
        """One poll: up to ``max_poll_records`` records across the assigned partitions."""
        polled = self._consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_poll_records)
        out: list[RawRecord] = []
        for tp, recs in polled.items():
            for r in recs:
                out.append(
                    RawRecord(
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=r.offset,
                        value=r.value,
                        key=r.key,
                        headers=tuple(
                            (k, v if isinstance(v, bytes) else bytes(v or b"")) for k, v in (r.headers or ())
                        ),
                        timestamp_ms=r.timestamp,
                    )
                )
        return out

    def commit(self, next_offsets: Mapping[TP, int]) -> None:
        """Commit ``next_offsets`` (the offset of the next record to read, per partition)."""
        if not next_offsets:
            return
        self._consumer.commit(
            {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets.items()}
        )

    def seek(self, offsets: Mapping[TP, int]) -> None:
        """Rewind assigned partitions (used after a failed delivery, so nothing is skipped)."""
        assigned = self._consumer.assignment()
        for (t, p), o in offsets.items():
            tp = TopicPartition(t, p)
            if tp in assigned:
                self._consumer.seek(tp, o)

    def assignment(self) -> set[TP]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def lag(self) -> dict[TP, int]:
        """Records not yet committed per assigned partition (end offset - committed)."""
        tps = list(self._consumer.assignment())
        if not tps:
            return {}
        ends = self._consumer.end_offsets(tps)
        out = {}
        for tp in tps:
            committed = self._consumer.committed(tp) or 0
            out[(tp.topic, tp.partition)] = max(0, ends.get(tp, 0) - committed)
        return out

    def close(self) -> None:
        self._consumer.close(autocommit=False)
