"""The demo and the benchmark run end to end on the embedded broker and write what the contract says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_scoreboard_and_findings(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "agent", "demo", "--out", str(tmp_path), "--duration", "45"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    board = json.loads((tmp_path / "scoreboard.json").read_text())
    fams = board["families"]
    assert set(fams) == {"evasion", "extraction", "drift", "poisoning"}
    assert {"tpr", "fpr", "detected"} <= fams["evasion"].keys()
    assert {"tpr", "fpr", "detected", "queries_to_detect"} <= fams["extraction"].keys()
    assert {"detected", "events_to_detect", "false_alarms"} <= fams["drift"].keys()
    assert {"precision", "recall", "detected"} <= fams["poisoning"].keys()
    assert board["events"] > 5000
    lines = (tmp_path / "findings.ocsf.jsonl").read_text().splitlines()
    assert len(lines) == board["findings"] > 0
    assert all(json.loads(ln)["class_uid"] == 2004 for ln in lines)
    assert all(fams[f]["detected"] for f in fams), fams


def test_bench_json(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "agent", "bench", "--json", "--events", "6000"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["device"] in ("cpu", "cuda") and out["events"] == 6000
    assert out["ceiling_eps"] > 0 and out["agent_eps"] > 0
    assert out["ratio"] == pytest.approx(out["agent_eps"] / out["ceiling_eps"], rel=0.01)
    assert 0 < out["latency_ms"]["p50"] <= out["latency_ms"]["p99"]


def test_bench_detectors_only_needs_no_broker() -> None:
    res = subprocess.run([sys.executable, "-m", "agent", "bench", "--json", "--detectors-only", "--events", "3000"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["events"] == 3000 and out["detector_passes"] == 5 and "ceiling_eps" not in out
    assert {"drift_vae", "adversarial", "extraction"} <= set(out["detector_eps"])
    assert all(eps > 0 for eps in out["detector_eps"].values())
    slowest = min(out["detector_eps"].values())
    assert 0 < out["detectors_together_eps"] < slowest, "together is the harmonic sum, below the slowest alone"
    plain = subprocess.run([sys.executable, "-m", "agent", "bench", "--detectors-only", "--events", "1000"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert plain.returncode == 0 and "detectors together (batch 512, best of 5)" in plain.stdout, plain.stderr[-2000:]
