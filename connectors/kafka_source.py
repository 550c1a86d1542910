"""Kafka source: a kafka-python consumer group with manual commits.

Offsets are committed only when the pipeline says so (after every sink accepted
the batch's findings, together with a detector checkpoint), which gives
at-least-once processing: a crash replays at most the uncommitted records.

Rebalances: before partitions are taken away the pipeline's revoke callback
commits what it has processed (their next owner starts there); when
partitions are assigned, a detector checkpoint that is ahead of the group's
commit (killed between checkpoint and commit) moves the position forward, so
restored state never sees a record twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
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
        metadata_max_age_ms: int = 30_000,
    ):
        self.topics = list(dict.fromkeys(topics))
        self.group_id = group_id
        self.poll_timeout_ms = poll_timeout_ms
        self.max_poll_records = max_poll_records
        self._resume: dict[TP, int] = {}
        self._on_revoke: Callable[[set[TP]], dict[TP, int]] = lambda revoked: {}
        self._consumer = KafkaConsumer(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            max_poll_records=max_poll_records,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms,
            fetch_max_bytes=fetch_max_bytes,
            max_partition_fetch_bytes=fetch_max_bytes,
            metadata_max_age_ms=metadata_max_age_ms,  # how soon partitions added to a topic are consumed
            **kafka.client_kwargs(),
        )
        self._consumer.subscribe(self.topics, listener=_Rebalance(self))

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
        self._consumer.commit(_offset_map(next_offsets))

    def seek(self, offsets: Mapping[TP, int]) -> None:
        """Rewind assigned partitions (used after a failed delivery, so nothing is skipped)."""
        assigned = self._consumer.assignment()
        for (t, p), o in offsets.items():
            tp = TopicPartition(t, p)
            if tp in assigned:
                self._consumer.seek(tp, o)

    def resume(self, checkpointed: Mapping[TP, int]) -> None:
        """Offsets of the restored detector checkpoint, applied when the partitions are assigned."""
        self._resume = dict(checkpointed)

    def on_revoke(self, callback: Callable[[set[TP]], dict[TP, int]]) -> None:
        """``callback(revoked)`` checkpoints and returns the offsets to commit before the partitions go."""
        self._on_revoke = callback

    async def _revoked(self, tps: set[TP]) -> None:
        if not tps:
            return
        log.info("partitions revoked: %s", sorted(tps))
        offsets = self._on_revoke(tps)
        if offsets:  # kafka-python 3 runs listeners on its event loop: the blocking commit() would deadlock
            await self._consumer._coordinator._commit_offsets_sync_async(_offset_map(offsets))

    async def _assigned(self, tps: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in tps))
        mine = [tp for tp in tps if (tp.topic, tp.partition) in self._resume]
        if not mine:
            return
        committed = await self._consumer._coordinator.fetch_committed_offsets_async(mine)
        for tp in mine:
            ahead, done = self._resume[(tp.topic, tp.partition)], committed.get(tp)
            if done is None or ahead > done.offset:
                log.info("%s-%d: the detector checkpoint is at %d, the group's commit at %s: starting at %d",
                         tp.topic, tp.partition, ahead, done.offset if done else None, ahead)
                self._consumer.seek(tp, ahead)

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
        """Leave the group without committing: the pipeline committed what it processed before closing us."""
        self._on_revoke = lambda revoked: {}  # kafka-python revokes everything on close
        self._consumer.close(autocommit=False)


def _offset_map(offsets: Mapping[TP, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}


class _Rebalance(AsyncConsumerRebalanceListener):
    """kafka-python awaits these inside ``poll()``, between our batches (async: they talk to the broker)."""

    def __init__(self, source: KafkaSource):
        self.source = source

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.source._revoked({(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.source._assigned(list(assigned))
