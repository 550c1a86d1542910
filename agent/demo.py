"""``inferwatch demo``: the main job on its embedded default.

Starts the embedded broker, a simulated model service with benign traffic and
attack campaigns (:mod:`agent.simulation`), trains the detectors on reference
data, runs the real agent pipeline with its sinks, shows live progress, and
ends with a scoreboard measured against the simulation's ground truth
(``DIR/scoreboard.json``) beside the findings (``DIR/findings.ocsf.jsonl``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from agent.artifacts import train
from agent.assemble import build_pipeline
from agent.broker import EmbeddedBroker
from agent.config import load_config
from agent.report import render
from agent.simulation import TOPICS, GroundTruth, ModelService, TrafficPlan, publish
from detectors.base import registry

log = logging.getLogger(__name__)


def _config(out: Path, bootstrap: str) -> Path:
    detectors = "\n".join(f"  {name}: {{}}" for name in registry())  # every detector, with its defaults
    text = f"""# written by `inferwatch demo`
kafka: {{bootstrap_servers: "{bootstrap}"}}
source:
  format: kserve
  topics:
    inference: []
    feedback: [{TOPICS['feedback']}]
    kserve_request: [{TOPICS['request']}]
    kserve_response: [{TOPICS['response']}]
  kserve_join_ttl_s: 5
  group_id: inferwatch-demo
  session_timeout_ms: 6000
  heartbeat_interval_ms: 1000
  max_poll_interval_ms: 3000
  poll_timeout_ms: 100
  max_poll_records: 1000
deadletter: {{topic: inferwatch.deadletter}}
artifacts: {out}/artifacts
state: {{dir: {out}/state}}
telemetry: {{enabled: false}}
detectors:
{detectors}
sinks:
  - type: jsonl
    path: {out}/findings.ocsf.jsonl
