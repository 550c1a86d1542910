"""model_version: a new version that answers differently is flagged; a faithful retrain is not."""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import train_classifier
from agent.records import InferenceBatch
from agent.reference import ReferenceData
from agent.scenarios.data import load
from agent.state import load_tree, save_tree
from detectors.base import DetectorContext
from detectors.model_version import ModelVersionDetector, _remember

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = load("digits", 0)
    v1 = train_classifier(ds.X_train, ds.y_train, ds.input_shape, CPU, epochs=20, seed=0)
    retrain = train_classifier(ds.X_train, ds.y_train, ds.input_shape, CPU, epochs=20, seed=1)
    # a version retrained on feedback where 3s were relabelled 8 (a targeted poisoning campaign)
    y_bad = ds.y_train.copy()
    y_bad[y_bad == 3] = 8
    poisoned = train_classifier(ds.X_train, y_bad, ds.input_shape, CPU, epochs=20, seed=2)
    yield ds, v1, retrain, poisoned
    torch.set_num_threads(before)


def traffic(ds, model, version: str, n: int, seed: int, start: float, prefix: str) -> InferenceBatch:
    """Benign queries (test rows, so the same inputs recur: near-duplicates across versions)."""
    rng = np.random.default_rng(seed)
    X = ds.X_test[rng.integers(0, len(ds.X_test), n)]
    probs = model.predict_proba(X)
    return InferenceBatch(ids=tuple(f"{prefix}-{i}" for i in range(n)), ts=start + np.arange(n) * 0.05,
                          models=("digits",) * n, model_versions=(version,) * n,
                          clients=tuple(f"c{i % 50}" for i in range(n)), X=X, probs=probs,
                          labels=probs.argmax(1).astype(np.int64))


def make(ds, model) -> ModelVersionDetector:
    det = ModelVersionDetector(ModelVersionDetector.Options(),
                               DetectorContext(device=CPU, input_shape=ds.input_shape, n_classes=10, model=model))
    det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    return det


def run(det, batches) -> list:
    out = []
    for b in batches:
        out += det.update(b, {})
    return out


def rollout(ds, old, new, seed: int = 0) -> list[InferenceBatch]:
    return ([traffic(ds, old, "1", 500, seed + i, 100.0 * i, f"a{i}") for i in range(3)]
            + [traffic(ds, new, "2", 250, seed + 10 + i, 1000.0 + 100 * i, f"b{i}") for i in range(8)])


def test_faithful_retrain_raises_nothing(world) -> None:
    ds, v1, retrain, _ = world
    for seed in range(3):
        assert run(make(ds, v1), rollout(ds, v1, retrain, seed * 100)) == []


def test_poisoned_version_is_flagged_once_with_its_records(world) -> None:
    ds, v1, _, poisoned = world
    findings = run(make(ds, v1), rollout(ds, v1, poisoned))
    assert len(findings) == 1, "one finding per version change"
    (f,) = findings
    assert f.family == "integrity" and f.attacks == ("AML.T0031",) and f.model == "digits"
    assert f.evidence["previous_version"] == "1" and f.evidence["new_version"] == "2"
    shifted = f.evidence["shifted"]
    assert shifted["class_rates"] and shifted["near_duplicate_disagreement"]
    assert all(r.startswith("b") for r in f.related_ids), "names records answered by the new version"
    assert f.evidence["class_rates_new"][3] < 0.02 < f.evidence["class_rates_previous"][3]


def test_unversioned_and_single_version_traffic_is_quiet(world) -> None:
    ds, v1, _, poisoned = world
    det = make(ds, v1)
    batches = [traffic(ds, poisoned, None, 500, i, 100.0 * i, f"u{i}") for i in range(4)]
    assert run(det, batches) == []


def test_checkpoint_mid_rollout_gives_the_same_finding(world, tmp_path: Path) -> None:
    ds, v1, _, poisoned = world
    batches = rollout(ds, v1, poisoned)
    straight = make(ds, v1)
    expected = [(f.uid, f.related_ids) for f in run(straight, batches)]
    first = make(ds, v1)
    run(first, batches[:4])  # the new version has answered 250 times: not yet compared (min_records 500)
    assert first.models["digits"]["comparisons"]["2"]["raised"] is False
    save_tree(tmp_path / "art.npz", first.artifacts())
    save_tree(tmp_path / "state.npz", first.state_dict())
    resumed = ModelVersionDetector(ModelVersionDetector.Options(), copy.copy(first.context))
    resumed.load_artifacts(load_tree(tmp_path / "art.npz"))
    resumed.load_state_dict(load_tree(tmp_path / "state.npz"))
    assert [(f.uid, f.related_ids) for f in run(resumed, batches[4:])] == expected and expected


