"""Conformance checks that every detector must pass, found automatically (like river's ``checks``).

A new file in ``detectors/`` is picked up by ``registry()`` and tested here with
no extra code: options, fit, batched update, findings shape, and that a state
checkpoint restores the detector exactly (same findings afterwards).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.findings import FAMILIES, Finding
from agent.model import train_classifier
from agent.records import FeedbackBatch, InferenceBatch
from agent.reference import ReferenceData
from agent.scenarios.data import load
from agent.state import load_tree, save_tree
from detectors.base import Detector, DetectorContext, DetectorOptions, registry

DETECTORS = registry()


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    ds = load("digits")
    model = train_classifier(ds.X_train, ds.y_train, ds.input_shape, torch.device("cpu"), epochs=15)
    return ds, model


def make_batch(det: type[Detector], ds, model, n: int, seed: int, start: float):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(ds.X_test), n)
    X = ds.X_test[rows]
    ts = start + np.arange(n) * 0.01
    ids = tuple(f"r{seed}-{i}" for i in range(n))
    if det.stream == "feedback":
        y = ds.y_test[rows].copy()
        y[: n // 10] = (y[: n // 10] + 1) % ds.n_classes  # some flipped labels, so there is something to find
        return FeedbackBatch(ids=ids, ts=ts, models=("m",) * n, sources=tuple(f"s{i % 3}" for i in range(n)),
                             X=X, labels=y)
    probs = model.predict_proba(X)
    clients = tuple(f"c{i % 7}" if i % 2 else "heavy" for i in range(n))
    return InferenceBatch(ids=ids, ts=ts, models=("m",) * n, model_versions=(None,) * n, clients=clients, X=X,
                          probs=probs, labels=probs.argmax(1).astype(np.int64))


def build(cls: type[Detector], ds, model) -> Detector:
    ctx = DetectorContext(device=torch.device("cpu"), input_shape=ds.input_shape, n_classes=ds.n_classes,
                          model=model)
    det = cls(cls.Options(), ctx)
    if cls.requires_fit:
        det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    return det


def test_registry_finds_detectors() -> None:
    assert "query_rate" in DETECTORS
    for name, cls in DETECTORS.items():
        assert cls.name == name and cls.family in FAMILIES and cls.stream in ("inference", "feedback")
        assert issubclass(cls.Options, DetectorOptions)
        assert cls.Options().enabled is True  # every option has a default: an empty config section works


@pytest.mark.parametrize("name", list(DETECTORS))
def test_update_returns_findings_of_this_detector(name: str, digits) -> None:
    ds, model = digits
    det = build(DETECTORS[name], ds, model)
    assert det.update(make_batch(DETECTORS[name], ds, model, 0, 0, 0.0), {}) == []
    out = []
    for i in range(6):
        out += det.update(make_batch(DETECTORS[name], ds, model, 512, i, 100.0 * i), {})
    for f in out:
        assert isinstance(f, Finding)
        assert f.detector == name and f.family == DETECTORS[name].family
        assert f.related_ids, "a finding must name the records behind it"


@pytest.mark.parametrize("name", list(DETECTORS))
def test_checkpoint_restores_exactly(name: str, digits, tmp_path: Path) -> None:
    ds, model = digits
    cls = DETECTORS[name]
    det = build(cls, ds, model)
    for i in range(3):
        det.update(make_batch(cls, ds, model, 512, i, 100.0 * i), {})
    save_tree(tmp_path / "art.npz", det.artifacts())
    save_tree(tmp_path / "state.npz", det.state_dict())

    twin = cls(cls.Options(), copy.copy(det.context))
    twin.load_artifacts(load_tree(tmp_path / "art.npz"))
    twin.load_state_dict(load_tree(tmp_path / "state.npz"))
    for i in range(3, 6):
        batch = make_batch(cls, ds, model, 512, i, 100.0 * i)
        a = [(f.uid, f.related_ids, f.severity) for f in det.update(batch, {})]
        b = [(f.uid, f.related_ids, f.severity) for f in twin.update(batch, {})]
        assert a == b
