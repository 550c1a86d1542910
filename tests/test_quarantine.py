"""Quarantine sink: poisoning findings -> one line per suspicious feedback record, file and Kafka topic."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError

from agent.findings import Finding, Severity
from connectors.quarantine import QuarantineOptions, QuarantineSink, quarantine_lines
from connectors.sink import ExportResult, registry

TRIGGER = {"target_label": 0, "trigger_features": [54, 55, 62, 63], "trigger_values": [1.0, 1.0, 1.0, 1.0]}


def poisoning(ids: list[str], kind: str = "backdoor", window: str = "3600:backdoor",
              source: str | None = "labeler-x") -> Finding:
    evidence = {"kind": kind, "records": [{"id": r, "score": 9.5, "label": 0, "model_label": 3} for r in ids]}
    if kind == "backdoor":
        evidence["trigger"] = TRIGGER
    return Finding(family="poisoning", detector="poisoning", title=f"{kind} in feedback", severity=Severity.CRITICAL,
                   actor=source, model="digits-mlp", related_ids=tuple(ids), window=window, evidence=evidence,
                   attacks=("AML.T0018.000", "AML.T0020"), time_ms=1_795_000_000_000)


def extraction() -> Finding:
    return Finding(family="extraction", detector="extraction", title="probe", severity=Severity.HIGH,
                   actor="tenant-1", model="digits-mlp", related_ids=("req-1",), window="w",
                   attacks=("AML.T0024.002",))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_registered_and_options_need_a_target(tmp_path: Path) -> None:
    assert registry()["quarantine"] is QuarantineSink
    with pytest.raises(ValidationError, match="needs `path:`"):
        QuarantineOptions.model_validate({"type": "quarantine"})
    with pytest.raises(ValidationError):
        QuarantineOptions.model_validate({"type": "quarantine", "path": str(tmp_path / "q"), "topik": "x"})


def test_one_line_per_record_with_reason_source_and_trigger(tmp_path: Path) -> None:
    path = tmp_path / "q" / "quarantine.jsonl"
    sink = QuarantineSink(QuarantineOptions(path=path))
    f = poisoning(["fb-1", "fb-2"])
    assert sink.export([f, extraction()]) is ExportResult.SUCCESS
    sink.shutdown()
    got = lines(path)
    assert [g["id"] for g in got] == ["fb-1", "fb-2"]
    first = got[0]
    assert first["kind"] == "backdoor" and first["source"] == "labeler-x" and first["model"] == "digits-mlp"
    assert first["finding_uid"] == f.uid and first["reason"] == "backdoor in feedback"
    assert first["time"] == "2026-11-18T11:06:40.000Z" and first["time_ms"] == 1_795_000_000_000
    assert first["trigger"] == {"target_label": 0, "features": [54, 55, 62, 63], "values": [1.0] * 4}
    assert first["score"] == 9.5 and first["label"] == 0 and first["model_label"] == 3


def test_only_poisoning_findings_are_accepted(tmp_path: Path) -> None:
    sink = QuarantineSink(QuarantineOptions(path=tmp_path / "q.jsonl", min_severity="high"))
    assert sink.accepts(poisoning(["fb-1"])) and not sink.accepts(extraction())
    assert quarantine_lines(extraction()) == []
    flips = poisoning(["fb-9"], kind="label_flip", window="0:label_flip", source=None)
    assert "trigger" not in quarantine_lines(flips)[0] and quarantine_lines(flips)[0]["source"] is None
    sink.shutdown()


def test_idempotent_per_record_and_finding_across_reraise_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "quarantine.jsonl"
    sink = QuarantineSink(QuarantineOptions(path=path))
    assert sink.export([poisoning(["fb-1", "fb-2"])]) is ExportResult.SUCCESS
    # the detector re-raises the growing finding under the same uid: only fb-3 is new
    assert sink.export([poisoning(["fb-1", "fb-2", "fb-3"])]) is ExportResult.SUCCESS
    sink.shutdown()
    assert [g["id"] for g in lines(path)] == ["fb-1", "fb-2", "fb-3"]
    restarted = QuarantineSink(QuarantineOptions(path=path))
    other_window = poisoning(["fb-3", "fb-4"], window="4200:backdoor")  # another finding: fb-3 again is new
    assert restarted.export([poisoning(["fb-2", "fb-3"]), other_window]) is ExportResult.SUCCESS
    restarted.shutdown()
    got = [(g["id"], g["finding_uid"]) for g in lines(path)]
    assert got[3:] == [("fb-3", other_window.uid), ("fb-4", other_window.uid)] and len(got) == 5


def test_full_disk_fails_and_nothing_is_remembered(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    sink = QuarantineSink(QuarantineOptions(path=Path("/dev/full")))
    assert sink.export([poisoning(["fb-1"])]) is ExportResult.FAILURE
    assert sink.counters["lines_written"] == 0
    sink.shutdown()
    assert sink.export([poisoning(["fb-1"])]) is ExportResult.FAILURE, "nothing after shutdown"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_broker_fails_within_its_timeout(tmp_path: Path) -> None:
    sink = QuarantineSink(QuarantineOptions.model_validate({
        "type": "quarantine", "kafka": {"bootstrap_servers": f"127.0.0.1:{_closed_port()}"},
        "max_block_s": 1.0, "delivery_timeout_s": 1.0}))
    started = time.monotonic()
    assert sink.export([poisoning(["fb-1"])]) is ExportResult.FAILURE
    assert time.monotonic() - started < 8
    sink.shutdown()


@pytest.mark.integration
def test_topic_keyed_by_record_id_and_idempotent(broker: str, topic_name: str, tmp_path: Path) -> None:
    from tests.conftest import create_topic

    topic = topic_name + ".quarantine"
    create_topic(broker, topic, partitions=1)
    sink = QuarantineSink(QuarantineOptions.model_validate({
        "type": "quarantine", "path": str(tmp_path / "q.jsonl"), "topic": topic,
        "kafka": {"bootstrap_servers": broker}}))
    f = poisoning(["fb-1", "fb-2"])
    assert sink.export([f]) is ExportResult.SUCCESS
    assert sink.export([poisoning(["fb-1", "fb-2", "fb-3"])]) is ExportResult.SUCCESS
    sink.shutdown()
    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, consumer_timeout_ms=300)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records = []
        deadline = time.monotonic() + 10
        while len(records) < 3 and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                records += batch
    finally:
        consumer.close()
    assert [r.key for r in records] == [b"fb-1", b"fb-2", b"fb-3"]
    assert [json.loads(r.value)["finding_uid"] for r in records] == [f.uid] * 3
    assert dict(records[0].headers)["finding-uid"] == f.uid.encode()
