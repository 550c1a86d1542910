"""``inferwatch bench``: throughput and latency against a real broker, beside the ceiling.

In one run, on one embedded broker:

1. **ceiling** — the same kafka-python consumer and decoder the agent uses, doing
   nothing but consume + decode;
2. **agent** — the whole pipeline (every detector, the file sink, commits), as configured by default:
   decoding in a worker process one poll ahead (``source.decode_worker``);
3. **each detector alone** — on the decoded batches, no broker (batch 512);
4. **scale-out** — one vs two agent processes in one group, one core each (``decode_worker: false``);
5. **latency** — records offered at a fixed rate, time from produce to the
   end of the batch that processed them (when their findings are delivered).

``--detectors-only`` runs 3 alone, without a broker, in about 30 s on two cores: the best of
``DETECTOR_PASSES`` passes, each with freshly loaded detectors (a second pass over the
same records would be a stream of exact repeats). On a shared machine a single pass
varies a lot from run to run; the best of several much less.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.broker import EmbeddedBroker
from agent.device import configure_cpu_threads, resolve_device

TOPIC = "bench.inference"
T0 = 1_763_877_600.0  # event time of the first produced record; records are 0.5 ms apart (2,000/s)
DETECTOR_PASSES = 5  # --detectors-only: the best of this many passes


def _reference(dim: int, n_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """64 features: real digits. Other widths: class-conditional Gaussian blobs in [0, 1]."""
    if dim == 64:
        from agent.scenarios.data import load

        ds = load("digits")
        return ds.X_train, ds.y_train, ds.input_shape
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.2, 0.8, (n_classes, dim)).astype(np.float32)
    y = rng.integers(0, n_classes, 3000)
    X = np.clip(centers[y] + rng.normal(0, 0.08, (3000, dim)), 0, 1).astype(np.float32)
    return X, y, (dim,)


def _records(X: np.ndarray, probs: np.ndarray, n: int, seed: int = 1) -> list[bytes]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(X), n)
    out = []
    for i, r in enumerate(rows.tolist()):
        out.append(json.dumps({"id": f"b-{i}", "ts": T0 + i / 2000.0, "model": "bench", "client_id": f"c-{i % 500}",
                               "input": np.round(X[r], 4).tolist(),
                               "output": {"probs": np.round(probs[r], 4).tolist()}}).encode())
    return out


def _produce(bootstrap: str, topic: str, values: list[bytes], partitions: int | None = None) -> float:
    """Produce ``values``; with ``partitions``, round-robin over them (the default sticky partitioner fills
    one partition per batch, so partitions end up uneven and one member of a group gets more work)."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20, acks=1,
                      max_request_size=32 << 20)
    t0 = time.perf_counter()
    for i, v in enumerate(values):
        p.send(topic, v, partition=None if partitions is None else i % partitions)
    p.flush()
    p.close()
    return time.perf_counter() - t0


def _config(tmp: Path, bootstrap: str, group: str, device: str, detectors: list[str]) -> Path:
    dets = "\n".join(f"  {d}: {{}}" for d in detectors)
    path = tmp / f"{group}.yaml"
    path.write_text(f"""
kafka: {{bootstrap_servers: "{bootstrap}"}}
source:
  topics: {{inference: [{TOPIC}], feedback: [bench.feedback]}}
  group_id: {group}
  session_timeout_ms: 6000
  heartbeat_interval_ms: 1000
  max_poll_interval_ms: 3000
  max_poll_records: 2048
  poll_timeout_ms: 100
  max_record_bytes: 8388608
deadletter: {{topic: bench.deadletter}}
artifacts: {tmp}/artifacts
state: {{dir: {tmp}/state-{group}}}
device: {device}
telemetry: {{enabled: false}}
detectors:
{dets}
sinks:
  - {{type: jsonl, path: "{tmp}/findings-{group}.jsonl", fsync: false}}
""")
    return path


def _drain(step, total: int, timeout_s: float = 600) -> float:
    """Call ``step()`` until ``total`` records were consumed; seconds from the first record on."""
    got, t_first = 0, None
    deadline = time.monotonic() + timeout_s
    while got < total and time.monotonic() < deadline:
        n = step()
        if n and t_first is None:
            t_first = time.perf_counter()  # the clock starts once the group has joined and records flow
        got += n
    if got < total:
        raise RuntimeError(f"bench: only {got} of {total} records consumed within {timeout_s} s")
    return time.perf_counter() - (t_first or time.perf_counter())


