"""The Kafka alert-topic sink against a real broker (the session's Tansu, from ``conftest.broker``)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from agent.delivery import Delivery, DeliveryOptions
from agent.findings import Finding, Severity
from connectors.kafka_alerts import KafkaAlertOptions, KafkaAlertSink
from connectors.sink import ExportResult
from tests.conftest import create_topic

pytestmark = pytest.mark.integration


def finding(i: int, actor: str | None) -> Finding:
    return Finding(family="extraction", detector="query-rate", title=f"extraction {i}", severity=Severity.HIGH,
                   actor=actor, model="digits-cnn", related_ids=(f"req-{i}",), window=f"w{i}",
                   evidence={"queries": 100 + i}, attacks=("AML.T0024.002",), time_ms=1_763_877_600_000 + i)


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    """Every record of partition 0, read without a consumer group (no rebalance wait)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=500)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def test_findings_are_acknowledged_ocsf_records_keyed_by_actor(broker: str, topic_name: str) -> None:
    topic = f"{topic_name}.findings"
    create_topic(broker, topic, partitions=1)
    sink = KafkaAlertSink(KafkaAlertOptions(type="kafka", topic=topic, kafka={"bootstrap_servers": broker}))
    try:
        findings = [finding(0, "tenant-7"), finding(1, None), finding(2, "tenant-9")]
        assert sink.export(findings) is ExportResult.SUCCESS  # returns only after acks=all
        records = read_all(broker, topic, 3)
    finally:
        sink.shutdown()
    assert [json.loads(r.value)["finding_info"]["uid"] for r in records] == [f.uid for f in findings]
    assert [r.key for r in records] == [b"tenant-7", b"digits-cnn", b"tenant-9"]
    value = json.loads(records[0].value)
    assert value["class_uid"] == 2004 and value["finding_info"]["attacks"][0]["sub_technique"]["uid"] == \
        "AML.T0024.002"
    headers = dict(records[0].headers)
    assert headers["content-type"] == b"application/json" and headers["finding-uid"] == findings[0].uid.encode()


def test_delivery_to_the_alert_topic_keeps_order(broker: str, topic_name: str, tmp_path: Path) -> None:
    topic = f"{topic_name}.findings"
    create_topic(broker, topic, partitions=1)
    sink = KafkaAlertSink(KafkaAlertOptions(type="kafka", name="alerts", topic=topic,
                                            kafka={"bootstrap_servers": broker}))
    delivery = Delivery([sink], DeliveryOptions(batch_size=7), tmp_path)
    findings = [finding(i, f"client-{i % 3}") for i in range(30)]
    try:
        for k in range(0, 30, 10):
            assert delivery.deliver(findings[k:k + 10])
        assert delivery.flush(10)
        assert delivery.stats()["sinks"]["alerts"]["delivered"] == 30
    finally:
        delivery.shutdown()
    records = read_all(broker, topic, 30)
    assert [json.loads(r.value)["finding_info"]["title"] for r in records] == [f.title for f in findings]


def test_unreachable_broker_is_a_failure_not_an_exception() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = KafkaAlertSink(KafkaAlertOptions(type="kafka", kafka={"bootstrap_servers": f"127.0.0.1:{port}"},
                                            max_block_s=1, delivery_timeout_s=1))
    t0 = time.monotonic()
    assert sink.export([finding(0, "a")]) is ExportResult.FAILURE
    assert time.monotonic() - t0 < 15
    sink.shutdown()
