"""Drift scenario: benign traffic that turns into shifted traffic part-way, plus long benign-only streams.

For each data set the ``drift_vae`` detector is fitted on ``X_train`` and a
monitored model (trained on ``X_train``) answers every record, so records
carry ``probs`` as in production. Then:

* false alarms: a benign-only stream (100,000 records per data set in full
  mode, test rows drawn at random by hundreds of clients, in time order);
  every drift finding on it, per-record or episode, is a false alarm.
* shifts: ``n_before`` benign records, then every client's inputs change:
  brightness, contrast, Gaussian noise, rotation and blur (digits), scaling of
  a subset of features, a mean offset on a subset (tabular), and a class-prior
  shift (both). ``events_to_detect`` counts shifted records up to and
  including the one that completes the first drift finding.

Nothing here was used to pick the detector's thresholds: they come from its
own calibration split and the CUSUM's average-run-length bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from agent.model import train_classifier
from agent.reference import ReferenceData
from agent.scenarios import data
from agent.scenarios._stream import Stream
from detectors.base import DetectorContext
from detectors.drift_vae import DriftVAE

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _images(fn: Callable[[np.ndarray], np.ndarray]) -> Shift:
    def apply(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        imgs = X.reshape(-1, 8, 8)
        return np.clip(np.stack([fn(im) for im in imgs]).reshape(len(X), -1), 0, 1).astype(np.float32)
    return apply


def _digit_shifts() -> dict[str, Shift]:
    return {
        "brightness +0.15": lambda X, rng: np.clip(X + 0.15 * (X > 0), 0, 1),
        "contrast x0.6": lambda X, rng: np.clip(X * 0.6, 0, 1),
        "gaussian noise 0.1": lambda X, rng: np.clip(X + rng.normal(0, 0.1, X.shape), 0, 1).astype(np.float32),
        "rotation 20deg": _images(lambda im: ndimage.rotate(im, 20, reshape=False, order=1, mode="constant")),
        "blur sigma 0.8": _images(lambda im: ndimage.gaussian_filter(im, 0.8)),
        "scale 16 pixels x0.5": lambda X, rng: X * np.where(np.arange(64) % 4 == 0, 0.5, 1.0).astype(np.float32),
        # weak on purpose (mean change 0.014, under a quarter of one grey level): shows the detection floor
        "weak: scale 16 pixels x1.5": lambda X, rng: np.clip(X * np.where(np.arange(64) % 4 == 0, 1.5, 1.0), 0, 1),
    }


def _tabular_shifts(dim: int) -> dict[str, Shift]:
    subset = np.arange(dim) % 3 == 0  # a third of the features (10 of tabular's 30)
    k = int(subset.sum())
    return {
        f"scale {k} features x1.5": lambda X, rng: X * np.where(subset, 1.5, 1.0).astype(np.float32),
        f"offset {k} features +0.75 std": lambda X, rng: X + np.where(subset, 0.75, 0.0).astype(np.float32),
        "gaussian noise 0.5 std": lambda X, rng: X + rng.normal(0, 0.5, X.shape).astype(np.float32),
    }


def _prior_shift(ds: data.Dataset, rng: np.random.Generator, n: int) -> np.ndarray:
    """Test rows drawn so that 70% come from the first two classes (a population change, no new inputs)."""
    favoured = np.flatnonzero(ds.y_test < 2)
    others = np.flatnonzero(ds.y_test >= 2) if ds.n_classes > 2 else favoured
    if ds.n_classes == 2:  # binary: 90% of one class instead of the reference mix
        favoured, others = np.flatnonzero(ds.y_test == 0), np.flatnonzero(ds.y_test == 1)
        share = 0.9
    else:
        share = 0.7
    pick = np.where(rng.random(n) < share, rng.choice(favoured, n), rng.choice(others, n))
    return ds.X_test[pick]


def _run_shift(det_factory: Callable[[], DriftVAE], ds: data.Dataset, predict, name: str,
               shifted: np.ndarray, n_before: int, seed: int, change: float) -> dict[str, Any]:
    det = det_factory()
    Xb, cb, _ = data.benign_traffic(ds, n_before, 200, seed=seed)
    rng = np.random.default_rng(seed + 1)
    cs = rng.integers(0, 200, len(shifted))
    stream = Stream(model=f"{ds.name}-mlp")
    ts_b = np.arange(n_before, dtype=np.float64) * 0.05
    ts_s = ts_b[-1] + 0.05 * (1 + np.arange(len(shifted)))
    stream.add("benign", Xb, ts_b, [f"tenant-{c}" for c in cb], predict(Xb))
    stream.add("shifted", shifted, ts_s, [f"tenant-{c}" for c in cs], predict(shifted))
    findings, _, index = stream.replay(det)
    episodes = [f for f in findings if "drift" in f.title.lower() or "shift" in f.title.lower()]
    before = [f for f in findings if f.time_ms < int(ts_s[0] * 1000)]
    after = [f for f in episodes if f.time_ms >= int(ts_s[0] * 1000)]
    first = min(after, key=lambda f: f.time_ms) if after else None
    events = None
    if first is not None:
        events = int(np.searchsorted(ts_s, first.time_ms / 1000 + 1e-9, side="right"))
    shifted_named = 0
    if first is not None:
        kinds = stream.kinds
        shifted_named = sum(1 for rid in first.related_ids if kinds[index[rid]] == "shifted")
    return {
        "variant": name, "data": ds.name, "moderate": not name.startswith("weak"),
        "mean_abs_change": round(change, 4),
        "detected": first is not None, "events_to_detect": events,
        "channel": first.evidence.get("channel") if first else None,
        "false_alarms_before_shift": len(before),
        "related_ids": len(first.related_ids) if first else 0,
        "related_ids_shifted_share": shifted_named / max(len(first.related_ids), 1) if first else None,
        "ood_record_findings_after_shift": sum(1 for f in findings if f.title == "Out-of-distribution input"
                                               and f.time_ms >= int(ts_s[0] * 1000)),
    }


def _evaluate_dataset(name: str, device: torch.device, quick: bool, seed: int = 0,
                      n_before: int | None = None) -> dict[str, Any]:
    """One data set's benign run and shifts; ``n_before``: benign records before each shift (default 3,000)."""
    ds = data.load(name)
    model = train_classifier(ds.X_train, ds.y_train, ds.input_shape, device, epochs=60, seed=seed)
    started = time.perf_counter()
    fitted = DriftVAE(DriftVAE.Options(), DetectorContext(device, ds.input_shape, ds.n_classes, seed=seed))
    fitted.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    fit_s = time.perf_counter() - started
    artifacts = fitted.artifacts()

    def factory() -> DriftVAE:
        det = DriftVAE(DriftVAE.Options(), DetectorContext(device, ds.input_shape, ds.n_classes, seed=seed))
        det.load_artifacts(artifacts)
        return det

    n_benign = 20_000 if quick else 100_000
    Xb, cb, tsb = data.benign_traffic(ds, n_benign, 300, seed=seed + 11)
    stream = Stream(model=f"{name}-mlp")
    stream.add("benign", Xb, tsb, [f"tenant-{c}" for c in cb], model.predict_proba(Xb))
    det = factory()
    started = time.perf_counter()
    benign_findings, _, _ = stream.replay(det)
    replay_s = time.perf_counter() - started

    rng = np.random.default_rng(seed + 5)
    n_default, n_after = (1000, 1500) if quick else (3000, 3000)
    n_before = n_before or n_default
    base, _, _ = data.benign_traffic(ds, n_after, 200, seed=seed + 21)
    shifts = _digit_shifts() if name == "digits" else _tabular_shifts(ds.dim)
    variants = []
    for i, (variant, fn) in enumerate(shifts.items()):
        shifted = np.asarray(fn(base.copy(), rng), np.float32)
        change = float(np.abs(shifted - base).mean())
        variants.append(_run_shift(factory, ds, model.predict_proba, variant, shifted, n_before, seed + 100 + i,
                                   change))
    prior = _prior_shift(ds, rng, n_after).astype(np.float32)
    variants.append(_run_shift(factory, ds, model.predict_proba, "class-prior shift", prior, n_before, seed + 99,
                               0.0))
    return {
        "data": name, "benign_records": n_benign, "false_alarms_benign": len(benign_findings),
        "false_alarm_titles": sorted({f.title for f in benign_findings}),
        "variants": variants, "fit_s": round(fit_s, 2), "replay_records_per_s": round(n_benign / replay_s, 1),
        "calibration_size": len(fitted.calibrator.sorted_scores),
    }