def run_bench(events: int = 200_000, device: str = "auto", features: int = 64, as_json: bool = False,
              scale_out: bool = True, detectors_only: bool = False) -> int:
    from kafka.admin import KafkaAdminClient, NewTopic

    from agent.artifacts import load_detectors, train
    from agent.assemble import build_decoder, build_pipeline, build_source
    from agent.config import load_config
    from agent.decode_ahead import build_decoding
    from detectors.base import registry

    dev = resolve_device(device)
    configure_cpu_threads(None)  # as the agent runs (agent/device.py says why)
    X, y, shape = _reference(features)
    tmp = Path(tempfile.mkdtemp(prefix="inferwatch-bench-"))
    np.savez(tmp / "reference.npz", X=X.reshape(len(X), *shape), y=y)
    names = list(registry())
    result: dict[str, Any] = {"device": dev.type, "events": events, "features": features}

    if detectors_only:  # no broker: the config's address is never contacted
        cfg = load_config(_config(tmp, "127.0.0.1:9", "agent", device, names))
        train(cfg, tmp / "reference.npz")
        _, ctx = load_detectors(cfg)
        probs = ctx.model.predict_proba(X) if ctx.model else np.full((len(X), 10), 0.1, np.float32)
        values = _records(X, probs, min(events, 50_000))
        result["events"] = len(values)
        result.update(_detectors_alone(cfg, build_decoder(cfg, int(np.prod(shape))), values, dev,
                                       DETECTOR_PASSES))
        return _report(result, as_json)

    with EmbeddedBroker(log_path=tmp / "broker.log") as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([NewTopic(TOPIC, 4, 1), NewTopic("bench.feedback", 1, 1),
                             NewTopic("bench.deadletter", 1, 1), NewTopic("bench.latency", 4, 1)])
        admin.close()
        cfg = load_config(_config(tmp, broker.bootstrap, "agent", device, names))
        train(cfg, tmp / "reference.npz")
        detectors, ctx = load_detectors(cfg)
        probs = ctx.model.predict_proba(X) if ctx.model else np.full((len(X), 10), 0.1, np.float32)
        values = _records(X, probs, events)
        result["produce_s"] = round(_produce(broker.bootstrap, TOPIC, values), 2)

        # 1. ceiling: consume + decode only, same consumer settings
        ceil_cfg = load_config(_config(tmp, broker.bootstrap, "ceiling", device, names))
        source, decoder = build_source(ceil_cfg), build_decoder(ceil_cfg, int(np.prod(shape)))

        def ceiling_step() -> int:
            recs = source.poll()
            if recs:
                decoder.decode(recs)
            return len(recs)

        secs = _drain(ceiling_step, events)
        source.close()
        result["ceiling_eps"] = round(events / secs)

        # 1b. the same with decoding in the worker process the agent uses: the agent's own upper bound
        source = build_source(load_config(_config(tmp, broker.bootstrap, "ceiling-worker", device, names)))
        decoding = build_decoding(decoder, True, ceil_cfg.source.max_poll_records)

        def ceiling_worker_step() -> int:
            ready = decoding.exchange(source.poll())
            return len(ready.records) if ready else 0

        secs = _drain(ceiling_worker_step, events)
        source.close()
        decoding.close()
        result["ceiling_decode_worker_eps"] = round(events / secs)

        # 2. the whole agent
        pipeline = build_pipeline(cfg)
        secs = _drain(pipeline.step, events)
        pipeline.close()
        result["agent_eps"] = round(events / secs)
        result["ratio"] = round(result["agent_eps"] / result["ceiling_eps"], 3)

        # 3. each detector alone on decoded batches of 512 (no broker in the loop)
        result.update(_detectors_alone(cfg, decoder, values, dev, 1, detectors))

        # 4. scale-out: one vs two agent processes in one consumer group on a 4-partition topic
        if scale_out:
            one = _scale_out(tmp, broker.bootstrap, device, names, values, procs=1)
            two = _scale_out(tmp, broker.bootstrap, device, names, values, procs=2)
            result["scale_out"] = {"one_process_eps": one, "two_processes_eps": two,
                                   "speedup": round(two / one, 2) if one else None, "decode_worker": False}

        # 5. latency at a fixed offered load
        result["latency_ms"] = _latency(tmp, broker.bootstrap, device, names, X, probs, rate=2000,
                                        seconds=15 if events >= 50_000 else 3)

    return _report(result, as_json)


