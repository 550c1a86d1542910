"""Shared fixtures: a real Tansu broker on a free loopback port, and Kafka helpers."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from agent.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address ``127.0.0.1:PORT`` of a real broker, shared by the session.

    Tests isolate themselves by using their own topic names (see ``topic_name``).
    """
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b.bootstrap


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic prefix unique to this test, so tests never read each other's records."""
    import uuid

    return f"t-{request.node.name[:30]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")


def produce(bootstrap: str, topic: str, values: list[bytes | dict], headers=None, key=None) -> None:
    """Produce values (dicts are JSON-encoded) and wait until the broker has them all."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", max_request_size=16 << 20)
    try:
        for v in values:
            body = json.dumps(v).encode() if isinstance(v, dict) else v
            p.send(topic, body, headers=headers or [], key=key)
        p.flush(timeout=60)
    finally:
        p.close()


def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()