def evaluate(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """The drift family's report section (CONTRACT.md "Machine-readable reports") plus details."""
    per_data = [_evaluate_dataset(name, device, quick) for name in ("digits", "tabular")]
    variants = [v for d in per_data for v in d["variants"]]
    moderate = [v for v in variants if v["moderate"]]
    found = [v["events_to_detect"] for v in moderate if v["detected"]]
    false_alarms = sum(d["false_alarms_benign"] for d in per_data) + sum(
        v["false_alarms_before_shift"] for v in variants)
    return {
        "detected": all(v["detected"] for v in moderate),
        "events_to_detect": int(np.median(found)) if found else None,
        "events_to_detect_max": int(max(found)) if found else None,
        "false_alarms": int(false_alarms),
        "benign_records": sum(d["benign_records"] for d in per_data),
        "variants": variants,
        "detector_aware": {
            "note": "drift is not adversarial by itself; an attacker who shifts inputs slowly enough stays "
                    "under the CUSUM allowance (about 3 calibration standard errors of the mean log p-value "
                    "per record), see variants for the smallest shifts caught",
        },
        "datasets": per_data,
    }


if __name__ == "__main__":
    # python -m agent.scenarios.drift 0,1,2,3: the eval over other seeds
    # python -m agent.scenarios.drift 0 synthetic,imbalanced: data sets the eval does not have (standardised
    # tables, so the tabular shifts apply)
    # python -m agent.scenarios.drift 0 imbalanced 9000: 9,000 benign records before each shift, not 3,000 (the
    # class-prior test of recent windows against earlier ones needs 9,000 labelled records of history)
    import sys

    before = int(sys.argv[3]) if len(sys.argv) > 3 else None
    for name in (sys.argv[2].split(",") if len(sys.argv) > 2 else ("digits", "tabular")):
        for seed in [int(x) for x in sys.argv[1].split(",")]:
            r = _evaluate_dataset(name, torch.device("cpu"), False, seed=seed, n_before=before)
            moderate = [v for v in r["variants"] if v["moderate"]]
            late = {v["variant"]: v["events_to_detect"] for v in moderate
                    if not v["detected"] or v["events_to_detect"] > 500}
            worst = max((v["events_to_detect"] or 0) for v in moderate)
            before = sum(v["false_alarms_before_shift"] for v in r["variants"])
            print(f"{name} seed {seed}: false alarms {r['false_alarms_benign']} in {r['benign_records']:,} benign "
                  f"+ {before} before shifts, worst moderate {worst}, missed or past 500: {late or 'none'}",
                  flush=True)