def _report(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0


def _detectors_alone(cfg: Any, decoder: Any, values: list[bytes], dev: Any, passes: int,
                     loaded: list[Any] | None = None) -> dict[str, Any]:
    """Each inference detector alone on the first 50,000 records decoded in batches of 512: records/s, and
    all of them one after another ("together"). With several ``passes``, the best, each pass with freshly
    loaded detectors (``loaded``: the first pass's, when the caller has them)."""
    import torch

    from agent.artifacts import enabled_detectors, load_detectors
    from agent.records import RawRecord

    batches = []
    for i in range(0, min(len(values), 50_000), 512):
        recs = [RawRecord(TOPIC, 0, j, v) for j, v in enumerate(values[i : i + 512], start=i)]
        batches.append(decoder.decode(recs).inference)
    n = sum(len(b) for b in batches)
    best: dict[str, float] = {}
    for p in range(passes):
        detectors = loaded if p == 0 and loaded is not None else load_detectors(cfg)[0]
        for name, (cls, _opts) in enabled_detectors(cfg).items():
            if cls.stream != "inference":
                continue
            det = next(d for d in detectors if d.name == name)
            det.update(batches[0], {})  # warm-up (CUDA kernels, caches)
            t0 = time.perf_counter()
            for b in batches:
                det.update(b, {})
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    total_s = sum(best.values())
    return {"detector_eps": {name: round(n / s) for name, s in best.items()},
            "detectors_together_eps": round(n / total_s) if total_s else None, "detector_passes": passes}


def _offer(bootstrap: str, X: np.ndarray, probs: np.ndarray, rate: float, seconds: float) -> None:
    """The model service: ``rate`` records/s for ``seconds``, each stamped with its produce time in ``ts``.

    It runs in its own process, as a real model service does: in the agent's interpreter its thread woke
    every 0.5 ms and took the GIL from the detectors, which then ran several times slower.
    """
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks=1)
    t0 = time.time()
    for i in range(int(rate * seconds)):
        if (d := t0 + i / rate - time.time()) > 0:
            time.sleep(d)
        r = i % len(X)
        rec = {"id": f"l-{i}", "ts": time.time(), "model": "bench", "client_id": f"c{i % 200}",
               "input": np.round(X[r], 4).tolist(), "output": {"probs": np.round(probs[r], 4).tolist()}}
        p.send("bench.latency", json.dumps(rec).encode())
    p.flush()
    p.close()


def _latency(tmp: Path, bootstrap: str, device: str, names: list[str], X: np.ndarray, probs: np.ndarray,
             rate: float, seconds: float) -> dict[str, float]:
    """Offer ``rate`` records/s; latency = batch done (findings delivered, offsets committed) - produce time."""
    import multiprocessing as mp

    from agent.assemble import build_pipeline
    from agent.config import load_config

    cfg_path = _config(tmp, bootstrap, "latency", device, names)
    cfg_path.write_text(cfg_path.read_text().replace(f"inference: [{TOPIC}]", "inference: [bench.latency]"))
    cfg = load_config(cfg_path)
    pipeline = build_pipeline(cfg)
    while pipeline.step() == 0 and not pipeline.source.assignment():
        pass  # wait for the group to join before offering load
    service = mp.get_context("spawn").Process(target=_offer, args=(bootstrap, X, probs, rate, seconds), daemon=True)
    service.start()
    tap = _TsTap(pipeline.decoding)
    pipeline.decoding = tap  # see the produce times of each processed batch's records
    lat: list[np.ndarray] = []
    seen, total = 0, int(rate * seconds)
    deadline = time.time() + seconds + 60
    while seen < total and time.time() < deadline:
        if pipeline.step():
            done = time.time()  # findings delivered, offsets committed
            lat.append((done - tap.last_ts) * 1000)
            seen += len(tap.last_ts)
    pipeline.close()
    service.join(timeout=60)
    arr = np.concatenate(lat) if lat else np.zeros(0)
    if not len(arr):
        raise RuntimeError("bench: no record of the latency stream was processed")
    return {"offered_eps": rate, "p50": round(float(np.percentile(arr, 50)), 1),
            "p99": round(float(np.percentile(arr, 99)), 1), "records": len(arr)}


PARKED = -1  # what a scale-out member reports instead of a partition count once it waits for the start


def _scale_worker(index: int, cfg_path: str, ready, settled, go, consumed, first_last) -> None:
    """One agent process in the group: consume until told to stop, counting every record it processes.

    Until the group has settled it reports each change of its assignment (the first member to join owns
    every partition until the next one joins, so one report is not enough to know the split); then it
    reports that it is parked and waits for the start signal, given once the whole topic is produced.
    """
    import torch

    from agent.assemble import build_pipeline
    from agent.config import load_config

    torch.set_num_threads(1)
    pipeline = build_pipeline(load_config(cfg_path))
    owned, parked = -1, False
    t_first = t_last = None
    while True:
        n = pipeline.step()
        if n:
            now = time.time()
            t_first = t_first or now
            t_last = now
            with consumed.get_lock():
                consumed.value += n
        elif consumed.value < 0:
            break
        if parked:
            continue
        if settled.is_set():
            ready.put((index, PARKED))  # the records are produced while no member polls, as before a burst
            parked = True
            go.wait()
        elif len(pipeline.source.assignment()) != owned:
            owned = len(pipeline.source.assignment())
            ready.put((index, owned))
    first_last.put((t_first, t_last))
    pipeline.close()


