"""Decoding in a worker process, one batch ahead (agent/decode_ahead.py).

The worker must hand back exactly what inline decoding gives, in poll order,
hold a batch back only when the poll was full (a backlog, where overlapping
pays), and lose nothing when the worker dies. The pipeline-level contract
(exact state and findings across crashes) runs with the worker on in
tests/test_checkpoint.py, since the worker is the default.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.assemble import build_pipeline
from agent.config import load_config
from agent.decode_ahead import InlineDecoding, WorkerDecoding, build_decoding
from agent.records import DecodedBatch, RawRecord
from connectors.native_format import DecodeSpec, NativeDecoder

TOPIC = "t.inference"


def records(start: int, n: int) -> list[RawRecord]:
    """Good records with a broken one every 7th (they must come back as dead letters, in order)."""
    out = []
    for i in range(start, start + n):
        value = b"{not json" if i % 7 == 3 else json.dumps(
            {"id": f"r{i}", "ts": 1763877600 + i, "model": "m", "client_id": f"c{i % 5}",
             "input": [i % 3, 0.5, 1.0], "output": {"probs": [0.25, 0.75]}}).encode()
        out.append(RawRecord(TOPIC, i % 2, i, value, key=b"k", headers=(("h", b"v"),), timestamp_ms=i))
    return out


def decoder() -> NativeDecoder:
    return NativeDecoder(DecodeSpec(inference_topics=frozenset({TOPIC}), feedback_topics=frozenset(),
                                    input_dim=3, max_record_bytes=1 << 20, model=None, n_classes=2))


def assert_same(a: DecodedBatch, b: DecodedBatch) -> None:
    assert a.inference is not None and b.inference is not None
    for field in ("ids", "models", "clients", "model_versions", "traceparents"):
        assert getattr(a.inference, field) == getattr(b.inference, field)
    for field in ("ts", "X", "probs", "labels"):
        np.testing.assert_array_equal(getattr(a.inference, field), getattr(b.inference, field))
    assert a.dead == b.dead  # same records (topic, offset, value, headers...) and the same reasons


@pytest.fixture
def worker():
    w = WorkerDecoding(decoder(), full_batch=10)
    yield w
    w.close()


def test_the_worker_decodes_exactly_what_inline_decoding_does(worker: WorkerDecoding) -> None:
    inline = InlineDecoding(decoder())
    for start in (0, 10, 20):
        batch = records(start, 10)
        ready = worker.exchange(batch, flush=True)
        assert ready is not None and ready.records == batch
        assert_same(ready.batch, inline.exchange(batch).batch)
        assert ready.batch.dead  # the broken records took the dead-letter path


def test_a_full_poll_is_held_back_one_batch_and_comes_back_in_order(worker: WorkerDecoding) -> None:
    first, second, third = records(0, 10), records(10, 10), records(20, 4)
    assert worker.exchange(first) is None and worker.ahead == 1      # full: a backlog, overlap it
    assert worker.exchange(second).records == first                   # the older one comes back first
    assert worker.exchange(third).records == second                   # not full: ...
    assert worker.ahead == 1
    assert worker.exchange([]).records == third                        # ... an empty poll flushes
    assert worker.ahead == 0 and worker.exchange([]) is None


def test_drain_returns_every_batch_in_flight(worker: WorkerDecoding) -> None:
    assert worker.exchange(records(0, 10)) is None
    assert [r.records[0].offset for r in worker.drain()] == [0]
    assert worker.ahead == 0 and worker.drain() == []


def test_a_dead_worker_loses_nothing(worker: WorkerDecoding, caplog: pytest.LogCaptureFixture) -> None:
    inline = InlineDecoding(decoder())
    held = records(0, 10)
    assert worker.exchange(held) is None
    worker.exchange(records(10, 10))  # make sure the worker is up and answering before it dies
    os.kill(worker._worker.pid, signal.SIGKILL)
    worker._worker.join(5)
    with caplog.at_level(logging.ERROR):
        later = [worker.exchange(records(20, 10)), worker.exchange([], flush=True)]
    assert [r.records[0].offset for r in later] == [10, 20]
    assert_same(later[1].batch, inline.exchange(records(20, 10)).batch)
    assert "decode worker lost" in caplog.text


def test_only_the_native_decoder_goes_to_a_worker() -> None:
    class Stateful:  # the KServe decoder joins halves across batches: its state stays with the pipeline
        def decode(self, recs):
            return DecodedBatch()

    assert isinstance(build_decoding(Stateful(), True, 10), InlineDecoding)
    assert isinstance(build_decoding(decoder(), False, 10), InlineDecoding)
    w = build_decoding(decoder(), True, 10)
    try:
        assert isinstance(w, WorkerDecoding)
    finally:
        w.close()


def run_agent(tmp: Path, name: str, data: Path, decode_worker: bool) -> tuple[list[str], int]:
    run = tmp / name
    run.mkdir()
    (run / "agent.yaml").write_text(f"""
