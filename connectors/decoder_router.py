"""Several record formats in one agent: each topic goes to the decoder of its format.

A KServe deployment logs requests and responses in KServe's format, while the
feedback (label) stream is usually the native format. The router splits a
polled batch by topic, decodes each part with its decoder and merges the
results, so the pipeline still sees one decoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.records import DeadLetter, DecodedBatch, RawRecord, merge_decoded


def _merge_feedback(a: DecodedBatch, b: DecodedBatch) -> DecodedBatch:
    if a.feedback is not None and b.feedback is not None:
        raise ValueError("two decoders produced feedback for the same batch; give each feedback topic one format")
    return merge_decoded(a, b)


class DecoderRouter:
    def __init__(self, by_topic: Mapping[str, Any]):
        """``by_topic`` maps every consumed topic to the decoder of its format."""
        self.by_topic = dict(by_topic)
        self.decoders = list({id(d): d for d in self.by_topic.values()}.values())

    def decode(self, records: Sequence[RawRecord]) -> DecodedBatch:
        parts: dict[int, list[RawRecord]] = {}
        unrouted: list[DeadLetter] = []
        for r in records:
            dec = self.by_topic.get(r.topic)
            if dec is None:  # never raise on input (issue 6): a record of an unconfigured topic is dead-lettered
                unrouted.append(DeadLetter(r, f"topic: {r.topic!r} has no decoder; add it to source.topics"))
                continue
            parts.setdefault(id(dec), []).append(r)
        out = DecodedBatch(dead=tuple(unrouted))
        for dec in self.decoders:
            if id(dec) in parts:
                out = _merge_feedback(out, dec.decode(parts[id(dec)]))
        return out

    def pending_offsets(self) -> dict[tuple[str, int], int]:
        merged: dict[tuple[str, int], int] = {}
        for dec in self.decoders:
            for tp, off in (dec.pending_offsets() if hasattr(dec, "pending_offsets") else {}).items():
                merged[tp] = min(off, merged.get(tp, off))
        return merged

    def expire(self, now: float | None = None) -> DecodedBatch:
        out = DecodedBatch()
        for dec in self.decoders:
            if hasattr(dec, "expire"):
                out = _merge_feedback(out, dec.expire(now))
        return out