def _scale_out(tmp: Path, bootstrap: str, device: str, names: list[str], values: list[bytes], procs: int) -> int:
    """Records/s of ``procs`` agent processes sharing one group on a fresh 4-partition topic."""
    import multiprocessing as mp

    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"bench.scale{procs}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 4, 1)])
    admin.close()
    path = _config(tmp, bootstrap, f"scale{procs}", device, names)
    # one core per process: with its decode worker one agent already uses both cores of a 2-core machine,
    # and this measures how the group splits the work, not how one process fills a second core
    path.write_text(path.read_text().replace(f"inference: [{TOPIC}], feedback: [bench.feedback]",
                                             f"inference: [{topic}], feedback: []")
                    .replace("max_record_bytes: 8388608", "max_record_bytes: 8388608\n  decode_worker: false"))
    ctx = mp.get_context("spawn")
    ready, first_last, settled, go = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    consumed = ctx.Value("q", 0)
    workers = [ctx.Process(target=_scale_worker, args=(i, str(path), ready, settled, go, consumed, first_last))
               for i in range(procs)]
    for w in workers:
        w.start()
    try:
        deadline = time.time() + 120
        owned: dict[int, int] = {}
        while sorted(owned.values()) != [4 // procs] * procs:  # until every member owns 4/procs partitions
            if time.time() > deadline:
                raise RuntimeError(f"bench: group did not settle evenly in 120 s: partitions per member {owned}")
            index, count = ready.get(timeout=120)
            owned[index] = count
        settled.set()
        parked: set[int] = set()
        while len(parked) < procs:
            index, count = ready.get(timeout=120)
            if count == PARKED:
                parked.add(index)
        _produce(bootstrap, topic, values, partitions=4)  # every member gets the same share of the work
        go.set()
        while consumed.value < len(values) and time.time() < deadline + 600:
            time.sleep(0.05)
        with consumed.get_lock():
            consumed.value = -1
        spans = [first_last.get(timeout=60) for _ in range(procs)]
        for w in workers:
            w.join(timeout=60)
    finally:
        for w in workers:  # a failed measurement must not leave members polling forever
            if w.is_alive():
                w.terminate()
    starts = [a for a, _ in spans if a]
    ends = [b for _, b in spans if b]
    return round(len(values) / (max(ends) - min(starts)))


class _TsTap:
    """Wraps the pipeline's decoding and remembers the event times of the last batch it handed over."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.last_ts = np.zeros(0)

    def exchange(self, records, flush=False):
        ready = self.inner.exchange(records, flush)
        inference = ready.batch.inference if ready is not None else None
        self.last_ts = inference.ts if inference is not None else np.zeros(0)
        return ready

    def __getattr__(self, name: str) -> Any:  # ahead, drain, close, decoder
        return getattr(self.inner, name)


def _print(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"inferwatch bench — {r['events']} records, {r['features']} features, {r['device']}")
    t.add_column("measure")
    t.add_column("records/s", justify="right")
    if "ceiling_eps" in r:
        t.add_row("ceiling (consume + decode)", f"{r['ceiling_eps']:,}")
        t.add_row("ceiling, decoding in a worker process", f"{r['ceiling_decode_worker_eps']:,}")
        t.add_row("agent (all detectors, sink, commits)", f"{r['agent_eps']:,}  ({r['ratio']:.2f} × ceiling)")
    passes = f", best of {r['detector_passes']}" if r["detector_passes"] > 1 else ""
    for name, eps in r["detector_eps"].items():
        t.add_row(f"detector {name} alone (batch 512{passes})", f"{eps:,}")
    t.add_row(f"detectors together (batch 512{passes})", f"{r['detectors_together_eps']:,}")
    if "latency_ms" not in r:  # --detectors-only
        Console().print(t)
        return
    if "scale_out" in r:
        so = r["scale_out"]
        t.add_row("two agent processes vs one (one core each)",
                  f"{so['two_processes_eps']:,} vs {so['one_process_eps']:,} = {so['speedup']} ×")
    lat = r["latency_ms"]
    t.add_row(f"latency at {lat['offered_eps']:.0f}/s offered", f"p50 {lat['p50']} ms, p99 {lat['p99']} ms")
    Console().print(t)
