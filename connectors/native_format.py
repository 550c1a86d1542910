"""Decoder for inferwatch's own JSON record format (CONTRACT.md, "Input records").

Inference event (topic in ``DecodeSpec.inference_topics``)::

    {"id": "req-81", "ts": 1763877600.25, "model": "digits-cnn", "client_id": "tenant-7",
     "model_version": "3",                       # optional
     "input": [0.0, 0.31, ...],                  # flat or nested (flattened row-major)
     "output": {"probs": [...]} | {"logits": [...]} | {"label": 7}}

Feedback record (topic in ``DecodeSpec.feedback_topics``)::

    {"id": "fb-12", "ts": 1763877601.0, "model": "digits-cnn", "source": "reviewer-3",
     "input": [...], "label": 7}

Choices made here, so producers know what is accepted:

- ``ts`` is required: epoch seconds (number) or an RFC 3339 string with a zone.
- ``id`` is a non-empty string (an integer id is accepted and turned into one).
- ``output`` is required on inference events: a monitor that cannot see the
  answer cannot spot extraction. It holds ``probs`` or ``logits`` (not both),
  and/or ``label``; when ``label`` is given it is the predicted class, else the
  argmax of the probabilities is.
- ``probs`` values must lie in [0, 1] (unnormalised scores belong in ``logits``).
  Their sum is not checked: rounding in producers makes it inexact.
- JSON ``true``/``false`` are not numbers here; NaN/Infinity literals and
  numbers beyond float32 range are dead-lettered.
- Unknown fields are ignored, so producers can add their own.
- Events for another model than ``DecodeSpec.model`` are skipped and counted in
  ``skipped_other_model``, not dead-lettered: they are someone else's, not broken.
- ``input_dim`` / ``n_classes`` left as None are learned from the first record
  that has them and then held for the life of the decoder. Prefer setting them
  (``inferwatch train`` records both in the manifest): the first record of a
  stream then cannot decide what every later record must look like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.records import DeadLetter, DecodedBatch, FeedbackBatch, InferenceBatch, RawRecord
from connectors.decoding import (
    check_size,
    flatten_numbers,
    parse_json,
    parse_traceparent,
    parse_ts,
    rows_to_matrix,
    softmax,
    type_name,
)


@dataclass(frozen=True)
class DecodeSpec:
    """What the native decoder expects; built by the pipeline from the configuration."""

    inference_topics: frozenset[str]
    feedback_topics: frozenset[str]
    input_dim: int | None  # flattened input length; None: learn it from the first good record, then hold it
    max_record_bytes: int = 1_048_576
    model: str | None = None  # when set, events for other models are skipped (and counted), not dead-lettered
    n_classes: int | None = None  # width of probs/logits; None: learn it from the first record that has them

    def __post_init__(self) -> None:
        overlap = self.inference_topics & self.feedback_topics
        if overlap:
            raise ValueError(
                f"topics {sorted(overlap)} are both inference and feedback topics; a topic must hold one kind of record"
            )
        if self.input_dim is not None and self.input_dim < 1:
            raise ValueError(f"input_dim must be a positive integer or None, got {self.input_dim}")
        if self.n_classes is not None and self.n_classes < 1:
            raise ValueError(f"n_classes must be a positive integer or None, got {self.n_classes}")
        if self.max_record_bytes < 1:
            raise ValueError(f"max_record_bytes must be positive, got {self.max_record_bytes}")


_OUTPUT_KEYS = ("probs", "logits", "label")


@dataclass
class _Rows:
    """Per-record fields collected for one stream of one batch (arrays are built once, at the end)."""

    positions: list[int] = field(default_factory=list)  # index in the polled batch, for ordering
    records: list[RawRecord] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    versions: list[str | None] = field(default_factory=list)
    actors: list[str] = field(default_factory=list)  # client_id (inference) or source (feedback)
    inputs: list[list[float | int]] = field(default_factory=list)
    scores: list[list[float | int] | None] = field(default_factory=list)  # probs or logits row
    score_is_logits: list[bool] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    traceparents: list[str | None] = field(default_factory=list)


class NativeDecoder:
    """Turns polled native-format records into columnar batches plus dead letters; never raises on input."""

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        self.input_dim: int | None = spec.input_dim
        self.n_classes: int | None = spec.n_classes
        self.skipped_other_model = 0

    # ------------------------------------------------------------------ public

    def decode(self, records: Sequence[RawRecord]) -> DecodedBatch:
        """Decode one polled batch. Good events keep their order; dead letters keep theirs."""
        inference, feedback = _Rows(), _Rows()
        dead: list[tuple[int, DeadLetter]] = []
        spec = self.spec
        for position, record in enumerate(records):
            if record.topic in spec.inference_topics:
                rows, is_feedback = inference, False
            elif record.topic in spec.feedback_topics:
                rows, is_feedback = feedback, True
            else:
                dead.append(
                    (
                        position,
                        DeadLetter(
                            record, f"unknown topic: {record.topic!r} is neither an inference nor a feedback topic"
                        ),
                    )
                )
                continue
            reason = self._collect(record, position, rows, is_feedback)
            if reason is not None:
                dead.append((position, DeadLetter(record, reason)))

        inference_batch = self._build_inference(inference, dead)
        feedback_batch = self._build_feedback(feedback, dead)
        dead.sort(key=lambda item: item[0])
        return DecodedBatch(
            inference=inference_batch,
            feedback=feedback_batch,
            dead=tuple(letter for _, letter in dead),
        )

    # ------------------------------------------------------------- per record

    def _collect(self, record: RawRecord, position: int, rows: _Rows, is_feedback: bool) -> str | None:
        """Validate one record's scalar fields and append it to ``rows``; the reason if it is bad.

        Numbers are only collected here; :func:`rows_to_matrix` checks them for
        the whole batch at once.
        """
        reason = check_size(record, self.spec.max_record_bytes)
        if reason is not None:
            return reason
        raw = record.value
        assert raw is not None  # check_size rejected tombstones
        event, reason = parse_json(raw)
        if reason is not None:
            return reason
        if type(event) is not dict:
            return f"expected a JSON object, got {type_name(event)}"

        model = event.get("model")
        if type(model) is not str or not model:
            return f"model: expected a non-empty string, got {type_name(model)}"
        if self.spec.model is not None and model != self.spec.model:
            self.skipped_other_model += 1
            return None

        event_id = event.get("id")
        if type(event_id) is not str:
            if type(event_id) is int:
                event_id = str(event_id)
            else:
                return f"id: expected a string, got {type_name(event_id)}"
        if not event_id:
            return "id: empty; expected a unique request id"

        ts = parse_ts(event.get("ts"))
        if type(ts) is str:
            return ts

        actor_field = "source" if is_feedback else "client_id"
        actor = event.get(actor_field)
        if type(actor) is not str or not actor:
            return f"{actor_field}: expected a non-empty string, got {type_name(actor)}"

        version = event.get("model_version")
        if version is not None and type(version) is not str:
            if type(version) is int:
                version = str(version)
            else:
                return f"model_version: expected a string, got {type_name(version)}"

        # input: the fast path is a flat list; anything else takes the slow, explaining path
        row = event.get("input")
        if type(row) is not list or (row and type(row[0]) is list):
            row = flatten_numbers(row, "input")
            if type(row) is str:
                return row
        if not row:
            return "input: empty; expected the model's input features"
        has_bool_literal = b"true" in raw or b"false" in raw
        if has_bool_literal and any(type(v) is bool for v in row):
            return "input: contains true/false; expected numbers only"
        dim = self.input_dim
        if dim is None:
            self.input_dim = dim = len(row)
        elif len(row) != dim:
            return f"input: expected {dim} numbers, got {len(row)}"

        scores: list[float | int] | None = None
        is_logits = False
        if is_feedback:
            label = event.get("label")
            reason = self._check_label(label, "label", required=True)
            if reason is not None:
                return reason
        else:
            output = event.get("output")
            if type(output) is not dict:
                return f"output: expected an object with probs, logits or label, got {type_name(output)}"
            probs, logits, label = (output.get(key) for key in _OUTPUT_KEYS)
            if probs is not None and logits is not None:
                return "output: has both probs and logits; send one"
            if probs is None and logits is None and label is None:
                return "output: expected one of probs, logits, label"
            if probs is not None or logits is not None:
                is_logits = probs is None
                name = "output.logits" if is_logits else "output.probs"
                scores = logits if is_logits else probs
                if type(scores) is not list or (scores and type(scores[0]) is list):
                    return f"{name}: expected a flat array of numbers, got {type_name(scores)}"
                if not scores:
                    return f"{name}: empty; expected one number per class"
                if has_bool_literal and any(type(v) is bool for v in scores):
                    return f"{name}: contains true/false; expected numbers only"
                k = self.n_classes
                if k is None:
                    self.n_classes = k = len(scores)
                elif len(scores) != k:
                    return f"{name}: expected {k} classes, got {len(scores)}"
            if label is None:
                label = -1
            else:
                reason = self._check_label(label, "output.label", required=True)
                if reason is not None:
                    return reason

        rows.positions.append(position)
        rows.records.append(record)
        rows.ids.append(event_id)
        rows.ts.append(ts)  # type: ignore[arg-type]  # a str was returned above
        rows.models.append(model)
        rows.versions.append(version)
        rows.actors.append(actor)
        rows.inputs.append(row)
        rows.scores.append(scores)
        rows.score_is_logits.append(is_logits)
        rows.labels.append(label)
        rows.traceparents.append(parse_traceparent(record.header("traceparent")))
        return None

    def _check_label(self, label: object, name: str, required: bool) -> str | None:
        if type(label) is not int:
            if label is None and required:
                return f"{name}: missing; expected a class index (integer >= 0)"
            return f"{name}: expected a class index (integer >= 0), got {type_name(label)}"
        if label < 0:
            return f"{name}: {label} is negative; expected a class index >= 0"
        if self.n_classes is not None and label >= self.n_classes:
            return f"{name}: {label} is not a class index below n_classes={self.n_classes}"
        return None

    # -------------------------------------------------------------- per batch

    def _numbers(self, rows: _Rows) -> tuple[np.ndarray, np.ndarray | None, dict[int, str]]:
        """Build X and probs for all collected rows; ``{row: reason}`` for rows that fail."""
        dim = self.input_dim or 0
        X, bad = rows_to_matrix(rows.inputs, dim, "input")
        probs: np.ndarray | None = None
        scored = [i for i, s in enumerate(rows.scores) if s is not None]
        if scored:
            k = self.n_classes or 0
            probs = np.full((len(rows.ids), k), np.nan, np.float32)
            for want_logits, name in ((False, "output.probs"), (True, "output.logits")):
                idx = [i for i in scored if rows.score_is_logits[i] == want_logits]
                if not idx:
                    continue
                matrix, bad_scores = rows_to_matrix([rows.scores[i] for i in idx], k, name)
                if want_logits:
                    matrix = softmax(matrix)
                else:
                    out_of_range = ((matrix < 0.0) | (matrix > 1.0)).any(axis=1)
                    for j in np.flatnonzero(out_of_range).tolist():
                        bad_scores.setdefault(j, f"{name}: values must lie in [0, 1]; send scores as logits")
                for j, reason in bad_scores.items():
                    bad.setdefault(idx[j], reason)
                probs[np.asarray(idx)] = matrix
        return X, probs, bad

    def _build_inference(self, rows: _Rows, dead: list[tuple[int, DeadLetter]]) -> InferenceBatch | None:
        if not rows.ids:
            return None
        X, probs, bad = self._numbers(rows)
        labels = np.asarray(rows.labels, dtype=np.int64)
        if probs is not None:
            need_argmax = (labels < 0) & ~np.isnan(probs[:, 0])
            if need_argmax.any():
                labels[need_argmax] = probs[need_argmax].argmax(axis=1)
        keep = self._drop_bad(rows, bad, dead)
        if keep is not None:
            if not keep:
                return None
            X, labels = X[keep], labels[keep]
            probs = None if probs is None else probs[keep]
            rows = _pick(rows, keep)
        if probs is not None and all(s is None for s in rows.scores):
            probs = None  # the only scored rows were dropped
        return InferenceBatch(
            ids=tuple(rows.ids),
            ts=np.asarray(rows.ts, dtype=np.float64),
            models=tuple(rows.models),
            model_versions=tuple(rows.versions),
            clients=tuple(rows.actors),
            X=X,
            probs=probs,
            labels=labels,
            traceparents=tuple(rows.traceparents),
        )

    def _build_feedback(self, rows: _Rows, dead: list[tuple[int, DeadLetter]]) -> FeedbackBatch | None:
        if not rows.ids:
            return None
        X, _, bad = self._numbers(rows)
        labels = np.asarray(rows.labels, dtype=np.int64)
        keep = self._drop_bad(rows, bad, dead)
        if keep is not None:
            if not keep:
                return None
            X, labels = X[keep], labels[keep]
            rows = _pick(rows, keep)
        return FeedbackBatch(
            ids=tuple(rows.ids),
            ts=np.asarray(rows.ts, dtype=np.float64),
            models=tuple(rows.models),
            sources=tuple(rows.actors),
            X=X,
            labels=labels,
            traceparents=tuple(rows.traceparents),
        )

    @staticmethod
    def _drop_bad(rows: _Rows, bad: dict[int, str], dead: list[tuple[int, DeadLetter]]) -> list[int] | None:
        """Dead-letter the bad rows; the indices to keep, or None when every row is good."""
        if not bad:
            return None
        for i, reason in bad.items():
            dead.append((rows.positions[i], DeadLetter(rows.records[i], reason)))
        return [i for i in range(len(rows.ids)) if i not in bad]


def _pick(rows: _Rows, keep: list[int]) -> _Rows:
    """The rows at ``keep``, in order."""
    return _Rows(**{name: [getattr(rows, name)[i] for i in keep] for name in _Rows.__dataclass_fields__})
