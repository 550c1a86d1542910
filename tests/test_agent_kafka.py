"""End to end against a real broker: the agent's at-least-once contract (issue 2's "done means").

5,000 valid records and 50 broken ones in: exactly 50 dead-lettered with their
reason, the group's lag 0 at exit, every finding line a valid OCSF Detection
Finding, and a restart consumes nothing twice that was committed.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tests.conftest import agent_config, create_topic
from tests.test_ocsf import validate_ocsf

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def event(i: int, client: str, ts: float) -> dict:
    return {"id": f"req-{i}", "ts": ts, "model": "digits-cnn", "client_id": client,
            "input": [round((i * 7 + j) % 17 / 16, 4) for j in range(64)],
            "output": {"probs": [0.1] * 10}}


def broken_records() -> list[tuple[bytes, str]]:
    good = event(0, "c", 1.0)
    out: list[tuple[bytes, str]] = []
    for k in range(10):
        out.append((b"{not json" + str(k).encode(), "not JSON"))
        out.append((json.dumps({**good, "id": f"short-{k}", "input": [0.1] * 63}).encode(), "input"))
        nan = json.dumps({**good, "id": f"nan-{k}"}).replace('"input": [0.0', '"input": [NaN', 1)
        out.append((nan.encode(), "input"))
        missing = dict(good)
        del missing["client_id"]
        out.append((json.dumps(missing).encode(), "client_id"))
    for _ in range(9):
        out.append((json.dumps({**good, "input": "seven"}).encode(), "input"))
    out.append((b'{"id": "huge", "input": [' + b"0.5, " * 2_100_000 + b'0.5]}', "bytes"))  # ~10.5 MB
    return out


def produce_all(bootstrap: str, topic: str, values: list[bytes]) -> dict[int, int]:
    """Produce in order; returns the next offset per partition (what a caught-up group must have committed)."""
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", max_request_size=16 << 20)
    futures = [p.send(topic, v) for v in values]
    p.flush(timeout=120)
    ends: dict[int, int] = {}
    for f in futures:
        md = f.get(timeout=30)
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    p.close()
    return ends


def write_config(tmp_path: Path, bootstrap: str, topic: str) -> Path:
    return agent_config(tmp_path, topic, kafka=f'{{bootstrap_servers: "{bootstrap}"}}',
                        detectors="  query_rate: {window_s: 60, max_queries: 500}")


def run_agent(cfg: Path, idle_s: float = 4.0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "agent", "run", "-c", str(cfg), "--until-idle", str(idle_s)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def consumed(stderr: str) -> int:
    line = next(ln for ln in stderr.splitlines() if "consumed " in ln)
    return int(line.split("consumed ")[1].split()[0])


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)}
    finally:
        c.close()


def read_dead_letters(bootstrap: str, topic: str, expect: int) -> list:
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                      consumer_timeout_ms=5000, fetch_max_bytes=64 << 20)
    c.assign([TopicPartition(topic, 0)])
    c.seek_to_beginning()
    out = []
    for rec in c:
        out.append(rec)
        if len(out) >= expect + 5:
            break
    c.close()
    return out


def test_valid_broken_lag_ocsf_and_restart(broker: str, topic_name: str, tmp_path: Path) -> None:
    topic = topic_name
    create_topic(broker, f"{topic}.inference", partitions=4)
    create_topic(broker, f"{topic}.feedback", partitions=1)
    create_topic(broker, f"{topic}.dead", partitions=1)

    rng = random.Random(7)
    valid = [event(i, "flooder" if i % 5 == 0 else f"tenant-{i % 300}", 1763877600 + i * 0.01) for i in range(5000)]
    values = [json.dumps(v).encode() for v in valid]
    broken = broken_records()
    for raw, _ in broken:
        values.insert(rng.randrange(len(values)), raw)
    ends = produce_all(broker, f"{topic}.inference", values)

    cfg = write_config(tmp_path, broker, topic)
    first = run_agent(cfg)
    assert consumed(first.stderr) == 5050

    # exactly the 50 broken records were dead-lettered, each with a reason that says what is wrong
    dead = read_dead_letters(broker, f"{topic}.dead", 50)
    assert len(dead) == 50
    reasons = [dict(d.headers)["inferwatch.reason"].decode() for d in dead]
    assert sum(r.startswith("not JSON: Expecting") for r in reasons) == 10
    assert sum("NaN" in r for r in reasons) == 10
    assert sum(r == "input: expected 64 numbers, got 63" for r in reasons) == 10
    assert sum(r.startswith("client_id:") for r in reasons) == 10
    assert sum(r.startswith("input: expected an array") for r in reasons) == 9
    assert sum("over max_record_bytes=1048576" in r for r in reasons) == 1
    huge = next(d for d in dead if "max_record_bytes" in dict(d.headers)["inferwatch.reason"].decode())
    assert len(huge.value) <= 262_144 and dict(huge.headers)["inferwatch.truncated"] == b"true"

    # the group is caught up: committed == end offset on every partition (lag 0)
    assert committed(broker, f"{topic}-group", f"{topic}.inference", 4) == {p: ends.get(p, 0) for p in range(4)}

    # every finding line is a valid OCSF Detection Finding; the flooder was caught
    lines = (tmp_path / "out/findings.ocsf.jsonl").read_text().splitlines()
    assert lines, "the flooding client should have produced a finding"
    for line in lines:
        obj = json.loads(line)
        validate_ocsf(obj)
        assert obj["class_uid"] == 2004 and obj["finding_info"]["types"][0] in ("extraction",)
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in obj["evidences"][0]["data"].values())
    assert {json.loads(ln)["actor"]["user"]["uid"] for ln in lines} == {"flooder"}

    # restart: only the new records are consumed; nothing committed is read twice
    more = [json.dumps(event(10_000 + i, f"tenant-{i}", 1763890000 + i)).encode() for i in range(100)]
    ends2 = produce_all(broker, f"{topic}.inference", more)
    second = run_agent(cfg)
    assert consumed(second.stderr) == 100
    final = committed(broker, f"{topic}-group", f"{topic}.inference", 4)
    assert final == {p: max(ends.get(p, 0), ends2.get(p, 0)) for p in range(4)}
    assert (tmp_path / "state/checkpoint.npz").is_file()  # detector state was checkpointed at exit
