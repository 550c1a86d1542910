"""output_exposure: full-precision probability vectors served to a client an extraction detector flagged."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.findings import Finding, Severity
from agent.records import InferenceBatch
from agent.state import load_tree, save_tree
from detectors.base import DetectorContext
from detectors.output_exposure import OutputExposureDetector, served_decimals

RNG = np.random.default_rng(0)


def flagged(client: str = "scraper", model: str = "digits") -> Finding:
    return Finding(family="extraction", detector="extraction", title="Model extraction by scraper",
                   severity=Severity.HIGH, actor=client, model=model, related_ids=("q-0",), window="w0",
                   attacks=("AML.T0024.002",))


def answers(clients: list[str], probs: np.ndarray | None, start: int = 0) -> InferenceBatch:
    n = len(clients)
    labels = np.nan_to_num(probs, nan=-1).argmax(1) if probs is not None else np.zeros(n, np.int64)
    return InferenceBatch(ids=tuple(f"q-{start + i}" for i in range(n)), ts=np.arange(start, start + n, dtype=float),
                          models=("digits",) * n, model_versions=(None,) * n, clients=tuple(clients),
                          X=np.zeros((n, 4), np.float32), probs=None if probs is None else probs.astype(np.float32),
                          labels=labels.astype(np.int64))


def softmax(n: int) -> np.ndarray:
    z = RNG.normal(0, 3, (n, 10))
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def make() -> OutputExposureDetector:
    return OutputExposureDetector(OutputExposureDetector.Options(), DetectorContext(device=torch.device("cpu")))


def test_served_decimals() -> None:
    p = np.array([[0.5, 0.5, np.nan], [0.25, 0.75, 0.0], [0.123, 0.877, 0.0], [1 / 3, 2 / 3, 0.0],
                  [np.nan, np.nan, np.nan]], np.float32)
    assert served_decimals(p).tolist() == [1, 2, 3, 6, -1]


def test_full_precision_vectors_to_a_flagged_client_raise_once() -> None:
    det = make()
    assert det.update(answers(["scraper"] * 5 + ["tenant-1"] * 5, softmax(10)), {"findings": [flagged()]}) == []
    out = det.update(answers(["scraper"] * 10 + ["tenant-1"] * 10, softmax(20), 10), {"findings": []})
    (f,) = out
    assert f.family == "posture" and f.detector == "output_exposure" and f.actor == "scraper"
    assert f.model == "digits" and f.attacks == ("AML.T0024.002",)
    assert f.evidence["max_decimals_served"] == 6 and f.evidence["answers_examined"] == 10
    assert "BSI" in f.message and "label only" in f.evidence["advice"] and "top-k" in f.evidence["advice"]
    assert set(f.related_ids) == {f"q-{i}" for i in range(5)} | {f"q-{i}" for i in range(10, 15)}
    assert det.update(answers(["scraper"] * 50, softmax(50), 30), {"findings": [flagged()]}) == [], "once per client"


@pytest.mark.parametrize("served", ["rounded", "label_only", "top1"])
def test_coarse_answers_are_the_advised_posture(served: str) -> None:
    det = make()
    p = softmax(40)
    if served == "rounded":
        p = np.round(p, 2)
    elif served == "label_only":
        p = None
    else:  # top-1 only: the other classes are not served
        top = p.argmax(1)
        p = np.full_like(p, np.nan)
        p[np.arange(len(p)), top] = 0.9
    assert det.update(answers(["scraper"] * 40, p), {"findings": [flagged()]}) == []


def test_unflagged_clients_and_other_families_are_ignored() -> None:
    det = make()
    drift = Finding(family="drift", detector="drift_vae", title="drift", severity=Severity.LOW, actor="scraper",
                    model="digits", related_ids=("q-0",), window="w")
    assert det.update(answers(["scraper"] * 40, softmax(40)), {"findings": [drift]}) == []
    assert det.update(answers(["tenant-1"] * 40, softmax(40)), {"findings": [flagged("scraper")]}) == []


def test_state_round_trip(tmp_path: Path) -> None:
    det = make()
    det.update(answers(["scraper"] * 6, softmax(6)), {"findings": [flagged()]})
    save_tree(tmp_path / "s.npz", det.state_dict())
    twin = OutputExposureDetector(det.options, copy.copy(det.context))
    twin.load_state_dict(load_tree(tmp_path / "s.npz"))
    batch = answers(["scraper"] * 6, softmax(6), 6)
    a = [(f.uid, f.related_ids) for f in det.update(batch, {})]
    b = [(f.uid, f.related_ids) for f in twin.update(batch, {})]
    assert a == b and len(a) == 1


def test_flagged_clients_are_bounded() -> None:
    det = OutputExposureDetector(OutputExposureDetector.Options(max_clients=10),
                                 DetectorContext(device=torch.device("cpu")))
    det.update(answers(["x"], softmax(1)), {"findings": [flagged(f"c{i}") for i in range(25)]})
    assert len(det.flagged) == 10 and ("digits", "c24") in det.flagged


@pytest.fixture(scope="module")
def extraction_detector():
    from agent.reference import ReferenceData
    from agent.scenarios.data import load
    from detectors.extraction import ExtractionDetector

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = load("digits")
    det = ExtractionDetector(ExtractionDetector.Options(prada_simulations=300),
                             DetectorContext(device=torch.device("cpu"), input_shape=ds.input_shape, n_classes=10))
    det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    yield det
    torch.set_num_threads(before)


@pytest.mark.parametrize("decimals", [None, 2])
def test_behind_the_real_extraction_detector(extraction_detector, decimals: int | None, tmp_path: Path) -> None:
    """The pipeline's order: extraction first, its findings in notes; only the scraper's answers are examined."""
    from agent.model import train_classifier
    from agent.scenarios.data import benign_traffic, load

    ds = load("digits")
    twin = type(extraction_detector)(extraction_detector.options, copy.copy(extraction_detector.context))
    save_tree(tmp_path / "x.npz", extraction_detector.artifacts())
    twin.load_artifacts(load_tree(tmp_path / "x.npz"))
    model = train_classifier(ds.X_train, ds.y_train, ds.input_shape, torch.device("cpu"), epochs=5)
    X, c, ts = benign_traffic(ds, 4000, 40, seed=0)
    rng = np.random.default_rng(1)
    scrape = rng.uniform(0, 1, (400, ds.dim)).astype(np.float32)  # out-of-task synthetic queries
    X = np.concatenate([X, scrape])
    ts = np.concatenate([ts, np.sort(rng.uniform(100, 700, len(scrape)))])
    clients = np.array([f"tenant-{i}" for i in c] + ["scraper"] * len(scrape))
    order = np.argsort(ts, kind="stable")
    X, ts, clients = X[order], ts[order], clients[order]
    probs = model.predict_proba(X)
    if decimals is not None:
        probs = np.round(probs, decimals)
    det = make()
    raised, flagged_by = [], []
    for i in range(0, len(X), 512):
        s = slice(i, i + 512)
        n = len(X[s])
        batch = InferenceBatch(ids=tuple(f"r{j}" for j in range(i, i + n)), ts=ts[s], models=("digits",) * n,
                               model_versions=(None,) * n, clients=tuple(clients[s]), X=X[s], probs=probs[s],
                               labels=probs[s].argmax(1).astype(np.int64))
        found = twin.update(batch, {})
        flagged_by += [f.actor for f in found]
        raised += det.update(batch, {"findings": found})
    assert "scraper" in flagged_by
    if decimals is None:
        assert [f.actor for f in raised] == ["scraper"]
    else:
        assert raised == [], "answers rounded to 2 decimals are the advised posture"
