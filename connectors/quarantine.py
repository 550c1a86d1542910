"""Quarantine export: the feedback records a retraining pipeline must leave out.

The poisoning detector names suspicious feedback record ids in its findings
(``related_ids``, with per-record scores and, for backdoors, the trigger in the
evidence). A retraining job does not want OCSF alerts; it wants a list to
subtract. This sink (``type: quarantine``) takes only ``poisoning`` findings
and writes one JSON line per suspicious record id::

    {"id": "fb-812", "kind": "backdoor", "reason": "...", "source": "labeler-x", "model": "digits-mlp",
     "finding_uid": "iw-...", "detector": "poisoning", "attacks": ["AML.T0018.000", ...],
     "time": "2026-11-23T12:00:00.000Z", "time_ms": 1795...,
     "score": 9.1, "label": 0, "model_label": 3,
     "trigger": {"target_label": 0, "features": [54, 55, 62, 63], "values": [1.0, 1.0, 1.0, 1.0]}}

to a file (appended, fsync'd) and/or the Kafka topic ``inferwatch.quarantine``
(keyed by record id, so a compacted topic keeps one line per record). It is
idempotent per (record id, finding uid): the detector re-raises a growing
finding under the same uid, and only the records not written before go out.
The file is read back at start so a restart does not write duplicates. This is
also the file ``inferwatch audit --quarantine`` reads trigger candidates from.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kafka import KafkaProducer
from kafka.errors import KafkaError
from pydantic import Field, model_validator

from agent.findings import Finding
from connectors._append import append_whole_lines
from connectors.kafka_options import KafkaOptions
from connectors.sink import ExportResult, Sink, SinkOptions

log = logging.getLogger(__name__)
FAMILY = "poisoning"


class QuarantineOptions(SinkOptions):
    type: Literal["quarantine"] = "quarantine"
    path: Path | None = Field(None, description="JSONL file the quarantine lines are appended to")
    kafka: KafkaOptions | None = Field(None, description="connection settings; the topic is written when set")
    topic: str = Field("inferwatch.quarantine", min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")
    fsync: bool = True
    acks: Literal["all", 1] = "all"
    delivery_timeout_s: float = Field(30.0, gt=0, description="how long one export waits for the acks")
    max_block_s: float = Field(10.0, gt=0, description="how long connecting or send() may wait for the broker")
    max_remembered: int = Field(1_000_000, ge=1000,
                                description="(record id, finding uid) pairs remembered for idempotence")

    @model_validator(mode="after")
    def _somewhere(self) -> QuarantineOptions:
        if self.path is None and self.kafka is None:
            raise ValueError("a quarantine sink needs `path:` (a JSONL file), `kafka:` (the topic), or both")
        return self


class _Remembered:
    """Bounded set of written (id, finding uid) keys; the oldest are forgotten first."""

    def __init__(self, limit: int):
        self.limit = limit
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._keys

    def add(self, key: tuple[str, str]) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)


def quarantine_lines(finding: Finding) -> list[dict[str, Any]]:
    """One quarantine line per record id the finding names (empty for other families)."""
    if finding.family != FAMILY:
        return []
    ev = finding.evidence or {}
    kind = str(ev.get("kind") or "suspicious")
    per_record = {r.get("id"): r for r in ev.get("records", []) if isinstance(r, dict)}
    trigger = None
    spec = ev.get("trigger")
    if kind == "backdoor" and isinstance(spec, dict) and spec.get("trigger_features"):
        trigger = {"target_label": spec.get("target_label"), "features": spec.get("trigger_features"),
                   "values": spec.get("trigger_values")}
    when = datetime.fromtimestamp(finding.time_ms / 1000, UTC).isoformat(timespec="milliseconds")
    out = []
    for rid in finding.related_ids:
        line: dict[str, Any] = {
            "id": rid, "kind": kind, "reason": finding.title, "source": finding.actor, "model": finding.model,
            "finding_uid": finding.uid, "detector": finding.detector, "attacks": list(finding.attacks),
            "time": when.replace("+00:00", "Z"), "time_ms": finding.time_ms,
        }
        rec = per_record.get(rid)
        if rec is not None:
            for key in ("score", "label", "model_label"):
                if key in rec:
                    line[key] = rec[key]
        if trigger is not None:
            line["trigger"] = trigger
        out.append(line)
    return out


class QuarantineSink(Sink):
    type_name = "quarantine"
    Options = QuarantineOptions

    def __init__(self, options: QuarantineOptions):
        super().__init__(options)
        self.options: QuarantineOptions = options
        self._producer: KafkaProducer | None = None
        self._file_seen = _Remembered(options.max_remembered)
        self._topic_seen = _Remembered(options.max_remembered)
        self._fh = None
        self.counters = {"lines_written": 0, "records_sent": 0, "duplicates_skipped": 0}
        if options.path is not None:
            options.path.parent.mkdir(parents=True, exist_ok=True)
            self._remember_file(options.path)
            # unbuffered, as the JSONL findings sink: a failed write leaves nothing behind in a buffer
            self._fh = open(options.path, "ab", buffering=0)  # noqa: SIM115 - kept open for the sink's lifetime

    def _remember_file(self, path: Path) -> None:
        """Lines already in the file (from before a restart) are not written again."""
        if not path.is_file():
            return
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    obj = json.loads(raw)
                    self._file_seen.add((str(obj["id"]), str(obj["finding_uid"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash: its records are written again

    def accepts(self, finding: Finding) -> bool:
        return finding.family == FAMILY and super().accepts(finding)

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        lines = [line for f in findings for line in quarantine_lines(f)]
        if not lines:
            return ExportResult.SUCCESS
        ok = True
        if self._fh is not None:
            ok = self._write_file(lines) and ok
        if self.options.kafka is not None:
            ok = self._send_topic(lines) and ok
        return ExportResult.SUCCESS if ok else ExportResult.FAILURE

    def _write_file(self, lines: list[dict[str, Any]]) -> bool:
        fresh, keys = [], []
        for line in lines:
            key = (line["id"], line["finding_uid"])
            if key in self._file_seen or key in keys:
                self.counters["duplicates_skipped"] += 1
                continue
            keys.append(key)
            fresh.append(line)
        if not fresh:
            return True
        data = b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in fresh)
        if not append_whole_lines(self._fh, self.options.path, data, self.options.fsync, self.name):
            return False
        for key in keys:
            self._file_seen.add(key)
        self.counters["lines_written"] += len(fresh)
        return True

    def _connect(self) -> KafkaProducer:
        o = self.options
        assert o.kafka is not None
        kw: dict[str, Any] = o.kafka.client_kwargs()
        kw["client_id"] = f"{o.kafka.client_id}-quarantine"
        delivery_ms = int(o.delivery_timeout_s * 1000)
        kw["request_timeout_ms"] = min(kw["request_timeout_ms"], delivery_ms)
        return KafkaProducer(acks=-1 if o.acks == "all" else o.acks, enable_idempotence=False,  # see deadletter.py
                             linger_ms=5, delivery_timeout_ms=delivery_ms + 5, max_block_ms=int(o.max_block_s * 1000),
                             bootstrap_timeout_ms=int(o.max_block_s * 1000), **kw)

    def _send_topic(self, lines: list[dict[str, Any]]) -> bool:
        sent: list[tuple[tuple[str, str], Any]] = []
        try:
            if self._producer is None:
                self._producer = self._connect()
            for line in lines:
                key = (line["id"], line["finding_uid"])
                if key in self._topic_seen or any(k == key for k, _ in sent):
                    continue
                headers = [("content-type", b"application/json"), ("finding-uid", line["finding_uid"].encode())]
                fut = self._producer.send(self.options.topic, key=line["id"].encode(), headers=headers,
                                          value=json.dumps(line, separators=(",", ":")).encode())
                sent.append((key, fut))
            self._producer.flush(timeout=self.options.delivery_timeout_s + 5)
        except KafkaError as exc:
            log.warning("sink %s: producing to %s failed: %s: %s", self.name, self.options.topic,
                        type(exc).__name__, exc)
            return False
        ok = True
        for key, fut in sent:
            if fut.is_done and not fut.failed():
                self._topic_seen.add(key)
                self.counters["records_sent"] += 1
            else:
                ok = False
        if not ok:
            log.warning("sink %s: some quarantine records were not acknowledged by %s; will retry",
                        self.name, self.options.topic)
        return ok

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        if self._producer is None:
            return True
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError:
            return False
        return True

    def shutdown(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None
