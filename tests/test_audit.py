"""``inferwatch audit``: the issue's acceptance test and the parts it is built from.

Acceptance (issue 7): feedback poisoned the way the demo poisons it
(``agent/simulation.py``: label flips from ``reviewer-7``, a bright 2x2 patch
relabelled to class 0 from ``labeler-x``, a few percent each), the real
``poisoning`` detector run over the feedback stream, its findings written by the
real quarantine sink; then a model retrained on all the feedback must fail the
audit gates (exit 1) and one retrained on the quarantine-filtered feedback must
pass (exit 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.audit import (
    AuditGates,
    AuditOptions,
    audit_models,
    expected_calibration_error,
    load_gates,
    trigger_candidates,
)
from agent.cli import main
from agent.model import WatchedModel, train_classifier
from agent.records import FeedbackBatch
from agent.reference import ReferenceData
from agent.scenarios.data import load
from connectors.quarantine import QuarantineOptions, QuarantineSink
from detectors.base import DetectorContext
from detectors.poisoning import PoisoningDetector

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Retrained:
    clean: Path
    poisoned: Path
    filtered: Path
    reference: Path
    quarantine: Path
    poisoned_ids: frozenset[str]
    quarantined_ids: frozenset[str]
    backdoor_ids: frozenset[str]


def demo_feedback(ds, pool: np.ndarray, n: int, rng: np.random.Generator, duration_s: float = 3600.0):
    """Feedback poisoned as ``TrafficPlan._feedback`` does it (same rates, sources, trigger and target)."""
    rows = pool[rng.integers(0, len(pool), n)]
    X, y = ds.X_test[rows].copy(), ds.y_test[rows].copy()
    t = np.sort(rng.uniform(0, duration_s, n))
    sources = rng.choice([f"reviewer-{i}" for i in range(12)], n).astype(object)
    flip = (rng.random(n) < 0.06) & (t >= 0.2 * duration_s) & (t <= 0.6 * duration_s)
    y[flip] = (y[flip] + rng.integers(1, ds.n_classes, flip.sum())) % ds.n_classes
    sources[flip] = "reviewer-7"
    backdoor = ~flip & (rng.random(n) < 0.06) & (t >= 0.4 * duration_s) & (t <= 0.75 * duration_s)
    img = X[backdoor].reshape(-1, 8, 8)
    img[:, 6:, 6:] = 1.0
    X[backdoor] = img.reshape(-1, ds.dim)
    y[backdoor] = 0
    sources[backdoor] = "labeler-x"
    return X, y, t, sources, flip, backdoor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models on a shared 2-core machine: one torch thread is faster than contending for two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Retrained:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("audit")
    ds = load("digits", 0)
    rng = np.random.default_rng(7)
    perm = rng.permutation(len(ds.X_test))
    pool, held_out = perm[:270], perm[270:]  # feedback inputs and audit reference never overlap
    n = 1500
    X, y, t, sources, flip, backdoor = demo_feedback(ds, pool, n, rng)
    ids = tuple(f"fb-{i}" for i in range(n))

    clean = train_classifier(ds.X_train, ds.y_train, ds.input_shape, CPU, epochs=30, seed=0)
    detector = PoisoningDetector(PoisoningDetector.Options(),
                                 DetectorContext(device=CPU, input_shape=ds.input_shape, n_classes=10, model=clean))
    detector.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    findings = []
    for i in range(0, n, 256):
        s = slice(i, i + 256)
        findings += detector.update(FeedbackBatch(ids=ids[s], ts=t[s], models=("digits-mlp",) * len(ids[s]),
                                                  sources=tuple(sources[s]), X=X[s], labels=y[s]), {})
    findings += detector.flush()
    quarantine = out / "quarantine.jsonl"
    sink = QuarantineSink(QuarantineOptions(path=quarantine))
    assert sink.export(findings).name == "SUCCESS"
    sink.shutdown()
    quarantined = {json.loads(line)["id"] for line in quarantine.read_text().splitlines()}

    keep = np.array([i not in quarantined for i in ids])
    poisoned = train_classifier(np.concatenate([ds.X_train, X]), np.concatenate([ds.y_train, y]), ds.input_shape,
                                CPU, epochs=30, seed=0)
    filtered = train_classifier(np.concatenate([ds.X_train, X[keep]]), np.concatenate([ds.y_train, y[keep]]),
                                ds.input_shape, CPU, epochs=30, seed=0)
    paths = {name: out / f"{name}.pt2" for name in ("clean", "poisoned", "filtered")}
    for name, model in (("clean", clean), ("poisoned", poisoned), ("filtered", filtered)):
        model.save(paths[name])
    reference = out / "reference.npz"
    np.savez(reference, X=ds.X_test[held_out].reshape(-1, 8, 8), y=ds.y_test[held_out])
    return Retrained(paths["clean"], paths["poisoned"], paths["filtered"], reference, quarantine,
                     frozenset(np.asarray(ids)[flip | backdoor].tolist()), frozenset(quarantined),
                     frozenset(np.asarray(ids)[backdoor].tolist()))


def _audit(r: Retrained, new: Path, *extra: str) -> int:
    return main(["audit", "--old", str(r.clean), "--new", str(new), "--reference", str(r.reference),
                 "--quarantine", str(r.quarantine), "--gates", "configs/audit.example.yaml", *extra])


def test_quarantine_holds_the_poisoned_feedback(retrained: Retrained) -> None:
    got, truth = retrained.quarantined_ids, retrained.poisoned_ids
    assert len(got & truth) / len(got) >= 0.9 and len(got & truth) / len(truth) >= 0.9
    assert len(retrained.backdoor_ids - got) <= 0.1 * len(retrained.backdoor_ids)


def test_model_retrained_on_poisoned_feedback_fails_the_gate(retrained: Retrained, capsys) -> None:
    assert _audit(retrained, retrained.poisoned, "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert "max_trigger_success" in report["failed_gates"]
    trig = max(report["triggers"], key=lambda t: t["success_new"])
    assert trig["target_label"] == 0 and set(trig["features"]) <= {54, 55, 62, 63}  # the demo's 2x2 patch
    assert trig["success_old"] < 0.1 and trig["success_new"] > 0.8


def test_model_retrained_on_filtered_feedback_passes(retrained: Retrained, capsys) -> None:
    assert _audit(retrained, retrained.filtered, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True and report["failed_gates"] == []
    assert report["triggers"], "the quarantine's trigger must have been tested"
    assert all(t["success_new"] < 0.1 for t in report["triggers"])


def test_table_output_and_finding_to_the_config_sinks(retrained: Retrained, tmp_path: Path, capsys) -> None:
    findings_file = tmp_path / "findings.ocsf.jsonl"
    config = tmp_path / "agent.yaml"
    config.write_text(f"state:\n  dir: {tmp_path / 'state'}\nsinks:\n  - type: jsonl\n    path: {findings_file}\n")
    assert _audit(retrained, retrained.poisoned, "-c", str(config)) == 1
    assert "FAIL" in capsys.readouterr().out
    (finding,) = [json.loads(line) for line in findings_file.read_text().splitlines()]
    assert finding["finding_info"]["types"] == ["integrity"]
    techniques = {a.get("sub_technique", a["technique"])["uid"] for a in finding["finding_info"]["attacks"]}
    assert {"AML.T0018.000", "AML.T0031"} <= techniques
    related = {e["uid"] for e in finding["finding_info"]["related_events"]}
    assert related and related <= retrained.quarantined_ids
    assert _audit(retrained, retrained.filtered, "-c", str(config)) == 0
    assert len(findings_file.read_text().splitlines()) == 1, "a passing audit raises no finding"


def test_bad_inputs_exit_2(retrained: Retrained, tmp_path: Path, capsys) -> None:
    bad_gates = tmp_path / "gates.yaml"
    bad_gates.write_text("gates:\n  max_acuracy_drop: 0.1\n  max_flip_rate: -1\n")
    assert main(["audit", "--old", str(retrained.clean), "--new", str(retrained.poisoned),
                 "--reference", str(retrained.reference), "--gates", str(bad_gates)]) == 2
    err = capsys.readouterr().err
    assert f"{bad_gates}: gates.max_acuracy_drop: unknown key" in err and "gates.max_flip_rate" in err
    not_a_model = tmp_path / "model.pt2"
    not_a_model.write_bytes(b"not a torch.export archive")
    assert main(["audit", "--old", str(retrained.clean), "--new", str(not_a_model),
                 "--reference", str(retrained.reference)]) == 2
    assert f"{not_a_model}: (model): cannot be loaded" in capsys.readouterr().err
    wrong_shape = tmp_path / "wrong.npz"
    np.savez(wrong_shape, X=np.zeros((20, 5), np.float32), y=np.zeros(20, np.int64))
    assert main(["audit", "--old", str(retrained.clean), "--new", str(retrained.poisoned),
                 "--reference", str(wrong_shape)]) == 2
    torn = tmp_path / "q.jsonl"
    torn.write_text('{"id": "fb-1"}\n{"id": \n')
    assert main(["audit", "--old", str(retrained.clean), "--new", str(retrained.poisoned),
                 "--reference", str(retrained.reference), "--quarantine", str(torn)]) == 2
    assert f"{torn}:2: (line): not JSON" in capsys.readouterr().err


def test_expected_calibration_error_matches_hand_computation() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    # bins: 0.9 (two rows, 1 of 2 right: |0.5-0.9|), 0.6 (right: |1-0.6|), 0.7 (right: |1-0.7|)
    expected = 0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.3
    assert expected_calibration_error(probs, y) == pytest.approx(expected)


def test_trigger_estimated_from_quarantined_inputs_not_from_flips() -> None:
    ds = load("digits", 0)
    rng = np.random.default_rng(3)
    ref = ReferenceData(ds.X_train, ds.y_train, ds.input_shape)
    stamped = ds.X_test[rng.integers(0, len(ds.X_test), 20)].copy()
    stamped[:, [0, 1, 8, 9]] = 1.0  # a top-left 2x2 patch, relabelled 7
    flips = ds.X_test[rng.integers(0, len(ds.X_test), 20)]  # random inputs relabelled 3: nothing shared
    rows = [{"id": f"b{i}", "input": x.tolist(), "label": 7} for i, x in enumerate(stamped)]
    rows += [{"id": f"f{i}", "input": x.tolist(), "label": 3} for i, x in enumerate(flips)]
    (cand,) = trigger_candidates(rows, ref, AuditOptions())
    assert cand.target_label == 7 and set(cand.features) == {0, 1, 8, 9} and cand.origin == "estimated"
    assert np.allclose(cand.values, 1.0) and len(cand.record_ids) == 20


def test_identical_versions_pass_every_default_gate() -> None:
    ds = load("digits", 0)
    model = train_classifier(ds.X_train, ds.y_train, ds.input_shape, CPU, epochs=10, seed=1)
    twin = WatchedModel(model.module, model.input_shape, model.n_classes, CPU, False)
    report = audit_models(model, twin, ReferenceData(ds.X_test, ds.y_test, ds.input_shape),
                          gates=load_gates("configs/audit.example.yaml"))
    assert report.passed and report.metrics["flip_rate"] == 0.0
    assert {g.gate for g in report.gates} == set(AuditGates.model_fields) - {"max_trigger_success"}
