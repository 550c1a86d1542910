"""Exact state restore (issue 6): a checkpoint carries the offsets it reflects, and is saved before the commit.

The pipeline is driven step by step over the file source and over the real
broker, and "killed" — an exception that skips every clean-up, like SIGKILL — at the two
dangerous moments: after a checkpoint was written but before its offsets were
committed, and while a checkpoint was being written. A restarted pipeline must
end with detector state identical to an uninterrupted run's and deliver every
finding of that run, with no record counted twice in a window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.assemble import build_pipeline
from agent.config import load_config
from agent.pipeline import Pipeline
from tests.conftest import create_topic, produce

N_RECORDS = 6_000


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way out handles it."""


def write_records(path: Path) -> None:
    """Tenants at a steady pace plus two clients that flood (query_rate flags them)."""
    with path.open("w") as fh:
        for i in range(N_RECORDS):
            client = f"flood-{i // 2000}" if i % 3 == 0 else f"tenant-{i % 41}"
            fh.write(json.dumps({"id": f"r{i}", "ts": 1763877600 + i * 0.01, "model": "m", "client_id": client,
                                 "input": [((i + d) % 7) / 7 for d in range(8)],
                                 "output": {"probs": [0.2, 0.8]}}) + "\n")


@pytest.fixture(params=["file", "kafka"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The YAML ``source:`` (and ``kafka:``) sections of a stream of the records above, as a file or a topic
    (``GROUP`` stands for the consumer group, one per run)."""
    path = tmp_path / "inference.jsonl"
    write_records(path)
    if request.param == "file":
        return f"source: {{type: file, inference_path: {path}, max_poll_records: 250}}"  # no group
    bootstrap = request.getfixturevalue("broker")
    topic = request.getfixturevalue("topic_name")
    create_topic(bootstrap, topic, partitions=1)  # one order of records, so states can be compared exactly
    produce(bootstrap, topic, path.read_bytes().splitlines())
    return f"""kafka: {{bootstrap_servers: "{bootstrap}"}}
source:
  topics: {{inference: [{topic}], feedback: [{topic}.fb]}}
  group_id: GROUP
  max_poll_records: 250
  session_timeout_ms: 6000
  heartbeat_interval_ms: 1000
  max_poll_interval_ms: 3000
deadletter: {{topic: {topic}.dead}}"""


def config(tmp: Path, source: str, name: str) -> Path:
    run = tmp / name
    run.mkdir()
    cfg = run / "agent.yaml"
    cfg.write_text(f"""
{source.replace("GROUP", f"{name}-{tmp.name}")}
artifacts: {tmp}/artifacts
state: {{dir: {run}/state, checkpoint_interval_s: 0.001}}
detectors:
  query_rate: {{window_s: 30, max_queries: 400}}
sinks:
  - {{type: jsonl, path: {run}/findings.jsonl}}
""")
    return cfg


def die_on_call(obj: object, method: str, nth: int) -> None:
    """Make the ``nth`` call of ``obj.method`` raise :class:`Killed` instead of running."""
    real, calls = getattr(obj, method), 0

    def dying(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth:
            raise Killed
        return real(*args)

    setattr(obj, method, dying)


def drive(pipeline: Pipeline) -> None:
    """The run loop without its clean exit, so a Killed leaves everything as a crash would."""
    idle = 0
    while idle < 20:  # a consumer group's first polls may be empty while it joins
        idle = 0 if pipeline.step() else idle + 1


def committed_position(cfg: Path, pipeline: Pipeline) -> dict[tuple[str, int], int]:
    """What the source would restart from without the checkpoint: the commit (file offsets or the group's)."""
    src = load_config(cfg).source
    if src.type == "file":
        saved = json.loads((cfg.parent / "state/file-offsets.json").read_text())
        return {(src.topics.inference[0], 0): saved.get(str(src.inference_path), 0)}
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=load_config(cfg).kafka.bootstrap_servers, group_id=src.group_id,
                      enable_auto_commit=False)
    try:
        return {tp: c.committed(TopicPartition(*tp)) or 0 for tp in pipeline.checkpoint.offsets}
    finally:
        c.close()


def finish(cfg: Path) -> dict[str, Any]:
    pipeline = build_pipeline(load_config(cfg))
    pipeline.run(until_idle_s=0.05)
    return {det.name: det.state_dict() for det in pipeline.detectors}


def findings(cfg: Path) -> list[str]:
    path = cfg.parent / "findings.jsonl"
    return [json.loads(line)["finding_info"]["uid"] for line in path.read_text().splitlines()]


def assert_same_tree(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}/{i}")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def test_kill_between_checkpoint_and_commit_restores_exact_state(tmp_path: Path, source: str) -> None:
    clean_cfg = config(tmp_path, source, "clean")
    clean_state = finish(clean_cfg)
    clean = findings(clean_cfg)
    assert len(clean) >= 2  # both floods flagged

    cfg = config(tmp_path, source, "crashed")
    pipeline = build_pipeline(load_config(cfg))
    die_on_call(pipeline.source, "commit", 4)  # the checkpoint for these offsets is already on disk
    with pytest.raises(Killed):
        drive(pipeline)
    checkpointed, committed = pipeline.checkpoint.offsets, committed_position(cfg, pipeline)
    pipeline.source.close()
    # the restart must skip what the state has seen
    assert any(checkpointed[tp] > committed.get(tp, 0) for tp in checkpointed), (checkpointed, committed)

    state = finish(cfg)
    assert_same_tree(clean_state, state)
    got = findings(cfg)
    assert set(got) == set(clean)
    # the batches processed while the checkpoint was being written are replayed: at most their finding again
    assert len(got) - len(set(got)) <= 1


def test_kill_while_checkpointing_replays_into_the_previous_state(tmp_path: Path, source: str) -> None:
    clean_cfg = config(tmp_path, source, "clean")
    clean_state = finish(clean_cfg)
    clean = findings(clean_cfg)

    cfg = config(tmp_path, source, "crashed")
    pipeline = build_pipeline(load_config(cfg))
    die_on_call(pipeline.checkpoint, "_write", 5)  # the atomic write never completes: the previous one stays
    with pytest.raises(Killed):
        drive(pipeline)
    pipeline.source.close()

    state = finish(cfg)
    assert_same_tree(clean_state, state)
    got = findings(cfg)
    assert set(got) == set(clean)
    assert len(got) - len(set(got)) <= 1  # the uncommitted batch is replayed: at most its finding again