source: {{type: file, inference_path: {data}, max_poll_records: 100, decode_worker: {str(decode_worker).lower()}}}
artifacts: {tmp}/artifacts
state: {{dir: {run}/state}}
detectors:
  query_rate: {{window_s: 30, max_queries: 100}}
sinks:
  - {{type: jsonl, path: {run}/findings.jsonl}}
""")
    pipeline = build_pipeline(load_config(run / "agent.yaml"))
    counters = pipeline.run(until_idle_s=0.05)
    uids = [json.loads(line)["finding_info"]["uid"] for line in (run / "findings.jsonl").read_text().splitlines()]
    return uids, counters.records


def test_the_agent_finds_the_same_with_and_without_the_worker(tmp_path: Path) -> None:
    data = tmp_path / "inference.jsonl"
    data.write_bytes(b"\n".join(r.value for r in records(0, 2_050)) + b"\n")
    for i in range(600):  # one client floods: query_rate flags it
        data.open("a").write(json.dumps({"id": f"f{i}", "ts": 1763877600 + 2_050 + i * 0.01, "model": "m",
                                          "client_id": "flood", "input": [1, 0, 0],
                                          "output": {"probs": [0.5, 0.5]}}) + "\n")
    inline, n_inline = run_agent(tmp_path, "inline", data, decode_worker=False)
    ahead, n_ahead = run_agent(tmp_path, "worker", data, decode_worker=True)
    assert n_inline == n_ahead == 2_650
    assert inline and ahead == inline


def test_a_stop_signal_to_the_whole_process_group_leaves_the_worker_to_the_agent(worker: WorkerDecoding) -> None:
    """systemd sends SIGTERM to every process of the service: the worker must outlive it until the agent has
    processed what it holds and closed the pipe."""
    assert worker.exchange(records(0, 10), flush=True) is not None  # the worker is up, its handlers set
    assert worker.exchange(records(10, 10)) is None
    os.kill(worker._worker.pid, signal.SIGTERM)
    os.kill(worker._worker.pid, signal.SIGINT)
    ready = worker.exchange(records(20, 10))
    assert ready.records[0].offset == 10 and not worker._broken and worker._worker.is_alive()
    worker.close()
    assert not worker._worker.is_alive() and worker._worker.exitcode == 0


def test_a_process_that_never_closes_its_worker_still_exits(tmp_path: Path) -> None:
    """At exit multiprocessing SIGTERMs and joins daemonic children; the worker ignores SIGTERM, so without the
    agent's own exit hook closing the pipe first, the interpreter would wait for ever (it did: a CI run hung)."""
    script = tmp_path / "leak.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from tests.test_decode_ahead import decoder, records\n"
        "from agent.decode_ahead import WorkerDecoding\n"
        "if __name__ == '__main__':\n"
        "    w = WorkerDecoding(decoder(), full_batch=10)\n"
        "    assert w.exchange(records(0, 10), flush=True) is not None\n"
        "    print(w._worker.pid, flush=True)\n")  # exits without w.close()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
