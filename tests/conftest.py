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


def agent_config(directory, topic: str, *, kafka: str, detectors: str, sinks: str | None = None, extra: str = "",
                 max_poll_interval_ms: int = 3000, name: str = "agent.yaml"):
    """Write an agent configuration for end-to-end tests: topics ``TOPIC.inference|feedback|dead``, group
    ``TOPIC-group``, state and artifacts under ``directory``, findings in ``directory/out/findings.ocsf.jsonl``.

    ``kafka`` is the YAML flow mapping of the ``kafka:`` section; ``detectors`` and ``sinks`` are YAML
    lines indented under their section; ``extra`` is appended as top-level YAML.
    """
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sinks = sinks or f"  - type: jsonl\n    path: {directory}/out/findings.ocsf.jsonl"
    path = directory / name
    path.write_text(f"""kafka: {kafka}
source:
  topics: {{inference: [{topic}.inference], feedback: [{topic}.feedback]}}
  group_id: {topic}-group
  session_timeout_ms: 6000
  heartbeat_interval_ms: 1000
  max_poll_interval_ms: {max_poll_interval_ms}
deadletter: {{topic: {topic}.dead}}
artifacts: {directory}/artifacts
state: {{dir: {directory}/state}}
detectors:
{detectors}
sinks:
{sinks}
{extra}""")
    return path
