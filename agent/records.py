"""What flows through the agent: raw Kafka records in, decoded columnar batches out.

Batches are columnar (one numpy array per field) because the detectors work on
whole batches: one torch call per batch, never one per record. A record that
cannot be decoded never raises; it becomes a :class:`DeadLetter` on its own path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as it came off the wire (Kafka or a replayed file)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None

    def header(self, name: str) -> bytes | None:
        """The last header with this name (Kafka allows repeats; the last wins)."""
        for k, v in reversed(self.headers):
            if k == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be decoded, with the reason a human can act on."""

    record: RawRecord
    reason: str


@dataclass(frozen=True)
class InferenceBatch:
    """Request/response pairs, columnar. Row i of every field is the same event.

    ``probs`` holds the model's class probabilities where the record carried
    them (``probs`` or ``logits``); rows without them are NaN. ``labels`` is the
    predicted class (argmax of ``probs`` or the record's ``label``), -1 if unknown.
    """

    ids: tuple[str, ...]
    ts: np.ndarray  # float64 epoch seconds, shape [n]
    models: tuple[str, ...]
    model_versions: tuple[str | None, ...]
    clients: tuple[str, ...]
    X: np.ndarray  # float32 [n, d]
    probs: np.ndarray | None  # float32 [n, k] or None when no record had them
    labels: np.ndarray  # int64 [n]
    traceparents: tuple[str | None, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray | Sequence[int]) -> InferenceBatch:
        """Rows ``idx`` as a new batch (used to split by model or client)."""
        idx = np.asarray(idx, dtype=np.int64)
        pick = idx.tolist()
        return InferenceBatch(
            ids=tuple(self.ids[i] for i in pick),
            ts=self.ts[idx],
            models=tuple(self.models[i] for i in pick),
            model_versions=tuple(self.model_versions[i] for i in pick),
            clients=tuple(self.clients[i] for i in pick),
            X=self.X[idx],
            probs=None if self.probs is None else self.probs[idx],
            labels=self.labels[idx],
            traceparents=tuple(self.traceparents[i] for i in pick) if self.traceparents else (),
        )


@dataclass(frozen=True)
class FeedbackBatch:
    """Labels flowing back for retraining, columnar."""

    ids: tuple[str, ...]
    ts: np.ndarray  # float64 [n]
    models: tuple[str, ...]
    sources: tuple[str, ...]
    X: np.ndarray  # float32 [n, d]
    labels: np.ndarray  # int64 [n]
    traceparents: tuple[str | None, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray | Sequence[int]) -> FeedbackBatch:
        idx = np.asarray(idx, dtype=np.int64)
        pick = idx.tolist()
        return FeedbackBatch(
            ids=tuple(self.ids[i] for i in pick),
            ts=self.ts[idx],
            models=tuple(self.models[i] for i in pick),
            sources=tuple(self.sources[i] for i in pick),
            X=self.X[idx],
            labels=self.labels[idx],
            traceparents=tuple(self.traceparents[i] for i in pick) if self.traceparents else (),
        )


@dataclass(frozen=True)
class DecodedBatch:
    """The result of decoding one polled batch: good events and dead letters."""

    inference: InferenceBatch | None = None
    feedback: FeedbackBatch | None = None
    dead: tuple[DeadLetter, ...] = field(default_factory=tuple)

    @property
    def n_events(self) -> int:
        return (len(self.inference) if self.inference else 0) + (len(self.feedback) if self.feedback else 0)


def empty_inference(dim: int) -> InferenceBatch:
    """A zero-row batch, handy for detectors' warm-up and conformance tests."""
    return InferenceBatch(
        ids=(), ts=np.zeros(0), models=(), model_versions=(), clients=(),
        X=np.zeros((0, dim), np.float32), probs=None, labels=np.zeros(0, np.int64),
    )


def _concat_probs(a: InferenceBatch, b: InferenceBatch) -> np.ndarray | None:
    if a.probs is None and b.probs is None:
        return None
    k = (a.probs if a.probs is not None else b.probs).shape[1]
    pa = a.probs if a.probs is not None else np.full((len(a), k), np.nan, np.float32)
    pb = b.probs if b.probs is not None else np.full((len(b), k), np.nan, np.float32)
    return np.concatenate([pa, pb]) if pa.shape[1] == pb.shape[1] else None


def _concat_traceparents(a: InferenceBatch | FeedbackBatch, b: InferenceBatch | FeedbackBatch) -> tuple:
    return (a.traceparents or (None,) * len(a)) + (b.traceparents or (None,) * len(b))


def concat_inference(a: InferenceBatch | None, b: InferenceBatch | None) -> InferenceBatch | None:
    """Rows of ``a`` then ``b`` (used to add KServe halves released by a join timeout)."""
    if a is None or len(a) == 0:
        return b
    if b is None or len(b) == 0:
        return a
    return InferenceBatch(ids=a.ids + b.ids, ts=np.concatenate([a.ts, b.ts]), models=a.models + b.models,
                          model_versions=a.model_versions + b.model_versions, clients=a.clients + b.clients,
                          X=np.concatenate([a.X, b.X]), probs=_concat_probs(a, b),
                          labels=np.concatenate([a.labels, b.labels]), traceparents=_concat_traceparents(a, b))


def concat_feedback(a: FeedbackBatch | None, b: FeedbackBatch | None) -> FeedbackBatch | None:
    """Rows of ``a`` then ``b``."""
    if a is None or len(a) == 0:
        return b
    if b is None or len(b) == 0:
        return a
    return FeedbackBatch(ids=a.ids + b.ids, ts=np.concatenate([a.ts, b.ts]), models=a.models + b.models,
                         sources=a.sources + b.sources, X=np.concatenate([a.X, b.X]),
                         labels=np.concatenate([a.labels, b.labels]), traceparents=_concat_traceparents(a, b))


def merge_decoded(a: DecodedBatch, b: DecodedBatch) -> DecodedBatch:
    """One batch from two, in order: rows of ``a`` then ``b``, dead letters from both."""
    return DecodedBatch(inference=concat_inference(a.inference, b.inference),
                        feedback=concat_feedback(a.feedback, b.feedback), dead=a.dead + b.dead)