def test_memory_is_bounded(world) -> None:
    ds, v1, _, _ = world
    det = ModelVersionDetector(ModelVersionDetector.Options(max_keys=100, max_versions=3, max_models=2),
                               DetectorContext(device=CPU, input_shape=ds.input_shape, n_classes=10, model=v1))
    det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    for v in range(6):
        for m in ("m1", "m2", "m3") if v == 5 else ("m1", "m2"):
            b = traffic(ds, v1, str(v), 300, v, 10.0 * v, f"{m}{v}")
            det.update(InferenceBatch(ids=b.ids, ts=b.ts, models=(m,) * len(b), model_versions=b.model_versions,
                                      clients=b.clients, X=b.X, probs=b.probs, labels=b.labels), {})
    assert list(det.models) == ["m2", "m3"], "the least recently seen model is forgotten"
    assert len(det.models["m2"]["versions"]) == 3 and list(det.models["m2"]["versions"]) == ["3", "4", "5"]
    for state in det.models.values():
        assert all(len(st.keys) <= 100 and len(st.ids) <= 1000 for st in state["versions"].values())


def test_without_a_model_the_previous_version_is_the_baseline(world) -> None:
    ds, v1, _, poisoned = world
    det = ModelVersionDetector(ModelVersionDetector.Options(),
                               DetectorContext(device=CPU, input_shape=ds.input_shape, n_classes=10, model=None))
    det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    assert det.ref_classes is None
    assert len(run(det, rollout(ds, v1, poisoned))) == 1


@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3)), max_size=60), st.integers(1, 8),
       st.lists(st.integers(0, 12), max_size=8, unique=True))
@settings(max_examples=300, deadline=None)
def test_a_batch_is_remembered_as_its_rows_one_by_one(rows, max_keys, earlier) -> None:
    """The batched least-recently-used update leaves what answering the rows one at a time would leave."""
    one_by_one = OrderedDict((h, 9) for h in earlier[-max_keys:])
    batched = OrderedDict(one_by_one)
    for h, label in rows:
        one_by_one[h] = label
        one_by_one.move_to_end(h)
        if len(one_by_one) > max_keys:
            one_by_one.popitem(last=False)
    _remember(batched, [h for h, _ in rows], np.asarray([label for _, label in rows], np.int64), max_keys)
    assert list(batched.items()) == list(one_by_one.items())


def test_cells_are_the_grid_cells(world) -> None:
    """Rows in one grid cell share a hash; rows a cell apart (in any feature, either way) do not."""
    ds, v1, _, _ = world
    det = make(ds, v1)
    rng = np.random.default_rng(0)
    X = np.round(ds.X_test[:200] / det.step) * det.step  # the centres of their cells
    cells = det._cells(X)
    assert np.array_equal(cells, det._cells(X + rng.uniform(-0.4, 0.4, X.shape) * det.step))
    for j in (0, 17, 63):
        for sign in (-1, 1):
            moved = X.copy()
            moved[:, j] += sign * det.step[j]
            assert not np.isin(det._cells(moved), cells).any()
    assert len(set(cells.tolist())) == len({tuple(r) for r in np.round(X / det.step).astype(int).tolist()})


def test_cells_hashed_another_way_are_dropped_on_load(world, caplog) -> None:
    """A checkpoint from before the cell hash changed keeps its counts but not its remembered cells, which
    could never match again (and could, by chance, match the wrong ones)."""
    ds, v1, _, poisoned = world
    det = make(ds, v1)
    run(det, rollout(ds, v1, poisoned)[:4])
    state = det.state_dict()
    pairs = det.models["digits"]["comparisons"]["2"]["pairs"]
    assert pairs > 0 and all(st.keys for st in det.models["digits"]["versions"].values())
    del state["cell_hash"]
    resumed = make(ds, v1)
    with caplog.at_level("WARNING"):
        resumed.load_state_dict(state)
    assert "hashed another way" in caplog.text
    assert resumed.models["digits"]["comparisons"]["2"]["pairs"] == pairs
    assert not any(st.keys for st in resumed.models["digits"]["versions"].values())
    same = make(ds, v1)
    same.load_state_dict(det.state_dict())
    assert all(st.keys for st in same.models["digits"]["versions"].values())
