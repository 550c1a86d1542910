"""A flood of 1,000,000 distinct client ids through every per-client detector (issue 6, hostile clients).

Per-client state must stay under ``max_clients`` (least recently seen evicted),
evictions must be counted, and a finding must say that eviction may hide an
attacker. Memory is measured twice: the detector's checkpoint size (all of its
runtime state) and the Python heap growth traced by tracemalloc over the last
900,000 clients, after the table filled up.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from agent.findings import Severity
from agent.model import train_classifier
from agent.records import InferenceBatch
from agent.reference import ReferenceData
from agent.scenarios.data import load
from agent.state import save_tree
from detectors.base import Detector, DetectorContext, registry

PER_CLIENT = ["query_rate", "extraction", "adversarial", "drift_vae"]
MAX_CLIENTS = 1000
TOTAL_CLIENTS = 1_000_000
BATCH = 4096
WARMUP_CLIENTS = 100_000


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    ds = load("digits")
    model = train_classifier(ds.X_train, ds.y_train, ds.input_shape, torch.device("cpu"), epochs=5)
    return ds, model


def build(name: str, ds, model) -> Detector:
    cls = registry()[name]
    ctx = DetectorContext(device=torch.device("cpu"), input_shape=ds.input_shape, n_classes=ds.n_classes,
                          model=model)
    det = cls(cls.Options(max_clients=MAX_CLIENTS), ctx)
    if cls.requires_fit:
        det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    return det


def state_bytes(det: Detector, tmp_path) -> int:
    path = tmp_path / f"{det.name}.npz"
    save_tree(path, det.state_dict())
    return path.stat().st_size


def slots_of(det: Detector):
    """The detector's ClientSlots table (named ``slots`` or ``_slots``; an empty table is falsy, so no ``or``)."""
    return det.slots if hasattr(det, "slots") else det._slots


class Flood:
    """Batches of fresh client ids over a fixed pool of real digits rows (1,000 records/s of event time)."""

    def __init__(self, ds, model):
        rng = np.random.default_rng(0)
        rows = rng.integers(0, len(ds.X_test), BATCH)
        self.X = ds.X_test[rows]
        self.probs = model.predict_proba(self.X)
        self.labels = self.probs.argmax(1).astype(np.int64)

    def batch(self, b: int) -> InferenceBatch:
        first = b * BATCH
        n = min(BATCH, TOTAL_CLIENTS - first)
        return InferenceBatch(ids=tuple(f"r{first + i}" for i in range(n)),
                              ts=1_763_877_600 + (first + np.arange(n)) * 1e-3, models=("m",) * n,
                              model_versions=(None,) * n, clients=tuple(f"flood-{first + i}" for i in range(n)),
                              X=self.X[:n], probs=self.probs[:n], labels=self.labels[:n])


@pytest.mark.slow
@pytest.mark.parametrize("name", PER_CLIENT)
def test_million_client_ids_stay_bounded_and_are_reported(name: str, digits, tmp_path) -> None:
    ds, model = digits
    det = build(name, ds, model)
    flood = Flood(ds, model)
    n_batches = -(-TOTAL_CLIENTS // BATCH)
    warm = WARMUP_CLIENTS // BATCH
    findings = []
    t0 = time.perf_counter()
    for b in range(warm):  # keep only the eviction reports: holding every finding would itself grow the heap
        findings += [f for f in det.update(flood.batch(b), {"findings": []}) if f.window.startswith("evictions:")]
    size_warm = state_bytes(det, tmp_path)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for b in range(warm, n_batches):
        findings += [f for f in det.update(flood.batch(b), {"findings": []}) if f.window.startswith("evictions:")]
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    size_end = state_bytes(det, tmp_path)

    slots = slots_of(det)
    print(f"{name}: {TOTAL_CLIENTS} clients in {elapsed:.1f} s, tracked {len(slots)}, evictions {slots.evictions}, "
          f"state {size_warm} -> {size_end} bytes, heap growth {grown / 1e6:.2f} MB")
    assert len(slots) <= MAX_CLIENTS
    assert slots.evictions == TOTAL_CLIENTS - MAX_CLIENTS
    assert size_end <= size_warm * 1.05 + 4096  # per-client state does not grow after the table is full
    assert grown < 8e6  # bytes of live Python heap added over 900,000 more clients

    alarms = findings
    assert alarms, "eviction must be reported in a finding"
    assert all(f.detector == name and f.family == det.family for f in alarms)
    assert sum(f.evidence["evicted_since_last_report"] for f in alarms) <= slots.evictions
    assert alarms[-1].evidence["evictions_total"] > 0.9 * slots.evictions
    assert "evade" in alarms[0].message and "max_clients" in alarms[0].message
    # one report per 300 s of event time at most: 1,000 s of flood -> at most 4
    assert len(alarms) <= 4


@pytest.mark.parametrize("name", PER_CLIENT)
def test_eviction_is_bounded_counted_and_reported_fast(name: str, digits) -> None:
    """The same properties on 20,480 clients, for the fast CI run."""
    ds, model = digits
    det = build(name, ds, model)
    flood = Flood(ds, model)
    alarms = []
    for b in range(5):
        alarms += [f for f in det.update(flood.batch(b), {"findings": []}) if f.window.startswith("evictions:")]
    slots = slots_of(det)
    assert len(slots) <= MAX_CLIENTS and slots.evictions == 5 * BATCH - MAX_CLIENTS
    assert len(alarms) == 1 and alarms[0].evidence["evictions_total"] > 0
    assert alarms[0].severity == Severity.MEDIUM and alarms[0].attacks == ("AML.T0015",)


def test_no_eviction_no_alarm(digits) -> None:
    """Fewer clients than max_clients: nothing evicted, no eviction finding."""
    ds, model = digits
    det = build("query_rate", ds, model)
    flood = Flood(ds, model)
    b = flood.batch(0)
    small = InferenceBatch(ids=b.ids[:500], ts=b.ts[:500], models=b.models[:500], model_versions=b.model_versions[:500],
                           clients=b.clients[:500], X=b.X[:500], probs=b.probs[:500], labels=b.labels[:500])
    out = det.update(small, {"findings": []})
    assert slots_of(det).evictions == 0 and not [f for f in out if f.window.startswith("evictions:")]