"""
    path = out / "agent.yaml"
    path.write_text(text)
    return path


def _create_topics(bootstrap: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(TOPICS["request"], 4, 1), NewTopic(TOPICS["response"], 4, 1),
                         NewTopic(TOPICS["feedback"], 1, 1), NewTopic("inferwatch.deadletter", 1, 1)])
    admin.close()


def run_demo(out_dir: str | Path = "./inferwatch-demo", duration_s: float | None = None) -> int:
    from kafka import KafkaProducer
    from rich.console import Console
    from rich.live import Live

    console = Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("findings.ocsf.jsonl", "scoreboard.json"):
        (out / stale).unlink(missing_ok=True)
    for old in (out / "state").glob("*") if (out / "state").exists() else []:
        old.unlink() if old.is_file() else None
    duration = float(duration_s or 90.0)
    t_start = time.time()

    console.print("[bold]inferwatch demo[/]: starting the embedded broker and the model service")
    with EmbeddedBroker(log_path=out / "broker.log") as broker:
        _create_topics(broker.bootstrap)
        service = ModelService(seed=0)
        ds = service.ds
        np.savez(out / "reference.npz", X=service.X_reference.reshape(-1, *ds.input_shape), y=service.y_reference)
        cfg_path = _config(out, broker.bootstrap)
        cfg = load_config(cfg_path)
        console.print(f"training {len(cfg.detector_options)} detectors on {len(service.X_reference)} reference rows "
                      "(validation data the model did not train on)")
        service.model.save(out / "model.pt2")
        train(cfg, out / "reference.npz", out / "model.pt2")

        plan, truth = TrafficPlan(service, duration_s=duration, rate=300.0).build()
        console.print(f"publishing {len(plan)} records (KServe logger request/response pairs and feedback) over "
                      f"{duration:.0f} s from {len(truth.benign_clients)} benign clients, with campaigns:")
        for c in sorted(truth.campaigns, key=lambda c: c.start_s):
            console.print(f"  {c.start_s:5.0f}-{c.end_s:4.0f} s  {c.family:<10} {c.label}")
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=10, acks=1)
        progress: dict[str, Any] = {}
        stop = threading.Event()
        t_plan = time.time()
        feeder = threading.Thread(target=publish, args=(plan, producer, t_plan, progress, stop), daemon=True)
        pipeline = build_pipeline(cfg)
        feeder.start()
        t0, idle_since = time.time(), time.time()
        try:
            with Live(_progress_table(pipeline, progress, t0), console=console, refresh_per_second=4) as live:
                while True:
                    n = pipeline.step()
                    live.update(_progress_table(pipeline, progress, t0))
                    if n:
                        idle_since = time.time()
                    elif progress.get("done") and time.time() - idle_since > 3.0:
                        break
        finally:
            stop.set()
            pipeline.close()
            producer.close()

    findings = [json.loads(line) for line in (out / "findings.ocsf.jsonl").read_text().splitlines() if line.strip()]
    board = scoreboard(findings, truth, pipeline.counters.records)
    board["seconds"] = round(time.time() - t_start, 1)
    (out / "scoreboard.json").write_text(json.dumps(board, indent=2))
    marks = [(f["finding_info"]["types"][0], f["time"] / 1000 - t_plan) for f in findings]
    traffic = {k: np.asarray(v) for k, v in truth.traffic.items()}
    render(out, traffic, truth.campaigns, marks, board, duration)
    _print_scoreboard(console, board, out)
    return 0


def _progress_table(pipeline, progress: dict, t0: float):
    from rich.table import Table

    c = pipeline.counters
    el = max(time.time() - t0, 1e-6)
    t = Table(title="inferwatch — live", show_header=True)
    for col in ("elapsed", "produced", "consumed", "records/s", "lag", "dead-lettered", "findings by family"):
        t.add_column(col)
    lag = sum(pipeline.last_lag.values()) if pipeline.last_lag else max(0, progress.get("produced", 0) - c.records)
    fams = ", ".join(f"{k}: {v}" for k, v in sorted(c.by_family.items())) or "-"
    t.add_row(f"{el:.0f} s", str(progress.get("produced", 0)), str(c.records), f"{c.records / el:.0f}", str(lag),
              str(c.dead_lettered), fams)
    return t


def _related(fs: list[dict]) -> set[str]:
    return {e["uid"] for f in fs for e in f["finding_info"].get("related_events", [])}


def _actor(f: dict) -> str | None:
    return f.get("actor", {}).get("user", {}).get("uid")


def scoreboard(findings: list[dict], truth: GroundTruth, events: int) -> dict[str, Any]:
    """Measure the findings against the simulation's ground truth (CONTRACT.md scoreboard shape)."""
    by_family: dict[str, list[dict]] = {}
    for f in sorted(findings, key=lambda f: f["time"]):
        by_family.setdefault(f["finding_info"]["types"][0], []).append(f)

    # evasion: per-record findings against the PGD records; false positives on benign (drifted ones apart)
    flagged = _related([f for f in by_family.get("evasion", []) if len(f["finding_info"]["related_events"]) == 1])
    drift = set(truth.drift_ids)
    clean = truth.benign_inference_ids - drift
    families: dict[str, Any] = {"evasion": {
        "tpr": round(len(flagged & truth.evasion_ids) / max(1, len(truth.evasion_ids)), 4),
        "fpr": round(len(flagged & clean) / max(1, len(clean)), 5),
        "fpr_on_drifted": round(len(flagged & drift) / max(1, len(drift)), 5),
    }}
    families["evasion"]["detected"] = families["evasion"]["tpr"] >= 0.5

    # extraction and probing: per attacking client, how many of its queries until its first finding
    ex = by_family.get("extraction", [])
    attackers = set(truth.client_queries)
    q = {}
    for client in attackers:
        first = next((f for f in ex if _actor(f) == client), None)
        if first is not None:
            pos = {rid: i for i, rid in enumerate(truth.client_queries[client])}
            q[client] = max((pos[r] for r in _related([first]) if r in pos), default=0) + 1
    benign_flagged = {_actor(f) for f in ex} & truth.benign_clients
    families["extraction"] = {
        "tpr": round(len(q) / max(1, len(attackers)), 4),
        "fpr": round(len(benign_flagged) / max(1, len(truth.benign_clients)), 5),
        "detected": bool(q), "queries_to_detect": max(q.values()) if q else None,
        "per_client": q,
    }

    # drift: window findings (not the per-record out-of-distribution ones)
    windows = [f for f in by_family.get("drift", []) if f["finding_info"]["title"] != "Out-of-distribution input"]
    order = {rid: i for i, rid in enumerate(truth.drift_ids)}
    hit = next((f for f in windows if _related([f]) & drift), None)
    families["drift"] = {
        "detected": hit is not None,
        "events_to_detect": None if hit is None else max(order[r] for r in _related([hit]) if r in order) + 1,
        "false_alarms": len([f for f in windows if not (_related([f]) & drift)]),
    }

    po = _related(by_family.get("poisoning", []))
    tp = len(po & truth.poisoned_feedback_ids)
    families["poisoning"] = {"precision": round(tp / max(1, len(po)), 4),
                             "recall": round(tp / max(1, len(truth.poisoned_feedback_ids)), 4), "detected": tp > 0}
    return {"families": families, "events": events, "findings": len(findings),
            "findings_by_family": dict(Counter(f["finding_info"]["types"][0] for f in findings)),
            "ground_truth": truth.to_json()}


def _print_scoreboard(console, board: dict, out: Path) -> None:
    from rich.table import Table

    t = Table(title="inferwatch demo — scoreboard (measured against the simulation's ground truth)")
    t.add_column("family")
    t.add_column("detected")
    t.add_column("figures")
    for fam, sec in board["families"].items():
        figs = ", ".join(f"{k}={v}" for k, v in sec.items() if k != "detected")
        t.add_row(fam, "[green]yes[/]" if sec["detected"] else "[red]no[/]", figs)
    console.print(t)
    console.print(f"{board['events']} records, {board['findings']} findings {board['findings_by_family']}, "
                  f"{board['seconds']} s")
    console.print(f"findings: {out / 'findings.ocsf.jsonl'}\nscoreboard: {out / 'scoreboard.json'}\n"
                  f"report: {out / 'report.html'} (timeline: {out / 'report.png'})")
